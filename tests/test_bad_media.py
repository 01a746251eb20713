"""Extraction on awkward and broken media, each file generated here with ffmpeg: every clip
is either extracted correctly or listed with its reason, and the stage finishes.

    pytest tests/test_bad_media.py -q
"""

import csv
import subprocess
import wave

import numpy as np
import pytest
from PIL import Image

from dalipipe.data.extract import extract_all, read_sources
from dalipipe.data.ffmpeg import ffmpeg_exe

# Mono inputs would be matched to the centre channel by name; map them in order instead.
SIX_MAP = "0.0-FL|1.0-FR|2.0-FC|3.0-LFE|4.0-BL|5.0-BR"
FBANK = {"num_mel_bins": 32, "target_length": 128, "mean": -5.0, "std": 4.5}


def ff(*args):
    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", *map(str, args)], check=True)


def lavfi(spec):
    return ["-f", "lavfi", "-i", spec]


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    media = tmp_path_factory.mktemp("media")
    video = lavfi("testsrc=s=64x48:r=4:d=2")
    tone = lavfi("sine=f=440:d=2")
    ff(*video, *tone, "-c:v", "libx264", "-c:a", "aac", media / "good.mp4")
    ff(*video, "-c:v", "libx264", media / "video_only.mp4")
    ff(*tone, "-c:a", "aac", media / "audio_only.m4a")
    ff(*tone, "-c:a", "aac", media / "audio_in_mp4.mp4")
    (media / "empty.mp4").write_bytes(b"")
    (media / "garbage.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    ff(
        *lavfi("testsrc=s=64x48:r=4:d=4"),
        *lavfi("sine=f=440:d=4"),
        "-c:v",
        "libx264",
        "-c:a",
        "aac",
        media / "whole.mp4",
    )
    whole = (media / "whole.mp4").read_bytes()  # moov atom at the end: the head is unreadable
    (media / "truncated.mp4").write_bytes(whole[: len(whole) // 2])
    ff("-i", media / "whole.mp4", "-c", "copy", "-movflags", "+faststart", media / "fast.mp4")
    fast = (media / "fast.mp4").read_bytes()  # index first: the head decodes, but only partly
    (media / "truncated_fast.mp4").write_bytes(fast[: len(fast) // 2])
    (media / "whole.mp4").unlink()
    (media / "fast.mp4").unlink()
    ff(
        *video,
        *lavfi("anullsrc=r=16000:cl=mono"),
        "-t",
        2,
        "-c:v",
        "libx264",
        "-c:a",
        "aac",
        media / "silent.mp4",
    )
    ff(
        *lavfi("testsrc=s=64x48:r=4:d=0.5"),
        *lavfi("sine=f=440:d=0.5"),
        "-c:v",
        "libx264",
        "-c:a",
        "aac",
        media / "short.mp4",
    )
    # 11 minutes, 1 frame per second, whose grey level says the second (16 + 20 (T mod 10)).
    ff(*lavfi("color=c=black:s=16x16:r=1:d=660"), *lavfi("sine=f=300:r=8000:d=660"),
       "-vf", "geq=lum='16+20*mod(T,10)':cb=128:cr=128", "-c:v", "libx264", "-preset", "ultrafast",
       "-qp", "0", "-c:a", "aac", media / "long.mp4")  # fmt: skip
    ff(*lavfi("sine=f=1000:r=8000:d=2"), media / "rate_8k.wav")
    ff(*lavfi("sine=f=5000:r=48000:d=2"), *lavfi("sine=f=12000:r=48000:d=2"),
       "-filter_complex", "amix=inputs=2", "-c:a", "aac", media / "rate_48k.mp4")  # fmt: skip
    six = "".join(f"[{c}]" for c in range(6))  # channel 0 (front left) 440 Hz, others 3 kHz
    ff(*[x for c in range(6) for x in lavfi(f"sine=f={440 if c == 0 else 3000}:r=48000:d=2")],
       "-filter_complex", f"{six}join=inputs=6:channel_layout=5.1:map={SIX_MAP}", "-c:a", "aac", media / "surround.mp4")  # fmt: skip
    ff(
        *lavfi("testsrc=s=36x64:r=4:d=2"),
        *tone,
        "-c:v",
        "libx264",
        "-c:a",
        "aac",
        media / "portrait.mp4",
    )
    ff(
        *lavfi("color=c=red:s=3840x2160:r=1:d=2"),
        *tone,
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        "-c:a",
        "aac",
        media / "uhd_4k.mp4",
    )
    ff("-display_rotation", 90, "-i", media / "good.mp4", "-c", "copy", media / "rotated.mp4")
    ff("-i", media / "good.mp4", "-c", "copy", media / "café ☕ clip.mp4")

    names = sorted(p.name for p in media.iterdir())
    table = media / "list.csv"
    with open(table, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "start_s"])
        for name in names:
            writer.writerow([name, 605 if name == "long.mp4" else 0])
        writer.writerow(["missing.mp4", 0])
    out = tmp_path_factory.mktemp("out") / "extract"
    rows = extract_all(read_sources(table), out, {"frame_short_side": 64, "fbank": FBANK})
    return media, out, {r["clip_id"]: r for r in rows}


def failed_with(rows, clip_id, words, media):
    row = rows[clip_id]
    assert row["status"] == "failed", row
    assert words in row["reason"]
    assert clip_id in row["reason"] or "missing" in row["reason"]
    assert row["n_frames"] == ""


def test_every_file_has_one_row_and_only_ok_clips_have_files(extracted):
    media, out, rows = extracted
    assert len(rows) == 19  # 18 files and one missing
    for clip_id, row in rows.items():
        has_dir = (out / clip_id).exists()
        assert has_dir == (row["status"] == "ok"), clip_id
        if has_dir:
            assert (out / clip_id / "audio.wav").exists() and (out / clip_id / "fbank.npy").exists()
            fb = np.load(out / clip_id / "fbank.npy")
            assert fb.shape == (128, 32) and np.isfinite(fb).all()


def test_unusable_files_are_listed_with_their_reason(extracted):
    media, out, rows = extracted
    failed_with(rows, "video_only", "no audio stream", media)
    failed_with(rows, "empty", "empty file (0 bytes)", media)
    failed_with(rows, "garbage", "not a readable media file", media)
    failed_with(rows, "truncated", "not a readable media file", media)
    failed_with(rows, "truncated_fast", "truncated or corrupt: decoded", media)
    failed_with(rows, "silent", "silent audio", media)
    failed_with(rows, "short", "too short: 0.50 s of audio (minimum 1 s)", media)
    failed_with(rows, "missing", "file not found", media)


def wav_of(out, clip_id):
    with wave.open(str(out / clip_id / "audio.wav")) as f:
        assert (f.getframerate(), f.getnchannels()) == (16000, 1)
        return np.frombuffer(f.readframes(f.getnframes()), "<i2").astype(float)


def peak_hz(samples):
    spec = np.abs(np.fft.rfft(samples))
    return np.fft.rfftfreq(len(samples), 1 / 16000)[spec.argmax()], spec


def test_audio_without_video_is_extracted_without_frames(extracted):
    media, out, rows = extracted
    for clip_id in ("audio_only", "audio_in_mp4", "rate_8k"):
        row = rows[clip_id]
        assert row["status"] == "ok" and row["n_frames"] == 0 and row["width"] == ""
        assert not list((out / clip_id).glob("frame_*"))


def test_sample_rates_and_channels_are_converted_correctly(extracted):
    media, out, rows = extracted
    assert (rows["rate_8k"]["sample_rate"], rows["rate_8k"]["duration_s"]) == (8000, 2.0)
    freq, _ = peak_hz(wav_of(out, "rate_8k"))
    assert freq == pytest.approx(1000, abs=2)

    assert rows["rate_48k"]["sample_rate"] == 48000
    freq, spec = peak_hz(wav_of(out, "rate_48k"))
    assert freq == pytest.approx(5000, abs=2)
    freqs = np.fft.rfftfreq(2 * len(spec) - 2, 1 / 16000)
    alias = spec[np.abs(freqs - 4000) < 20].max()  # 12 kHz folded into 16 kHz would be here
    assert alias < 0.01 * spec.max()

    assert (rows["surround"]["channels"], rows["surround"]["sample_rate"]) == (6, 48000)
    freq, spec = peak_hz(wav_of(out, "surround"))
    assert freq == pytest.approx(440, abs=2)  # the first channel, not a downmix
    freqs = np.fft.rfftfreq(2 * len(spec) - 2, 1 / 16000)
    assert spec[np.abs(freqs - 3000) < 20].max() < 0.01 * spec.max()


def test_frame_sizes_follow_the_short_side(extracted):
    media, out, rows = extracted
    expected = {
        "good": ((64, 48), (86, 64)),
        "portrait": ((36, 64), (64, 114)),
        "uhd_4k": ((3840, 2160), (114, 64)),
        "rotated": ((48, 64), (64, 86)),
        "cafe_clip": ((64, 48), (86, 64)),
    }
    for clip_id, (source, frame) in expected.items():
        row = rows[clip_id]
        assert row["status"] == "ok", row
        assert (row["width"], row["height"]) == source
        assert row["n_frames"] == 2
        assert Image.open(out / clip_id / "frame_01.jpg").size == frame


def test_a_long_file_is_cut_to_the_window_from_its_start_time(extracted):
    media, out, rows = extracted
    row = rows["long"]
    assert row["status"] == "ok" and row["duration_s"] == 10.0 and row["n_frames"] == 10
    # Limited-range luma 16 + 20 (T mod 10) is 20 (T mod 10) * 255 / 219 in RGB.
    first = np.asarray(Image.open(out / "long" / "frame_00.jpg").convert("L")).mean()
    last = np.asarray(Image.open(out / "long" / "frame_09.jpg").convert("L")).mean()

    def grey(t):
        return 20 * (t % 10) * 255 / 219

    assert first == pytest.approx(grey(605), abs=2) and last == pytest.approx(grey(614), abs=2)
    assert grey(605) - grey(604) > 20  # so one second off would show
