"""Stage prefix: learn the soft prompt that re-tasks the frozen captioner to describe sounds.

    dalipipe prefix --params '{"seed": 0, "device": "auto", "prefix": {"epochs": 100}}' \
        --pairs results/miniature/shards/prefix --captioner results/miniature/models/llava \
        --out results/miniature/prefix

Only the prefix embeddings train (paper §3.1). The captioner is frozen and sees the image only,
so a few (frame, audio caption) pairs suffice; the authors place the prefix right after the image
tokens (docs/authors-implementation.md §5), which is the captioner's default. Writes
prefix.safetensors, prefix.json and curve.csv; a killed run resumes from <out>.ckpt/.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path

import torch

from dalipipe.caption.pairs import first_pairs, load_pairs
from dalipipe.caption.schedule import fit_captioner
from dalipipe.common import (
    CAPTIONER_HELP,
    atomic_path,
    pick_device,
    seed_everything,
    stage_args,
    stage_settings,
    write_json,
)
from dalipipe.config import section_defaults
from dalipipe.models.assemble import load_captioner
from dalipipe.training import accumulate, default_dtype, epoch_order, micro_batch_size, write_curve

log = logging.getLogger("dalipipe.prefix")


def fit_prefix(
    captioner, pairs: list, checkpoint_dir, *, settings: dict, seed: int = 0
) -> list[dict]:
    """Train `captioner.prefix` on the pairs (image modality); returns the loss curve.

    A step's pairs go through the model `micro_batch_size` at a time, each micro-batch's summed
    loss divided by the step's caption-token count, so the accumulated gradient is the
    full-batch one. Resumes from `checkpoint_dir` when it holds a checkpoint; on SIGTERM,
    checkpoints and exits.
    """
    micro = micro_batch_size(settings, "prefix")
    pixel_values = captioner.pixel_values([p.image for p in pairs])
    captions = [p.caption for p in pairs]
    batch_size = min(settings["batch_size"], len(pairs))
    steps_per_epoch = math.ceil(len(pairs) / batch_size)
    total_steps = settings["epochs"] * steps_per_epoch

    def summed_loss(part: list[int]) -> torch.Tensor:
        return captioner.caption_loss(
            captions=[captions[i] for i in part],
            modality="image",
            pixel_values=pixel_values[part],
            use_prefix=True,
            reduction="sum",
        )

    def step(index: int) -> dict:
        epoch, k = divmod(index, steps_per_epoch)
        batch = epoch_order(len(pairs), epoch, seed)[k * batch_size : (k + 1) * batch_size]
        n_tokens = captioner.caption_token_count([captions[i] for i in batch])
        return {"epoch": epoch + 1, "loss": accumulate(batch, micro, summed_loss, n_tokens)}

    log.info(
        "prefix tuning: %d pairs, %d steps, batch %d in micro-batches of %d, lr %g",
        len(pairs),
        total_steps,
        batch_size,
        min(micro, batch_size),
        settings["lr"],
    )
    return fit_captioner(captioner, "prefix", step, total_steps, settings, checkpoint_dir)


def write_prefix(out_dir: Path, captioner, summary: dict, curve: list[dict]) -> None:
    with atomic_path(out_dir, directory=True) as tmp:
        captioner.save_prefix(tmp / "prefix.safetensors")
        write_json(tmp / "prefix.json", summary)
        write_curve(tmp / "curve.csv", curve)


def train_prefix(
    pairs_src,
    captioner_path,
    out_dir,
    *,
    settings=None,
    seed=0,
    device="auto",
    models=None,
    n_pairs=None,
) -> dict:
    """The stage: `models` is config section `models` (the captioner's revision and options);
    `n_pairs` (the prefix-pairs sweep) trains on the first n of a seeded shuffle of the pairs."""

    settings = {**section_defaults("prefix"), **(settings or {})}
    out_dir = Path(out_dir)
    checkpoint_dir = out_dir.with_name(out_dir.name + ".ckpt")
    seed_everything(seed)
    device = pick_device(device)
    pairs = load_pairs(pairs_src)
    if n_pairs is not None:
        pairs = first_pairs(pairs, int(n_pairs), seed)
    captioner = load_captioner(captioner_path, models, device=device, dtype=default_dtype(device))
    captioner.init_prefix(n_tokens=settings["n_tokens"], std=settings["init_std"], seed=seed)
    began = time.time()
    curve = fit_prefix(captioner, pairs, checkpoint_dir, settings=settings, seed=seed)
    summary = {
        "n_tokens": settings["n_tokens"],
        "hidden_size": captioner.hidden_size,
        "captioner": str(captioner_path),
        "pairs": [p.clip_id for p in pairs],
        "settings": settings,
        "seed": seed,
        "steps": len(curve),
        "first_loss": curve[0]["loss"],
        "final_loss": curve[-1]["loss"],
        "seconds": round(time.time() - began, 2),
    }
    write_prefix(out_dir, captioner, summary, curve)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    log.info(
        "prefix: loss %.4f -> %.4f, wrote %s", summary["first_loss"], summary["final_loss"], out_dir
    )
    return summary


def main(argv: list[str]) -> int:
    args, params = stage_args(
        argv,
        "prefix",
        __doc__,
        "seed, device, prefix, models, n_pairs (the sweep: first n of a seeded shuffle)",
        pairs="prefix split shard directory or a pairs file",
        captioner=CAPTIONER_HELP,
        out="output directory",
    )
    settings = stage_settings(params, "prefix")
    train_prefix(args.pairs, args.captioner, args.out, **settings, n_pairs=params.get("n_pairs"))
    return 0
