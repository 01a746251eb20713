"""The conda environment (envs/dalipipe.yaml) installs exactly pyproject.toml's dependencies.

    pytest tests/test_envs.py -q

A cluster user running ``snakemake --sdm conda`` gets this environment; if it drifts from
pyproject.toml, rules fail there with import errors that never show up locally.
"""

from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib", reason="Python >= 3.11 reads pyproject.toml")

ROOT = Path(__file__).resolve().parents[1]


def requirements(lines):
    parsed = {}
    for line in lines:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name not in parsed, f"{name} listed twice"
        parsed[name] = (requirement.specifier, requirement.extras, requirement.marker)
    return parsed


def test_env_lists_exactly_the_pyproject_dependencies():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    env = yaml.safe_load((ROOT / "envs" / "dalipipe.yaml").read_text())
    conda_packages = [d for d in env["dependencies"] if isinstance(d, str)]
    (pip_section,) = [d["pip"] for d in env["dependencies"] if isinstance(d, dict)]
    assert sorted(conda_packages) == ["pip", "python=3.11"]
    local = [line for line in pip_section if line.startswith("-e ")]
    assert local == ["-e .."], "the env installs dalipipe itself from the checkout"
    pins = [line for line in pip_section if line.startswith("-c ")]
    assert pins == ["-c ../constraints.txt"], "the env installs the versions CI tested"
    third_party = [line for line in pip_section if not line.startswith(("-e ", "-c "))]
    assert requirements(third_party) == requirements(pyproject["project"]["dependencies"])


def test_requirement_comparison_sees_a_changed_bound():
    assert requirements(["torch>=2.4"]) != requirements(["torch>=2.5"])
    assert requirements(["Pillow>=10"]) == requirements(["pillow >= 10"])


def pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    exact = [Requirement(line) for line in lines if line and not line.startswith("#")]
    return {canonicalize_name(r.name): str(r.specifier).removeprefix("==") for r in exact}


def test_constraints_pin_every_dependency_within_its_bounds():
    """constraints.txt (bash ci/lock.sh) holds the exact version CI tested of every package
    pyproject.toml asks for, inside the range pyproject.toml allows."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    wanted = pyproject["project"]["dependencies"] + [line for e in extras.values() for line in e]
    pinned = pins()
    for line in wanted:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        if name == canonicalize_name(pyproject["project"]["name"]):
            continue  # an extra of this package (test takes serve's), pinned by its own lines
        assert name in pinned, f"constraints.txt has no pin for {name}"
        assert requirement.specifier.contains(pinned[name]), f"{name}=={pinned[name]}: {line}"


def test_this_environment_is_the_one_the_constraints_describe():
    """The tests run on the pinned versions (CI installs with -c constraints.txt)."""
    from importlib.metadata import version

    for name in ("torch", "transformers", "snakemake", "numpy", "accelerate"):
        assert version(name).split("+")[0] == pins()[name], name
