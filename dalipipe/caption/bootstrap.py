"""The miniature's stand-in for LLaVA pre-training: a small LLaVA-class captioner trained on frames.

    dalipipe bootstrap --params '{"seed": 0, "bootstrap": {...}}' --shards results/miniature/shards/align \
        --out results/miniature/models/llava

It builds a LlavaForConditionalGeneration (CLIP-class vision tower, Llama-class LM) whose
tokenizer is trained on the world's texts, and trains it on two image tasks, each sample
drawing one of them:
  * frame -> visual caption (meta["visual_caption"], "a photo of a red bell"), asked with
    image prompts such as "What can you see in this image?";
  * frame -> the sounds its *visible* objects make ("a bell chimes"), asked with sound prompts
    such as "What sounds would the things in this image make?" (the miniature config also
    lists the DALI prompts, since LLaVA follows such instructions natively): what LLaVA knows
    from its language pre-training (a pictured dog barks), never learned from audio. A visible
    but silent object is still named, an off-screen one never.
So the captioner knows the objects by sight only; hearing is what DALI has to add. A first
version trained the sound captions as text only (no image); its sound answers then ignored
the image, and the prefix could only steer it to a few fixed sentences (class recall ~0.2). A few
held-out clips are captioned at the end (exact-match rate in `bootstrap_summary.json`).
The output is a `save_pretrained` model + processor; training checkpoints go to `<out>.ckpt/`.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from dalipipe.common import atomic_path, pick_device, read_stage, seed_everything, stage_parser
from dalipipe.config import llava_sizes, section_defaults
from dalipipe.models.captioner import TEMPLATES
from dalipipe.models.llava_config import CLIP_MEAN, CLIP_STD, llava_config, llava_processor
from dalipipe.models.tokenizer import build_tokenizer
from dalipipe.training import TrainLoop, write_curve

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------- data


def world_texts() -> list[str]:
    """Every caption form of every world class, so their words become whole tokens."""
    from dalipipe.world import classes as world

    rng = np.random.default_rng(0)
    texts = []
    for cls in world.CLASSES:
        texts += world.reference_captions([cls.name], rng)
        texts.append(world.visual_caption([cls.name]))
    names = [c.name for c in world.CLASSES]
    texts.append(world.audio_caption(names))
    texts.append(world.visual_caption(names))
    texts.append(world.visual_caption([]))
    return texts


def frame_tensor(frame: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (3, size, size): short side to `size` (bicubic) and centre crop, as CLIP's processor."""
    image = Image.fromarray(np.asarray(frame)).convert("RGB")
    w, h = image.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        image = image.resize(
            (max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC
        )
        w, h = image.size
        left, top = (w - size) // 2, (h - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def normalise(frames_uint8: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (frames_uint8.float() / 255.0 - mean) / std


def _clip_entry(clip_id: str, frames: list, meta: dict, image_size: int) -> dict | None:
    from dalipipe.world import classes as world

    visual, seen = meta.get("visual_caption"), meta.get("seen") or []
    if not frames or not visual:
        log.warning("clip %s: no frames or no visual_caption; skipped", clip_id)
        return None
    stacked = torch.stack([frame_tensor(f, image_size) for f in frames])
    # the sounds a sighted captioner would guess: those of the visible objects
    sound = world.audio_caption(seen) if seen else None
    return {"clip_id": clip_id, "frames": stacked, "visual": visual, "sound": sound}


def load_clips(
    source, image_size: int, *, metadata: str | Path | None = None, split: str = "align"
) -> list[dict]:
    """A split in memory: frames (uint8 tensors) and the two captions of each clip.

    `source` is a shard directory, or (with `metadata`) a list of extract part directories:
    the workflow reads the unfiltered extract output, because the caption filter itself
    uses this captioner (shards/align depends on the filter).
    """
    from dalipipe.data import shard
    from dalipipe.data.shard_reader import ShardReader

    entries = []
    if metadata is None:
        reader = ShardReader(source, shuffle=False, rank=0, world_size=1)
        for sample in tqdm(reader, desc="load", unit="clip", mininterval=5):
            entries.append(
                _clip_entry(sample["clip_id"], sample["frames"], sample["meta"], image_size)
            )
    else:
        rows = shard.read_metadata(metadata)
        clips, counts, _ = shard.collect_clips(source, rows, split, need_frames=True)
        log.info("%s split in the extract output: %s", split, dict(counts))
        for clip in tqdm(clips, desc="load", unit="clip", mininterval=5):
            frames = [np.asarray(Image.open(p).convert("RGB")) for p in clip.frames]
            entries.append(_clip_entry(clip.clip_id, frames, clip.meta, image_size))
    clips = [e for e in entries if e is not None]
    if not clips:
        raise RuntimeError(f"{source}: no clip with frames and a visual caption")
    log.info("loaded %d clips (%d skipped) from %s", len(clips), len(entries) - len(clips), source)
    return clips


# ---------------------------------------------------------------------------------- sequences


class Sequences:
    """Token ids and labels for the two tasks; only answers (and the end token) are supervised."""

    def __init__(self, tokenizer, templates: list[str], prompts: list[str], n_image_tokens: int):
        self.tok = tokenizer
        self.image_id = tokenizer.convert_tokens_to_ids(tokenizer.image_token)
        self.prompts = []  # every (template, prompt) combination
        for template, prompt in itertools.product(templates, prompts):
            text = TEMPLATES[template].format(prompt=prompt)
            ids = tokenizer(text)["input_ids"]
            k = ids.index(self.image_id)
            expanded = ids[:k] + [self.image_id] * n_image_tokens + ids[k + 1 :]
            self.prompts.append((text, expanded))

    def answer_ids(self, text: str, caption: str) -> list[int]:
        prompt_ids = self.tok(text)["input_ids"]
        full = self.tok(f"{text} {caption}")["input_ids"]
        if full[: len(prompt_ids)] != prompt_ids:
            raise ValueError(f"caption {caption!r} merges with the prompt's last token")
        return full[len(prompt_ids) :] + [self.tok.eos_token_id]

    def visual(self, prompt_index: int, caption: str) -> tuple[list[int], list[int]]:
        text, ids = self.prompts[prompt_index]
        answer = self.answer_ids(text, caption)
        return ids + answer, [-100] * len(ids) + answer

    def batch(self, pairs: list[tuple[list[int], list[int]]]):
        """Right-padded input ids, attention mask and labels."""
        longest = max(len(ids) for ids, _ in pairs)
        pad = self.tok.pad_token_id
        ids = torch.tensor([i + [pad] * (longest - len(i)) for i, _ in pairs])
        mask = torch.tensor([[1] * len(i) + [0] * (longest - len(i)) for i, _ in pairs])
        labels = torch.tensor([lab + [-100] * (longest - len(lab)) for _, lab in pairs])
        return ids, mask, labels


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        labels[:, 1:].reshape(-1),
        ignore_index=-100,
    )


