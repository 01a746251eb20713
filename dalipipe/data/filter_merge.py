"""Merge the filter parts and keep the clips whose frames best match their labels.

    dalipipe filter-merge --params P --parts results/<run>/filter/part-0 ... \
        --out results/<run>/filter

Reads each part's ``distances.csv`` and ``summary.json`` (``dalipipe filter``), ranks every clip
by its distance (ties by clip id), keeps the ``filter.keep`` closest (a fraction <= 1 of the
scored clips, or a count > 1; the paper keeps 500,000) and writes ``kept.txt`` (one clip id a
line), ``distances.csv`` (all clips, with ``rank`` and ``kept``), ``histogram.png`` and
``summary.json``.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

from dalipipe.common import atomic_path, read_stage, stage_parser, write_json
from dalipipe.data.filter import DISTANCE_FIELDS, write_distances

log = logging.getLogger(__name__)


def keep_count(keep: float, n: int) -> int:
    """How many of ``n`` scored clips ``filter.keep`` asks for."""
    if keep <= 0:
        raise ValueError(f"filter.keep must be > 0, got {keep}")
    if keep <= 1:
        return round(keep * n)
    if keep != int(keep):
        raise ValueError(f"filter.keep: a count above 1 must be whole, got {keep}")
    return min(int(keep), n)


def read_part(part_dir: Path) -> tuple[list[dict], dict]:
    path = part_dir / "distances.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: filter part has no distances.csv")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for line_no, row in enumerate(rows, start=2):
        try:
            row["distance"] = float(row["distance"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}:{line_no}: distance is not a number") from None
    summary_path = part_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return rows, summary


def plot_histogram(path: Path, distances: list[float], threshold: float | None, encoder: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.hist(distances, bins=min(50, max(5, len(distances) // 5)), color="#4c72b0")
    if threshold is not None:
        ax.axvline(threshold, color="#c44e52", linestyle="--", label="last kept clip")
        ax.legend()
    ax.set_xlabel(f"clip distance (mean cosine distance, {encoder})")
    ax.set_ylabel("clips")
    ax.set_title("Frame captions vs. sound labels")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def merge(params: dict, part_dirs: list, out_dir) -> dict:
    cfg = params["filter"]
    out_dir = Path(out_dir)
    rows, part_summaries = [], []
    for part in map(Path, part_dirs):
        part_rows, summary = read_part(part)
        rows += part_rows
        part_summaries.append(summary)
    ids = [r["clip_id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise ValueError("a clip appears in more than one filter part")
    rows.sort(key=lambda r: (r["distance"], r["clip_id"]))

    def total(key):
        return sum(int(s.get(key, 0)) for s in part_summaries)

    n_keep = keep_count(float(cfg["keep"]), len(rows))
    if n_keep == 0:  # an empty kept list would leave the align split with nothing to train on
        raise ValueError(
            f"filter.keep {cfg['keep']} keeps none of the {len(rows)} scored clips of "
            f"{len(part_summaries)} part(s) ({total('skipped')} skipped, "
            f"{total('excluded_eval_ids')} evaluation ids excluded); filter.splits and "
            "filter.keep decide what is scored and kept"
        )
    for rank, row in enumerate(rows):
        row["rank"], row["kept"] = rank, int(rank < n_keep)
    threshold = rows[n_keep - 1]["distance"] if n_keep else None
    encoder = next((s.get("text_encoder") for s in part_summaries if s), "unknown")

    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "kept.txt") as tmp:
        tmp.write_text("".join(f"{r['clip_id']}\n" for r in rows[:n_keep]))
    write_distances(out_dir / "distances.csv", rows, fields=[*DISTANCE_FIELDS, "rank", "kept"])
    plot_histogram(out_dir / "histogram.png", [r["distance"] for r in rows], threshold, encoder)

    summary = {
        "parts": len(part_summaries),
        "scored": len(rows),
        "kept": n_keep,
        "keep": cfg["keep"],
        "threshold_distance": threshold,
        "skipped": total("skipped"),
        "excluded_eval_ids": total("excluded_eval_ids"),
        "frames_captioned": total("frames_captioned"),
        "text_encoder": encoder,
        **{k: part_summaries[0].get(k) for k in ("captioner", "embedding", "distance")
           if part_summaries},
    }  # fmt: skip
    write_json(out_dir / "summary.json", summary)
    log.info(
        "kept %d of %d clips (distance <= %s); %d evaluation clips excluded",
        n_keep, len(rows), threshold, summary["excluded_eval_ids"],
    )  # fmt: skip
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("filter-merge", __doc__, "section filter")
    parser.add_argument("--parts", nargs="+", required=True, help="filter part directories")
    parser.add_argument("--out", required=True, help="the filter directory")
    args, params = read_stage(parser, argv)
    try:
        merge(params, args.parts, args.out)
    except (OSError, ValueError) as err:  # bad input or nothing kept: one clear line
        log.error("filter-merge: %s", err)
        return 1
    return 0
