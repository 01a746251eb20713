"""A config edit reruns exactly the jobs that read the value it changes, and what follows them.

    pytest tests/test_rerun.py -q        # ~1 min: dry runs only

Every output of the CI preset's graph (plus an AudioCaps-formatted evaluation set) is created
empty and marked done with `snakemake --touch`, which records each job's params as a real run
would; then dry runs after one edit each list the jobs Snakemake would rerun. Nothing executes.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.support.snakemake import SNAKEFILE
from tests.support.snakemake import snakemake as run_snakemake

REPO = Path(__file__).resolve().parents[1]
PRESET = ["--configfile", str(REPO / "configs" / "ci.yaml"), "base.yaml"]
# a second evaluation set beside the miniature's test split: its files only need to exist
AUDIOCAPS = {"csv": "data/audiocaps/test.csv", "media": "data/audiocaps/clips", "dedup": False}


def snakemake(workdir: Path, *args: str) -> str:
    result = run_snakemake(
        "--cores", "1", "-s", str(SNAKEFILE), "-d", str(workdir), *args,
        cwd=workdir, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def planned(output: str) -> dict[str, int]:
    """Rule -> number of jobs, from a dry run's job table (less `all`)."""
    jobs = dict(re.findall(r"^(\w+)\s+(\d+)$", output, re.M))
    return {rule: int(n) for rule, n in jobs.items() if rule not in ("all", "total")}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("rerun")
    (workdir / "config.yaml").write_text((REPO / "config.yaml").read_text())
    base = {"run": "rerun", "evaluate": {"datasets": {"miniature": {}, "audiocaps": AUDIOCAPS}}}
    (workdir / "base.yaml").write_text(yaml.safe_dump(base))
    (workdir / "data" / "audiocaps" / "clips").mkdir(parents=True)
    (workdir / "data" / "audiocaps" / "test.csv").touch()
    # `--touch` on missing outputs records every job's metadata (params included) as a run
    # would; then every output is made, empty (a folder where the rule declares directory()),
    # and a second `--touch` gives them the modification times of a finished run
    plan = snakemake(workdir, "-n", *PRESET)
    snakemake(workdir, "--touch", *PRESET)
    for line in re.findall(r"^\s+output: (.+)$", plan, re.M):
        for name in line.split(", "):
            path = workdir / name
            if path.suffix:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
            else:
                path.mkdir(parents=True, exist_ok=True)
    snakemake(workdir, "--touch", *PRESET)
    assert "Nothing to be done" in snakemake(workdir, "-n", *PRESET)
    return workdir


def plan_after(workdir: Path, edit: dict) -> tuple[dict[str, int], str]:
    (workdir / "edit.yaml").write_text(yaml.safe_dump(edit))
    output = snakemake(workdir, "-n", *PRESET, "edit.yaml")
    return planned(output), output


def test_report_only_setting_reruns_only_the_report(workdir):
    jobs, _ = plan_after(workdir, {"evaluate": {"examples": 5}})
    assert jobs == {"report_figures": 1}


def test_one_methods_setting_reruns_that_method_only(workdir):
    jobs, output = plan_after(workdir, {"align": {"per_method": {"mmd": {"epochs": 7}}}})
    assert jobs == {
        "align": 1,
        "pseudolabel": 1,
        "distill": 1,
        "evaluate": 2,  # every set evaluates every method
        "class_breakdown": 1,
        "report_figures": 1,
    }
    assert re.search(r"output: results/rerun/align/mmd$", output, re.M)


def test_one_datasets_setting_reruns_that_evaluation_only(workdir):
    dedup = {"evaluate": {"datasets": {"audiocaps": {**AUDIOCAPS, "dedup": True}}}}
    jobs, output = plan_after(workdir, dedup)
    assert jobs == {"evaluate": 1, "report_figures": 1}
    assert re.search(r"output: results/rerun/evaluate/audiocaps$", output, re.M)


def test_adding_a_method_trains_only_the_new_one(workdir):
    """align.methods lists the methods to train; the others' jobs do not read the list."""
    three = ["mmd", "ot", "ot_att"]
    jobs, output = plan_after(
        workdir, {"align": {"methods": three}, "evaluate": {"methods": three}}
    )
    assert (jobs["align"], jobs["pseudolabel"], jobs["distill"]) == (1, 1, 1)
    assert re.search(r"output: results/rerun/align/ot_att$", output, re.M)
