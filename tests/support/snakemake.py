"""The one way the tests run Snakemake: `python -m snakemake` of this interpreter, in a subprocess.

The workflow's rules call `dalipipe`, so `workflow_env` puts this interpreter's bin/ first on
PATH. A run under `limit` goes through `timeout -k 10` (a stuck Snakemake ignores SIGTERM), and
a run killed that way leaves its directory unlocked for the next one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SNAKEFILE = REPO / "Snakefile"
KILLED = (124, 137)  # exit codes of `timeout`: the command ran past its limit, or ignored TERM
SNAKEMAKE = (sys.executable, "-m", "snakemake")


def workflow_env(base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
    """`base` (default: this process's environment) with `extra`, and this interpreter's bin/
    first on PATH."""
    env = {**(os.environ if base is None else base), **extra}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def snakemake_command(
    *args: str,
    limit: int | None = None,
    preset: tuple[str, ...] | list[str] = (),
    program: tuple[str, ...] = SNAKEMAKE,
) -> list[str]:
    """The command line `snakemake` runs (for a test that starts it with Popen); `program`:
    how Snakemake is started (tests/support/slurm.py `SLURM_SNAKEMAKE` for the Slurm tests)."""
    command = [*program, *preset, *args]
    return command if limit is None else ["timeout", "-k", "10", str(limit), *command]


def snakemake(
    *args: str,
    cwd: Path = REPO,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
    merged: bool = False,
    limit: int | None = None,
    preset: tuple[str, ...] | list[str] = (),
    program: tuple[str, ...] = SNAKEMAKE,
) -> subprocess.CompletedProcess:
    """`snakemake *preset *args` in `cwd`; text output, stderr in stdout when `merged`.

    `timeout`: Python's limit (raises TimeoutExpired). `limit`: seconds under `timeout -k 10`;
    when it kills the run, `snakemake *preset --unlock` frees the directory (`preset`: the
    arguments that choose the profile and config, which the unlock needs too).
    """
    result = subprocess.run(
        snakemake_command(*args, limit=limit, preset=preset, program=program),
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merged else subprocess.PIPE,
        text=True,
        timeout=timeout,
    )
    if limit is not None and result.returncode in KILLED:
        unlock = snakemake_command("--unlock", limit=60, preset=preset, program=program)
        subprocess.run(unlock, cwd=cwd, env=env, capture_output=True)
    return result


def output(result: subprocess.CompletedProcess) -> str:
    """All a run printed (stdout, then stderr where it was kept apart)."""
    return result.stdout + (result.stderr or "")
