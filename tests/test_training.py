"""Checkpoint round trips, the SIGTERM flag and the training loop: pytest tests/test_training.py"""

import os
import random
import signal

import numpy as np
import pytest
import torch

from dalipipe.training import (
    PREEMPTED_EXIT_CODE,
    TrainCheckpoint,
    TrainLoop,
    catch_sigterm,
    clear_sigterm,
    sigterm_requested,
    write_curve,
)


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


def test_an_align_checkpoint_from_before_stored_settings_is_checked_by_its_fingerprint(tmp_path):
    TrainCheckpoint(tmp_path / "ckpt").save({"fingerprint": "0123abcd", "w": torch.ones(1)}, step=4)
    assert TrainCheckpoint(tmp_path / "ckpt", settings="0123abcd").load()["step"] == 4
    assert TrainCheckpoint(tmp_path / "ckpt", settings="0123abce").load() is None


def toy_run(directory, kill_at=None):
    """Six steps of a linear model on random batches (global RNG), checkpointed every 4."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    seen = {"batches": 0}
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "seen": seen}
    loop = TrainLoop(directory, state, settings={"lr": 0.1}, checkpoint_every=4)
    loop.resume()

    def step(index):
        if index == kill_at:
            os.kill(os.getpid(), signal.SIGTERM)
        seen["batches"] += 1
        loss = model(torch.randn(4, 3)).pow(2).mean()
        loss.backward()
        return {"epoch": index // 2 + 1, "loss": loss.detach()}

    return loop.fit(step, 6, optimizer=optimizer, scheduler=scheduler), model, seen


def test_a_loop_killed_by_sigterm_resumes_to_the_uninterrupted_run(tmp_path, monkeypatch):
    import dalipipe.training as training

    curve, model, seen = toy_run(tmp_path / "straight")
    assert [row["step"] for row in curve] == [1, 2, 3, 4, 5, 6] and seen == {"batches": 6}
    assert list(curve[0]) == ["step", "epoch", "loss", "lr"] and curve[2]["lr"] == 0.05
    assert TrainCheckpoint(tmp_path / "straight").load()["step"] == 4

    catch_sigterm()
    monkeypatch.setitem(training._sigterm, "requested", False)
    with pytest.raises(SystemExit) as stop:
        toy_run(tmp_path / "killed", kill_at=2)
    assert stop.value.code == PREEMPTED_EXIT_CODE
    assert TrainCheckpoint(tmp_path / "killed").load()["step"] == 3
    monkeypatch.setitem(training._sigterm, "requested", False)
    resumed, resumed_model, resumed_seen = toy_run(tmp_path / "killed")
    assert resumed == curve and resumed_seen == seen
    assert torch.equal(resumed_model.weight, model.weight)

    write_curve(tmp_path / "curve.csv", curve)
    lines = (tmp_path / "curve.csv").read_text().splitlines()
    assert lines[0] == "step,epoch,loss,lr" and lines[3].startswith("3,2,")


def test_a_loop_with_no_step_to_run_stops_before_any_checkpoint(tmp_path):
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    loop = TrainLoop(tmp_path / "ckpt", {"model": model}, settings={}, checkpoint_every=1)
    with pytest.raises(ValueError) as error:
        loop.fit(lambda index: {"loss": torch.zeros(())}, 0, optimizer=optimizer, desc="prefix")
    assert str(error.value) == "prefix: 0 optimizer steps to run, nothing to train on"
    assert loop.curve == [] and not (tmp_path / "ckpt").exists()
