"""The config is checked as a whole before any job: rules across keys, closed lists, the run
name, and presets that cannot be read, each refused with the key (or file) and what is allowed.

Each case is checked by calling the checks, and the workflow's cases by a real `snakemake -n`
that must stop before building the job graph and leave nothing in its working directory.
"""

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from dalipipe.config import ConfigError, config_problems, load_config, merge
from dalipipe.config import main as check_config
from tests.support.snakemake import SNAKEFILE, snakemake

REPO = Path(__file__).resolve().parents[1]
METHODS = "['mmd', 'ot', 'ot_att', 'contrastive']"
SPLITS = "['align', 'pseudolabel', 'prefix', 'test']"


def nested(settings: dict) -> dict:
    """{"a.b": 1} as {"a": {"b": 1}}: a preset's layout."""
    tree: dict = {}
    for dotted, value in settings.items():
        *parents, key = dotted.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[key] = value
    return tree


def with_settings(settings: dict) -> dict:
    """The miniature's config (config.yaml and the defaults) with `settings` laid over it."""
    return merge(load_config(), nested(settings))


AUDIOSET = {
    "acquire.source": "audioset",
    "acquire.audioset.split": ["balanced_train", "eval"],
    "acquire.audioset.split_names": {"balanced_train": "align"},
}

# (settings laid over the miniature's config, the exact problems named)
CASES = {
    "misspelt evaluated method": (
        {"evaluate.methods": ["mmd", "otatt"]},
        [f"evaluate.methods.1: 'otatt' is not one of {METHODS}"],
    ),
    "evaluated method not aligned": (
        {"align.methods": ["mmd", "ot"], "evaluate.methods": ["mmd", "ot_att"]},
        [
            "evaluate.methods: 'ot_att' is not aligned by this run; allowed: the methods of "
            "align.methods (mmd, ot)"
        ],
    ),
    "distilled method not aligned": (
        {
            "align.methods": ["ot"],
            "evaluate.methods": ["ot"],
            "evaluate.distilled_methods": ["contrastive"],
        },
        [
            "evaluate.distilled_methods: 'contrastive' is not aligned by this run; allowed: the "
            "methods of align.methods (ot)"
        ],
    ),
    "run climbing out of results": (
        {"run": ".."},
        [
            "run: '..' would write outside results/<run>/ (results/..); allowed: a name of "
            "letters, digits, _, - and . other than . and .."
        ],
    ),
    "split that no shard takes": (
        {"shard.require_frames": ["align", "train"]},
        [f"shard.require_frames.1: 'train' is not one of {SPLITS}"],
    ),
    "audioset split that no shard takes": (
        AUDIOSET,
        [
            "acquire.audioset.split: the clips of 'eval' would go to split 'eval', which no "
            "shard takes; map it in acquire.audioset.split_names to one of align, pseudolabel, "
            "prefix, test",
        ],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_broken_rule_is_named_with_what_is_allowed(case):
    settings, problems = CASES[case]
    assert config_problems(with_settings(settings)) == problems


def test_the_presets_keep_every_rule():
    for preset in ([], ["configs/ci.yaml"], ["configs/paper.yaml", "configs/rehearsal.yaml"]):
        assert config_problems(load_config(*(REPO / p for p in preset))) == [], preset


def test_an_audioset_split_mapped_to_a_pipeline_split_passes():
    config = with_settings({**AUDIOSET, "acquire.audioset.split_names": {
        "balanced_train": "align", "eval": "test"}})  # fmt: skip
    assert config_problems(config) == []


def dry_run(workdir: Path, settings: dict) -> subprocess.CompletedProcess:
    """`snakemake -n` of this repository's workflow in `workdir`, with `settings` as a preset."""
    preset = workdir / "preset.yaml"
    preset.write_text(yaml.safe_dump(settings))
    return snakemake(
        "-n", "--cores", "1", "-s", str(SNAKEFILE), "-d", str(workdir), "--configfile", str(preset),
        timeout=300, merged=True,
    )  # fmt: skip


@pytest.mark.parametrize(
    "case",
    ["misspelt evaluated method", "evaluated method not aligned", "run climbing out of results"],
)
def test_the_workflow_stops_before_its_graph(tmp_path, case):
    settings, problems = CASES[case]
    result = dry_run(tmp_path, nested(settings))
    assert result.returncode != 0, result.stdout[-3000:]
    assert "invalid config:\n  " + "\n  ".join(problems) in result.stdout
    # stopped while the config was read: no job planned, nothing written but the preset
    assert "Building DAG of jobs" not in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".snakemake") == ["preset.yaml"]


def test_a_missing_preset_is_named_in_one_line(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as error:
        load_config(missing)
    assert str(error.value) == f"preset {missing}: no such file"
    assert check_config([str(missing)]) == 1
    assert capsys.readouterr().out == f"preset {missing}: no such file\n"


@pytest.mark.parametrize(
    "text, reason",
    [
        ("run: [a\n", "not valid YAML (line 2, column 1: expected ',' or ']', but got '<stream end>')"),
        ("- run\n- seed\n", "holds a list, not a mapping of settings"),
        (b"run: \xff\n", "cannot be read ('utf-8' codec can't decode byte 0xff in position 5: "
                         "invalid start byte)"),
    ],
)  # fmt: skip
def test_an_unreadable_preset_is_named_with_the_reason(tmp_path, text, reason):
    preset = tmp_path / "preset.yaml"
    preset.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError) as error:
        load_config(preset)
    assert str(error.value) == f"preset {preset}: {reason}"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file without read permission")
def test_a_preset_without_read_permission_is_named(tmp_path):
    preset = tmp_path / "preset.yaml"
    preset.write_text("run: x\n")
    preset.chmod(0)
    with pytest.raises(ConfigError) as error:
        load_config(preset)
    assert str(error.value) == f"preset {preset}: cannot be read (Permission denied)"
