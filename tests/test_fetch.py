"""`dalipipe fetch` against a local HTTP server on 127.0.0.1, and the paper-input helpers.

The server answers byte ranges; per path it can misbehave: ``trunc-once`` promises the whole
body on the first request and sends a third, ``no-range`` ignores Range requests. It records
every request's Range header, so a test can see that a download was resumed.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import http.server
import json
import re
import threading
from pathlib import Path

import pytest

from dalipipe.data import fetch as fetch_mod
from dalipipe.data import paper_inputs
from dalipipe.data.fetch import FetchError, fetch, part_path

REPO = Path(__file__).resolve().parents[1]
SHARED = next(
    (p for p in (REPO.parent / "shared" / "data", Path("/work/shared/data")) if p.is_dir()),
    Path("/nonexistent"),
)
BODY = bytes(range(256)) * 4096  # 1 MiB, every byte value


class FileServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, files: dict[str, bytes], behaviours: dict[str, str]):
        super().__init__(("127.0.0.1", 0), FileHandler)
        self.files, self.behaviours = files, behaviours
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.lock = threading.Lock()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def ranges(self, path: str) -> list[str | None]:
        return [r for p, r in self.requests if p == path]


class FileHandler(http.server.BaseHTTPRequestHandler):
    server: FileServer

    def log_message(self, *args):
        pass

    def do_GET(self):
        server = self.server
        with server.lock:
            server.requests.append((self.path, self.headers.get("Range")))
            first = len(server.ranges(self.path)) == 1
        if self.path not in server.files:
            return self.send_error(404)
        data, behaviour = server.files[self.path], server.behaviours.get(self.path)
        start = 0
        ranged = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if ranged and behaviour != "no-range":
            start = int(ranged.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        chunk = data[start:]
        if behaviour == "trunc-once" and first:
            chunk = chunk[: len(chunk) // 3]  # promise everything, send a third, hang up
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(chunk)


@contextlib.contextmanager
def serve(files: dict[str, bytes], behaviours: dict[str, str] | None = None):
    server = FileServer(files, behaviours or {})
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def test_download_with_a_pinned_checksum(tmp_path):
    out = tmp_path / "sub" / "file.bin"
    with serve({"/f.bin": BODY}) as host:
        assert fetch(host.url("/f.bin"), out, md5=md5(BODY), progress=False) == out
    assert out.read_bytes() == BODY
    assert not part_path(out).exists()


def test_404_names_the_file_and_the_url_and_leaves_nothing(tmp_path):
    out = tmp_path / "file.csv"
    with serve({}) as host, pytest.raises(FetchError) as err:
        fetch(host.url("/gone.csv"), out, progress=False)
    message = str(err.value)
    assert str(out) in message and host.url("/gone.csv") in message and "404" in message
    assert "place it at" in message  # what to do
    assert not out.exists() and not part_path(out).exists()


def test_a_wrong_checksum_leaves_no_finished_file(tmp_path):
    out = tmp_path / "file.bin"
    with serve({"/f.bin": BODY}) as host, pytest.raises(FetchError) as err:
        fetch(host.url("/f.bin"), out, sha256="0" * 64, progress=False)
    message = str(err.value)
    assert str(out) in message and host.url("/f.bin") in message and "sha256" in message
    assert not out.exists() and not part_path(out).exists()


def test_a_truncated_body_fails_then_resumes_with_a_range_request(tmp_path):
    out = tmp_path / "file.bin"
    with serve({"/f.bin": BODY}, {"/f.bin": "trunc-once"}) as host:
        with pytest.raises(FetchError) as err:
            fetch(host.url("/f.bin"), out, md5=md5(BODY), progress=False)
        assert "stopped at" in str(err.value) and str(out) in str(err.value)
        assert "run the same command again" in str(err.value)
        assert not out.exists()
        kept = part_path(out).stat().st_size
        assert 0 < kept < len(BODY)
        fetch(host.url("/f.bin"), out, md5=md5(BODY), progress=False)
        assert host.ranges("/f.bin") == [None, f"bytes={kept}-"]
    assert out.read_bytes() == BODY
    assert not part_path(out).exists()


def test_retries_resume_within_one_call(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch_mod.time, "sleep", lambda s: None)
    out = tmp_path / "file.bin"
    with serve({"/f.bin": BODY}, {"/f.bin": "trunc-once"}) as host:
        fetch(host.url("/f.bin"), out, md5=md5(BODY), retries=1, progress=False)
        assert host.ranges("/f.bin")[1].startswith("bytes=")
    assert out.read_bytes() == BODY


def test_a_server_ignoring_range_is_read_from_the_start(tmp_path):
    out = tmp_path / "file.bin"
    part_path(out).write_bytes(b"x" * 1000)  # a stale part (not even a prefix of the file)
    with serve({"/f.bin": BODY}, {"/f.bin": "no-range"}) as host:
        fetch(host.url("/f.bin"), out, md5=md5(BODY), progress=False)
        assert host.ranges("/f.bin") == ["bytes=1000-"]
    assert out.read_bytes() == BODY


def test_a_complete_part_is_finished_without_downloading_again(tmp_path):
    out = tmp_path / "file.bin"
    part_path(out).write_bytes(BODY)
    with serve({"/f.bin": BODY}) as host:
        fetch(host.url("/f.bin"), out, md5=md5(BODY), progress=False)
    assert out.read_bytes() == BODY


def test_the_checksum_is_recorded_at_first_download_and_checked_later(tmp_path):
    record = tmp_path / "record.json"
    out = tmp_path / "file.csv"
    files = {"/f.csv": b"a,b\n1,2\n"}
    with serve(files) as host:
        url = host.url("/f.csv")
        fetch(url, out, record=record, progress=False)
        entry = json.loads(record.read_text())[url]
        assert entry["sha256"] == hashlib.sha256(files["/f.csv"]).hexdigest()
        assert entry["size"] == 8
        out.unlink()
        fetch(url, out, record=record, progress=False)  # same bytes: accepted
        out.unlink()
        files["/f.csv"] = b"a,b\n1,3\n"  # the server changed the file
        with pytest.raises(FetchError) as err:
            fetch(url, out, record=record, progress=False)
        message = str(err.value)
        assert str(out) in message and url in message and str(record) in message
        assert "delete its entry" in message
        assert not out.exists() and not part_path(out).exists()
    assert json.loads(record.read_text())[url]["sha256"] == entry["sha256"]  # unchanged


def test_a_second_run_does_nothing(tmp_path):
    out = tmp_path / "file.bin"
    with serve({"/f.bin": BODY}) as host:
        fetch(host.url("/f.bin"), out, md5=md5(BODY), progress=False)
        mtime = out.stat().st_mtime_ns
        fetch(host.url("/f.bin"), out, md5=md5(BODY), progress=False)
        assert len(host.requests) == 1
    assert out.stat().st_mtime_ns == mtime


def test_the_command_line(tmp_path, capsys):
    from dalipipe.cli import main

    out = tmp_path / "file.bin"
    with serve({"/f.bin": BODY}) as host:
        assert main(["fetch", host.url("/f.bin"), "--out", str(out), "--md5", md5(BODY)]) == 0
        assert out.read_bytes() == BODY
        missing = tmp_path / "missing.bin"
        assert main(["fetch", host.url("/nope"), "--out", str(missing), "--retries", "0"]) == 1
        assert not missing.exists()


# ----------------------------------------------------------------------------- paper inputs


def test_unpack_a_7z_archive_with_one_top_folder(tmp_path):
    py7zr = pytest.importorskip("py7zr")
    src = tmp_path / "evaluation"
    src.mkdir()
    (src / "a b.wav").write_bytes(b"RIFF1")
    (src / "c.wav").write_bytes(b"RIFF2")
    archive = tmp_path / "clotho_audio_evaluation.7z"
    with py7zr.SevenZipFile(archive, "w") as z:
        z.writeall(src, arcname="evaluation")
    out = tmp_path / "data" / "evaluation"
    paper_inputs.unpack(archive, out)
    assert sorted(p.name for p in out.iterdir()) == ["a b.wav", "c.wav"]
    assert (out / "c.wav").read_bytes() == b"RIFF2"


def test_audiocaps_selection_gives_the_evaluation_clip_ids(tmp_path):
    from dalipipe.data.audioset import read_selection

    path = tmp_path / "test.csv"
    path.write_text(
        "audiocap_id,youtube_id,start_time,caption\n"
        "1,--0w1YA1Hm4,30,A man talks\n2,--0w1YA1Hm4,30,Speech\n3,-AheI8Epim4,0,Rain\n"
    )
    assert paper_inputs.audiocaps_selection(path, tmp_path / "sel") == 2
    rows = read_selection(tmp_path / "sel" / "part-0.jsonl")  # what acquire-audioset reads
    assert [(r.clip_id, r.start_s, r.end_s) for r in rows] == [
        ("--0w1YA1Hm4_30000", 30.0, 40.0),
        ("-AheI8Epim4_0", 0.0, 10.0),
    ]


PREFIX_DS = SHARED / "authors" / "prefixDS.json"


def make_clip(path: Path) -> None:
    """A 10-s H.264 clip at 10 fps: red for the first 5 s, blue after."""
    import subprocess

    import imageio_ffmpeg

    colours = "color=red:s=64x48:r=10:d=5[a];color=blue:s=64x48:r=10:d=5[b];[a][b]concat=n=2"
    subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", "-f", "lavfi", "-i", colours,
         "-c:v", "libx264", "-pix_fmt", "yuv420p", str(path)],
        check=True,
    )  # fmt: skip


@pytest.mark.skipif(not PREFIX_DS.exists(), reason="needs ../shared/data/authors/prefixDS.json")
def test_prefix_selection_finds_the_start_of_each_authors_clip(tmp_path):
    """Start times from AudioCaps (caption matched), else from the AudioSet segment CSVs."""
    from dalipipe.data.audioset import read_selection

    pairs = paper_inputs.read_prefix_pairs(PREFIX_DS)
    assert len(pairs) == 16
    audiocaps = tmp_path / "train.csv"
    with open(audiocaps, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["audiocap_id", "youtube_id", "start_time", "caption"])
        for n, pair in enumerate(pairs[:-2]):
            writer.writerow([n, pair["id"], 10 * n, "another caption of the clip"])
            writer.writerow([n + 100, pair["id"], 10 * n, pair["caption"]])
    segments = tmp_path / "unbalanced.csv"
    segments.write_text(
        "# YTID, start_seconds, end_seconds, positive_labels\n"
        f'{pairs[-2]["id"]}, 250.000, 260.000, "/m/09x0r"\n'
    )
    rows = paper_inputs.prefix_selection(PREFIX_DS, tmp_path / "sel", [audiocaps], [segments])
    assert [r["youtube_id"] for r in rows] == [p["id"] for p in pairs[:-1]]  # last: unknown
    read = read_selection(tmp_path / "sel" / "part-0.jsonl")
    assert read[0].start_s == 0.0 and read[1].start_s == 10.0 and read[-1].start_s == 250.0


@pytest.mark.skipif(not PREFIX_DS.exists(), reason="needs ../shared/data/authors/prefixDS.json")
def test_prefix_pairs_pair_the_frame_at_5_s_with_the_authors_caption(tmp_path):
    pairs = paper_inputs.read_prefix_pairs(PREFIX_DS)
    clips = tmp_path / "clips"
    (clips / "clips").mkdir(parents=True)
    ok, gone = f"{pairs[0]['id']}_0", f"{pairs[1]['id']}_560000"
    make_clip(clips / "clips" / f"{ok}.mp4")
    with open(clips / "manifest.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["clip_id", "path", "status", "reason", "split", "start_s", "labels"])
        writer.writerow([ok, str(clips / "clips" / f"{ok}.mp4"), "ok", "", "prefix", 0.0, ""])
        writer.writerow([gone, "", "removed", "removed by the uploader", "prefix", 0.0, ""])
    with open(clips / "metadata.jsonl", "w") as f:
        for clip_id, pair in ((ok, pairs[0]), (gone, pairs[1])):
            f.write(json.dumps({"clip_id": clip_id, "youtube_id": pair["id"]}) + "\n")
    out = tmp_path / "prefix" / "pairs.csv"
    summary = paper_inputs.prefix_pairs(PREFIX_DS, clips, out, tmp_path / "prefix" / "frames")
    assert summary["pairs"] == 1 and summary["of"] == 2 and gone in summary["left_out"][0]
    from dalipipe.caption.pairs import load_pairs

    (pair,) = load_pairs(out)  # what the prefix stage reads
    assert pair.caption == pairs[0]["caption"] and pair.clip_id == ok
    # the clip's frame at 5 s: the test clip is red before 5 s and blue from 5 s on
    r, g, b = pair.image.convert("RGB").resize((1, 1)).getpixel((0, 0))
    assert b > 150 and r < 100
