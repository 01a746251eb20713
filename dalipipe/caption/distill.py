"""Stage distill: fine-tune the audio projector on the pseudo-labels (audiovisual distillation).

    dalipipe distill --params '{"seed": 0, "device": "auto", "distill": {...}, "extract": {...}}' \
        --pseudolabels results/miniature/pseudolabel/ot_att.jsonl \
        --pool results/miniature/shards/pseudolabel --encoder results/miniature/align/ot_att \
        --prefix results/miniature/prefix --captioner results/miniature/models/llava \
        --out results/miniature/distill/ot_att

Only the audio projector trains, starting from the image projector; the input is audio alone
without the prefix, as in the authors' code (docs/authors-implementation.md §8; both
configurable). Under `accelerate launch` each process takes its share of every step's clips
(batch_size per process) and the projector's gradients are averaged across processes. A killed
job resumes from <out>.ckpt/. The output is a trained-captioner directory (DEVELOPING.md) that
`AudioCaptioner.from_dir` loads; captioner.json's metadata records the fbank and frame settings
(`features`) so `dalipipe caption` prepares new files the way the model was trained.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from dalipipe.caption.pairs import as_pil, middle
from dalipipe.caption.schedule import fit_captioner
from dalipipe.common import (
    CAPTIONER_HELP,
    atomic_path,
    read_jsonl,
    seed_everything,
    stage_args,
    stage_settings,
    write_json,
)
from dalipipe.config import section_defaults
from dalipipe.models.assemble import load_captioner
from dalipipe.training import accumulate, default_dtype, epoch_order, micro_batch_size, write_curve

log = logging.getLogger("dalipipe.distill")


def training_set(pseudolabels, pool, modality: str) -> list[dict]:
    """Pool clips joined with their pseudo-captions; clips without a caption are left out."""
    from dalipipe.data.shard_reader import ShardReader

    captions = {}
    for row in read_jsonl(pseudolabels):
        if row.get("caption") and row["caption"].strip():
            captions[row["clip_id"]] = row["caption"].strip()
    examples = []
    # every process reads the whole pool; the training loop splits each step's clips
    wanted_frames = None if "image" in modality else []
    for sample in ShardReader(pool, rank=0, world_size=1, frame_indices=wanted_frames):
        caption = captions.get(sample["clip_id"])
        if caption is None:
            continue
        # the fbank stays float16 as stored: the whole pool is held in memory
        example = {
            "clip_id": sample["clip_id"],
            "caption": caption,
            "fbank": np.asarray(sample["fbank"], dtype=np.float16),
        }
        if "image" in modality:
            if not sample["frames"]:
                log.warning(
                    "clip %s skipped: no frames for modality %s", sample["clip_id"], modality
                )
                continue
            example["frame"] = as_pil(middle(sample["frames"]))
        examples.append(example)
    if not examples:
        raise ValueError(f"distill: no clip of {pool} has a caption in {pseudolabels}")
    log.info(
        "distill: %d of %d pseudo-labelled clips found in the pool", len(examples), len(captions)
    )
    return examples


def feature_settings(params: dict) -> dict:
    """What `dalipipe caption` needs to prepare a new file like the training clips."""
    extract = params.get("extract") or {}
    return {
        "fbank": extract.get("fbank") or {},
        "frame_short_side": extract.get("frame_short_side"),
        "frame_crop": extract.get("frame_crop"),
        "window_seconds": extract.get("window_seconds"),
    }


def summed_loss(captioner, examples: list[dict], settings: dict) -> torch.Tensor:
    """The caption loss of `examples` summed over their caption tokens (one forward)."""
    modality = settings["modality"]
    fbank = torch.from_numpy(np.stack([e["fbank"] for e in examples]).astype(np.float32))
    pixel_values = (
        captioner.pixel_values([e["frame"] for e in examples]) if "image" in modality else None
    )
    # a bf16 model: the float32 projector runs under autocast (fit_projector)
    low_precision = captioner.dtype != torch.float32
    with torch.autocast(captioner.device.type, captioner.dtype, enabled=low_precision):
        return captioner.caption_loss(
            captions=[e["caption"] for e in examples],
            modality=modality,
            pixel_values=pixel_values,
            fbank=fbank,
            use_prefix=settings["use_prefix"],
            reduction="sum",
        )


def fit_projector(
    captioner,
    examples: list[dict],
    checkpoint_dir,
    *,
    settings: dict,
    seed: int = 0,
    accelerator=None,
) -> list[dict]:
    """Train `captioner.audio_projector` on (clip, pseudo-caption) examples; returns the curve.

    Every process walks the same seeded order and takes every world-th clip of a step, then the
    projector's gradients are averaged, so N processes at batch b train like one at N*b.
    A process's clips go through the model `micro_batch_size` at a time, each micro-batch's
    summed loss divided by the caption-token count of the process's share of the step: its
    accumulated gradient is exactly that of its share's mean loss, as without accumulation.
    Processes are then weighted equally (a mean of per-process means, as DDP and the authors'
    Trainer do), not by their token counts. Resumes from `checkpoint_dir`; on SIGTERM,
    checkpoints and exits.
    """
    from accelerate import Accelerator

    micro = micro_batch_size(settings, "distill")
    accelerator = accelerator or Accelerator(cpu=captioner.device.type == "cpu")
    # a bf16 model (GPU) trains float32 master weights of the projector under autocast, as the
    # authors' DeepSpeed bf16 run did; AdamW steps of 2e-4 vanish in bf16 weights
    if captioner.dtype != torch.float32:
        captioner.audio_projector.float()
    world, rank = accelerator.num_processes, accelerator.process_index
    global_batch = settings["batch_size"] * world
    steps_per_epoch = math.ceil(len(examples) / global_batch)
    total_steps = settings["epochs"] * steps_per_epoch

    def step(index: int) -> dict:
        epoch, k = divmod(index, steps_per_epoch)
        chunk = epoch_order(len(examples), epoch, seed)[k * global_batch : (k + 1) * global_batch]
        mine = [examples[i] for i in chunk[rank::world]] or [examples[chunk[0]]]
        n_tokens = captioner.caption_token_count([e["caption"] for e in mine])
        loss = accumulate(
            mine, micro, lambda part: summed_loss(captioner, part, settings), n_tokens
        )
        return {"epoch": epoch + 1, "loss": loss}  # this process's mean over its caption tokens

    log.info(
        "distill: %d clips, %d steps, %d per process (micro-batches of %d) x %d, lr %g, "
        "modality %s, prefix %s",
        len(examples),
        total_steps,
        settings["batch_size"],
        micro,
        world,
        settings["lr"],
        settings["modality"],
        settings["use_prefix"],
    )
    return fit_captioner(
        captioner, "audio_projector", step, total_steps, settings, checkpoint_dir, accelerator
    )


def distill(
    pseudolabels,
    pool,
    encoder_dir,
    prefix_dir,
    captioner_path,
    out_dir,
    *,
    settings=None,
    seed=0,
    device="auto",
    models=None,
    features=None,
) -> dict:
    from accelerate import Accelerator

    settings = {**section_defaults("distill"), **(settings or {})}
    out_dir = Path(out_dir)
    checkpoint_dir = out_dir.with_name(out_dir.name + ".ckpt")
    accelerator = Accelerator(cpu=device == "cpu")
    seed_everything(seed)
    captioner = load_captioner(
        captioner_path,
        models,
        device=accelerator.device,
        dtype=default_dtype(accelerator.device),
        encoder_dir=encoder_dir,
        prefix_dir=prefix_dir,
    )
    examples = training_set(pseudolabels, pool, settings["modality"])
    began = time.time()
    curve = fit_projector(
        captioner, examples, checkpoint_dir, settings=settings, seed=seed, accelerator=accelerator
    )
    summary = {
        "pseudolabels": str(pseudolabels),
        "encoder": str(encoder_dir),
        "prefix": str(prefix_dir),
        "captioner": str(captioner_path),
        "clips": len(examples),
        "steps": len(curve),
        "processes": accelerator.num_processes,
        "settings": settings,
        "seed": seed,
        "first_loss": curve[0]["loss"],
        "final_loss": curve[-1]["loss"],
        "seconds": round(time.time() - began, 2),
    }
    if accelerator.is_main_process:
        write_captioner_dir(captioner, out_dir, summary, curve, features or {})
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    log.info(
        "distill: loss %.4f -> %.4f, wrote %s",
        summary["first_loss"],
        summary["final_loss"],
        out_dir,
    )
    return summary


def write_captioner_dir(captioner, out_dir: Path, summary: dict, curve: list[dict], features: dict):
    base = Path(captioner.base)
    if base.is_dir():  # a local model: recorded relative to the output, so both can move together
        captioner.base = os.path.relpath(base.resolve(), out_dir.resolve())
    with atomic_path(out_dir, directory=True) as tmp:
        captioner.save_dir(tmp, metadata={"features": features, "distill": summary["settings"]})
        write_json(tmp / "distill.json", summary)
        write_curve(tmp / "curve.csv", curve)


def main(argv: list[str]) -> int:
    args, params = stage_args(
        argv,
        "distill",
        __doc__,
        "seed, device, distill, extract, models",
        pseudolabels="pseudolabel stage JSON lines",
        pool="shard directory of the pseudo-labelled clips",
        encoder="aligned audio encoder directory",
        prefix="prefix stage output directory",
        captioner=CAPTIONER_HELP,
        out="output trained-captioner directory",
    )
    inputs = (args.pseudolabels, args.pool, args.encoder, args.prefix, args.captioner, args.out)
    distill(*inputs, features=feature_settings(params), **stage_settings(params, "distill"))
    return 0
