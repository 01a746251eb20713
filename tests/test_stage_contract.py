"""One stage contract: every stage reads its command line one way (`dalipipe.common.read_stage`)
and runs with the schema's defaults, filled once, under its job's `--params`.

A stage called alone, without `--params`, must see exactly the defaults the workflow fills in
(once `filter.keep` fell back to 1.0 in code against the schema's 0.9, so `dalipipe filter-merge`
alone kept every clip); and no config key may have a literal fallback in code.
"""

import ast
import csv
import importlib
import inspect
from pathlib import Path

import pytest
import yaml

import dalipipe.common
from dalipipe.cli import COMMANDS
from dalipipe.config import fill_defaults

REPO = Path(__file__).resolve().parents[1]

# the smallest command line each stage accepts: its required inputs (never opened here)
ALONE = {
    "acquire-synthetic": ["--out", "o"],
    "acquire-local": ["--out", "o"],
    "acquire-audioset": ["--selection", "s", "--part", "0", "--out", "o"],
    "gather-manifests": ["p", "--out", "o"],
    "audioset-select": ["--out", "o"],
    "extract": ["source", "--out", "o"],
    "features": ["clip.wav", "--out", "o.npy"],
    "filter": ["--extract", "e", "--metadata", "m", "--out", "o"],
    "filter-merge": ["--parts", "p", "--out", "o"],
    "shard": ["--extract", "e", "--metadata", "m", "--split", "align", "--out", "o"],
    "bootstrap": ["--shards", "s", "--out", "o"],
    "prefix": ["--pairs", "p", "--captioner", "c", "--out", "o"],
    "align": ["--method", "mmd", "--shards", "s", "--val-shards", "v", "--captioner", "c"]
    + ["--out", "o"],
    "pseudolabel": ["--pool", "p", "--encoder", "e", "--prefix", "x", "--captioner", "c"]
    + ["--out", "o"],
    "distill": ["--pseudolabels", "l", "--pool", "p", "--encoder", "e", "--prefix", "x"]
    + ["--captioner", "c", "--out", "o"],
    "evaluate": ["--dataset", "miniature", "--captioner", "c", "--out", "o"],
    "report": ["--evaluate", "e", "--out", "o"],
    "probe": ["--dataset", "miniature", "--captioner", "c", "--align", "a", "--out", "o"],
    "figure": ["pca-clip", "--dataset", "miniature", "--captioner", "c", "--align", "a"]
    + ["--out", "o"],
}


def takes_params(module) -> bool:
    source = inspect.getsource(module)
    return any(
        mark in source for mark in ('"--params"', "stage_parser(", "stage_args(", "add_params(")
    )


def test_every_command_with_settings_is_a_stage_checked_here():
    """A new command that takes `--params` must be added to ALONE, and so to these checks."""
    with_params = {
        name
        for name, (module, _) in COMMANDS.items()
        if takes_params(importlib.import_module(module))
    }
    assert with_params == set(ALONE)


class Seen(Exception):
    """Raised by the spy once the stage has read its settings, before it opens any input."""

    def __init__(self, params):
        self.params = params


@pytest.mark.parametrize("name", sorted(ALONE))
def test_a_stage_called_alone_runs_with_the_schema_defaults(name, monkeypatch):
    module = importlib.import_module(COMMANDS[name][0])
    real = dalipipe.common.read_stage

    def spy(parser, argv):
        args, params = real(parser, argv)
        raise Seen(params)

    # stages import read_stage by name; stage_args (the caption stages) calls the common one
    monkeypatch.setattr(dalipipe.common, "read_stage", spy)
    if hasattr(module, "read_stage"):
        monkeypatch.setattr(module, "read_stage", spy)
    with pytest.raises(Seen) as seen:
        module.main(ALONE[name])
    assert seen.value.params == fill_defaults({})
    assert "parse_params(" not in inspect.getsource(module.main)


def test_params_are_laid_over_the_defaults_key_by_key(monkeypatch):
    params = dalipipe.common.job_settings('{"seed": 3, "filter": {"keep": 0.5}}')
    defaults = fill_defaults({})
    assert params["seed"] == 3 and params["filter"]["keep"] == 0.5
    assert params["filter"]["max_new_tokens"] == defaults["filter"]["max_new_tokens"]
    assert params["pseudolabel"] == defaults["pseudolabel"]


def write_filter_part(part: Path, distances: list[float]) -> None:
    part.mkdir(parents=True)
    with open(part / "distances.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["clip_id", "distance", "n_frames", "labels", "frame_distances"])
        for i, d in enumerate(distances):
            writer.writerow([f"clip{i:02d}", d, 1, "dog", d])


def test_filter_merge_alone_keeps_the_schema_share(tmp_path):
    """The `filter.keep` case: 0.9 of 20 scored clips are 18, the closest ones."""
    from dalipipe.data import filter_merge

    keep = fill_defaults({})["filter"]["keep"]
    assert keep == 0.9
    write_filter_part(tmp_path / "part-0", [i / 20 for i in range(20)])
    assert (
        filter_merge.main(["--parts", str(tmp_path / "part-0"), "--out", str(tmp_path / "f")]) == 0
    )
    kept = (tmp_path / "f" / "kept.txt").read_text().split()
    assert kept == [f"clip{i:02d}" for i in range(18)]


def test_acquire_local_alone_splits_into_the_schema_parts(tmp_path):
    """`acquire.parts` defaults to 2: part 1 of a folder of four files lists the 2nd and 4th."""
    from dalipipe.data import local

    assert fill_defaults({})["acquire"]["parts"] == 2
    media = tmp_path / "media"
    media.mkdir()
    for i in range(4):
        (media / f"clip{i}.wav").write_bytes(b"")
    out = tmp_path / "part-1"
    assert local.main(["--source", str(media), "--part", "1", "--out", str(out)]) == 0
    with open(out / "manifest.csv", newline="", encoding="utf-8") as f:
        assert [row["clip_id"] for row in csv.DictReader(f)] == ["clip1", "clip3"]


def schema_keys(node: dict) -> set[str]:
    keys = set()
    for key, sub in (node.get("properties") or {}).items():
        keys.add(key)
        keys |= schema_keys(sub)
    return keys


# `.get(key, default)` of a name the schema also uses, where the dict is not a config section:
# a manifest row's reason, a clip's metadata, a checkpoint's curve, a table row's or a web form's
# modality, a model folder's recorded decoding (do_sample). evaluate.datasets.<set>.dedup is read
# from an evaluation set's own entry, for which the schema gives no defaults.
NOT_CONFIG = {
    "reason",
    "clip_id",
    "curve",
    "metadata",
    "name",
    "method",
    "dedup",
    "modality",
    "do_sample",
}


def test_no_config_key_has_a_literal_fallback_in_code():
    schema = yaml.safe_load(
        (REPO / "dalipipe" / "resources" / "config.schema.yaml").read_text(encoding="utf-8")
    )
    keys = schema_keys(schema) - NOT_CONFIG
    found = []
    for path in sorted((REPO / "dalipipe").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "get"
                and len(node.args) == 2
                and isinstance(node.args[0], ast.Constant)
                and node.args[0].value in keys
                and isinstance(node.args[1], ast.Constant)
                and node.args[1].value is not None
            ):
                found.append(f"{path.relative_to(REPO)}:{node.lineno} {node.args[0].value!r}")
    assert found == []


def test_captioner_options_default_to_the_schema():
    from dalipipe.models.captioner import CaptionerOptions

    assert CaptionerOptions().to_dict() == fill_defaults({})["models"]["options"]
