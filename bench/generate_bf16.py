"""How often the fast generation path gives the plain path's greedy captions, per dtype, on the CPU.

    python bench/generate_bf16.py                          # miniature widths, 256 prompts
    python bench/generate_bf16.py --prompts 512 --dtypes bfloat16 float32 --out same.json

The same randomly initialised captioner (bench/generate.py's shapes) captions the same clips,
greedy, once through transformers' plain `generate` over the left-padded batch and once through
`generate_fast` (the shared prompt positions computed once at batch 1, a static KV cache), first
in each dtype asked for. Per dtype it prints the share of identical captions and, for the
captions that differ, the decode step where they first part. tests/test_generate_fast.py holds
the float32 paths to identical tokens; this measures what is left of that in bfloat16.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from generate import SHAPES, batch_inputs, cpu_name, random_captioner, time_batch


def first_difference(plain: str, fast: str) -> int:
    """The index of the first word where two captions part (the shorter length if one is a
    prefix of the other)."""
    a, b = plain.split(), fast.split()
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def compare(captioner, fbank_shape, prompts, batch, max_new_tokens) -> dict:
    image_size = captioner.llava.config.vision_config.image_size
    same, parted = 0, []
    for start in range(0, prompts, batch):
        size = min(batch, prompts - start)
        inputs = batch_inputs(captioner, size, fbank_shape, image_size, seed=start)
        _, _, plain = time_batch(captioner, inputs, max_new_tokens, seed=start, variant="plain")
        _, _, fast = time_batch(captioner, inputs, max_new_tokens, seed=start, variant="fast")
        for p, f in zip(plain, fast):
            if p == f:
                same += 1
            else:
                parted.append(first_difference(p, f))
    return {
        "prompts": prompts,
        "identical": same,
        "share_identical": same / prompts,
        "first_difference_words": sorted(parted),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=["miniature", "positions"], default="miniature")
    parser.add_argument("--prompts", type=int, default=256, help="clips captioned per dtype")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    machine = f"{cpu_name()}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} threads"
    print(
        f"cpu ({machine}), torch {torch.__version__}, shape {args.shape} "
        f"(text width {SHAPES[args.shape]['llava']['text_hidden']}), {args.prompts} prompts, "
        f"batch {args.batch}, greedy, max_new_tokens {args.max_new_tokens}"
    )
    results = {}
    for name in args.dtypes:
        dtype = getattr(torch, name)
        captioner, fbank_shape = random_captioner(args.shape, torch.device("cpu"), dtype)
        row = compare(captioner, fbank_shape, args.prompts, args.batch, args.max_new_tokens)
        results[name] = row
        parted = row["first_difference_words"]
        where = f", first differing word at {parted}" if parted else ""
        print(
            f"{name:>9}: {row['identical']}/{row['prompts']} identical "
            f"({100 * row['share_identical']:.1f}%){where}",
            flush=True,
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": machine, "shape": args.shape, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
