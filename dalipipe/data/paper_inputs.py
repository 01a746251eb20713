"""The paper-scale inputs that are not plain downloads (rules/fetch.smk).

    dalipipe paper-inputs audiocaps-selection --csv data/audiocaps/test.csv --out SEL_DIR
    dalipipe paper-inputs prefix-selection --pairs prefixDS.json --audiocaps train.csv \
        --segments balanced.csv unbalanced.csv eval.csv --out SEL_DIR
    dalipipe paper-inputs prefix-pairs --pairs prefixDS.json --clips CLIPS_DIR \
        --out pairs.csv --frames frames/
    dalipipe paper-inputs unpack ARCHIVE --out DIR

- ``audiocaps-selection``: one selection row per AudioCaps clip (YouTube id, start, 10 s), the
  input of ``dalipipe acquire-audioset``, so the test clips are downloaded like AudioSet; their
  clip ids (``<ytid>_<start ms>``) are the ones ``dalipipe evaluate`` looks for.
- ``prefix-selection``: the authors' 16 prefix-tuning pairs (``prefixDS.json``, released
  without start times) as selection rows: each YouTube id's segment start is looked up in the
  AudioCaps CSV (whose caption the pair carries) and else in the AudioSet segment CSVs.
- ``prefix-pairs``: ``pairs.csv`` (``image,caption,id``) from the downloaded clips and the
  captions of ``prefixDS.json``, the image being the frame at 5 s of the 10-s segment (the
  authors' ``frame_5``), saved as JPEG in ``--frames``; a clip that could not be downloaded is
  named in the log and in ``<pairs>.summary.json``, and left out.
- ``unpack``: a .7z (py7zr) or .zip archive into a folder; an archive holding one
  top-level folder gives that folder's contents.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import shutil
import zipfile
from dataclasses import asdict
from pathlib import Path

from dalipipe.common import atomic_path, open_csv, setup_logging, write_json, write_jsonl
from dalipipe.data.audioset import YOUTUBE_ID, Segment, clip_id_for

log = logging.getLogger(__name__)

SEGMENT_SECONDS = 10.0
PREFIX_FRAME_SECOND = 5.0  # the authors' frame_5 of 10 (one frame per second of the segment)


def _segment(youtube_id: str, start_s: float, split: str) -> dict:
    if not YOUTUBE_ID.match(youtube_id):
        raise ValueError(f"not a YouTube id: {youtube_id!r}")
    seg = Segment(
        clip_id=clip_id_for(youtube_id, start_s),
        youtube_id=youtube_id,
        start_s=start_s,
        end_s=start_s + SEGMENT_SECONDS,
        mids=[],
        labels=[],
        split=split,
    )
    return asdict(seg)


def audiocaps_selection(csv_path: str | Path, out_dir: str | Path, split: str = "test") -> int:
    """Selection part-0.jsonl of every clip of an AudioCaps CSV (one row per clip)."""
    rows: dict[str, dict] = {}
    need = ["youtube_id", "start_time"]
    with open_csv(csv_path, need, "not an AudioCaps CSV (no {missing} column)") as reader:
        for row in reader:
            seg = _segment(row["youtube_id"], float(row["start_time"]), split)
            rows.setdefault(seg["clip_id"], seg)
    write_jsonl(Path(out_dir) / "part-0.jsonl", rows.values())
    log.info("%s: %d clips selected", csv_path, len(rows))
    return len(rows)


def read_prefix_pairs(path: str | Path) -> list[dict]:
    """The authors' prefixDS.json: [{id, caption}] (caption from the conversation's gpt turn)."""
    rows = json.loads(Path(path).read_text(encoding="utf-8"))
    pairs = []
    for n, row in enumerate(rows, start=1):
        turns = row.get("conversations") or []
        captions = [t.get("value") for t in turns if t.get("from") == "gpt"]
        caption = row.get("caption") or (captions[0] if captions else None)
        if not row.get("id") or not caption:
            raise ValueError(f"{path}: entry {n} has no id or no caption")
        pairs.append({"id": row["id"], "caption": caption.strip()})
    return pairs


def _audiocaps_starts(paths: list[str]) -> dict[str, dict[str, float]]:
    """youtube_id -> {caption: start} from AudioCaps CSVs."""
    starts: dict[str, dict[str, float]] = {}
    for path in paths:
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                caps = starts.setdefault(row["youtube_id"], {})
                caps[row["caption"].strip()] = float(row["start_time"])
    return starts


def _segment_starts(paths: list[str], wanted: set[str]) -> dict[str, float]:
    """youtube_id -> start from AudioSet segment CSVs (``YTID, start, end, "labels"``)."""
    starts: dict[str, float] = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.startswith("#"):
                    continue
                youtube_id, _, rest = line.partition(",")
                if youtube_id in wanted and youtube_id not in starts:
                    starts[youtube_id] = float(rest.split(",", 1)[0])
    return starts


def prefix_selection(
    pairs_json: str | Path,
    out_dir: str | Path,
    audiocaps: list[str] = (),
    segments: list[str] = (),
) -> list[dict]:
    pairs = read_prefix_pairs(pairs_json)
    by_caption = _audiocaps_starts(list(audiocaps))
    from_segments = _segment_starts(list(segments), {p["id"] for p in pairs})
    rows, unknown = [], []
    for pair in pairs:
        caps = by_caption.get(pair["id"], {})
        start = caps.get(pair["caption"])
        if start is None and caps:
            start = next(iter(caps.values()))
        if start is None:
            start = from_segments.get(pair["id"])
        if start is None:
            unknown.append(pair["id"])
            continue
        rows.append(_segment(pair["id"], start, "prefix"))
    if unknown:
        log.warning(
            "%d prefix clip(s) found in no AudioCaps or AudioSet CSV, left out: %s",
            len(unknown),
            ", ".join(unknown),
        )
    if not rows:
        raise ValueError(f"{pairs_json}: no pair's YouTube id is in the given CSVs")
    write_jsonl(Path(out_dir) / "part-0.jsonl", rows)
    log.info("%d of %d prefix clips selected", len(rows), len(pairs))
    return rows


def prefix_pairs(
    pairs_json: str | Path,
    clips_dir: str | Path,
    out_csv: str | Path,
    frames_dir: str | Path,
    square: int | None = None,
) -> dict:
    """pairs.csv (image, caption, id) and one JPEG per pair in ``frames_dir`` (beside it).
    ``square``: each frame is cut like the extract stage's with ``extract.frame_crop`` (short
    side scaled to ``square``, then the centre square), as the authors' prefixDS.json frames
    were; None keeps it whole."""
    from dalipipe.data.extract import frame_geometry
    from dalipipe.data.ffmpeg import grab_frame

    vf = frame_geometry(square, crop=True) if square else None

    clips_dir, out_csv, frames_dir = Path(clips_dir), Path(out_csv), Path(frames_dir)
    captions = {p["id"]: p["caption"] for p in read_prefix_pairs(pairs_json)}
    with open(clips_dir / "manifest.csv", newline="", encoding="utf-8") as f:
        manifest = list(csv.DictReader(f))
    with open(clips_dir / "metadata.jsonl", encoding="utf-8") as f:
        youtube_ids = {m["clip_id"]: m["youtube_id"] for m in map(json.loads, f) if m}
    written, missing = [], []
    with atomic_path(frames_dir, directory=True) as frames_tmp:
        for entry in manifest:
            clip_id = entry["clip_id"]
            if entry.get("status") != "ok" or not entry.get("path"):
                missing.append(f"{clip_id} ({entry.get('status')}: {entry.get('reason')})")
                continue
            try:
                image = grab_frame(Path(entry["path"]), PREFIX_FRAME_SECOND, vf)
            except ValueError as err:
                missing.append(f"{clip_id} ({err})")
                continue
            image.save(frames_tmp / f"{clip_id}.jpg", format="JPEG", quality=95)
            image_path = Path(frames_dir.name) / f"{clip_id}.jpg"
            if frames_dir.parent.resolve() != out_csv.parent.resolve():
                image_path = frames_dir.resolve() / f"{clip_id}.jpg"
            written.append(
                {"image": str(image_path), "caption": captions[youtube_ids[clip_id]], "id": clip_id}
            )
    rows = manifest
    for text in missing:
        log.warning("prefix pair left out: %s", text)
    if not written:
        raise ValueError(f"{clips_dir}: none of the {len(rows)} prefix clips could be used")
    with atomic_path(out_csv) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "caption", "id"])
        writer.writeheader()
        writer.writerows(written)
    summary = {"pairs": len(written), "of": len(rows), "left_out": missing}
    write_json(out_csv.with_suffix(".summary.json"), summary)
    log.info("%s: %d of %d pairs", out_csv, len(written), len(rows))
    return summary


def unpack(archive: str | Path, out_dir: str | Path) -> Path:
    archive, out_dir = Path(archive), Path(out_dir)
    with atomic_path(out_dir, directory=True) as tmp:
        name = archive.name.lower()
        if name.endswith(".7z"):
            import py7zr

            with py7zr.SevenZipFile(archive, mode="r") as z:
                z.extractall(path=tmp)
        elif name.endswith(".zip"):
            with zipfile.ZipFile(archive) as z:
                z.extractall(tmp)
        else:
            raise ValueError(f"{archive}: not a .7z or .zip archive")
        top = list(tmp.iterdir())
        if len(top) == 1 and top[0].is_dir():  # e.g. clotho_audio_evaluation.7z: evaluation/
            for child in list(top[0].iterdir()):
                shutil.move(str(child), tmp / child.name)
            top[0].rmdir()
        count = sum(1 for p in tmp.rglob("*") if p.is_file())
    log.info("%s: %d files unpacked into %s", archive, count, out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dalipipe paper-inputs", description=__doc__)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("audiocaps-selection")
    p.add_argument("--csv", required=True)
    p.add_argument("--out", required=True, help="selection directory (part-0.jsonl)")
    p = sub.add_parser("prefix-selection")
    p.add_argument("--pairs", required=True, help="the authors' prefixDS.json")
    p.add_argument("--audiocaps", nargs="*", default=[], help="AudioCaps CSVs (start times)")
    p.add_argument("--segments", nargs="*", default=[], help="AudioSet segment CSVs")
    p.add_argument("--out", required=True, help="selection directory (part-0.jsonl)")
    p = sub.add_parser("prefix-pairs")
    p.add_argument("--pairs", required=True, help="the authors' prefixDS.json (captions)")
    p.add_argument("--clips", required=True, help="acquire-audioset output of the selection")
    p.add_argument("--out", required=True, help="pairs.csv")
    p.add_argument("--frames", required=True, help="folder for the frames (beside pairs.csv)")
    p.add_argument(
        "--square", type=int, help="cut each frame to this centre square (extract.frame_crop)"
    )
    p = sub.add_parser("unpack")
    p.add_argument("archive")
    p.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    setup_logging()
    if args.what == "audiocaps-selection":
        audiocaps_selection(args.csv, args.out)
    elif args.what == "prefix-selection":
        prefix_selection(args.pairs, args.out, args.audiocaps, args.segments)
    elif args.what == "prefix-pairs":
        prefix_pairs(args.pairs, args.clips, args.out, args.frames, args.square)
    else:
        unpack(args.archive, args.out)
    return 0
