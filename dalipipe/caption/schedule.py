"""AdamW with a linear warm-up then cosine decay: the optimiser of both LLaVA-side stages.

    optimizer, scheduler = adamw_cosine(params, lr=1e-3, total_steps=500, warmup_ratio=0.03)

The authors train through the Hugging Face Trainer (AdamW, betas 0.9/0.999, cosine schedule,
warm-up ratio 0.03, weight decay 0); this reproduces its schedule, including rounding the
warm-up up to a whole step.
"""

from __future__ import annotations

import math

import torch
from transformers import get_cosine_schedule_with_warmup


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


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU as the authors ran it; float32 on a CPU, where bf16 matmuls are slow."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# Settings that change memory use, not what is computed: a run killed for memory resumes its
# checkpoint after one of them changes (up to float rounding, the same training).
MEMORY_SETTINGS = ("micro_batch_size", "activation_checkpointing")


def start_training(params, settings: dict, total_steps: int, checkpoint_dir):
    """AdamW + cosine from `settings`, resumed from `checkpoint_dir` when it holds a checkpoint
    written under the same settings (`MEMORY_SETTINGS` aside): (optimizer, scheduler,
    checkpoint, first step, curve)."""
    from dalipipe.training import TrainCheckpoint

    optimizer, scheduler = adamw_cosine(
        params,
        lr=settings["lr"],
        total_steps=total_steps,
        warmup_ratio=settings["warmup_ratio"],
        weight_decay=settings["weight_decay"],
    )
    numerics = {k: v for k, v in settings.items() if k not in MEMORY_SETTINGS}
    checkpoint = TrainCheckpoint(checkpoint_dir, settings=numerics)
    start, curve = load_training_state(checkpoint, params, optimizer, scheduler)
    return optimizer, scheduler, checkpoint, start, curve


def load_training_state(checkpoint, params, optimizer, scheduler) -> tuple[int, list[dict]]:
    """Restore trainable tensors, optimiser and schedule from `checkpoint` (a TrainCheckpoint).

    Returns (first step to run, loss curve so far): (0, []) when there is nothing to resume.
    """
    state = checkpoint.load()
    if state is None:
        return 0, []
    with torch.no_grad():
        for param, saved in zip(params, state["params"]):
            param.copy_(saved)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state["step"], state["curve"]


def save_training_state(checkpoint, params, optimizer, scheduler, curve, step: int) -> None:
    """The counterpart of :func:`load_training_state`."""
    states = {
        "curve": curve,
        "params": [p.detach() for p in params],
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
    }
    checkpoint.save(states, step=step)
