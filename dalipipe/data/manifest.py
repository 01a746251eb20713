"""The manifests of the acquire and extract parts: one CSV row per clip, ok or why not.

    write_manifest(part / "manifest.csv", rows, ACQUIRE_FIELDS)
    rows = read_manifest(part / "manifest.csv", ACQUIRE_FIELDS)

`status` is `ok` or why the clip is missing (acquire from AudioSet: unavailable, private,
removed, blocked, error; extract: failed), with `reason` naming the file and the cause; a stage
goes on past a bad clip (DEVELOPING.md, "Manifests").
"""

from __future__ import annotations

import csv
from pathlib import Path

from dalipipe.common import atomic_path, open_csv

# every acquire source (synthetic, local, audioset) and the gathered manifest
ACQUIRE_FIELDS = ["clip_id", "path", "status", "reason", "split", "start_s", "labels"]
EXTRACT_FIELDS = [
    "clip_id", "status", "reason", "n_frames", "duration_s",
    "sample_rate", "channels", "width", "height",
]  # fmt: skip


def write_manifest(path: str | Path, rows: list[dict], fields: list[str]) -> None:
    """The rows under a header of `fields` (other keys of a row are left out), atomically."""
    with atomic_path(Path(path)) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def read_manifest(path: str | Path, fields: list[str]) -> list[dict]:
    """The rows of a manifest; a missing column is an error naming the file."""
    with open_csv(path, fields, "manifest lacks column(s) {missing}") as reader:
        return list(reader)
