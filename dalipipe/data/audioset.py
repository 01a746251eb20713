"""Select AudioSet segments by split, class and count, and split the selection into parts.

    dalipipe audioset-select --params P --out results/<run>/acquire/selection

Reads Google's segment CSVs (``# `` header lines, then ``YTID, start, end, "mid,mid"``), the class
index (``index,mid,display_name``) and the ontology JSON, which lets a class name stand for itself
and every class below it. Malformed rows are logged with their line number and skipped. Clips whose
YouTube id is in an evaluation set (``filter.exclude_id_lists``) are never selected, so nothing we
evaluate on is downloaded for training. ``split_names`` renames AudioSet splits to pipeline
splits (e.g. unbalanced_train -> align, balanced_train -> pseudolabel) in the metadata.
``subset`` (a file, e.g. the authors' list of their 500k alignment clips) keeps only the segments
it lists (``read_subset``: by YouTube id, and start time where the file gives one). Writes
``part-<i>.jsonl`` (one segment per line) and ``summary.json``.
"""

from __future__ import annotations

import csv
import json
import logging
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from dalipipe.common import open_csv, read_stage, stage_parser, write_json, write_jsonl

log = logging.getLogger(__name__)

YOUTUBE_ID = re.compile(r"^[A-Za-z0-9_-]{11}$")
SPLITS = ("balanced_train", "eval", "unbalanced_train")


@dataclass
class Segment:
    clip_id: str
    youtube_id: str
    start_s: float
    end_s: float
    mids: list[str]
    labels: list[str]  # display names, in the order of ``mids``
    split: str


def clip_id_for(youtube_id: str, start_s: float) -> str:
    """``<ytid>_<start in ms>``: unique per segment, and only ``[A-Za-z0-9_-]`` (no dots)."""
    return f"{youtube_id}_{round(start_s * 1000)}"


# clip ids made from the usual names of AudioSet/AudioCaps files (dalipipe.data.local.safe_id):
# <ytid>, Y<ytid>, <ytid>_<ms> (ours), Y<ytid>_30_000_40_000 (from Y<ytid>_30.000_40.000.wav)
_CLIP_ID_WITH_YOUTUBE_ID = re.compile(r"^Y?([A-Za-z0-9_-]{11})(?:_\d+)*$")


def youtube_id_of(clip: dict) -> str | None:
    """The YouTube id of a metadata row: its ``youtube_id`` field, else read from its clip id."""
    if clip.get("youtube_id"):
        return clip["youtube_id"]
    match = _CLIP_ID_WITH_YOUTUBE_ID.match(clip.get("clip_id", ""))
    return match.group(1) if match else None


def read_class_index(path: str | Path) -> dict[str, str]:
    """mid -> display name, from ``class_labels_indices.csv``."""
    with open_csv(path, ["mid", "display_name"], "class index lacks column(s) {missing}") as reader:
        return {row["mid"]: row["display_name"] for row in reader}


def read_ontology(path: str | Path) -> dict[str, dict]:
    """id -> ontology node (``name``, ``child_ids``, ...)."""
    nodes = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(nodes, list) or not all("id" in n and "name" in n for n in nodes):
        raise ValueError(f"{path}: not an AudioSet ontology (a list of nodes with id and name)")
    return {n["id"]: n for n in nodes}


def resolve_classes(
    classes: list[str], class_index: dict[str, str], ontology: dict[str, dict] | None
) -> set[str]:
    """The mids that ``classes`` (mids or names, any case) stand for, descendants included."""
    by_name = {n["name"].lower(): mid for mid, n in (ontology or {}).items()}
    by_name.update({name.lower(): mid for mid, name in class_index.items()})
    wanted: set[str] = set()
    for name in classes:
        mid = name if name in class_index or name in (ontology or {}) else by_name.get(name.lower())
        if mid is None:
            raise ValueError(f"acquire.audioset.classes: unknown AudioSet class {name!r}")
        stack = [mid]
        while stack:  # the ontology is a DAG: a class may sit under several parents
            node = stack.pop()
            if node not in wanted:
                wanted.add(node)
                stack.extend((ontology or {}).get(node, {}).get("child_ids", []))
    return wanted


def read_segments(
    path: str | Path, split: str, class_index: dict[str, str]
) -> tuple[list[Segment], list[str]]:
    """Parse one segment CSV; returns the segments and one message per malformed row."""
    segments, problems = [], []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                segments.append(_parse_row(line, split, class_index))
            except ValueError as err:
                problems.append(f"{path}:{line_no}: {err}")
    for message in problems:
        log.warning("skipped malformed row %s", message)
    return segments, problems


