"""Tiny checkpoints of the real model classes, for tests, benchmarks and the rehearsal.

    dalipipe make-tiny --out DIR
    # DIR/llava  DIR/llava-336  DIR/blip2  DIR/gpt2  DIR/cavmae/cav-mae-tiny.pth (+ .json)

Each model is built from its `transformers` config class with random weights (seeded) and
written with `save_pretrained`, so it loads through the same `from_pretrained` path as a real
checkpoint (offline). `llava-336` keeps LLaVA-1.5's image geometry (336 px, patch 14, 576
tokens) with tiny widths. Functions `make_tiny_*` take sizes so tests can build other shapes;
the LLaVA config and processor come from dalipipe/models/llava_config.py, which the
miniature's bootstrap captioner is built from too.

    dalipipe make-tiny --paper-widths --out DIR [--hub-cache CACHE [--config configs/paper.yaml]]
    # DIR/cavmae/cav-mae-paper-width.pth (+ .json); LLaVA, BLIP-2, GPT-2 in CACHE (else in DIR)

`--paper-widths` builds the models of configs/paper.yaml at their real widths with one or two
layers (PAPER_DEPTHS), for the rehearsal (configs/rehearsal.yaml, tests/test_rehearsal.py);
`--hub-cache` lays them out as `hf download --revision <commit>` does, under the config's hub ids
and pinned commits, so the paper config loads them with HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterable
from pathlib import Path

import torch

from dalipipe.common import setup_logging
from dalipipe.models.llava_config import CLIP_MEAN, CLIP_STD, llava_config, llava_processor
from dalipipe.models.tokenizer import build_tokenizer

log = logging.getLogger(__name__)


def make_tiny_llava(
    out: str | Path,
    *,
    corpus: Iterable[str] = (),
    vocab_size: int = 600,
    seed: int = 0,
    **sizes,
) -> Path:
    """A LlavaForConditionalGeneration (CLIP vision + Llama LM) with its processor."""
    from transformers import LlavaForConditionalGeneration

    out = Path(out)
    tokenizer = build_tokenizer(corpus, vocab_size=vocab_size)
    config = llava_config(tokenizer, **sizes)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    llava_processor(
        tokenizer, config.vision_config.image_size, config.vision_config.patch_size
    ).save_pretrained(out)
    return out


def make_tiny_llava_336(out: str | Path, **kwargs) -> Path:
    """LLaVA-1.5's image geometry (336 px, patch 14 -> 576 tokens) with tiny widths."""
    kwargs.setdefault("image_size", 336)
    kwargs.setdefault("patch_size", 14)
    kwargs.setdefault("vision_layers", 2)
    return make_tiny_llava(out, **kwargs)


