"""Acquire: the synthetic world as MP4 parts, local folders and CSVs, and gathering parts.

pytest tests/test_acquire.py -q
"""

import csv
import json
import subprocess

import numpy as np
import pytest

from dalipipe.common import read_jsonl
from dalipipe.data import local
from dalipipe.data.ffmpeg import decode_audio, ffmpeg_exe, probe
from dalipipe.data.gather import gather
from dalipipe.data.manifest import ACQUIRE_FIELDS
from dalipipe.world import classes as world
from dalipipe.world import synthetic

TINY = {
    "n_classes": 6,
    "clip_seconds": 1.5,
    "fps": 4,
    "frame_size": 32,
    "splits": {"align": 3, "pseudolabel": 1, "prefix": 1, "test": 2},
}


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_compose_gives_each_mismatch_case_its_share():
    cfg = synthetic.world_config({"n_classes": 12})
    specs = [synthetic.compose(synthetic.clip_rng(0, "align", i), cfg) for i in range(3000)]
    cases = [s["case"] for s in specs]
    assert cases.count("offscreen") / 3000 == pytest.approx(0.15, abs=0.02)
    assert cases.count("silent") / 3000 == pytest.approx(0.15, abs=0.02)
    for spec in specs:
        objects = spec["objects"]
        names = [o["name"] for o in objects]
        assert 1 <= len(objects) <= 3 and len(set(names)) == len(names)
        assert any(o["heard"] for o in objects) and any(o["seen"] for o in objects)
        mismatched = sum(o["heard"] != o["seen"] for o in objects)
        assert mismatched == (0 if spec["case"] == "matched" else 1)
        seen = [o for o in objects if o["seen"]]
        for a in seen:  # placed without overlap, inside the frame
            assert a["r"] <= a["c"][0] <= 64 - a["r"] and a["r"] <= a["c"][1] <= 64 - a["r"]
            for b in seen:
                if a is not b:
                    assert np.hypot(*np.subtract(a["c"], b["c"])) >= a["r"] + b["r"]
    counts = np.bincount([len(s["objects"]) for s in specs], minlength=4)
    assert counts[1] > 0 and counts[2] > 0 and counts[3] > 0


@pytest.fixture(scope="module")
def tiny_parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("acquire")
    cfg = synthetic.world_config(TINY)
    one = synthetic.generate_part(cfg, 7, 0, 1, root / "whole")
    halves = [synthetic.generate_part(cfg, 7, p, 2, root / f"part-{p}") for p in range(2)]
    return root, one, halves


def test_a_clip_is_the_same_whatever_the_number_of_parts(tiny_parts):
    root, one, halves = tiny_parts
    assert [r["clip_id"] for r in one] == [
        "align-000000", "align-000001", "align-000002", "pseudolabel-000000",
        "prefix-000000", "test-000000", "test-000001",
    ]  # fmt: skip
    assert [r["clip_id"] for r in halves[0]] == [r["clip_id"] for r in one][0::2]
    whole_meta = {m["clip_id"]: m for m in read_jsonl(root / "whole" / "metadata.jsonl")}
    for p in range(2):
        for meta in read_jsonl(root / f"part-{p}" / "metadata.jsonl"):
            assert meta == whole_meta[meta["clip_id"]]
            a = (root / "whole" / "clips" / f"{meta['clip_id']}.mp4").read_bytes()
            b = (root / f"part-{p}" / "clips" / f"{meta['clip_id']}.mp4").read_bytes()
            assert a == b


def test_part_manifest_and_metadata_follow_the_contract(tiny_parts):
    root, one, _ = tiny_parts
    rows = read_csv(root / "whole" / "manifest.csv")
    assert list(rows[0]) == ACQUIRE_FIELDS
    metas = read_jsonl(root / "whole" / "metadata.jsonl")
    for row, meta in zip(rows, metas):
        assert row["status"] == "ok" and row["path"] == str(
            root / "whole" / "clips" / f"{row['clip_id']}.mp4"
        )
        assert row["labels"].split(";") == meta["labels"] == meta["heard"]
        assert meta["split"] == row["split"] == row["clip_id"].split("-")[0]
        assert world.is_well_formed(meta["audio_caption"])
        assert meta["audio_caption"] == world.audio_caption(meta["heard"])
        assert meta["visual_caption"] == world.visual_caption(meta["seen"])
        if meta["split"] == "test":
            assert len(set(meta["references"])) == 5
            assert meta["references"][0] == meta["audio_caption"]
        else:
            assert "references" not in meta


