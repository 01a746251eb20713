"""Shards in the shard stage's layout (DEVELOPING.md, "Shards") for the stage tests, written three
ways because the tests need three things: `write_shards` goes through `dalipipe.data.shard` (an
indexed split, frames on disk first); `write_shard` writes the tar members directly for the align
stage's clips (no index, no labels); `write_test_shard` writes a labelled test split of the
synthetic world with one broken clip for the evaluate-stage tests."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from dalipipe.world import classes as world

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


def write_shards(directory, clips):
    """A one-tar shard split in the shard stage's layout; clips: (clip_id, frames, fbank, meta)."""
    from dalipipe.data.shard import Clip, write_shard

    staging = directory.parent / f"{directory.name}-files"
    directory.mkdir(parents=True)
    entries = []
    for clip_id, frames, fbank, meta in clips:
        clip_dir = staging / clip_id
        clip_dir.mkdir(parents=True)
        frame_paths = []
        for k, frame in enumerate(frames):
            Image.fromarray(frame).save(clip_dir / f"frame_{k:02d}.jpg", quality=95)
            frame_paths.append(clip_dir / f"frame_{k:02d}.jpg")
        np.save(clip_dir / "fbank.npy", fbank.astype(np.float16))
        meta = {"clip_id": clip_id, "n_frames": len(frames), **meta}
        entries.append(Clip(clip_id, clip_id, frame_paths, clip_dir / "fbank.npy", None, meta))
    write_shard(directory / "test-000000.tar", entries)
    index = {"shards": [{"file": "test-000000.tar", "count": len(entries)}]}
    (directory / "index.json").write_text(json.dumps(index))
    return directory


def solid(colour, size=(40, 48)):
    return np.full((*size, 3), colour, dtype=np.uint8)


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    return buffer.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array.astype(np.float16))
    return buffer.getvalue()


def write_shard(path, clips):
    """A webdataset tar in the project's shard format (DEVELOPING.md); clips: (key, frames,
    fbank), no index and no labels."""
    with tarfile.open(path, "w") as tar:
        for key, frames, fbank in clips:
            add_member(
                tar, f"{key}.json", json.dumps({"clip_id": key, "n_frames": len(frames)}).encode()
            )
            for k, frame in enumerate(frames):
                add_member(tar, f"{key}.frame{k}.jpg", jpeg_bytes(Image.fromarray(frame)))
            add_member(tar, f"{key}.fbank.npy", npy_bytes(fbank))


def make_clips(rng, prefix, n):
    clips = []
    for i in range(n):
        colour = rng.integers(0, 256, 3)
        frames = [np.broadcast_to(colour, (32, 32, 3)).astype(np.uint8) for _ in range(3)]
        fbank = rng.normal(size=(64, 32)) + colour[0] / 128.0  # audio correlated with the look
        clips.append((f"{prefix}-{i:03d}", frames, fbank))
    return clips


MEL, FRAMES = 16, 32


def write_test_shard(directory: Path, n: int = 6) -> list[dict]:
    """A webdataset shard laid out as stage shard writes it (DEVELOPING.md, "Shards")."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [c.name for c in world.CLASSES[:4]]
    metas = []
    with tarfile.open(directory / "test-000000.tar", "w") as tar:
        for i in range(n):
            heard = [names[i % 4]]
            seen = heard if i % 3 else []
            meta = {
                "clip_id": f"clip-{i:03d}",
                "split": "test",
                "labels": heard,
                "start_s": 0.0,
                "heard": heard,
                "seen": seen,
                "references": world.reference_captions(heard, rng),
                "n_frames": 3,
            }
            metas.append(meta)
            fbank = rng.standard_normal((FRAMES, MEL))
            add_member(tar, f"clip-{i:03d}.fbank.npy", npy_bytes(fbank))
            frame = jpeg_bytes(Image.new("RGB", (32, 32), world.CLASSES[i % 4].rgb))
            for k in range(3):
                add_member(tar, f"clip-{i:03d}.frame{k}.jpg", frame)
            add_member(tar, f"clip-{i:03d}.json", json.dumps(meta).encode())
        add_member(tar, "clip-bad.json", b'{"clip_id": "clip-bad"}')  # no fbank, no references
    return metas
