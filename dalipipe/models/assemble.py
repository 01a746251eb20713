"""The one way a stage builds its captioner: base LLaVA at the configured revision and options,
plus an aligned audio encoder and a learned prefix when the stage has them.

    captioner = load_captioner("llava-hf/llava-1.5-7b-hf", params["models"], device=dev,
                               dtype=torch.bfloat16, encoder_dir="align/ot_att", prefix_dir="prefix")

`models` is config section `models`: its `captioner_revision` pins the hub commit (a cache filled
with `hf download --revision <commit>` has no `refs/main`, so a load without it fails offline)
and its `options` set prompt, templates, prefix position, shared projector and image aspect.
Every stage that starts from the base captioner (prefix, align, pseudolabel, distill, evaluate)
calls this; `dalipipe caption` and evaluation of distilled models load the finished directory
that distill writes (`AudioCaptioner.from_dir`), which records the same revision and options.
"""

from __future__ import annotations

from pathlib import Path

import torch


def load_captioner(
    captioner_path,
    models: dict | None,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    encoder_dir=None,
    prefix_dir=None,
):
    from dalipipe.models.captioner import AudioCaptioner
    from dalipipe.models.cavmae import load_encoder

    models = models or {}
    encoder = load_encoder(encoder_dir, device=device, dtype=dtype) if encoder_dir else None
    captioner = AudioCaptioner.from_base(
        str(captioner_path),
        revision=models.get("captioner_revision"),
        options=models.get("options"),
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
