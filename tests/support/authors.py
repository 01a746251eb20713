"""The authors' released DALI files, written with their key names at any size
(tests/test_import_authors.py describes them); every tensor is drawn from a generator seeded by its
own key, so a test can draw it again to compare."""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import torch


def drawn(key: str, shape, dtype=torch.float32) -> torch.Tensor:
    """Normal values; a matrix or a convolution kernel scaled by 1/sqrt(fan-in), as trained
    weights roughly are, so the activations of a forward pass stay in a readable range."""
    generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    values = torch.randn(shape, generator=generator)
    if len(shape) in (2, 4):
        values /= math.prod(shape[1:]) ** 0.5
    return values.to(dtype)


def backbone_shapes(mel, frames, patch, width, depth, out) -> dict[str, tuple]:
    """Keys and shapes of `audio_backbone.pth` (CAVMAE with its visual branch, decoder heads,
    OT-Att scorers and CLIP tower, `blocks_v` and `decoder_blocks` set to None before saving)."""
    shapes = {
        "patch_embed_a.proj.weight": (width, 1, patch, patch),
        "patch_embed_a.proj.bias": (width,),
        "pos_embed_a": (1, (mel // patch) * (frames // patch), width),
        "modality_a": (1, 1, width),
    }
    for branch, count in (("blocks_a", depth), ("blocks_u", 1)):
        for i in range(count):
            block = f"{branch}.{i}."
            for norm in ("norm1", "norm1_a", "norm1_v", "norm2", "norm2_a", "norm2_v"):
                shapes[block + norm + ".weight"] = shapes[block + norm + ".bias"] = (width,)
            shapes[block + "attn.qkv.weight"] = (3 * width, width)
            shapes[block + "attn.qkv.bias"] = (3 * width,)
            shapes[block + "attn.proj.weight"] = (width, width)
            shapes[block + "attn.proj.bias"] = (width,)
            shapes[block + "mlp.fc1.weight"] = (4 * width, width)
            shapes[block + "mlp.fc1.bias"] = (4 * width,)
            shapes[block + "mlp.fc2.weight"] = (width, 4 * width)
            shapes[block + "mlp.fc2.bias"] = (width,)
    for norm in ("norm_a", "norm_v", "norm"):
        shapes[norm + ".weight"] = shapes[norm + ".bias"] = (width,)
    shapes["proj.weight"], shapes["proj.bias"] = (out, width), (out,)
    # a sample of what the import leaves out
    shapes.update(
        {
            "patch_embed_v.proj.weight": (width, 3, patch, patch),
            "pos_embed_v": (1, 196, width),
            "modality_v": (1, 1, width),
            "decoder_embed.weight": (512, width),
            "mask_token": (1, 1, 512),
            "audio_scorer.in_proj_weight": (3 * out, out),
            "a_k.weight": (out, out),
            "vision_tower.vision_model.post_layernorm.weight": (out,),
        }
    )
    return {f"module.{k}": v for k, v in shapes.items()}


def mlp_shapes(vision: int, text: int) -> dict[str, tuple]:
    return {
        "model.mm_projector.0.weight": (text, vision),
        "model.mm_projector.0.bias": (text,),
        "model.mm_projector.2.weight": (text, text),
        "model.mm_projector.2.bias": (text,),
    }


def write_authors_files(directory: Path, sizes: dict, lm_width: int, *, n_prefix: int = 16):
    """audio_backbone.pth (float32), prefixMLP.bin and prefix.bin (bfloat16, as LLaVA ran)."""
    directory.mkdir(parents=True, exist_ok=True)
    backbone = {k: drawn(k, s) for k, s in backbone_shapes(**sizes).items()}
    torch.save(backbone, directory / "audio_backbone.pth")
    del backbone
    mlp = {k: drawn(k, s, torch.bfloat16) for k, s in mlp_shapes(sizes["out"], lm_width).items()}
    torch.save(mlp, directory / "prefixMLP.bin")
    prefix = {"model.audio_tower.prefix": drawn("prefix", (n_prefix, lm_width), torch.bfloat16)}
    torch.save(prefix, directory / "prefix.bin")
    return directory
