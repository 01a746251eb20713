"""Stage evaluate: caption a test set with every system and score it, as in the paper's Table 1.

    dalipipe evaluate --params '{"seed": 0, "evaluate": {...}, "extract": {...}, "models": {...}}' \
        --dataset miniature --shards results/miniature/shards/test \
        --captioner results/miniature/models/llava --prefix results/miniature/prefix \
        --align results/miniature/align/mmd results/miniature/align/ot ... \
        --distill results/miniature/distill/mmd ... --out results/miniature/evaluate/miniature

Systems (config ``evaluate.systems``), decoded as config ``evaluate.decoding`` says: greedy
(default), or sampled at ``evaluate.temperature`` (top-k 50) with seed ``evaluate.seed`` + batch
index, as the authors' eval_captions_AC.py sampled at 0.2; recorded per system:
- ``image``: the frozen captioner on the frame, with the learned prefix (paper: "Image only");
- ``untrained``: audio only through a randomly initialised encoder of the aligned encoders'
  size (seeded): the floor that alignment must beat;
- ``audio`` / ``audio_image``: each aligned encoder (directory name = method) before
  distillation, with the prefix (the paper's stage-1 ablation rows);
- ``audio_distilled`` / ``audio_image_distilled``: each distilled captioner, without the prefix
  by default (the authors' inference.sh);
- config ``evaluate.extra_systems`` (name -> trained-captioner directory, e.g. the authors'
  released weights through ``dalipipe import-authors``): evaluated as distilled captioners, in
  the distilled rows ``systems`` asks for, each row named after its key.
Systems not distilled are prompted with config ``models.options`` (template, prompt), as the
training stages were; a distilled captioner keeps the options saved with it.
Writes ``<out>/<system>.json`` (captions, scores, prompt options), ``references.json``,
``table.csv``, ``table.md``, ``failed.csv`` and ``gap.npz`` (mean audio token per clip per method
and mean image token per clip, for the modality-gap PCA figure).
"""

from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dalipipe.common import (
    atomic_path,
    package_versions,
    pick_device,
    read_stage,
    seed_everything,
    stage_parser,
    write_json,
)
from dalipipe.config import section_defaults
from dalipipe.evaluate import tables
from dalipipe.evaluate.datasets import EvalSet, load_dataset, stored_square
from dalipipe.scoring import metrics
from dalipipe.world.scores import world_scores

log = logging.getLogger(__name__)

SYSTEM_KINDS = (
    "image",
    "untrained",
    "audio",
    "audio_image",
    "audio_distilled",
    "audio_image_distilled",
)


@dataclass(frozen=True)
class System:
    name: str  # file stem and table key: "image", "untrained", "mmd_audio", "mmd_audio_distilled"
    kind: str
    method: str  # "" for image and untrained
    modality: str  # image | audio | audio+image
    distilled: bool
    use_prefix: bool


def plan_systems(
    settings: dict, methods: list[str], distilled: list[str], extra: list[str] = ()
) -> list[System]:
    """Systems in Table-1 order: image, untrained, then per method zero-shot before distilled,
    then the extra systems (trained-captioner directories evaluated as distilled ones)."""
    kinds = settings["systems"]
    unknown = set(kinds) - set(SYSTEM_KINDS)
    if unknown:
        raise ValueError(f"evaluate.systems: unknown {sorted(unknown)}; use {list(SYSTEM_KINDS)}")
    pz, pd = bool(settings["prefix_zero_shot"]), bool(settings["prefix_distilled"])
    out = []
    if "image" in kinds:
        out.append(System("image", "image", "", "image", False, pz))
    if "untrained" in kinds:
        out.append(System("untrained", "untrained", "", "audio", False, pz))
    for method in methods:
        for kind, modality, is_distilled in (
            ("audio", "audio", False),
            ("audio_image", "audio+image", False),
            ("audio_distilled", "audio", True),
            ("audio_image_distilled", "audio+image", True),
        ):
            if kind not in kinds or (is_distilled and method not in distilled):
                continue
            out.append(
                System(
                    f"{method}_{kind}",
                    kind,
                    method,
                    modality,
                    is_distilled,
                    pd if is_distilled else pz,
                )
            )
    extra_kinds = [
        (kind, modality)
        for kind, modality in (
            ("audio_distilled", "audio"),
            ("audio_image_distilled", "audio+image"),
        )
        if kind in kinds
    ]
    if extra and not extra_kinds:
        raise ValueError(
            "evaluate.extra_systems are evaluated as distilled captioners: evaluate.systems needs "
            "audio_distilled or audio_image_distilled"
        )
    for name in extra:
        if name in methods or name in distilled:
            raise ValueError(
                f"evaluate.extra_systems: {name!r} is also an evaluated method; rename the entry"
            )
        out += [System(f"{name}_{kind}", kind, name, mod, True, pd) for kind, mod in extra_kinds]
    return out