def blip2_with_processor(
    corpus: Iterable[str],
    *,
    vocab_size: int,
    image_size: int,
    patch_size: int,
    num_query_tokens: int,
    vision: dict,
    qformer: dict,
    text: dict,
):
    """A Blip2ForConditionalGeneration (OPT LM, random weights) and its Blip2Processor, the
    tokenizer trained on `corpus`; `vision`, `qformer`, `text` are their configs' sizes (a
    size "tokenizer" is the processor's tokenizer length)."""
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        BlipImageProcessor,
        OPTConfig,
    )

    # The processor adds the <image> token itself (it crashes if the tokenizer defines one).
    tokenizer = build_tokenizer(corpus, vocab_size=vocab_size, image_token=False)
    images = BlipImageProcessor(
        size={"height": image_size, "width": image_size}, image_mean=CLIP_MEAN, image_std=CLIP_STD
    )
    processor = Blip2Processor(
        image_processor=images, tokenizer=tokenizer, num_query_tokens=num_query_tokens
    )
    tokenizer = processor.tokenizer

    def sized(sizes: dict) -> dict:  # "tokenizer": as many rows as the processor's tokenizer
        return {k: len(tokenizer) if v == "tokenizer" else v for k, v in sizes.items()}

    config = Blip2Config(
        vision_config=Blip2VisionConfig(image_size=image_size, patch_size=patch_size, **vision),
        qformer_config=Blip2QFormerConfig(**sized(qformer)),
        text_config=OPTConfig(
            **sized(text),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        num_query_tokens=num_query_tokens,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    model = Blip2ForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, processor


def make_tiny_blip2(
    out: str | Path,
    *,
    corpus: Iterable[str] = (),
    image_size: int = 32,
    patch_size: int = 8,
    hidden: int = 32,
    num_query_tokens: int = 4,
    seed: int = 0,
) -> Path:
    """Blip2ForConditionalGeneration with an OPT LM, and a Blip2Processor."""
    out = Path(out)
    torch.manual_seed(seed)
    layers = dict(num_hidden_layers=2, num_attention_heads=2, intermediate_size=4 * hidden)
    vocab = "tokenizer"
    model, processor = blip2_with_processor(
        corpus,
        vocab_size=600,
        image_size=image_size,
        patch_size=patch_size,
        num_query_tokens=num_query_tokens,
        vision=dict(hidden_size=hidden, **layers),
        qformer=dict(vocab_size=vocab, hidden_size=hidden, encoder_hidden_size=hidden, **layers),
        text=dict(
            vocab_size=vocab,
            hidden_size=hidden,
            num_hidden_layers=2,
            num_attention_heads=2,
            ffn_dim=4 * hidden,
            word_embed_proj_dim=hidden,
            max_position_embeddings=256,
        ),
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def make_tiny_gpt2(
    out: str | Path,
    *,
    corpus: Iterable[str] = (),
    hidden: int = 32,
    layers: int = 2,
    heads: int = 2,
    positions: int = 256,
    vocab_size: int = 600,
    rows: int | None = None,
    seed: int = 0,
) -> Path:
    """GPT2LMHeadModel with a byte-level BPE tokenizer (GPT-2's own scheme) of `vocab_size`
    tokens at most; `rows` embedding rows (None: as many as the tokenizer has)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    out = Path(out)
    tokenizer = build_tokenizer(corpus, vocab_size=vocab_size, image_token=False, add_bos=False)
    config = GPT2Config(
        vocab_size=rows or len(tokenizer),
        n_positions=positions,
        n_embd=hidden,
        n_layer=layers,
        n_head=heads,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def make_tiny_cavmae(out: str | Path, *, seed: int = 0, **sizes) -> Path:
    """A CAV-MAE-style `.pth` (official key names, `module.` prefix, no `proj`) + its sizes.

    Writes `out` (the .pth) and `out` with suffix .json (the AudioEncoderConfig to build).
    """
    from dalipipe.models.cavmae import AudioEncoderConfig, CavMaeAudioEncoder

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    defaults = dict(
        num_mel_bins=32, target_length=64, patch_size=16, embed_dim=32, depth=2, num_heads=2
    )
    config = AudioEncoderConfig(**{**defaults, **sizes})
    torch.manual_seed(seed)
    state = CavMaeAudioEncoder(config).state_dict()
    official = {f"module.{k}": v for k, v in state.items() if not k.startswith("proj.")}
    # Keys of the visual branch that real files carry and the audio encoder must skip.
    official["module.modality_v"] = torch.zeros(1, 1, config.embed_dim)
    official["module.norm_v.weight"] = torch.ones(config.embed_dim)
    torch.save(official, out)
    out.with_suffix(".json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    return out


def make_all(out: str | Path) -> dict[str, Path]:
    """Everything `dalipipe make-tiny` writes; the audio encoder's out_dim fits tiny LLaVA."""
    out = Path(out)
    paths = {
        "llava": make_tiny_llava(out / "llava"),
        "llava_336": make_tiny_llava_336(out / "llava-336"),
        "blip2": make_tiny_blip2(out / "blip2"),
        "gpt2": make_tiny_gpt2(out / "gpt2"),
        "cavmae": make_tiny_cavmae(out / "cavmae" / "cav-mae-tiny.pth", out_dim=32),
    }
    return paths


# --- the paper's widths, shallow (configs/rehearsal.yaml) -------------------------------------

# Where configs/paper.yaml names each hub model and its pinned commit.
PAPER_HUB_KEYS = {
    "llava": ("models.captioner", "models.captioner_revision"),
    "blip2": ("filter.captioner", "filter.captioner_revision"),
    "gpt2": ("filter.gpt2", "filter.gpt2_revision"),
}
# How deep each paper-width model is: depth costs time, width is what the rehearsal checks.
PAPER_DEPTHS = {
    "llama_layers": 1,  # LLaVA-1.5-7B: 32
    "clip_layers": 2,  # CLIP ViT-L/14-336: 24; LLaVA reads layer -2, so at least 2
    "blip2_vision_layers": 1,  # BLIP-2 ViT-g: 39
    "qformer_layers": 2,  # Q-Former: 12 (cross-attention every 2nd layer, so layer 0 has it)
    "opt_layers": 1,  # OPT-2.7B: 32
    "gpt2_layers": 1,  # GPT-2: 12
    "cavmae_depth": 1,  # CAV-MAE audio blocks: 11 (+ the shared block, kept)
}


def paper_width_corpus(n_words: int = 150_000, seed: int = 0) -> list[str]:
    """Made-up words enough for a byte-level BPE of 50k tokens (a real tokenizer's size).

    A random LM samples its whole vocabulary; with a small tokenizer most ids would decode to
    nothing and every caption would come out empty, which a real checkpoint never does.
    """
    import random

    rng = random.Random(seed)
    onsets, vowels, codas = "bcdfghjklmnprstvwz", "aeiou", ["", "n", "r", "s", "t", "l", "m"]
    syllables = [o + v + c for o in onsets for v in vowels for c in codas]
    words: set[str] = set()
    while len(words) < n_words:
        words.add("".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))))
    ordered = sorted(words)
    return [" ".join(ordered[i : i + 50]) for i in range(0, len(ordered), 50)]


