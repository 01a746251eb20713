"""Stage shard: webdataset shards of extracted clips, one directory per split.

    dalipipe shard --params P --extract results/r/extract/part-0 results/r/extract/part-1 \\
        --metadata results/r/acquire/metadata.jsonl [--kept results/r/filter/kept.txt] \\
        --split align --out results/r/shards/align

Writes ``<split>-<nnnnnn>.tar`` (plain tar in webdataset layout: members ``<key>.frame<k>.jpg``,
``<key>.fbank.npy``, optional ``<key>.audio.wav`` and ``<key>.json``, grouped by key and sorted
by clip id), ``stats-<nnnnnn>.json`` beside each shard, and ``index.json`` (shards, counts, the
clips skipped and why). Evaluation-id lists (``filter.exclude_id_lists`` in ``--params``): a clip
of a training split whose YouTube id is listed is dropped and counted
(``counts.excluded_eval_ids``), whatever the acquire source and whether the filter ran; the
``test`` split is never filtered this way. dalipipe/data/shard_reader.py reads them, checking
each tar against the count, size and sha256 its index entry records. webdataset's TarWriter
writes the tars, byte-for-byte reproducible: fixed member order, mtimes and owners (the bytes
are the hand-written tarfile writer's before it; docs/design.md, "Shards and webdataset").
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from dalipipe.common import atomic_path, open_csv, read_stage, stage_parser, write_json
from dalipipe.config import section_defaults
from dalipipe.data.audioset import read_exclusions, youtube_id_of

log = logging.getLogger(__name__)

KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")
FRAME_FILE = re.compile(r"^frame_(\d+)\.jpg$")  # in an extract clip directory
# write_split's defaults, for callers without a config: the schema's (config section shard)
DEFAULT_SAMPLES_PER_SHARD = section_defaults("shard")["samples_per_shard"]
DEFAULT_REQUIRE_FRAMES = tuple(section_defaults("shard")["require_frames"])
EVALUATION_SPLITS = ("test",)  # the evaluation-id lists never drop clips from these


def shard_key(clip_id: str) -> str:
    """The webdataset key of a clip: its id with dots replaced, since a dot ends the key."""
    key = clip_id.replace(".", "_")
    if not KEY_PATTERN.match(key):
        raise ValueError(f"clip id {clip_id!r}: a shard key may only hold letters, digits, _ and -")
    return key


class NoFrames(ValueError):
    """A clip without frames, in a split that needs them."""


@dataclass
class Clip:
    """The files of one extracted clip that go into a shard sample."""

    clip_id: str
    key: str
    frames: list[Path]
    fbank: Path
    audio: Path | None
    meta: dict


def read_metadata(path: str | os.PathLike) -> dict[str, dict]:
    rows = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({err})") from err
            if not isinstance(row, dict) or not isinstance(row.get("clip_id"), str):
                raise ValueError(f"{path}:{line_no}: each line needs a string field 'clip_id'")
            rows[row["clip_id"]] = row
    return rows


def read_extract_manifests(
    extract_dirs: Sequence[str | os.PathLike],
) -> dict[str, tuple[Path, dict]]:
    """clip id -> (its part directory, its manifest row), over all extract parts."""
    found: dict[str, tuple[Path, dict]] = {}
    for part in map(Path, extract_dirs):
        manifest = part / "manifest.csv"
        if not manifest.is_file():
            raise FileNotFoundError(f"{manifest}: extract manifest missing")
        with open_csv(manifest, ["clip_id", "status"], "missing columns {missing}") as reader:
            for row in reader:
                if row["clip_id"] in found:
                    log.warning(
                        "%s: clip %s also in %s; keeping the first",
                        manifest,
                        row["clip_id"],
                        found[row["clip_id"]][0],
                    )
                    continue
                found[row["clip_id"]] = (part, row)
    return found


def read_kept(path: str | os.PathLike) -> set[str]:
    with open(path, encoding="utf-8") as f:
        return {line.strip() for line in f if line.strip() and not line.startswith("#")}


def check_clip_files(
    directory: Path, need_frames: bool, keep_wav: bool
) -> tuple[list[Path], Path, tuple[int, ...], Path | None]:
    """The clip's frames (in index order), fbank (and its shape), audio; ValueError says why."""
    if not directory.is_dir():
        raise ValueError(f"{directory}: clip directory missing")
    numbered = [
        (int(m.group(1)), p) for p in directory.iterdir() if (m := FRAME_FILE.match(p.name))
    ]
    frames = [p for _, p in sorted(numbered)]
    if need_frames and not frames:
        raise NoFrames(f"{directory}: no frames (frame_<kk>.jpg); this split needs them")
    for frame in frames:
        try:
            with Image.open(frame) as image:
                image.verify()
        except Exception as err:
            raise ValueError(f"{frame}: not a readable JPEG ({err})") from err
    fbank = directory / "fbank.npy"
    try:
        array = np.load(fbank, allow_pickle=False)
    except Exception as err:
        raise ValueError(f"{fbank}: not a readable .npy ({err})") from err
    if array.ndim != 2 or not np.all(np.isfinite(array)):
        raise ValueError(f"{fbank}: expected a finite 2-D array, got shape {array.shape}")
    audio = directory / "audio.wav"
    if keep_wav and not audio.is_file():
        raise ValueError(f"{audio}: missing and extract.keep_wav is set")
    return frames, fbank, array.shape, audio if keep_wav else None


