"""The paper's experiments (issue 18): published values, decoding as a setting, the prefix-pairs
sweep, the seeds and the `paper_figures` target.

HF_HUB_OFFLINE=1 pytest tests/test_experiments.py -x -q
"""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from dalipipe.caption.pairs import Pair, first_pairs
from dalipipe.config import section_defaults
from dalipipe.evaluate import tables
from dalipipe.paper import experiments, published, report
from tests.support.snakemake import SNAKEFILE, snakemake

REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- published values


def test_published_values_are_the_papers_tables():
    data = published.load()
    ac = {
        (e["method"], e["modality"], e["distilled"]): e
        for e in data["systems"]
        if e["dataset"] == "audiocaps"
    }
    # Table 1 as printed (Appendix G's Table 5 for BLEU-4, CIDEr-D, SPICE)
    assert ac[("", "image", False)]["spider"] == 0.1499
    assert ac[("ot_att", "audio", True)]["spider"] == 0.1592
    assert ac[("ot_att", "audio+image", True)]["spider"] == 0.1946
    assert ac[("contrastive", "audio", False)]["meteor"] == 0.0728
    assert ac[("mmd", "audio", False)]["spider"] == 0.1385
    assert ac[("mmd", "audio", True)]["cider_d"] == 0.1991
    clotho = {(e["method"], e["distilled"]): e for e in data["systems"] if e["dataset"] == "clotho"}
    assert clotho[("mmd", True)]["rouge_l"] == 0.2993 and clotho[("ot", False)]["spider"] == 0.0299
    assert len(ac) == 10 and len(clotho) == 8
    # the text's claims hold on the published numbers as matched to methods
    assert ac[("mmd", "audio", True)]["spider"] < ac[("mmd", "audio", False)]["spider"]
    for method in ("ot", "ot_att", "contrastive"):
        assert ac[(method, "audio", True)]["spider"] > ac[(method, "audio", False)]["spider"]
    assert clotho[("mmd", True)]["spider"] > clotho[("ot_att", True)]["spider"]


@pytest.mark.skipif(
    not Path("/work/shared/paper/an-eye-for-an-ear.txt").is_file(), reason="paper text absent"
)
def test_every_published_value_is_printed_in_the_paper():
    text = Path("/work/shared/paper/an-eye-for-an-ear.txt").read_text(encoding="utf-8")
    data = published.load()
    for entry in data["systems"] + data["others"]:
        for metric in published.METRICS:
            if entry.get(metric) is not None:
                printed = {f"{entry[metric]:.4f}", f"{entry[metric]:.3f}", f"{entry[metric]:g}"}
                assert any(f"| {p} |" in text for p in printed), (entry, metric)


def test_a_bad_published_file_names_the_entry(tmp_path):
    bad = tmp_path / "published.yaml"
    entry = {"dataset": "audiocaps", "table": "T1", "method": "mmd", "modality": "audio"}
    bad.write_text(yaml.safe_dump({"systems": [{**entry, "distilled": True, "spider": 14.2}]}))
    with pytest.raises(ValueError, match=r"systems\[0\]: spider must be a number in \[0, 1\]"):
        published.load(bad)
    bad.write_text(yaml.safe_dump({"systems": [entry]}))
    with pytest.raises(ValueError, match=r"systems\[0\]: missing \['distilled'\]"):
        published.load(bad)


class _System:
    def __init__(self, name, method, modality, distilled):
        self.name, self.method, self.modality, self.distilled = name, method, modality, distilled


def _evaluate_dir(root: Path, dataset: str, systems: list[tuple], world: bool) -> Path:
    """An evaluate stage's table.csv, table.md and summary.json with made-up scores."""
    root.mkdir(parents=True)
    rows = []
    for i, (name, method, modality, distilled) in enumerate(systems):
        scores = {m: round(0.01 * (i + 1), 4) for m in tables.CAPTION_COLUMNS}
        rows.append(tables.table_row(_System(name, method, modality, distilled), scores))
    tables.write_csv(root / "table.csv", rows, tables.columns(world=world))
    (root / "table.md").write_text(tables.markdown(rows, dataset, world=world))
    summary = {"dataset": dataset, "systems": [s[0] for s in systems], "n_clips": 2}
    (root / "summary.json").write_text(json.dumps(summary))
    return root


