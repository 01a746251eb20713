"""bench/suite.py at tiny scale (the GPU suite's code paths, on the CPU), its result file, the
compute bill made from it (bench/bill.py) and the README section (bench/readme_table.py)."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import bill, common, readme_table, suite
from dalipipe.config import load_config, merge

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"

PAPER = REPO / "configs" / "paper.yaml"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One `--scale tiny` run in a subprocess, as a user runs it: (result file, stdout)."""
    out = tmp_path_factory.mktemp("suite")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(BENCH / "suite.py"), "--scale", "tiny", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    files = common.result_files(out)
    assert len(files) == 1, files
    return files[0], proc.stdout


@pytest.mark.slow
def test_tiny_suite_measures_every_figure(tiny_run):
    path, stdout = tiny_run
    result = common.load_result(path)  # the format check
    machine = result["machine"]
    assert machine["scale"] == "tiny" and machine["gpu"] is None
    assert machine["cpu"] and machine["cpu_cores"] >= 1
    assert machine["torch"] and machine["transformers"] and machine["python"]
    assert path.name == common.result_name(machine)
    assert [f["name"] for f in result["figures"]] == suite.figure_names(
        suite.scale_settings("tiny")
    )
    for f in result["figures"]:
        assert "error" not in f, f"{f['name']}: {f.get('error')}"
        assert list(f)[:6] == list(common.FIGURE_KEYS)
        assert isinstance(f["shape"], dict) and f["unit"]
        assert math.isfinite(f["value"]) and f["value"] > 0, f
        if f["baseline_value"] is not None:
            assert f["baseline"] and math.isfinite(f["baseline_value"]), f
            assert f["baseline_value"] > 0, f
        assert f["name"] in stdout  # the printed table
    by_name = {f["name"]: f for f in result["figures"]}
    measured_beside = [
        "align.ot.step",
        "align.ot_att.step",
        "align.ot_exact_pool.step",
        "prefix.step",
        "distill.step",
        "filter.batch2",
        "filter.batch4",
    ]
    for name in measured_beside:
        assert by_name[name]["baseline_value"] > 0, name
    # the fast generation path is measured beside the plain one where the captioner has it
    from dalipipe.models.captioner import AudioCaptioner

    if suite.fast_keyword(AudioCaptioner) is not None:
        assert by_name["pseudolabel.batch4"]["baseline"] == "plain generate"
    # the memory plan's estimate of the same step, at the same shapes, is near the measured peak
    for stage in ("prefix", "distill"):
        peak = by_name[f"{stage}.peak_memory"]
        assert 0.5 < peak["value"] / peak["baseline_value"] < 2, peak
    # the Sinkhorn cost is compared with exact EMD's on the same batch
    gap = by_name["align.ot.cost_gap"]["detail"]
    assert gap["max_percent"] >= by_name["align.ot.cost_gap"]["value"]
    assert gap["exact_mean"] > 0


def fake_result(tmp_path, scale="paper", gpu="NVIDIA H200") -> Path:
    """A result file of the suite's format with made-up values, for the renderer and the bill."""
    s = suite.scale_settings(scale)
    figures = []
    for i, name in enumerate(suite.figure_names(s)):
        shape = {"batch": 256 if name.startswith("align") else 40}
        if name.startswith(("pseudolabel", "filter")):
            shape = {"batch": int(name.rsplit("batch", 1)[1]), "new_tokens": 32}
        if name == "align.ot_exact_pool.step":
            shape["solver"] = "exact EMD, process pool of 16"
        unit = "clips/s" if name.startswith(("pseudolabel", "filter", "extract")) else "s/step"
        figures.append(common.figure(name, shape, 1.0 + i, unit, "a baseline", 2.0 + i))
    machine = {
        "gpu": gpu,
        "cpu": "a CPU",
        "cpu_cores": 16,
        "torch": "2",
        "transformers": "5",
        "python": "3.11",
        "scale": scale,
        "date": "2026-12-01T10:00:00+00:00",
    }
    return common.write_result(tmp_path, machine, figures)


def test_readme_section_from_the_newest_gpu_result(tmp_path):
    config = load_config(PAPER)
    assert "No GPU run of the suite exists yet" in readme_table.render(tmp_path, config)
    fake_result(tmp_path, scale="tiny", gpu=None)
    assert "No GPU run of the suite exists yet" in readme_table.render(tmp_path, config)
    path = fake_result(tmp_path)
    section = readme_table.render(tmp_path, config)
    assert "NVIDIA H200" in section and path.name in section
    for name in suite.figure_names(suite.scale_settings("paper")):
        assert f"| {name} |" in section
    total = bill.compute_bill(common.load_result(path), config)["total_hours"]
    assert f"**{total:.1f}**" in section

    readme = (REPO / "bench" / "README.md").read_text()
    updated = readme_table.replace_section(readme, section)
    outside = readme.split(readme_table.BEGIN)[0], readme.split(readme_table.END)[1]
    assert updated.startswith(outside[0]) and updated.endswith(outside[1])
    assert readme_table.replace_section(updated, section) == updated
    with pytest.raises(ValueError, match="x.md: expected one"):
        readme_table.replace_section(readme.replace(readme_table.END, ""), section, "x.md")


