"""Clips per second of pseudo-label generation (image + audio + prefix tokens): plain vs fast.

    python bench/generate.py                                   # miniature shapes, CPU
    python bench/generate.py --shape positions                 # the paper's positions, small widths
    python bench/generate.py --shape paper --device cuda --batch-sizes 1 16 64
    python bench/generate.py --captioner results/miniature/models/llava \
        --encoder results/miniature/align/ot_att --prefix results/miniature/prefix

It times `AudioCaptioner.generate` exactly as stage pseudolabel calls it, once per variant on the
same inputs: `plain` (transformers' generate over the whole left-padded batch), `fast` (the shared
prompt positions computed once, static KV cache: the stage's default), `fast_dynamic` (the same
with the growing cache), `static_only` (the static cache, no shared positions) and
`fast_compiled` (a compiled decode step; GPU only, and its first batch of each shape compiles, so
give it --repeats 3 or more). Each row says whether every variant's
greedy captions were the plain path's. Without --captioner, a randomly initialised LLaVA of the
chosen shape is built in memory (miniature: the bootstrap's 64 px / 64 image tokens, Llama width
128; positions: 576 image + 512 audio + 16 prefix tokens like the paper, Llama width 256 and 4
layers, so a CPU can run it; paper: CLIP-L/336 + a 7B Llama, bf16). A random model seldom emits
the end token, so each caption runs to about --max-new-tokens; the table reports the decode steps
per batch so runs with trained models (which stop early) stay comparable.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np
import torch
from common import PAPER_LLAVA  # bench/, on the path when a script here runs

from dalipipe.config import llava_sizes, section_defaults

SHAPES = {
    "miniature": {
        "llava": llava_sizes(section_defaults("bootstrap")),  # what the workflow trains
        "encoder": dict(num_mel_bins=64, target_length=256, embed_dim=64, depth=2, num_heads=4),
        "intermediate": None,
        "vocab": None,
    },
    "positions": {  # the paper's sequence (~1,150 positions) at widths a CPU can run
        "llava": dict(
            image_size=336,
            patch_size=14,
            vision_hidden=64,
            vision_layers=1,
            vision_heads=2,
            text_hidden=256,
            text_layers=4,
            text_heads=4,
            max_positions=2048,
        ),
        "encoder": dict(embed_dim=64, depth=1, num_heads=4),  # 1024 x 128 fbank -> 512 tokens
        "intermediate": None,
        "vocab": 32000,
    },
    "paper": {
        "llava": PAPER_LLAVA,  # LLaVA-1.5-7B's widths (bench/common.py)
        "encoder": dict(),  # AudioEncoderConfig defaults: 1024 x 128 fbank -> 512 tokens
        "intermediate": None,
        "vocab": None,
    },
}


def random_captioner(shape: str, device, dtype):
    from transformers import LlavaForConditionalGeneration

    from dalipipe.models.captioner import AudioCaptioner
    from dalipipe.models.cavmae import AudioEncoderConfig, CavMaeAudioEncoder
    from dalipipe.models.llava_config import llava_config, llava_processor
    from dalipipe.models.tokenizer import build_tokenizer

    spec = SHAPES[shape]
    tokenizer = build_tokenizer([], vocab_size=1000)
    config = llava_config(tokenizer, **spec["llava"])
    if spec["intermediate"]:
        config.text_config.intermediate_size = spec["intermediate"]
    if spec["vocab"]:
        config.text_config.vocab_size = spec["vocab"]
    torch.manual_seed(0)
    with torch.device(device):
        llava = LlavaForConditionalGeneration(config).to(dtype)
        encoder_config = AudioEncoderConfig(
            out_dim=config.vision_config.hidden_size, **spec["encoder"]
        )
        encoder = CavMaeAudioEncoder(encoder_config).to(dtype)
    processor = llava_processor(
        tokenizer, config.vision_config.image_size, config.vision_config.patch_size
    )
    captioner = AudioCaptioner(llava, processor, audio_encoder=encoder).to(
        device=device, dtype=dtype
    )
    captioner.init_prefix(n_tokens=16, std=1e-4, seed=0)
    return captioner, (encoder_config.target_length, encoder_config.num_mel_bins)


def trained_captioner(args, device, dtype):
    from dalipipe.models.assemble import load_captioner

    captioner = load_captioner(
        args.captioner,
        None,
        device=device,
        dtype=dtype,
        encoder_dir=args.encoder,
        prefix_dir=args.prefix,
    )
    if captioner.prefix is None:
        captioner.init_prefix(n_tokens=16, std=1e-4, seed=0)
    config = captioner.audio_encoder.config
    return captioner, (config.target_length, config.num_mel_bins)


VARIANTS = {
    "plain": dict(fast=False),
    "fast": dict(fast=True, static_cache=True),
    "fast_dynamic": dict(fast=True, static_cache=False),
    "static_only": dict(fast=True, share_prefix=False, static_cache=True),
    "fast_compiled": dict(fast=True, static_cache=True, compile=True),
}


def batch_inputs(captioner, batch_size, fbank_shape, image_size, seed):
    rng = np.random.default_rng(seed)
    frames = [
        rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8) for _ in range(batch_size)
    ]
    fbank = torch.from_numpy(rng.normal(size=(batch_size, *fbank_shape)).astype(np.float32))
    return captioner.pixel_values(frames), fbank


def time_batch(captioner, inputs, max_new_tokens, seed, variant="plain"):
    """Seconds for one batch, the decode steps it ran (the longest caption in the batch), and
    its captions."""
    pixel_values, fbank = inputs
    steps = []
    generate = captioner.llava.generate

    def counting_generate(*args, **kwargs):
        out = generate(*args, **kwargs)  # with inputs_embeds: only the new tokens
        steps.append(out.shape[1])
        return out

    captioner.llava.generate = counting_generate
    if captioner.device.type == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    try:
        captions = captioner.generate(
            modality="audio+image",
            pixel_values=pixel_values,
            fbank=fbank,
            use_prefix=True,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            seed=seed,
            **VARIANTS[variant],
        )
        if captioner.device.type == "cuda":
            torch.cuda.synchronize()
    finally:
        captioner.llava.generate = generate
    return time.perf_counter() - began, steps[0], captions


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="miniature")
    parser.add_argument("--captioner", help="a save_pretrained LLaVA (instead of a random one)")
    parser.add_argument("--encoder", help="aligned encoder directory (with --captioner)")
    parser.add_argument("--prefix", help="prefix stage directory (with --captioner)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per batch size")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        default=["plain", "fast"],
        help="generation paths to time side by side (the first is the reference for captions)",
    )
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args(argv)

    from dalipipe.common import pick_device
    from dalipipe.training import default_dtype

    torch.set_grad_enabled(False)
    device = pick_device(args.device)
    dtype = default_dtype(device)
    if args.captioner:
        captioner, fbank_shape = trained_captioner(args, device, dtype)
    else:
        captioner, fbank_shape = random_captioner(args.shape, device, dtype)
    image_size = captioner.llava.config.vision_config.image_size
    if device.type == "cuda":
        machine = torch.cuda.get_device_name()
    else:
        machine = f"{cpu_name()}, {os.cpu_count()} CPU cores"
    print(
        f"device {device} ({machine}), "
        f"threads {torch.get_num_threads()}, dtype {dtype}, shape {args.captioner or args.shape}, "
        f"fbank {fbank_shape}, max_new_tokens {args.max_new_tokens}"
    )
    variants = args.variants
    warm = batch_inputs(captioner, 1, fbank_shape, image_size, seed=0)
    for variant in variants:
        time_batch(captioner, warm, 2, seed=0, variant=variant)  # warm-up
    results = []
    header = "".join(f" {v + ' clips/s':>20}" for v in variants)
    print(f"{'batch':>6}{header} {'steps':>6} {'same captions':>14}")
    for batch_size in args.batch_sizes:
        runs = {v: [] for v in variants}
        same = True
        for r in range(args.repeats):
            inputs = batch_inputs(captioner, batch_size, fbank_shape, image_size, seed=r)
            captions = {}
            for variant in variants:  # interleaved, so drift on a shared machine hits all alike
                seconds, steps, captions[variant] = time_batch(
                    captioner, inputs, args.max_new_tokens, seed=r, variant=variant
                )
                runs[variant].append((seconds, steps))
            same &= all(c == captions[variants[0]] for c in captions.values())
        row = {"batch_size": batch_size, "same_captions": same, "variants": {}}
        for variant, timings in runs.items():
            seconds = statistics.median(s for s, _ in timings)
            row["variants"][variant] = {
                "clips_per_s": batch_size / seconds,
                "seconds_per_batch": seconds,
                "mean_new_tokens": statistics.mean(t for _, t in timings),
            }
        results.append(row)
        cells = "".join(f" {row['variants'][v]['clips_per_s']:>20.2f}" for v in variants)
        steps = row["variants"][variants[0]]["mean_new_tokens"]
        print(f"{batch_size:>6}{cells} {steps:>6.1f} {'yes' if same else 'NO':>14}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "device": str(device),
                    "shape": args.captioner or args.shape,
                    "max_new_tokens": args.max_new_tokens,
                    "machine": machine,
                    "results": results,
                },
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
