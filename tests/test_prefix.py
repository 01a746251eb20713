"""Prefix tuning on the tiny LLaVA: pairs are read right, the loss falls, only the prefix moves,
and a run killed by SIGTERM resumes to the same prefix.

    pytest tests/test_prefix.py -x -q
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from dalipipe.caption.pairs import load_pairs, middle
from dalipipe.caption.prefix import fit_prefix, train_prefix
from dalipipe.config import section_defaults
from dalipipe.training import epoch_order
from tests.support.shards import COLOURS, solid, write_shards
from tests.support.training import assert_trains_like_the_whole_batch, sigterm_in_loss_call

CAPTIONS = ["a dog barks", "a bell rings", "a bird chirps", "a car passes by"]
QUICK = {
    **section_defaults("prefix"),
    "n_tokens": 4,
    "lr": 0.05,
    "epochs": 6,
    "batch_size": 2,
    "checkpoint_every": 2,
}


@pytest.fixture
def pairs_file(tmp_path):
    rows = []
    for i, (caption, colour) in enumerate(zip(CAPTIONS, COLOURS)):
        Image.fromarray(solid(colour)).save(tmp_path / f"frame{i}.jpg")
        rows.append({"id": f"pair{i}", "image": f"frame{i}.jpg", "caption": caption})
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_middle_frame_is_the_authors_frame_5_of_10():
    assert middle(list(range(10))) == 5
    assert middle(list(range(3))) == 1
    assert middle([7]) == 7


def test_pairs_from_shards_take_middle_frame_and_audio_caption(tmp_path):
    frames = [solid(c) for c in COLOURS[:3]]  # middle: green
    fbank = np.zeros((64, 32))
    shards = write_shards(
        tmp_path / "prefix", [("clipA", frames, fbank, {"audio_caption": "a bell rings"})]
    )
    [pair] = load_pairs(shards)
    assert pair.clip_id == "clipA" and pair.caption == "a bell rings"
    red, green, blue = np.asarray(pair.image)[20, 24]
    assert green > 200 and red < 50 and blue < 50


def test_pairs_from_shards_without_audio_caption_name_the_clip(tmp_path):
    shards = write_shards(
        tmp_path / "prefix", [("clipB", [solid(COLOURS[0])], np.zeros((64, 32)), {})]
    )
    with pytest.raises(ValueError, match="clipB.*audio_caption"):
        load_pairs(shards)


def test_pairs_from_file_and_authors_conversation_json(tmp_path, pairs_file):
    pairs = load_pairs(pairs_file)
    assert [p.caption for p in pairs] == CAPTIONS
    assert [p.clip_id for p in pairs] == ["pair0", "pair1", "pair2", "pair3"]
    assert pairs[2].image.size == (48, 40)
    conversation = [
        {
            "id": "yt1",
            "image": str(tmp_path / "frame1.jpg"),
            "audio": "unused.wav",
            "conversations": [
                {
                    "from": "human",
                    "value": "<image>\nDescribe the sound that can be heard in this scene.",
                },
                {"from": "gpt", "value": "A bell rings once."},
            ],
        }
    ]
    (tmp_path / "prefixDS.json").write_text(json.dumps(conversation))
    [pair] = load_pairs(tmp_path / "prefixDS.json")
    assert (pair.clip_id, pair.caption) == ("yt1", "A bell rings once.")


def test_pairs_file_errors_name_file_and_row(tmp_path, pairs_file):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(pairs_file.read_text() + json.dumps({"image": "frame0.jpg"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl: row 5 has no caption"):
        load_pairs(bad)
    missing = tmp_path / "missing.csv"
    missing.write_text("image,caption\nnowhere.jpg,a dog barks\n")
    with pytest.raises(ValueError, match=r"missing.csv: row 1: cannot read image"):
        load_pairs(missing)


def test_epoch_order_depends_on_seed_and_epoch_only():
    assert epoch_order(8, 3, seed=1) == epoch_order(8, 3, seed=1)
    assert sorted(epoch_order(8, 3, seed=1)) == list(range(8))
    assert epoch_order(8, 3, seed=1) != epoch_order(8, 4, seed=1)


def fresh_captioner(llava):
    from dalipipe.models.captioner import AudioCaptioner

    captioner = AudioCaptioner.from_base(llava)
    captioner.init_prefix(n_tokens=QUICK["n_tokens"], std=1e-4, seed=0)
    return captioner


def test_prefix_loss_falls_and_only_the_prefix_changes(tiny_models, pairs_file, tmp_path):
    captioner = fresh_captioner(tiny_models.llava)
    before = {k: v.clone() for k, v in captioner.state_dict().items()}
    curve = fit_prefix(captioner, load_pairs(pairs_file), tmp_path / "ckpt", settings=QUICK)
    assert len(curve) == QUICK["epochs"] * 2  # 4 pairs at batch 2
    # same batch in epochs 1 and 6? compare whole epochs: the mean loss over all pairs falls
    first, last = np.mean([c["loss"] for c in curve[:2]]), np.mean([c["loss"] for c in curve[-2:]])
    assert last < first - 0.01
    after = captioner.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == ["prefix"]
    assert captioner.prefix.abs().max() > 100 * 1e-4  # moved far from its N(0, 1e-4) start
    # warm-up: ceil(0.03 * 12) = 1 step, so the first step runs at lr 0
    assert curve[0]["lr"] == 0.0 and curve[1]["lr"] == pytest.approx(QUICK["lr"])


def test_sigterm_then_rerun_gives_the_uninterrupted_prefix(
    tiny_models, pairs_file, tmp_path, monkeypatch
):
    import dalipipe.training as training

    pairs = load_pairs(pairs_file)
    reference = fresh_captioner(tiny_models.llava)
    fit_prefix(reference, pairs, tmp_path / "ref.ckpt", settings=QUICK)

    killed = fresh_captioner(tiny_models.llava)
    # step 5 of 12: the checkpoint after it is not a periodic one
    sigterm_in_loss_call(monkeypatch, killed, 5)
    with pytest.raises(SystemExit) as stop:
        fit_prefix(killed, pairs, tmp_path / "run.ckpt", settings=QUICK)
    assert stop.value.code == training.PREEMPTED_EXIT_CODE
    assert training.TrainCheckpoint(tmp_path / "run.ckpt").load()["step"] == 5

    monkeypatch.setitem(training._sigterm, "requested", False)
    resumed = fresh_captioner(tiny_models.llava)  # a new process: fresh prefix, then the checkpoint
    curve = fit_prefix(resumed, pairs, tmp_path / "run.ckpt", settings=QUICK)
    assert len(curve) == 12
    torch.testing.assert_close(resumed.prefix, reference.prefix, rtol=0, atol=1e-6)


def test_train_prefix_writes_the_stage_outputs(tiny_models, pairs_file, tmp_path):
    out = tmp_path / "prefix"
    summary = train_prefix(
        pairs_file, tiny_models.llava, out, settings={**QUICK, "epochs": 2}, seed=3, device="cpu"
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "curve.csv",
        "prefix.json",
        "prefix.safetensors",
    ]
    assert not (tmp_path / "prefix.ckpt").exists()
    info = json.loads((out / "prefix.json").read_text())
    assert info["hidden_size"] == 64 and info["n_tokens"] == 4 and info["seed"] == 3
    assert info["pairs"] == ["pair0", "pair1", "pair2", "pair3"] and info["steps"] == 4
    with open(out / "curve.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert float(rows[-1]["loss"]) == pytest.approx(summary["final_loss"])
    captioner = fresh_captioner(tiny_models.llava)
    captioner.load_prefix(out / "prefix.safetensors")
    assert tuple(captioner.prefix.shape) == (4, 64)


@pytest.mark.parametrize(
    "memory",
    [
        {"micro_batch_size": 1},
        {"activation_checkpointing": True},
        {"micro_batch_size": 1, "activation_checkpointing": True},
    ],
)
def test_accumulation_and_checkpointing_train_like_the_whole_batch(
    tiny_models, pairs_file, tmp_path, memory
):
    pairs = load_pairs(pairs_file)
    settings = {**QUICK, "epochs": 2}

    def fit(settings, name):
        captioner = fresh_captioner(tiny_models.llava)
        curve = fit_prefix(captioner, pairs, tmp_path / name, settings=settings)
        return curve, {"prefix": captioner.prefix.detach().clone()}

    assert_trains_like_the_whole_batch(fit, settings, memory)


def test_micro_batch_size_not_dividing_batch_size_is_refused(tiny_models, pairs_file, tmp_path):
    with pytest.raises(ValueError, match=r"prefix\.micro_batch_size=3 does not divide prefix\."):
        fit_prefix(
            fresh_captioner(tiny_models.llava),
            load_pairs(pairs_file),
            tmp_path / "ckpt",
            settings={**QUICK, "micro_batch_size": 3},
        )
    assert not (tmp_path / "ckpt").exists()
