"""The few (frame, audio caption) pairs that prefix tuning learns from.

    pairs = load_pairs("results/miniature/shards/prefix")   # the `prefix` split shards
    pairs = load_pairs("prefix_pairs.jsonl")                # or a file of (image, caption) rows

A shard directory gives each clip's middle frame (the authors use frame_5 of 10) and its
metadata's `audio_caption`. A file is JSON lines, a JSON list or a CSV with the columns
`image` (a path, relative to the file's folder when not absolute) and `caption`, and an
optional `id`; the authors' LLaVA conversation JSON (prefixDS.json) is read as well, taking
the caption from the `gpt` turn.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image


@dataclass
class Pair:
    clip_id: str
    image: Image.Image
    caption: str


def middle(frames: list):
    """The middle frame: index 5 of 10 as in the authors' code, 2 of 4, 0 of 1."""
    if not frames:
        raise ValueError("no frames")
    return frames[len(frames) // 2]


def as_pil(frame) -> Image.Image:
    if isinstance(frame, Image.Image):
        return frame.convert("RGB")
    return Image.fromarray(frame).convert("RGB")


def pairs_from_shards(directory: Path) -> list[Pair]:
    from dalipipe.data.shard_reader import load_split

    pairs = []
    for sample in load_split(directory):
        caption = sample["meta"].get("audio_caption")
        if not caption:
            raise ValueError(
                f"{directory}: clip {sample['clip_id']} has no metadata field audio_caption"
            )
        pairs.append(Pair(sample["clip_id"], as_pil(middle(sample["frames"])), caption))
    return pairs


def _rows(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".csv":
        return list(csv.DictReader(text.splitlines()))
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    if path.suffix == ".json":
        rows = json.loads(text)
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON list of pairs")
        return rows
    raise ValueError(
        f"{path}: pairs must be .jsonl, .json or .csv, not {path.suffix or 'no suffix'}"
    )


def _caption(row: dict) -> str | None:
    if row.get("caption"):
        return row["caption"]
    turns = row.get("conversations") or []
    answers = [t.get("value") for t in turns if t.get("from") == "gpt"]
    return answers[0] if answers else None


def pairs_from_file(path: Path) -> list[Pair]:
    pairs = []
    for n, row in enumerate(_rows(path), start=1):
        caption, image = _caption(row), row.get("image")
        if not caption or not image:
            missing = "caption" if not caption else "image"
            raise ValueError(f"{path}: row {n} has no {missing}")
        image_path = Path(image) if Path(image).is_absolute() else path.parent / image
        try:
            with Image.open(image_path) as im:
                frame = im.convert("RGB")
        except OSError as err:
            raise ValueError(f"{path}: row {n}: cannot read image {image_path}: {err}") from err
        pairs.append(Pair(str(row.get("id") or image_path.stem), frame, caption))
    return pairs


def load_pairs(src: str | Path) -> list[Pair]:
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"prefix pairs: {src} does not exist")
    pairs = pairs_from_shards(src) if src.is_dir() else pairs_from_file(src)
    if not pairs:
        raise ValueError(f"prefix pairs: {src} holds no pairs")
    return pairs


def first_pairs(pairs: list[Pair], n: int, seed: int) -> list[Pair]:
    """The first ``n`` pairs of a shuffle drawn from ``seed``: the prefix-pairs sweep's subsets
    (Appendix A). One shuffle for every n, so the sweep's subsets nest (the 2 pairs are among
    the 4); the order of the source never decides which pairs a small n sees."""
    import numpy as np

    if not 1 <= n <= len(pairs):
        raise ValueError(f"prefix pairs: asked for {n} pairs, the source holds {len(pairs)}")
    order = np.random.RandomState(seed).permutation(len(pairs))
    return [pairs[i] for i in order[:n]]
