"""The workflow on a real Slurm cluster, through the repository's profile (`--profile slurm`).

    bash ci/start-slurm.sh                      # a one-node cluster on this machine (root)
    pytest tests/test_slurm.py -x -q            # about 10 minutes on 2 cores
    bash ci/start-slurm.sh stop

Skipped when `sinfo` is missing or fails. The tests run in order on one copy of the workflow in
a temporary directory: the CI miniature (`configs/ci.yaml`) end to end, a partial rerun
(`--forcerun align`), an alignment job cancelled mid-training that resumes on rerun, the same
recovered by `--retries` with larger resources, and one alignment run under accelerate with two
processes. Every Snakemake call runs under `timeout -k 10` (a stuck Snakemake ignores SIGTERM)
and is followed by `--unlock` when it was killed. The profile's site limits (environment) keep
each job to 1 CPU and 3 GB so that two jobs share the two cores, and to no GPU.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dalipipe.config import load_config
from tests.support.slurm import (
    SLURM_SNAKEMAKE,
    cluster,
    explain,
    job_env,
    job_info,
    slurm_jobs,
)
from tests.support.snakemake import snakemake as run_snakemake
from tests.support.snakemake import snakemake_command

REPO = Path(__file__).resolve().parents[1]
RUN_DIR = "results/ci"  # configs/ci.yaml: run: ci
METHOD = "mmd"  # the alignment method the kill/resume tests use
ALIGN_OUT = f"{RUN_DIR}/align/{METHOD}"
CKPT = f"{ALIGN_OUT}.ckpt"


# The CI preset: test config, fast status polling, small jobs on the one test node.
CI_ARGS = [
    "--profile", "slurm",
    "--configfile", "configs/ci.yaml",
    "--jobs", "4",
    "--latency-wait", "5",
    "--slurm-init-seconds-before-status-checks", "1",
    "--retries", "0",
]  # fmt: skip
# The cancel tests' alignment. The CI preset's 24 MMD steps take half a second on a 2-core Intel
# Xeon, less than the tests' polling, so a cancel could miss the job; these tests train 100 epochs
# (400 steps) instead and compare with an uninterrupted run of the same settings.
LONG_ALIGN = "long-align.yaml"  # written into the work directory, laid over configs/ci.yaml
LONG_ALIGN_CONFIG = {"align": {"per_method": {METHOD: {"epochs": 100, "lr_milestones": [4]}}}}
_AFTER_CI = CI_ARGS.index("configs/ci.yaml") + 1
LONG_ARGS = [*CI_ARGS[:_AFTER_CI], LONG_ALIGN, *CI_ARGS[_AFTER_CI:]]
CI_ENV = {
    "DALIPIPE_SLURM_MAX_CPUS": "1",
    "DALIPIPE_SLURM_MAX_MEM_MB": "3000",
    "DALIPIPE_SLURM_MAX_GPUS": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


def snakemake(
    workdir: Path, *args: str, limit: int = 600, preset: list[str] = CI_ARGS
) -> subprocess.CompletedProcess:
    """Snakemake with the CI preset, under `limit` (a killed run's directory is unlocked)."""
    return run_snakemake(
        *args, cwd=workdir, env=job_env(**CI_ENV), limit=limit, preset=preset,
        program=SLURM_SNAKEMAKE,
    )  # fmt: skip


def minutes(limit: str) -> int:
    """Slurm's time limit ([D-]HH:MM:SS) in minutes."""
    days, _, clock = limit.rpartition("-")
    h, m, s = (int(x) for x in clock.split(":"))
    return int(days or 0) * 1440 + h * 60 + m + (1 if s else 0)


def rules_in_plan(workdir: Path, *args: str) -> set[str]:
    """The rules a dry run with these arguments would run."""
    # targets first: options such as --forcerun take every word that follows them
    result = snakemake(workdir, *args, "-n", "--quiet", "rules", limit=120)
    assert result.returncode == 0, explain(result)
    text = result.stdout + result.stderr
    block = text.split("Job stats:", 1)[-1] if "Job stats:" in text else text
    return {m for m in re.findall(r"^(\w+)\s+\d+\s*$", block, re.M) if m != "total"}


def running_align_job(method: str) -> int | None:
    out = subprocess.run(
        ["squeue", "-h", "-t", "R", "-o", "%i %k"], capture_output=True, text=True, timeout=30
    ).stdout
    for line in out.splitlines():
        job_id, _, comment = line.partition(" ")
        if comment.startswith("rule_align_") and comment.endswith(method):
            return int(job_id)
    return None


def wait_for_checkpoint_then_cancel(workdir: Path, proc: subprocess.Popen, limit: float) -> int:
    """Once the running align job has written a checkpoint, scancel it; return its job id."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and proc.poll() is None:
        job_id = running_align_job(METHOD)
        if job_id is not None and any((workdir / CKPT).rglob("state.json")):
            subprocess.run(["scancel", str(job_id)], check=True, timeout=30)
            return job_id
        time.sleep(0.5)
    raise AssertionError(
        f"no checkpoint of a running align job within {limit} s (exit {proc.poll()})"
    )


def read_encoder(directory: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(directory / "audio_encoder.safetensors")


def assert_same_weights(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A copy of the workflow (not of results or caches), run as a user would, from its root.

    DALIPIPE_SLURM_TEST_WORKDIR=DIR works in DIR instead (copied there if it does not exist,
    kept afterwards), so a later session can rerun single tests on a finished run.
    """
    if os.environ.get("DALIPIPE_SLURM_TEST_WORKDIR"):
        root = Path(os.environ["DALIPIPE_SLURM_TEST_WORKDIR"])
        if root.exists():
            return root
    else:
        root = tmp_path_factory.mktemp("slurm") / "dalipipe"
    skip = shutil.ignore_patterns(
        ".git", ".venv", "results", "logs", ".snakemake", "test-artifacts", "__pycache__",
        ".pytest_cache", ".ruff_cache", "*.egg-info", "tests", "bench",
    )  # fmt: skip
    shutil.copytree(REPO, root, ignore=skip)
    (root / "slurm" / "site.yaml").unlink(missing_ok=True)  # site settings come from CI_ENV
    return root


@pytest.fixture(scope="module")
def ci_run(workdir) -> dict:
    """The whole CI miniature through Slurm; returns its plan, Slurm jobs and align weights."""
    planned = rules_in_plan(workdir)
    started = time.monotonic()
    result = snakemake(workdir, limit=1200)
    assert result.returncode == 0, explain(result)
    return {
        "planned": planned,
        "jobs": slurm_jobs(workdir),
        "weights": read_encoder(workdir / ALIGN_OUT),
        "seconds": time.monotonic() - started,
    }


@pytest.fixture(scope="module")
def long_align(workdir, ci_run) -> dict:
    """The cancel tests' alignment run uninterrupted; its weights."""
    import yaml

    (workdir / LONG_ALIGN).write_text(yaml.safe_dump(LONG_ALIGN_CONFIG))
    result = snakemake(workdir, ALIGN_OUT, "--forcerun", "align", preset=LONG_ARGS)
    assert result.returncode == 0, explain(result)
    summary = json.loads((workdir / ALIGN_OUT / "summary.json").read_text())
    assert summary["steps"] == 400, summary  # the preset was laid over configs/ci.yaml
    return read_encoder(workdir / ALIGN_OUT)


@cluster
def test_every_rule_ran_as_a_completed_slurm_job(workdir, ci_run):
    jobs = ci_run["jobs"]
    assert jobs, "no Slurm job logs under logs/slurm"
    for job_id in jobs:
        assert job_info(job_id).get("JobState") == "COMPLETED", (job_id, jobs[job_id])
    # every planned job went through Slurm, except `all` (no command: Snakemake itself runs it)
    assert set(jobs.values()) == ci_run["planned"] - {"all"}
    assert {"acquire_synthetic", "filter_part", "align", "distill", "evaluate"} <= ci_run["planned"]
    # nothing is left to do: the workflow's targets all exist
    assert rules_in_plan(workdir) == set()


@cluster
def test_profile_resources_reach_sbatch(ci_run):
    """align asks the profile's 48 h (attempt 1) and is capped to the site's 1 CPU, 3 GB, 0 GPU."""
    align_jobs = [j for j, rule in ci_run["jobs"].items() if rule == "align"]
    info = job_info(align_jobs[0])
    assert minutes(info["TimeLimit"]) == 48 * 60
    assert info["NumCPUs"] == "1"
    assert "mem=3000M" in info["TRES"]
    assert "gres/gpu" not in info["TRES"]


@cluster
def test_forcerun_align_reruns_align_and_downstream_only(workdir, ci_run):
    """`--forcerun align` toward one pseudo-label file: align and pseudolabel run, nothing else."""
    target = f"{RUN_DIR}/pseudolabel/{METHOD}.jsonl"
    planned = rules_in_plan(workdir, target, "--forcerun", "align")
    assert planned == {"align", "pseudolabel"}, planned
    before = set(slurm_jobs(workdir))
    result = snakemake(workdir, target, "--forcerun", "align", limit=600)
    assert result.returncode == 0, explain(result)
    new = {job: rule for job, rule in slurm_jobs(workdir).items() if job not in before}
    assert sorted(new.values()) == ["align", "pseudolabel"], new
    for job in new:
        assert job_info(job)["JobState"] == "COMPLETED"
    # the same seed and data give the same encoder again
    assert_same_weights(read_encoder(workdir / ALIGN_OUT), ci_run["weights"])
    # what follows is now out of date, and a plain run would redo it
    assert {"distill", "evaluate"} <= rules_in_plan(workdir)


@cluster
def test_cancelled_training_job_resumes_on_rerun(workdir, long_align):
    log_path = workdir / "logs" / "ci" / "align" / f"{METHOD}.log"  # logs/<run>/...
    target = ALIGN_OUT
    proc = subprocess.Popen(
        snakemake_command(
            target, "--forcerun", "align", limit=300, preset=LONG_ARGS, program=SLURM_SNAKEMAKE
        ),
        cwd=workdir, env=job_env(**CI_ENV), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    job_id = wait_for_checkpoint_then_cancel(workdir, proc, limit=240)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, output[-4000:]
    assert job_info(job_id)["JobState"] == "CANCELLED"
    killed_log = log_path.read_text()
    assert re.search(r"SIGTERM: checkpoint saved at step \d+", killed_log), killed_log[-3000:]
    assert not (workdir / target).exists()  # no half-written output

    result = snakemake(workdir, target, limit=300, preset=LONG_ARGS)
    assert result.returncode == 0, explain(result)
    resumed_log = log_path.read_text()
    step = int(re.search(r"checkpoint saved at step (\d+)", killed_log).group(1))
    assert re.search(rf"resuming {METHOD} at .*\(step {step}\)", resumed_log), resumed_log[-3000:]
    assert not (workdir / CKPT).exists()
    # exact resume: the interrupted run ends with the weights of the uninterrupted one
    assert_same_weights(read_encoder(workdir / target), long_align)


@cluster
def test_retry_resumes_with_more_time(workdir, long_align):
    before = set(slurm_jobs(workdir))
    target = ALIGN_OUT
    proc = subprocess.Popen(
        snakemake_command(
            target, "--forcerun", "align", "--retries", "1",
            limit=400, preset=LONG_ARGS, program=SLURM_SNAKEMAKE,
        ),  # fmt: skip
        cwd=workdir, env=job_env(**CI_ENV), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    first = wait_for_checkpoint_then_cancel(workdir, proc, limit=240)
    output, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, output[-4000:]
    new = sorted(job for job, rule in slurm_jobs(workdir).items() if job not in before)
    assert len(new) == 2 and new[0] == first, (new, first)
    second = job_info(new[1])
    assert second["JobState"] == "COMPLETED"
    # attempt 2 asks for twice the time (the profile's `attempt`-scaled runtime)
    assert minutes(second["TimeLimit"]) == 2 * minutes(job_info(first)["TimeLimit"])
    assert "resuming" in (workdir / "logs" / "ci" / "align" / f"{METHOD}.log").read_text()
    assert_same_weights(read_encoder(workdir / target), long_align)


@cluster
def test_alignment_under_accelerate_with_two_processes(workdir, ci_run, tmp_path):
    """One Slurm job, two CPU processes: accelerate's multi-process launcher on a CPU node."""
    params = json.loads(
        subprocess.run(
            [sys.executable, "-c", ACCELERATE_PARAMS], cwd=workdir, capture_output=True,
            text=True, check=True,
        ).stdout
    )  # fmt: skip
    out = tmp_path / "align2"
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [
        "timeout", "-k", "10", "300",
        "srun", "-n1", "-c2", "--mem=3000", "-t", "10",
        str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "dalipipe.cli", "align", "--params", json.dumps(params), "--method", METHOD,
        "--shards", f"{RUN_DIR}/shards/align", "--val-shards", f"{RUN_DIR}/shards/test",
        "--captioner", f"{RUN_DIR}/models/llava", "--out", str(out),
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=workdir, env=job_env(**CI_ENV), capture_output=True, text=True)
    assert result.returncode == 0, explain(result)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2
    assert summary["device"].startswith("cpu")  # "cpu:0" under two processes
    assert (out / "audio_encoder.safetensors").stat().st_size > 0


# The align stage's parameters as the workflow passes them, with the device forced to the CPU
# (accelerate forms a two-process group on a CPU only when told to use the CPU).
ACCELERATE_PARAMS = """
import json
from dalipipe.config import load_config
config = load_config("configs/ci.yaml")  # config.yaml, the preset, the schema's defaults
print(json.dumps({"seed": config["seed"], "device": "cpu", "align": config["align"],
                  "models": config.get("models")}))
"""


# --- the profile itself (no cluster needed) -----------------------------------------------------


def profile(**env: str) -> dict:
    """slurm/config.yaml rendered as Snakemake renders it, with these environment variables."""
    import yte

    saved = dict(os.environ)
    try:
        for name in ("SLURM_PARTITION", "SLURM_GPU_PARTITION", "SLURM_ACCOUNT"):
            os.environ.pop(name, None)
        os.environ.update(env, DALIPIPE_SLURM_SITE=str(REPO / "slurm" / "no-site.yaml"))
        with open(REPO / "slurm" / "config.yaml") as f:
            return yte.process_yaml(f, require_use_yte=True)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def workflow_rules() -> dict[str, str]:
    """Rule name -> its text, for every rule in rules/*.smk."""
    rules = {}
    for path in sorted((REPO / "rules").glob("*.smk")):
        text = path.read_text()
        starts = list(re.finditer(r"^\s*rule (\w+):", text, re.M))
        for match, after in zip(starts, starts[1:] + [None]):
            rules[match.group(1)] = text[match.start() : after.start() if after else None]
    return rules


def test_profile_names_only_existing_rules():
    rendered = profile()
    named = set(rendered["set-resources"]) | set(rendered["set-threads"])
    assert named <= set(workflow_rules()), named - set(workflow_rules())


def test_gpu_rules_get_profile_resources():
    """A rule asking for a GPU must be listed, or the site's GPU limit could not apply to it."""
    listed = profile()["set-resources"]
    gpu_rules = {name for name, text in workflow_rules().items() if re.search(r"\bgpu\s*=", text)}
    assert gpu_rules <= set(listed), gpu_rules - set(listed)
    for name in gpu_rules:
        assert listed[name].get("gpu", 0) >= 1 or "gres" in listed[name], name


def test_profile_site_settings_from_environment():
    plain = profile()
    assert "slurm_partition" not in plain["default-resources"]
    assert plain["set-resources"]["align"]["gpu"] == 4
    assert plain["default-resources"]["mem_mb"] == "min(4000 * attempt, 1000000000)"
    site = profile(
        SLURM_PARTITION="cpu",
        SLURM_GPU_PARTITION="a100",
        SLURM_ACCOUNT="proj1",
        DALIPIPE_SLURM_GPU_REQUEST="gres",
        DALIPIPE_SLURM_MAX_GPUS="2",
        DALIPIPE_SLURM_MAX_CPUS="16",
        DALIPIPE_SLURM_MAX_MEM_MB="128000",
    )
    assert site["default-resources"]["slurm_partition"] == "cpu"
    assert site["default-resources"]["slurm_account"] == "proj1"
    align = site["set-resources"]["align"]
    assert align == {
        "slurm_partition": "a100",
        "gres": "gpu:2",
        "mem_mb": "min(256000 * attempt, 128000)",
        "runtime": "2880 * attempt",
    }
    assert site["set-threads"]["align"] == 16
    no_gpu = profile(DALIPIPE_SLURM_MAX_GPUS="0", SLURM_PARTITION="cpu", SLURM_GPU_PARTITION="g")
    assert no_gpu["set-resources"]["align"]["gpu"] == 0
    assert no_gpu["set-resources"]["align"]["slurm_partition"] == "cpu"


def test_profile_attempt_scaling_evaluates_as_snakemake_does():
    """A retried job asks for twice the time and memory, never above the node's memory."""
    from snakemake.resources import Resource

    align = profile(DALIPIPE_SLURM_MAX_MEM_MB="300000")["set-resources"]["align"]

    def evaluate(name: str, attempt: int):
        return Resource.cli_evaluator(
            name, align[name], wildcards=None, input=None, attempt=attempt, async_run=None
        )

    assert [evaluate("mem_mb", a) for a in (1, 2, 3)] == [256000, 300000, 300000]
    assert [evaluate("runtime", a) for a in (1, 2, 3)] == [2880, 5760, 8640]


def test_paper_dry_run_lists_the_full_graph_without_reading_data(tmp_path):
    """`snakemake --profile slurm -n` with configs/paper.yaml plans every paper-scale job.

    Every input path the config names exists but is empty: a rule that read data (or a model)
    while the workflow is parsed would fail on it.
    """

    root = tmp_path / "dalipipe"
    skip = shutil.ignore_patterns(".git", ".venv", "results", "logs", ".snakemake", "tests")
    shutil.copytree(REPO, root, ignore=skip)
    paper = load_config(root / "configs" / "paper.yaml")  # with the schema's defaults

    def data_paths(node):
        if isinstance(node, dict):
            for value in node.values():
                yield from data_paths(value)
        elif isinstance(node, list):
            for value in node:
                yield from data_paths(value)
        elif isinstance(node, str) and node.startswith("data/"):
            yield root / node

    for path in data_paths(paper):
        if path.suffix:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        else:
            path.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in job_env(**CI_ENV).items() if not k.startswith("DALIPIPE_SLURM_MAX")}
    result = run_snakemake(
        "-n", "--quiet", "rules", cwd=root, env=env, limit=300, preset=["--profile", "slurm"]
    )
    assert result.returncode == 0, explain(result)
    text = result.stdout + result.stderr
    counts = {m[0]: int(m[1]) for m in re.findall(r"^(\w+)\s+(\d+)\s*$", text, re.M)}
    parts = paper["acquire"]["parts"]
    methods = len(paper["align"]["methods"])
    assert counts["audioset_download"] == counts["extract_part"] == counts["filter_part"] == parts
    assert counts["align"] == counts["pseudolabel"] == counts["distill"] == methods
    assert counts["prefix"] == 1
    assert counts["shard"] == 3  # align, pseudolabel, test (the prefix pairs are a file)
    assert "bootstrap" not in counts and "acquire_synthetic" not in counts


def test_the_slurm_tests_snakemake_caps_the_plugins_wait_between_polls():
    """tests/support/slurm_polls.py: after a poll that sets the plugin's wait to its first 40 s
    (what it does with no active job), the wait is the cap; and the script starts Snakemake."""
    script = SLURM_SNAKEMAKE[1]
    check = f"""
import asyncio, runpy, types
polls = runpy.run_path({script!r})
executor = types.SimpleNamespace(
    workflow=types.SimpleNamespace(
        executor_settings=types.SimpleNamespace(init_seconds_before_status_checks=40)
    ),
    logger=types.SimpleNamespace(debug=print),
    next_seconds_between_status_checks=1,
)
async def poll():
    return [job async for job in polls["Executor"].check_active_jobs(executor, [])]
assert asyncio.run(poll()) == []
print(executor.next_seconds_between_status_checks, polls["POLL_CAP_S"])
"""
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-2:] == ["2", "2"], result.stdout
    version = subprocess.run([*SLURM_SNAKEMAKE, "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and re.fullmatch(r"\d+\.\d+\.\d+\s*", version.stdout), version
