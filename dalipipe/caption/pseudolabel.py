"""Stage pseudolabel: caption the pool from image + audio (+ prefix) tokens, for distillation.

    dalipipe pseudolabel --params '{"seed": 0, "device": "auto", "pseudolabel": {...}}' \
        --pool results/miniature/shards/pseudolabel --encoder results/miniature/align/ot_att \
        --prefix results/miniature/prefix --captioner results/miniature/models/llava \
        --out results/miniature/pseudolabel/ot_att.jsonl

One JSON row per clip: {clip_id, caption, settings}; a clip that cannot be read gets
caption null and a `reason`. Rows are appended to <out>.partial after every batch, so a killed
job resumes where it stopped; the partial file is renamed to <out> once every clip is done.
Batches follow the pool order on a fixed grid and batch k decodes with seed + k, so a resumed run
writes the same rows as an uninterrupted one, sampled decoding included.
"""

from __future__ import annotations

import json
import logging
import os
import time
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dalipipe.caption.pairs import as_pil, middle
from dalipipe.common import (
    CAPTIONER_HELP,
    pick_device,
    seed_everything,
    stage_args,
    stage_settings,
)
from dalipipe.config import section_defaults
from dalipipe.models.assemble import load_captioner
from dalipipe.training import default_dtype

log = logging.getLogger("dalipipe.pseudolabel")


def read_partial(path: Path) -> list[dict]:
    """Rows of an interrupted run; a half-written last line (killed mid-write) is dropped."""
    if not path.exists():
        return []
    rows, good_bytes = [], 0
    with open(path, "rb") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
            good_bytes += len(line)
    if good_bytes < path.stat().st_size:
        log.warning("%s: dropping a truncated last row", path)
        with open(path, "r+b") as f:
            f.truncate(good_bytes)
    return rows


def batched(iterable, size):
    iterator = iter(iterable)
    while batch := list(islice(iterator, size)):
        yield batch


def model_inputs(samples: list[dict], modality: str):
    """Stack what the modality needs; a clip missing its frames or fbank is returned as failed."""
    good, failed, frames, fbanks = [], [], [], []
    for sample in samples:
        try:
            if "image" in modality:
                frame = as_pil(middle(sample["frames"]))
            if "audio" in modality:
                fbank = np.asarray(sample["fbank"], dtype=np.float32)
                if fbank.ndim != 2:
                    raise ValueError(f"fbank has shape {fbank.shape}, expected (frames, mel bins)")
        except Exception as err:  # one broken clip is recorded and skipped
            failed.append((sample.get("clip_id", "?"), f"{type(err).__name__}: {err}"))
            continue
        good.append(sample["clip_id"])
        if "image" in modality:
            frames.append(frame)
        if "audio" in modality:
            fbanks.append(fbank)
    return good, failed, frames, (torch.from_numpy(np.stack(fbanks)) if fbanks else None)


def pseudolabel(
    pool,
    encoder_dir,
    prefix_dir,
    captioner_path,
    out,
    *,
    settings=None,
    seed=0,
    device="auto",
    models=None,
) -> dict:
    from dalipipe.data.shard_reader import ShardReader

    settings = {**section_defaults("pseudolabel"), **(settings or {})}
    modality = settings["modality"]
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    out.parent.mkdir(parents=True, exist_ok=True)
    seed_everything(seed)
    device = pick_device(device)
    captioner = load_captioner(
        captioner_path,
        models,
        device=device,
        dtype=default_dtype(device),
        encoder_dir=encoder_dir if "audio" in modality else None,
        prefix_dir=prefix_dir if settings["use_prefix"] else None,
    )
    row_settings = {
        key: settings[key] for key in ("modality", "use_prefix", "max_new_tokens", "do_sample")
    }
    if settings["do_sample"]:
        row_settings["temperature"] = settings["temperature"]
    row_settings.update(
        seed=seed,
        encoder=str(encoder_dir) if "audio" in modality else None,
        prefix=str(prefix_dir) if settings["use_prefix"] else None,
    )

    done = {row["clip_id"] for row in read_partial(partial)}
    if done:
        log.info("resuming: %d clips already captioned in %s", len(done), partial)
    counts = {"ok": 0, "failed": 0, "skipped": len(done)}
    began = time.time()
    with open(partial, "a", encoding="utf-8") as sink:
        wanted_frames = None if "image" in modality else []  # no JPEG decoding if unused
        reader = ShardReader(pool, rank=0, world_size=1, frame_indices=wanted_frames)
        batches = batched(reader, settings["batch_size"])
        for index, batch in enumerate(tqdm(batches, desc="pseudolabel", unit="batch")):
            todo = [s for s in batch if s["clip_id"] not in done]
            if not todo:
                continue
            ids, failed, frames, fbank = model_inputs(todo, modality)
            rows = [
                {"clip_id": c, "caption": None, "settings": row_settings, "reason": r}
                for c, r in failed
            ]
            if ids:
                captions = captioner.generate(
                    modality=modality,
                    pixel_values=captioner.pixel_values(frames) if frames else None,
                    fbank=fbank,
                    use_prefix=settings["use_prefix"],
                    max_new_tokens=settings["max_new_tokens"],
                    do_sample=settings["do_sample"],
                    temperature=settings["temperature"],
                    seed=seed + index,
                    **settings["generate"],
                )
                rows += [
                    {"clip_id": c, "caption": t, "settings": row_settings}
                    for c, t in zip(ids, captions)
                ]
            for c, reason in failed:
                log.warning("clip %s skipped: %s", c, reason)
            sink.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
            sink.flush()
            os.fsync(sink.fileno())
            counts["ok"] += len(ids)
            counts["failed"] += len(failed)
    os.replace(partial, out)
    counts["seconds"] = round(time.time() - began, 2)
    log.info("pseudolabel: %s -> %s", counts, out)
    return counts


def main(argv: list[str]) -> int:
    args, params = stage_args(
        argv,
        "pseudolabel",
        __doc__,
        "seed, device, pseudolabel, models",
        pool="shard directory of the clips to caption",
        encoder="aligned audio encoder directory",
        prefix="prefix stage output directory",
        captioner=CAPTIONER_HELP,
        out="output JSON lines file",
    )
    inputs = (args.pool, args.encoder, args.prefix, args.captioner, args.out)
    counts = pseudolabel(*inputs, **stage_settings(params, "pseudolabel"))
    return 0 if counts["ok"] or counts["skipped"] else 1
