"""Distillation on tiny models: only the audio projector trains, a SIGTERM-killed run resumes to
the same weights, and the output is a trained-captioner directory `from_dir` loads.

    pytest tests/test_distill.py -x -q
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import dalipipe.training as training
from dalipipe.caption.distill import distill, fit_projector, training_set
from dalipipe.config import section_defaults
from tests.support.shards import COLOURS, solid, write_shards
from tests.support.training import (
    assembled,
    assert_trains_like_the_whole_batch,
    sigterm_in_loss_call,
)

CAPTIONS = ["a dog barks", "a bell rings", "a bird chirps", "a car passes by", "a dog barks twice"]
QUICK = {
    **section_defaults("distill"),
    "lr": 0.01,
    "batch_size": 2,
    "epochs": 2,
    "checkpoint_every": 2,
}


@pytest.fixture(scope="module")
def stage_inputs(tiny_models, tmp_path_factory):
    from dalipipe.models.captioner import AudioCaptioner
    from dalipipe.models.cavmae import save_encoder

    root = tmp_path_factory.mktemp("distill-inputs")
    rng = np.random.default_rng(1)
    clips = [(f"clip{i}", [solid(COLOURS[i % 4])], rng.normal(size=(64, 32)), {}) for i in range(6)]
    pool = write_shards(root / "pool", clips)
    rows = [{"clip_id": f"clip{i}", "caption": c, "settings": {}} for i, c in enumerate(CAPTIONS)]
    rows[1]["caption"] = None  # a clip that failed in pseudolabel
    rows[2]["caption"] = "  "  # an empty generation
    rows.append({"clip_id": "elsewhere", "caption": "not in the pool", "settings": {}})
    pseudolabels = root / "mmd.jsonl"
    pseudolabels.write_text("".join(json.dumps(r) + "\n" for r in rows))
    encoder_dir = root / "align" / "mmd"
    save_encoder(tiny_models.audio_encoder(), encoder_dir)
    prefix_dir = root / "prefix"
    prefix_dir.mkdir()
    captioner = AudioCaptioner.from_base(tiny_models.llava)
    captioner.init_prefix(n_tokens=4, std=0.5, seed=1)
    captioner.save_prefix(prefix_dir / "prefix.safetensors")
    return {
        "pseudolabels": pseudolabels,
        "pool": pool,
        "encoder_dir": encoder_dir,
        "prefix_dir": prefix_dir,
        "captioner_path": tiny_models.llava,
    }


def test_training_set_keeps_captioned_pool_clips(stage_inputs):
    examples = training_set(stage_inputs["pseudolabels"], stage_inputs["pool"], "audio")
    assert [e["clip_id"] for e in examples] == ["clip0", "clip3", "clip4"]
    assert [e["caption"] for e in examples] == [
        "a dog barks",
        "a car passes by",
        "a dog barks twice",
    ]
    assert examples[0]["fbank"].shape == (64, 32) and "frame" not in examples[0]
    assert training_set(stage_inputs["pseudolabels"], stage_inputs["pool"], "audio+image")[0][
        "frame"
    ].size == (48, 40)


def test_only_the_audio_projector_trains_and_the_loss_falls(stage_inputs, tmp_path):
    captioner = assembled(stage_inputs)
    examples = training_set(stage_inputs["pseudolabels"], stage_inputs["pool"], "audio")
    before = {k: v.clone() for k, v in captioner.state_dict().items()}
    image_projector = {k: v.clone() for k, v in captioner.image_projector.state_dict().items()}
    assert all(
        torch.equal(image_projector[k], v)
        for k, v in captioner.audio_projector.state_dict().items()
    )
    curve = fit_projector(captioner, examples, tmp_path / "ckpt", settings={**QUICK, "epochs": 4})
    assert len(curve) == 8  # 3 clips at batch 2: 2 steps per epoch
    assert np.mean([c["loss"] for c in curve[-2:]]) < np.mean([c["loss"] for c in curve[:2]]) - 0.05
    after = captioner.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    projector = {k for k in before if k.startswith("audio_projector.")}
    assert projector and changed == projector
    assert all(
        torch.equal(image_projector[k], v)
        for k, v in captioner.image_projector.state_dict().items()
    )


def uninterrupted(stage_inputs, tmp_path):
    """The training clips, and the captioner and curve of a run nothing stops."""
    examples = training_set(stage_inputs["pseudolabels"], stage_inputs["pool"], "audio")
    reference = assembled(stage_inputs)
    curve = fit_projector(reference, examples, tmp_path / "ref.ckpt", settings=QUICK)
    return examples, reference, curve


def killed_in_step_3(stage_inputs, examples, checkpoint_dir, monkeypatch):
    """A run SIGTERM-killed in step 3 of 4 (one micro-batch a step), its checkpoint left in
    `checkpoint_dir`; returns pytest's record of its SystemExit. The flag is cleared after, as
    in the new process a rerun is."""
    killed = assembled(stage_inputs)
    sigterm_in_loss_call(monkeypatch, killed, 3)
    with pytest.raises(SystemExit) as stop:
        fit_projector(killed, examples, checkpoint_dir, settings=QUICK)
    monkeypatch.setitem(training._sigterm, "requested", False)
    return stop


def assert_resumed_like(resumed, curve, reference, reference_curve, atol):
    """The resumed run's curve and audio projector are the uninterrupted run's, within atol."""
    assert [c["step"] for c in curve] == [1, 2, 3, 4]
    assert [c["loss"] for c in curve] == pytest.approx(
        [c["loss"] for c in reference_curve], abs=atol
    )
    for key, value in reference.audio_projector.state_dict().items():
        torch.testing.assert_close(
            resumed.audio_projector.state_dict()[key], value, rtol=0, atol=atol
        )


def test_sigterm_then_rerun_gives_the_uninterrupted_projector(stage_inputs, tmp_path, monkeypatch):
    examples, reference, reference_curve = uninterrupted(stage_inputs, tmp_path)
    stop = killed_in_step_3(stage_inputs, examples, tmp_path / "run.ckpt", monkeypatch)
    assert stop.value.code == training.PREEMPTED_EXIT_CODE

    resumed = assembled(stage_inputs)
    curve = fit_projector(resumed, examples, tmp_path / "run.ckpt", settings=QUICK)
    assert_resumed_like(resumed, curve, reference, reference_curve, atol=1e-6)


def test_distill_writes_a_directory_from_dir_loads(stage_inputs, tmp_path):
    from dalipipe.models.captioner import AudioCaptioner

    out = tmp_path / "distill" / "mmd"
    features = {
        "fbank": {"num_mel_bins": 32, "target_length": 64},
        "frame_short_side": 32,
        "window_seconds": 10.0,
    }
    summary = distill(
        stage_inputs["pseudolabels"],
        stage_inputs["pool"],
        stage_inputs["encoder_dir"],
        stage_inputs["prefix_dir"],
        stage_inputs["captioner_path"],
        out,
        settings=QUICK,
        seed=0,
        device="cpu",
        features=features,
    )
    assert summary["clips"] == 3 and summary["steps"] == 4
    assert not (tmp_path / "distill" / "mmd.ckpt").exists()
    names = {p.name for p in out.iterdir()}
    assert {
        "captioner.json",
        "audio_encoder.json",
        "audio_encoder.safetensors",
        "audio_projector.safetensors",
        "prefix.safetensors",
        "curve.csv",
        "distill.json",
    } <= names

    base = json.loads((out / "captioner.json").read_text())["base"]
    assert base.startswith("..")  # relative to the model dir: results can move as a whole
    assert (out / base).resolve() == stage_inputs["captioner_path"].resolve()
    loaded = AudioCaptioner.from_dir(out)
    assert loaded.metadata["features"] == features
    original = assembled(stage_inputs)
    torch.testing.assert_close(loaded.prefix, original.prefix)
    for key, value in original.image_projector.state_dict().items():
        torch.testing.assert_close(loaded.image_projector.state_dict()[key], value)
        assert not torch.equal(loaded.audio_projector.state_dict()[key], value)
    for key, value in original.audio_encoder.state_dict().items():
        torch.testing.assert_close(loaded.audio_encoder.state_dict()[key], value)


def test_bf16_model_trains_float32_projector_weights(stage_inputs, tmp_path):
    from dalipipe.models.assemble import load_captioner

    captioner = load_captioner(
        stage_inputs["captioner_path"],
        None,
        encoder_dir=stage_inputs["encoder_dir"],
        device=torch.device("cpu"),
        dtype=torch.bfloat16,
    )
    start = {k: v.float().clone() for k, v in captioner.audio_projector.state_dict().items()}
    examples = training_set(stage_inputs["pseudolabels"], stage_inputs["pool"], "audio")
    curve = fit_projector(
        captioner, examples, tmp_path / "ckpt", settings={**QUICK, "lr": 2e-4, "epochs": 1}
    )
    assert all(np.isfinite(c["loss"]) for c in curve)
    assert captioner.llava.lm_head.weight.dtype == torch.bfloat16
    for key, value in captioner.audio_projector.state_dict().items():
        assert value.dtype == torch.float32
        # a 2e-4 step is below bf16's resolution for weights of this size, not for float32
        assert not torch.equal(value, start[key])


@pytest.mark.parametrize(
    "memory",
    [{"micro_batch_size": 1}, {"micro_batch_size": 1, "activation_checkpointing": True}],
)
def test_accumulation_and_checkpointing_train_like_the_whole_batch(stage_inputs, tmp_path, memory):
    examples = training_set(stage_inputs["pseudolabels"], stage_inputs["pool"], "audio")

    def fit(settings, name):
        captioner = assembled(stage_inputs)
        curve = fit_projector(captioner, examples, tmp_path / name, settings=settings)
        return curve, {k: v.clone() for k, v in captioner.audio_projector.state_dict().items()}

    assert_trains_like_the_whole_batch(fit, QUICK, memory)
    with pytest.raises(ValueError, match=r"distill\.micro_batch_size=3 does not divide distill\."):
        fit({**QUICK, "micro_batch_size": 3}, "refused")


def test_a_run_killed_for_memory_resumes_with_smaller_micro_batches(
    stage_inputs, tmp_path, monkeypatch
):
    """micro_batch_size and activation_checkpointing change memory, not the training: a changed
    value resumes the checkpoint (up to rounding) instead of starting afresh."""
    examples, reference, reference_curve = uninterrupted(stage_inputs, tmp_path)
    killed_in_step_3(stage_inputs, examples, tmp_path / "run.ckpt", monkeypatch)
    assert training.TrainCheckpoint(tmp_path / "run.ckpt").load()["step"] == 3

    resumed = assembled(stage_inputs)
    smaller = {**QUICK, "micro_batch_size": 1, "activation_checkpointing": True}
    calls = {"n": 0}
    real_resumed = resumed.caption_loss

    def counted(**kwargs):
        calls["n"] += 1
        return real_resumed(**kwargs)

    monkeypatch.setattr(resumed, "caption_loss", counted)
    curve = fit_projector(resumed, examples, tmp_path / "run.ckpt", settings=smaller)
    assert calls["n"] == 1  # only step 4 ran (its 1 clip: the 3 clips' second step)
    assert_resumed_like(resumed, curve, reference, reference_curve, atol=1e-5)
