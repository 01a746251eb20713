"""Gather acquire parts: one manifest, one metadata file and the counts per status.

    dalipipe gather-manifests results/<run>/acquire/part-0 results/<run>/acquire/part-1 \\
        --out results/<run>/acquire

Works for every acquire source (synthetic, local, AudioSet downloads): each part directory
holds `manifest.csv` and `metadata.jsonl`. Rows are concatenated in the order the parts are
given; paths are kept as written. Writes OUT/manifest.csv, OUT/metadata.jsonl and
OUT/summary.json (clips, counts per status overall and per split, failure reasons).
A clip id that appears twice is an error naming both parts.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path

from dalipipe.common import read_jsonl, read_stage, stage_parser, write_json, write_jsonl
from dalipipe.data.manifest import ACQUIRE_FIELDS, read_manifest, write_manifest

log = logging.getLogger(__name__)


# yt-dlp's messages: "[youtube] <id>: Video unavailable (caused by <...>)"
_YTDLP_PREFIX = re.compile(r"^\[[\w:-]+\] [A-Za-z0-9_-]+: ")
_CAUSED_BY = re.compile(r"\s*\(caused by .*\)$", re.S)


def reason_key(reason: str) -> str:
    """A failure reason without what names the clip, so that like failures count together.

    A yt-dlp message loses its ``[extractor] <id>: `` prefix and its ``(caused by ...)`` chain;
    any other reason keeps what follows its last ``: `` (``<path>: file not found``).
    """
    if _YTDLP_PREFIX.match(reason):
        key = _CAUSED_BY.sub("", _YTDLP_PREFIX.sub("", reason))
    else:
        key = reason.split(": ")[-1]
    return key.strip()[:120]


def gather(parts: list[Path], out: Path) -> dict:
    """Merge the parts into `out`; returns the summary."""
    rows: list[dict] = []
    metas: list[dict] = []
    owner: dict[str, Path] = {}
    for part in parts:
        part_rows = read_manifest(part / "manifest.csv", ACQUIRE_FIELDS)
        for row in part_rows:
            if row["clip_id"] in owner:
                raise ValueError(
                    f"clip id {row['clip_id']!r} is in both {owner[row['clip_id']]} and {part}"
                )
            owner[row["clip_id"]] = part
        rows += part_rows
        meta_path = part / "metadata.jsonl"
        metas += read_jsonl(meta_path) if meta_path.exists() else []

    by_split: dict[str, Counter] = {}
    for row in rows:
        by_split.setdefault(row["split"], Counter())[row["status"]] += 1
    reasons = Counter(reason_key(row["reason"]) for row in rows if row["status"] != "ok")
    summary = {
        "clips": len(rows),
        "parts": len(parts),
        "status": dict(Counter(row["status"] for row in rows)),
        "splits": {split: dict(counts) for split, counts in sorted(by_split.items())},
        "top_failure_reasons": dict(reasons.most_common(10)),
    }
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(out / "manifest.csv", rows, ACQUIRE_FIELDS)
    write_jsonl(out / "metadata.jsonl", metas)
    write_json(out / "summary.json", summary)
    log.info("gathered %d clips from %d parts: %s", len(rows), len(parts), summary["status"])
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("gather-manifests", __doc__, "none: gathering has no settings")
    parser.add_argument("parts", nargs="+", type=Path, help="part directories")
    parser.add_argument("--out", required=True, type=Path)
    args, _ = read_stage(parser, argv)
    gather(args.parts, args.out)
    return 0