def test_tables_of_a_paper_set_show_the_published_values_and_the_miniature_its_own(tmp_path):
    audiocaps = _evaluate_dir(
        tmp_path / "audiocaps",
        "audiocaps",
        [
            ("image", "", "image", False),
            ("untrained", "", "audio", False),
            ("mmd_audio", "mmd", "audio", False),
            ("mmd_audio_distilled", "mmd", "audio", True),
            ("ot_att_audio_image_distilled", "ot_att", "audio+image", True),
        ],
        world=False,
    )
    mini = _evaluate_dir(
        tmp_path / "miniature", "miniature", [("mmd_audio", "mmd", "audio", False)], world=True
    )
    out_csv, out_md = tmp_path / "table.csv", tmp_path / "table.md"
    report.gather_tables([audiocaps, mini], out_csv, out_md)
    with open(out_csv, newline="") as f:
        rows = {(r["dataset"], r["system"]): r for r in csv.DictReader(f)}
    assert rows[("audiocaps", "image")]["paper_spider"] == "0.1499"
    assert rows[("audiocaps", "mmd_audio")]["paper_meteor"] == "0.133"
    assert rows[("audiocaps", "mmd_audio_distilled")]["paper_cider_d"] == "0.1991"
    assert rows[("audiocaps", "ot_att_audio_image_distilled")]["paper_spider"] == "0.1946"
    assert rows[("audiocaps", "untrained")]["paper_spider"] == ""  # not in the paper
    assert rows[("miniature", "mmd_audio")]["paper_spider"] == ""  # the miniature: its own only
    assert rows[("audiocaps", "mmd_audio")]["decoding"] == "greedy"
    md = out_md.read_text()
    assert "| DALI-MMD | audio | yes | 0.0400 | 0.1346 | 0.0400 | 0.3025 | 0.0400 | 0.1360 |" in md
    assert "| Image only (prefix) | image | no | 0.0100 | 0.1324 | 0.0100 | 0.3008 |" in md
    assert "Salewski et al. (CLAP, audio-text supervised) (Table 1 / Table 5)" in md
    assert md.count("measured beside the paper") == 1  # not for the miniature


# ----------------------------------------------------------------------------- decoding


def test_decoding_label_records_the_setting():
    assert tables.decoding_label({"decoding": "greedy", "temperature": 0.2}, 3) == "greedy"
    label = tables.decoding_label({"decoding": "sampled", "temperature": 0.2}, 3)
    assert label == "sampled T=0.2 top-k 50 seed 3"


def test_decoding_setting_reaches_generate(tiny_models):
    import torch

    from dalipipe.evaluate import run
    from dalipipe.models.captioner import AudioCaptioner

    captioner = AudioCaptioner.from_base(
        tiny_models.llava, audio_encoder=tiny_models.audio_encoder()
    )
    rs = np.random.RandomState(0)
    clips = [type("Clip", (), {"clip_id": f"c{i}"})() for i in range(4)]
    fbank = torch.randn(4, 64, 32, generator=torch.Generator().manual_seed(0)).numpy()
    inputs = {
        c.clip_id: (fbank[i], rs.randint(0, 255, (32, 32, 3), np.uint8))
        for i, c in enumerate(clips)
    }
    system = run.System("mmd_audio", "audio", "mmd", "audio", False, False)

    def captions(decoding, temperature=5.0, seed=7):
        # the evaluate section as a stage sees it: the schema's defaults under the job's values
        settings = {**section_defaults("evaluate"), "batch_size": 2, "max_new_tokens": 8}
        settings.update(decoding=decoding, temperature=temperature)
        return run.caption_all(captioner, system, clips, inputs, settings, seed)

    greedy = captions("greedy")
    assert greedy == captions("greedy", seed=8)  # greedy ignores the seed
    sampled = captions("sampled")
    assert sampled != greedy
    assert sampled == captions("sampled")  # same seed, same captions
    assert sampled != captions("sampled", seed=8)


# ----------------------------------------------------------------------------- prefix-pairs sweep


def test_first_pairs_are_seeded_and_nested():
    pairs = [Pair(f"p{i}", None, f"caption {i}") for i in range(16)]
    ids = {n: [p.clip_id for p in first_pairs(pairs, n, seed=0)] for n in (1, 2, 4, 8, 16)}
    for small, large in ((1, 2), (2, 4), (4, 8), (8, 16)):
        assert ids[large][:small] == ids[small]
    assert sorted(ids[16]) == sorted(p.clip_id for p in pairs)
    assert ids[4] == [p.clip_id for p in first_pairs(pairs, 4, seed=0)]
    assert ids[8] != [p.clip_id for p in first_pairs(pairs, 8, seed=1)]
    with pytest.raises(ValueError, match="asked for 17 pairs, the source holds 16"):
        first_pairs(pairs, 17, seed=0)


def _row(system, method, modality, distilled, **scores):
    row = {"system": system, "method": method, "modality": modality, "distilled": distilled}
    return {**row, **{m: scores.get(m) for m in experiments.METRICS}}


