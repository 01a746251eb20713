"""Media throughput: synthetic clips written and clips extracted, per second and per core.

    python bench/extract.py                          # 60 miniature clips (2.56 s, 64x64)
    python bench/extract.py --clips 200 --workers 2
    python bench/extract.py --folder /work/shared/data/clips --short-side 336 --mel 128 --frames 1024

Runs the stages' own code (`generate_part`, `extract_all`) on a fresh temporary directory.
"Per core" divides by the CPU seconds spent by this process and its ffmpeg children together
(user + system), so the figure holds whatever the number of workers; "wall" is clips per
elapsed second. The miniature run writes and extracts ~7,100 clips on 2 cores.
"""

from __future__ import annotations

import argparse
import logging
import resource
import tempfile
import time
from pathlib import Path

from dalipipe.data.extract import extract_all, read_sources
from dalipipe.miniature import synthetic


def cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(label: str, n_clips: int, work) -> None:
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    work()
    cpu, wall = cpu_seconds() - cpu0, time.perf_counter() - wall0
    print(
        f"{label:<34} {n_clips:>5} clips  {n_clips / cpu:7.1f} clips/s per core"
        f"  {n_clips / wall:7.1f} clips/s wall  ({1000 * cpu / n_clips:.1f} ms CPU per clip)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clips", type=int, default=60, help="synthetic clips to write")
    parser.add_argument("--seconds", type=float, default=2.56, help="synthetic clip length")
    parser.add_argument("--size", type=int, default=64, help="synthetic frame size")
    parser.add_argument("--folder", help="also extract every media file of this folder or CSV")
    parser.add_argument("--short-side", type=int, default=64, help="extract.frame_short_side")
    parser.add_argument("--mel", type=int, default=64, help="extract.fbank.num_mel_bins")
    parser.add_argument("--frames", type=int, default=256, help="extract.fbank.target_length")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    extract_cfg = {
        "frame_short_side": args.short_side,
        "fbank": {"num_mel_bins": args.mel, "target_length": args.frames},
    }
    world = synthetic.world_config(
        {
            "clip_seconds": args.seconds,
            "frame_size": args.size,
            "splits": {"align": args.clips, "pseudolabel": 0, "prefix": 0, "test": 0},
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        part = tmp / "acquire"
        measure(
            f"write synthetic ({args.seconds:g} s, {args.size}px)",
            args.clips,
            lambda: synthetic.generate_part(world, 0, 0, 1, part, args.workers),
        )
        entries = read_sources(part / "manifest.csv")
        measure(
            "extract synthetic",
            len(entries),
            lambda: extract_all(entries, tmp / "extract", extract_cfg, args.workers),
        )
        if args.folder:
            entries = read_sources(args.folder)
            measure(
                f"extract {Path(args.folder).name}",
                len(entries),
                lambda: extract_all(entries, tmp / "extract_folder", extract_cfg, args.workers),
            )


if __name__ == "__main__":
    main()
