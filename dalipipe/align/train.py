"""Stage align: train an audio encoder whose tokens are distributed like the frozen image tokens.

    dalipipe align --params '{"seed": 0, "device": "auto", "align": {...}, "models": {...}}' \
        --method ot_att --shards results/r/shards/align --val-shards results/r/shards/test \
        --captioner results/r/models/llava --out results/r/align/ot_att
    accelerate launch -m dalipipe.cli align ...      # one process per GPU

Per step: a batch of clips streams from the shards; one frame per clip (random, as the paper
says, or a fixed index, as the authors' code does) goes through the captioner's frozen vision
tower to give the target tokens; the fbank, augmented as the authors do (uniform noise of a
per-clip amplitude, then a circular time shift), goes through the audio encoder; the method's
loss (objective.py) is minimised per clip. Each epoch ends with a validation loss (uniform OT
weights), a row of curve.csv and a halving of the LR at the configured milestones.

A checkpoint every `checkpoint_every` steps, at each epoch's end and on SIGTERM goes to
`<out>.ckpt/`; a rerun resumes exactly (weights, optimisers, scheduler, RNG, place in the data).
The output directory holds audio_encoder.safetensors/.json, curve.csv and summary.json, and for
ot_att the trained scorer, attentive_scorer.safetensors/.json (align.attentive.load_scorer).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dalipipe.align.attentive import AttentiveWeights, entropy_weight, save_scorer
from dalipipe.align.objective import METHODS, Objective
from dalipipe.align.ot import OTSolver
from dalipipe.common import atomic_path, read_stage, seed_everything, stage_parser, write_json
from dalipipe.config import section_defaults
from dalipipe.training import TrainLoop, write_curve

log = logging.getLogger(__name__)


def method_settings(align: dict | None, method: str) -> dict:
    """Defaults, then the config's `align` section, then its `per_method[method]` overrides."""
    if method not in METHODS:
        raise ValueError(f"--method: unknown {method!r}, expected one of {METHODS}")
    align = dict(align or {})
    defaults = section_defaults("align")
    merged = {**defaults, **{k: v for k, v in align.items() if k != "per_method"}}
    merged.update((align.get("per_method") or {}).get(method) or {})
    for nested in ("ot", "attentive"):
        merged[nested] = {**defaults[nested], **(merged.get(nested) or {})}
    unknown = set(merged) - set(defaults)
    if unknown:
        raise ValueError(f"config align: unknown keys {sorted(unknown)}")
    return merged


# Settings that may change between a run and its resumption without discarding the checkpoint.
RESUMABLE_CHANGES = ("methods", "checkpoint_every", "clip_cache_gb")


# --- data --------------------------------------------------------------------------------------