def test_sweep_rows_and_figure(tmp_path):
    tables_by_n = {
        4: [
            _row("image", "", "image", False, cider_d=0.3),
            _row("ot_att_audio", "ot_att", "audio", False, cider_d=0.2),
        ],
        1: [
            _row("image", "", "image", False, cider_d=0.1),
            _row("ot_att_audio", "ot_att", "audio", False, cider_d=0.05),
        ],
    }
    rows = experiments.sweep_rows(tables_by_n)
    assert [(r["n_pairs"], r["system"], r["cider_d"]) for r in rows] == [
        (1, "image", 0.1), (1, "ot_att_audio", 0.05), (4, "image", 0.3), (4, "ot_att_audio", 0.2),
    ]  # fmt: skip
    experiments.plot_sweep(rows, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="no caption metric"):
        experiments.plot_sweep([{**r, "cider_d": None} for r in rows], tmp_path / "x.png")


def test_sweep_command_reads_evaluate_folders(tmp_path):
    folders = []
    for n in (1, 2):
        folders.append(
            _evaluate_dir(
                tmp_path / str(n), "miniature", [("image", "", "image", False)], world=True
            )
        )
    out = tmp_path / "sweep.csv"
    args = ["sweep", "--pairs", "1", "2", "--evaluate", *map(str, folders)]
    experiments.main([*args, "--out-csv", str(out), "--out-png", str(tmp_path / "s.png")])
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["n_pairs"], r["system"], r["cider_d"]) for r in rows] == [
        ("1", "image", "0.01"), ("2", "image", "0.01"),
    ]  # fmt: skip


# ----------------------------------------------------------------------------- seeds


def test_spread_is_the_mean_and_sample_deviation():
    s = experiments.spread([0.1, 0.2, 0.4])
    assert s["mean"] == pytest.approx(0.7 / 3)
    assert s["std"] == pytest.approx(
        math.sqrt((0.4 / 3) ** 2 + (0.1 / 3) ** 2 + (0.5 / 3) ** 2) / math.sqrt(2)
    )
    assert s["std"] == pytest.approx(0.152752523)
    assert (s["min"], s["max"], s["n"]) == (0.1, 0.4, 3)
    assert experiments.spread([0.5]) == {"mean": 0.5, "std": 0.0, "min": 0.5, "max": 0.5, "n": 1}


def paper_like_table(**changes) -> list[dict]:
    """One seed's table where every ordering of the paper holds; `changes` edit CIDEr-D."""
    cider = {
        ("image", False, "image"): 0.9,
        ("untrained", False, "audio"): 0.1,
        ("mmd", False, "audio"): 0.6, ("mmd", True, "audio"): 0.55,
        ("ot", False, "audio"): 0.5, ("ot", True, "audio"): 0.7,
        ("ot_att", False, "audio"): 0.55, ("ot_att", True, "audio"): 0.8,
        ("contrastive", False, "audio"): 0.3, ("contrastive", True, "audio"): 0.4,
        ("ot", False, "audio+image"): 0.6, ("ot", True, "audio+image"): 0.9,
        ("ot_att", False, "audio+image"): 0.7, ("ot_att", True, "audio+image"): 0.95,
        ("mmd", False, "audio+image"): 0.1,  # no claim about MMD with the image
    }  # fmt: skip
    for key, value in changes.items():
        method, stage, modality = key.split("__")
        cider[(method, stage == "distilled", modality.replace("_", "+"))] = value
    rows = []
    for (method, distilled, modality), value in cider.items():
        name = method if method in ("image", "untrained") else f"{method}_{modality}_{distilled}"
        recall = 0.1 if method == "untrained" else 0.6
        rows.append(
            _row(
                name,
                "" if method in ("image", "untrained") else method,
                modality,
                distilled,
                cider_d=value,
                class_recall=recall,
                class_precision=0.5,
            )
        )
    return experiments.with_f1(rows)


def test_orderings_pass_on_a_table_where_the_paper_holds():
    checks = experiments.orderings(paper_like_table(), "cider_d")
    assert {c["status"] for c in checks} == {"pass"}
    claims = [c["claim"] for c in checks]
    assert claims.count("distillation lifts ot") == 1 and len(claims) == 4 + 3 + 3 + 1 + 4
    assert "distillation lifts mmd" not in claims  # the paper does not claim it
    best = next(c for c in checks if c["claim"].startswith("best OT"))
    assert best["detail"] == "ot_att distilled 0.8000 >= mmd distilled 0.5500"


