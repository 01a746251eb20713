"""Tiny checkpoints of the real model classes, for tests and the miniature run.

    dalipipe make-tiny --out DIR
    # DIR/llava  DIR/llava-336  DIR/blip2  DIR/gpt2  DIR/cavmae/cav-mae-tiny.pth (+ .json)

Each model is built from its `transformers` config class with random weights (seeded) and
written with `save_pretrained`, so it loads through the same `from_pretrained` path as a real
checkpoint (offline). `llava-336` keeps LLaVA-1.5's image geometry (336 px, patch 14, 576
tokens) with tiny widths. Functions `make_tiny_*` take sizes so tests and the bootstrap can
build other shapes.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterable
from pathlib import Path

import torch

from dalipipe.common import setup_logging
from dalipipe.models.tokenizer import build_tokenizer

log = logging.getLogger(__name__)

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def llava_config(
    tokenizer,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    vision_heads: int = 2,
    text_hidden: int = 64,
    text_layers: int = 2,
    text_heads: int = 4,
    max_positions: int = 1024,
):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=4 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=text_hidden,
        intermediate_size=int(8 / 3 * text_hidden) // 8 * 8,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        num_key_value_heads=text_heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(tokenizer.image_token),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


def llava_processor(tokenizer, image_size: int, patch_size: int):
    from transformers import CLIPImageProcessor, LlavaProcessor

    images = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_convert_rgb=True,
    )
    # num_additional_image_tokens=1: CLIP's CLS is counted, then dropped by the "default"
    # strategy; without it the processor inserts one image token too few.
    return LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


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
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        BlipImageProcessor,
        OPTConfig,
    )

    out = Path(out)
    # The processor adds the <image> token itself (it crashes if the tokenizer defines one).
    tokenizer = build_tokenizer(corpus, vocab_size=600, image_token=False)
    images = BlipImageProcessor(
        size={"height": image_size, "width": image_size}, image_mean=CLIP_MEAN, image_std=CLIP_STD
    )
    processor = Blip2Processor(
        image_processor=images, tokenizer=tokenizer, num_query_tokens=num_query_tokens
    )
    tokenizer = processor.tokenizer
    config = Blip2Config(
        vision_config=Blip2VisionConfig(
            hidden_size=hidden,
            intermediate_size=4 * hidden,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=patch_size,
        ),
        qformer_config=Blip2QFormerConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=4 * hidden,
            encoder_hidden_size=hidden,
        ),
        text_config=OPTConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            num_hidden_layers=2,
            num_attention_heads=2,
            ffn_dim=4 * hidden,
            word_embed_proj_dim=hidden,
            max_position_embeddings=256,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        num_query_tokens=num_query_tokens,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def make_tiny_gpt2(
    out: str | Path, *, corpus: Iterable[str] = (), hidden: int = 32, layers: int = 2, seed: int = 0
) -> Path:
    """GPT2LMHeadModel with a byte-level BPE tokenizer (GPT-2's own scheme, smaller vocabulary)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    out = Path(out)
    tokenizer = build_tokenizer(corpus, vocab_size=600, image_token=False, add_bos=False)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=256,
        n_embd=hidden,
        n_layer=layers,
        n_head=2,
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dalipipe make-tiny", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory to write the tiny models into")
    args = parser.parse_args(argv)
    setup_logging()
    for name, path in make_all(args.out).items():
        log.info("wrote %s: %s", name, path)
    return 0
