"""The package stands alone: `pip install` (not editable) gives every stage its defaults.

The wheel is built from a copy of the sources and installed without its dependencies into a
fresh virtual environment that borrows the already installed ones (torch is not downloaded
again); a stage then runs there with its defaults, from a folder outside the repository.
"""

import ast
import csv
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
REPO = Path(__file__).resolve().parents[1]
# used by the workflow rather than imported by the package: Snakemake runs the rules, and its
# Slurm executor plugin the cluster profile (slurm/config.yaml)
WORKFLOW_DEPENDENCIES = {"snakemake", "snakemake-executor-plugin-slurm"}


def run(*command, **kwargs) -> str:
    result = subprocess.run(
        [str(c) for c in command], capture_output=True, text=True, timeout=600, **kwargs
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.slow
def test_the_installed_package_runs_a_stage_with_its_defaults(tmp_path):
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "dalipipe", source / "dalipipe", ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
        tmp_path / "wheel", source)  # fmt: skip
    [wheel] = (tmp_path / "wheel").glob("dalipipe-*.whl")

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", wheel)
    purelib = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
                   .strip())  # fmt: skip
    # the installed dependencies, after the venv's own packages; a plain path line, so the
    # checkout's editable install (a .pth hook there) is not picked up
    (purelib / "installed-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = run(python, "-c", "import dalipipe; print(dalipipe.__file__)", cwd=elsewhere, env=env)
    assert Path(where.strip()).is_relative_to(purelib)
    keep = run(python, "-c", "from dalipipe.config import section_defaults as d; "
               "print(d('filter')['keep'])", cwd=elsewhere, env=env)  # fmt: skip
    assert keep.strip() == "0.9"

    part = elsewhere / "part-0"
    part.mkdir()
    with open(part / "distances.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["clip_id", "distance", "n_frames", "labels", "frame_distances"])
        writer.writerows([f"clip{i:02d}", i / 10, 1, "dog", i / 10] for i in range(10))
    run(venv / "bin" / "dalipipe", "filter-merge", "--parts", part, "--out", elsewhere / "filter",
        cwd=elsewhere, env=env)  # fmt: skip
    kept = (elsewhere / "filter" / "kept.txt").read_text().split()
    assert kept == [f"clip{i:02d}" for i in range(9)]  # the schema's 0.9 of 10


def imported_distributions() -> set[str]:
    """The installed distributions that dalipipe's modules import."""
    modules = set()
    for path in (REPO / "dalipipe").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    modules -= set(sys.stdlib_module_names) | {"dalipipe"}
    by_module = importlib.metadata.packages_distributions()
    missing = sorted(m for m in modules if m not in by_module)
    assert missing == [], f"imported but not installed: {missing}"
    return {name.lower().replace("_", "-") for m in modules for name in by_module[m]}


def test_dependencies_are_what_the_package_imports_or_the_workflow_runs():
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]

    def names(specs):
        return {re.split(r"[<>=!~ \[;]", spec)[0].lower().replace("_", "-") for spec in specs}

    declared = names(project["dependencies"])
    # the caption page (`dalipipe serve`) imports its server only when run: the extra `serve`
    serve = names(project["optional-dependencies"]["serve"])
    imported = imported_distributions()
    assert imported - declared <= serve, "imported, declared nowhere"
    assert declared == (imported - serve) | WORKFLOW_DEPENDENCIES


def test_package_data_names_files_that_exist():
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    patterns = tomllib.loads(text)["tool"]["setuptools"]["package-data"]["dalipipe"]
    for pattern in patterns:
        assert list((REPO / "dalipipe").glob(pattern)), pattern
    assert (REPO / "dalipipe" / "resources" / "config.schema.yaml").is_file()
