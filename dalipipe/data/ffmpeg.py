"""The ffmpeg binary, media probing and audio decoding, shared by every media stage.

    from dalipipe.data.ffmpeg import probe, decode_audio
    info = probe("clip.mp4")                  # MediaInfo(duration=10.0, has_audio=True, ...)
    wave = decode_audio("clip.mp4", 16000)    # float32 mono, first channel

The ffmpeg binary is the static one shipped by imageio-ffmpeg (set IMAGEIO_FFMPEG_EXE to use
another). There is no ffprobe in that package, so `probe` parses the stream summary that
`ffmpeg -i` prints. Paths are passed as argument lists with a `file:` prefix, never through a
shell, so names with spaces, colons, leading dashes or non-ASCII letters are safe.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class MediaError(Exception):
    """A media file that cannot be used, with the reason in words."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass(frozen=True)
class MediaInfo:
    duration: float | None  # seconds, None when the container does not say
    has_audio: bool
    has_video: bool
    sample_rate: int | None  # of the first audio stream
    channels: int | None
    width: int | None  # of the first video stream, as displayed (rotation applied)
    height: int | None
    fps: float | None = None
    rotation: int = 0  # degrees, from the display matrix


@functools.cache
def ffmpeg_exe() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def file_url(path: str | os.PathLike) -> str:
    """`file:` stops ffmpeg reading a colon as a protocol or a leading dash as an option."""
    return "file:" + os.fspath(path)


# Named layouts whose channel count is not written as "X.Y" in their name.
_LAYOUT_CHANNELS = {
    "mono": 1,
    "stereo": 2,
    "downmix": 2,
    "quad": 4,
    "hexagonal": 6,
    "octagonal": 8,
    "hexadecagonal": 16,
}


def _channels(layout: str) -> int | None:
    layout = layout.strip()
    match = re.match(r"(\d+) channels", layout)
    if match:
        return int(match.group(1))
    match = re.match(r"(\d+)\.(\d+)", layout)  # 5.1 -> 6, 7.1(wide) -> 8, 22.2 -> 24
    if match:
        return int(match.group(1)) + int(match.group(2))
    return _LAYOUT_CHANNELS.get(layout.split("(")[0])


def _last_error_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    lines = [line for line in lines if "At least one output file" not in line]
    return lines[-1] if lines else "ffmpeg printed nothing"


def parse_info(text: str, path: str | os.PathLike, index: int = 0) -> MediaInfo:
    """Read a MediaInfo from what `ffmpeg -i` prints about input #index."""
    start = text.find(f"Input #{index},")
    if start < 0:
        raise MediaError(path, f"not a readable media file ({_last_error_line(text)})")
    text = text[start:]
    end = re.search(r"^(Input #|Output #|Stream mapping:|Press \[q\])", text[1:], re.M)
    if end:
        text = text[: end.start() + 1]

    duration = None
    match = re.search(r"Duration: (\d+):(\d+):(\d+(?:\.\d+)?)", text)
    if match:
        h, m, s = match.groups()
        duration = int(h) * 3600 + int(m) * 60 + float(s)

    # Split the summary into per-stream blocks; a block ends where the next stream starts.
    blocks = re.split(rf"^\s*Stream #{index}:", text, flags=re.M)[1:]
    sample_rate = channels = width = height = None
    fps = None
    rotation = 0
    has_audio = has_video = False
    for block in blocks:
        head = block.splitlines()[0]
        if ": Audio:" in head and not has_audio:
            has_audio = True
            rate = re.search(r"(\d+) Hz(?:, ([^,]+))?", head)
            if rate:
                sample_rate = int(rate.group(1))
                channels = _channels(rate.group(2) or "")
        elif ": Video:" in head and not has_video and "attached pic" not in head:
            size = re.search(r", (\d+)x(\d+)", head)
            if not size:
                continue
            has_video = True
            width, height = int(size.group(1)), int(size.group(2))
            rate = re.search(r", (\d+(?:\.\d+)?)k? fps", head)
            fps = float(rate.group(1)) if rate else None
            turn = re.search(r"rotation of (-?\d+(?:\.\d+)?) degrees", block, re.I)
            if turn:
                rotation = int(round(float(turn.group(1)))) % 360
                if rotation in (90, 270):  # ffmpeg auto-rotates frames when decoding
                    width, height = height, width
    return MediaInfo(
        duration, has_audio, has_video, sample_rate, channels, width, height, fps, rotation
    )


