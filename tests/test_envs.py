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
    third_party = [line for line in pip_section if not line.startswith("-e ")]
    assert requirements(third_party) == requirements(pyproject["project"]["dependencies"])


def test_requirement_comparison_sees_a_changed_bound():
    assert requirements(["torch>=2.4"]) != requirements(["torch>=2.5"])
    assert requirements(["Pillow>=10"]) == requirements(["pillow >= 10"])
