"""Two runs with the same seed give the same results, byte for byte.

    pytest tests/test_determinism.py -m slow     # ~5 min on 2 cores

The CI preset (configs/ci.yaml: every stage, on a tiny world) runs twice from empty directories;
every trained weight, caption, pseudo-label, shard and score must be the same in both; only
wall-clock fields (`seconds` in curves and summaries) may differ.
The world is encoded losslessly (world.lossless_video, the default): with x264's lossy encoding
a few clips now and then decode differently from run to run (docs/miniature.md, "Same seed, same table").
"""

import csv
import hashlib
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Artifacts that are the result: weights, data, captions, pseudo-labels, scores and summaries.
COMPARED = ("*.safetensors", "*.jsonl", "*.tar", "table.csv", "*.json")


def without_time(value):
    """A JSON value less its wall-clock fields (`seconds`), which may differ between runs."""
    if isinstance(value, dict):
        return {k: without_time(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [without_time(v) for v in value]
    return value


def digests(results: Path) -> dict[str, str]:
    files = {p for pattern in COMPARED for p in results.rglob(pattern)}
    # <stage>/part-<i>.work/ are resumable journals (they record the models' file times)
    files = sorted(p for p in files if not any(part.endswith(".work") for part in p.parts))
    found = {}
    for path in files:
        content = path.read_bytes()
        if path.suffix == ".json":
            content = json.dumps(without_time(json.loads(content)), sort_keys=True).encode()
        found[str(path.relative_to(results))] = hashlib.sha256(content).hexdigest()
    return found


def curve_without_time(path: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(open(path))]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, snakemake_in) -> list[Path]:
    runs = []
    for name in ("first", "second"):
        workdir = tmp_path_factory.mktemp(name)
        (workdir / "config.yaml").write_text((REPO / "config.yaml").read_text())
        snakemake_in(workdir, "--configfile", str(REPO / "configs" / "ci.yaml"), timeout=1800)
        runs.append(workdir / "results" / "ci")
    return runs


@pytest.mark.slow
def test_two_runs_write_the_same_artifacts(two_runs):
    first, second = (digests(run) for run in two_runs)
    # every kind of result is among those compared, so an empty match cannot pass
    for expected in (
        "models/llava/model.safetensors",
        "align/ot/audio_encoder.safetensors",
        "prefix/prefix.safetensors",
        "distill/mmd/audio_projector.safetensors",
        "pseudolabel/ot.jsonl",
        "table.csv",
        "evaluate/miniature/ot_audio.json",
    ):
        assert expected in first, expected
    assert first.keys() == second.keys()
    differing = sorted(name for name in first if first[name] != second[name])
    assert not differing, differing


@pytest.mark.slow
def test_training_curves_agree_except_wall_clock(two_runs):
    first, second = two_runs
    curves = sorted(first.rglob("curve.csv"))
    # bootstrap, prefix, and align + distill for each of the preset's two methods
    assert len(curves) == 6, curves
    for curve in curves:
        twin = second / curve.relative_to(first)
        assert curve_without_time(curve) == curve_without_time(twin), curve
