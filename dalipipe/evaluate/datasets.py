"""Evaluation sets: the miniature's test shards, AudioCaps test and Clotho evaluation.

    from dalipipe.evaluate.datasets import load_dataset
    ds = load_dataset("audiocaps", {"csv": "test.csv", "media": "clips/"}, fbank_cfg)
    for clip in ds.clips: fbank, frame = clip.load()

Every set is a list of clips, each with its reference captions (kept as given, five per clip),
its metadata, and a loader for the model input (normalised filterbank, and the middle frame
where there is video). A clip whose media is missing or unreadable becomes a row in
``ds.failed`` with the reason; it never stops the stage.

- miniature: webdataset shards ``<run>/shards/test/*.tar``; references = meta["references"].
- AudioCaps: CSV ``audiocap_id,youtube_id,start_time,caption``; clip id ``<ytid>_<start ms>``
  (as the acquire stage names AudioSet segments). Media: a folder laid out like the extract
  stage's output (``<clip_id>/fbank.npy`` and ``frame_<kk>.jpg``, also inside ``part-*``), the
  acquire stage's output (``part-*/clips/<clip_id>.*``), or a folder of media files named
  ``<clip_id>.*`` or ``<ytid>.*`` holding the 10-s segment.
- Clotho: CSV ``file_name,caption_1..caption_5``; audio only (FreeSound has no video); the
  44.1 kHz files are resampled to 16 kHz before the filterbank (the authors' loaders skipped
  this). ``dedup`` reproduces the authors' de-duplication of reference captions across the
  whole set, walking the CSV's rows in file order (off by default: the references are the
  dataset's own; docs/protocol.md).
"""

from __future__ import annotations

import io
import json
import logging
import re
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dalipipe.common import open_csv
from dalipipe.data.audioset import clip_id_for

log = logging.getLogger(__name__)

MEDIA_SUFFIXES = {".wav", ".flac", ".mp3", ".ogg", ".m4a", ".mp4", ".mkv", ".webm", ".avi", ".mov"}
VIDEO_SUFFIXES = {".mp4", ".mkv", ".webm", ".avi", ".mov"}


@dataclass
class EvalClip:
    clip_id: str
    references: list[str]
    meta: dict
    # () -> (fbank float32 (frames, mel), PIL image or None); raises on unreadable media
    load: Callable[[], tuple[np.ndarray, object | None]]
    media: Path | None = (
        None  # a file with the clip's sound, where there is one (the report plays it)
    )


@dataclass
class EvalSet:
    name: str
    has_video: bool
    clips: list[EvalClip] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)  # {"clip_id", "reason"}

    def references(self) -> dict[str, list[str]]:
        return {c.clip_id: c.references for c in self.clips}


def pick_frame(n_frames: int, frame: int | str = "middle") -> int:
    """Index of the frame shown to the captioner: the middle one (the authors' frame_5 of 10)."""
    if n_frames < 1:
        raise ValueError("clip has no frames")
    if frame == "middle":
        return n_frames // 2
    return min(int(frame), n_frames - 1)


# One reference caption as a CSV row gives it: (clip id, caption, the clip's metadata).
CaptionRow = tuple[str, str, dict]


def dedup_references(rows: list[CaptionRow]) -> list[CaptionRow]:
    """The rows whose caption no earlier row has: the authors' ``drop_duplicates(subset=
    'caption')`` over the whole test set, which keeps each caption's first row in file order.

    The order is the file's rows, not the clips': AudioCaps lists a clip's five captions far
    apart, so a caption two clips share stays with whichever clip has the earlier row. Captions
    are compared exactly (case and punctuation count). A clip whose every caption went to
    earlier rows has no row left, and `group_references` then leaves it out, as their group-by
    did.
    """
    seen: set[str] = set()
    kept = []
    for row in rows:
        if row[1] not in seen:
            seen.add(row[1])
            kept.append(row)
    return kept


def group_references(rows: list[CaptionRow]) -> tuple[dict[str, list[str]], dict[str, dict]]:
    """(references, metadata) per clip id, clips and captions in the rows' order."""
    refs: dict[str, list[str]] = {}
    meta: dict[str, dict] = {}
    for clip_id, caption, clip_meta in rows:
        refs.setdefault(clip_id, []).append(caption)
        meta.setdefault(clip_id, clip_meta)
    return refs, meta


# ----------------------------------------------------------------------------- miniature