def check_extra_system(name: str, directory: Path, fbank_shape: tuple, fbank_cfg: dict) -> None:
    """An extra system must read the test clips' filterbank: the same size and statistics."""
    from dalipipe.models.artifacts import read_config

    where = f"evaluate.extra_systems.{name} ({directory})"
    if not (directory / "captioner.json").is_file():
        raise FileNotFoundError(f"{where}: not a trained-captioner directory (no captioner.json)")
    if not (directory / "audio_encoder.json").is_file():
        raise ValueError(f"{where}: the directory has no audio encoder")
    encoder = read_config(directory / "audio_encoder.json")
    wanted = (encoder.get("target_length"), encoder.get("num_mel_bins"))
    if tuple(fbank_shape) != wanted:
        raise ValueError(
            f"{where}: its audio encoder reads a filterbank of {wanted[0]} frames x {wanted[1]} mel "
            f"bins, and the test clips have {fbank_shape[0]} x {fbank_shape[1]} (extract.fbank)"
        )
    features = (read_config(directory / "captioner.json").get("metadata") or {}).get("features")
    theirs = (features or {}).get("fbank") or {}
    for key in ("mean", "std"):
        if key in theirs and key in fbank_cfg and float(theirs[key]) != float(fbank_cfg[key]):
            raise ValueError(
                f"{where}: trained on a filterbank normalised with {key} {theirs[key]}, and the "
                f"test clips with {fbank_cfg[key]} (extract.fbank.{key})"
            )


def load_inputs(ds: EvalSet) -> tuple[list, dict]:
    """Decode every clip once; a clip that fails is recorded in ``ds.failed`` and left out."""
    kept, inputs = [], {}
    for clip in tqdm(ds.clips, desc=f"{ds.name}: load", unit="clip"):
        try:
            fbank, frame = clip.load()
            if ds.has_video and frame is None:
                raise ValueError("no video frame")
        except Exception as err:  # one broken clip never stops the stage
            ds.failed.append({"clip_id": clip.clip_id, "reason": str(err)})
            log.warning("clip %s skipped: %s", clip.clip_id, err)
            continue
        kept.append(clip)
        inputs[clip.clip_id] = (fbank.astype(np.float16), frame)
    ds.clips = kept
    return kept, inputs


class CaptionerPool:
    """Builds each system's captioner, reusing the last one when two systems share it."""

    def __init__(
        self, captioner_dir, prefix_dir, align_dirs, distill_dirs, device, seed, models=None
    ):
        self.captioner_dir, self.prefix_dir = captioner_dir, prefix_dir
        # revision and options (prompt, template) of config `models`, as the training stages
        # used them; a distilled captioner carries its own in captioner.json
        self.models = models or {}
        self.align_dirs, self.distill_dirs = align_dirs, distill_dirs
        self.device, self.seed = device, seed
        self._key, self._captioner = None, None

    def get(self, system: System):
        key = (
            system.kind == "untrained",
            system.method if system.kind != "image" else "",
            system.distilled,
        )
        if key != self._key:
            self._captioner = None  # free the previous model first
            self._captioner = self._build(system)
            self._key = key
        return self._captioner

    def _build(self, system: System):
        from dalipipe.models.assemble import load_captioner
        from dalipipe.models.captioner import AudioCaptioner
        from dalipipe.training import default_dtype

        dtype = default_dtype(self.device)
        if system.distilled:
            return AudioCaptioner.from_dir(
                self.distill_dirs[system.method], dtype=dtype, device=self.device
            )
        prefix = self.prefix_dir if system.use_prefix else None
        if system.kind == "untrained":
            captioner = load_captioner(
                self.captioner_dir, self.models, prefix_dir=prefix, device=self.device, dtype=dtype
            )
            captioner.audio_encoder = untrained_encoder(self.align_dirs, self.seed).to(
                self.device, dtype
            )
            return captioner
        encoder = self.align_dirs[system.method] if system.method else None
        return load_captioner(
            self.captioner_dir,
            self.models,
            encoder_dir=encoder,
            prefix_dir=prefix,
            device=self.device,
            dtype=dtype,
        )


