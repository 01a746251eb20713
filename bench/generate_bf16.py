"""How often the fast generation path gives the plain path's greedy captions, per dtype, on the CPU.

    python bench/generate_bf16.py                          # miniature widths, 256 prompts
    python bench/generate_bf16.py --prompts 512 --dtypes bfloat16 float32 --out same.json

The same randomly initialised captioner (bench/generate.py's shapes) captions the same clips,
greedy, once through transformers' plain `generate` over the left-padded batch and once through
`generate_fast` (the shared prompt positions computed once at batch 1, a static KV cache), first
in each dtype asked for. Per dtype it prints the share of identical captions, for the captions
that differ the word where they first part, and how far apart the two paths' logits of the first
new token are (the largest absolute difference over the vocabulary, the median and the largest
over the prompts) beside the plain path's margin between its top two logits there. tests/test_generate_fast.py holds
the float32 paths to identical tokens; this measures what is left of that in bfloat16.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
from generate import SHAPES, batch_inputs, cpu_name, random_captioner


def first_difference(plain: str, fast: str) -> int:
    """The index of the first word where two captions part (the shorter length if one is a
    prefix of the other)."""
    a, b = plain.split(), fast.split()
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def captions_and_first_logits(captioner, inputs, max_new_tokens, fast: bool):
    """Greedy captions, and the logits of each row's first new token (both paths end in
    transformers' generate, which is asked for its scores here)."""
    generate = captioner.llava.generate
    first = []

    def scoring_generate(*args, **kwargs):
        out = generate(*args, **kwargs, output_scores=True, return_dict_in_generate=True)
        first.append(out.scores[0].float())
        return out.sequences

    captioner.llava.generate = scoring_generate
    try:
        captions = captioner.generate(
            modality="audio+image",
            pixel_values=inputs[0],
            fbank=inputs[1],
            use_prefix=True,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            fast=fast,
        )
    finally:
        captioner.llava.generate = generate
    return captions, first[0]


def compare(captioner, fbank_shape, prompts, batch, max_new_tokens) -> dict:
    image_size = captioner.llava.config.vision_config.image_size
    same, parted, logit_diffs, margins = 0, [], [], []
    for start in range(0, prompts, batch):
        size = min(batch, prompts - start)
        inputs = batch_inputs(captioner, size, fbank_shape, image_size, seed=start)
        plain, plain_logits = captions_and_first_logits(captioner, inputs, max_new_tokens, False)
        fast, fast_logits = captions_and_first_logits(captioner, inputs, max_new_tokens, True)
        logit_diffs += (plain_logits - fast_logits).abs().amax(-1).tolist()
        top2 = plain_logits.topk(2, -1).values
        margins += (top2[:, 0] - top2[:, 1]).tolist()
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
        "first_logit_difference": {
            "median": statistics.median(logit_diffs),
            "max": max(logit_diffs),
        },
        "first_top2_margin": {"median": statistics.median(margins), "min": min(margins)},
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
        diff, margin = row["first_logit_difference"], row["first_top2_margin"]
        print(
            f"{'':>11}first new token: |plain - fast| logits median {diff['median']:.2e}, "
            f"max {diff['max']:.2e}; plain top-2 margin median {margin['median']:.2e}, "
            f"min {margin['min']:.2e}",
            flush=True,
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": machine, "shape": args.shape, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
