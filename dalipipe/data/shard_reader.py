"""Read the webdataset shards the shard stage writes: every training and evaluation stage's input.

    for sample in ShardReader("results/r/shards/align", shuffle=True, seed=0):   # streams
        sample["clip_id"], sample["frames"], sample["fbank"], sample["meta"]
    clips = load_split("results/r/shards/prefix")                                # small splits

A sample is a dict: clip_id, frames (HxWx3 uint8 arrays, all or `frame_indices`), fbank
(float32, target_length x num_mel_bins), meta (the clip's metadata), and audio with
audio_sample_rate when the shard kept the WAV. The layout is dalipipe/data/shard.py's.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import wave as wavefile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

FRAME_FIELD = re.compile(r"^frame(\d+)\.jpg$")  # in a shard sample


REDO = "rerun the shard stage (snakemake --forcerun shard)"


class ShardError(ValueError):
    """A shard that is not a readable tar or not what its index.json says; names the shard."""


def index_entry(path: Path) -> dict | None:
    """The entry of ``index.json`` beside the shard that lists it (count, and for shards written
    since the index held them, bytes and sha256), or None when no index lists it."""
    index_file = path.parent / "index.json"
    if not index_file.is_file():
        return None
    try:
        entries = json.loads(index_file.read_text())["shards"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ShardError(f"{index_file}: not a shard index ({err!r})") from err
    return next((e for e in entries if e.get("file") == path.name), None)


def check_size(path: Path, entry: dict | None) -> None:
    """A shard cut short (or replaced) has another size than its index records."""
    if entry is None or "bytes" not in entry:
        return
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise ShardError(
            f"{path}: {size} bytes where its index.json records {entry['bytes']}: "
            f"cut short or replaced; {REDO}"
        )


def resolve_shards(shards) -> list[Path]:
    """A shard directory (its index.json), one tar, or a list of tars; a shard whose size
    differs from its index's record stops here, before any sample is read."""
    if isinstance(shards, (str, os.PathLike)):
        path = Path(shards)
        if path.is_dir():
            index_file = path / "index.json"
            if not index_file.is_file():
                raise FileNotFoundError(f"{index_file}: shard index missing")
            shards = [
                path / entry["file"] for entry in json.loads(index_file.read_text())["shards"]
            ]
        else:
            shards = [path]
    paths = [Path(p) for p in shards]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"{p}: shard missing")
        check_size(p, index_entry(p))
    return paths


class _HashingReader:
    """A file read through sha256, so that a streamed shard is checked without a second pass."""

    def __init__(self, f):
        self.f, self.sha256 = f, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.sha256.update(data)
        return data

    def read_to_end(self) -> str:
        while self.read(1 << 20):
            pass
        return self.sha256.hexdigest()