def _parse_row(line: str, split: str, class_index: dict[str, str]) -> Segment:
    fields = next(csv.reader([line], skipinitialspace=True))
    if len(fields) != 4:
        raise ValueError(f"expected 4 fields (YTID, start, end, labels), got {len(fields)}")
    youtube_id, start, end, label_field = fields
    if not YOUTUBE_ID.match(youtube_id):
        raise ValueError(f"bad YouTube id {youtube_id!r}")
    try:
        start_s, end_s = float(start), float(end)
    except ValueError:
        raise ValueError(f"start/end not numbers: {start!r}, {end!r}") from None
    if not 0 <= start_s < end_s:
        raise ValueError(f"bad segment times {start_s} .. {end_s}")
    mids = [m.strip() for m in label_field.split(",") if m.strip()]
    if not mids:
        raise ValueError("no labels")
    unknown = [m for m in mids if m not in class_index]
    if unknown:
        raise ValueError(f"label(s) not in the class index: {unknown}")
    return Segment(
        clip_id=clip_id_for(youtube_id, start_s),
        youtube_id=youtube_id,
        start_s=start_s,
        end_s=end_s,
        mids=mids,
        labels=[class_index[m] for m in mids],
        split=split,
    )


def read_id_list(path: str | Path) -> set[str]:
    """YouTube ids from an AudioCaps CSV (``youtube_id`` column), a segment CSV or a plain list."""
    text = Path(path).read_text(encoding="utf-8")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    if not lines:
        return set()
    header = next(csv.reader([lines[0]]))
    if "youtube_id" in header:
        column = header.index("youtube_id")
        rows = csv.reader(lines[1:])
        ids = {row[column].strip() for row in rows if len(row) > column}
    else:  # a segment CSV or one id per line: the first field of each line
        ids = {next(csv.reader([ln]))[0].strip() for ln in lines}
    bad = sorted(i for i in ids if not YOUTUBE_ID.match(i))
    if len(bad) == len(ids):
        raise ValueError(f"{path}: no YouTube ids found (first entries: {bad[:3]})")
    return ids - set(bad)


# a clip name in a subset file: <ytid>, Y<ytid>, <ytid>_30.000 or Y<ytid>_30.000_40.000 (CAV-MAE
# and AudioSet file names; a start without a decimal point is ambiguous, ms or s, and is ignored)
_SUBSET_NAME = re.compile(r"^Y?([A-Za-z0-9_-]{11})(?:_(\d+\.\d+)(?:_\d+\.\d+)?|_\d+(?:_\d+)*)?$")
SUBSET_ID_COLUMNS = ("youtube_id", "ytid", "video_id", "file_id")
SUBSET_START_COLUMNS = ("start_seconds", "start_time", "start_s", "start")

# YouTube id -> start times in ms it lists, or None for every segment of the video
Subset = dict[str, "set[int] | None"]


def _add_to_subset(subset: Subset, name: str, start: str | None) -> bool:
    match = _SUBSET_NAME.match(name.strip())
    if not match:
        return False
    youtube_id, start_in_name = match.groups()
    start = start_in_name or (start.strip() if start else None)
    if start is None or start == "":
        subset[youtube_id] = None
        return True
    try:
        start_ms = round(float(start) * 1000)
    except ValueError:
        return False
    if youtube_id not in subset:
        subset[youtube_id] = set()
    if subset[youtube_id] is not None:
        subset[youtube_id].add(start_ms)
    return True


def read_subset(path: str | Path) -> Subset:
    """The clips a subset file lists: a CSV whose header names the id column (``youtube_id``,
    ``YTID``, ``video_id`` or ``file_id``, any case) and optionally the start in seconds
    (``start_seconds``, ``start_time``, ``start_s`` or ``start``); a CSV without header (a segment
    CSV or an id list: the id, then optionally the start); or a CAV-MAE JSON list
    (``{"data": [{"video_id": ...}]}``, the authors' ``AS500k.json``). Ids may be file names:
    ``<ytid>``, ``Y<ytid>``, ``<ytid>_30.000``, ``Y<ytid>_30.000_40.000``."""
    path = Path(path)
    text = path.read_text(encoding="utf-8-sig")
    subset: Subset = {}
    bad: list[str] = []
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
            rows = data["data"] if isinstance(data, dict) else data
            names = [row["video_id"] if isinstance(row, dict) else row for row in rows]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: not a CAV-MAE data list ({err})") from None
        for name in names:
            if not _add_to_subset(subset, str(name), None):
                bad.append(str(name))
    else:
        lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        rows = list(csv.reader(lines, skipinitialspace=True))
        header = [h.strip().lower() for h in rows[0]] if rows else []
        id_col = next((header.index(c) for c in SUBSET_ID_COLUMNS if c in header), None)
        if id_col is not None:
            start_col = next((header.index(c) for c in SUBSET_START_COLUMNS if c in header), None)
            rows = rows[1:]
        else:
            id_col, start_col = 0, 1
        for row in rows:
            if len(row) <= id_col:
                continue
            start = row[start_col] if start_col is not None and len(row) > start_col else None
            if start_col == 1 and id_col == 0 and start is not None:  # no header: a number or none
                start = start if re.fullmatch(r"\s*\d+(\.\d*)?\s*", start) else None
            if not _add_to_subset(subset, row[id_col], start):
                bad.append(row[id_col])
    if bad:
        log.warning("%s: %d entries are not YouTube ids, e.g. %s", path, len(bad), bad[:3])
    if not subset:
        raise ValueError(f"{path}: no YouTube ids found (first entries not ids: {bad[:3]})")
    return subset