def untrained_encoder(align_dirs: dict[str, Path], seed: int):
    """A fresh encoder shaped like the aligned ones, its weights drawn from ``seed``."""
    import torch

    from dalipipe.models.artifacts import read_config
    from dalipipe.models.cavmae import AudioEncoderConfig, CavMaeAudioEncoder

    if not align_dirs:
        raise ValueError(
            "system 'untrained' needs at least one aligned encoder (--align) for its size"
        )
    first = next(iter(align_dirs.values()))
    config = AudioEncoderConfig(**read_config(Path(first) / "audio_encoder.json"))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return CavMaeAudioEncoder(config).eval()


def caption_all(captioner, system: System, clips, inputs, settings, seed) -> dict[str, str]:
    import torch

    captions = {}
    size = int(settings["batch_size"])
    batches = [clips[i : i + size] for i in range(0, len(clips), size)]
    for index, batch in enumerate(tqdm(batches, desc=system.name, unit="batch")):
        pixel_values = fbank = None
        if "image" in system.modality:
            pixel_values = captioner.pixel_values([inputs[c.clip_id][1] for c in batch])
        if "audio" in system.modality:
            fbank = torch.from_numpy(
                np.stack([inputs[c.clip_id][0] for c in batch]).astype(np.float32)
            )
        texts = captioner.generate(
            modality=system.modality,
            pixel_values=pixel_values,
            fbank=fbank,
            use_prefix=system.use_prefix and captioner.prefix is not None,
            max_new_tokens=int(settings["max_new_tokens"]),
            do_sample=settings["decoding"] == "sampled",
            temperature=float(settings["temperature"]),
            seed=seed + index,
            newlines=settings["caption_newlines"],
        )
        captions.update({c.clip_id: t for c, t in zip(batch, texts)})
    return captions


def token_means(captioner, clips, inputs, batch_size: int, *, image: bool) -> dict[str, np.ndarray]:
    """Mean audio token per clip (and mean image token per clip when ``image``), before the
    projector: the global representations of the paper's modality-gap figure."""
    import torch

    means: dict[str, list] = {"audio": [], "image": []}
    with torch.no_grad():
        for i in range(0, len(clips), batch_size):
            batch = clips[i : i + batch_size]
            fbank = torch.from_numpy(
                np.stack([inputs[c.clip_id][0] for c in batch]).astype(np.float32)
            )
            means["audio"].append(captioner.audio_tokens(fbank).float().mean(1).cpu().numpy())
            if image:
                pv = captioner.pixel_values([inputs[c.clip_id][1] for c in batch])
                means["image"].append(captioner.image_tokens(pv).float().mean(1).cpu().numpy())
    return {k: np.concatenate(v) for k, v in means.items() if v}