# ---------------------------------------------------------------------------------- training

CURVE = ["step", "epoch", "visual_loss", "sound_loss"]  # the columns of curve.csv


def lr_at(step: int, total: int, peak: float, warmup_fraction: float) -> float:
    """Linear warm-up then cosine decay to zero."""
    warmup = max(1, int(total * warmup_fraction))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model, cfg: dict) -> torch.optim.Optimizer:
    """AdamW with per-part rates: vision tower, projector, LM (a multiplier of 0 freezes a part)."""
    parts = {"vision": [], "projector": [], "lm": []}
    for name, param in model.named_parameters():
        part = "vision" if ".vision_tower." in f".{name}" else "lm"
        part = "projector" if "multi_modal_projector" in name else part
        parts[part].append(param)
    mults = {"vision": cfg["vision_lr_mult"], "projector": cfg["projector_lr_mult"], "lm": 1.0}
    groups = []
    for part, params in parts.items():
        if mults[part] == 0:
            for p in params:
                p.requires_grad_(False)
            continue
        groups.append({"params": params, "lr": cfg["lr"] * mults[part], "lr_mult": mults[part]})
    return torch.optim.AdamW(groups, lr=cfg["lr"], weight_decay=cfg["weight_decay"])


@torch.no_grad()
def caption_frames(
    model, tokenizer, seqs: Sequences, frames: torch.Tensor, device, max_new_tokens=24
):
    """Greedy captions of frames (uint8 (B,3,S,S)) with the first image prompt."""
    _, ids = seqs.prompts[0]
    input_ids = torch.tensor([ids] * frames.shape[0], device=device)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        pixel_values=normalise(frames).to(device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return [t.strip() for t in tokenizer.batch_decode(out[:, len(ids) :], skip_special_tokens=True)]


def bootstrap(
    settings: dict,
    source,
    out: str | Path,
    *,
    metadata: str | Path | None = None,
    seed: int = 0,
    device="cpu",
) -> dict:
    """Train the miniature captioner on the align split and save it to `out`.

    `source`: a shard directory, or extract part directories together with `metadata`.
    """
    from transformers import LlavaForConditionalGeneration

    defaults = section_defaults("bootstrap")
    cfg = {**defaults, **(settings or {})}
    unknown = set(cfg) - set(defaults)
    if unknown:
        raise ValueError(f"bootstrap: unknown settings {sorted(unknown)}")
    templates = [cfg["template"]] if isinstance(cfg["template"], str) else list(cfg["template"])
    if not templates or any(t not in TEMPLATES for t in templates):
        raise ValueError(f"bootstrap.template={cfg['template']!r}: use some of {list(TEMPLATES)}")
    seed_everything(seed)
    device = pick_device(str(device))
    out = Path(out)
    started = time.time()

    clips = load_clips(source, cfg["image_size"], metadata=metadata)
    order = np.random.default_rng(seed).permutation(len(clips))
    n_hold = min(int(cfg["holdout"]), len(clips) // 5)
    held = [clips[i] for i in order[:n_hold]]
    train = [clips[i] for i in order[n_hold:]]

    corpus = world_texts() + list(cfg["prompts"])
    corpus += list(cfg["sound_prompts"])
    corpus += [c["visual"] for c in clips] + [c["sound"] for c in clips if c["sound"]]
    tokenizer = build_tokenizer(corpus, vocab_size=int(cfg["vocab_size"]))
    config = llava_config(tokenizer, max_positions=512, **llava_sizes(cfg))
    n_image_tokens = (cfg["image_size"] // cfg["patch_size"]) ** 2
    seqs = Sequences(tokenizer, templates, list(cfg["prompts"]), n_image_tokens)
    sound_seqs = Sequences(tokenizer, templates, list(cfg["sound_prompts"]), n_image_tokens)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        "captioner: %d parameters, vocabulary %d, %d train / %d held-out clips",
        n_params,
        len(tokenizer),
        len(train),
        len(held),
    )

    batch_size = int(cfg["batch_size"])
    steps_per_epoch = max(1, len(train) // batch_size)
    total = steps_per_epoch * int(cfg["epochs"])
    optimizer = make_optimizer(model, cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    loop = TrainLoop(
        f"{out}.ckpt",
        {"model": model, "optimizer": optimizer},
        settings={"bootstrap": cfg, "seed": seed, "clips": len(clips)},
        checkpoint_every=steps_per_epoch,  # at each epoch's end
    )
    if loop.resume():  # a checkpoint before issue 16 holds its curve's rows as lists
        loop.curve = [r if isinstance(r, dict) else dict(zip(CURVE, r)) for r in loop.curve]

    def step(index: int) -> dict:
        epoch, i = divmod(index, steps_per_epoch)
        # Epoch-seeded order, so a resumed run sees exactly the batches it would have seen.
        perm = np.random.default_rng([seed, epoch]).permutation(len(train))
        batch = [train[j] for j in perm[i * batch_size : (i + 1) * batch_size]]
        step_rng = np.random.default_rng([seed, epoch, i])
        frames = torch.stack([c["frames"][step_rng.integers(len(c["frames"]))] for c in batch])
        asks_sound = [
            c["sound"] is not None and step_rng.random() < cfg["sound_fraction"] for c in batch
        ]
        pairs = [
            sound_seqs.visual(int(step_rng.integers(len(sound_seqs.prompts))), c["sound"])
            if sound
            else seqs.visual(int(step_rng.integers(len(seqs.prompts))), c["visual"])
            for c, sound in zip(batch, asks_sound)
        ]
        ids, mask, labels = seqs.batch(pairs)
        logits = model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            pixel_values=normalise(frames).to(device),
        ).logits
        is_sound = torch.tensor(asks_sound, device=device)
        labels = labels.to(device)
        loss = lm_loss(logits, labels)
        with torch.no_grad():  # the two tasks' losses, for the curve
            visual_loss, sound_loss = (
                lm_loss(logits[rows], labels[rows]) if rows.any() else torch.zeros(())
                for rows in (~is_sound, is_sound)
            )
        for group in optimizer.param_groups:
            group["lr"] = group["lr_mult"] * lr_at(index, total, cfg["lr"], cfg["warmup_fraction"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        return {"epoch": epoch + 1, "visual_loss": visual_loss, "sound_loss": sound_loss}

    model.train()
    curve = loop.fit(step, total, optimizer=optimizer, desc="bootstrap")

    model.eval()
    exact, examples = 0, []
    for start in range(0, len(held), 64):
        chunk = held[start : start + 64]
        frames = torch.stack([c["frames"][len(c["frames"]) // 2] for c in chunk])
        for clip, caption in zip(chunk, caption_frames(model, tokenizer, seqs, frames, device)):
            exact += caption == clip["visual"]
            if len(examples) < 10:
                examples.append(
                    {"clip_id": clip["clip_id"], "reference": clip["visual"], "caption": caption}
                )
    summary = {
        "parameters": n_params,
        "vocabulary": len(tokenizer),
        "train_clips": len(train),
        "heldout_clips": len(held),
        "heldout_exact": exact / len(held) if held else None,
        "final_visual_loss": curve[-1]["visual_loss"] if curve else None,
        "final_sound_loss": curve[-1]["sound_loss"] if curve else None,
        "steps": total,
        "seconds": round(time.time() - started, 1),
        "settings": cfg,
        "examples": examples,
    }
    log.info(
        "held-out exact visual captions: %s; %s s", summary["heldout_exact"], summary["seconds"]
    )

    model.generation_config.pad_token_id = tokenizer.pad_token_id
    with atomic_path(out, directory=True) as tmp:
        model.save_pretrained(tmp)
        llava_processor(tokenizer, cfg["image_size"], cfg["patch_size"]).save_pretrained(tmp)
        (tmp / "bootstrap_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        write_curve(tmp / "curve.csv", curve, CURVE)
    loop.checkpoint.remove()
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("bootstrap", __doc__.split("\n")[0], "seed, device, section bootstrap")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--shards", help="the align split's shard directory")
    source.add_argument("--extract", nargs="+", help="extract part directories (with --metadata)")
    parser.add_argument("--metadata", help="the gathered acquire/metadata.jsonl (with --extract)")
    parser.add_argument("--out", required=True, help="directory for the save_pretrained captioner")
    args, params = read_stage(parser, argv)
    if args.extract and not args.metadata:
        parser.error("--extract needs --metadata")
    bootstrap(
        params["bootstrap"],
        args.shards or args.extract,
        args.out,
        metadata=args.metadata if args.extract else None,
        seed=int(params["seed"]),
        device=params["device"],
    )
    return 0
