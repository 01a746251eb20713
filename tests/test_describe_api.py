"""`dalipipe.Captioner` and `dalipipe caption` over it: files, clips in memory, folders with a
resumable captions file, the decoding a model folder records, --strict. Every path gives the
captions that `dalipipe caption` gave before the API existed (recorded below, greedy).

    pytest tests/test_describe_api.py -x -q
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.io import wavfile

from dalipipe.describe.caption import main
from tests.support.describe import (
    BEFORE,
    BEFORE_SAMPLED,
    FEATURES,
    TOKENS,
    VIDEO,
    VIDEO2,
    WAV16K,
    write_model,
)

pytestmark = pytest.mark.skipif(not VIDEO.exists(), reason="shared data clips missing")


@pytest.fixture(scope="module")
def model_dir(tiny_models, tmp_path_factory):
    return write_model(
        tmp_path_factory.mktemp("api") / "distill", tiny_models, {"features": FEATURES}
    )


@pytest.fixture(scope="module")
def captioner(model_dir):
    from dalipipe import Captioner

    return Captioner.load(model_dir, device="cpu", batch_size=2)


@pytest.fixture
def broken(tmp_path):
    path = tmp_path / "broken.mp4"
    path.write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 10)
    return path


def test_importing_dalipipe_loads_no_torch():
    code = "import sys, dalipipe; print('torch' in sys.modules, dalipipe.Captioner.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "Captioner"]


def test_files_give_the_captions_of_before_in_batches_with_errors_in_place(captioner, broken):
    records = captioner.caption(
        [VIDEO, broken, WAV16K, VIDEO2, "nowhere.wav"], modality="audio", max_new_tokens=TOKENS
    )
    assert [r.source for r in records] == [
        str(VIDEO), str(broken), str(WAV16K), str(VIDEO2), "nowhere.wav"
    ]  # fmt: skip
    assert [r.caption for r in records] == [
        BEFORE[VIDEO],
        None,
        BEFORE[WAV16K],
        BEFORE[VIDEO2],
        None,
    ]
    assert records[4].error == "file not found"
    assert records[1].error and str(broken) not in records[1].error
    assert records[0].to_dict() == {
        "file": str(VIDEO),
        "modality": "audio",
        "decoding": "greedy",
        "caption": BEFORE[VIDEO],
    }
    assert records[0].frame is None  # audio alone: no image was used
    one_by_one = [captioner.caption(f, max_new_tokens=TOKENS)[0].caption for f in BEFORE]
    assert one_by_one == list(BEFORE.values())


def test_sampled_captions_do_not_depend_on_the_batch(captioner):
    records = captioner.caption(list(BEFORE), sample=True, max_new_tokens=TOKENS)
    assert [r.caption for r in records] == list(BEFORE_SAMPLED.values())
    assert records[0].decoding == "sampled at temperature 0.2 (top-k 50, seed 0)"
    other_seed = captioner.caption(VIDEO, sample=True, seed=5, max_new_tokens=TOKENS)[0]
    assert other_seed.decoding.endswith("seed 5)") and other_seed.caption != BEFORE_SAMPLED[VIDEO]


def test_waveforms_in_memory_give_the_files_captions(captioner):
    from dalipipe import Clip
    from dalipipe.data.ffmpeg import decode_audio

    rate, samples = wavfile.read(WAV16K)  # what soundfile or scipy give a user
    wave = samples.astype(np.float32) / 32768.0
    video_wave = decode_audio(VIDEO, 44100)  # the video's own rate, first channel
    clips = [Clip(wave, rate, name="violin"), Clip(np.stack([video_wave, -video_wave]), 44100)]
    for clip, path in zip(clips, [WAV16K, VIDEO]):
        assert np.array_equal(
            captioner.prepare(clip, "audio").fbank, captioner.prepare(path, "audio").fbank
        )
    records = captioner.caption(clips, max_new_tokens=TOKENS)
    assert [r.caption for r in records] == [BEFORE[WAV16K], BEFORE[VIDEO]]
    assert records[0].source == "violin"
    bad = captioner.caption(
        [Clip(np.zeros((2, 3, 4)), 16000), Clip(samples, rate), Clip(wave), Clip(wave[:800], rate)]
    )
    assert [r.error for r in bad[:3]] == [
        "waveform of shape (2, 3, 4): expected (samples,) or (channels, samples)",
        "waveform of dtype int16: expected floats in [-1, 1]",
        "modality audio needs a waveform and its rate",
    ]
    assert bad[3].error == "waveform: too short: 0.05 s of audio (minimum 1 s)"


def test_frames_in_memory_use_the_middle_frame(captioner):
    from dalipipe import Clip

    record = captioner.caption(VIDEO, modality="image", max_new_tokens=TOKENS)[0]
    assert record.frame is not None and min(record.frame.size) == 32
    frames = [
        np.zeros((32, 56, 3), np.uint8),
        np.asarray(record.frame),
        np.ones((9, 9, 3), np.uint8),
    ]
    from_frames = captioner.caption(Clip(frames=frames), modality="image", max_new_tokens=TOKENS)
    assert from_frames[0].caption == record.caption
    assert captioner.caption(Clip(frames=[]), modality="image")[0].error == (
        "modality image needs frames, and none were given"
    )


def test_the_command_line_prints_the_same_captions_and_how_it_decoded(model_dir, capsys):
    args = [*map(str, BEFORE), "--model", str(model_dir), "--device", "cpu", "--json"]
    assert main([*args, "--max-new-tokens", str(TOKENS)]) == 0
    out, err = capsys.readouterr()
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["caption"] for r in rows] == list(BEFORE.values())
    assert {r["decoding"] for r in rows} == {"greedy"}
    assert "decoding: greedy (the default; the model records none)" in err


def test_a_folder_recording_sampled_decoding_samples_unless_asked_otherwise(
    tiny_models, tmp_path, capsys
):
    metadata = {"features": FEATURES, "decoding": {"do_sample": True, "temperature": 0.2}}
    recorded = write_model(tmp_path / "authors-like", tiny_models, metadata)
    args = [str(VIDEO), "--model", str(recorded), "--device", "cpu", "--json"]
    assert main([*args, "--max-new-tokens", str(TOKENS)]) == 0
    out, err = capsys.readouterr()
    row = json.loads(out)
    assert (row["caption"], row["decoding"]) == (
        BEFORE_SAMPLED[VIDEO],
        "sampled at temperature 0.2 (top-k 50, seed 0)",
    )
    assert "(as the model records)" in err
    assert main([*args, "--max-new-tokens", str(TOKENS), "--greedy"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["caption"] == BEFORE[VIDEO] and "greedy (asked for)" in err


def test_strict_fails_when_any_file_fails(model_dir, broken, capsys):
    args = [str(WAV16K), str(broken), "--model", str(model_dir), "--device", "cpu"]
    assert main([*args, "--max-new-tokens", "2"]) == 0
    assert main([*args, "--max-new-tokens", "2", "--strict"]) == 1
    assert main([str(WAV16K), "--model", str(model_dir), "--device", "cpu", "--strict"]) == 0
    capsys.readouterr()


def read_rows(path: Path) -> list[dict]:
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_folder_is_walked_and_a_later_call_resumes(model_dir, tmp_path, capsys, suffix):
    folder = tmp_path / "recordings"
    (folder / "street").mkdir(parents=True)
    shutil.copy(VIDEO, folder / "street" / "b.mp4")
    shutil.copy(WAV16K, folder / "a.WAV")
    (folder / "notes.txt").write_text("not media")
    (folder / "street" / "c.mp3").write_bytes(b"ID3 broken")
    out = tmp_path / f"captions{suffix}"
    args = [str(folder), "--model", str(model_dir), "--device", "cpu", "--out", str(out)]
    args += ["--max-new-tokens", str(TOKENS)]
    assert main(args) == 0
    rows = read_rows(out)
    files = [
        str(folder / "a.WAV"),
        str(folder / "street" / "b.mp4"),
        str(folder / "street" / "c.mp3"),
    ]
    assert [r["file"] for r in rows] == files
    assert [r.get("caption") or None for r in rows] == [BEFORE[WAV16K], BEFORE[VIDEO], None]
    assert rows[2]["error"] and {r["model"] for r in rows} == {str(model_dir)}
    assert "2 captioned, 1 failed" in capsys.readouterr().err

    # a call stopped while writing its last row: that row is dropped and the file captioned again
    text = out.read_text()
    out.write_text(text[: text.rstrip("\n").rfind("\n") + 1] + text.splitlines()[-1][:9])
    shutil.copy(VIDEO2, folder / "street" / "d.mkv.mp4")
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "2 files already in" in err and "1 captioned, 1 failed" in err
    rows = read_rows(out)
    assert [r["file"] for r in rows] == [*files[:2], files[2], str(folder / "street" / "d.mkv.mp4")]
    assert rows[3]["caption"] == BEFORE[VIDEO2]
    assert main(args) == 0 and "nothing to do" in capsys.readouterr().err
    # captions of another modality are not mixed in
    assert main([*args, "--modality", "audio+image"]) == 2
    assert "holds captions with modality 'audio'" in capsys.readouterr().err


def test_bad_folders_and_outputs_are_one_clear_error(model_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    base = ["--model", str(model_dir), "--device", "cpu"]
    assert main([str(tmp_path / "empty"), *base]) == 2
    assert f"{tmp_path / 'empty'}: no media files in this folder" in capsys.readouterr().err
    assert main([str(WAV16K), *base, "--out", str(tmp_path / "x.txt")]) == 2
    assert "use a .csv or .jsonl file name" in capsys.readouterr().err


def test_the_recorded_decoding_and_what_overrides_it():
    from dalipipe.describe.decoding import Decoding

    assert Decoding.recorded({"features": FEATURES}) == Decoding()
    # the authors' release imported before folders recorded their decoding samples as they did
    assert Decoding.recorded({"imported": {"source": "zenodo"}}) == Decoding(sample=True)
    recorded = Decoding.recorded({"decoding": {"do_sample": True, "temperature": 0.7}})
    assert str(recorded.but(seed=3, sample=None)) == "sampled at temperature 0.7 (top-k 50, seed 3)"
    assert str(recorded.but(sample=False, prefix=True)) == "greedy, with the prefix"
    with pytest.raises(ValueError, match=r"x.json: metadata.decoding: unknown keys \['beams'\]"):
        Decoding.recorded({"decoding": {"beams": 4}}, where="x.json")
    with pytest.raises(ValueError, match="temperature 0: must be above 0"):
        Decoding(temperature=0)
