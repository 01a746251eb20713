"""Per-class recall of every system of a synthetic-world run, and the pseudo-labels' own scores.

    dalipipe class-breakdown --metadata results/miniature/acquire/metadata.jsonl \
        --evaluate results/miniature/evaluate/miniature \
        --pseudolabels results/miniature/pseudolabel/*.jsonl \
        --out results/miniature/report/classes.md

The results table pools the world scores over classes; this breaks class recall down by the
sounding class (how often a caption names a class when it is heard), which shows which sounds
an encoder carries and which it misses, and what distillation moved. It also scores the
pseudo-labels (the distillation teacher) on their own pool, since a student that imitates them
seldom does better than they do. It reads what the workflow wrote: the world's metadata (each
clip's heard and seen classes), an evaluated dataset's ``<system>.json`` files and the
pseudo-label JSONL files (one per method, named after it). The workflow writes it as
report/classes.md.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from dalipipe.common import atomic_path, read_jsonl
from dalipipe.world import classes as world
from dalipipe.world.scores import world_scores


def per_class_recall(captions: dict[str, str], metadata: dict[str, dict]) -> dict[str, float]:
    """Class -> share of the clips where it is heard whose caption names it."""
    missing = sorted(set(captions) - set(metadata))
    if missing:
        raise ValueError(f"no world metadata for {len(missing)} clip(s), e.g. {missing[:3]}")
    heard, hits = Counter(), Counter()
    for clip_id, caption in captions.items():
        named = world.classes_named(caption, world.BY_NAME)
        for name in metadata[clip_id].get("heard") or []:
            heard[name] += 1
            hits[name] += name in named
    return {name: hits[name] / heard[name] for name in sorted(heard)}


def read_metadata(path: Path) -> dict[str, dict]:
    return {row["clip_id"]: row for row in read_jsonl(path)}


def read_systems(evaluate_dir: Path) -> dict[str, dict[str, str]]:
    """System name -> its captions, for every system JSON of one evaluated dataset."""
    systems = {}
    for path in sorted(evaluate_dir.glob("*.json")):
        result = json.loads(path.read_text())
        if isinstance(result, dict) and "captions" in result:
            systems[result.get("name", path.stem)] = result["captions"]
    if not systems:
        raise FileNotFoundError(f"{evaluate_dir}: no system results (<system>.json) found")
    return systems


def read_pseudolabels(paths: list[Path]) -> dict[str, dict[str, str]]:
    labels = {}
    for path in sorted(paths):
        labels[path.stem] = {row["clip_id"]: row["caption"] for row in read_jsonl(path)}
    return labels


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def markdown(
    systems: dict[str, dict[str, str]],
    pseudolabels: dict[str, dict[str, str]],
    metadata: dict[str, dict],
) -> str:
    recalls = {name: per_class_recall(caps, metadata) for name, caps in systems.items()}
    classes = sorted({c for r in recalls.values() for c in r})
    lines = [
        "Class recall per sounding class (test clips: named when heard).",
        "",
        "| system | " + " | ".join(classes) + " |",
        "|---|" + "---|" * len(classes),
    ]
    for name, recall in recalls.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(recall.get(c)) for c in classes) + " |")
    if pseudolabels:
        lines += [
            "",
            "Pseudo-labels scored on their own pool (the distillation teacher).",
            "",
            "| method | clips | class R | class P | well-formed | off-screen R |",
            "|---|---|---|---|---|---|",
        ]
        for method, caps in pseudolabels.items():
            s = world_scores(caps, metadata)
            lines.append(
                f"| {method} | {len(caps)} | {_fmt(s['class_recall'])} | "
                f"{_fmt(s['class_precision'])} | {_fmt(s['well_formed'])} | "
                f"{_fmt(s['offscreen_recall'])} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="dalipipe class-breakdown", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--metadata", type=Path, required=True, help="acquire/metadata.jsonl")
    parser.add_argument("--evaluate", type=Path, required=True, help="evaluate/<dataset> folder")
    parser.add_argument("--pseudolabels", type=Path, nargs="*", default=[], help="<method>.jsonl")
    parser.add_argument("--out", type=Path, help="write the Markdown here (default: print it)")
    args = parser.parse_args(argv)
    metadata = read_metadata(args.metadata)
    text = markdown(read_systems(args.evaluate), read_pseudolabels(args.pseudolabels), metadata)
    if args.out is None:
        print(text, end="")
    else:
        with atomic_path(args.out) as tmp:
            Path(tmp).write_text(text)
    return 0
