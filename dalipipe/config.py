"""The workflow config: every setting's type, default and meaning live in one file, the schema.

    python -m dalipipe.config config.yaml configs/paper.yaml   # "ok", or the problems (exit 1)
    load_config("configs/paper.yaml")["align"]["epochs"]        # defaults + presets, as run
    section_defaults("distill")                                 # a stage's defaults

`dalipipe/resources/config.schema.yaml` holds, for each key, its type, its default and a one-line
meaning; it is package data, read through importlib.resources, so an installed package needs no
checkout. A preset (config.yaml, configs/*.yaml) states only what differs from those defaults, laid over
one another as Snakemake lays config files (key by key). The workflow fills in the defaults and
validates the result before building the job graph, so a bad config stops the run before any
job, naming the key (``extract.fbank.num_mel_bins: 'many' is not of type 'integer'``).
"""

from __future__ import annotations

import copy
import sys
from functools import cache
from importlib import resources
from pathlib import Path

import jsonschema
import yaml

SCHEMA = resources.files("dalipipe.resources") / "config.schema.yaml"


class ConfigError(ValueError):
    pass


@cache
def _schema(path=SCHEMA) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _fill(node: dict, schema: dict) -> None:
    for key, sub in (schema.get("properties") or {}).items():
        if key not in node:
            if "default" in sub:
                node[key] = copy.deepcopy(sub["default"])
            elif "properties" in sub and _has_defaults(sub):
                node[key] = {}
        if isinstance(node.get(key), dict) and "properties" in sub:
            _fill(node[key], sub)


def _has_defaults(schema: dict) -> bool:
    return any(
        "default" in sub or _has_defaults(sub) for sub in (schema.get("properties") or {}).values()
    )


def fill_defaults(config: dict, schema_path=SCHEMA) -> dict:
    """Give every key the config leaves out its schema default, at every depth, in place."""
    _fill(config, _schema(schema_path))
    return config


def section_defaults(section: str) -> dict:
    """The defaults of one top-level section, e.g. what a stage runs with when called alone."""
    return fill_defaults({})[section]


# The keys of section `bootstrap` that size the miniature's LLaVA, keywords of
# `dalipipe.models.llava_config.llava_config`: the bootstrap stage builds it with them,
# plan-memory and bench/generate.py size it before it exists.
LLAVA_SIZE_KEYS = (
    "image_size",
    "patch_size",
    "vision_hidden",
    "vision_layers",
    "vision_heads",
    "text_hidden",
    "text_layers",
    "text_heads",
)


def llava_sizes(bootstrap: dict) -> dict[str, int]:
    """The LLaVA sizes a `bootstrap` section sets (those it leaves out: llava_config's)."""
    return {k: int(bootstrap[k]) for k in LLAVA_SIZE_KEYS if k in bootstrap}


def merge(base: dict, over: dict) -> dict:
    """`over` laid on `base` key by key, as Snakemake merges config files (a new dict)."""
    merged = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_config(*presets: str | Path, base: str | Path | None = None) -> dict:
    """The config a run sees: `base` (the Snakefile's config.yaml, which restates the schema's
    default run), the presets laid over it in order, then the schema's defaults for whatever none
    of them sets. A preset that cannot be read is named in one line (a ConfigError)."""
    from dalipipe.config_checks import PresetError, read_preset

    config: dict = {}
    for path in ([base] if base else []) + list(presets):
        try:
            config = merge(config, read_preset(path))
        except PresetError as error:
            raise ConfigError(str(error)) from None
    return fill_defaults(config)


def _where(error: jsonschema.ValidationError) -> str:
    path = ".".join(str(p) for p in error.absolute_path)
    return path or "(top level)"


def config_problems(config: dict, schema_path=SCHEMA) -> list[str]:
    validator = jsonschema.Draft202012Validator(_schema(schema_path))
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        return [f"{_where(e)}: {e.message}" for e in errors]
    # the rules between keys assume each key is well formed: checked once the schema passes
    from dalipipe.config_checks import cross_key_problems

    return cross_key_problems(config)


def validate_config(config: dict, schema_path=SCHEMA) -> None:
    problems = config_problems(config, schema_path)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="dalipipe check-config",
        description="Check presets, laid over one another in order, as the workflow does before "
        "any job: prints ok, or each problem naming the key (exit 1).",
    )
    parser.add_argument("presets", nargs="*", default=["config.yaml"], help="YAML presets")
    presets = parser.parse_args(sys.argv[1:] if argv is None else argv).presets
    try:
        config = load_config(*presets, base=None)
    except ConfigError as error:
        print(error)
        return 1
    problems = config_problems(config)
    print("\n".join(f"{' + '.join(presets)}: {p}" for p in problems) or "ok")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
