"""The components of a stage's peak GPU memory, and how each is sized.

    parts = llava_training(arch, dtype=torch.bfloat16, micro_batch=40, layout=layout, ...)
    Estimate("distill", 40, layout.total, parts, training_phases(...)).peak

Components (bytes; ``SOURCES`` says which are measured and which computed):
- weights: every frozen parameter the stage loads, in its dtype (bf16 on a GPU,
  ``default_dtype``; align: ``align.precision``), plus autocast's bf16 copies
  of float32 trainable weights;
- optimizer_state: trainable parameters in float32 and Adam's two moments (12 bytes each);
- gradients: 4 bytes per trainable parameter;
- activations: what autograd keeps for backward, measured per position and layer
  (``measure.decoder_layer``) and scaled by layers x micro-batch x positions; with activation
  checkpointing only each layer's input (hidden x dtype bytes) is kept;
- logits: training: 12 bytes per scored position and vocabulary entry, the peak around
  ``caption_loss``'s cross-entropy (model-dtype logits, their shifted copy, the float32 copy,
  float32 log-softmax; backward: log-softmax output, its gradient and the input gradient); the
  LM head sees only the caption's positions and the one before them (``scored_tail``);
  generation: the last position only (LLaVA) or every prompt position too (BLIP-2);
- workspace: training: one layer's backward (with checkpointing: its recompute and backward),
  measured; generation: one layer's forward over the prompt (the prefill), measured;
- kv_cache: layers x 2 x kv heads x head dim x positions x batch x dtype bytes;
- vision: the vision tower's hidden states while the image tokens are made, under no_grad,
  before the language model runs (LLaVA's CLIP: every layer's, ``output_hidden_states``);
- align only: targets (the image tokens in float32), loss (the method's peak per clip, forward
  and backward, measured).
A stage's peak is its largest phase, each phase a sum of the components alive together.
Not modelled: the CUDA context (~0.5 GB per process), the caching allocator's fragmentation,
kernels' scratch space, the KV cache's growth copies and the audio encoder's no-grad forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dalipipe.memory import measure
from dalipipe.memory.architectures import Arch
from dalipipe.memory.sequences import Layout, image_tokens

GPU_DTYPE = torch.bfloat16  # default_dtype (dalipipe.training) on a GPU
ADAM_STATE = 12  # float32 master weight + exp_avg + exp_avg_sq
LOSS_LOGIT_BYTES = 12  # per scored position x vocabulary entry around caption_loss's cross-entropy
SAMPLE_LOGIT_BYTES = 18  # per vocabulary entry of the last position: bf16, float32 copy,
# temperature and top-k outputs, probabilities

SOURCES = {
    "weights": "computed: parameters (meta-device build) x dtype bytes",
    "optimizer_state": "computed: 12 bytes per trainable parameter (fp32 + Adam moments)",
    "gradients": "computed: 4 bytes per trainable parameter",
    "activations": "measured per position and layer (saved tensors), scaled",
    "logits": "computed: scored positions x vocabulary x bytes per entry",
    "workspace": "measured per position (one layer's transient peak), scaled",
    "kv_cache": "computed: layers x 2 x kv heads x head dim x positions x batch x bytes",
    "vision": "computed: vision tower hidden states x batch x tokens x width x bytes",
    "targets": "computed: image tokens in float32 x batch",
    "loss": "measured per clip (the objective's peak, forward and backward), scaled",
    "text_encoder": "computed: text encoder parameters x 4 bytes (after the captioner is freed)",
}


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


@dataclass
class Estimate:
    stage: str
    micro_batch: int
    positions: int
    components: dict[str, float]
    phases: dict[str, tuple[str, ...]]
    settings: dict = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self._phase)

    @property
    def peak(self) -> float:
        return self._phase(self.peak_phase)

    def _phase(self, name: str) -> float:
        return sum(self.components[c] for c in self.phases[name])


def size_text(nbytes: float) -> str:
    return f"{nbytes / 1e6:.1f} MB" if nbytes >= 1e6 else f"{nbytes / 1e3:.1f} kB"


def layer_note(arch: Arch, dtype: torch.dtype, *, training: bool) -> str:
    """What was measured for the stage, per position of one sample."""
    text = arch.text_config
    layer = measure.decoder_layer(text, dtype)
    name = f"{text.model_type} layer {text.hidden_size} wide, {str(dtype).split('.')[-1]}"
    if not training:
        return f"{name}: prefill peak {size_text(layer.forward)}/position"
    return (
        f"{name}: saves {size_text(layer.saved)}/position, backward peak {size_text(layer.backward)}, "
        f"checkpointed recompute+backward {size_text(layer.recompute)}"
    )


def training_phases(*persistent: str) -> dict[str, tuple[str, ...]]:
    return {
        "loss": (*persistent, "logits"),
        "backward": (*persistent, "workspace"),
    }


def llava_training(
    arch: Arch,
    *,
    dtype: torch.dtype,
    micro_batch: int,
    layout: Layout,
    checkpointing: bool,
    trainable: int,
    frozen_extra: int = 0,
    input_side: float = 0.0,
    autocast_copies: int = 0,
) -> dict[str, float]:
    """Components of one training step of a frozen LLaVA-class captioner whose gradient flows
    back to its input (a prefix, or a projector whose per-sample saved bytes are
    ``input_side``); ``trainable`` float32 parameters train with AdamW."""
    text = arch.text_config
    layer = measure.decoder_layer(text, dtype)
    b, n = micro_batch, layout.total
    kept = text.hidden_size * dtype_bytes(dtype) if checkpointing else layer.saved
    workspace = layer.recompute if checkpointing else layer.backward
    params = arch.params()
    return {
        "weights": (params["total"] + frozen_extra) * dtype_bytes(dtype) + autocast_copies,
        "optimizer_state": trainable * ADAM_STATE,
        "gradients": trainable * 4,
        "activations": b * n * (text.num_hidden_layers * kept + layer.shared + layer.head)
        + b * input_side,
        "logits": b * (layout.caption + 1) * text.vocab_size * LOSS_LOGIT_BYTES,
        "workspace": b * n * workspace,
    }


def generation(
    arch: Arch, *, dtype: torch.dtype, batch: int, layout: Layout, frozen_extra: int = 0
) -> dict[str, float]:
    """Components of ``generate`` over a batch of prompts (LLaVA or BLIP-2)."""
    text = arch.text_config
    layer = measure.decoder_layer(text, dtype)
    size = dtype_bytes(dtype)
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    positions = layout.prompt + layout.new
    logits = batch * text.vocab_size * SAMPLE_LOGIT_BYTES
    if not arch.supports_logits_to_keep():
        logits += batch * layout.prompt * text.vocab_size * size
    vision = arch.config.vision_config
    if arch.kind == "llava":  # image_tokens / get_image_features: output_hidden_states=True
        states = vision.num_hidden_layers + 1
    else:
        states = 1
    return {
        "weights": (arch.params()["total"] + frozen_extra) * size,
        "kv_cache": text.num_hidden_layers * 2 * kv_heads * head_dim * positions * batch * size,
        "workspace": batch * layout.prompt * layer.forward,
        "logits": logits,
        "vision": states * batch * (image_tokens(vision) + 1) * vision.hidden_size * size
        if layout.image
        else 0.0,
    }


GENERATION_PHASES = {
    "vision": ("weights", "vision"),
    "decode": ("weights", "kv_cache", "workspace", "logits"),
}


def gib(nbytes: float) -> float:
    return nbytes / 2**30
