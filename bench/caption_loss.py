"""CPU time of one training micro-batch of the frozen LLaMA: the LM head over every position
against the scored tail alone (`dalipipe.models.captioner.scored_tail`, what `caption_loss` does).

    python bench/caption_loss.py                      # LLaMA-7B widths, 1 layer, as the rehearsal
    python bench/caption_loss.py --layers 2 --context 1100 --caption 32

A randomly initialised LLaMA of LLaVA-1.5-7B's language widths (4096 wide, 32 heads, MLP 11008,
32,064 vocabulary rows) with `--layers` decoder layers takes `--batch` sequences of `--context`
positions (prompt, image or audio tokens) followed by `--caption` scored tokens, right-padded as
`caption_loss` builds them, and back-propagates the cross-entropy to its input embeddings (what a
trained prefix or projector receives). Both variants see the same inputs; the table gives the
CPU seconds of forward and backward (median of `--repeats`), the bytes of the logits and the
largest difference between the two input gradients.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from common import PAPER_LLAVA, cpu_name  # bench/, on the path when a script here runs
from transformers import LlamaConfig, LlamaForCausalLM

from dalipipe.models.captioner import next_token_loss, scored_tail


def model(layers: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=PAPER_LLAVA["text_hidden"],
        intermediate_size=PAPER_LLAVA["text_intermediate"],
        num_hidden_layers=layers,
        num_attention_heads=PAPER_LLAVA["text_heads"],
        num_key_value_heads=PAPER_LLAVA["text_heads"],
        vocab_size=PAPER_LLAVA["vocab_size"],
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval().requires_grad_(False)


def inputs(batch: int, context: int, caption: int, vocab: int):
    """Embeddings and labels: every row `context` unscored positions, then a caption of
    `caption` tokens less its row index (unequal lengths, right padding)."""
    generator = torch.Generator().manual_seed(0)
    width = PAPER_LLAVA["text_hidden"]
    embeds = torch.randn(batch, context + caption, width, generator=generator) * 0.02
    labels = torch.full((batch, context + caption), -100)
    for row in range(batch):
        n = caption - row
        labels[row, context : context + n] = torch.randint(vocab, (n,), generator=generator)
    return embeds, labels


def loss_and_gradient(llama, embeds, labels, keep: int):
    """Cross-entropy of the scored labels from the last `keep` positions' logits (0: all)."""
    embeds = embeds.clone().requires_grad_(True)
    logits = llama(inputs_embeds=embeds, use_cache=False, logits_to_keep=keep).logits
    loss = next_token_loss(logits, labels)
    loss.backward()
    return loss.detach(), embeds.grad, logits.numel() * logits.element_size()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--context", type=int, default=580, help="unscored positions per row")
    parser.add_argument("--caption", type=int, default=20, help="scored tokens of the first row")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    llama = model(args.layers)
    embeds, labels = inputs(args.batch, args.context, args.caption, llama.config.vocab_size)
    tail = scored_tail(labels)
    results = {}
    for name, keep in (("every position", 0), ("scored tail", tail)):
        seconds = []
        for _ in range(args.repeats):
            start = time.process_time()
            loss, grad, logit_bytes = loss_and_gradient(llama, embeds, labels, keep)
            seconds.append(time.process_time() - start)
        results[name] = (statistics.median(seconds), logit_bytes, loss, grad)
    print(
        f"LLaMA-7B widths, {args.layers} layer(s), batch {args.batch}, {args.context} + "
        f"{args.caption} positions, {args.threads} thread(s), {os.cpu_count()} CPUs ({cpu_name()}); "
        f"the tail is {tail} positions"
    )
    print(f"{'head over':16s} {'CPU s':>7s} {'logits MB':>10s} {'loss':>10s}")
    for name, (seconds, logit_bytes, loss, _) in results.items():
        print(f"{name:16s} {seconds:7.2f} {logit_bytes / 1e6:10.1f} {loss.item():10.6f}")
    full, cut = results["every position"][3], results["scored tail"][3]
    print(f"input gradients: largest difference {float((full - cut).abs().max()):.3g}")


if __name__ == "__main__":
    main()
