"""Shards: webdataset's writer and reader beside the hand-written ones, on the same clips.

    python bench/shards.py                        # 64 clips of 10 frames at 336 px, 16 a shard
    python bench/shards.py --clips 256 --per-shard 64 --repeats 5

Clips have the paper's shapes (10 JPEG frames of 336 px, a 1024 x 128 float16 filterbank) and
smooth pixels, so the JPEGs are of a real frame's size. Four parts, each printed:

1. write: the hand-written tarfile writer the shard stage used before (kept here as the oracle
   tests/test_shard.py checks against) beside webdataset's TarWriter as data/shard.py drives it,
   both from members already in memory; and whether their bytes are the same.
2. read: our reader (dalipipe/data/shard_reader.py, which checks count, size and sha256 against
   index.json) beside webdataset's WebDataset pipeline, raw (bytes per field) and decoded (RGB
   uint8 frames, the filterbank, the metadata).
3. resume at sample k: the seconds to the first sample after skipping k, as align resumes
   (skipping decoded samples), and webdataset's ``.slice(k, None)`` after and before decoding.
4. a shard cut at a member boundary and one cut inside a member: what each reader does.

Timings are the median of ``--repeats`` passes after one warm-up (the files are in the page cache).
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import platform
import statistics
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from dalipipe.data import shard, shard_reader


def hand_written_shard(path: Path, clips) -> None:
    """The tarfile writer the shard stage used before webdataset's TarWriter: the oracle."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for clip in clips:
            for field, data in shard.sample_members(clip):
                info = tarfile.TarInfo(f"{clip.key}.{field}")
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tar.addfile(info, io.BytesIO(data))


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_clips(root: Path, n: int, frames: int, size: int) -> list[shard.Clip]:
    """Extracted clips as the extract stage lays them out, with smooth pixels and fbanks."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, size)
    clips = []
    for i in range(n):
        directory = root / f"clip{i:05d}"
        directory.mkdir(parents=True)
        paths = []
        for k in range(frames):
            phase = rng.uniform(0, 6.3, 3)
            pixels = 127 + 100 * np.sin(4 * ramp[:, None, None] + ramp[None, :, None] + phase)
            pixels = pixels + rng.normal(0, 6, (size, size, 3))
            paths.append(directory / f"frame_{k:02d}.jpg")
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(paths[-1], quality=90)
        fbank = rng.normal(-5, 4, (1024, 128)).astype(np.float16)
        np.save(directory / "fbank.npy", fbank)
        meta = {"clip_id": f"clip{i:05d}", "labels": ["dog"], "split": "align", "n_frames": frames}
        clips.append(shard.Clip(meta["clip_id"], meta["clip_id"], paths, directory / "fbank.npy",
                                None, meta))  # fmt: skip
    return clips


def write_shards(out: Path, clips, per_shard: int) -> list[Path]:
    """The shard stage's tars, index.json included (our reader checks against it)."""
    entries, paths = [], []
    for number, start in enumerate(range(0, len(clips), per_shard)):
        path = out / f"align-{number:06d}.tar"
        stats = shard.write_shard(path, clips[start : start + per_shard])
        entries.append({"file": path.name, "count": stats["count"], "bytes": path.stat().st_size,
                        "sha256": shard.file_sha256(path)})  # fmt: skip
        paths.append(path)
    (out / "index.json").write_text(json.dumps({"shards": entries}))
    return paths


def tarwriter_shard(path: Path, members: list[tuple[str, list]]) -> None:
    with open(path, "wb") as f, shard.reproducible_tar(f) as tar:
        for key, fields in members:
            for field, data in fields:
                tar.write({"__key__": key, field: data})


def tarfile_shard(path: Path, members: list[tuple[str, list]]) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for key, fields in members:
            for field, data in fields:
                info = tarfile.TarInfo(f"{key}.{field}")
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tar.addfile(info, io.BytesIO(data))


def ours(paths, decoded: bool):
    if decoded:
        return shard_reader.ShardReader(paths, rank=0, world_size=1)
    return itertools.chain.from_iterable(shard_reader.iter_raw_samples(p) for p in paths)


def theirs(paths, decoded: bool, skip: int = 0, skip_before_decoding: bool = False):
    dataset = wds.WebDataset([str(p) for p in paths], shardshuffle=False)
    if skip and skip_before_decoding:
        dataset = dataset.slice(skip, None)
    if decoded:
        dataset = dataset.decode("rgb8")
    if skip and not skip_before_decoding:
        dataset = dataset.slice(skip, None)
    return dataset


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                     if line.startswith("Model name"))  # fmt: skip
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{model}, {os.cpu_count()} cores, load average {load}"


