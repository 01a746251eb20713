"""Media throughput: synthetic clips written and clips extracted, per second and per core,
beside the authors' preprocessing of the same clips.

    python bench/extract.py                          # 60 miniature clips (2.56 s, 64x64)
    python bench/extract.py --clips 200 --workers 2
    python bench/extract.py --folder /work/shared/data/clips --short-side 336 --mel 128 --frames 1024

Runs the stages' own code (`generate_part`, `extract_all`) on a fresh temporary directory, then
the authors' pipeline (bench/extract_authors.py: OpenCV seeks for 10 frames, resize and crop,
JPEG; ffmpeg to WAV and sox to keep one channel; the training loader's filterbank) on the same
clips, and prints the ratio. Without OpenCV or sox the authors' side is skipped, saying which.
"Per core" divides by the CPU seconds spent by this process and its children together
(user + system), so the figure holds whatever the number of workers or decoder threads;
"wall" is clips per elapsed second. ``--cpus 0`` pins everything to one core, as in the issue's
measurement. The miniature run writes and extracts ~7,100 clips on 2 cores.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import tempfile
import time
from pathlib import Path

import extract_authors as authors

from dalipipe.data.extract import extract_all, read_sources
from dalipipe.world import synthetic


def cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(label: str, n_clips: int, work) -> float:
    """Runs work(), prints its throughput; returns clips per CPU second."""
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    work()
    cpu, wall = cpu_seconds() - cpu0, time.perf_counter() - wall0
    print(
        f"{label:<34} {n_clips:>5} clips  {n_clips / cpu:7.2f} clips/s per core"
        f"  {n_clips / wall:7.2f} clips/s wall  ({1000 * cpu / n_clips:.1f} ms CPU per clip)"
    )
    return n_clips / cpu


def side_by_side(label: str, entries: list[dict], out: Path, extract_cfg: dict, workers: int):
    """dalipipe's extraction and the authors' preprocessing of the same clips, and the ratio."""
    ours = measure(
        f"dalipipe {label}",
        len(entries),
        lambda: extract_all(entries, out / "dalipipe", extract_cfg, workers),
    )
    missing = authors.missing_tools()
    if missing:
        print(f"authors' side skipped: {', '.join(missing)} not available")
        return
    fbank = {**extract_cfg["fbank"], "mean": -5.081, "std": 4.4849}

    def run_authors():
        for e in entries:
            authors.preprocess(e["path"], out / "authors" / e["clip_id"], fbank)

    theirs = measure(f"authors {label}", len(entries), run_authors)
    print(f"{'dalipipe / authors, per core':<34} {ours / theirs:.2f}x")


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
    parser.add_argument("--cpus", type=int, nargs="+", help="pin to these cores (children too)")
    args = parser.parse_args()
    if args.cpus:
        os.sched_setaffinity(0, args.cpus)
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
        entries = [e for e in read_sources(part / "manifest.csv") if not e["reason"]]
        side_by_side("synthetic", entries, tmp / "synthetic", extract_cfg, args.workers)
        if args.folder:
            entries = [e for e in read_sources(args.folder) if not e["reason"]]
            label = Path(args.folder).name
            side_by_side(label, entries, tmp / "folder", extract_cfg, args.workers)


if __name__ == "__main__":
    main()