def _save(model, out: Path, dtype: torch.dtype) -> None:
    model.to(dtype).save_pretrained(out)


def make_paper_width_llava(
    out: str | Path, *, corpus: list[str], layers: int = 1, clip_layers: int = 2, seed: int = 0
) -> Path:
    """LLaVA-1.5-7B's widths: LLaMA 4096 wide, 32 heads, MLP 11008, 32064 vocabulary rows (a
    32002-token tokenizer, as the hub's); CLIP ViT-L/14-336 1024 wide, 16 heads, MLP 4096, 576
    image tokens; saved in float16 as on the hub."""
    from transformers import LlavaForConditionalGeneration

    out = Path(out)
    tokenizer = build_tokenizer(corpus, vocab_size=32002)
    config = llava_config(
        tokenizer,
        image_size=336,
        patch_size=14,
        vision_hidden=1024,
        vision_layers=clip_layers,
        vision_heads=16,
        text_hidden=4096,
        text_layers=layers,
        text_heads=32,
        max_positions=4096,
        vocab_size=32064,
        text_intermediate=11008,
    )
    config.vision_config.projection_dim = 768
    config.text_config.rms_norm_eps = 1e-5
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    _save(model, out, torch.float16)
    del model
    llava_processor(tokenizer, 336, 14).save_pretrained(out)
    return out


def make_paper_width_blip2(
    out: str | Path,
    *,
    corpus: list[str],
    vision_layers: int = 1,
    qformer_layers: int = 2,
    opt_layers: int = 1,
    seed: int = 0,
) -> Path:
    """BLIP-2 OPT-2.7B's widths: ViT-g 1408 wide (16 heads, MLP 6144) at 224 px, patch 14; a
    Q-Former 768 wide with 32 queries; OPT 2560 wide, 32 heads, FFN 10240, 50272 vocabulary
    rows (a 50265-token tokenizer plus the processor's <image>, as the hub's); float16."""
    out = Path(out)
    torch.manual_seed(seed)
    model, processor = blip2_with_processor(
        corpus,
        vocab_size=50265,
        image_size=224,
        patch_size=14,
        num_query_tokens=32,
        vision=dict(
            hidden_size=1408,
            intermediate_size=6144,
            num_hidden_layers=vision_layers,
            num_attention_heads=16,
            initializer_range=0.02,  # the class default 1e-10 (for loading weights) is all zeros
        ),
        qformer=dict(
            hidden_size=768,
            num_hidden_layers=qformer_layers,
            num_attention_heads=12,
            intermediate_size=3072,
            encoder_hidden_size=1408,
            cross_attention_frequency=2,
        ),
        text=dict(
            vocab_size=50272,
            hidden_size=2560,
            num_hidden_layers=opt_layers,
            num_attention_heads=32,
            ffn_dim=10240,
            word_embed_proj_dim=2560,
            max_position_embeddings=2048,
        ),
    )
    with torch.no_grad():  # initialised to zeros, as if trained weights always followed
        model.query_tokens.normal_(std=0.02)
    _save(model, out, torch.float16)
    del model
    processor.save_pretrained(out)
    return out


def make_paper_width_gpt2(
    out: str | Path, *, corpus: list[str], layers: int = 1, seed: int = 0
) -> Path:
    """GPT-2 (small)'s widths: 768 wide, 12 heads, 1024 positions, 50257 tokens; float32."""
    return make_tiny_gpt2(
        out,
        corpus=corpus,
        hidden=768,
        layers=layers,
        heads=12,
        positions=1024,
        vocab_size=50257,
        rows=50257,
        seed=seed,
    )