def _first_frame(path, size):
    raw = subprocess.run(
        [ffmpeg_exe(), "-v", "error", "-i", str(path), "-frames:v", "1", "-f", "rawvideo",
         "-pix_fmt", "rgb24", "pipe:1"],
        capture_output=True, check=True,
    ).stdout  # fmt: skip
    return np.frombuffer(raw, np.uint8).reshape(size, size, 3)


def test_clips_are_real_mp4_with_the_drawn_objects_and_their_sounds(tiny_parts):
    root, one, _ = tiny_parts
    cfg = synthetic.world_config(TINY)
    for row in one:
        path = root / "whole" / "clips" / f"{row['clip_id']}.mp4"
        info = probe(path)
        assert info.has_video and info.has_audio
        assert (info.width, info.height, info.sample_rate, info.fps) == (32, 32, 16000, 4.0)
        split, index = row["clip_id"].split("-")
        spec = synthetic.compose(synthetic.clip_rng(7, split, int(index)), cfg)
        frame = _first_frame(path, 32).astype(int)
        for obj in spec["objects"]:
            if obj["seen"] and world.BY_NAME[obj["name"]].shape not in ("ring", "star"):
                x, y = (int(v) for v in obj["c"])
                assert np.abs(frame[y, x] - world.BY_NAME[obj["name"]].rgb).max() < 40
        wave = decode_audio(path)
        assert len(wave) == pytest.approx(1.5 * 16000, abs=1100)  # exact with PCM; AAC pads
        assert 0.2 < np.abs(wave).max() <= 1.0


def test_render_audio_holds_only_the_heard_sounds():
    cfg = synthetic.world_config({**TINY, "noise_level": 0.0, "clip_seconds": 2.0})
    spec = {
        "case": "silent",
        "objects": [
            {"name": "drum", "heard": True, "seen": True, "gain": 1.0, "pitch": 1.0},
            {"name": "cricket", "heard": False, "seen": True, "gain": 1.0, "pitch": 1.0},
        ],
    }
    audio = synthetic.render_audio(spec, cfg, np.random.default_rng(0))
    assert np.abs(audio).max() == pytest.approx(0.8, abs=1e-6)
    spec_power = np.abs(np.fft.rfft(audio)) ** 2
    freqs = np.fft.rfftfreq(len(audio), 1 / 16000)
    assert spec_power[freqs > 4000].sum() < 1e-4 * spec_power.sum()  # no cricket at 4.5 kHz
    noisy = synthetic.render_audio(
        {"case": "matched", "objects": []}, {**cfg, "noise_level": 0.05}, np.random.default_rng(0)
    )
    assert noisy.std() == pytest.approx(0.05, rel=0.01)


def test_cli_writes_a_part(tmp_path):
    params = {
        "seed": 1,
        "world": {**TINY, "splits": {"align": 2, "pseudolabel": 1, "prefix": 1, "test": 1}},
        "acquire": {"parts": 2},
    }
    out = tmp_path / "part-1"
    assert synthetic.main(["--params", json.dumps(params), "--part", "1", "--out", str(out)]) == 0
    assert [r["clip_id"] for r in read_csv(out / "manifest.csv")] == [
        "align-000001",
        "prefix-000000",
    ]
    assert sorted(p.name for p in (out / "clips").iterdir()) == [
        "align-000001.mp4",
        "prefix-000000.mp4",
    ]


def test_local_folder_gets_safe_unique_ids_and_links(tmp_path):
    media = tmp_path / "media"
    (media / "sub").mkdir(parents=True)
    for name in ["Café au lait.mp4", "sub/Café au lait.mp4", "b.WAV", "notes.txt"]:
        (media / name).write_bytes(b"x")
    entries = local.list_source(media, split="test")
    assert [e["clip_id"] for e in entries] == ["Cafe_au_lait", "b", "Cafe_au_lait_2"]
    rows = local.write_part(entries[1::2], tmp_path / "part-1")
    assert [r["clip_id"] for r in rows] == ["b"]
    link = tmp_path / "part-1" / "clips" / "b.wav"
    assert link.is_symlink() and link.resolve() == (media / "b.WAV").resolve()
    assert rows[0]["path"] == str(link) and rows[0]["split"] == "test"


