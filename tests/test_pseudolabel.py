"""Pseudo-labels on tiny models: one row per clip in pool order, broken clips recorded, and a
restart after a kill skips the finished clips and writes the same file.

    pytest tests/test_pseudolabel.py -x -q
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dalipipe.caption.pseudolabel import pseudolabel, read_partial
from tests.support.shards import COLOURS, solid, write_shards
from tests.support.training import assembled

SETTINGS = {"modality": "audio+image", "use_prefix": True, "batch_size": 2, "max_new_tokens": 6}


@pytest.fixture(scope="module")
def stage_inputs(tiny_models, tmp_path_factory):
    """Pool (5 clips, the 3rd without frames), aligned encoder dir and prefix dir."""
    from dalipipe.models.captioner import AudioCaptioner
    from dalipipe.models.cavmae import save_encoder

    root = tmp_path_factory.mktemp("pseudolabel-inputs")
    rng = np.random.default_rng(0)
    clips = []
    for i in range(5):
        frames = [] if i == 2 else [solid(COLOURS[(i + k) % 4]) for k in range(3)]
        clips.append((f"clip{i}", frames, rng.normal(size=(64, 32)), {"split": "pseudolabel"}))
    pool = write_shards(root / "pool", clips)
    encoder_dir = root / "align" / "mmd"
    torch.manual_seed(0)  # the encoder's random init must not depend on which tests ran before
    save_encoder(tiny_models.audio_encoder(), encoder_dir)
    prefix_dir = root / "prefix"
    prefix_dir.mkdir()
    captioner = AudioCaptioner.from_base(tiny_models.llava)
    captioner.init_prefix(n_tokens=4, std=0.5, seed=1)  # large, so the prefix changes captions
    captioner.save_prefix(prefix_dir / "prefix.safetensors")
    return {
        "pool": pool,
        "encoder_dir": encoder_dir,
        "prefix_dir": prefix_dir,
        "captioner_path": tiny_models.llava,
    }


def run(stage_inputs, out, **settings):
    return pseudolabel(
        stage_inputs["pool"],
        stage_inputs["encoder_dir"],
        stage_inputs["prefix_dir"],
        stage_inputs["captioner_path"],
        out,
        settings={**SETTINGS, **settings},
        seed=7,
        device="cpu",
    )


def test_rows_follow_the_pool_and_match_direct_generation(stage_inputs, tmp_path):
    from dalipipe.data.shard_reader import load_split

    out = tmp_path / "mmd.jsonl"
    counts = run(stage_inputs, out)
    assert (counts["ok"], counts["failed"], counts["skipped"]) == (4, 1, 0)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["clip_id"] for r in rows] == ["clip0", "clip1", "clip2", "clip3", "clip4"]
    assert rows[2]["caption"] is None and "no frames" in rows[2]["reason"]
    assert rows[0]["settings"] == {
        "modality": "audio+image",
        "use_prefix": True,
        "max_new_tokens": 6,
        "do_sample": False,
        "seed": 7,
        "encoder": str(stage_inputs["encoder_dir"]),
        "prefix": str(stage_inputs["prefix_dir"]),
    }
    assert not out.with_name("mmd.jsonl.partial").exists()

    # batch 0 (clip0, clip1) by hand: image + audio + prefix through the same captioner
    captioner = assembled(stage_inputs)
    samples = load_split(stage_inputs["pool"])[:2]
    expected = captioner.generate(
        modality="audio+image",
        use_prefix=True,
        max_new_tokens=6,
        seed=7,
        pixel_values=captioner.pixel_values([s["frames"][1] for s in samples]),
        fbank=torch.from_numpy(np.stack([s["fbank"] for s in samples])),
    )
    assert [rows[0]["caption"], rows[1]["caption"]] == expected
    no_prefix = tmp_path / "no-prefix.jsonl"
    run(stage_inputs, no_prefix, use_prefix=False)
    no_prefix_rows = read_partial(no_prefix)
    assert [r["caption"] for r in no_prefix_rows] != [r["caption"] for r in rows]
    assert no_prefix_rows[0]["settings"]["prefix"] is None


def test_restart_skips_finished_clips_and_writes_the_same_file(stage_inputs, tmp_path, monkeypatch):
    from dalipipe.models.captioner import AudioCaptioner

    sampled = {"do_sample": True, "temperature": 1.0}
    uninterrupted = tmp_path / "a.jsonl"
    run(stage_inputs, uninterrupted, **sampled)
    lines = uninterrupted.read_text().splitlines(keepends=True)

    out = tmp_path / "b.jsonl"
    partial = tmp_path / "b.jsonl.partial"
    partial.write_text(lines[0] + lines[1] + lines[2][:15])  # killed while writing clip2's row
    generated = []
    real_generate = AudioCaptioner.generate

    def spy(self, **kwargs):
        generated.append(kwargs["fbank"].shape[0])
        return real_generate(self, **kwargs)

    monkeypatch.setattr(AudioCaptioner, "generate", spy)
    counts = run(stage_inputs, out, **sampled)
    assert counts["skipped"] == 2 and counts["ok"] == 2 and counts["failed"] == 1
    assert generated == [1, 1]  # batch 1: clip3 (clip2 has no frames); batch 2: clip4
    assert out.read_text() == uninterrupted.read_text()


def test_sampling_is_seeded_per_batch_and_differs_from_greedy(stage_inputs, tmp_path):
    run(stage_inputs, tmp_path / "greedy.jsonl")
    run(stage_inputs, tmp_path / "s1.jsonl", do_sample=True, temperature=1.0)
    run(stage_inputs, tmp_path / "s2.jsonl", do_sample=True, temperature=1.0)
    greedy, s1, s2 = (
        [r["caption"] for r in read_partial(tmp_path / f"{name}.jsonl")]
        for name in ("greedy", "s1", "s2")
    )
    assert s1 == s2
    assert s1 != greedy


def test_read_partial_drops_only_a_truncated_last_row(tmp_path):
    partial = tmp_path / "x.partial"
    partial.write_text('{"clip_id": "a", "caption": "x"}\n{"clip_id": "b", "cap')
    assert [r["clip_id"] for r in read_partial(partial)] == ["a"]
    assert partial.read_text() == '{"clip_id": "a", "caption": "x"}\n'
    assert read_partial(tmp_path / "none.partial") == []
