"""What the training-stage tests share (prefix, pseudolabel, distill): the captioner those stages
start from, a SIGTERM sent from inside a training step, and the check that gradient accumulation
or checkpointing trains exactly like the whole batch."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook


def assembled(stage_inputs):
    """The captioner pseudolabel and distill start from (float32, CPU): a stage_inputs fixture's
    base captioner, aligned encoder and prefix (tests/test_pseudolabel.py, test_distill.py)."""
    from dalipipe.models.assemble import load_captioner

    return load_captioner(
        stage_inputs["captioner_path"],
        None,
        encoder_dir=stage_inputs["encoder_dir"],
        prefix_dir=stage_inputs["prefix_dir"],
        device=torch.device("cpu"),
        dtype=torch.float32,
    )


def sigterm_in_loss_call(monkeypatch, captioner, n: int) -> None:
    """Make `captioner`'s n-th caption_loss call send this process SIGTERM (as a scheduler that
    preempts the job does), with the training loop's flag cleared before the run."""
    import dalipipe.training as training

    calls = {"n": 0}
    real_loss = captioner.caption_loss

    def loss_then_sigterm(**kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_loss(**kwargs)

    monkeypatch.setattr(captioner, "caption_loss", loss_then_sigterm)
    monkeypatch.setitem(training._sigterm, "requested", False)


def with_first_step_gradients(fit):
    """Run `fit()`; returns (its result, the gradients the optimizer's first step received)."""
    seen = []

    def hook(optimizer, args, kwargs):
        if not seen:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            seen.append([p.grad.detach().clone() for p in params])

    handle = register_optimizer_step_pre_hook(hook)
    try:
        result = fit()
    finally:
        handle.remove()
    return result, seen[0]


def assert_trains_like_the_whole_batch(fit, settings: dict, memory: dict) -> None:
    """`fit(settings, name)` trains a fresh captioner under checkpoint dir `name` and returns
    (its curve, its trained tensors by name); with the `memory` settings laid over `settings`,
    the first step's gradients, the curve and the trained tensors are the whole batch's."""
    (curve, trained), grads = with_first_step_gradients(lambda: fit(settings, "whole"))
    (other, other_trained), other_grads = with_first_step_gradients(
        lambda: fit({**settings, **memory}, "memory")
    )
    for a, b in zip(other_grads, grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert [c["loss"] for c in other] == pytest.approx([c["loss"] for c in curve], abs=1e-5)
    for key, value in trained.items():
        torch.testing.assert_close(other_trained[key], value, rtol=0, atol=1e-5)
