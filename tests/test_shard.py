"""Shards: writing extracted clips, key rules, skipped clips, and the distributed reader.

    HF_HUB_OFFLINE=1 pytest tests/test_shard.py -x -q

The extract parts are built here as the extract stage lays them out (real JPEG frames, a real
filterbank from dalipipe.data.fbank, manifest.csv), so nothing depends on the extract stage.
"""

import csv
import hashlib
import json
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from bench.shards import hand_written_shard  # the tarfile writer before TarWriter: the oracle
from dalipipe.data import fbank as fbank_module
from dalipipe.data import shard, shard_reader

FBANK_CFG = {"num_mel_bins": 16, "target_length": 24, "mean": -5.081, "std": 4.4849}
MANIFEST_COLUMNS = "clip_id,status,reason,n_frames,duration_s,sample_rate,channels,width,height"


def make_clip(part: Path, clip_id: str, n_frames: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    directory = part / clip_id
    directory.mkdir(parents=True)
    for k in range(n_frames):
        pixels = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(directory / f"frame_{k:02d}.jpg", quality=90)
    wave = (0.1 * rng.standard_normal(3200)).astype(np.float32)
    model_input = fbank_module.model_input_from_wave(wave, 16000, FBANK_CFG)
    np.save(directory / "fbank.npy", model_input.astype(np.float16))


def make_extract(tmp_path, clips):
    """clips: (clip_id, split, part, status, n_frames). Returns part dirs and metadata path."""
    parts = sorted({c[2] for c in clips})
    part_dirs = [tmp_path / "extract" / f"part-{p}" for p in parts]
    rows = {p: [] for p in parts}
    metadata = []
    for seed, (clip_id, split, part, status, n_frames) in enumerate(clips):
        if status == "ok":
            make_clip(tmp_path / "extract" / f"part-{part}", clip_id, n_frames, seed)
        reason = "" if status == "ok" else f"clips/{clip_id}.mp4: no audio stream"
        rows[part].append([clip_id, status, reason, n_frames, 0.2, 16000, 1, 8, 6])
        metadata.append({"clip_id": clip_id, "split": split, "labels": ["dog"], "start_s": 0.0})
    for p, part_dir in zip(parts, part_dirs):
        part_dir.mkdir(parents=True, exist_ok=True)
        with open(part_dir / "manifest.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(MANIFEST_COLUMNS.split(","))
            writer.writerows(rows[p])
    metadata_path = tmp_path / "metadata.jsonl"
    metadata_path.write_text("".join(json.dumps(m) + "\n" for m in metadata))
    return part_dirs, metadata_path


def align_world(tmp_path, n=7):
    clips = [(f"clip{i:02d}", "align", i % 2, "ok", 2 + i % 3) for i in range(n)]
    return make_extract(tmp_path, clips)


def test_round_trip_keeps_pixels_fbank_and_metadata(tmp_path):
    parts, metadata = align_world(tmp_path, n=5)
    out = tmp_path / "shards" / "align"
    index = shard.write_split(parts, metadata, "align", out, samples_per_shard=2)
    assert [s["file"] for s in index["shards"]] == [f"align-00000{i}.tar" for i in range(3)]
    assert [s["count"] for s in index["shards"]] == [2, 2, 1]
    assert index["total"] == 5 and index["fbank_shape"] == [24, 16]

    samples = shard_reader.load_split(out)
    assert [s["clip_id"] for s in samples] == [f"clip{i:02d}" for i in range(5)]
    for i, sample in enumerate(samples):
        clip_dir = tmp_path / "extract" / f"part-{i % 2}" / sample["clip_id"]
        assert len(sample["frames"]) == 2 + i % 3 == sample["meta"]["n_frames"]
        for k, frame in enumerate(sample["frames"]):
            assert frame.dtype == np.uint8 and frame.shape == (6, 8, 3)
            np.testing.assert_array_equal(
                frame, np.asarray(Image.open(clip_dir / f"frame_{k:02d}.jpg"))
            )
        stored = np.load(clip_dir / "fbank.npy")
        assert sample["fbank"].dtype == np.float32
        np.testing.assert_array_equal(sample["fbank"], stored.astype(np.float32))
        assert sample["meta"]["labels"] == ["dog"] and sample["meta"]["split"] == "align"

    stats = json.loads((out / "stats-000001.json").read_text())
    assert stats["clip_ids"] == ["clip02", "clip03"] and stats["count"] == 2
    assert stats["frames_per_clip"] == [4, 2]
    values = np.stack([samples[2]["fbank"], samples[3]["fbank"]]).astype(np.float64)
    assert stats["fbank_mean"] == pytest.approx(values.mean(), rel=1e-9)
    assert stats["fbank_std"] == pytest.approx(values.std(), rel=1e-6)


def test_webdataset_reads_the_shards(tmp_path):
    """Other tools read our shards with webdataset's own reader: the same keys and bytes."""
    parts, metadata = align_world(tmp_path, n=3)
    shard.write_split(parts, metadata, "align", tmp_path / "out", samples_per_shard=10)
    tar = tmp_path / "out" / "align-000000.tar"
    theirs = list(wds.WebDataset(str(tar), shardshuffle=False))
    ours = list(shard_reader.iter_raw_samples(tar))
    assert (
        [s["__key__"] for s in theirs] == [key for key, _ in ours] == ["clip00", "clip01", "clip02"]
    )
    for sample, (_, fields) in zip(theirs, ours):
        assert {k: v for k, v in sample.items() if not k.startswith("__")} == fields
    assert sorted(ours[1][1]) == ["fbank.npy", "frame0.jpg", "frame1.jpg", "frame2.jpg", "json"]
    assert json.loads(theirs[1]["json"])["n_frames"] == 3


def fixed_clips(root: Path) -> list:
    """Clips of literal bytes (so their shard's sha256 holds on any machine): 12 frames (frame10
    sorts before frame2 by name), kept audio, a key over tar's 100-character name field, a
    clip without frames, non-ASCII metadata."""
    clips = []
    specs = [("clip-a", 12, True), ("b_" + "x" * 120, 1, False), ("clip-c", 0, False)]
    for n, (key, n_frames, with_audio) in enumerate(specs):
        directory = root / key[:20]
        directory.mkdir(parents=True)
        frames = [directory / f"frame_{k:02d}.jpg" for k in range(n_frames)]
        for k, frame in enumerate(frames):
            frame.write_bytes(b"\xff\xd8" + bytes([n, k]) * (50 + 37 * k))
        fbank = np.arange(24 * 16, dtype=np.float16).reshape(24, 16) / (n + 7)
        np.save(directory / "fbank.npy", fbank)
        audio = directory / "audio.wav" if with_audio else None
        if audio is not None:
            audio.write_bytes(b"RIFF" + bytes(range(256)) * 3)
        meta = {
            "clip_id": key,
            "caption": "un chien aboie — près d'une école",
            "n_frames": n_frames,
        }
        clips.append(shard.Clip(key, key, frames, directory / "fbank.npy", audio, meta))
    return clips


def test_tarwriter_writes_the_hand_written_writers_bytes(tmp_path):
    clips = fixed_clips(tmp_path / "clips")
    shard.write_shard(tmp_path / "new.tar", clips)
    hand_written_shard(tmp_path / "old.tar", clips)
    written = (tmp_path / "new.tar").read_bytes()
    assert written == (tmp_path / "old.tar").read_bytes()
    # the sha256 the hand-written writer gave before the change, pinned: a new tarfile or
    # webdataset that writes other bytes fails here, before the determinism tests do
    assert len(written) == 30720
    assert hashlib.sha256(written).hexdigest() == (
        "590e48a7df5c6e043fe168a9e25d3bc763c9b0033ffa3b24eb0a0e5cd44acab0"
    )


def test_tars_are_reproducible(tmp_path):
    parts, metadata = align_world(tmp_path, n=3)
    shard.write_split(parts, metadata, "align", tmp_path / "a")
    shard.write_split(parts, metadata, "align", tmp_path / "b")
    assert (tmp_path / "a" / "align-000000.tar").read_bytes() == (
        tmp_path / "b" / "align-000000.tar"
    ).read_bytes()


def test_key_rules():
    assert shard.shard_key("Ab-9_x") == "Ab-9_x"
    assert shard.shard_key("yt.abc.30") == "yt_abc_30"
    for bad in ["a/b", "a b", "", "é"]:
        with pytest.raises(ValueError, match="shard key"):
            shard.shard_key(bad)


def test_dotted_ids_keep_their_id_and_colliding_keys_are_skipped(tmp_path):
    clips = [("a.b", "test", 0, "ok", 1), ("a_b", "test", 0, "ok", 1), ("c d", "test", 0, "ok", 1)]
    parts, metadata = make_extract(tmp_path, clips)
    index = shard.write_split(parts, metadata, "test", tmp_path / "out")
    assert [s["clip_id"] for s in shard_reader.load_split(tmp_path / "out")] == ["a.b"]
    reasons = {s["clip_id"]: s["reason"] for s in index["skipped"]}
    assert "already used by clip 'a.b'" in reasons["a_b"]
    assert "shard key" in reasons["c d"]
    assert index["counts"] == {"broken": 2, "written": 1}


def test_failed_missing_frameless_and_broken_clips_are_skipped(tmp_path):
    clips = [
        ("ok1", "align", 0, "ok", 2),
        ("failed1", "align", 0, "failed", 0),
        ("noframes", "align", 1, "ok", 0),
        ("badfbank", "align", 1, "ok", 1),
        ("other", "test", 1, "ok", 0),
        ("wrongshape", "align", 0, "ok", 1),
    ]
    parts, metadata = make_extract(tmp_path, clips)
    (parts[1] / "badfbank" / "fbank.npy").write_bytes(b"not an npy file")
    np.save(parts[0] / "wrongshape" / "fbank.npy", np.zeros((10, 16), np.float16))
    with open(metadata, "a") as f:
        f.write(json.dumps({"clip_id": "never_extracted", "split": "align", "labels": []}) + "\n")
    index = shard.write_split(parts, metadata, "align", tmp_path / "align")
    assert [s["clip_id"] for s in shard_reader.load_split(tmp_path / "align")] == ["ok1"]
    assert index["counts"] == {
        "broken": 2,
        "extract_failed": 1,
        "no_frames": 1,
        "not_extracted": 1,
        "written": 1,
    }
    reasons = {s["clip_id"]: s["reason"] for s in index["skipped"]}
    assert "no audio stream" in reasons["failed1"]
    assert "badfbank/fbank.npy: not a readable .npy" in reasons["badfbank"]
    assert "no frames" in reasons["noframes"]
    assert "shape (10, 16) differs from the split's (24, 16)" in reasons["wrongshape"]
    # The test split does not need frames: its frameless clip is written.
    shard.write_split(parts, metadata, "test", tmp_path / "test")
    (only,) = shard_reader.load_split(tmp_path / "test")
    assert only["clip_id"] == "other" and only["frames"] == [] and only["meta"]["n_frames"] == 0


def test_kept_list_filters_only_the_align_split(tmp_path):
    clips = [(f"a{i}", "align", 0, "ok", 1) for i in range(4)] + [("t0", "test", 0, "ok", 1)]
    parts, metadata = make_extract(tmp_path, clips)
    kept = tmp_path / "kept.txt"
    kept.write_text("a1\na3\nt9\n")
    index = shard.write_split(parts, metadata, "align", tmp_path / "align", kept_path=kept)
    assert [s["clip_id"] for s in shard_reader.load_split(tmp_path / "align")] == ["a1", "a3"]
    assert index["counts"] == {"filtered_out": 2, "written": 2}
    shard.write_split(parts, metadata, "test", tmp_path / "test", kept_path=kept)
    assert [s["clip_id"] for s in shard_reader.load_split(tmp_path / "test")] == ["t0"]


def test_evaluation_ids_are_dropped_from_every_training_split(tmp_path):
    """filter.exclude_id_lists at the shards: the only check every training clip passes, since
    the filter scores only filter.splits and may be off, and a local source selects nothing."""
    clips = [
        ("dQw4w9WgXcQ_30000", "align", 0, "ok", 1),  # <ytid>_<ms>
        ("keepMe00001_0", "align", 0, "ok", 1),
        ("Y-0Gj8-vB1q4_30_000_40_000", "pseudolabel", 1, "ok", 1),  # Y<ytid>_30.000_40.000.wav
        ("keepMe00002", "pseudolabel", 1, "ok", 1),
        ("-0Gj8-vB1q4", "prefix", 0, "ok", 1),  # <ytid>.wav
        ("street_scene", "prefix", 1, "ok", 1),  # its id only in the metadata (local CSV column)
        ("a_prefix_clip", "prefix", 1, "ok", 1),
        ("dQw4w9WgXcQ", "test", 0, "ok", 1),  # the evaluation clip itself stays in test
    ]
    parts, metadata = make_extract(tmp_path, clips)
    rows = [json.loads(line) for line in metadata.read_text().splitlines()]
    rows[5]["youtube_id"] = "Yh9xQ1vKc0Z"
    metadata.write_text("".join(json.dumps(r) + "\n" for r in rows))
    audiocaps = tmp_path / "audiocaps_test.csv"
    audiocaps.write_text(
        "audiocap_id,youtube_id,start_time,caption\n"
        "1,dQw4w9WgXcQ,30,A man sings\n2,-0Gj8-vB1q4,30,A dog barks\n"
    )
    plain = tmp_path / "clotho_ids.txt"
    plain.write_text("Yh9xQ1vKc0Z\n")
    kept = tmp_path / "kept.txt"  # a kept list holding an evaluation clip does not save it
    kept.write_text("dQw4w9WgXcQ_30000\nkeepMe00001_0\n")
    lists = {"exclude_id_lists": [str(audiocaps), str(plain)]}
    params = json.dumps({"seed": 0, "shard": {"samples_per_shard": 10}, "filter": lists})
    argv = ["--params", params, "--extract", *map(str, parts), "--metadata", str(metadata)]
    written, excluded = {}, {}
    for split in ("align", "pseudolabel", "prefix", "test"):
        extra = ["--kept", str(kept)] if split == "align" else []
        out = tmp_path / "shards" / split
        assert shard.main([*argv, *extra, "--split", split, "--out", str(out)]) == 0
        written[split] = ids(shard_reader.load_split(out))
        excluded[split] = json.loads((out / "index.json").read_text())["counts"].get(
            "excluded_eval_ids"
        )
    assert written == {
        "align": ["keepMe00001_0"],
        "pseudolabel": ["keepMe00002"],
        "prefix": ["a_prefix_clip"],
        "test": ["dQw4w9WgXcQ"],
    }
    assert excluded == {"align": 1, "pseudolabel": 1, "prefix": 2, "test": None}


def ids(reader):
    return [s["clip_id"] for s in reader]


@pytest.mark.parametrize("samples_per_shard,split_by", [(2, "auto"), (100, "auto"), (2, "sample")])
@pytest.mark.parametrize("shuffle", [False, True])
def test_two_ranks_cover_each_sample_exactly_once(tmp_path, samples_per_shard, split_by, shuffle):
    parts, metadata = align_world(tmp_path, n=7)
    shard.write_split(parts, metadata, "align", tmp_path / "s", samples_per_shard=samples_per_shard)
    seen = []
    for rank in range(2):
        reader = shard_reader.ShardReader(
            tmp_path / "s",
            shuffle=shuffle,
            seed=3,
            rank=rank,
            world_size=2,
            split_by=split_by,
            buffer_size=3,
        )
        reader.set_epoch(5)
        seen.append(ids(reader))
    assert seen[0] and seen[1]
    assert sorted(seen[0] + seen[1]) == [f"clip{i:02d}" for i in range(7)]


def test_dataloader_workers_split_the_samples(tmp_path):
    parts, metadata = align_world(tmp_path, n=7)
    shard.write_split(parts, metadata, "align", tmp_path / "s", samples_per_shard=3)
    reader = shard_reader.ShardReader(tmp_path / "s", rank=0, world_size=1)
    loader = torch.utils.data.DataLoader(
        reader, batch_size=None, num_workers=2, collate_fn=lambda s: s
    )
    assert sorted(s["clip_id"] for s in loader) == [f"clip{i:02d}" for i in range(7)]


def test_order_is_deterministic_without_shuffle(tmp_path):
    parts, metadata = align_world(tmp_path, n=7)
    shard.write_split(parts, metadata, "align", tmp_path / "s", samples_per_shard=3)
    expected = [f"clip{i:02d}" for i in range(7)]
    reader = shard_reader.ShardReader(tmp_path / "s", rank=0, world_size=1)
    assert ids(reader) == expected
    reader.set_epoch(4)
    assert ids(reader) == expected
    rank1 = shard_reader.ShardReader(tmp_path / "s", rank=1, world_size=2)
    assert ids(rank1) == ["clip03", "clip04", "clip05"]  # whole shards: the second one


def test_shuffling_is_seeded_and_changes_with_epoch(tmp_path):
    parts, metadata = align_world(tmp_path, n=12)
    shard.write_split(parts, metadata, "align", tmp_path / "s", samples_per_shard=3)

    def order(seed, epoch):
        reader = shard_reader.ShardReader(
            tmp_path / "s", shuffle=True, seed=seed, rank=0, world_size=1, buffer_size=4
        )
        reader.set_epoch(epoch)
        return ids(reader)

    assert order(0, 0) == order(0, 0)
    assert sorted(order(0, 0)) == [f"clip{i:02d}" for i in range(12)]
    assert order(0, 1) != order(0, 0)
    assert order(1, 0) != order(0, 0)
    assert order(0, 0) != [f"clip{i:02d}" for i in range(12)]


def test_the_decoded_cache_keeps_the_stream_and_its_budget(tmp_path):
    parts, metadata = align_world(tmp_path, n=12)
    shard.write_split(parts, metadata, "align", tmp_path / "s", samples_per_shard=3)

    def epochs(cache, frame_indices=None):
        for epoch in (0, 1):
            reader = shard_reader.ShardReader(
                tmp_path / "s",
                shuffle=True,
                seed=2,
                rank=0,
                world_size=1,
                buffer_size=4,
                frame_indices=frame_indices,
                cache=cache,
            )
            reader.set_epoch(epoch)
            yield list(reader)

    def same(a, b):
        assert [x["clip_id"] for x in a] == [x["clip_id"] for x in b]
        for x, y in zip(a, b):
            assert np.array_equal(x["fbank"], y["fbank"]) and x["meta"] == y["meta"]
            assert len(x["frames"]) == len(y["frames"])
            assert all(np.array_equal(f, g) for f, g in zip(x["frames"], y["frames"]))

    plain = list(epochs(None))
    cache = shard_reader.DecodedCache(budget_bytes=10**9)
    cached = list(epochs(cache))
    for a, b in zip(plain, cached):
        same(a, b)
    assert len(cache.samples) == 12
    # the second epoch hands out the very objects the first one decoded
    first = {x["clip_id"]: x for x in cached[0]}
    assert all(x is first[x["clip_id"]] for x in cached[1])
    one = shard_reader.sample_bytes(cached[0][0])
    assert cache.bytes == sum(shard_reader.sample_bytes(x) for x in cached[0])

    # a budget of about five clips keeps some; the rest are decoded again, the same
    small = shard_reader.DecodedCache(budget_bytes=5 * one)
    for a, b in zip(plain, epochs(small)):
        same(a, b)
    assert 3 <= len(small.samples) <= 6 and small.bytes <= 5 * one
    # the frames asked for are part of what is cached: the full cache does not answer for [1]
    middle = list(epochs(cache, [1]))[1]
    assert all(len(x["frames"]) == 1 for x in middle) and len(cache.samples) == 24


def test_rank_and_world_come_from_the_launcher_environment(tmp_path, monkeypatch):
    parts, metadata = align_world(tmp_path, n=3)
    shard.write_split(parts, metadata, "align", tmp_path / "s", samples_per_shard=1)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    reader = shard_reader.ShardReader(tmp_path / "s")
    assert (reader.rank, reader.world_size) == (2, 3)
    assert ids(reader) == ["clip02"]
    with pytest.raises(ValueError, match="rank 3 outside world_size 3"):
        shard_reader.ShardReader(tmp_path / "s", rank=3)


def test_frame_indices_decode_only_the_frames_asked_for(tmp_path):
    parts, metadata = align_world(tmp_path, n=3)
    shard.write_split(parts, metadata, "align", tmp_path / "s")
    full = shard_reader.load_split(tmp_path / "s")
    middle = list(shard_reader.ShardReader(tmp_path / "s", rank=0, world_size=1, frame_indices=[1]))
    for a, b in zip(full, middle):
        assert len(b["frames"]) == 1
        np.testing.assert_array_equal(b["frames"][0], a["frames"][1])


def test_cli_writes_the_split_and_fails_when_nothing_is_left(tmp_path):
    parts, metadata = align_world(tmp_path, n=4)
    params = json.dumps(
        {"seed": 0, "shard": {"samples_per_shard": 3}, "extract": {"keep_wav": False}}
    )
    argv = ["--params", params, "--extract", *map(str, parts), "--metadata", str(metadata)]
    assert shard.main([*argv, "--split", "align", "--out", str(tmp_path / "align")]) == 0
    index = json.loads((tmp_path / "align" / "index.json").read_text())
    assert [s["count"] for s in index["shards"]] == [3, 1]
    assert shard.main([*argv, "--split", "pseudolabel", "--out", str(tmp_path / "pl")]) == 1
    assert not (tmp_path / "pl").exists()


def test_keep_wav_stores_and_decodes_the_audio(tmp_path):
    parts, metadata = align_world(tmp_path, n=1)
    pcm = (np.arange(-800, 800, dtype=np.int16) * 20).astype("<i2")
    with wave.open(str(parts[0] / "clip00" / "audio.wav"), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(16000)
        f.writeframes(pcm.tobytes())
    shard.write_split(parts, metadata, "align", tmp_path / "s", keep_wav=True)
    (sample,) = shard_reader.load_split(tmp_path / "s")
    assert sample["audio_sample_rate"] == 16000
    np.testing.assert_array_equal(sample["audio"], pcm.astype(np.float32) / 32768.0)