def cut_shard_behaviour(paths, work: Path) -> None:
    """Copy the first shard (and its index entry), cut it, and read it with each reader."""
    with tarfile.open(paths[0]) as tar:
        members = tar.getmembers()
    keys = list(dict.fromkeys(m.name.split(".", 1)[0] for m in members))
    boundary = next(m.offset for m in members if m.name.startswith(keys[1] + "."))
    inside = members[len(members) // 2].offset_data + 10
    index = json.loads((paths[0].parent / "index.json").read_text())
    for where, size in [("at a member boundary (after sample 1)", boundary),
                        ("inside a member", inside)]:  # fmt: skip
        cut_dir = work / f"cut-{size}"
        cut_dir.mkdir()
        cut = cut_dir / paths[0].name
        cut.write_bytes(paths[0].read_bytes()[:size])
        (cut_dir / "index.json").write_text(json.dumps({"shards": index["shards"][:1]}))
        print(f"  cut {where}, {size} of {paths[0].stat().st_size} bytes, {len(keys)} samples:")
        for name, read in [("ours", lambda c=cut: list(ours([c], decoded=False))),
                           ("webdataset", lambda c=cut: list(theirs([c], decoded=False)))]:  # fmt: skip
            try:
                print(f"    {name:<10} read {len(read())} of {len(keys)} samples, no error")
            except Exception as err:
                message = str(err).replace(str(work), "<tmp>")
                print(f"    {name:<10} {type(err).__name__}: {message[:110]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--per-shard", type=int, default=16)
    parser.add_argument("--frames", type=int, default=10)
    parser.add_argument("--size", type=int, default=336, help="frame side in pixels")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--resume-at", type=int, help="sample k to resume at (default: 3/4)")
    args = parser.parse_args(argv)
    k = args.resume_at if args.resume_at is not None else 3 * args.clips // 4
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        clips = make_clips(work / "extract", args.clips, args.frames, args.size)
        (work / "shards").mkdir()
        paths = write_shards(work / "shards", clips, args.per_shard)
        mb = sum(p.stat().st_size for p in paths) / 1e6
        print(f"machine: {machine()}")
        print(f"{args.clips} clips ({args.frames} frames of {args.size} px, fbank 1024x128 f16) "
              f"in {len(paths)} shards, {mb:.1f} MB; median of {args.repeats}")  # fmt: skip

        print("1. write (members in memory, all shards)")
        members = [(c.key, shard.sample_members(c)) for c in clips]
        groups = [members[s : s + args.per_shard] for s in range(0, len(members), args.per_shard)]
        same = True
        for name, writer in [("hand-written tarfile", tarfile_shard),
                             ("webdataset TarWriter", tarwriter_shard)]:  # fmt: skip
            out = work / name.split()[0]
            out.mkdir()
            seconds = median_seconds(
                lambda w=writer, o=out: [w(o / f"{i}.tar", g) for i, g in enumerate(groups)],
                args.repeats,
            )
            print(f"  {name:<22} {seconds:7.3f} s  {mb / seconds:7.0f} MB/s")
        for i in range(len(groups)):
            same &= (work / "hand-written" / f"{i}.tar").read_bytes() == (
                work / "webdataset" / f"{i}.tar"
            ).read_bytes()
        print(f"  same bytes: {'yes' if same else 'NO'}")

        print("2. read (all shards, one process)")
        for decoded in (False, True):
            for name, reader in [("ours", ours), ("webdataset", theirs)]:
                seconds = median_seconds(
                    lambda r=reader, d=decoded: sum(1 for _ in r(paths, d)), args.repeats
                )
                what = "decoded" if decoded else "raw"
                print(f"  {what:<7} {name:<10} {seconds:7.3f} s  {args.clips / seconds:7.0f} "
                      f"clips/s  {mb / seconds:6.0f} MB/s")  # fmt: skip

        print(f"3. resume at sample {k} of {args.clips}: seconds to the first sample after it")
        ways = {
            "ours, skipping decoded samples (align)": lambda: next(
                itertools.islice(ours(paths, True), k, None)
            ),
            "ours, skipping raw samples": lambda: shard_reader.decode_sample(
                *next(itertools.islice(ours(paths, False), k, None))
            ),
            "webdataset .decode().slice(k)": lambda: next(iter(theirs(paths, True, k))),
            "webdataset .slice(k).decode()": lambda: next(iter(theirs(paths, True, k, True))),
        }
        for name, first in ways.items():
            print(f"  {name:<40} {median_seconds(first, args.repeats):7.3f} s")

        print("4. a cut shard")
        cut_shard_behaviour(paths, work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
