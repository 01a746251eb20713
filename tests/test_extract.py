"""Probing, audio decoding and extraction through the ffmpeg binary, on real media.

pytest tests/test_extract.py -q
"""

import subprocess
from pathlib import Path

import numpy as np
import pytest

from dalipipe.data.ffmpeg import MediaError, decode_audio, ffmpeg_exe, parse_info, probe

CLIPS = Path("/work/shared/data/clips")


def make(path, *args):
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", "-y", *args, str(path)]
    subprocess.run(cmd, check=True)
    return path


def test_probe_reads_streams_of_real_clips():
    if not CLIPS.exists():
        pytest.skip("shared clips not present")
    info = probe(CLIPS / "vggsound_KlsG1EnBEjc_000361.mp4")
    assert (info.duration, info.width, info.height) == (10.04, 1280, 720)
    assert (info.sample_rate, info.channels, info.has_audio) == (44100, 2, True)
    wav = probe(CLIPS / "vggsound_FwVYUHKoLtQ_000034.wav")
    assert (wav.has_video, wav.sample_rate, wav.channels, wav.duration) == (False, 16000, 1, 10.0)


def test_parse_info_handles_layouts_rotation_and_cover_art():
    text = """Input #0, mov,mp4, from 'x.mp4':
  Duration: 00:01:02.50, start: 0.000000, bitrate: 10 kb/s
  Stream #0:0[0x1](und): Video: h264 (High) (avc1 / 0x31637661), yuv420p, 1920x1080 [SAR 1:1], 30 fps
    Side data:
      Display Matrix: rotation of -90.00 degrees
  Stream #0:1[0x2](und): Audio: aac (LC) (mp4a / 0x6134706D), 48000 Hz, 5.1(side), fltp
  Stream #0:2: Video: mjpeg, yuvj420p, 600x600, 90k tbn (attached pic)
"""
    info = parse_info(text, "x.mp4")
    assert info.duration == 62.5
    assert (info.width, info.height, info.rotation) == (1080, 1920, 270)
    assert (info.sample_rate, info.channels) == (48000, 6)
    assert info.fps == 30.0
    with pytest.raises(MediaError, match="not a readable media file"):
        parse_info("x.mp4: Invalid data found when processing input", "x.mp4")


def test_decode_audio_takes_the_first_channel_and_resamples(tmp_path):
    # Left channel: 440 Hz; right channel: 3000 Hz. 48 kHz in, 16 kHz out.
    src = make(
        tmp_path / "two tones: é.wav",
        "-f", "lavfi", "-i", "sine=f=440:r=48000:d=2",
        "-f", "lavfi", "-i", "sine=f=3000:r=48000:d=2",
        "-filter_complex", "[0][1]amerge=inputs=2",
    )  # fmt: skip
    wave = decode_audio(src, 16000)
    assert wave.dtype == np.float32
    assert len(wave) == pytest.approx(32000, abs=64)
    spec = np.abs(np.fft.rfft(wave))
    freqs = np.fft.rfftfreq(len(wave), 1 / 16000)
    assert freqs[spec.argmax()] == pytest.approx(440, abs=2)
    assert spec[np.abs(freqs - 3000) < 20].max() < 0.01 * spec.max()
    part = decode_audio(src, 16000, start_s=0.5, duration_s=1.0)
    assert len(part) == pytest.approx(16000, abs=64)


def test_decode_audio_errors_name_the_file(tmp_path):
    video = make(tmp_path / "-video.mp4", "-f", "lavfi", "-i", "testsrc=s=32x32:d=1")
    with pytest.raises(MediaError, match="no audio stream") as err:
        decode_audio(video)
    assert str(video) in str(err.value)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(MediaError, match="empty file"):
        probe(empty)
    with pytest.raises(MediaError, match="file not found"):
        decode_audio(tmp_path / "missing.wav")