def iter_raw_samples(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {field: bytes}) per sample, streaming the tar; a sample's members are adjacent.

    A shard that index.json lists is checked against it once read to its end: the number of
    samples (a tar cut at a member boundary reads as a valid, smaller tar) and, where recorded,
    size and sha256. Every error names the shard."""
    path = Path(path)
    entry = index_entry(path)
    check_size(path, entry)
    key, fields, count = None, {}, 0
    with open(path, "rb") as f:
        stream = _HashingReader(f)
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    name = member.name.rsplit("/", 1)[-1]
                    if "." not in name:
                        raise ShardError(f"{path}: member {member.name!r} has no field suffix")
                    member_key, field = name.split(".", 1)
                    if member_key != key:
                        if key is not None:
                            count += 1
                            yield key, fields
                        key, fields = member_key, {}
                    fields[field] = tar.extractfile(member).read()
        except tarfile.TarError as err:
            raise ShardError(f"{path}: not a readable tar shard ({err}); {REDO}") from err
        if key is not None:
            count += 1
            yield key, fields
        digest = stream.read_to_end()
    if entry is None:
        return
    if "count" in entry and count != entry["count"]:
        raise ShardError(
            f"{path}: {count} samples where its index.json records {entry['count']}: "
            f"cut short or replaced; {REDO}"
        )
    if "sha256" in entry and digest != entry["sha256"]:
        raise ShardError(f"{path}: sha256 differs from its index.json's: corrupted; {REDO}")


def decode_wav(data: bytes) -> tuple[np.ndarray, int]:
    """16-bit PCM WAV (what extract writes) -> float32 first channel in [-1, 1], sample rate."""
    with wavefile.open(io.BytesIO(data)) as f:
        if f.getsampwidth() != 2:
            raise ValueError(f"audio.wav: expected 16-bit PCM, got {8 * f.getsampwidth()}-bit")
        pcm = np.frombuffer(f.readframes(f.getnframes()), dtype="<i2").reshape(-1, f.getnchannels())
        return pcm[:, 0].astype(np.float32) / 32768.0, f.getframerate()


def decode_sample(
    key: str, fields: dict[str, bytes], frame_indices: Sequence[int] | None = None
) -> dict:
    try:
        meta = json.loads(fields["json"])
        n_frames = sum(1 for name in fields if FRAME_FIELD.match(name))
        wanted = (
            range(n_frames) if frame_indices is None else [i for i in frame_indices if i < n_frames]
        )
        frames = [
            np.asarray(Image.open(io.BytesIO(fields[f"frame{i}.jpg"])).convert("RGB"))
            for i in wanted
        ]
        sample = {
            "clip_id": meta.get("clip_id", key),
            "frames": frames,
            "fbank": np.load(io.BytesIO(fields["fbank.npy"]), allow_pickle=False).astype(
                np.float32
            ),
            "meta": meta,
        }
        if "audio.wav" in fields:
            sample["audio"], sample["audio_sample_rate"] = decode_wav(fields["audio.wav"])
    except KeyError as err:
        raise ValueError(f"shard sample {key!r}: field {err} missing") from err
    return sample


def distributed_rank_and_world() -> tuple[int, int]:
    """torch.distributed when initialised, else RANK/WORLD_SIZE (torchrun, accelerate), else 0/1."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class ShardReader(torch.utils.data.IterableDataset):
    """Iterate the samples of a set of shards as dicts: clip_id, frames, fbank, meta.

    Each sample goes to exactly one consumer (rank x DataLoader worker). With at least as many
    shards as consumers, consumers take whole shards (each reads only its own files, so counts
    can differ by up to a shard); with fewer, every consumer streams all shards and keeps every
    n-th sample (``split_by`` forces either). ``shuffle`` permutes the shard order with
    (seed, epoch), identically on every rank so the split stays a partition, then passes the
    samples through a ``buffer_size`` shuffle buffer seeded with (seed, epoch, consumer).
    Without shuffle the order is the shards' order, then the order inside each shard.
    ``rank``/``world_size`` default to the torch.distributed / launcher environment.
    """

    def __init__(
        self,
        shards,
        *,
        shuffle: bool = False,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        buffer_size: int = 1000,
        split_by: str = "auto",
        frame_indices: Sequence[int] | None = None,
        cache: DecodedCache | None = None,
    ):
        super().__init__()
        self.shards = resolve_shards(shards)
        if split_by not in {"auto", "shard", "sample"}:
            raise ValueError(f"split_by must be auto, shard or sample, got {split_by!r}")
        detected_rank, detected_world = distributed_rank_and_world()
        self.rank = detected_rank if rank is None else rank
        self.world_size = detected_world if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world_size {self.world_size}")
        self.shuffle, self.seed, self.buffer_size = shuffle, seed, buffer_size
        self.split_by, self.frame_indices = split_by, frame_indices
        self.cache = cache
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _consumer(self) -> tuple[int, int]:
        worker = torch.utils.data.get_worker_info()
        workers, worker_id = (1, 0) if worker is None else (worker.num_workers, worker.id)
        return self.rank * workers + worker_id, self.world_size * workers

    def _raw_stream(self, consumer: int, consumers: int) -> Iterator[tuple[str, dict]]:
        shards = list(self.shards)
        if self.shuffle:
            np.random.default_rng([self.seed, self.epoch]).shuffle(shards)
        by_shard = self.split_by == "shard" or (
            self.split_by == "auto" and len(shards) >= consumers
        )
        if by_shard:
            for path in shards[consumer::consumers]:
                yield from iter_raw_samples(path)
            return
        position = 0
        for path in shards:
            for raw in iter_raw_samples(path):
                if position % consumers == consumer:
                    yield raw
                position += 1

    def __iter__(self) -> Iterator[dict]:
        consumer, consumers = self._consumer()
        stream = self._raw_stream(consumer, consumers)
        if self.shuffle:
            stream = shuffle_buffer(
                stream, self.buffer_size, np.random.default_rng([self.seed, self.epoch, consumer])
            )
        for key, fields in stream:
            if self.cache is None:
                yield decode_sample(key, fields, self.frame_indices)
            else:
                yield self.cache.decoded(key, fields, self.frame_indices)


class DecodedCache:
    """Decoded samples of one set of shards kept in memory between passes, up to a byte budget.

    Reading and decoding (JPEG frames, the filterbank) were ~40% of a miniature alignment
    epoch, profiled; a training run reads the same clips every epoch. Decoding is a pure
    function of a sample's bytes, so a cached sample is the one decoding would give, and the
    stream is unchanged.
    The cache lives in one process: with DataLoader workers each worker would fill its own
    copy and lose it at the epoch's end, so it is meant for in-process reading. Consumers
    must not modify the samples it returns (they are shared between epochs).
    """

    def __init__(self, budget_bytes: float):
        self.budget = budget_bytes
        self.samples: dict[tuple, dict] = {}
        self.bytes = 0

    def decoded(self, key: str, fields: dict[str, bytes], frame_indices) -> dict:
        name = (key, None if frame_indices is None else tuple(frame_indices))
        sample = self.samples.get(name)
        if sample is None:
            sample = decode_sample(key, fields, frame_indices)
            size = sample_bytes(sample)
            if self.bytes + size <= self.budget:
                self.samples[name] = sample
                self.bytes += size
        return sample


def sample_bytes(sample: dict) -> int:
    arrays = [*sample["frames"], sample["fbank"], sample.get("audio")]
    return sum(a.nbytes for a in arrays if a is not None)


def shuffle_buffer(stream: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """Yield a random element of a ``size``-element buffer, refilling it from the stream."""
    buffer = []
    for item in stream:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = int(rng.integers(len(buffer)))
        buffer[i], item = item, buffer[i]
        yield item
    order = rng.permutation(len(buffer))
    for i in order:
        yield buffer[i]


def load_split(shard_dir: str | os.PathLike) -> list[dict]:
    """Every sample of a (small) split in memory, in shard order."""
    return list(ShardReader(shard_dir, shuffle=False, rank=0, world_size=1))
