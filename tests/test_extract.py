"""Probing, audio decoding and extraction through the ffmpeg binary, on real media.

pytest tests/test_extract.py -q
"""

import csv
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from dalipipe.data.extract import ExtractError, extract_clip
from dalipipe.data.extract import main as extract_main
from dalipipe.data.ffmpeg import MediaError, decode_audio, ffmpeg_exe, parse_info, probe
from dalipipe.data.manifest import EXTRACT_FIELDS

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
    assert len(part) == 16000
    np.testing.assert_allclose(part, wave[8000:24000], atol=1e-4)  # sample-exact window


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


FBANK = {"num_mel_bins": 32, "target_length": 128, "mean": -5.0, "std": 4.5}


def test_frames_are_the_first_of_each_second(tmp_path):
    """Frame k of a 5 fps video has grey level 15 k, so the kept frames show their index."""
    n = 17  # 3.4 s
    levels = b"".join(bytes([15 * k]) * (32 * 48 * 3) for k in range(n))
    src = tmp_path / "count.mp4"
    subprocess.run(
        [ffmpeg_exe(), "-v", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", "48x32",
         "-r", "5", "-i", "pipe:0", "-f", "lavfi", "-i", "sine=f=500:d=3.4",
         "-c:v", "libx264", "-qp", "0", "-pix_fmt", "yuv444p", "-c:a", "aac", str(src)],
        input=levels, check=True,
    )  # fmt: skip
    row = extract_clip(src, tmp_path / "clip", short_side=16, fbank=FBANK)
    assert row["n_frames"] == 4 and (row["width"], row["height"]) == (48, 32)
    from PIL import Image

    for k in range(4):
        image = Image.open(tmp_path / "clip" / f"frame_{k:02d}.jpg")
        assert image.size == (24, 16)  # short side 16, aspect kept
        assert np.asarray(image).mean() == pytest.approx(15 * 5 * k, abs=3)
    later = extract_clip(
        src, tmp_path / "later", start_s=1.0, window_s=2.0, short_side=16, fbank=FBANK
    )
    assert later["n_frames"] == 2 and later["duration_s"] == pytest.approx(2.0, abs=0.01)
    first = np.asarray(Image.open(tmp_path / "later" / "frame_00.jpg")).mean()
    assert first == pytest.approx(75, abs=3)  # frame 5, at t = 1.0 s


def test_extract_clip_writes_wav_and_the_fbank_of_that_wav(tmp_path):
    import wave as wavfile

    from dalipipe.data.fbank import model_input_from_wave

    src = tmp_path / "tone.mp4"
    subprocess.run(
        [ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i", "testsrc=s=64x48:r=4:d=2.56",
         "-f", "lavfi", "-i", "sine=f=1000:r=44100:d=2.56", "-ac", "2",
         "-c:v", "libx264", "-c:a", "aac", str(src)],
        check=True,
    )  # fmt: skip
    row = extract_clip(src, tmp_path / "clip", short_side=32, fbank=FBANK)
    assert (row["n_frames"], row["sample_rate"], row["channels"]) == (3, 44100, 2)
    with wavfile.open(str(tmp_path / "clip" / "audio.wav")) as f:
        assert (f.getframerate(), f.getnchannels(), f.getsampwidth()) == (16000, 1, 2)
        samples = np.frombuffer(f.readframes(f.getnframes()), "<i2")
    assert len(samples) == pytest.approx(2.56 * 16000, abs=50)
    assert row["duration_s"] == pytest.approx(len(samples) / 16000)
    fb = np.load(tmp_path / "clip" / "fbank.npy")
    assert fb.dtype == np.float16 and fb.shape == (128, 32)
    expected = model_input_from_wave(samples.astype(np.float32) / 32768, 16000, FBANK)
    np.testing.assert_allclose(fb.astype(np.float32), expected, atol=0.01)


def test_extract_real_clips_and_an_acquire_manifest(tmp_path):
    if not CLIPS.exists():
        pytest.skip("shared clips not present")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "clip_id,path,status,reason,split,start_s,labels\n"
        f"whistle,{CLIPS / 'audioset_00W1lcxW-WU_40_50.mp4'},ok,,align,0.0,Whistle\n"
        f"violin,{CLIPS / 'vggsound_FwVYUHKoLtQ_000034.wav'},ok,,align,4.0,\n"
        f"street,{CLIPS / 'vggsound_KlsG1EnBEjc_000361.mp4'},ok,,align,0.0,\n"
        "gone,,unavailable,Video unavailable,align,0.0,\n"
    )
    params = json.dumps({"extract": {"frame_short_side": 64, "fbank": FBANK}})
    assert extract_main([str(manifest), "--out", str(tmp_path / "out"), "--params", params]) == 0
    with open(tmp_path / "out" / "manifest.csv", newline="") as f:
        rows = {r["clip_id"]: r for r in csv.DictReader(f)}
    assert list(next(iter(rows.values()))) == EXTRACT_FIELDS
    assert rows["whistle"]["n_frames"] == "10" and rows["whistle"]["duration_s"] == "10.0"
    assert (rows["street"]["width"], rows["street"]["height"]) == ("1280", "720")
    # the WAV holds 160029 samples (10.0018 s); from 4 s on, 96029 remain
    assert rows["violin"]["n_frames"] == "0" and rows["violin"]["duration_s"] == "6.0018"
    assert rows["gone"]["status"] == "failed"
    assert rows["gone"]["reason"] == "not acquired (unavailable): Video unavailable"
    from PIL import Image

    assert Image.open(tmp_path / "out" / "street" / "frame_09.jpg").size == (114, 64)
    assert not (tmp_path / "out" / "gone").exists()


