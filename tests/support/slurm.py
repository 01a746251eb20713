"""The Slurm tests' shared parts (tests/test_slurm.py, tests/test_rehearsal.py): the `cluster`
mark, the environment the jobs inherit, and reading back what the cluster did."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.snakemake import workflow_env

# Snakemake as the Slurm tests start it: the plugin's polls capped at 2 s apart (slurm_polls.py)
SLURM_SNAKEMAKE = (sys.executable, str(Path(__file__).with_name("slurm_polls.py")))

# Site settings a developer's shell may hold; the tests choose their own partition and limits.
SITE_VARIABLES = ("SLURM_PARTITION", "SLURM_GPU_PARTITION", "SLURM_ACCOUNT", "DALIPIPE_SLURM_SITE")


def cluster_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        return subprocess.run(["sinfo"], capture_output=True, timeout=15).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


cluster_marks = [
    pytest.mark.slurm,
    pytest.mark.slow,
    pytest.mark.skipif(not cluster_up(), reason="no Slurm cluster: sinfo missing or failing"),
]


def cluster(test):
    """Marks a test that needs the running cluster (`slurm`, `slow`, skipped without sinfo)."""
    for mark in cluster_marks:
        test = mark(test)
    return test


def job_env(**settings: str) -> dict[str, str]:
    """This environment with `settings`, as the jobs inherit it (--export=ALL): this venv's
    `dalipipe` first on PATH, and no site settings but the test's own."""
    env = workflow_env(**settings)
    for name in SITE_VARIABLES:
        env.pop(name, None)
    return env


def explain(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout[-6000:]}\n--- stderr\n{result.stderr[-6000:]}"


def slurm_jobs(workdir: Path) -> dict[int, str]:
    """Slurm job id -> rule, from the per-job logs the profile keeps under logs/slurm/."""
    jobs = {}
    for path in (workdir / "logs" / "slurm").rglob("*.log"):
        rule_dir = path.relative_to(workdir / "logs" / "slurm").parts[0]  # rule_<name>
        jobs[int(path.stem)] = rule_dir.removeprefix("rule_")
    return jobs


def job_info(job_id: int) -> dict[str, str]:
    """`scontrol show job` as a dict (finished jobs stay visible for MinJobAge, 1 h here)."""
    out = subprocess.run(
        ["scontrol", "show", "job", str(job_id)], capture_output=True, text=True, timeout=30
    ).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))
