"""`dalipipe caption`: describe the sound of audio or video files with a trained captioner.

    dalipipe caption street.mp4 birds.flac --model results/miniature/distill/ot_att
    dalipipe caption clip.mp4 --model DIR --modality audio+image --json

Any format and sample rate ffmpeg reads. Each file is prepared like the training clips: the
fbank and frame settings come from the model directory's captioner.json (`features`), the
window (10 s in the paper) starts at --start, and the image is the window's middle frame. A file that cannot be read gets an error line naming it on stderr
and the others are still captioned; the exit code is non-zero only when every file failed.
Decoding is greedy unless --sample (the authors' temperature 0.2); the prefix is off unless
--prefix, as in the authors' inference script.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dalipipe.caption.pairs import middle
from dalipipe.common import pick_device, setup_logging
from dalipipe.training import default_dtype

log = logging.getLogger("dalipipe.caption")


class UnusableFile(Exception):
    pass


def prepare(
    path: Path, features: dict, modality: str, workdir: Path, start_s: float = 0.0
) -> tuple[Image.Image | None, np.ndarray | None]:
    """The middle frame and the fbank of one file, as the extract stage makes them."""
    from dalipipe.data.extract import extract_clip

    clip_dir = workdir / "clip"
    fbank_cfg = features.get("fbank") or {}
    # raises ExtractError, naming the file and the reason, for a file it cannot use
    extract_clip(
        path,
        clip_dir,
        start_s=start_s,
        window_s=features.get("window_seconds") or 10.0,
        short_side=features.get("frame_short_side") or 336,
        crop=bool(features.get("frame_crop")),  # directories written before it: no crop
        fbank=fbank_cfg,
    )
    frames = sorted(clip_dir.glob("frame_*.jpg"))
    frame = None
    if "image" in modality:
        if not frames:
            raise UnusableFile(f"modality {modality} needs a video stream, and the file has none")
        with Image.open(middle(frames)) as im:
            frame = im.convert("RGB")
    fbank = None
    if "audio" in modality:
        fbank_file = clip_dir / "fbank.npy"
        if not fbank_file.exists():
            raise UnusableFile(f"modality {modality} needs an audio stream, and the file has none")
        fbank = np.load(fbank_file).astype(np.float32)
    return frame, fbank


def describe(
    captioner,
    path: Path,
    *,
    modality: str,
    features: dict,
    use_prefix: bool,
    max_new_tokens: int,
    do_sample: bool,
    seed: int,
    start_s: float = 0.0,
) -> str:
    with tempfile.TemporaryDirectory(prefix="dalipipe-caption-") as tmp:
        frame, fbank = prepare(path, features, modality, Path(tmp), start_s)
    [caption] = captioner.generate(
        modality=modality,
        pixel_values=captioner.pixel_values([frame]) if frame is not None else None,
        fbank=torch.from_numpy(fbank)[None] if fbank is not None else None,
        use_prefix=use_prefix,
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=0.2,
        seed=seed,
    )
    return caption.replace("\n", " ").strip()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dalipipe caption", description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="audio or video files")
    parser.add_argument("--model", required=True, type=Path, help="a trained-captioner directory")
    parser.add_argument("--modality", default="audio", choices=["audio", "audio+image", "image"])
    parser.add_argument("--json", action="store_true", help="one JSON object per file")
    parser.add_argument("--prefix", action="store_true", help="insert the learned prefix tokens")
    parser.add_argument("--sample", action="store_true", help="sample at temperature 0.2 (authors)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start", type=float, default=0.0, help="window start, seconds")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args(argv)
    setup_logging(logging.WARNING)

    from dalipipe.models.captioner import AudioCaptioner

    device = pick_device(args.device)
    try:
        captioner = AudioCaptioner.from_dir(args.model, device=device, dtype=default_dtype(device))
    except (OSError, ValueError) as err:
        print(f"dalipipe caption: error: --model {args.model}: {err}", file=sys.stderr)
        return 2
    features = captioner.metadata.get("features") or {}
    failures = 0
    for path in args.files:
        try:
            caption = describe(
                captioner,
                path,
                modality=args.modality,
                features=features,
                use_prefix=args.prefix,
                max_new_tokens=args.max_new_tokens,
                do_sample=args.sample,
                seed=args.seed,
                start_s=args.start,
            )
        except Exception as err:  # one unreadable file never stops the others
            failures += 1
            reason = getattr(err, "reason", None) or str(err) or type(err).__name__
            reason = reason.removeprefix(f"{path}: ")  # extract errors already name the file
            print(f"dalipipe caption: error: {path}: {reason}", file=sys.stderr)
            continue
        if args.json:
            print(json.dumps({"file": str(path), "modality": args.modality, "caption": caption}))
        else:
            print(f"{path}\t{caption}")
        sys.stdout.flush()
    return 1 if failures == len(args.files) else 0