def test_committed_readme_matches_the_committed_results():
    assert readme_table.main(["--check"]) == 0


def test_bad_result_file_names_the_file_and_field(tmp_path):
    path = fake_result(tmp_path)
    data = json.loads(path.read_text())
    del data["figures"][3]["unit"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"{path.name}: figures\[3\] lacks \['unit'\]"):
        common.load_result(path)
    data["figures"][3]["unit"] = "s/step"
    data["figures"][3]["value"] = float("nan")
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="value nan"):
        common.load_result(path)
    del data["machine"]["gpu"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"machine lacks \['gpu'\]"):
        common.load_result(path)


@pytest.mark.slow
def test_bill_from_the_tiny_result(tiny_run):
    result = common.load_result(tiny_run[0])
    config = load_config(PAPER)
    methods = config["align"]["methods"]
    by_name = {f["name"]: f for f in result["figures"]}
    made = bill.compute_bill(result, config)
    rows = {r["stage"]: r["hours"] for r in made["rows"]}
    assert [r["stage"] for r in made["rows"]] == [
        "filter",
        "prefix",
        *[f"align {m}" for m in methods],
        *[f"pseudolabel {m}" for m in methods],
        *[f"distill {m}" for m in methods],
        "evaluate",
    ]
    assert made["missing"] == []
    assert all(h > 0 and math.isfinite(h) for h in rows.values())
    assert made["total_hours"] == pytest.approx(sum(rows.values()))
    # by hand: every listed clip's 10 frames at the rate of the batch nearest the config's (64)
    frames = bill.PAPER_CLIPS["align_pool"] * int(config["extract"]["window_seconds"])
    assert rows["filter"] == pytest.approx(frames / by_name["filter.batch4"]["value"] / 3600)
    batch = by_name["align.mmd.step"]["shape"]["batch"]
    steps = config["align"]["epochs"] * (config["filter"]["keep"] // batch)
    assert rows["align mmd"] == pytest.approx(steps * by_name["align.mmd.step"]["value"] / 3600)
    assert rows["prefix"] == pytest.approx(
        config["prefix"]["epochs"] * by_name["prefix.step"]["value"] / 3600
    )  # 16 pairs in one batch of 16
    # paper.yaml solves OT exactly (the pooled figure); the sinkhorn solver uses the fast one
    pooled = by_name["align.ot_exact_pool.step"]["value"]
    assert rows["align ot"] == pytest.approx(steps * pooled / 3600)
    fast = bill.compute_bill(result, merge(config, {"align": {"ot": {"solver": "sinkhorn"}}}))
    fast_rows = {r["stage"]: r["hours"] for r in fast["rows"]}
    assert fast_rows["align ot"] == pytest.approx(steps * by_name["align.ot.step"]["value"] / 3600)
    assert fast_rows["align mmd"] == rows["align mmd"]

    # a failed figure: its stage is left out of the total and named
    broken = copy.deepcopy(result)
    for f in broken["figures"]:
        if f["name"] == "prefix.step":
            f.update(value=None, error="OutOfMemoryError: CUDA out of memory")
    made_broken = bill.compute_bill(broken, config)
    assert made_broken["missing"] == ["prefix.step"]
    assert made_broken["total_hours"] == pytest.approx(made["total_hours"] - rows["prefix"])


def test_sections_past_the_budget_are_recorded_not_run(tmp_path):
    path = suite.run_suite("tiny", tmp_path, budget_s=-1)  # no section may start
    result = common.load_result(path)
    names = suite.figure_names(suite.scale_settings("tiny"))
    assert [f["name"] for f in result["figures"]] == names
    for f in result["figures"]:
        assert f["value"] is None and "budget was spent" in f["error"]
    made = bill.compute_bill(result, load_config(PAPER))
    assert made["total_hours"] == 0 and "filter.batch*" in made["missing"]
    result["machine"].update(scale="paper", gpu="NVIDIA H100")
    common.write_result(tmp_path / "paper", result["machine"], result["figures"])
    section = readme_table.render(tmp_path / "paper", load_config(PAPER))
    assert section.count("**failed**: TimeoutError") == len(names)