def collect_clips(
    extract_dirs: Sequence[str | os.PathLike],
    metadata: dict[str, dict],
    split: str,
    kept: set[str] | None = None,
    need_frames: bool = False,
    keep_wav: bool = False,
    exclude: set[str] | None = None,
) -> tuple[list[Clip], Counter, list[dict]]:
    """The split's writable clips (sorted by id), counts per outcome, and the skipped clips.

    ``exclude``: YouTube ids never to write (evaluation sets); counted as ``excluded_eval_ids``.
    """
    extracted = read_extract_manifests(extract_dirs)
    counts: Counter = Counter()
    skipped: list[dict] = []
    clips: list[Clip] = []
    keys: dict[str, str] = {}
    fbank_shape = None
    wanted = sorted(cid for cid, row in metadata.items() if row.get("split") == split)
    if exclude is not None:
        counts["excluded_eval_ids"] = 0
    for clip_id in tqdm(wanted, desc=f"check {split}", unit="clip", mininterval=5):
        if exclude and youtube_id_of(metadata[clip_id]) in exclude:
            counts["excluded_eval_ids"] += 1
            continue
        if kept is not None and clip_id not in kept:
            counts["filtered_out"] += 1
            continue
        reason = None
        if clip_id not in extracted:
            reason, outcome = "not in any extract manifest", "not_extracted"
        elif extracted[clip_id][1]["status"] != "ok":
            row = extracted[clip_id][1]
            reason, outcome = f"extract {row['status']}: {row.get('reason', '')}", "extract_failed"
        else:
            try:
                key = shard_key(clip_id)
                if key in keys:
                    raise ValueError(f"key {key!r} already used by clip {keys[key]!r}")
                frames, fbank, shape, audio = check_clip_files(
                    extracted[clip_id][0] / clip_id, need_frames, keep_wav
                )
                if fbank_shape is not None and shape != fbank_shape:
                    raise ValueError(
                        f"{fbank}: shape {shape} differs from the split's {fbank_shape}"
                    )
            except ValueError as err:
                reason = str(err)
                outcome = "no_frames" if isinstance(err, NoFrames) else "broken"
        if reason is not None:
            counts[outcome] += 1
            skipped.append({"clip_id": clip_id, "reason": reason})
            log.warning("skip %s: %s", clip_id, reason)
            continue
        fbank_shape = shape
        keys[key] = clip_id
        meta = {**metadata[clip_id], "n_frames": len(frames)}
        clips.append(Clip(clip_id, key, frames, fbank, audio, meta))
    counts["written"] = len(clips)
    return clips, counts, skipped


def sample_members(clip: Clip) -> list[tuple[str, bytes]]:
    """A clip's (field, bytes) in shard order: frames by index, fbank, audio if kept, metadata."""
    members = [(f"frame{k}.jpg", frame.read_bytes()) for k, frame in enumerate(clip.frames)]
    members.append(("fbank.npy", clip.fbank.read_bytes()))
    if clip.audio is not None:
        members.append(("audio.wav", clip.audio.read_bytes()))
    members.append(("json", json.dumps(clip.meta, ensure_ascii=False, sort_keys=True).encode()))
    return members


def write_shard(path: Path, clips: Sequence[Clip]) -> dict:
    """One tar of ``clips``; returns its stats (fbank moments over all values of all clips)."""
    total = total_sq = n_values = 0.0
    with open(path, "wb") as f, reproducible_tar(f) as tar:
        for clip in clips:
            members = sample_members(clip)
            # One write per member: TarWriter sorts a sample's fields by name, which would put
            # audio first and frame10 before frame2, and change every shard's bytes.
            for field, data in members:
                tar.write({"__key__": clip.key, field: data})
            fbank_bytes = dict(members)["fbank.npy"]
            values = np.load(io.BytesIO(fbank_bytes)).astype(np.float64)
            total, total_sq, n_values = (
                total + values.sum(),
                total_sq + (values**2).sum(),
                n_values + values.size,
            )
    mean = total / n_values
    return {
        "shard": path.name,
        "count": len(clips),
        "clip_ids": [c.clip_id for c in clips],
        "frames_per_clip": [len(c.frames) for c in clips],
        "fbank_mean": mean,
        "fbank_std": float(np.sqrt(max(total_sq / n_values - mean**2, 0.0))),
    }


