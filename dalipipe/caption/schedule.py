"""AdamW with a linear warm-up then cosine decay: the optimiser of both LLaVA-side stages.

    optimizer, scheduler = adamw_cosine(params, lr=1e-3, total_steps=500, warmup_ratio=0.03)
    curve = fit_captioner(captioner, "prefix", step, total_steps, settings, checkpoint_dir)

The authors train through the Hugging Face Trainer (AdamW, betas 0.9/0.999, cosine schedule,
warm-up ratio 0.03, weight decay 0); this reproduces its schedule, including rounding the
warm-up up to a whole step.
"""

from __future__ import annotations

import math

import torch
from transformers import get_cosine_schedule_with_warmup

from dalipipe.training import TrainLoop


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    return math.ceil(total_steps * warmup_ratio)


def adamw_cosine(
    params, *, lr: float, total_steps: int, warmup_ratio: float = 0.03, weight_decay: float = 0.0
):
    params = list(params)
    if not params:
        raise ValueError("adamw_cosine: no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, warmup_steps(total_steps, warmup_ratio), total_steps
    )
    return optimizer, scheduler


# Settings that change memory use, not what is computed: a run killed for memory resumes its
# checkpoint after one of them changes (up to float rounding, the same training).
MEMORY_SETTINGS = ("micro_batch_size", "activation_checkpointing")


def fit_captioner(
    captioner, part: str, step, total_steps: int, settings: dict, checkpoint_dir, accelerator=None
) -> list[dict]:
    """Train the captioner's `part` ("prefix", "audio_projector") with AdamW + cosine from
    `settings`, `TrainLoop.fit(step, total_steps)`; returns the curve. Resumes from
    `checkpoint_dir` when it holds a checkpoint written under the same settings
    (`MEMORY_SETTINGS` aside); `settings["activation_checkpointing"]`: the language model
    recomputes its activations in the backward pass."""
    params = captioner.trainable_parameters(part)
    optimizer, scheduler = adamw_cosine(
        params,
        lr=settings["lr"],
        total_steps=total_steps,
        warmup_ratio=settings["warmup_ratio"],
        weight_decay=settings["weight_decay"],
    )
    numerics = {k: v for k, v in settings.items() if k not in MEMORY_SETTINGS}
    state = {"params": params, "optimizer": optimizer, "scheduler": scheduler}
    every = settings["checkpoint_every"]
    loop = TrainLoop(
        checkpoint_dir, state, settings=numerics, checkpoint_every=every, accelerator=accelerator
    )
    loop.resume()
    return loop.fit(
        step,
        total_steps,
        optimizer=optimizer,
        scheduler=scheduler,
        average=params,
        desc=part,
        recompute=captioner.language_model if settings["activation_checkpointing"] else None,
    )
