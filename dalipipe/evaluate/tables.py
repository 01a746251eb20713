"""Results tables: one CSV row per system, and Markdown laid out like the paper's Table 1.

    from dalipipe.evaluate import tables
    tables.markdown(rows, "miniature", world=True)

In the Markdown table each row is an encoder and modality; the zero-shot scores (before
audiovisual distillation) come first and the scores after distillation sit beside them, so
the effect of distillation reads across a row. A value that could not be computed (SPICE and
SPIDEr without Stanford CoreNLP, FENSE and SPIDEr-FL without their models) shows as "n.c." with
the reason under the table.
"""

from __future__ import annotations

import csv
from pathlib import Path

from dalipipe.common import atomic_path
from dalipipe.world.scores import WORLD_METRICS

CAPTION_COLUMNS = [
    *["bleu_4", "meteor", "rouge_l", "cider_d", "spice", "spider"],
    *["spider_fl", "fense", "vocab"],  # DCASE 2023, DCASE 2024, distinct words
]
KEY_COLUMNS = ["system", "method", "modality", "distilled", "decoding"]
LABELS = {
    "bleu_4": "BLEU-4",
    "meteor": "METEOR",
    "rouge_l": "ROUGE-L",
    "cider_d": "CIDEr-D",
    "spice": "SPICE",
    "spider": "SPIDEr",
    "spider_fl": "SPIDEr-FL",
    "fense": "FENSE",
    "vocab": "Vocab",
    "class_recall": "class R",
    "class_precision": "class P",
    "well_formed": "WF",
    "offscreen_recall": "off-screen R",
}
MD_METRICS = ["meteor", "rouge_l", "cider_d", "spider", "spider_fl", "fense", "vocab"]
METHOD_LABELS = {
    "mmd": "DALI-MMD",
    "ot": "DALI-OT",
    "ot_att": "DALI-OT-Att",
    "contrastive": "Contrastive",
}


def columns(world: bool) -> list[str]:
    return KEY_COLUMNS + CAPTION_COLUMNS + (WORLD_METRICS if world else [])


def table_row(system, scores: dict, decoding: str = "greedy") -> dict:
    """One CSV row; ``decoding`` says how its captions were decoded (see decoding_label)."""
    row = {
        "system": system.name,
        "method": system.method,
        "modality": system.modality,
        "distilled": system.distilled,
        "decoding": decoding,
    }
    row.update({k: scores.get(k) for k in CAPTION_COLUMNS + WORLD_METRICS})
    return row


def decoding_label(settings: dict, seed: int) -> str:
    """How evaluation decodes (config evaluate.decoding), as the table records it per system."""
    if settings["decoding"] == "sampled":
        return f"sampled T={float(settings['temperature']):g} top-k 50 seed {seed}"
    return "greedy"


def write_csv(path: str | Path, rows: list[dict], cols: list[str]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in cols})


def read_csv(path: str | Path) -> list[dict]:
    """Rows with numbers as floats, empty cells as None and ``distilled`` as bool."""
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for raw in csv.DictReader(f):
            row = dict(raw)
            for k, v in raw.items():
                if k in CAPTION_COLUMNS or k in WORLD_METRICS:
                    row[k] = float(v) if v not in ("", None) else None
            row["distilled"] = raw.get("distilled") == "True"
            rows.append(row)
    return rows


def _fmt(value, metric: str) -> str:
    """None is "n.c." for a caption metric (explained below the table), "-" for a world ratio
    with nothing to count."""
    if value is None:
        return "-" if metric in WORLD_METRICS else "n.c."
    return f"{value:.0f}" if metric == "vocab" else f"{value:.4f}"


def _label(row: dict) -> tuple[str, str]:
    if row["system"] == "image":
        return "Image only (prefix)", "image"
    if row["system"] == "untrained":
        return "Untrained encoder", "audio"
    name = METHOD_LABELS.get(row["method"], row["method"])
    return name, "audio+image" if row["modality"] == "audio+image" else "audio"


def markdown(rows: list[dict], dataset: str, *, world: bool, notes: dict | None = None) -> str:
    """Table 1 layout: | system | modality | zero-shot metrics | after-distillation metrics |."""
    metrics = MD_METRICS + (WORLD_METRICS if world else [])
    order: list[tuple[str, str]] = []
    cells: dict[tuple[str, str], dict[bool, dict]] = {}
    for row in rows:
        key = _label(row)
        if key not in cells:
            order.append(key)
            cells[key] = {}
        cells[key][bool(row["distilled"])] = row
    # Audio-only rows first, then audio+image, each in the order the systems ran.
    order.sort(key=lambda k: k[1] == "audio+image")
    head = (
        ["system", "modality"]
        + [LABELS[m] for m in metrics]
        + [f"{LABELS[m]} (distilled)" for m in metrics]
    )
    lines = [
        f"**{dataset}**: zero-shot (before audiovisual distillation) | after distillation",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for key in order:
        zero, dist = cells[key].get(False), cells[key].get(True)
        vals = [_fmt(zero[m], m) if zero else "" for m in metrics]
        vals += [_fmt(dist[m], m) if dist else "" for m in metrics]
        lines.append("| " + " | ".join([key[0], key[1], *vals]) + " |")
    decodings = sorted({str(row.get("decoding") or "greedy") for row in rows})
    lines += ["", f"Decoding: {'; '.join(decodings)}."]
    for name, note in sorted((notes or {}).items()):
        lines.append("")
        lines.append(f"n.c. {LABELS.get(name, name)}: {note}")
    return "\n".join(lines) + "\n"
