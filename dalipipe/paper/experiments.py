"""The paper's experiments beyond one table: Appendix A's prefix-pairs sweep and the seeds.

    dalipipe experiments sweep --pairs 1 2 4 --evaluate results/miniature/experiments/prefix_pairs/{1,2,4}/evaluate \
        --out-csv results/miniature/experiments/prefix_pairs.csv --out-png results/miniature/report/prefix_pairs.png
    dalipipe experiments seeds --seeds 0 1 2 --tables seed0.csv seed1.csv seed2.csv \
        --metric cider_d --out-csv results/miniature/experiments/seeds.csv --out-md results/miniature/report/seeds.md

sweep: one row per (number of pairs, system) with every caption metric, and the metrics drawn
against the number of pairs (paper Figure 5). seeds: each system's metrics over the seeds' tables
as mean, sample standard deviation, min and max, and the paper's orderings checked on every seed
(`orderings`), written as a pass/fail list.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
from pathlib import Path

from dalipipe.common import atomic_path, setup_logging
from dalipipe.evaluate.tables import CAPTION_COLUMNS, LABELS, read_csv
from dalipipe.world.scores import WORLD_METRICS

log = logging.getLogger(__name__)

METRICS = CAPTION_COLUMNS + WORLD_METRICS + ["class_f1"]
DISTRIBUTION_METHODS = ("mmd", "ot", "ot_att")  # aligned on token distributions
OT_METHODS = ("ot", "ot_att")
LIFTED_BY_DISTILLATION = ("ot", "ot_att", "contrastive")  # the paper: MMD is not lifted


def override_params(params_json: str, overrides: dict) -> str:
    """A rule's `--params` JSON with sections replaced key by key (the sweep's evaluation)."""
    params = json.loads(params_json)
    for path, value in overrides.items():
        *parents, last = path.split(".")
        node = params
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return json.dumps(params, sort_keys=True)


def class_f1(row: dict) -> float | None:
    """Harmonic mean of class recall and precision (the world's class F1), None without both."""
    r, p = row.get("class_recall"), row.get("class_precision")
    if r is None or p is None:
        return None
    return 0.0 if r + p == 0 else 2 * r * p / (r + p)


def with_f1(rows: list[dict]) -> list[dict]:
    return [{**row, "class_f1": class_f1(row)} for row in rows]


# ----------------------------------------------------------------------------- sweep


def sweep_rows(tables: dict[int, list[dict]]) -> list[dict]:
    """{n_pairs: the evaluation's rows} -> one row per (n_pairs, system), n ascending."""
    out = []
    for n in sorted(tables):
        for row in tables[n]:
            out.append({"n_pairs": n, "system": row["system"], **{m: row.get(m) for m in METRICS}})
    return out


def plot_sweep(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in CAPTION_COLUMNS if any(r.get(m) is not None for r in rows)]
    if not metrics:
        raise ValueError("prefix-pairs sweep: no caption metric was computed for any system")
    systems = list(dict.fromkeys(r["system"] for r in rows))
    fig, axes = plt.subplots(1, len(metrics), figsize=(2.8 * len(metrics), 2.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for system in systems:
            points = [
                (r["n_pairs"], r[metric])
                for r in rows
                if r["system"] == system and r[metric] is not None
            ]
            if points:
                ax.plot(*zip(*points), marker="o", label=system)
        ax.set_xscale("log", base=2)
        ns = sorted({r["n_pairs"] for r in rows})
        ax.set_xticks(ns, [str(n) for n in ns])  # the numbers of pairs, not powers of 2
        ax.set_xlabel("prefix pairs")
        ax.set_title(LABELS.get(metric, metric), fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- seeds


def spread(values: list[float]) -> dict:
    """mean, sample standard deviation (ddof 1; 0 for one value), min, max and n."""
    n = len(values)
    if n == 0:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": n}


def seed_summary(tables: dict[int, list[dict]]) -> list[dict]:
    """One row per (system, metric) over the seeds' tables, systems in the first table's order."""
    systems = list(dict.fromkeys(r["system"] for rows in tables.values() for r in rows))
    out = []
    for system in systems:
        for metric in METRICS:
            values = [
                row[metric]
                for rows in tables.values()
                for row in rows
                if row["system"] == system and row.get(metric) is not None
            ]
            if values:
                out.append({"system": system, "metric": metric, **spread(values)})
    return out


def _find(rows: list[dict], method: str, modality: str, distilled: bool) -> dict | None:
    for row in rows:
        if (
            row.get("method") == method
            and row.get("modality") == modality
            and bool(row.get("distilled")) == distilled
        ):
            return row
    return None


def orderings(rows: list[dict], metric: str) -> list[dict]:
    """The paper's orderings on one seed's table; each {claim, status, detail}.

    status is pass, fail, or skip where a system the claim compares was not evaluated (or its
    score not computed). Caption quality is compared on `metric`; the encoders against the
    untrained one on class F1 (the synthetic world's measure of naming what is heard).
    """
    rows = with_f1(rows)
    checks = []

    def compare(claim, a_name, a, b_name, b, key, at_least=False):
        va, vb = (a or {}).get(key), (b or {}).get(key)
        if va is None or vb is None:
            missing = a_name if va is None else b_name
            checks.append({"claim": claim, "status": "skip", "detail": f"no {key} of {missing}"})
            return
        holds = va >= vb if at_least else va > vb
        sign = ">=" if at_least else ">"
        checks.append(
            {
                "claim": claim,
                "status": "pass" if holds else "fail",
                "detail": f"{a_name} {va:.4f} {sign} {b_name} {vb:.4f}",
            }
        )

    untrained = next((r for r in rows if r.get("system") == "untrained"), None)
    methods = list(dict.fromkeys(r["method"] for r in rows if r.get("method")))
    for m in methods:
        compare(
            f"aligned {m} above the untrained encoder in class F1",
            f"{m}",
            _find(rows, m, "audio", False),
            "untrained",
            untrained,
            "class_f1",
        )
    contrastive = _find(rows, "contrastive", "audio", False)
    for m in DISTRIBUTION_METHODS:
        if m in methods:
            compare(
                f"{m} above contrastive before distillation",
                m,
                _find(rows, m, "audio", False),
                "contrastive",
                contrastive,
                metric,
            )
    for m in LIFTED_BY_DISTILLATION:
        if m in methods:
            compare(
                f"distillation lifts {m}",
                f"{m} distilled",
                _find(rows, m, "audio", True),
                f"{m} zero-shot",
                _find(rows, m, "audio", False),
                metric,
            )
    best_ot = max(
        (
            r
            for m in OT_METHODS
            if (r := _find(rows, m, "audio", True)) and r.get(metric) is not None
        ),
        key=lambda r: r[metric],
        default=None,
    )
    compare(
        "best OT variant at least MMD after distillation",
        f"{best_ot['method']} distilled" if best_ot else "OT/OT-Att distilled",
        best_ot,
        "mmd distilled",
        _find(rows, "mmd", "audio", True),
        metric,
        at_least=True,
    )
    for m in OT_METHODS:
        for distilled in (False, True):
            stage = "distilled" if distilled else "zero-shot"
            audio_image = _find(rows, m, "audio+image", distilled)
            audio = _find(rows, m, "audio", distilled)
            if m in methods and (audio_image or audio):
                compare(
                    f"audio+image at least audio alone for {m} ({stage})",
                    f"{m} audio+image",
                    audio_image,
                    f"{m} audio",
                    audio,
                    metric,
                    at_least=True,
                )
    return checks


def seeds_markdown(tables: dict[int, list[dict]], metric: str) -> str:
    summary = seed_summary(tables)
    shown = [m for m in ["meteor", "rouge_l", "cider_d", "spider", "class_f1"]]
    cells = {(r["system"], r["metric"]): r for r in summary}
    systems = list(dict.fromkeys(r["system"] for r in summary))
    seeds = sorted(tables)
    head = ["system"] + [LABELS.get(m, "class F1") for m in shown]
    lines = [
        f"**Seeds {', '.join(map(str, seeds))}**: mean ± sample standard deviation over seeds",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for system in systems:
        values = []
        for m in shown:
            cell = cells.get((system, m))
            values.append(f"{cell['mean']:.4f} ± {cell['std']:.4f}" if cell else "n.c.")
        lines.append("| " + " | ".join([system, *values]) + " |")
    lines += ["", f"**The paper's orderings on every seed** (caption metric: {metric})", ""]
    per_seed = {seed: orderings(tables[seed], metric) for seed in seeds}
    claims = list(dict.fromkeys(c["claim"] for checks in per_seed.values() for c in checks))
    for claim in claims:
        results = {
            seed: next(c for c in per_seed[seed] if c["claim"] == claim)
            for seed in seeds
            if any(c["claim"] == claim for c in per_seed[seed])
        }
        statuses = {r["status"] for r in results.values()}
        verdict = "FAIL" if "fail" in statuses else "PASS" if statuses == {"pass"} else "SKIP"
        details = "; ".join(f"seed {s}: {r['status']} ({r['detail']})" for s, r in results.items())
        lines.append(f"- {verdict} {claim}: {details}")
    return "\n".join(lines) + "\n"


def write_rows(path: Path, rows: list[dict], cols: list[str]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in cols})


def read_table(path: Path, dataset: str | None = None) -> list[dict]:
    """A table.csv's rows (the run's gathered table: one dataset's rows, the first by default)."""
    rows = read_csv(path)
    if not rows:
        raise ValueError(f"{path}: no rows")
    if "dataset" in rows[0]:
        dataset = dataset or rows[0]["dataset"]
        rows = [r for r in rows if r["dataset"] == dataset]
        if not rows:
            raise ValueError(f"{path}: no rows of dataset {dataset!r}")
    return with_f1(rows)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="dalipipe experiments", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="experiment", required=True)
    sweep = sub.add_parser("sweep", help="Appendix A: metrics against the number of prefix pairs")
    sweep.add_argument(
        "--pairs", nargs="+", type=int, required=True, help="n per --evaluate folder"
    )
    sweep.add_argument("--evaluate", nargs="+", required=True, help="evaluate output folders")
    sweep.add_argument("--out-csv", required=True)
    sweep.add_argument("--out-png", required=True)
    seeds = sub.add_parser("seeds", help="mean and spread over seeds, orderings per seed")
    seeds.add_argument("--seeds", nargs="+", type=int, required=True, help="seed per --tables file")
    seeds.add_argument("--tables", nargs="+", required=True, help="each seed's table.csv")
    seeds.add_argument("--metric", default="cider_d", help="caption metric of the orderings")
    seeds.add_argument("--out-csv", required=True)
    seeds.add_argument("--out-md", required=True)
    args = parser.parse_args(argv)
    setup_logging()
    if args.experiment == "sweep":
        if len(args.pairs) != len(args.evaluate):
            parser.error("--pairs and --evaluate need one entry each per sweep point")
        tables = {n: read_table(Path(d) / "table.csv") for n, d in zip(args.pairs, args.evaluate)}
        rows = sweep_rows(tables)
        write_rows(Path(args.out_csv), rows, ["n_pairs", "system"] + METRICS)
        plot_sweep(rows, Path(args.out_png))
        log.info("prefix-pairs sweep over %s: wrote %s, %s", args.pairs, args.out_csv, args.out_png)
    else:
        if len(args.seeds) != len(args.tables):
            parser.error("--seeds and --tables need one entry each per seed")
        if args.metric not in CAPTION_COLUMNS:
            parser.error(f"--metric: one of {CAPTION_COLUMNS}")
        tables = {s: read_table(Path(t)) for s, t in zip(args.seeds, args.tables)}
        cols = ["system", "metric", "mean", "std", "min", "max", "n"]
        write_rows(Path(args.out_csv), seed_summary(tables), cols)
        text = seeds_markdown(tables, args.metric)
        with atomic_path(Path(args.out_md)) as tmp:
            tmp.write_text(text, encoding="utf-8")
        log.info("seeds %s: wrote %s, %s", args.seeds, args.out_csv, args.out_md)
    return 0