def test_local_csv_labels_splits_and_bad_rows(tmp_path):
    (tmp_path / "a.mp4").write_bytes(b"x")
    table = tmp_path / "list.csv"
    table.write_text(
        "path,clip_id,start_s,labels,split\n"
        "a.mp4,clipA,2.5,Dog;Bark,test\n"
        "missing.mp4,,,,\n"
        "a.mp4,clipC,soon,,\n"
        "a.mp4,bad id!,,,\n"
    )
    entries = local.list_source(table, split="align")
    assert entries[0]["labels"] == ["Dog", "Bark"] and entries[0]["start_s"] == 2.5
    rows = local.write_part(entries, tmp_path / "out")
    assert [r["status"] for r in rows] == ["ok", "failed", "failed", "failed"]
    assert rows[0]["split"] == "test" and rows[1]["split"] == "align"
    assert rows[1]["clip_id"] == "missing" and "file not found" in rows[1]["reason"]
    assert "line 4: start_s 'soon'" in rows[2]["reason"]
    assert rows[3]["clip_id"] == "bad_id" and "line 5: clip_id 'bad id!'" in rows[3]["reason"]
    meta = read_jsonl(tmp_path / "out" / "metadata.jsonl")
    assert meta[0]["labels"] == ["Dog", "Bark"] and meta[0]["source"] == str(tmp_path / "a.mp4")
    with pytest.raises(ValueError, match="no 'path' column"):
        bad = tmp_path / "bad.csv"
        bad.write_text("file\nx.mp4\n")
        local.list_source(bad)


def test_a_csv_split_that_no_shard_takes_is_a_failed_row_naming_it(tmp_path):
    (tmp_path / "a.mp4").write_bytes(b"x")
    table = tmp_path / "list.csv"
    table.write_text("path,clip_id,split\na.mp4,kept,pseudolabel\na.mp4,lost,train\n")
    rows = local.write_part(local.list_source(table), tmp_path / "out")
    assert [(r["clip_id"], r["status"], r["split"]) for r in rows] == [
        ("kept", "ok", "pseudolabel"),
        ("lost", "failed", "train"),
    ]
    assert rows[1]["reason"] == (
        f"{table}, line 3: split 'train' is none of the splits the shards take "
        "(align, pseudolabel, prefix, test)"
    )


def test_gather_merges_parts_and_counts_statuses(tiny_parts, tmp_path):
    root, one, halves = tiny_parts
    (root / "part-1" / "manifest.csv").read_text()
    summary = gather([root / "part-0", root / "part-1"], tmp_path / "acquire")
    assert summary["clips"] == 7 and summary["status"] == {"ok": 7}
    assert summary["splits"]["align"] == {"ok": 3} and summary["splits"]["test"] == {"ok": 2}
    rows = read_csv(tmp_path / "acquire" / "manifest.csv")
    assert [r["clip_id"] for r in rows] == [r["clip_id"] for r in halves[0] + halves[1]]
    assert len(read_jsonl(tmp_path / "acquire" / "metadata.jsonl")) == 7
    assert json.loads((tmp_path / "acquire" / "summary.json").read_text())["parts"] == 2
    with pytest.raises(ValueError, match="align-000000"):
        gather([root / "part-0", root / "whole"], tmp_path / "again")


def test_one_broken_clip_fails_alone(tmp_path, monkeypatch):
    """A clip that cannot be rendered, and one whose encoding breaks the shared ffmpeg
    process, are listed as failed; the rest of their batch is written."""
    cfg = synthetic.world_config(
        {**TINY, "splits": {"align": 5, "pseudolabel": 0, "prefix": 0, "test": 0}}
    )
    real_render, real_encode = synthetic.render_clip, synthetic.encode_mp4s

    def render(clip, *args):
        if clip[0] == "align-000001":
            raise ValueError("cannot draw this one")
        return real_render(clip, *args)

    def encode(clips, *args):
        if any(c.clip_id == "align-000003" for c in clips):
            raise RuntimeError("ffmpeg encoding failed")
        return real_encode(clips, *args)

    monkeypatch.setattr(synthetic, "render_clip", render)
    monkeypatch.setattr(synthetic, "encode_mp4s", encode)
    rows = synthetic.generate_part(cfg, 0, 0, 1, tmp_path / "part-0")
    assert [r["status"] for r in rows] == ["ok", "failed", "ok", "failed", "ok"]
    assert rows[1]["reason"] == "ValueError: cannot draw this one"
    assert rows[3]["reason"] == "RuntimeError: ffmpeg encoding failed"
    assert sorted(p.name for p in (tmp_path / "part-0" / "clips").iterdir()) == [
        "align-000000.mp4", "align-000002.mp4", "align-000004.mp4",
    ]  # fmt: skip
    assert len(read_jsonl(tmp_path / "part-0" / "metadata.jsonl")) == 3


