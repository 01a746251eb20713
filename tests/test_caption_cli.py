"""`dalipipe caption` with a tiny trained-captioner directory, on a real video, a WAV at
44.1 kHz stereo and a broken file.

    pytest tests/test_caption_cli.py -x -q
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from dalipipe.describe.caption import main
from dalipipe.describe.inputs import prepare_file

DATA = Path("/work/shared/data/clips")
VIDEO = DATA / "audioset_00W1lcxW-WU_40_50.mp4"  # 10 s, 256x144, AAC 44.1 kHz stereo
WAV16K = DATA / "vggsound_FwVYUHKoLtQ_000034.wav"
FEATURES = {
    "fbank": {"num_mel_bins": 32, "target_length": 64},
    "frame_short_side": 32,
    "window_seconds": 10.0,
}

pytestmark = pytest.mark.skipif(not VIDEO.exists(), reason="shared data clips missing")


@pytest.fixture(scope="module")
def model_dir(tiny_models, tmp_path_factory):
    from dalipipe.models.captioner import AudioCaptioner

    out = tmp_path_factory.mktemp("caption-model") / "distill"
    captioner = AudioCaptioner.from_base(
        tiny_models.llava, audio_encoder=tiny_models.audio_encoder()
    )
    captioner.init_prefix(n_tokens=4, std=0.5, seed=0)
    captioner.save_dir(out, metadata={"features": FEATURES})
    return out


@pytest.fixture(scope="module")
def wav44k(tmp_path_factory):
    """The VGGSound WAV resampled to 44.1 kHz stereo with ffmpeg."""
    from dalipipe.data.ffmpeg import ffmpeg_exe

    out = tmp_path_factory.mktemp("wav") / "violin 44k.wav"
    # pan copies the channel; ffmpeg's default mono-to-stereo would scale it by 1/sqrt(2)
    subprocess.run(
        [
            ffmpeg_exe(),
            "-v",
            "error",
            "-i",
            str(WAV16K),
            "-af",
            "pan=stereo|c0=c0|c1=c0",
            "-ar",
            "44100",
            str(out),
        ],
        check=True,
    )
    return out


@pytest.fixture
def broken(tmp_path):
    path = tmp_path / "broken.mp4"
    path.write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 10)
    return path


def test_prepare_follows_the_model_features(wav44k):
    prepared = prepare_file(VIDEO, FEATURES, "audio+image")
    frame, fbank = prepared.frame, prepared.fbank
    assert min(frame.size) == 32 and frame.size[0] > frame.size[1]  # 256x144 scaled, short side 32
    assert fbank.shape == (64, 32) and fbank.dtype == np.float32
    prepared = prepare_file(wav44k, FEATURES, "audio")
    frame, fbank = prepared.frame, prepared.fbank
    assert frame is None and fbank.shape == (64, 32)
    # a 44.1 kHz stereo file gives the fbank of its 16 kHz first channel, as the extract stage
    from dalipipe.data.fbank import model_input_from_wave
    from dalipipe.data.ffmpeg import decode_audio

    expected = model_input_from_wave(decode_audio(WAV16K, 16000), 16000, FEATURES["fbank"])
    assert np.abs(fbank - expected).mean() < 0.05


def test_captions_every_readable_file_and_names_the_broken_one(model_dir, wav44k, broken, capsys):
    from dalipipe.models.captioner import AudioCaptioner

    code = main(
        [
            str(VIDEO),
            str(broken),
            str(wav44k),
            "--model",
            str(model_dir),
            "--json",
            "--device",
            "cpu",
            "--max-new-tokens",
            "5",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["file"] for r in rows] == [str(VIDEO), str(wav44k)]
    assert all(r["modality"] == "audio" for r in rows)
    [error] = [line for line in err.splitlines() if "error" in line]
    assert error.startswith(f"dalipipe caption: error: {broken}: ")

    # the same caption as the model gives for the features computed by hand
    captioner = AudioCaptioner.from_dir(model_dir)
    from dalipipe.data.fbank import model_input_from_wave
    from dalipipe.data.ffmpeg import decode_audio

    fbank = model_input_from_wave(
        decode_audio(VIDEO, 16000, duration_s=10.0), 16000, FEATURES["fbank"]
    )
    [expected] = captioner.generate(
        modality="audio", fbank=torch.from_numpy(fbank)[None].float(), max_new_tokens=5
    )
    assert rows[0]["caption"] == expected


def test_plain_output_and_audio_image_modality(model_dir, capsys):
    code = main(
        [
            str(VIDEO),
            "--model",
            str(model_dir),
            "--modality",
            "audio+image",
            "--device",
            "cpu",
            "--max-new-tokens",
            "3",
            "--prefix",
        ]
    )
    out, _ = capsys.readouterr()
    assert code == 0
    path, caption = out.rstrip("\n").split("\t")
    assert path == str(VIDEO) and caption


def test_exit_code_is_non_zero_only_when_every_file_fails(model_dir, broken, tmp_path, capsys):
    missing = tmp_path / "nowhere.mp3"
    assert main([str(broken), str(missing), "--model", str(model_dir), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert f"{broken}: " in err and f"{missing}: file not found" in err
    # an audio file cannot be captioned from an image
    assert (
        main([str(WAV16K), "--model", str(model_dir), "--modality", "image", "--device", "cpu"])
        == 1
    )
    assert "needs a video stream" in capsys.readouterr().err


def test_a_missing_model_directory_is_one_clear_error(tmp_path, capsys):
    assert main([str(WAV16K), "--model", str(tmp_path / "no-model")]) == 2
    assert f"--model {tmp_path / 'no-model'}: " in capsys.readouterr().err


def test_start_moves_the_window():
    whole = prepare_file(WAV16K, FEATURES, "audio").fbank
    later = prepare_file(WAV16K, FEATURES, "audio", start_s=5.0).fbank
    from dalipipe.data.fbank import model_input_from_wave
    from dalipipe.data.ffmpeg import decode_audio

    wave = decode_audio(WAV16K, 16000)[5 * 16000 :]
    expected = model_input_from_wave(wave, 16000, FEATURES["fbank"])
    assert np.abs(later - expected).mean() < 0.01 < np.abs(whole - expected).mean()
