"""The model card (README.md) of a shared captioner folder, with the metadata block the Hub reads.

The block (YAML between `---` lines) names the license, the base model, the datasets and the
scores of the run's evaluation table for this method, each with the decoding it was measured
with; the text says what the folder holds, how to caption with it, how it was trained (the
options and distillation settings captioner.json records) and the exact versions that wrote it.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import yaml

from dalipipe.describe.decoding import Decoding
from dalipipe.evaluate.tables import CAPTION_COLUMNS, LABELS

FILE_MEANINGS = {
    "captioner.json": "the base model, the prompt and template options, the input features "
    "(filterbank, frames) and the default decoding",
    "audio_encoder.safetensors": "the aligned audio encoder's weights",
    "audio_encoder.json": "the audio encoder's sizes",
    "audio_projector.safetensors": "the projector of audio tokens into the language model",
    "prefix.safetensors": "the learned prefix tokens",
    "attentive_scorer.safetensors": "OT-Att's token scorer (alignment only)",
}


def evaluation_rows(evaluate_dir: Path | None, method: str | None) -> list[dict]:
    """The rows of `evaluate/<dataset>/table.csv` for this method, with their dataset."""
    if evaluate_dir is None or not evaluate_dir.is_dir():
        return []
    rows = []
    for table in sorted(evaluate_dir.glob("*/table.csv")):
        with open(table, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                if method is None or row.get("method") == method:
                    rows.append({"dataset": table.parent.name, **row})
    return rows


def _score(value: str) -> float | None:
    try:
        return round(float(value), 4)
    except (TypeError, ValueError):
        return None  # "n.c." or empty: not computed


def metadata_block(
    *, license: str, base: str | None, datasets: list[str], rows: list[dict], name: str
) -> dict:
    block: dict = {"license": license, "library_name": "dalipipe", "tags": ["audio-captioning"]}
    if base:
        block["base_model"] = base
    if datasets:
        block["datasets"] = datasets
    scored = [c for c in CAPTION_COLUMNS if any(_score(r.get(c)) is not None for r in rows)]
    if scored:
        block["metrics"] = scored
        results = []
        for row in rows:
            metrics = [
                {"type": c, "name": f"{LABELS[c]} ({row.get('decoding') or 'greedy'})",
                 "value": _score(row[c])}
                for c in scored
                if _score(row.get(c)) is not None
            ]  # fmt: skip
            task = {"type": "audio-captioning", "name": "Audio captioning"}
            dataset = {"type": row["dataset"], "name": row["dataset"]}
            results.append({"task": task, "dataset": dataset, "metrics": metrics})
        block["model-index"] = [{"name": name, "results": results}]
    return block


def model_card(
    info: dict,
    *,
    name: str,
    license: str,
    datasets: list[str],
    rows: list[dict],
    versions: dict,
    files: list[str],
) -> str:
    """README.md for a captioner folder whose captioner.json is `info`."""
    base = info.get("base")
    bundled = base == "base"  # dalipipe export copied a local base into the folder
    revision = info.get("revision")
    block = metadata_block(
        license=license, base=None if bundled else base, datasets=datasets, rows=rows, name=name
    )
    metadata = info.get("metadata") or {}
    decoding = Decoding.recorded(metadata)
    lines = ["---", yaml.safe_dump(block, sort_keys=False).rstrip(), "---", "", f"# {name}", ""]
    lines += [
        'A DALI audio captioner ("An Eye for an Ear"): a frozen LLaVA-1.5 describes a sound from',
        "audio tokens that a CAV-MAE audio encoder, aligned to CLIP's image tokens, gives it.",
        "Written by dalipipe; load it with `dalipipe.Captioner.load` or `dalipipe caption --model`.",
        "",
        "## Contents",
        "",
    ]
    lines += [f"- `{f}`: {FILE_MEANINGS.get(f, 'weights or settings')}" for f in files]
    if bundled:
        lines.append("- `base/`: the base captioner itself (it is on no hub)")
    else:
        pinned = f"{base}@{revision}" if revision else base
        lines.append(f"- the base model, fetched from the Hub at its pinned revision: `{pinned}`")
    lines += [
        "",
        "## Use",
        "",
        "```",
        f"dalipipe caption recording.wav --model {name}",
        "```",
        "```python",
        "from dalipipe import Captioner",
        f'Captioner.load("{name}").caption(["recording.wav"], modality="audio")',
        "```",
        "",
        f"Default decoding: {decoding} (dalipipe caption --greedy or --sample to change it).",
        "",
    ]
    if rows:
        lines += ["## Evaluation", "", "| dataset | system | modality | decoding | "
                  + " | ".join(LABELS[c] for c in block.get("metrics", [])) + " |"]  # fmt: skip
        lines.append("|" + "---|" * (4 + len(block.get("metrics", []))))
        for row in rows:
            scores = [
                "n.c." if _score(row.get(c)) is None else f"{_score(row[c]):.4f}"
                for c in block.get("metrics", [])
            ]
            lines.append(
                f"| {row['dataset']} | {row.get('system', '')} | {row.get('modality', '')} | "
                f"{row.get('decoding') or 'greedy'} | " + " | ".join(scores) + " |"
            )
        lines.append("")
    lines += ["## Training", ""]
    trained = {k: v for k, v in metadata.items() if k not in ("features", "decoding", "exported")}
    lines += ["```json", json.dumps({"options": info.get("options"), **trained}, indent=1,
                                    sort_keys=True), "```", ""]  # fmt: skip
    lines += ["## Versions", "", ", ".join(f"{k} {v}" for k, v in versions.items()), ""]
    return "\n".join(lines)
