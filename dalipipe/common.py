"""Small helpers every stage shares: atomic outputs, logging, seeds, devices, JSON lines.

A stage writes to a temporary sibling and renames it when complete, so an interrupted job
never leaves an output that looks finished (docs/design.md, "Stages and their contracts").
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import os
import platform
import random
import shutil
import sys
from collections.abc import Iterable, Iterator
from glob import escape as glob_escape
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("dalipipe")


# the packages whose versions decide a run's numbers: every job logs them, evaluation records them
RECORDED_PACKAGES = (
    "dalipipe", "torch", "transformers", "tokenizers", "accelerate", "numpy", "pot",
    "snakemake", "pycocoevalcap",
)  # fmt: skip


def package_versions() -> dict[str, str | None]:
    """Python's and RECORDED_PACKAGES' versions (None: not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in RECORDED_PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def setup_logging(level: int = logging.INFO) -> None:
    """Log to stderr (Snakemake rules redirect it to the rule's log file), starting with the
    versions the job runs with."""
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    versions = ", ".join(f"{k} {v}" for k, v in package_versions().items())
    log.info("versions: %s", versions)


def _remove_stale_temporaries(final: Path) -> None:
    """Remove what a killed writer of ``final`` left (SIGKILL runs no cleanup): its temporary
    would hold the space the rerun needs. Only those of processes no longer alive here."""
    prefix = f".{final.name}.tmp-"
    for stale in final.parent.glob(f"{glob_escape(prefix)}*"):
        pid = stale.name[len(prefix) :]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # alive: another writer's
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # alive, another user's
        log.info("removing %s, left by a killed process", stale)
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(
            missing_ok=True
        )


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it to ``final`` only on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    if directory:
        tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        if tmp.exists():
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
        raise
    if final.exists():
        shutil.rmtree(final) if final.is_dir() and not final.is_symlink() else final.unlink()
    os.replace(tmp, final)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def open_csv(
    path: str | os.PathLike, columns: Iterable[str], problem: str
) -> Iterator[csv.DictReader]:
    """A DictReader over a UTF-8 CSV whose header has all of ``columns``, else a ValueError
    "<path>: <problem>"; in ``problem``, ``{missing}`` stands for the sorted columns it lacks and
    ``{needed}`` for ``columns``. The file closes when the block ends."""
    columns = list(columns)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = sorted(set(columns) - set(reader.fieldnames or []))
        if missing:
            raise ValueError(f"{path}: " + problem.format(missing=missing, needed=columns))
        yield reader


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) for a deterministic run."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str = "auto"):
    """``auto`` picks CUDA when present; nothing else in the code assumes a GPU or a CPU."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


# the --captioner option of every stage that starts from the base captioner
CAPTIONER_HELP = "the base LLaVA-class captioner: a save_pretrained directory or a hub id"


# The stage contract. Every stage's `main` builds its command line with `stage_parser` and reads
# it with `read_stage`, so its settings are the schema's defaults filled once with the job's
# `--params` laid over them: a stage called alone runs as the workflow's defaults would run it,
# and no config key needs a fallback value in code.


def stage_parser(command: str, doc: str, reads: str) -> argparse.ArgumentParser:
    """The command line of `dalipipe <command>`: `--params` (the JSON object its rule builds, or
    @file; `reads` names the keys it reads); the stage adds its inputs and outputs."""
    parser = argparse.ArgumentParser(prog=f"dalipipe {command}", description=doc.split("\n\n")[0])
    add_params(parser, reads)
    return parser


def add_params(parser: argparse.ArgumentParser, reads: str) -> None:
    """`--params` on a parser of its own (a sub-command's); `read_stage` reads it."""
    parser.add_argument(
        "--params", default="{}", help=f"JSON object (or @file): {reads}; the rest: defaults"
    )


def read_stage(
    parser: argparse.ArgumentParser, argv: list[str] | None
) -> tuple[argparse.Namespace, dict]:
    """The stage's arguments read and logging started: (args, the settings it runs with)."""
    args = parser.parse_args(argv)
    setup_logging()
    return args, job_settings(args.params)


def job_settings(text: str | None) -> dict:
    """A job's `--params` with every setting it leaves out given its schema default."""
    from dalipipe.config import fill_defaults

    return fill_defaults(parse_params(text))


def stage_args(
    argv: list[str], command: str, doc: str, reads: str, **inputs: str
) -> tuple[argparse.Namespace, dict]:
    """`read_stage` for a stage whose inputs are all required `--<name>` options, one per
    keyword, its value the help."""
    parser = stage_parser(command, doc, reads)
    for name, text in inputs.items():
        parser.add_argument(f"--{name}", required=True, help=text)
    return read_stage(parser, argv)


def stage_settings(params: dict, section: str) -> dict:
    """What a caption stage's function takes from its settings, as keyword arguments: its config
    section as `settings`, section `models`, the seed and the device."""
    return {
        "settings": params[section],
        "models": params["models"],
        "seed": params["seed"],
        "device": params["device"],
    }


def parse_params(text: str | None) -> dict:
    """Stage parameters arrive from the workflow as one JSON object (a config section)."""
    if not text:
        return {}
    if text.startswith("@"):
        text = Path(text[1:]).read_text()
    params = json.loads(text)
    if not isinstance(params, dict):
        raise ValueError(f"--params must be a JSON object, got {type(params).__name__}")
    return params
