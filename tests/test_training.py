"""Checkpoint round trips and the SIGTERM flag: pytest tests/test_training.py -x -q"""

import os
import random
import signal

import numpy as np
import pytest
import torch

from dalipipe.training import TrainCheckpoint, catch_sigterm, clear_sigterm, sigterm_requested


def test_round_trip_restores_model_optimizer_scheduler_and_rng(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.95, 0.999), weight_decay=5e-7)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[1, 2], gamma=0.5)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
        sched.step()
    ckpt = TrainCheckpoint(tmp_path / "out.ckpt")
    assert ckpt.load() is None
    ckpt.save(
        {
            "model": model.state_dict(),
            "opt": opt.state_dict(),
            "sched": sched.state_dict(),
            "progress": {"epoch": 2, "losses": [0.5, 0.25], "name": "ot"},
        },
        step=3,
    )
    expected_draws = (random.random(), np.random.rand(), torch.rand(2))

    states = ckpt.load()
    assert states["step"] == 3 and states["progress"] == {
        "epoch": 2,
        "losses": [0.5, 0.25],
        "name": "ot",
    }
    assert (random.random(), np.random.rand()) == expected_draws[:2]
    assert torch.equal(torch.rand(2), expected_draws[2])

    fresh = torch.nn.Linear(4, 3)
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=1e-2)
    fresh_sched = torch.optim.lr_scheduler.MultiStepLR(fresh_opt, milestones=[5], gamma=0.1)
    fresh.load_state_dict(states["model"])
    fresh_opt.load_state_dict(states["opt"])
    fresh_sched.load_state_dict(states["sched"])
    assert fresh_opt.param_groups[0]["betas"] == (0.95, 0.999)
    assert fresh_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == 2.5e-3
    # One more identical step on both gives bit-identical weights.
    x = torch.randn(5, 4)
    for m, o in ((model, opt), (fresh, fresh_opt)):
        o.zero_grad()
        m(x).pow(2).sum().backward()
        o.step()
    assert torch.equal(model.weight, fresh.weight) and torch.equal(model.bias, fresh.bias)


def test_unsupported_value_is_named(tmp_path):
    with pytest.raises(TypeError, match="type object"):
        TrainCheckpoint(tmp_path / "c").save({"bad": object()}, step=0)
    assert not TrainCheckpoint(tmp_path / "c").exists()


def test_sigterm_sets_the_flag_instead_of_killing():
    previous = signal.getsignal(signal.SIGTERM)
    try:
        catch_sigterm()
        assert not sigterm_requested()
        os.kill(os.getpid(), signal.SIGTERM)
        assert sigterm_requested()
        TrainCheckpoint("unused")  # creating a checkpoint re-installs the handler, keeps the flag
        assert sigterm_requested()
    finally:
        clear_sigterm()
        signal.signal(signal.SIGTERM, previous)
    assert not sigterm_requested()


def test_a_checkpoint_written_under_other_settings_is_not_resumed(tmp_path):
    TrainCheckpoint(tmp_path / "ckpt", settings={"lr": 1e-3}).save({"w": torch.ones(2)}, step=7)
    assert TrainCheckpoint(tmp_path / "ckpt", settings={"lr": 1e-3}).load()["step"] == 7
    assert TrainCheckpoint(tmp_path / "ckpt", settings={"lr": 2e-3}).load() is None
    assert not (tmp_path / "ckpt").exists()  # the stale checkpoint is gone