def step_generator(seed: int, epoch: int, step: int, rank: int) -> torch.Generator:
    """A generator for one step's random choices, so a resumed run draws exactly the same ones."""
    key = hashlib.sha256(f"{seed}/{epoch}/{step}/{rank}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(key[:8], "little"))


def augment(
    fbank: torch.Tensor, gen: torch.Generator, noise: bool, time_shift: bool
) -> torch.Tensor:
    """The authors' alignment augmentation on (B,T,M): + U[0,1)*u/10 with u ~ U[0,1) per clip,
    then a circular shift along time by an integer in [-T, T)."""
    batch, length, _ = fbank.shape
    if noise:
        amplitude = torch.rand(batch, 1, 1, generator=gen) / 10
        fbank = fbank + torch.rand(fbank.shape, generator=gen) * amplitude
    if time_shift:
        shift = torch.randint(-length, length, (batch, 1), generator=gen)
        index = (torch.arange(length).unsqueeze(0) - shift) % length  # torch.roll, per clip
        fbank = fbank.gather(1, index.unsqueeze(-1).expand_as(fbank))
    return fbank


def pick_frames(samples: list[dict], frame, gen: torch.Generator | None) -> list[int]:
    """Which frame of each clip: drawn at random, or the fixed index (the reader decoded only it)."""
    if frame != "random":
        return [int(frame)] * len(samples)
    return [int(torch.randint(len(s["frames"]), (1,), generator=gen)) for s in samples]


def frame_of(sample: dict, index: int, frame) -> np.ndarray:
    return sample["frames"][0 if frame != "random" else index]


def _as_is(sample):
    return sample


def in_workers(reader, workers: int):
    """Decode clips in ``workers`` background processes (0: in this one).

    The DataLoader takes samples from its workers in a fixed round-robin order, so the stream
    is the same on every run with the same number of workers, and a resume stays exact.
    """
    if workers <= 0:
        return reader
    return torch.utils.data.DataLoader(
        reader, batch_size=None, num_workers=workers, collate_fn=_as_is, prefetch_factor=64
    )


def batched(reader, batch_size: int, drop_last: bool = True):
    """Batches of ``batch_size`` clips; training drops the last partial one, as the authors."""
    iterator = iter(reader)
    while batch := list(itertools.islice(iterator, batch_size)):
        if len(batch) < batch_size and drop_last:
            return
        yield batch


def open_reader(
    shards, *, shuffle: bool, seed: int, rank: int, world_size: int, frame=None, cache=None
):
    """Only the needed frame is decoded when the frame index is fixed (JPEG decoding is costly)."""
    from dalipipe.data.shard_reader import ShardReader

    indices = None if frame in (None, "random") else [int(frame)]
    return ShardReader(
        shards,
        shuffle=shuffle,
        seed=seed,
        rank=rank,
        world_size=world_size,
        frame_indices=indices,
        cache=cache,
    )


MAX_SKIP_WARNINGS = 20
_skipped: dict[str, int] = {}


def usable(samples, where: str, fbank_shape: tuple[int, int] | None = None):
    """Clips without the wanted frame, or with a filterbank of another shape or with non-finite
    values, are logged and skipped, never fatal."""
    for sample in samples:
        fbank = sample["fbank"]
        if not sample["frames"]:
            reason = "no usable frame"
        elif fbank_shape is not None and tuple(fbank.shape) != tuple(fbank_shape):
            reason = f"fbank shape {tuple(fbank.shape)}, expected {tuple(fbank_shape)}"
        elif not np.isfinite(fbank).all():
            reason = "non-finite fbank values"
        else:
            yield sample
            continue
        _skipped[where] = _skipped.get(where, 0) + 1
        if _skipped[where] <= MAX_SKIP_WARNINGS:
            log.warning(
                "%s: clip %s skipped: %s%s",
                where,
                sample["clip_id"],
                reason,
                " (further skips not logged)" if _skipped[where] == MAX_SKIP_WARNINGS else "",
            )


def pool_size(shards) -> int | None:
    """Clips in a shard directory, as its index.json counts them; None where it does not."""
    if not isinstance(shards, (str, os.PathLike)) or not (Path(shards) / "index.json").is_file():
        return None
    entries = json.loads((Path(shards) / "index.json").read_text()).get("shards") or []
    counts = [entry.get("count") for entry in entries]
    return sum(counts) if counts and all(isinstance(c, int) for c in counts) else None


def batch_for_pool(batch_size: int, pool: int | None, processes: int, where) -> int:
    """The batch size, capped at each process's share of the pool: training drops a partial
    batch, so a batch larger than the share would train nothing (as prefix and distill do)."""
    share = None if pool is None else pool // processes
    if not share or batch_size <= share:
        return batch_size
    log.warning(
        "align.batch_size %d is above the %d clips per process of %s (%d clips, %d process(es)):"
        " batches of %d",
        batch_size, share, where, pool, processes, share,
    )  # fmt: skip
    return share


class Counted:
    """An iterator that counts what passed through it (the clips an epoch offered)."""

    def __init__(self, items):
        self.items, self.count = iter(items), 0

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self.items)
        self.count += 1
        return item


# --- the run -----------------------------------------------------------------------------------


