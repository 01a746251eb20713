"""A local stand-in for YouTube: a threaded HTTP server on 127.0.0.1 serving generated MP4s.

    from tests.support.video_host import make_video, serve_videos

    make_video(path)                                   # 20 s testsrc + tone (440 -> 880 Hz at 10 s)
    with serve_videos(path.read_bytes(), {"missingVid1": "missing"}) as host:
        download.acquire_part(segments, {"url_template": host.url_template, ...}, out)
        host.requests["missingVid1"]                   # requests seen per id

The server answers byte ranges like a video host (yt-dlp's generic extractor reads the page,
then ffmpeg reads ranges). ``behaviours`` maps a YouTube id to how it misbehaves:

- ``missing``: 404; ``forbidden``: 403;
- ``flaky``: 503 on the first request, then the video;
- ``slow``: 0.5 s before answering; ``stall``: ``stall_s`` before answering (longer than the
  client's socket timeout);
- ``trunc``: promises the whole body, sends a third, hangs up;
- ``members``: the page (a request without Range) needs the cookie ``session=let-me-in``.

Every other id gets the video. Used by tests/test_download.py and tests/test_audioset_workflow.py.
"""

from __future__ import annotations

import contextlib
import http.server
import re
import subprocess
import threading
import time
from collections import Counter

BEHAVIOURS = {"missing", "forbidden", "flaky", "slow", "stall", "trunc", "members"}


def make_video(path, seconds: int = 20, size: str = "160x120", switch_s: float = 10.0) -> None:
    """An H.264/AAC MP4: testsrc at 10 fps, a 16 kHz tone of 440 Hz before ``switch_s``, 880 after."""
    import imageio_ffmpeg

    tone = f"sin(2*PI*if(lt(t\\,{switch_s})\\,440\\,880)*t)"
    subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y",
         "-f", "lavfi", "-i", f"testsrc=size={size}:rate=10:duration={seconds}",
         "-f", "lavfi", "-i", f"aevalsrc={tone}:s=16000:d={seconds}",
         "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", str(path)],
        check=True,
    )  # fmt: skip


class VideoServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, video: bytes, behaviours: dict[str, str], stall_s: float):
        unknown = set(behaviours.values()) - BEHAVIOURS
        if unknown:
            raise ValueError(f"unknown behaviours {sorted(unknown)}; known: {sorted(BEHAVIOURS)}")
        super().__init__(("127.0.0.1", 0), VideoHandler)
        self.video, self.behaviours, self.stall_s = video, dict(behaviours), stall_s
        self.requests: Counter = Counter()  # YouTube id (None: not a video path) -> requests
        self.lock = threading.Lock()

    @property
    def url_template(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v/{{youtube_id}}.mp4"


class VideoHandler(http.server.BaseHTTPRequestHandler):
    server: VideoServer

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.answer(body=False)

    def do_GET(self):
        self.answer(body=True)

    def answer(self, body: bool) -> None:
        server = self.server
        match = re.fullmatch(r"/v/([A-Za-z0-9_-]{11})\.mp4", self.path)
        vid = match.group(1) if match else None
        with server.lock:
            server.requests[vid] += 1
            count = server.requests[vid]
        behaviour = server.behaviours.get(vid)
        if vid is None or behaviour == "missing":
            return self.send_error(404)
        if behaviour == "forbidden":
            return self.send_error(403)
        page_request = "Range" not in self.headers  # yt-dlp's; ffmpeg then reads byte ranges
        cookie = self.headers.get("Cookie", "")
        if behaviour == "members" and page_request and "session=let-me-in" not in cookie:
            return self.send_error(403)  # like YouTube: the page needs the cookie, media does not
        if behaviour == "flaky" and count == 1:
            return self.send_error(503)
        if behaviour == "slow":
            time.sleep(0.5)
        if behaviour == "stall":
            time.sleep(server.stall_s)
        data = server.video
        start, end = 0, len(data) - 1
        ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if ranged:
            start = int(ranged.group(1))
            end = int(ranged.group(2)) if ranged.group(2) else end
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Type", "video/mp4")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        if body:
            chunk = data[start : end + 1]
            if behaviour == "trunc":
                chunk = chunk[: len(chunk) // 3]  # promise everything, send a third, hang up
            try:
                self.wfile.write(chunk)
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (the stalled id): expected


def serve_videos(video: bytes, behaviours: dict[str, str] | None = None, stall_s: float = 3.0):
    """A running VideoServer in a daemon thread; shut down on exit."""
    return serving(VideoServer(video, behaviours or {}, stall_s))


@contextlib.contextmanager
def serving(server: http.server.HTTPServer):
    """`server` answering in a daemon thread; shut down on exit (tests/test_fetch.py's too)."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