def check_file(path: str | os.PathLike) -> None:
    """Fail early, with a plain reason, for a file that is missing or empty."""
    path = Path(path)
    if not path.exists():
        raise MediaError(path, "file not found")
    if not path.is_file():
        raise MediaError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise MediaError(path, "empty file (0 bytes)")


def probe(path: str | os.PathLike) -> MediaInfo:
    """Streams, duration and formats of a media file."""
    check_file(path)
    result = subprocess.run(
        [ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", file_url(path)],
        capture_output=True,
        timeout=120,
    )
    info = parse_info(result.stderr.decode("utf-8", "replace"), path)
    if not (info.has_audio or info.has_video):
        raise MediaError(path, "no audio or video stream")
    return info


def first_channel_filter(sample_rate: int) -> str:
    """Keep the first channel, then resample with the SoX resampler (band-limited)."""
    return f"pan=mono|c0=c0,aresample={sample_rate}:resampler=soxr"


# ffmpeg's input seek (-ss before -i) is fast but not sample-exact: it can drop or repeat a few
# milliseconds of audio at the seek point. So a window that starts early in the file is decoded
# from the beginning and trimmed exactly in the filters; a later one is sought to
# SEEK_MARGIN_S before its start (fast, for long files) and then trimmed in the same way.
SEEK_AFTER_S = 30.0
SEEK_MARGIN_S = 2.0


def seek_and_skip(start_s: float) -> tuple[float, float]:
    """(input seek, then seconds to trim in the filters) for a window starting at start_s."""
    seek = start_s - SEEK_MARGIN_S if start_s > SEEK_AFTER_S else 0.0
    return seek, start_s - seek


def decode_audio(
    path: str | os.PathLike,
    sample_rate: int = 16000,
    start_s: float = 0.0,
    duration_s: float | None = None,
) -> np.ndarray:
    """The first audio channel as float32 in [-1, 1], resampled to `sample_rate`."""
    check_file(path)
    seek, skip = seek_and_skip(start_s)
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error"]
    if seek > 0:
        cmd += ["-ss", f"{seek:.6f}"]
    trim = f"atrim=start={skip:.6f}"
    if duration_s is not None:
        cmd += ["-t", f"{skip + duration_s + 1:.6f}"]
        trim += f":duration={duration_s:.6f}"
    cmd += ["-i", file_url(path), "-map", "0:a:0"]
    # Trim after resampling, so the window's edges are those of the whole resampled signal.
    cmd += ["-af", f"{first_channel_filter(sample_rate)},{trim}"]
    cmd += ["-f", "f32le", "-c:a", "pcm_f32le", "pipe:1"]
    result = subprocess.run(cmd, capture_output=True, timeout=600)
    if result.returncode != 0:
        message = result.stderr.decode("utf-8", "replace")
        if "matches no streams" in message:
            raise MediaError(path, "no audio stream")
        raise MediaError(path, f"audio decoding failed ({_last_error_line(message)})")
    return np.frombuffer(result.stdout, dtype="<f4").astype(np.float32)


def grab_frame(path: str | os.PathLike, second: float, vf: str | None = None):
    """The first frame at or after ``second`` of a video, as a PIL image; through the video
    filter ``vf`` where given (e.g. `dalipipe.data.extract.frame_geometry`)."""
    import io

    from PIL import Image

    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", "-ss", f"{second:.3f}"]
    cmd += ["-i", str(path), "-frames:v", "1"] + (["-vf", vf] if vf else [])
    cmd += ["-f", "image2pipe", "-c:v", "png", "pipe:1"]
    result = subprocess.run(cmd, capture_output=True, timeout=120)
    if result.returncode != 0 or not result.stdout:
        raise ValueError(f"{path}: no video frame at {second:.1f} s")
    return Image.open(io.BytesIO(result.stdout)).convert("RGB")