def test_local_cli_splits_a_folder_into_parts(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    for name in ["a.mp4", "b.wav", "c.mkv"]:
        (media / name).write_bytes(b"x")
    params = json.dumps({"acquire": {"parts": 2, "local": {"path": str(media), "split": "test"}}})
    assert local.main(["--params", params, "--part", "0", "--out", str(tmp_path / "part-0")]) == 0
    rows = read_csv(tmp_path / "part-0" / "manifest.csv")
    assert [(r["clip_id"], r["split"], r["status"]) for r in rows] == [
        ("a", "test", "ok"),
        ("c", "test", "ok"),
    ]
    with pytest.raises(SystemExit):
        local.main(["--params", params, "--part", "2", "--out", str(tmp_path / "part-2")])


def _roundtrip_yuv420(frames: np.ndarray) -> np.ndarray:
    """The frames through ffmpeg's RGB -> yuv420p -> RGB conversion alone, with no encoder."""
    n, h, w, _ = frames.shape
    raw = subprocess.run(
        [ffmpeg_exe(), "-v", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}",
         "-i", "pipe:0", "-vf", "format=yuv420p", "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"],
        input=frames.tobytes(), capture_output=True, check=True,
    ).stdout  # fmt: skip
    return np.frombuffer(raw, np.uint8).reshape(n, h, w, 3)


@pytest.mark.parametrize("lossless", [True, False])
def test_lossless_video_decodes_to_the_rendered_frames(tmp_path, lossless):
    # world.lossless_video: the decoded frames are the drawn ones (up to 4:2:0 chroma), so no
    # run-to-run choice of x264's can change them; crf 18 decodes to something close, not equal
    cfg = synthetic.world_config(TINY)
    clip = synthetic.render_clip(("align-000000", "align", 0), cfg, 7, tmp_path)
    synthetic.encode_mp4s([clip], cfg["fps"], cfg["sample_rate"], tmp_path / "raw", lossless)
    decoded = _first_frame(clip.path, 32)
    expected = _roundtrip_yuv420(clip.frames[:1])[0]
    assert np.array_equal(decoded, expected) == lossless
    assert np.abs(decoded.astype(int) - expected).max() < 40


@pytest.mark.parametrize("codec", ["pcm_s16le", "aac"])
def test_audio_codec_pcm_is_the_rendered_sound_and_aac_is_close(tmp_path, codec):
    # world.audio_codec: PCM (the default, 2 ms of CPU per clip) decodes to the rendered 16-bit
    # samples exactly; AAC (15.6 ms per clip) to a close, padded copy
    cfg = synthetic.world_config({**TINY, "audio_codec": codec})
    clip = synthetic.render_clip(("align-000000", "align", 0), cfg, 7, tmp_path)
    synthetic.encode_mp4s(
        [clip], cfg["fps"], cfg["sample_rate"], tmp_path / "raw", True, cfg["audio_codec"]
    )
    wave = decode_audio(clip.path)
    rendered = np.round(clip.audio * 32767) / 32768
    if codec == "pcm_s16le":
        np.testing.assert_allclose(wave, rendered, atol=1e-6)
    else:
        assert len(wave) == pytest.approx(len(rendered), abs=1100)
        assert not np.allclose(wave[: len(rendered)], rendered, atol=1e-6)


def test_an_unknown_audio_codec_is_named(tmp_path):
    cfg = synthetic.world_config(TINY)
    clip = synthetic.render_clip(("align-000000", "align", 0), cfg, 7, tmp_path)
    with pytest.raises(ValueError, match="world.audio_codec"):
        synthetic.encode_mp4s([clip], 4, 16000, tmp_path / "raw", True, "mp3")