@pytest.mark.parametrize(
    "change, claim",
    [
        ({"ot__distilled__audio": 0.45}, "distillation lifts ot"),
        ({"contrastive__zero__audio": 0.65}, "mmd above contrastive before distillation"),
        ({"mmd__distilled__audio": 0.85}, "best OT variant at least MMD after distillation"),
        (
            {"ot_att__zero__audio_image": 0.5},
            "audio+image at least audio alone for ot_att (zero-shot)",
        ),
    ],
)
def test_each_broken_ordering_fails(change, claim):
    checks = {
        c["claim"]: c["status"]
        for c in experiments.orderings(paper_like_table(**change), "cider_d")
    }
    assert checks[claim] == "fail"
    assert sum(status == "fail" for status in checks.values()) >= 1


def test_class_f1_ordering_fails_when_an_encoder_is_no_better_than_untrained():
    rows = paper_like_table()
    for row in rows:
        if row["method"] == "ot" and row["modality"] == "audio" and not row["distilled"]:
            row.update(class_recall=0.1, class_precision=0.5)
    checks = {c["claim"]: c for c in experiments.orderings(rows, "cider_d")}
    assert checks["aligned ot above the untrained encoder in class F1"]["status"] == "fail"
    assert checks["aligned mmd above the untrained encoder in class F1"]["status"] == "pass"


def test_a_missing_system_is_skipped_not_failed():
    rows = [r for r in paper_like_table() if r["method"] != "contrastive"]
    checks = {c["claim"]: c for c in experiments.orderings(rows, "cider_d")}
    assert checks["mmd above contrastive before distillation"]["status"] == "skip"
    assert "distillation lifts contrastive" not in checks


def test_seeds_report_means_spreads_and_orderings_per_seed(tmp_path):
    by_seed = {0: paper_like_table(), 1: paper_like_table(ot__distilled__audio=0.4),
               2: paper_like_table(ot__distilled__audio=0.6)}  # fmt: skip
    summary = {(r["system"], r["metric"]): r for r in experiments.seed_summary(by_seed)}
    ot = summary[("ot_audio_True", "cider_d")]
    assert ot["mean"] == pytest.approx(0.5666666667) and ot["n"] == 3
    assert ot["std"] == pytest.approx(
        math.sqrt(((0.7 - 17 / 30) ** 2 + (0.4 - 17 / 30) ** 2 + (0.6 - 17 / 30) ** 2) / 2)
    )
    assert (ot["min"], ot["max"]) == (0.4, 0.7)
    assert summary[("untrained", "class_f1")]["mean"] == pytest.approx(2 * 0.1 * 0.5 / 0.6)
    md = experiments.seeds_markdown(by_seed, "cider_d")
    line = next(x for x in md.splitlines() if "distillation lifts ot:" in x)
    assert line.startswith("- FAIL distillation lifts ot: seed 0: pass")
    assert "seed 1: fail (ot distilled 0.4000 > ot zero-shot 0.5000)" in line
    assert "- PASS distillation lifts ot_att:" in md
    assert "| ot_audio_True |" in md and "0.5667 ± 0.1528" in md


def test_seeds_command_reads_gathered_tables(tmp_path):
    paths = []
    for seed, cider in ((0, 0.5), (1, 0.7)):
        path = tmp_path / f"seed{seed}.csv"
        rows = [{"dataset": "miniature", **r} for r in paper_like_table(ot__distilled__audio=cider)]
        cols = ["dataset", "system", "method", "modality", "distilled", *experiments.METRICS]
        experiments.write_rows(path, rows, cols)
        paths.append(str(path))
    out_csv, out_md = tmp_path / "seeds.csv", tmp_path / "seeds.md"
    experiments.main(
        [
            "seeds",
            "--seeds",
            "0",
            "1",
            "--tables",
            *paths,
            "--out-csv",
            str(out_csv),
            "--out-md",
            str(out_md),
        ]
    )
    with open(out_csv, newline="") as f:
        rows = {(r["system"], r["metric"]): r for r in csv.DictReader(f)}
    assert float(rows[("ot_audio_True", "cider_d")]["mean"]) == pytest.approx(0.6)
    assert "- FAIL distillation lifts ot: seed 0: pass" not in out_md.read_text()
    assert "- FAIL distillation lifts ot: seed 0: fail" in out_md.read_text()


# ----------------------------------------------------------------------------- the plan


@pytest.fixture
def workdir(tmp_path) -> Path:
    """An empty working directory with the repository's config.yaml (the Snakefile's)."""
    (tmp_path / "config.yaml").write_text((REPO / "config.yaml").read_text())
    return tmp_path


