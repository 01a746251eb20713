"""Put a DALI captioner together from the stages' outputs: base captioner + aligned encoder + prefix.

    captioner = assemble("models/llava", encoder_dir="align/ot_att", prefix_dir="prefix", device=dev)

Both pseudolabel and distill start from this; `dalipipe caption` and evaluation load the finished
directory that distill writes instead (`AudioCaptioner.from_dir`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from dalipipe.caption.schedule import default_dtype


def base_settings(params: dict) -> dict:
    """Revision and captioner options (prompt, template, prefix position) from config `models`,
    when the run sets them; the captioner's defaults follow the authors' code otherwise."""
    models = params.get("models") or {}
    return {
        "revision": models.get("captioner_revision"),
        "options": models.get("options"),
    }


def assemble(
    captioner_path,
    *,
    encoder_dir=None,
    prefix_dir=None,
    device: torch.device,
    dtype=None,
    revision=None,
    options=None,
):
    from dalipipe.models.captioner import AudioCaptioner
    from dalipipe.models.cavmae import load_encoder

    dtype = dtype or default_dtype(device)
    encoder = load_encoder(encoder_dir, device=device, dtype=dtype) if encoder_dir else None
    captioner = AudioCaptioner.from_base(
        str(captioner_path),
        revision=revision,
        options=options,
        audio_encoder=encoder,
        dtype=dtype,
        device=device,
    )
    if prefix_dir:
        prefix_file = Path(prefix_dir) / "prefix.safetensors"
        if not prefix_file.exists():
            raise FileNotFoundError(f"prefix: {prefix_file} does not exist (run stage prefix)")
        captioner.load_prefix(prefix_file)
    return captioner
