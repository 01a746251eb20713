"""The workflow refuses an invalid config before any job starts, naming the offending key.

Runs `snakemake -n` (a dry run: nothing executes) on copies of config.yaml with one fault each.
"""

import subprocess
from pathlib import Path

import pytest
import yaml

from dalipipe.config import config_problems, fill_defaults, load_config
from tests.support.snakemake import snakemake

REPO = Path(__file__).resolve().parents[1]


def dry_run(tmp_path: Path, config: dict) -> subprocess.CompletedProcess:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    result = snakemake(
        "-n", "--cores", "1", "--configfile", str(path), "-d", str(tmp_path),
        timeout=300, merged=True,
    )  # fmt: skip
    result.output = result.stdout
    return result


@pytest.fixture
def config() -> dict:
    """The miniature's config as a run sees it: config.yaml and the schema's defaults."""
    return load_config(base=REPO / "config.yaml")


def test_config_yaml_restates_the_packaged_defaults():
    """The Snakefile's config.yaml names the run the schema's defaults already are, so the
    installed package (which has no config.yaml) and the workflow see the same miniature."""
    assert load_config(base=REPO / "config.yaml") == load_config()


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


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_preset_is_valid(name):
    assert config_problems(load_config(REPO / "configs" / name)) == []


def schema_settings(node: dict, path: tuple = ()):
    """(dotted key, its schema) of every setting: a key whose value is not a section of keys."""
    for key, sub in (node.get("properties") or {}).items():
        here = (*path, key)
        if "properties" in sub and "default" not in sub:
            yield from schema_settings(sub, here)
        else:
            yield ".".join(here), sub


def test_every_setting_has_its_default_and_its_meaning_in_the_schema():
    """One place per setting: the schema gives each its type, its default and what it means.
    An evaluation set's files and the fetch URLs have no default: they name a user's data."""
    schema = yaml.safe_load((REPO / "dalipipe" / "resources" / "config.schema.yaml").read_text())
    settings = dict(schema_settings(schema))
    assert len(settings) > 150
    no_default = {k for k, sub in settings.items() if "default" not in sub}
    assert no_default == {"fetch"}
    assert [k for k, sub in settings.items() if not sub.get("description")] == []
    assert config_problems(fill_defaults({})) == []


def leaves(config: dict, path: tuple = ()):
    for key, value in config.items():
        if isinstance(value, dict) and value and key not in ("datasets", "per_method"):
            yield from leaves(value, (*path, key))
        else:
            yield (*path, key), value


# what each preset is laid over: the defaults, or another preset (--configfile A B)
PRESET_BASES = {"paper.yaml": (), "ci.yaml": (), "rehearsal.yaml": ("configs/paper.yaml",)}


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_a_preset_states_only_what_differs(name):
    """nanoGPT's rule: a preset that repeats a default hides how the run differs from it."""
    base = load_config(*(REPO / p for p in PRESET_BASES.get(name, ())))
    preset = yaml.safe_load((REPO / "configs" / name).read_text())
    same = []
    for path, value in leaves(preset):
        node = base
        for key in path:
            node = node.get(key, KeyError) if isinstance(node, dict) else KeyError
        if node == value:
            same.append(".".join(path))
    assert same == [], f"configs/{name} repeats the value beneath it"


@pytest.mark.parametrize("preset", ["config.yaml", "configs/paper.yaml"])
def test_the_captioner_options_of_a_preset_reach_the_caption_stages(preset, tiny_models):
    """Every stage builds its captioner with `load_captioner(path, params["models"])`; the
    options (template, prompt, image aspect) and revision must be the preset's, not the
    captioner's defaults. (A local directory ignores the revision; it is still recorded.)"""
    import torch

    from dalipipe.models.assemble import load_captioner
    from dalipipe.models.captioner import CaptionerOptions

    models = load_config(*([REPO / preset] if preset != "config.yaml" else []))["models"]
    captioner = load_captioner(tiny_models.llava, models, device="cpu", dtype=torch.float32)
    assert captioner.options == CaptionerOptions.from_dict(models["options"])
    assert captioner.options.template == models["options"]["template"]
    assert captioner.revision == models["captioner_revision"]