def jobs(plan: str) -> dict[str, int]:
    stats = plan.split("Job stats:")[-1].split("Reasons:")[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", stats, re.M)}


def test_paper_figures_plans_the_sweep_and_the_seeds(snakemake_in, workdir):
    plan = snakemake_in(workdir, "-n", "-p", "paper_figures")
    counts = jobs(plan)
    assert counts["prefix_sweep"] == 5 and counts["prefix_sweep_evaluate"] == 5
    assert counts["prefix_sweep_report"] == 1 and counts["paper_figures"] == 1
    assert counts["seed_run"] == 2 and counts["seeds_report"] == 1  # seed 0 is this run's table
    assert counts["report_figures"] == 1 and counts["prefix"] == 1
    for n in (1, 2, 4, 8, 16):
        assert f"results/miniature/experiments/prefix_pairs/{n}/evaluate" in plan
        assert f'"n_pairs": {n}' in plan
    assert (
        '"systems": ["image", "audio"]' in plan and "--align results/miniature/align/ot_att" in plan
    )
    for seed in (1, 2):
        assert f"results/miniature/experiments/seeds/seed{seed}.csv" in plan
        assert f"--config seed={seed} run=miniature-seed{seed}" in plan
    assert "results/miniature/experiments/seeds/seed0.csv" not in plan
    assert "--seeds 0 1 2 --tables results/miniature/table.csv" in plan


def test_a_seed_run_is_the_whole_run_at_that_seed(snakemake_in, workdir):
    """The seed_run job's nested snakemake, dry: the same config, seed 1, its own directory."""
    plan = snakemake_in(workdir, "-n", "-p", "results/miniature/experiments/seeds/seed1.csv")
    line = next(line for line in plan.splitlines() if "printf '%s'" in line)
    command = line[line.index("printf '%s'") :]
    command = command.split(" > logs/", 1)[0].replace("-m snakemake", "-m snakemake -n -p", 1)
    (workdir / "results/miniature/experiments/seeds").mkdir(parents=True)
    nested = subprocess.run(
        command, shell=True, cwd=workdir, capture_output=True, text=True, timeout=300
    )
    assert nested.returncode == 0, nested.stdout[-3000:] + nested.stderr[-3000:]
    counts = jobs(nested.stdout)
    assert counts["align"] == 4 and counts["distill"] == 4 and counts["evaluate"] == 1
    assert "results/miniature-seed1/table.csv" in nested.stdout
    assert '"seed": 1' in nested.stdout and '"seed": 0' not in nested.stdout
    outputs = re.findall(r"^\s+output: (.+)$", nested.stdout, re.M)
    assert outputs and all(o.startswith("results/miniature-seed1/") for o in outputs), outputs


def dry_run_with(workdir, settings: str, *targets: str) -> subprocess.CompletedProcess:
    """`snakemake -n` of the miniature with `settings` (YAML) laid over its config."""
    (workdir / "sweep.yaml").write_text(settings)
    return snakemake(
        "-n", "-s", str(SNAKEFILE), "-d", str(workdir),
        "--configfile", str(workdir / "sweep.yaml"), "--", *targets,
        timeout=300,
    )  # fmt: skip


def test_a_sweep_beyond_the_prefix_split_stops_the_plan(workdir):
    result = dry_run_with(workdir, "experiments: {prefix_pairs: [4, 32]}\n", "paper_figures")
    assert result.returncode != 0
    assert "experiments.prefix_pairs: 32 pairs asked for, and the prefix split has 16" in (
        result.stdout + result.stderr
    )


def test_a_sweep_beyond_the_prefix_split_leaves_the_main_run_alone(workdir):
    """The check is the sweep's: a world with fewer prefix clips still plans its table."""
    result = dry_run_with(workdir, "experiments: {prefix_pairs: [4, 32]}\n", "all")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "prefix_sweep" not in result.stdout


def test_a_sweep_method_that_is_not_evaluated_stops_the_plan(workdir):
    result = dry_run_with(workdir, "experiments: {prefix_sweep_method: nope}\n", "paper_figures")
    assert result.returncode != 0
    assert "experiments.prefix_sweep_method: 'nope' is not one of the evaluated methods" in (
        result.stdout + result.stderr
    )


def test_without_ot_att_the_sweep_takes_the_first_evaluated_method(snakemake_in, workdir):
    """configs/ci.yaml aligns mmd and ot only: the sweep scores mmd, and plans over 4 pairs."""
    plan = snakemake_in(
        workdir, "-n", "-p", "--configfile", str(REPO / "configs/ci.yaml"), "--", "paper_figures"
    )
    assert "--align results/ci/align/mmd" in plan
    assert jobs(plan)["prefix_sweep"] == 3