def reproducible_tar(f) -> wds.TarWriter:
    """webdataset's tar writer, set to write the bytes the hand-written writer wrote before it
    (tests/test_shard.py holds their sha256): no owner names, mode 0644, mtime 0, fields as
    given (no encoder), and tarfile's default PAX format (TarWriter ignores its ``format``)."""
    return wds.TarWriter(f, user="", group="", mode=0o644, mtime=0, encoder=False)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def write_split(
    extract_dirs: Sequence[str | os.PathLike],
    metadata_path: str | os.PathLike,
    split: str,
    out_dir: str | os.PathLike,
    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
    kept_path: str | os.PathLike | None = None,
    need_frames: bool | None = None,
    keep_wav: bool = False,
    exclude_lists: Sequence[str | os.PathLike] = (),
) -> dict:
    """Shard one split into ``out_dir`` (written atomically); returns the index.

    ``exclude_lists``: files of evaluation YouTube ids (``filter.exclude_id_lists``), dropped
    from every split but the evaluation splits.
    """
    if samples_per_shard < 1:
        raise ValueError(f"shard.samples_per_shard must be >= 1, got {samples_per_shard}")
    if need_frames is None:
        need_frames = split in DEFAULT_REQUIRE_FRAMES
    kept = None
    if kept_path is not None:
        if split == "align":
            kept = read_kept(kept_path)
        else:
            log.warning(
                "%s: the kept list applies to the align split only; ignored for %s",
                kept_path,
                split,
            )
    exclude = None
    if exclude_lists and split not in EVALUATION_SPLITS:
        exclude = read_exclusions([str(p) for p in exclude_lists])
    metadata = read_metadata(metadata_path)
    clips, counts, skipped = collect_clips(
        extract_dirs, metadata, split, kept, need_frames, keep_wav, exclude
    )
    if exclude is not None:
        log.info(
            "split %s: %d clip(s) dropped as evaluation ids (%d ids in %s)",
            split, counts["excluded_eval_ids"], len(exclude), ", ".join(map(str, exclude_lists)),
        )  # fmt: skip
    if not clips:
        raise RuntimeError(
            f"split {split!r}: no clip to write ({dict(counts)}); see the skipped reasons above"
        )

    shards = []
    with atomic_path(out_dir, directory=True) as tmp:
        starts = range(0, len(clips), samples_per_shard)
        for number, start in enumerate(tqdm(starts, desc=f"write {split}", unit="shard")):
            stats = write_shard(
                tmp / f"{split}-{number:06d}.tar", clips[start : start + samples_per_shard]
            )
            stats_name = f"stats-{number:06d}.json"
            write_json(tmp / stats_name, stats)
            tar = tmp / stats["shard"]
            shards.append({
                "file": stats["shard"],
                "count": stats["count"],
                "stats": stats_name,
                # the reader checks these: a tar cut at a member boundary is a valid, smaller tar
                "bytes": tar.stat().st_size,
                "sha256": file_sha256(tar),
            })  # fmt: skip
        index = {
            "split": split,
            "total": len(clips),
            "samples_per_shard": samples_per_shard,
            "fbank_shape": list(np.load(clips[0].fbank, mmap_mode="r").shape),
            "shards": shards,
            "counts": dict(sorted(counts.items())),
            "skipped": skipped,
        }
        write_json(tmp / "index.json", index)
    log.info("split %s: %s in %d shard(s) at %s", split, dict(counts), len(shards), out_dir)
    return index


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(
        "shard", __doc__.split("\n")[0], "sections shard, extract, filter.exclude_id_lists"
    )
    parser.add_argument("--extract", nargs="+", required=True, help="extract part directories")
    parser.add_argument("--metadata", required=True, help="the gathered acquire/metadata.jsonl")
    parser.add_argument("--kept", help="filter/kept.txt: the align clips to keep")
    parser.add_argument("--split", required=True, help="align, pseudolabel, prefix or test")
    parser.add_argument("--out", required=True, help="the split's shard directory")
    args, params = read_stage(parser, argv)
    shard_cfg = params["shard"]
    require_frames = shard_cfg["require_frames"]
    try:
        write_split(
            args.extract,
            args.metadata,
            args.split,
            args.out,
            samples_per_shard=int(shard_cfg["samples_per_shard"]),
            kept_path=args.kept,
            need_frames=args.split in require_frames,
            keep_wav=bool(params["extract"]["keep_wav"]),
            exclude_lists=params["filter"]["exclude_id_lists"],
        )
    except (OSError, ValueError, RuntimeError) as err:
        log.error("shard %s: %s", args.split, err)
        return 1
    return 0