def test_a_failed_clip_leaves_the_callers_other_files_alone(tmp_path):
    """ffmpeg writes frames of a silent clip before the silence is found; only they go."""
    clip_dir = tmp_path / "work"
    clip_dir.mkdir()
    (clip_dir / "keep.txt").write_text("mine")
    silent = tmp_path / "silent.mp4"
    subprocess.run(
        [ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i", "testsrc=s=32x32:r=4:d=2",
         "-f", "lavfi", "-i", "anullsrc=r=16000:cl=mono", "-t", "2", str(silent)],
        check=True,
    )  # fmt: skip
    with pytest.raises(ExtractError, match="silent audio"):
        extract_clip(silent, clip_dir, short_side=16, fbank=FBANK)
    assert sorted(p.name for p in clip_dir.iterdir()) == ["keep.txt"]
    with pytest.raises(ExtractError, match="silent audio"):
        extract_clip(silent, tmp_path / "fresh", short_side=16, fbank=FBANK)
    assert not (tmp_path / "fresh").exists()


def test_single_threaded_decoding_writes_the_bytes_of_the_default_threads(tmp_path):
    """extract runs ffmpeg with one thread (less CPU per clip); its JPEGs are byte for byte
    those of ffmpeg's default frame-threaded decoding of the same filters."""
    from dalipipe.data.extract import _frame_filter

    src = make(
        tmp_path / "b-frames.mp4", "-f", "lavfi", "-i", "testsrc2=s=320x240:r=30:d=3.5",
        "-f", "lavfi", "-i", "sine=f=700:d=3.5", "-c:v", "libx264", "-bf", "3", "-g", "45",
    )  # fmt: skip
    extract_clip(src, tmp_path / "clip", short_side=96, fbank=FBANK)
    reference = tmp_path / "reference"
    reference.mkdir()
    make(
        reference / "frame_%02d.jpg", "-i", str(src), "-map", "0:v:0",
        "-vf", _frame_filter(96, 0.0, 10.0), "-fps_mode", "passthrough", "-frames:v", "10",
        "-q:v", "2", "-start_number", "0",
    )  # fmt: skip
    ours = sorted(p.name for p in (tmp_path / "clip").glob("frame_*.jpg"))
    assert ours == sorted(p.name for p in reference.iterdir()) and len(ours) == 4
    for name in ours:
        assert (tmp_path / "clip" / name).read_bytes() == (reference / name).read_bytes()


def test_the_benchs_authors_pipeline_does_what_their_scripts_do(tmp_path):
    """bench/extract_authors.py: 10 frames seeked at int(i * total / 10) - 1, 224 px crops,
    16 kHz mono WAV (sox remix 1: the left channel), the loader's 1024 x 128 fbank."""
    import wave as wavfile

    from bench import extract_authors

    if extract_authors.missing_tools():
        pytest.skip(f"needs {extract_authors.missing_tools()}")
    n = 50  # 5 s at 10 fps; frame k has grey level 5 k
    levels = b"".join(bytes([5 * k]) * (64 * 48 * 3) for k in range(n))
    src = tmp_path / "count.mp4"
    subprocess.run(
        [ffmpeg_exe(), "-v", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", "64x48",
         "-r", "10", "-i", "pipe:0", "-f", "lavfi", "-i", "sine=f=440:r=44100:d=5",
         "-f", "lavfi", "-i", "sine=f=3000:r=44100:d=5",
         "-filter_complex", "[1][2]amerge=inputs=2[a]", "-map", "0:v", "-map", "[a]",
         "-c:v", "libx264", "-qp", "0", "-pix_fmt", "yuv444p", "-c:a", "pcm_s16le",
         str(src.with_suffix(".mov"))],
        input=levels, check=True,
    )  # fmt: skip
    src = src.with_suffix(".mov")
    fbank = {"num_mel_bins": 128, "target_length": 1024, "mean": -5.081, "std": 4.4849}
    assert extract_authors.preprocess(str(src), tmp_path / "out", fbank) == 10
    from PIL import Image

    for i in range(10):
        image = Image.open(tmp_path / "out" / f"frame_{i}.jpg")
        assert image.size == (224, 224)
        seeked = max(0, int(i * n / 10) - 1)
        assert np.asarray(image).mean() == pytest.approx(5 * seeked, abs=3)
    with wavfile.open(str(tmp_path / "out" / "audio.wav")) as f:
        assert (f.getframerate(), f.getnchannels()) == (16000, 1)
        samples = np.frombuffer(f.readframes(f.getnframes()), "<i2").astype(np.float32)
    spectrum = np.abs(np.fft.rfft(samples))
    freqs = np.fft.rfftfreq(len(samples), 1 / 16000)
    assert freqs[spectrum.argmax()] == pytest.approx(440, abs=2)  # the left channel kept
    assert not (tmp_path / "out" / "intermediate.wav").exists()
    features = extract_authors.training_loader_fbank(tmp_path / "out" / "audio.wav", fbank)
    assert features.shape == (1024, 128)
