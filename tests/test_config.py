"""The workflow refuses an invalid config before any job starts, naming the offending key.

Runs `snakemake -n` (a dry run: nothing executes) on copies of config.yaml with one fault each.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dalipipe.config import config_problems

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def dry_run(tmp_path: Path, config: dict) -> subprocess.CompletedProcess:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [*SNAKEMAKE, "-n", "--cores", "1", "--configfile", str(path), "-d", str(tmp_path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )
    result.output = result.stdout
    return result


@pytest.fixture
def config() -> dict:
    return yaml.safe_load((REPO / "config.yaml").read_text())


def test_default_config_is_valid(tmp_path, config):
    result = dry_run(tmp_path, config)
    assert result.returncode == 0, result.output


def test_unknown_key_is_named(tmp_path, config):
    config["extract"]["frame_shortside"] = 64
    result = dry_run(tmp_path, config)
    assert result.returncode != 0
    assert "frame_shortside" in result.output


def test_wrong_type_is_named(tmp_path, config):
    config["shard"]["samples_per_shard"] = "many"
    result = dry_run(tmp_path, config)
    assert result.returncode != 0
    assert "samples_per_shard" in result.output and "'many'" in result.output


def test_unknown_source_is_refused(tmp_path, config):
    config["acquire"]["source"] = "youtube"
    result = dry_run(tmp_path, config)
    assert result.returncode != 0
    assert "source" in result.output


def test_missing_required_key_is_named(config):
    # --configfile extends the default config.yaml, so a missing key is checked directly.
    del config["extract"]
    del config["run"]
    problems = config_problems(config)
    assert problems == [
        "(top level): 'run' is a required property",
        "(top level): 'extract' is a required property",
    ]


def overlay(base: dict, extra: dict) -> dict:
    """What `--configfile` does: extend the Snakefile's config.yaml key by key."""
    merged = dict(base)
    for key, value in extra.items():
        both_dicts = isinstance(value, dict) and isinstance(base.get(key), dict)
        merged[key] = overlay(base[key], value) if both_dicts else value
    return merged


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_preset_is_valid(config, name):
    preset = yaml.safe_load((REPO / "configs" / name).read_text())
    assert config_problems(overlay(config, preset)) == []


@pytest.mark.parametrize("preset", ["config.yaml", "configs/paper.yaml"])
def test_the_captioner_options_of_a_preset_reach_the_caption_stages(preset, tiny_models):
    """Every stage builds its captioner with `load_captioner(path, params["models"])`; the
    options (template, prompt, image aspect) and revision must be the preset's, not the
    captioner's defaults. (A local directory ignores the revision; it is still recorded.)"""
    import torch

    from dalipipe.models.assemble import load_captioner
    from dalipipe.models.captioner import CaptionerOptions

    models = yaml.safe_load((REPO / preset).read_text())["models"]
    captioner = load_captioner(tiny_models.llava, models, device="cpu", dtype=torch.float32)
    assert captioner.options == CaptionerOptions.from_dict(models["options"])
    assert captioner.options.template == models["options"]["template"]
    assert captioner.revision == models["captioner_revision"]


# Keys read by the rule files (or another stage) rather than by the stage module itself.
READ_BY_RULES = {
    "evaluate": {"distilled_methods", "examples", "methods"},
    "filter": {"enabled", "keep"},
    "extract": {"keep_wav"},
}
STAGE_MODULES = {
    "world": ("dalipipe.data.synthetic", "WORLD_DEFAULTS"),
    "extract": ("dalipipe.data.extract", "DEFAULTS"),
    "filter": ("dalipipe.data.filter", "DEFAULTS"),
    "bootstrap": ("dalipipe.models.bootstrap", "DEFAULTS"),
    "align": ("dalipipe.align.train", "DEFAULTS"),
    "prefix": ("dalipipe.caption.prefix", "DEFAULTS"),
    "pseudolabel": ("dalipipe.caption.pseudolabel", "DEFAULTS"),
    "distill": ("dalipipe.caption.distill", "DEFAULTS"),
    "evaluate": ("dalipipe.evaluate.run", "DEFAULTS"),
}


@pytest.mark.parametrize("preset", ["config.yaml", "configs/paper.yaml"])
def test_every_key_of_a_stage_section_is_one_its_stage_reads(preset):
    """A key the code spells otherwise is silently a default; the stage's own defaults name
    every key it reads, so a config key outside them (and outside the rules') is read by no one."""
    import importlib

    config = yaml.safe_load((REPO / preset).read_text())
    for section, (module, name) in STAGE_MODULES.items():
        known = set(getattr(importlib.import_module(module), name))
        unread = set(config.get(section) or {}) - known - READ_BY_RULES.get(section, set())
        assert not unread, f"{preset}: {section}.{sorted(unread)} is read by no stage"
