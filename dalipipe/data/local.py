"""Acquire, local source: list a folder or a CSV of media files as clips (one part).

    dalipipe acquire-local --params '{"acquire": {"parts": 2, "local": {"path": "media/"}}}' \\
        --part 0 --out results/<run>/acquire/part-0

A folder is searched recursively for audio and video files (by extension), in sorted order.
A CSV has a header with a `path` column and optionally `clip_id`, `start_s`, `labels`
(AudioSet-style names joined by `;`), `split` and `youtube_id` (kept in the metadata, so the
evaluation-id lists find the clip whatever its name); relative paths are taken from the CSV's
folder. Clip ids not given are made from the file names (ASCII letters, digits, `_` and `-`;
`_2`, `_3`... added to repeats). Ids are assigned over the whole list before it is cut into
parts, so a clip keeps its id whatever the number of parts.

Files are not copied: the part directory gets `clips/<clip_id><ext>` as a symbolic link to the
source file (so odd names never reach later stages), and manifest paths point at the links.
A listed file that does not exist becomes a `failed` row; so does a row with a bad `start_s`,
or with a `split` that no shard takes (anything but align, pseudolabel, prefix and test).
"""

from __future__ import annotations

import csv
import logging
import os
import re
import unicodedata
from pathlib import Path

from dalipipe.common import atomic_path, read_stage, stage_parser, write_jsonl
from dalipipe.config_checks import PIPELINE_SPLITS
from dalipipe.data.manifest import ACQUIRE_FIELDS, write_manifest

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = {".mp4", ".m4v", ".mkv", ".webm", ".mov", ".avi", ".mpg", ".mpeg", ".3gp", ".ts"}
AUDIO_EXTENSIONS = {
    ".wav",
    ".flac",
    ".mp3",
    ".m4a",
    ".aac",
    ".ogg",
    ".oga",
    ".opus",
    ".wma",
    ".aiff",
}
MEDIA_EXTENSIONS = VIDEO_EXTENSIONS | AUDIO_EXTENSIONS
CLIP_ID = re.compile(r"^[A-Za-z0-9_-]+$")


