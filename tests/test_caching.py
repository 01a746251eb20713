"""Cached artifacts: a second run does nothing; a changed config value reruns only its stage
and what follows.

    pytest tests/test_caching.py

Runs the media path (acquire -> extract -> shards) of a tiny synthetic world for real, then asks
Snakemake (dry runs) what it would redo after each change.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TARGET = "results/cache/shards/test"


def snakemake(workdir: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "2", "-s", str(REPO / "Snakefile")]
        + ["-d", str(workdir), *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:]
    return result.stdout


def planned_rules(output: str) -> set[str]:
    """Rule names of the jobs a dry run lists (its 'Job stats' table)."""
    return set(re.findall(r"^(?:local)?rule (\w+):", output, flags=re.M)) - {"all"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("cache")
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["run"] = "cache"
    config["world"]["splits"] = {"align": 8, "pseudolabel": 4, "prefix": 2, "test": 4}
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    snakemake(workdir, TARGET)
    return workdir


def change(workdir: Path, section: str, key: str, value) -> None:
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config[section][key] = value
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))


def test_a_second_run_does_nothing(workdir):
    assert "Nothing to be done" in snakemake(workdir, "-n", TARGET)


def test_a_shard_setting_reruns_only_the_shards(workdir):
    change(workdir, "shard", "samples_per_shard", 2)
    assert planned_rules(snakemake(workdir, "-n", TARGET)) == {"shard_test"}


def test_an_extract_setting_reruns_extraction_and_what_follows(workdir):
    change(workdir, "extract", "frame_short_side", 48)
    assert planned_rules(snakemake(workdir, "-n", TARGET)) == {"extract_part", "shard_test"}
