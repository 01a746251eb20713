"""The paper's published scores (published.yaml), set beside a run's measured ones.

    from dalipipe.paper import published
    rows = published.with_published(rows, "audiocaps")   # adds paper_<metric> columns
    md = published.markdown(rows, "audiocaps")           # measured | paper, per metric

Only AudioCaps and Clotho have published values; the miniature shows its own scores alone.
A measured row matches a published one by method, modality and distillation (the image-only
system by modality alone); an extra system (e.g. the authors' released weights) has none.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import yaml

from dalipipe.evaluate.tables import LABELS, METHOD_LABELS

PUBLISHED_FILE = Path(__file__).with_name("published.yaml")
METRICS = ["bleu_4", "meteor", "rouge_l", "cider_d", "spice", "spider"]
# the paper's three headline metrics (Tables 1 and 3)
SHOWN = ["meteor", "rouge_l", "spider"]


def _check(entry: dict, where: str, keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in entry]
    if missing:
        raise ValueError(f"{where}: missing {missing}")
    for metric in METRICS:
        value = entry.get(metric)
        if value is not None and not (isinstance(value, (int, float)) and 0 <= value <= 1):
            raise ValueError(f"{where}: {metric} must be a number in [0, 1], got {value!r}")


@lru_cache(maxsize=4)
def load(path: str | Path = PUBLISHED_FILE) -> dict:
    """{"systems": [...], "others": [...]}, each entry checked (keys present, scores in [0, 1])."""
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    for i, entry in enumerate(data.get("systems") or []):
        _check(
            entry, f"{path}: systems[{i}]", ("dataset", "table", "method", "modality", "distilled")
        )
    for i, entry in enumerate(data.get("others") or []):
        _check(entry, f"{path}: others[{i}]", ("dataset", "table", "system"))
    return {"systems": data.get("systems") or [], "others": data.get("others") or []}


def has_published(dataset: str, path: str | Path = PUBLISHED_FILE) -> bool:
    return any(e["dataset"] == dataset for e in load(path)["systems"])


def _truthy(value) -> bool:
    return value is True or str(value) == "True"


def match(row: dict, dataset: str, path: str | Path = PUBLISHED_FILE) -> dict | None:
    """The published entry for a measured table row, or None."""
    for entry in load(path)["systems"]:
        if entry["dataset"] != dataset or entry["modality"] != row["modality"]:
            continue
        if row["modality"] == "image" and row.get("system") == "image":
            return entry
        if entry["method"] == row.get("method") and bool(entry["distilled"]) == _truthy(
            row.get("distilled")
        ):
            return entry
    return None


def with_published(rows: list[dict], dataset: str, path: str | Path = PUBLISHED_FILE) -> list[dict]:
    """The rows with ``paper_<metric>`` columns (empty where the paper has no such row)."""
    out = []
    for row in rows:
        entry = match(row, dataset, path) or {}
        out.append({**row, **{f"paper_{m}": entry.get(m) for m in METRICS}})
    return out


def _cell(value) -> str:
    if value in (None, ""):
        return "-"
    return f"{float(value):.4f}"


def _name(row: dict) -> str:
    if row.get("system") == "image":
        return "Image only (prefix)"
    if row.get("system") == "untrained":
        return "Untrained encoder"
    return METHOD_LABELS.get(row.get("method"), row.get("method") or row.get("system", ""))


def markdown(rows: list[dict], dataset: str, path: str | Path = PUBLISHED_FILE) -> str:
    """Measured beside published, one line per measured system, then the paper's baselines."""
    entries = [e for e in load(path)["systems"] if e["dataset"] == dataset]
    if not entries:
        return ""
    tables = sorted({e["table"] for e in entries})
    head = ["system", "modality", "distilled"]
    for metric in SHOWN:
        head += [LABELS[metric], f"{LABELS[metric]} (paper)"]
    lines = [
        f"**{dataset}, measured beside the paper** ({', '.join(tables)})",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for row in rows:
        entry = match(row, dataset, path) or {}
        cells = [_name(row), str(row["modality"]), "yes" if _truthy(row.get("distilled")) else "no"]
        for metric in SHOWN:
            cells += [_cell(row.get(metric)), _cell(entry.get(metric))]
        lines.append("| " + " | ".join(cells) + " |")
    others = [e for e in load(path)["others"] if e["dataset"] == dataset]
    for entry in others:
        scores = ", ".join(f"{LABELS[m]} {_cell(entry.get(m))}" for m in SHOWN)
        lines += ["", f"Published, {entry['system']} ({entry['table']}): {scores}"]
    return "\n".join(lines) + "\n"