def in_subset(segment: Segment, subset: Subset) -> bool:
    if segment.youtube_id not in subset:
        return False
    starts = subset[segment.youtube_id]
    return starts is None or round(segment.start_s * 1000) in starts


def read_exclusions(paths: list[str]) -> set[str]:
    ids: set[str] = set()
    for path in paths:
        ids |= read_id_list(path)
    return ids


def select_segments(
    segments: list[Segment],
    *,
    wanted_mids: set[str] | None,
    exclude_ids: set[str],
    max_clips: int | None,
    seed: int,
    subset: Subset | None = None,
) -> tuple[list[Segment], dict[str, int]]:
    """Keep segments with a wanted label, no excluded id and (given a subset) listed in it,
    de-duplicated, then sample."""
    counts = {"read": len(segments), "duplicate": 0, "excluded_eval_ids": 0, "not_in_classes": 0}
    if subset is not None:
        counts["not_in_subset"] = 0
    unique: dict[str, Segment] = {}
    for seg in segments:
        if seg.clip_id in unique:
            counts["duplicate"] += 1
        elif seg.youtube_id in exclude_ids:
            counts["excluded_eval_ids"] += 1
        elif subset is not None and not in_subset(seg, subset):
            counts["not_in_subset"] += 1
        elif wanted_mids is not None and not wanted_mids.intersection(seg.mids):
            counts["not_in_classes"] += 1
        else:
            unique[seg.clip_id] = seg
    pool = sorted(unique.values(), key=lambda s: s.clip_id)  # independent of the CSVs' order
    random.Random(seed).shuffle(pool)
    chosen = pool if max_clips is None else pool[:max_clips]
    counts["selected"] = len(chosen)
    return chosen, counts


def split_parts(segments: list[Segment], n_parts: int) -> list[list[Segment]]:
    """Round-robin over the shuffled selection, so every part gets a like mix of classes."""
    return [segments[i::n_parts] for i in range(n_parts)]


def run_selection(params: dict, out_dir: str | Path) -> dict:
    cfg = params["acquire"]["audioset"]
    n_parts = int(params["acquire"]["parts"])
    class_index = read_class_index(cfg["class_index"])
    ontology = read_ontology(cfg["ontology"]) if cfg.get("ontology") else None
    splits = [cfg["split"]] if isinstance(cfg["split"], str) else list(cfg["split"])
    segments, problems = [], []
    for split in splits:
        if split not in cfg["segments"]:
            raise ValueError(f"acquire.audioset.segments: no CSV given for split {split!r}")
        # e.g. {"unbalanced_train": "align"}: the pipeline split a segment's clip serves
        as_split = (cfg.get("split_names") or {}).get(split, split)
        seg, bad = read_segments(cfg["segments"][split], as_split, class_index)
        segments += seg
        problems += bad
    classes = cfg.get("classes") or []
    wanted = resolve_classes(classes, class_index, ontology) if classes else None
    exclude = read_exclusions((params.get("filter") or {}).get("exclude_id_lists") or [])
    subset = read_subset(cfg["subset"]) if cfg.get("subset") else None
    chosen, counts = select_segments(
        segments,
        wanted_mids=wanted,
        exclude_ids=exclude,
        max_clips=cfg.get("max_clips"),
        seed=int(params["seed"]),
        subset=subset,
    )
    subset_summary = None
    if subset is not None:
        found = {s.youtube_id for s in segments if in_subset(s, subset)}
        subset_summary = {
            "path": str(cfg["subset"]),
            "videos_listed": len(subset),
            "videos_found": len(found),
        }
        if len(found) < len(subset):
            log.warning(
                "subset %s: %d of the %d videos it lists are in none of the splits read (%s)",
                cfg["subset"], len(subset) - len(found), len(subset), ", ".join(splits),
            )  # fmt: skip
    out_dir = Path(out_dir)
    parts = split_parts(chosen, n_parts)
    for i, part in enumerate(parts):
        write_jsonl(out_dir / f"part-{i}.jsonl", (asdict(s) for s in part))
    summary = {
        **counts,
        "malformed": len(problems),
        "malformed_rows": problems[:100],
        "splits": splits,
        "classes": classes,
        "subset": subset_summary,
        "parts": [len(p) for p in parts],
    }
    write_json(out_dir / "summary.json", summary)
    log.info(
        "selected %d of %d segments into %d parts (%d malformed rows, %d evaluation ids excluded)",
        counts["selected"], counts["read"], n_parts, len(problems), counts["excluded_eval_ids"],
    )  # fmt: skip
    return summary


def read_selection(path: str | Path) -> list[Segment]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                try:
                    rows.append(Segment(**json.loads(line)))
                except (TypeError, json.JSONDecodeError) as err:
                    raise ValueError(f"{path}:{line_no}: not a selection row ({err})") from None
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("audioset-select", __doc__, "seed, sections acquire and filter")
    parser.add_argument("--out", required=True, help="selection directory (part-<i>.jsonl)")
    args, params = read_stage(parser, argv)
    run_selection(params, args.out)
    return 0