def safe_id(text: str) -> str:
    """An ASCII clip id from a file name: accents dropped, other characters become `_`."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.sub(r"[^A-Za-z0-9_-]+", "_", ascii_text).strip("_") or "clip"


def _unique(ids: list[str]) -> list[str]:
    """Repeated ids get `_2`, `_3`, ... in list order."""
    taken: set[str] = set()
    out = []
    for clip_id in ids:
        new, n = clip_id, 1
        while new in taken:
            n += 1
            new = f"{clip_id}_{n}"
        taken.add(new)
        out.append(new)
    return out


def list_folder(folder: Path, split: str) -> list[dict]:
    files = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in MEDIA_EXTENSIONS
    )
    skipped = sum(1 for p in folder.rglob("*") if p.is_file()) - len(files)
    if skipped:
        log.info("%s: %d files without a media extension skipped", folder, skipped)
    ids = _unique([safe_id(p.stem) for p in files])
    return [
        {"clip_id": i, "source": str(p.resolve()), "split": split, "start_s": 0.0, "labels": []}
        for i, p in zip(ids, files)
    ]


def list_csv(table: Path, split: str) -> list[dict]:
    with open(table, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = [name.strip() for name in reader.fieldnames or []]
        if "path" not in fields:
            raise ValueError(f"{table}: no 'path' column in the header (got {fields})")
        rows = [{k.strip(): (v or "").strip() for k, v in r.items() if k} for r in reader]
    entries = []
    for line, row in enumerate(rows, start=2):
        path = Path(row["path"])
        if not row["path"]:
            raise ValueError(f"{table}, line {line}: empty path")
        path = path if path.is_absolute() else table.parent / path
        entry = {
            "clip_id": row.get("clip_id") or safe_id(path.stem),
            "source": str(path.resolve()),
            "split": row.get("split") or split,
            "start_s": 0.0,
            "labels": [x.strip() for x in (row.get("labels") or "").split(";") if x.strip()],
            "reason": "",
        }
        if row.get("youtube_id"):
            entry["youtube_id"] = row["youtube_id"]
        try:
            entry["start_s"] = float(row.get("start_s") or 0.0)
            if entry["start_s"] < 0:
                raise ValueError
        except ValueError:
            entry["reason"] = (
                f"{table}, line {line}: start_s {row.get('start_s')!r} is not a number >= 0"
            )
        if entry["split"] not in PIPELINE_SPLITS:  # no shard would take it: say so, here
            entry["reason"] = (
                f"{table}, line {line}: split {entry['split']!r} is none of the splits the "
                f"shards take ({', '.join(PIPELINE_SPLITS)})"
            )
        if not CLIP_ID.match(entry["clip_id"]):
            bad = entry["clip_id"]
            entry["clip_id"] = safe_id(bad)
            entry["reason"] = (
                f"{table}, line {line}: clip_id {bad!r} has characters outside [A-Za-z0-9_-]"
            )
        entries.append(entry)
    ids = _unique([e["clip_id"] for e in entries])
    for entry, clip_id in zip(entries, ids):
        entry["clip_id"] = clip_id
    return entries


def list_source(source: str | os.PathLike, split: str = "align") -> list[dict]:
    """Every clip of a folder or CSV: clip_id, source (absolute path), split, start_s, labels."""
    source = Path(source)
    if source.is_dir():
        return list_folder(source, split)
    if source.is_file():
        return list_csv(source, split)
    raise FileNotFoundError(f"local media source {str(source)!r} does not exist")


def write_part(entries: list[dict], out: Path) -> list[dict]:
    """The part directory: links, manifest.csv, metadata.jsonl; returns the manifest rows."""
    rows, metas = [], []
    with atomic_path(out, directory=True) as tmp:
        (tmp / "clips").mkdir()
        for e in entries:
            reason = e.get("reason", "")
            source = Path(e["source"])
            if not reason and not source.is_file():
                reason = f"{source}: file not found"
            path = ""
            if not reason:
                name = e["clip_id"] + source.suffix.lower()
                os.symlink(source, tmp / "clips" / name)
                path = str(out / "clips" / name)
            rows.append(
                {
                    "clip_id": e["clip_id"],
                    "path": path,
                    "status": "failed" if reason else "ok",
                    "reason": reason,
                    "split": e["split"],
                    "start_s": e["start_s"],
                    "labels": ";".join(e["labels"]),
                }
            )
            meta = {k: e[k] for k in ("clip_id", "split", "labels", "start_s", "source")}
            if e.get("youtube_id"):
                meta["youtube_id"] = e["youtube_id"]
            metas.append(meta)
        write_manifest(tmp / "manifest.csv", rows, ACQUIRE_FIELDS)
        write_jsonl(tmp / "metadata.jsonl", metas)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("acquire-local", __doc__, "section acquire (acquire.local.path)")
    parser.add_argument("--source", help="a folder or CSV; default: acquire.local.path")
    parser.add_argument("--part", type=int, default=0)
    parser.add_argument("--parts", type=int, help="default: acquire.parts")
    parser.add_argument("--out", required=True, help="the part directory to write")
    args, params = read_stage(parser, argv)
    acquire = params["acquire"]
    local = acquire["local"]
    source = args.source or local["path"]
    if not source:
        parser.error("no source: give --source or config acquire.local.path")
    parts = args.parts or acquire["parts"]
    if not 0 <= args.part < parts:
        parser.error(f"--part must be in [0, {parts})")
    entries = list_source(source, local["split"])[args.part :: parts]
    rows = write_part(entries, Path(args.out))
    failed = sum(r["status"] != "ok" for r in rows)
    log.info("part %d/%d: %d clips listed, %d failed", args.part, parts, len(rows), failed)
    return 0
