"""`dalipipe caption`: describe the sound of audio or video files with a trained captioner.

    dalipipe caption street.mp4 birds.flac --model results/miniature/distill/ot_att
    dalipipe caption clip.mp4 --model owner/name@revision --modality audio+image --json
    dalipipe caption recordings/ --model DIR --out captions.csv     # a folder; resumable

A thin shell over `dalipipe.Captioner` (dalipipe/describe/captioner.py; docs/describe.md). Any
format and sample rate ffmpeg reads; each file is prepared like the training clips (the model
folder's captioner.json `features`), the window starting at --start. The decoding is the one the
model folder records (the authors' release: sampled at temperature 0.2), else greedy, unless
--greedy or --sample says otherwise; stderr and every --json row say which. The prefix is off
unless --prefix, as in the authors' inference script. A file that cannot be read gets an error
line naming it on stderr and the others are still captioned; the exit code is non-zero when
every file failed, or with --strict when any did.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from dalipipe.common import setup_logging


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --device and the decoding options, shared with `dalipipe serve`."""
    parser.add_argument(
        "--model", required=True, help="a trained-captioner folder, or a Hub id owner/name[@rev]"
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--prefix", action="store_true", help="insert the learned prefix tokens")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--sample", action="store_true", help="sample (the authors' decoding)")
    how.add_argument("--greedy", action="store_true", help="greedy, whatever the model records")
    parser.add_argument("--temperature", type=float, help="sampling temperature (default: 0.2)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="seed of sampled decoding")


def decoding_arguments(args) -> dict:
    """The decoding the user asked for (None: what the model folder records)."""
    sample = True if args.sample else False if args.greedy else None
    return {
        "sample": sample,
        "temperature": args.temperature,
        "seed": args.seed,
        "max_new_tokens": args.max_new_tokens,
        "prefix": args.prefix,
    }


def load(args, prog: str, batch_size: int = 8):
    """The Captioner of --model, or None after one error line naming it."""
    from dalipipe.describe.captioner import Captioner

    try:
        return Captioner.load(args.model, device=args.device, batch_size=batch_size)
    except (OSError, ValueError) as err:
        print(f"{prog}: error: --model {args.model}: {err}", file=sys.stderr)
        return None


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dalipipe caption", description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="audio or video files, or folders")
    add_model_arguments(parser)
    parser.add_argument("--modality", default="audio", choices=["audio", "audio+image", "image"])
    parser.add_argument("--json", action="store_true", help="one JSON object per file")
    parser.add_argument("--out", type=Path, help="write rows to this .csv or .jsonl (resumes)")
    parser.add_argument("--start", type=float, default=0.0, help="window start, seconds")
    parser.add_argument("--batch-size", type=int, default=8, help="files per generation batch")
    parser.add_argument("--strict", action="store_true", help="exit 1 when any file fails")
    args = parser.parse_args(argv)
    setup_logging(logging.WARNING)
    prog = "dalipipe caption"

    from dalipipe.describe.folder import CaptionsFile, media_files

    try:
        files = media_files(args.files)
        out = CaptionsFile(args.out) if args.out else None
    except ValueError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    captioner = load(args, prog, batch_size=args.batch_size)
    if captioner is None:
        return 2
    decoding = decoding_arguments(args)
    try:
        how = captioner.decoding.but(**decoding)
    except ValueError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    origin = "asked for" if args.sample or args.greedy else "as the model records"
    if not captioner.model.metadata.get("decoding") and not (args.sample or args.greedy):
        origin = "the default; the model records none"
    print(f"{prog}: decoding: {how} ({origin})", file=sys.stderr)

    if out is not None:
        settings = {"modality": args.modality, "decoding": str(how), "model": str(args.model)}
        try:
            done = out.done(settings)
        except ValueError as err:
            print(f"{prog}: error: {err}", file=sys.stderr)
            return 2
        todo = [f for f in files if str(f) not in done]
        if len(todo) < len(files):
            print(f"{prog}: {len(files) - len(todo)} files already in {out.path}", file=sys.stderr)
        files = todo
        if not files:
            print(f"{prog}: every file is already in {out.path}: nothing to do", file=sys.stderr)
            return 0

    from tqdm import tqdm

    failures = 0
    records = captioner.captions(files, args.modality, start_s=args.start, **decoding)
    progress = tqdm(records, total=len(files), unit="file", disable=out is None)
    for record in progress:
        if not record.ok:
            failures += 1
            print(f"{prog}: error: {record.source}: {record.error}", file=sys.stderr)
        if out is not None:
            out.append(record.to_dict() | {"model": str(args.model)})
        elif record.ok and args.json:
            print(json.dumps(record.to_dict()))
        elif record.ok:
            print(f"{record.source}\t{record.caption}")
        sys.stdout.flush()
    if out is not None:
        print(
            f"{prog}: {len(files) - failures} captioned, {failures} failed -> {out.path}",
            file=sys.stderr,
        )
    if failures == len(files) or (args.strict and failures):
        return 1
    return 0