def evaluate(
    params: dict,
    dataset: str,
    out: str | Path,
    *,
    captioner_dir,
    prefix_dir=None,
    align_dirs=(),
    distill_dirs=(),
    shards=None,
) -> dict:
    settings = {**section_defaults("evaluate"), **(params.get("evaluate") or {})}
    seed = int(settings["seed"] if settings["seed"] is not None else params["seed"])
    device = pick_device(params["device"])
    seed_everything(seed)
    out = Path(out)
    ds_cfg = dict((settings.get("datasets") or {}).get(dataset) or {})
    if dataset == "miniature":
        ds_cfg.setdefault("shards", shards)
    fbank_cfg = (params.get("extract") or {}).get("fbank") or {}
    square = stored_square(params.get("extract"))  # the authors' 224 crops, where switched on
    ds = load_dataset(dataset, ds_cfg, fbank_cfg, settings["frame"], square)
    clips, inputs = load_inputs(ds)
    if not clips:
        first = f"; the first: {ds.failed[0]['reason']}" if ds.failed else ""
        raise ValueError(
            f"evaluate.datasets.{dataset}: no readable clip to evaluate, {len(ds.failed)} "
            f"clip(s) failed{first}"
        )
    align = {Path(d).name: Path(d) for d in align_dirs if str(d)}
    distill = {Path(d).name: Path(d) for d in distill_dirs if str(d)}
    extra = {str(k): Path(v) for k, v in (settings.get("extra_systems") or {}).items()}
    systems = plan_systems(settings, list(align), list(distill), list(extra))
    for name, directory in extra.items():
        check_extra_system(name, directory, inputs[clips[0].clip_id][0].shape, fbank_cfg)
    if not ds.has_video:
        systems = [s for s in systems if "image" not in s.modality]
    references = ds.references()
    pool = CaptionerPool(
        captioner_dir,
        prefix_dir,
        align,
        {**distill, **extra},  # an extra system loads as a distilled captioner does
        device,
        seed,
        models=params.get("models"),
    )
    decoding = tables.decoding_label(settings, seed)
    began = time.time()
    with atomic_path(out, directory=True) as tmp:
        write_json(tmp / "references.json", references)
        all_captions, seconds, options = {}, {}, {}
        gap: dict[str, np.ndarray] = {}
        for system in systems:
            t0 = time.time()
            # drop the last system's captioner first: the pool frees its own reference before
            # loading the next, and this one would keep two LLaVA-7B in memory at once
            captioner = None
            captioner = pool.get(system)
            all_captions[system.name] = caption_all(
                captioner, system, clips, inputs, settings, seed
            )
            seconds[system.name] = round(time.time() - t0, 2)
            options[system.name] = captioner.options.to_dict()  # the prompt it was asked with
            if ds.has_video and system.kind in ("audio", "untrained"):
                # While this encoder is loaded: its tokens for the modality-gap figure.
                means = token_means(
                    captioner, clips, inputs, int(settings["batch_size"]), image="image" not in gap
                )
                gap[f"audio/{system.method or 'untrained'}"] = means["audio"]
                gap.setdefault("image", means.get("image"))
        scored = metrics.score_many(
            all_captions,
            references,
            spice=bool(settings["spice"]),
            embedding=bool(settings["embedding"]),
            fense=metrics.FenseModels.from_settings(settings.get("fense")),
            corenlp=settings.get("corenlp"),
        )
        rows, all_notes = [], {}
        metas = {c.clip_id: c.meta for c in clips}
        for system in systems:
            captions = all_captions[system.name]
            scores, per_clip, notes = scored[system.name]
            if dataset == "miniature":
                scores.update(world_scores(captions, metas))
            record = {**asdict(system), "dataset": dataset, "captions": captions, "scores": scores}
            record.update(notes=notes, per_clip=per_clip, seconds=seconds[system.name])
            record["options"] = options[system.name]
            record["decoding"] = decoding
            write_json(tmp / f"{system.name}.json", record)
            rows.append(tables.table_row(system, scores, decoding))
            all_notes.update(notes)
            log.info(
                "%s: %s", system.name, metrics.format_scores(scores, notes).replace("\n", "; ")
            )
        world = dataset == "miniature"
        tables.write_csv(tmp / "table.csv", rows, tables.columns(world=world))
        (tmp / "table.md").write_text(tables.markdown(rows, dataset, world=world, notes=all_notes))
        if gap:
            np.savez(tmp / "gap.npz", clip_ids=np.array([c.clip_id for c in clips]), **gap)
        with open(tmp / "failed.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["clip_id", "reason"])
            writer.writeheader()
            writer.writerows(ds.failed)
        summary = {
            "dataset": dataset,
            "n_clips": len(clips),
            "n_failed": len(ds.failed),
            "systems": [s.name for s in systems],
            "decoding": {s.name: decoding for s in systems},
            "versions": package_versions(),  # what produced these numbers
            "seconds": round(time.time() - began, 2),
        }
        write_json(tmp / "summary.json", summary)
    log.info("evaluate %s: %s", dataset, json.dumps(summary))
    return summary


def main(argv: list[str]) -> int:
    parser = stage_parser("evaluate", __doc__, "seed, device, evaluate, extract, models")
    parser.add_argument("--dataset", required=True, help="miniature | audiocaps | clotho")
    parser.add_argument("--shards", help="test shard folder (miniature)")
    parser.add_argument("--captioner", required=True, help="the base LLaVA-class captioner")
    parser.add_argument("--prefix", help="prefix stage output folder")
    parser.add_argument(
        "--align", nargs="*", default=[], help="aligned encoder folders (name = method)"
    )
    parser.add_argument("--distill", nargs="*", default=[], help="distilled captioner folders")
    parser.add_argument("--out", required=True, help="output folder")
    args, params = read_stage(parser, argv)
    evaluate(
        params,
        args.dataset,
        args.out,
        captioner_dir=args.captioner,
        prefix_dir=args.prefix,
        align_dirs=args.align,
        distill_dirs=args.distill,
        shards=args.shards,
    )
    return 0
