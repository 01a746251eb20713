"""Cached artifacts: a second run does nothing; a changed config value reruns only its stage
and what follows.

    pytest tests/test_caching.py

Runs the media path (acquire -> extract -> shards) of a tiny synthetic world for real, then asks
Snakemake (dry runs) what it would redo after each change.
"""

import re
from pathlib import Path

import pytest
import yaml

from dalipipe.config import load_config

REPO = Path(__file__).resolve().parents[1]
TARGET = "results/cache/shards/test"


def planned_rules(output: str) -> set[str]:
    """Rule names of the jobs a dry run lists (its 'Job stats' table)."""
    return set(re.findall(r"^(?:local)?rule (\w+):", output, flags=re.M)) - {"all"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, snakemake_in) -> Path:
    workdir = tmp_path_factory.mktemp("cache")
    config = load_config()  # config.yaml with the schema's defaults
    config["run"] = "cache"
    config["world"]["splits"] = {"align": 8, "pseudolabel": 4, "prefix": 2, "test": 4}
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    snakemake_in(workdir, TARGET)
    return workdir


def change(workdir: Path, section: str, key: str, value) -> None:
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config[section][key] = value
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))


def test_a_second_run_does_nothing(workdir, snakemake_in):
    assert "Nothing to be done" in snakemake_in(workdir, "-n", TARGET)


def test_a_shard_setting_reruns_only_the_shards(workdir, snakemake_in):
    change(workdir, "shard", "samples_per_shard", 2)
    assert planned_rules(snakemake_in(workdir, "-n", TARGET)) == {"shard"}


def test_an_extract_setting_reruns_extraction_and_what_follows(workdir, snakemake_in):
    change(workdir, "extract", "frame_short_side", 48)
    assert planned_rules(snakemake_in(workdir, "-n", TARGET)) == {"extract_part", "shard"}
