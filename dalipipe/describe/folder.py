"""Many files at once: the media files of folders, and a captions file that a later call resumes.

    dalipipe caption recordings/ --model DIR --out captions.csv     # or captions.jsonl

A folder is walked recursively for files with a media extension (`dalipipe.data.local`), in
sorted order. The captions file (CSV or JSON Lines, by its extension) gets one row per file as
soon as it is captioned or fails, so a call that is stopped loses at most the batch under way;
the next call with the same --out skips every file that already has a row. Rows written with
another model, modality or decoding are not mixed with new ones: that is an error.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable
from pathlib import Path

from dalipipe.data.local import MEDIA_EXTENSIONS

FIELDS = ["file", "caption", "error", "modality", "decoding", "model"]
FORMATS = {".csv": "csv", ".jsonl": "jsonl"}


def media_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Each path given: a file as it is, a folder as its media files (recursively, sorted)."""
    out = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in MEDIA_EXTENSIONS
            )
            if not found:
                raise ValueError(
                    f"{path}: no media files in this folder (extensions: "
                    f"{' '.join(sorted(MEDIA_EXTENSIONS))})"
                )
            out += found
        else:
            out.append(path)
    return out


class CaptionsFile:
    """The rows of a captions file, read back for resuming, and new rows appended to it."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.format = FORMATS.get(self.path.suffix.lower())
        if self.format is None:
            raise ValueError(f"--out {self.path}: use a .csv or .jsonl file name")
        self.rows = self._read() if self.path.exists() else []

    def _read(self) -> list[dict]:
        text = self.path.read_text(encoding="utf-8")
        if text and not text.endswith("\n"):  # a call stopped mid-row: that row is dropped
            text = text[: text.rfind("\n") + 1]
            self.path.write_text(text, encoding="utf-8")
        if self.format == "jsonl":
            try:
                return [json.loads(line) for line in text.splitlines() if line.strip()]
            except json.JSONDecodeError as err:
                raise ValueError(f"--out {self.path}: not JSON Lines ({err})") from None
        rows = list(csv.DictReader(io.StringIO(text)))
        if rows and set(rows[0]) != set(FIELDS):
            raise ValueError(
                f"--out {self.path}: columns {list(rows[0])}, not a captions file ({FIELDS})"
            )
        return rows

    def done(self, settings: dict) -> set[str]:
        """The files that already have a row; rows of other settings are an error."""
        for row in self.rows:
            other = {k: v for k, v in settings.items() if row.get(k) != v}
            if other:
                key = next(iter(other))
                raise ValueError(
                    f"--out {self.path}: holds captions with {key} {row.get(key)!r}, not "
                    f"{settings[key]!r}: give another --out, or delete it to start again"
                )
        return {row["file"] for row in self.rows}

    def append(self, row: dict) -> None:
        new = not self.path.exists() or self.path.stat().st_size == 0
        with open(self.path, "a", encoding="utf-8", newline="") as f:
            if self.format == "jsonl":
                f.write(json.dumps({k: row.get(k) for k in FIELDS if row.get(k) is not None}))
                f.write("\n")
            else:
                writer = csv.DictWriter(f, FIELDS, lineterminator="\n")
                if new:
                    writer.writeheader()
                writer.writerow({k: row.get(k) or "" for k in FIELDS})
            f.flush()
        self.rows.append(row)
