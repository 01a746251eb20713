"""Validate a workflow config against schemas/config.schema.yaml, with one readable message.

    python -m dalipipe.config config.yaml     # prints "ok" or the first problems, exits 1

The Snakefile calls :func:`validate_config` before building the job graph, so a bad config
stops the run before any job, naming the key (``extract.fbank.num_mel_bins: 'many' is not of
type 'integer'``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import jsonschema
import yaml

SCHEMA = Path(__file__).resolve().parents[1] / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    pass


def _where(error: jsonschema.ValidationError) -> str:
    path = ".".join(str(p) for p in error.absolute_path)
    return path or "(top level)"


def config_problems(config: dict, schema_path: str | Path = SCHEMA) -> list[str]:
    schema = yaml.safe_load(Path(schema_path).read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    return [f"{_where(e)}: {e.message}" for e in errors]


def validate_config(config: dict, schema_path: str | Path = SCHEMA) -> None:
    problems = config_problems(config, schema_path)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = Path(argv[0] if argv else "config.yaml")
    problems = config_problems(yaml.safe_load(path.read_text()))
    print("\n".join(f"{path}: {p}" for p in problems) or "ok")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
