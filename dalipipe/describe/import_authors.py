"""`dalipipe import-authors`: the authors' released DALI model as a trained-captioner folder.

    dalipipe import-authors --backbone audio_backbone.pth --mlp prefixMLP.bin \
        --base llava-hf/llava-1.5-7b-hf --revision <commit> --out models/authors-ot-att
    dalipipe caption clip.mp4 --model models/authors-ot-att

Their files are read and mapped to dalipipe's names by dalipipe.models.authors, which describes
both (docs/authors-implementation.md §2, §8, §9). The folder is laid out as `dalipipe export`
lays one (weights, captioner.json, a model card), so the authors' release and a trained run are
shared and loaded the same way. captioner.json records the options their evaluation ran with
(`AUTHORS_OPTIONS`), and its metadata gives `dalipipe caption` the CAV-MAE filterbank (128 mel
bins x 1024 frames, AudioSet's statistics), the files' checksums and the decoding their
evaluation used (sampled at temperature 0.2). When the import stops, nothing is written.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from pathlib import Path

import torch

from dalipipe.common import atomic_path, setup_logging
from dalipipe.describe.decoding import AUTHORS_DECODING
from dalipipe.describe.export import write_card
from dalipipe.models.artifacts import write_config
from dalipipe.models.authors import (
    AUDIOSET_FBANK,
    AUTHORS_OPTIONS,
    ZENODO_RECORD,
    backbone_state,
    base_widths,
    prefix_state,
    projector_state,
    read_weights,
)
from dalipipe.models.captioner import CaptionerOptions
from dalipipe.models.cavmae import CONFIG_FILE, WEIGHTS_FILE, AudioEncoderConfig

log = logging.getLogger(__name__)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """safetensors straight from the (memory-mapped) tensors, without `save_state`'s copy of all
    of them; only a tensor whose storage another one shares is copied (safetensors refuses it)."""
    from safetensors.torch import save_file

    seen, out = set(), {}
    for key, tensor in tensors.items():
        storage = tensor.untyped_storage().data_ptr()
        out[key] = tensor.contiguous().clone() if storage in seen else tensor.contiguous()
        seen.add(storage)
    save_file(out, str(path))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def import_authors(
    backbone: str | Path,
    mlp: str | Path,
    base: str | Path,
    out: str | Path,
    *,
    prefix: str | Path | None = None,
    revision: str | None = None,
    encoder_config: AudioEncoderConfig | dict | None = None,
) -> dict:
    """Write a trained-captioner directory (DEVELOPING.md) from the authors' files.

    `encoder_config`: the CAV-MAE sizes the backbone must have (default: the paper's, 128 x 1024
    fbank, 768 wide, 11 + 1 blocks, 1024 out). Returns the provenance recorded in captioner.json.
    """
    out = Path(out)
    if not isinstance(encoder_config, AudioEncoderConfig):
        encoder_config = AudioEncoderConfig.from_dict(encoder_config or {})
    vision, text = base_widths(base, revision)
    if encoder_config.out_dim != vision:
        raise ValueError(
            f"the audio encoder's out_dim {encoder_config.out_dim} does not fit --base {base}, "
            f"whose image tokens are {vision} wide"
        )
    encoder = backbone_state(backbone, read_weights(backbone, "--backbone"), encoder_config)
    projector = projector_state(mlp, read_weights(mlp, "--mlp"), vision, text)
    prefix_tensor = None
    if prefix is not None:
        prefix_tensor = prefix_state(prefix, read_weights(prefix, "--prefix"), text)
    CaptionerOptions.from_dict(AUTHORS_OPTIONS)  # the options are valid for this dalipipe

    files = {"backbone": Path(backbone), "mlp": Path(mlp)}
    if prefix is not None:
        files["prefix"] = Path(prefix)
    imported = {
        "source": f"the authors' released DALI weights ({ZENODO_RECORD})",
        "files": {k: {"name": p.name, "sha256": sha256(p)} for k, p in files.items()},
    }
    features = {
        "fbank": {
            "num_mel_bins": encoder_config.num_mel_bins,
            "target_length": encoder_config.target_length,
            **AUDIOSET_FBANK,
        },
        "frame_short_side": 224,  # the frames these weights saw: 224-px centre crops
        "frame_crop": True,
        "window_seconds": 10.0,
    }
    recorded_base = str(base)
    if Path(base).is_dir():  # a local model: relative to the output, as stage distill records it
        out.parent.mkdir(parents=True, exist_ok=True)
        recorded_base = os.path.relpath(Path(base).resolve(), out.resolve())
    info = {
        "base": recorded_base,
        "revision": revision,
        "options": CaptionerOptions.from_dict(AUTHORS_OPTIONS).to_dict(),
        # their evaluation samples at temperature 0.2 (top-k 50): `dalipipe caption` does too
        "metadata": {"features": features, "imported": imported, "decoding": AUTHORS_DECODING},
    }
    with atomic_path(out, directory=True) as tmp:
        write_config(tmp / "captioner.json", info)
        save_tensors(tmp / WEIGHTS_FILE, encoder)
        write_config(tmp / CONFIG_FILE, encoder_config.to_dict())
        save_tensors(tmp / "audio_projector.safetensors", projector)
        if prefix_tensor is not None:
            save_tensors(tmp / "prefix.safetensors", {"prefix": prefix_tensor})
        # the layout `dalipipe export` writes: shared and loaded as a trained run is
        write_card(tmp, info, name=out.name, license="other")
    log.info("wrote %s from %s", out, ", ".join(str(p) for p in files.values()))
    return info


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="dalipipe import-authors",
        description="the authors' released DALI weights as a dalipipe trained-captioner directory",
    )
    parser.add_argument("--backbone", required=True, help="audio_backbone.pth (aligned CAV-MAE)")
    parser.add_argument("--mlp", required=True, help="prefixMLP.bin (the distilled projector)")
    parser.add_argument("--prefix", help="prefix.bin (model.audio_tower.prefix), if released")
    parser.add_argument(
        "--base", required=True, help="LLaVA-1.5 in transformers' format: hub id or folder"
    )
    parser.add_argument("--revision", help="hub commit of --base (pin it for offline nodes)")
    parser.add_argument(
        "--encoder-config",
        help="JSON object of audio encoder sizes when not the paper's CAV-MAE (tests)",
    )
    parser.add_argument("--out", required=True, help="the trained-captioner directory to write")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        sizes = json.loads(args.encoder_config) if args.encoder_config else None
        import_authors(
            args.backbone,
            args.mlp,
            args.base,
            args.out,
            prefix=args.prefix,
            revision=args.revision,
            encoder_config=sizes,
        )
    except (OSError, ValueError) as err:
        print(f"dalipipe import-authors: error: {err}", file=sys.stderr)
        return 2
    return 0
