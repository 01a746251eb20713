"""The align stage on tiny models and tiny shards: pytest tests/test_align.py -x -q

The resume test kills a real `dalipipe align` process with SIGTERM after its first checkpoint,
reruns it, and expects bit-identical weights to an uninterrupted run.
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dalipipe.align.train import Run, align, augment, batched, method_settings, step_generator
from tests.support.runs import params_for, run_align
from tests.support.shards import make_clips, write_shard


def test_settings_merge_defaults_config_and_per_method():
    s = method_settings(
        {"epochs": 20, "per_method": {"mmd": {"epochs": 30}}, "ot": {"solver": "sinkhorn"}}, "mmd"
    )
    # the schema's defaults (the miniature's), then the config, then per_method
    assert s["epochs"] == 30 and s["betas"] == [0.95, 0.999] and s["lr"] == 1e-3
    assert s["ot"] == {
        "solver": "sinkhorn",
        "eps": 0.05,
        "iters": 50,
        "workers": 2,
        "pool": "thread",
        "target_eps": 0.001,
        "eps_start": 1.0,
        "eps_decay": 0.5,
        "tol": 0.001,
        "check_every": 10,
        "max_iters": 2000,
        "rounding": True,
        "gap_tol": 0.05,
    }
    assert (
        method_settings({"epochs": 20, "per_method": {"mmd": {"epochs": 30}}}, "ot")["epochs"] == 20
    )
    with pytest.raises(ValueError, match="unknown keys \\['epoch'\\]"):
        method_settings({"epoch": 3}, "ot")
    with pytest.raises(ValueError, match="--method: unknown 'emd'"):
        method_settings({}, "emd")


def test_training_drops_the_last_partial_batch_validation_keeps_it():
    assert list(batched(range(10), 4)) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert list(batched(range(10), 4, drop_last=False))[-1] == [8, 9]
    assert list(batched(range(3), 4, drop_last=False)) == [[0, 1, 2]]


def test_augment_is_a_per_clip_roll_plus_bounded_noise():
    x = torch.arange(2 * 6 * 3, dtype=torch.float32).reshape(2, 6, 3)
    shifted = augment(x, step_generator(0, 1, 0, 0), noise=False, time_shift=True)
    shifts = torch.randint(-6, 6, (2, 1), generator=step_generator(0, 1, 0, 0))
    for i in range(2):
        assert torch.equal(shifted[i], torch.roll(x[i], int(shifts[i]), dims=0))
    noisy = augment(x, step_generator(0, 1, 0, 0), noise=True, time_shift=False) - x
    assert noisy.min() >= 0 and noisy.max() < 0.1
    # one amplitude per clip: the spread of each clip's noise differs
    assert not torch.isclose(noisy[0].max(), noisy[1].max())


def test_mmd_run_writes_encoder_curve_and_summary(align_world, tmp_path):
    from dalipipe.models.cavmae import load_encoder

    out = tmp_path / "align" / "mmd"
    summary = run_align(align_world, "mmd", out)
    assert sorted(p.name for p in out.iterdir()) == [
        "audio_encoder.json",
        "audio_encoder.safetensors",
        "curve.csv",
        "summary.json",
    ]
    assert not (tmp_path / "align" / "mmd.ckpt").exists()
    rows = list(csv.DictReader(open(out / "curve.csv")))
    assert [float(r["lr"]) for r in rows] == [1e-3, 1e-3, 5e-4]  # halved at milestone 2
    assert [int(r["step"]) for r in rows] == [6, 12, 18]  # 24 clips / batch 4, three epochs
    assert summary["steps"] == 18 and summary["clips_seen"] == 72 and summary["solver"] is None
    assert json.loads((out / "summary.json").read_text())["method"] == "mmd"
    assert float(rows[-1]["train_mmd"]) < float(rows[0]["train_mmd"])
    encoder = load_encoder(out)
    assert encoder.config.out_dim == 32 and encoder.config.target_length == 64


def test_decoded_clips_cached_between_epochs_give_the_same_weights(align_world, tmp_path):
    from safetensors.torch import load_file

    runs = {}
    for cache_gb, cached in ((0, 0), (1.0, 24)):  # the world's 24 training clips
        out = tmp_path / f"cache{cache_gb}"
        assert run_align(align_world, "mmd", out, clip_cache_gb=cache_gb)["clips_cached"] == cached
        runs[cache_gb] = load_file(out / "audio_encoder.safetensors")
    assert runs[0].keys() == runs[1.0].keys()
    assert all(torch.equal(runs[0][k], runs[1.0][k]) for k in runs[0])


def test_ot_in_bf16_skips_broken_clips_and_records_the_solver(align_world, tmp_path, caplog):
    train = tmp_path / "train"
    train.mkdir()
    for tar in (align_world["root"] / "train").glob("*.tar"):
        (train / tar.name).symlink_to(tar)
    rng = np.random.default_rng(1)
    extra = make_clips(rng, "extra", 4)
    nan_fbank = extra[0][2].copy()
    nan_fbank[3, 3] = np.nan
    extra[0] = (extra[0][0], extra[0][1], nan_fbank)
    extra[1] = (extra[1][0], extra[1][1], extra[1][2][:40])  # too short
    write_shard(train / "align-000002.tar", extra)
    files = sorted(p.name for p in train.glob("*.tar"))
    (train / "index.json").write_text(json.dumps({"shards": [{"file": f} for f in files]}))

    settings = {
        "epochs": 1,
        "precision": "bf16",
        "ot": {"solver": "sinkhorn", "eps": 0.1, "iters": 20},
    }
    summary = align(
        params_for(**settings),
        "ot",
        train,
        align_world["root"] / "val",
        align_world["llava"],
        tmp_path / "ot",
    )
    assert summary["solver"] == {"solver": "sinkhorn", "eps": 0.1, "iters": 20}
    # 26 usable clips make 6 batches of 4; had the 2 broken ones been kept, 28 would make 7
    assert summary["steps"] == 6 and np.isfinite(summary["final_val_loss"])
    assert "extra-000 skipped: non-finite fbank values" in caplog.text
    assert "extra-001 skipped: fbank shape (40, 32), expected (64, 32)" in caplog.text


def test_ot_att_scorer_is_frozen_in_the_first_epoch_then_trained(align_world, tmp_path):
    r = align_world["root"]

    def scorer_after(epochs):
        run = Run(
            params_for(epochs=epochs),
            "ot_att",
            r / "train",
            r / "val",
            align_world["llava"],
            tmp_path / f"e{epochs}",
        )
        start = {k: v.clone() for k, v in run.scorer.state_dict().items()}
        encoder_start = run.encoder.proj.weight.clone()
        run.train()
        assert not torch.equal(run.encoder.proj.weight, encoder_start)
        return start, run.scorer.state_dict()

    start, after_one = scorer_after(1)
    assert all(torch.equal(start[k], after_one[k]) for k in start)
    start, after_two = scorer_after(2)
    assert not torch.equal(start["a_q.weight"], after_two["a_q.weight"])


@pytest.mark.slow
def test_sigterm_then_rerun_ends_with_the_same_weights(align_world, tmp_path):
    reference = tmp_path / "uninterrupted"
    # a cache of ~50 kB holds the tokens of part of the clips only: the rest are computed again
    run_align(align_world, "ot_att", reference, image_token_cache_gb=5e-5)

    out = tmp_path / "interrupted"
    r = align_world["root"]
    command = [
        sys.executable,
        "-m",
        "dalipipe.cli",
        "align",
        "--params",
        json.dumps(params_for(image_token_cache_gb=5e-5)),
        "--method",
        "ot_att",
        "--shards",
        str(r / "train"),
        "--val-shards",
        str(r / "val"),
        "--captioner",
        str(align_world["llava"]),
        "--out",
        str(out),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    job = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    state = tmp_path / "interrupted.ckpt" / "latest" / "state.json"
    deadline = time.time() + 300
    while not state.exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    job.send_signal(signal.SIGTERM)
    log = job.communicate(timeout=300)[0].decode()
    assert job.returncode == 143, log
    assert "SIGTERM: checkpoint saved" in log and not out.exists()
    saved = json.loads(state.read_text())
    steps = [v for k, v in saved["__dict__"][0][1]["__dict__"] if k == "step"]
    assert 0 < steps[0] < 18

    run_align(align_world, "ot_att", out, image_token_cache_gb=5e-5)  # resumes from the checkpoint
    expected = load_file(reference / "audio_encoder.safetensors")
    got = load_file(out / "audio_encoder.safetensors")
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key

    def losses(directory):
        return [
            {k: v for k, v in row.items() if k != "seconds"}
            for row in csv.DictReader(open(directory / "curve.csv"))
        ]

    assert losses(out) == losses(reference)


def test_a_batch_above_the_pool_is_capped_at_it_and_logged(align_world, tmp_path, caplog):
    """The shards' index counts 24 clips: align.batch_size 100 trains in batches of 24."""
    train = tmp_path / "train"
    train.mkdir()
    entries = []
    for tar, count in (("align-000000.tar", 12), ("align-000001.tar", 12)):
        (train / tar).symlink_to(align_world["root"] / "train" / tar)
        entries.append({"file": tar, "count": count})
    (train / "index.json").write_text(json.dumps({"total": 24, "shards": entries}))
    out = tmp_path / "mmd"
    with caplog.at_level("WARNING", logger="dalipipe.align.train"):
        summary = align(
            params_for(batch_size=100, epochs=2), "mmd", train, align_world["root"] / "val",
            align_world["llava"], out,
        )  # fmt: skip
    assert summary["batch_size"] == 24 and summary["steps"] == 2 and summary["clips_seen"] == 48
    assert summary["final_train_loss"] is not None
    assert (
        "align.batch_size 100 is above the 24 clips per process of "
        f"{train} (24 clips, 1 process(es)): batches of 24"
    ) in caplog.text


def test_an_epoch_without_a_full_batch_stops_the_stage_leaving_no_encoder(align_world, tmp_path):
    """The test world's index does not count its clips, so nothing caps the batch: 24 clips
    and batches of 100 would make no step, and the stage says so instead of saving an
    untrained encoder."""
    out = tmp_path / "align" / "mmd"
    with pytest.raises(ValueError) as error:
        run_align(align_world, "mmd", out, batch_size=100, epochs=2)
    assert str(error.value) == (
        f"align.batch_size 100: epoch 1 made no step: 24 usable clip(s) of "
        f"{align_world['root'] / 'train'} reached this process (one of 1), fewer than one batch; "
        "lower align.batch_size or add clips"
    )
    assert not out.exists() and not out.with_name("mmd.ckpt").exists()
