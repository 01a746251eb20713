"""The rules a config must keep across its keys, checked as a whole before any job.

The schema judges each key alone (its type, its range, its closed list of values). What it
cannot see is a key that names something another key decides: an evaluated method that no
alignment job trains, an AudioSet split whose clips no shard would take, a run name that leaves
`results/`. Left to the workflow, each of these surfaced late, or not at all (a method silently
missing from the table). `cross_key_problems` names the key, the value and what is allowed;
`read_preset` turns a missing or unreadable preset into one line naming the file.
"""

from __future__ import annotations

from pathlib import Path

import yaml

# The splits the workflow shards and trains or evaluates on (rules/shard.smk); a clip of any
# other split is never used.
PIPELINE_SPLITS = ("align", "pseudolabel", "prefix", "test")


class PresetError(ValueError):
    """A preset file that cannot be read as a mapping of settings."""


def read_preset(path: str | Path) -> dict:
    """The settings of one preset file, or a PresetError naming the file and why, in one line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PresetError(f"preset {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise PresetError(f"preset {path}: cannot be read ({reason})") from None
    try:
        settings = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise PresetError(f"preset {path}: not valid YAML ({where}{problem})") from None
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise PresetError(
            f"preset {path}: holds a {type(settings).__name__}, not a mapping of settings"
        )
    return settings


def _listed(values) -> str:
    return ", ".join(str(v) for v in values) or "(none)"


def _run_name(config: dict) -> list[str]:
    # the schema's pattern allows dots (run names such as paper-1.5); "." makes results/<run>
    # the results folder itself, ".." the repository root
    run = config.get("run")
    if run in (".", ".."):
        return [
            f"run: {run!r} would write outside results/<run>/ (results/{run}); allowed: a name "
            "of letters, digits, _, - and . other than . and .."
        ]
    return []


def _methods(config: dict) -> list[str]:
    """Evaluated and distilled methods must be aligned: rules/align.smk makes align/<method>
    only for align.methods, so any other is a job that cannot be built."""
    aligned = (config.get("align") or {}).get("methods") or []
    evaluate = config.get("evaluate") or {}
    problems = []
    for key in ("methods", "distilled_methods"):
        for method in evaluate.get(key) or []:
            if method not in aligned:
                problems.append(
                    f"evaluate.{key}: {method!r} is not aligned by this run; allowed: the "
                    f"methods of align.methods ({_listed(aligned)})"
                )
    return problems


def _audioset_splits(config: dict) -> list[str]:
    """Each AudioSet split read must land in a split that a shard takes (its own name, or the
    one acquire.audioset.split_names gives it); else its clips are downloaded for nothing."""
    acquire = config.get("acquire") or {}
    if acquire.get("source") != "audioset":
        return []
    audioset = acquire.get("audioset") or {}
    splits = audioset.get("split")
    splits = [splits] if isinstance(splits, str) else list(splits or [])
    names = audioset.get("split_names") or {}
    problems = []
    for split in splits:
        target = names.get(split, split)
        if target not in PIPELINE_SPLITS:
            problems.append(
                f"acquire.audioset.split: the clips of {split!r} would go to split {target!r}, "
                f"which no shard takes; map it in acquire.audioset.split_names to one of "
                f"{_listed(PIPELINE_SPLITS)}"
            )
    return problems


def cross_key_problems(config: dict) -> list[str]:
    """Every broken rule between keys of a config the schema accepts, one line each."""
    return [*_run_name(config), *_methods(config), *_audioset_splits(config)]