def read_shard_dir(shard_dir: str | Path) -> list[dict[str, bytes]]:
    """The raw samples of a shard directory, {"__key__": id, "<field>": bytes, ...}: decoded
    one clip at a time later, so a broken sample fails only its clip."""
    from dalipipe.data.shard_reader import iter_raw_samples, resolve_shards

    shard_dir = Path(shard_dir)
    # the shard stage's index when there is one, else every tar of the folder
    has_index = (shard_dir / "index.json").is_file()
    shards = resolve_shards(shard_dir) if has_index else sorted(shard_dir.glob("*.tar"))
    if not shards:
        raise FileNotFoundError(f"{shard_dir}: no *.tar shards")
    samples = []
    for shard in shards:
        try:
            samples += [{"__key__": key, **fields} for key, fields in iter_raw_samples(shard)]
        except tarfile.TarError as err:
            raise ValueError(f"{shard}: not a readable tar shard ({err})") from None
    return samples


def _decode_sample(sample: dict[str, bytes], frame: int | str):
    from PIL import Image

    fbank = np.load(io.BytesIO(sample["fbank.npy"])).astype(np.float32)
    frames = sorted(
        (k for k in sample if re.fullmatch(r"frame\d+\.jpg", k)), key=lambda k: int(k[5:-4])
    )
    image = None
    if frames:
        image = Image.open(io.BytesIO(sample[frames[pick_frame(len(frames), frame)]])).convert(
            "RGB"
        )
    return fbank, image


def miniature_set(shard_dir: str | Path, frame: int | str = "middle") -> EvalSet:
    ds = EvalSet("miniature", has_video=True)
    for sample in read_shard_dir(shard_dir):
        key = sample["__key__"]
        try:
            meta = json.loads(sample["json"])
            refs = meta["references"]
            if "fbank.npy" not in sample:
                raise KeyError("fbank.npy")
        except (KeyError, json.JSONDecodeError) as err:
            ds.failed.append(
                {"clip_id": key, "reason": f"{shard_dir}: sample {key}: missing {err}"}
            )
            continue
        ds.clips.append(EvalClip(key, list(refs), meta, lambda s=sample: _decode_sample(s, frame)))
    ds.clips.sort(key=lambda c: c.clip_id)
    return ds


# ----------------------------------------------------------------------------- media folders