def make_paper_width_models(
    out: str | Path, *, depths: dict | None = None, seed: int = 0
) -> dict[str, Path]:
    """Every model of configs/paper.yaml at its real widths and shallow depth (PAPER_DEPTHS):
    `llava`, `blip2`, `gpt2` (save_pretrained folders) and `cavmae` (an official-style .pth
    of the full-width audio branch, 1024x128 fbank -> 512 tokens of 768, out_dim 1024, with
    its AudioEncoderConfig beside it as .json)."""
    out = Path(out)
    d = {**PAPER_DEPTHS, **(depths or {})}
    corpus = paper_width_corpus(seed=seed)
    paths = {
        "llava": make_paper_width_llava(
            out / "llava", corpus=corpus, layers=d["llama_layers"], clip_layers=d["clip_layers"]
        ),
        "blip2": make_paper_width_blip2(
            out / "blip2",
            corpus=corpus,
            vision_layers=d["blip2_vision_layers"],
            qformer_layers=d["qformer_layers"],
            opt_layers=d["opt_layers"],
        ),
        "gpt2": make_paper_width_gpt2(out / "gpt2", corpus=corpus, layers=d["gpt2_layers"]),
        "cavmae": make_tiny_cavmae(
            out / "cavmae" / "cav-mae-paper-width.pth",
            seed=seed,
            num_mel_bins=128,
            target_length=1024,
            patch_size=16,
            embed_dim=768,
            depth=d["cavmae_depth"],
            shared_depth=1,
            num_heads=12,
            out_dim=1024,
        ),
    }
    return paths


def place_in_hub_cache(model_dir: str | Path, cache: str | Path, repo_id: str, commit: str) -> Path:
    """Move a save_pretrained folder into a Hugging Face cache as `hf download <repo_id>
    --revision <commit>` leaves it: blobs named by their SHA-256, `snapshots/<commit>/` of
    relative symlinks, no `refs/` (a commit is not a ref). Loads offline with that revision."""
    import hashlib
    import os
    import shutil

    model_dir, cache = Path(model_dir), Path(cache)
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
        blob = repo / "blobs" / digest.hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(path, blob)
        link = snapshot / path.relative_to(model_dir)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    shutil.rmtree(model_dir)
    return repo


def place_paper_models(paths: dict[str, Path], cache: str | Path, config: dict) -> dict[str, str]:
    """Put the `llava`, `blip2` and `gpt2` folders where `config` (configs/paper.yaml) looks for
    them: its hub ids at its pinned commits, in `cache` (HF_HUB_CACHE). Returns {key: id}."""
    placed = {}
    for key, (id_key, revision_key) in PAPER_HUB_KEYS.items():
        repo_id, commit = _config_value(config, id_key), _config_value(config, revision_key)
        if not repo_id or not commit:
            raise ValueError(f"{id_key} and {revision_key}: a hub id and a pinned commit needed")
        place_in_hub_cache(paths[key], cache, repo_id, commit)
        placed[key] = repo_id
    return placed


def _config_value(config: dict, key: str):
    node = config
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dalipipe make-tiny", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory to write the tiny models into")
    parser.add_argument(
        "--paper-widths",
        action="store_true",
        help="the paper's models at their real widths, shallow (configs/rehearsal.yaml)",
    )
    parser.add_argument(
        "--hub-cache",
        help="with --paper-widths: move LLaVA, BLIP-2 and GPT-2 into this Hugging Face cache "
        "under the hub ids and pinned commits of --config (use it as HF_HUB_CACHE)",
    )
    parser.add_argument(
        "--config", default="configs/paper.yaml", help="where --hub-cache reads ids and commits"
    )
    args = parser.parse_args(argv)
    setup_logging()
    if args.hub_cache and not args.paper_widths:
        parser.error("--hub-cache needs --paper-widths")
    if not args.paper_widths:
        for name, path in make_all(args.out).items():
            log.info("wrote %s: %s", name, path)
        return 0
    import yaml

    paths = make_paper_width_models(args.out)
    for name, path in paths.items():
        log.info("wrote %s: %s", name, path)
    if args.hub_cache:
        try:  # the config as a run sees it: config.yaml, then --config, then the defaults
            from dalipipe.config import load_config

            config = load_config(args.config)
        except ImportError:
            with open(args.config) as f:
                config = yaml.safe_load(f)
        for name, repo_id in place_paper_models(paths, args.hub_cache, config).items():
            log.info("placed %s in %s as %s", name, args.hub_cache, repo_id)
    return 0
