"""Two runs with the same seed give the same results, byte for byte.

    pytest tests/test_determinism.py -m slow     # ~5 min on 2 cores

The CI preset (configs/ci.yaml: every stage, on a tiny world) runs twice from empty directories;
every trained weight, caption, pseudo-label, shard and score must be the same in both; only
wall-clock fields (`seconds` in curves and summaries) may differ.
The second run is killed with SIGKILL (Snakemake and its jobs) once an alignment has written a
checkpoint, then unlocked and run again with the same command: the comparisons show that the
resumed run ends where the uninterrupted one did (docs/reliability.md, "After a killed run").
The world is encoded losslessly (world.lossless_video, the default): with x264's lossy encoding
a few clips now and then decode differently from run to run (docs/miniature.md, "Same seed, same table").
"""

import csv
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Artifacts that are the result: weights, data, captions, pseudo-labels, scores and summaries.
COMPARED = ("*.safetensors", "*.jsonl", "*.tar", "table.csv", "*.json")


def without_time(value):
    """A JSON value less its wall-clock fields (`seconds`), which may differ between runs."""
    if isinstance(value, dict):
        return {k: without_time(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [without_time(v) for v in value]
    return value


def digests(results: Path) -> dict[str, str]:
    files = {p for pattern in COMPARED for p in results.rglob(pattern)}
    # <stage>/part-<i>.work/ are resumable journals (they record the models' file times)
    files = sorted(p for p in files if not any(part.endswith(".work") for part in p.parts))
    found = {}
    for path in files:
        content = path.read_bytes()
        if path.suffix == ".json":
            content = json.dumps(without_time(json.loads(content)), sort_keys=True).encode()
        found[str(path.relative_to(results))] = hashlib.sha256(content).hexdigest()
    return found


def curve_without_time(path: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(open(path))]


def workflow_in(workdir: Path) -> list[str]:
    """The arguments of both runs: the CI preset in ``workdir``, after its copy of config.yaml."""
    (workdir / "config.yaml").write_text((REPO / "config.yaml").read_text())
    return [str(workdir), "--configfile", str(REPO / "configs" / "ci.yaml")]


def kill_at_first_checkpoint(workdir: Path, timeout: int = 1800) -> str:
    """Start the workflow in its own process group, SIGKILL the whole group (Snakemake and every
    job) once an alignment has written a checkpoint; returns that alignment's method."""
    command = [sys.executable, "-m", "snakemake", "--cores", "2", "-s", str(REPO / "Snakefile")]
    command += ["-d", *workflow_in(workdir)]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    output = workdir / "killed-run.out"
    with open(output, "w") as out:
        run = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    align = workdir / "results" / "ci" / "align"
    deadline = time.time() + timeout
    checkpoints = []
    while not checkpoints and run.poll() is None and time.time() < deadline:
        time.sleep(0.05)
        checkpoints = sorted(align.glob("*.ckpt/latest/state.json"))
    try:
        os.killpg(run.pid, signal.SIGKILL)  # no handler runs, in Snakemake or in its jobs
    except ProcessLookupError:  # the run ended first: the assertion below says so
        pass
    run.wait(timeout=60)
    assert checkpoints, (
        f"no alignment checkpoint before the run ended:\n{output.read_text()[-5000:]}"
    )
    method = checkpoints[0].parents[1].name.removesuffix(".ckpt")
    assert not (align / method).exists(), "the killed job left an output that looks finished"
    return method


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, snakemake_in) -> dict:
    """The first run uninterrupted; the second killed, unlocked and run again to its end."""
    first, second = tmp_path_factory.mktemp("first"), tmp_path_factory.mktemp("second")
    snakemake_in(*workflow_in(first), timeout=1800)
    killed = kill_at_first_checkpoint(second)
    snakemake_in(*workflow_in(second), "--unlock")  # a SIGKILLed Snakemake leaves its lock
    snakemake_in(*workflow_in(second), timeout=1800)  # the same command again
    return {
        "runs": [first / "results" / "ci", second / "results" / "ci"],
        "killed": killed,
        "second": second,
    }


@pytest.mark.slow
def test_two_runs_write_the_same_artifacts(two_runs):
    first, second = (digests(run) for run in two_runs["runs"])
    # every kind of result is among those compared, so an empty match cannot pass
    for expected in (
        "models/llava/model.safetensors",
        "align/ot/audio_encoder.safetensors",
        "prefix/prefix.safetensors",
        "distill/mmd/audio_projector.safetensors",
        "pseudolabel/ot.jsonl",
        "table.csv",
        "evaluate/miniature/ot_audio.json",
    ):
        assert expected in first, expected
    assert first.keys() == second.keys()
    differing = sorted(name for name in first if first[name] != second[name])
    assert not differing, differing


@pytest.mark.slow
def test_training_curves_agree_except_wall_clock(two_runs):
    first, second = two_runs["runs"]
    curves = sorted(first.rglob("curve.csv"))
    # bootstrap, prefix, and align + distill for each of the preset's two methods
    assert len(curves) == 6, curves
    for curve in curves:
        twin = second / curve.relative_to(first)
        assert curve_without_time(curve) == curve_without_time(twin), curve


@pytest.mark.slow
def test_the_killed_alignment_resumed_from_its_checkpoint(two_runs):
    method, second = two_runs["killed"], two_runs["second"]
    # the rerun's log (the killed run's is overwritten): resumed mid-training, not started afresh
    log = (second / "logs" / "ci" / "align" / f"{method}.log").read_text()
    resumed = re.findall(r"resuming from \S+ \(step (\d+)\)", log)
    assert len(resumed) == 1, log[-3000:]
    curve = list(csv.DictReader(open(two_runs["runs"][1] / "align" / method / "curve.csv")))
    assert 0 < int(resumed[0]) < int(curve[-1]["step"]), (resumed, curve[-1])
    assert not (second / "results" / "ci" / "align" / f"{method}.ckpt").exists()
