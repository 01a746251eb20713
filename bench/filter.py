"""Frames captioned per second by the filter's captioner, per batch size; and text embeddings.

    python bench/filter.py                                  # a tiny BLIP-2 built here, CPU
    python bench/filter.py --captioner DIR --batch-sizes 16 64 256 --device cuda --size 224
    python bench/filter.py --captioner results/miniature/models/llava --text-encoder minilm

Runs the filter's own code path (``FrameCaptioner``: processor, greedy ``generate``, decoding) on
random-noise frames of ``--size`` pixels, ``--max-new-tokens`` tokens (generation stops early
only at the end token, so random weights give full-length captions), after one warm-up batch.
Compare with docs/performance-anchors.md: BLIP-2 OPT-2.7B shapes, 12 tokens from a 224 px
frame, 94 / 300 / 524 frames/s at batch 16 / 64 / 256 on one H200.

Then the whole captioning loop (``caption_clips``: JPEG files read, decoded and prepared, then
captioned and journalled) on ``--frames`` JPEGs of ``--jpeg-size`` pixels (an extracted
frame's size), for each of ``--decode-workers`` (0: decoding in threads of the captioning
process; n: n DataLoader worker processes), at the largest batch size.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dalipipe.data.filter import (
    FrameCaptioner,
    Gpt2Embedder,
    MiniLmEmbedder,
    _frame_chunks,
    caption_clips,
    prepared_batches,
)


def noise_frames(n: int, size: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)
    ]


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_captioner(captioner: FrameCaptioner, batch_sizes, size: int, min_frames: int) -> None:
    print(f"captioner {captioner.kind} on {captioner.device}, {captioner.dtype}, {size} px frames,"
          f" {captioner.max_new_tokens} new tokens")  # fmt: skip
    print(f"{'batch':>6} {'frames':>7} {'seconds':>8} {'frames/s':>9}")
    for batch in batch_sizes:
        frames = noise_frames(batch, size)
        captioner(frames)  # warm-up: kernels, allocator
        sync(captioner.device)
        n_batches = max(1, -(-min_frames // batch))
        start = time.perf_counter()
        for _ in range(n_batches):
            captioner(frames)
        sync(captioner.device)
        seconds = time.perf_counter() - start
        n = n_batches * batch
        print(f"{batch:>6} {n:>7} {seconds:>8.2f} {n / seconds:>9.1f}")


def bench_loop(captioner, batch: int, n_frames: int, jpeg_size: int, workers_list, tmp) -> None:
    """Frames/s of the whole loop from JPEG files, per number of decode workers."""
    folder = Path(tmp) / "frames"
    folder.mkdir()
    rng = np.random.default_rng(1)
    # a small random image enlarged: JPEG sizes like a real frame's, not incompressible noise
    for k in range(n_frames):
        small = rng.integers(0, 256, (jpeg_size // 16, jpeg_size * 16 // 9 // 16, 3), np.uint8)
        image = Image.fromarray(small).resize((jpeg_size * 16 // 9, jpeg_size), Image.BILINEAR)
        image.save(folder / f"frame_{k:05d}.jpg", quality=95)
    paths = sorted(folder.iterdir())
    clips = [
        {"clip_id": f"clip{i:05d}", "frames": paths[i : i + 10], "labels": ["x"]}
        for i in range(0, len(paths), 10)
    ]
    print(f"{n_frames} JPEGs of {jpeg_size} px (short side), batch {batch}: decoded and prepared"
          " alone (what can feed the captioner), and the whole caption_clips loop")  # fmt: skip
    print(f"{'decode workers':>15} {'prepare frames/s':>17} {'loop seconds':>13} {'frames/s':>9}")
    chunks = list(_frame_chunks(clips, batch))
    pin = captioner.device.type == "cuda"
    for workers in workers_list:
        start = time.perf_counter()
        for _ in prepared_batches(chunks, captioner.preparer, workers, pin):
            pass
        prepare_rate = n_frames / (time.perf_counter() - start)
        journal = Path(tmp) / f"journal-{workers}.jsonl"
        caption_clips(clips[:1], lambda: captioner, batch, journal, workers)  # warm-up
        journal.unlink()
        sync(captioner.device)
        start = time.perf_counter()
        caption_clips(clips, lambda: captioner, batch, journal, workers)
        sync(captioner.device)
        seconds = time.perf_counter() - start
        print(f"{workers:>15} {prepare_rate:>17.1f} {seconds:>13.2f} {n_frames / seconds:>9.1f}")


def bench_text(encoder, n_texts: int = 512) -> None:
    texts = [
        f"a photo of a dog number {i} playing with a red ball on the grass" for i in range(n_texts)
    ]
    encoder(texts[:8])
    start = time.perf_counter()
    encoder(texts, 64)
    seconds = time.perf_counter() - start
    print(f"text encoder {type(encoder).__name__}: {n_texts / seconds:.0f} captions/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--captioner", help="BLIP-2 or LLaVA dir/id; default: a tiny BLIP-2")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--size", type=int, default=64, help="frame side, pixels")
    parser.add_argument("--frames", type=int, default=32, help="at least this many per batch size")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--decode-workers", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--loop-frames", type=int, default=160, help="JPEGs for caption_clips")
    parser.add_argument("--jpeg-size", type=int, default=336, help="their short side, pixels")
    parser.add_argument(
        "--prompt", default="USER: <image>\nWhat can you see in this image? ASSISTANT:"
    )
    parser.add_argument("--text-encoder", choices=["gpt2", "minilm", "none"], default="none")
    parser.add_argument("--gpt2", help="GPT-2 dir for --text-encoder gpt2; default: a tiny one")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        name = args.captioner
        if name is None:
            from dalipipe.testing.checkpoints import make_tiny_blip2

            name = str(make_tiny_blip2(f"{tmp}/blip2", image_size=224, patch_size=14, hidden=64))
        captioner = FrameCaptioner(
            name, device=args.device, prompt=args.prompt, max_new_tokens=args.max_new_tokens
        )
        bench_captioner(captioner, args.batch_sizes, args.size, args.frames)
        batch = max(args.batch_sizes)
        bench_loop(captioner, batch, args.loop_frames, args.jpeg_size, args.decode_workers, tmp)
        if args.text_encoder == "minilm":
            bench_text(MiniLmEmbedder(device=args.device))
        elif args.text_encoder == "gpt2":
            gpt2 = args.gpt2
            if gpt2 is None:
                from dalipipe.testing.checkpoints import make_tiny_gpt2

                gpt2 = str(make_tiny_gpt2(f"{tmp}/gpt2"))
            bench_text(Gpt2Embedder(gpt2, device=args.device))


if __name__ == "__main__":
    main()