def index_media(media_dir: str | Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """(extracted clip folders by clip id, media files by stem) found in ``media_dir``."""
    media_dir = Path(media_dir)
    if not media_dir.is_dir():
        raise FileNotFoundError(f"{media_dir}: media folder not found")
    extracted, files = {}, {}
    # The folder itself, the acquire stage's part-<i>/clips/ and the extract stage's part-<i>/.
    parents = [media_dir, media_dir / "clips", *sorted(media_dir.glob("part-*"))]
    parents += sorted(media_dir.glob("part-*/clips"))
    for parent in (p for p in parents if p.is_dir()):
        for path in parent.iterdir():
            if path.is_dir() and (path / "fbank.npy").is_file():
                extracted[path.name] = path
            elif path.is_file() and path.suffix.lower() in MEDIA_SUFFIXES:
                files[path.stem] = path
    return extracted, files


def _load_extracted(folder: Path, frame: int | str, with_frame: bool):
    from PIL import Image

    fbank = np.load(folder / "fbank.npy").astype(np.float32)
    frames = sorted(folder.glob("frame_*.jpg"))
    image = None
    if with_frame and frames:
        image = Image.open(frames[pick_frame(len(frames), frame)]).convert("RGB")
    return fbank, image


def _load_media_file(path: Path, fbank_cfg: dict, frame: int | str, with_frame: bool, square):
    from dalipipe.data.extract import frame_geometry
    from dalipipe.data.fbank import model_input_from_wave
    from dalipipe.data.ffmpeg import decode_audio, grab_frame

    wave = decode_audio(path, sample_rate=16000)
    if wave.size == 0:
        raise ValueError(f"{path}: empty audio")
    fbank = model_input_from_wave(wave, 16000, fbank_cfg)
    image = None
    if with_frame and path.suffix.lower() in VIDEO_SUFFIXES:
        # Frames are the first of each second; "middle" of a 10-s clip is second 5.
        n_seconds = max(1, int(len(wave) / 16000))
        # `square`: the centre square the extract stage would store (extract.frame_crop)
        vf = frame_geometry(square, crop=True) if square else None
        image = grab_frame(path, pick_frame(n_seconds, frame), vf)
    return fbank, image


def _media_loader(keys, extracted, files, fbank_cfg, frame, with_frame, square):
    """(loader, sound file or None) for the first key found, or (None, None)."""
    for key in keys:
        if key in extracted:
            wav = extracted[key] / "audio.wav"
            loader = lambda f=extracted[key]: _load_extracted(f, frame, with_frame)  # noqa: E731
            return loader, wav if wav.is_file() else None
        if key in files:
            loader = lambda p=files[key]: _load_media_file(p, fbank_cfg, frame, with_frame, square)  # noqa: E731
            return loader, files[key]
    return None, None


# ----------------------------------------------------------------------------- AudioCaps, Clotho


def audiocaps_rows(csv_path: str | Path) -> list[CaptionRow]:
    """One row per caption of an AudioCaps CSV, in file order."""
    rows = []
    need = ["audiocap_id", "caption", "start_time", "youtube_id"]
    with open_csv(csv_path, need, "AudioCaps CSV needs columns {needed}") as reader:
        for line, row in enumerate(reader, start=2):
            try:
                start = float(row["start_time"])
            except ValueError:
                raise ValueError(
                    f"{csv_path}:{line}: start_time {row['start_time']!r} is not a number"
                ) from None
            clip_id = clip_id_for(row["youtube_id"], start)
            clip_meta = {"clip_id": clip_id, "youtube_id": row["youtube_id"], "start_s": start}
            rows.append((clip_id, row["caption"].strip(), clip_meta))
    return rows


def clotho_rows(csv_path: str | Path) -> list[CaptionRow]:
    """One row per non-empty caption of a Clotho CSV: file rows in order, caption_1..5 each."""
    rows = []
    ids: set[str] = set()
    columns = ["file_name"] + [f"caption_{i}" for i in range(1, 6)]
    with open_csv(csv_path, columns, "Clotho CSV needs columns {needed}") as reader:
        for row in reader:
            clip_id = clotho_clip_id(row["file_name"])
            if clip_id in ids:
                raise ValueError(
                    f"{csv_path}: file names {row['file_name']!r} collide as {clip_id!r}"
                )
            ids.add(clip_id)
            clip_meta = {"clip_id": clip_id, "file_name": row["file_name"]}
            captions = (row[f"caption_{i}"].strip() for i in range(1, 6))
            rows += [(clip_id, caption, clip_meta) for caption in captions if caption]
    return rows


def read_audiocaps(csv_path: str | Path) -> tuple[dict[str, list[str]], dict[str, dict]]:
    """(references, metadata) per clip id, in file order."""
    return group_references(audiocaps_rows(csv_path))


def read_clotho(csv_path: str | Path) -> tuple[dict[str, list[str]], dict[str, dict]]:
    return group_references(clotho_rows(csv_path))


def clotho_clip_id(file_name: str) -> str:
    """'Santa Motor.wav' -> 'Santa_Motor': ids keep to ``[A-Za-z0-9_-]``."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", Path(file_name).stem).strip("_") or "clip"


def _media_set(
    name, rows, media_dir, fbank_cfg, frame, has_video, dedup, key_fields, square
) -> EvalSet:
    refs, meta = group_references(dedup_references(rows) if dedup else rows)
    ds = EvalSet(name, has_video=has_video)
    if media_dir is None:
        raise ValueError(f"evaluate.datasets.{name}.media: no media folder configured")
    extracted, files = index_media(media_dir)
    for clip_id, clip_refs in refs.items():
        keys = [clip_id] + [Path(str(meta[clip_id][k])).stem for k in key_fields]
        loader, sound = _media_loader(keys, extracted, files, fbank_cfg, frame, has_video, square)
        if loader is None:
            ds.failed.append({"clip_id": clip_id, "reason": f"{media_dir}: no media for {clip_id}"})
            continue
        ds.clips.append(EvalClip(clip_id, clip_refs, meta[clip_id], loader, sound))
    log.info("%s: %d clips with media, %d without", name, len(ds.clips), len(ds.failed))
    return ds


# The sets read from a CSV and a media folder: the CSV's reader, whether the media has video,
# and the metadata fields that may name a clip's media file besides its clip id.
MEDIA_SETS = {
    "audiocaps": (audiocaps_rows, True, ["youtube_id"]),
    "clotho": (clotho_rows, False, ["file_name"]),
}


def stored_square(extract: dict | None) -> int | None:
    """The side of the square the extract stage cuts frames to (``extract.frame_crop``), which
    a frame read from a media file is cut to as well; None where frames are kept whole."""
    from dalipipe.config import section_defaults

    extract = {**section_defaults("extract"), **(extract or {})}
    return int(extract["frame_short_side"]) if extract["frame_crop"] else None


def load_dataset(
    name: str, cfg: dict, fbank_cfg: dict | None = None, frame="middle", square: int | None = None
) -> EvalSet:
    """One configured evaluation set (``evaluate.datasets.<name>``). ``square``: a frame taken
    from a media file is cut like the extract stage's with ``extract.frame_crop`` (the short
    side scaled to ``square``, then the centre square); None keeps it whole."""
    fbank_cfg = fbank_cfg or {}
    if name == "miniature":
        return miniature_set(cfg["shards"], frame)
    if name in MEDIA_SETS:
        read_rows, has_video, key_fields = MEDIA_SETS[name]
        rows = read_rows(cfg["csv"])
        dedup = cfg.get("dedup", False)
        media = cfg.get("media")
        return _media_set(name, rows, media, fbank_cfg, frame, has_video, dedup, key_fields, square)
    raise ValueError(f"evaluate.datasets: unknown dataset {name!r} (miniature, audiocaps, clotho)")