class Run:
    """Everything one alignment run holds; `train()` runs it to the end or to a SIGTERM."""

    def __init__(self, params: dict, method: str, shards, val_shards, captioner_path, out):
        from accelerate import Accelerator

        from dalipipe.models.assemble import load_captioner

        self.method, self.out = method, Path(out)
        self.settings = s = method_settings(params.get("align"), method)
        self.seed = int(params["seed"])
        self.shards, self.val_shards = shards, val_shards
        device = params["device"]
        self.accelerator = Accelerator(cpu=device == "cpu")
        self.device = self.accelerator.device
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        if s["precision"] not in ("fp32", "bf16"):
            raise ValueError(
                f"config align.precision: expected fp32 or bf16, got {s['precision']!r}"
            )

        seed_everything(self.seed)
        # Only the vision tower is used; bf16 weights halve its memory at paper scale. The
        # config's revision and options (image_aspect: how a frame becomes CLIP's square) apply
        # here as in every caption stage.
        dtype = torch.bfloat16 if s["precision"] == "bf16" else torch.float32
        self.captioner = load_captioner(
            captioner_path, params.get("models"), device=self.device, dtype=dtype
        )
        self.captioner.eval().requires_grad_(False)
        # The first usable training clip sizes the encoder (the test split may lack frames).
        first = open_reader(shards, shuffle=False, seed=self.seed, rank=0, world_size=1)
        probe = next(usable(first, str(shards)), None)
        if probe is None:
            raise ValueError(f"{shards}: no usable clip (frames and a finite fbank) to train on")
        width = self.image_tokens([probe["frames"][0]]).shape[-1]
        self.encoder = self._build_encoder(params.get("models") or {}, probe["fbank"].shape, width)
        self.fbank_shape = (self.encoder.config.target_length, self.encoder.config.num_mel_bins)
        self.batch_size = batch_for_pool(s["batch_size"], pool_size(shards), self.world, shards)
        self.solver = self.scorer = None
        if method in ("ot", "ot_att"):
            self.solver = OTSolver.from_settings(s["ot"])
        params_main = list(self.encoder.parameters())
        adam = dict(betas=tuple(s["betas"]), weight_decay=s["weight_decay"])
        self.optimizer = torch.optim.Adam(params_main, lr=s["lr"], **adam)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, milestones=list(s["lr_milestones"]), gamma=s["lr_decay"]
        )
        self.scorer_optimizer = None
        if method == "ot_att":
            att = s["attentive"]
            self.scorer = AttentiveWeights(width, att["heads"], att["tau"], att["uniform_mix"])
            self.scorer.to(self.device)
            self.scorer_optimizer = torch.optim.Adam(self.scorer.parameters(), lr=att["lr"], **adam)
        self.objective = Objective(
            method, self.solver, self.scorer, s["attentive"]["double_gradient"]
        )
        fingerprint = hashlib.sha256(
            json.dumps(
                [
                    method,
                    {k: v for k, v in s.items() if k not in RESUMABLE_CHANGES},
                    params.get("models"),
                    self.seed,
                    str(captioner_path),
                ],
                sort_keys=True,
                default=str,
            ).encode()
        ).hexdigest()[:16]
        self.token_cache: dict[tuple[str, int], torch.Tensor] = {}
        self.token_cache_bytes = 0
        # Decoded training clips, reused by every later epoch (in-process reading only)
        self.clip_cache = None
        if s["clip_cache_gb"] > 0 and s["loader_workers"] == 0:
            from dalipipe.data.shard_reader import DecodedCache

            self.clip_cache = DecodedCache(s["clip_cache_gb"] * 2**30)
        # the place in the data; the loop counts the steps and holds the per-epoch curve
        self.progress = {"epoch": 1, "batch": 0, "sums": {}, "count": 0, "seconds": 0.0, "clips": 0}
        state = {"progress": self.progress, "encoder": self.encoder}
        state.update(optimizer=self.optimizer, scheduler=self.scheduler)
        if self.scorer is not None:
            state.update(scorer=self.scorer, scorer_optimizer=self.scorer_optimizer)
        self.loop = TrainLoop(
            self.out.with_name(self.out.name + ".ckpt"),
            state,
            settings=fingerprint,  # the settings, RESUMABLE_CHANGES aside
            checkpoint_every=s["checkpoint_every"],
            accelerator=self.accelerator,
        )

    def _build_encoder(self, models: dict, fbank_shape, width: int):
        from dalipipe.models.cavmae import build_encoder

        settings = dict(models.get("audio_encoder") or {})
        settings.setdefault("target_length", int(fbank_shape[0]))
        settings.setdefault("num_mel_bins", int(fbank_shape[1]))
        if (settings["target_length"], settings["num_mel_bins"]) != tuple(fbank_shape):
            raise ValueError(
                f"config models.audio_encoder expects fbank ({settings['target_length']}, "
                f"{settings['num_mel_bins']}), the shards hold {tuple(fbank_shape)}"
            )
        if settings.get("out_dim", width) != width:
            raise ValueError(
                f"config models.audio_encoder.out_dim={settings['out_dim']} but the "
                f"captioner's image tokens are {width}-d"
            )
        return build_encoder(settings, out_dim=width).to(self.device)

    def autocast(self):
        enabled = self.settings["precision"] == "bf16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    @torch.no_grad()
    def image_tokens(self, frames: list[np.ndarray]) -> torch.Tensor:
        with self.autocast():
            pixels = self.captioner.pixel_values(frames).to(self.device)
            return self.captioner.image_tokens(pixels).float()

    def target_tokens(self, samples: list[dict], frame, gen) -> torch.Tensor:
        """The frozen tower's tokens for one frame per clip, from the cache where enabled.

        Cached tokens are float16, and with a cache every token is used rounded that way, cached
        or not, so a resumed run (whose cache starts empty) sees exactly the values an
        uninterrupted one does. The cache stops growing at ``image_token_cache_gb``.
        """
        indices = pick_frames(samples, frame, gen)
        budget = self.settings["image_token_cache_gb"] * 2**30
        if budget <= 0:
            return self.image_tokens([frame_of(x, i, frame) for x, i in zip(samples, indices)])
        keys = [(x["clip_id"], i) for x, i in zip(samples, indices)]
        missing = [n for n, key in enumerate(keys) if key not in self.token_cache]
        tokens = {}
        if missing:
            fresh = self.image_tokens([frame_of(samples[n], indices[n], frame) for n in missing])
            for n, values in zip(missing, fresh.half().cpu()):
                tokens[keys[n]] = values
                if self.token_cache_bytes + values.nbytes <= budget:
                    self.token_cache[keys[n]] = values
                    self.token_cache_bytes += values.nbytes
        stacked = [tokens[key] if key in tokens else self.token_cache[key] for key in keys]
        return torch.stack(stacked).to(self.device).float()

    def entropy_lambda(self, epoch: int) -> float | None:
        if self.method != "ot_att":
            return None
        att = self.settings["attentive"]
        return entropy_weight(epoch, att["frozen_epochs"], att["lambdas"], att["final_lambda"])

    # --- steps ---------------------------------------------------------------------------------

    def in_step(self, batches):
        """Stop every process at the same step: ranks may hold different numbers of clips."""
        if self.world == 1:
            yield from batches
            return
        iterator = iter(batches)
        while True:
            batch = next(iterator, None)
            have = torch.tensor([float(batch is not None)], device=self.device)
            if self.accelerator.reduce(have, reduction="sum").item() < self.world:
                return
            yield batch

    def epoch_means(self) -> dict[str, float]:
        """The epoch's mean training losses, averaged over the processes too."""
        p = self.progress
        means = {k: v / max(p["count"], 1) for k, v in sorted(p["sums"].items())}
        if self.world > 1 and means:
            values = torch.tensor(list(means.values()), device=self.device, dtype=torch.float64)
            means = dict(zip(means, self.accelerator.reduce(values, reduction="mean").tolist()))
        return means

    def train_step(self, samples: list[dict], epoch: int) -> dict[str, float]:
        s, p = self.settings, self.progress
        gen = step_generator(self.seed, epoch, p["batch"], self.rank)
        image = self.target_tokens(samples, s["frame"], gen)
        fbank = torch.from_numpy(np.stack([x["fbank"] for x in samples]).astype(np.float32))
        fbank = augment(fbank, gen, s["noise"], s["time_shift"]).to(self.device)
        self.encoder.train()
        with self.autocast():
            audio = self.encoder(fbank)
            out = self.objective(audio, image, self.entropy_lambda(epoch), train=True)
        self.optimizer.zero_grad(set_to_none=True)
        scorer_grads = None
        if out.scorer_loss is not None:
            self.scorer_optimizer.zero_grad(set_to_none=True)
            scorer_params = list(self.scorer.parameters())
            scorer_grads = torch.autograd.grad(
                out.scorer_loss, scorer_params, retain_graph=True, allow_unused=True
            )
        out.loss.backward()
        self.loop.average_gradients(self.encoder.parameters())
        self.optimizer.step()
        if scorer_grads is not None:
            # The scorer learns only from its own loss OT - lambda*H, with its own optimiser.
            for param, grad in zip(scorer_params, scorer_grads):
                param.grad = grad
            self.loop.average_gradients(scorer_params)
            self.scorer_optimizer.step()
        return {"loss": out.loss.item(), **out.logged}

    @torch.no_grad()
    def validate(self) -> float | None:
        s = self.settings
        reader = self.reader(self.val_shards, shuffle=False, frame=s["val_frame"])
        self.encoder.eval()
        total = torch.zeros(2, device=self.device)
        clips = usable(reader, str(self.val_shards), self.fbank_shape)
        stream = batched(clips, s["batch_size"], drop_last=False)
        for samples in itertools.islice(stream, s["val_max_batches"]):
            image = self.target_tokens(samples, s["val_frame"], None)
            fbank = torch.from_numpy(np.stack([x["fbank"] for x in samples]).astype(np.float32))
            with self.autocast():
                audio = self.encoder(fbank.to(self.device))
                loss = self.objective(audio, image, train=False).loss
            total += torch.tensor([loss.item() * len(samples), len(samples)], device=self.device)
        if self.world > 1:
            total = self.accelerator.reduce(total, reduction="sum")
        if total[1] == 0:
            log.warning("validation: no usable clip in %s", self.val_shards)
            return None
        return float(total[0] / total[1])

    def reader(self, shards, *, shuffle: bool, frame, cache=None):
        share = {"seed": self.seed, "rank": self.rank, "world_size": self.world}
        return open_reader(shards, shuffle=shuffle, frame=frame, cache=cache, **share)

    def train(self) -> dict:
        s, p, loop = self.settings, self.progress, self.loop
        if loop.resume():
            loop.curve = p.pop("curve", loop.curve)  # checkpoints before issue 16 kept the curve
            p.pop("step", None)  # and the step in `progress`
            log.info(
                "resuming %s at epoch %d, batch %d (step %d)",
                self.method,
                p["epoch"],
                p["batch"],
                loop.step,
            )
        began = time.time() - p["seconds"]
        for epoch in range(p["epoch"], s["epochs"] + 1):
            reader = self.reader(self.shards, shuffle=True, frame=s["frame"], cache=self.clip_cache)
            reader.set_epoch(epoch)
            clips = Counted(
                usable(in_workers(reader, s["loader_workers"]), str(self.shards), self.fbank_shape)
            )
            stream = self.in_step(batched(clips, self.batch_size))
            began_at_batch = p["batch"]
            batches = itertools.islice(stream, p["batch"], s["max_steps_per_epoch"])
            lam = self.entropy_lambda(epoch)
            bar = tqdm(
                batches,
                desc=f"align {self.method} epoch {epoch}/{s['epochs']}",
                initial=p["batch"],
                disable=not self.accelerator.is_main_process,
            )
            for samples in bar:
                logged = self.train_step(samples, epoch)
                p["batch"] += 1
                p["count"] += 1
                p["clips"] += len(samples) * self.world
                for key, value in logged.items():
                    p["sums"][key] = p["sums"].get(key, 0.0) + value
                bar.set_postfix(loss=f"{logged['loss']:.4f}")
                p["seconds"] = time.time() - began
                loop.end_step()  # a checkpoint every checkpoint_every steps, and on SIGTERM
            if began_at_batch == 0 and p["batch"] == 0:  # a whole epoch without one step
                raise ValueError(
                    f"align.batch_size {self.batch_size}: epoch {epoch} made no step: "
                    f"{clips.count} usable clip(s) of {self.shards} reached this process (one of "
                    f"{self.world}), fewer than one batch; lower align.batch_size or add clips"
                )
            val = self.validate()
            row = {
                "epoch": epoch,
                "step": loop.step,
                "lr": self.scheduler.get_last_lr()[0],
                "entropy_lambda": lam,
                "val_loss": val,
                "seconds": round(time.time() - began, 2),
                **{f"train_{k}": v for k, v in self.epoch_means().items()},
            }
            log.info("epoch %d: %s", epoch, json.dumps(row))
            loop.curve.append(row)
            self.scheduler.step()
            p.update(epoch=epoch + 1, batch=0, sums={}, count=0, seconds=time.time() - began)
            loop.save()
        return self.finish()

    def finish(self) -> dict:
        from dalipipe.models.cavmae import count_parameters, save_encoder

        p, curve = self.progress, self.loop.curve
        last = curve[-1] if curve else {}
        summary = {
            "method": self.method,
            "solver": self.solver.describe() if self.solver else None,
            "epochs": self.settings["epochs"],
            "batch_size": self.batch_size,  # align.batch_size, capped at the pool
            "steps": self.loop.step,
            "clips_seen": p["clips"],
            # decoded clips kept between epochs (align.clip_cache_gb); 0 when off
            "clips_cached": len(self.clip_cache.samples) if self.clip_cache else 0,
            "final_train_loss": last.get("train_loss"),
            "final_val_loss": last.get("val_loss"),
            "encoder_parameters": count_parameters(self.encoder),
            "scorer_parameters": count_parameters(self.scorer) if self.scorer else 0,
            "processes": self.world,
            "device": str(self.device),
            "seed": self.seed,
            "seconds": round(p["seconds"], 2),
            "settings": self.settings,
        }
        if self.accelerator.is_main_process:
            with atomic_path(self.out, directory=True) as tmp:
                save_encoder(self.encoder, tmp)
                if self.scorer is not None:  # ot_att: the token weights Figure 7 draws
                    save_scorer(self.scorer, tmp)
                columns = sorted({k for row in curve for k in row}, key=lambda k: (k != "epoch", k))
                write_curve(tmp / "curve.csv", curve, columns)
                write_json(tmp / "summary.json", summary)
            self.loop.checkpoint.remove()
        self.accelerator.wait_for_everyone()
        if self.solver is not None:
            self.solver.close()
        return summary


def align(params: dict, method: str, shards, val_shards, captioner, out) -> dict:
    """Train one method's encoder into ``out``; returns the summary."""
    return Run(params, method, shards, val_shards, captioner, out).train()


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("align", __doc__, "seed, device, align, models")
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument("--shards", required=True, help="training shards directory")
    parser.add_argument("--val-shards", required=True, help="validation shards directory")
    parser.add_argument("--captioner", required=True, help="LLaVA-class captioner directory")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--threads", type=int, help="CPU threads of the job, shared by its processes (torch)"
    )
    args, params = read_stage(parser, argv)
    if args.threads:
        # Oversubscribed OpenMP threads are several times slower than fewer, on a busy machine.
        world = int(os.environ.get("WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, args.threads // world))
    try:
        summary = align(params, args.method, args.shards, args.val_shards, args.captioner, args.out)
    except (OSError, ValueError) as err:  # bad input: one clear line, no traceback
        log.error("align %s: %s", args.method, err)
        return 1
    log.info(
        "align %s done: %s",
        args.method,
        json.dumps(
            {k: summary[k] for k in ("steps", "final_train_loss", "final_val_loss", "seconds")}
        ),
    )
    return 0
