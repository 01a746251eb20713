"""The sizes of the models a config names: a local or cached config.json, else a pinned table.

    arch = resolve("llava-hf/llava-1.5-7b-hf")     # Arch(config, source, ...)
    arch.params()                                  # {"total": 7.06e9, "projector": 2.1e7, ...}

Order: a directory (``AutoConfig.from_pretrained``, offline), then the Hugging Face cache
(``local_files_only``), then ``PINNED`` below: the architectures of the paper's models as their
public config.json gives them at the revisions configs/paper.yaml pins (transformers' defaults
for keys a file leaves out, written out here), written from those files without network access
to re-check them. Parameters are counted by building the model on the meta device.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_HUB = "https://huggingface.co/{id}/blob/{rev}/config.json"

# model id -> (config kwargs for transformers' config class, where each number comes from)
PINNED: dict[str, dict] = {
    # LLaVA-1.5-7B: LLaMA-7B (Vicuna-7B v1.5) + CLIP ViT-L/14-336 + a 2-layer GELU projector.
    # llava-hf/llava-1.5-7b-hf config.json @ b234b804b114d9e37bb655e11cbbb5f5e971b7a9:
    # text_config vocab_size 32064, max_position_embeddings 4096, rms_norm_eps 1e-5 (hidden 4096,
    # intermediate 11008, 32 layers, 32 heads are LlamaConfig's defaults, which it relies on);
    # vision_config hidden 1024, intermediate 4096, 24 layers, 16 heads, image 336, patch 14
    # (576 patch tokens + CLS); image_token_index 32000, vision_feature_layer -2, "default".
    "llava-hf/llava-1.5-7b-hf": {
        "model_type": "llava",
        "revision": "b234b804b114d9e37bb655e11cbbb5f5e971b7a9",
        "config": {
            "text_config": {
                "model_type": "llama",
                "hidden_size": 4096,
                "intermediate_size": 11008,
                "num_hidden_layers": 32,
                "num_attention_heads": 32,
                "num_key_value_heads": 32,
                "vocab_size": 32064,
                "max_position_embeddings": 4096,
                "rms_norm_eps": 1e-5,
                "tie_word_embeddings": False,
            },
            "vision_config": {
                "model_type": "clip_vision_model",
                "hidden_size": 1024,
                "intermediate_size": 4096,
                "num_hidden_layers": 24,
                "num_attention_heads": 16,
                "image_size": 336,
                "patch_size": 14,
                "projection_dim": 768,
                "hidden_act": "quick_gelu",
            },
            "image_token_index": 32000,
            "projector_hidden_act": "gelu",
            "vision_feature_layer": -2,
            "vision_feature_select_strategy": "default",
        },
    },
    # BLIP-2 OPT-2.7B: EVA ViT-g/14 at 224 px (1408 wide, 39 layers, 16 heads, MLP 6144), a
    # Q-Former of 32 queries (BERT-base: 768 wide, 12 layers, cross-attention every 2nd layer),
    # OPT-2.7B (2560 wide, 32 layers, 32 heads, FFN 10240, vocab 50272, 2048 positions).
    # Salesforce/blip2-opt-2.7b config.json @ 51572668da0eb669e01a189dc22abe6088589a24.
    "Salesforce/blip2-opt-2.7b": {
        "model_type": "blip-2",
        "revision": "51572668da0eb669e01a189dc22abe6088589a24",
        "config": {
            "vision_config": {
                "hidden_size": 1408,
                "intermediate_size": 6144,
                "num_hidden_layers": 39,
                "num_attention_heads": 16,
                "image_size": 224,
                "patch_size": 14,
            },
            "qformer_config": {
                "hidden_size": 768,
                "num_hidden_layers": 12,
                "num_attention_heads": 12,
                "intermediate_size": 3072,
                "encoder_hidden_size": 1408,
                "cross_attention_frequency": 2,
                "vocab_size": 30522,
            },
            "text_config": {
                "model_type": "opt",
                "hidden_size": 2560,
                "ffn_dim": 10240,
                "num_hidden_layers": 32,
                "num_attention_heads": 32,
                "vocab_size": 50272,
                "word_embed_proj_dim": 2560,
                "max_position_embeddings": 2048,
            },
            "num_query_tokens": 32,
        },
    },
    # GPT-2 small: openai-community/gpt2 config.json @ 607a30d783dfa663caf39e06633721c8d4cfcd7e
    # (n_embd 768, n_layer 12, n_head 12, vocab 50257, n_positions 1024).
    "gpt2": {
        "model_type": "gpt2",
        "revision": "607a30d783dfa663caf39e06633721c8d4cfcd7e",
        "config": {"n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257},
    },
}
PINNED["openai-community/gpt2"] = PINNED["gpt2"]


@dataclass
class Arch:
    """A model's config (a ``transformers`` config object) and where its numbers came from."""

    config: object
    source: str
    path: str | None = None  # a local directory or cache snapshot (its tokenizer is usable)

    @property
    def kind(self) -> str:
        return self.config.model_type

    @property
    def text_config(self):
        return getattr(self.config, "text_config", self.config)

    def params(self) -> dict[str, int]:
        """Parameter counts: total, and for LLaVA/BLIP-2 the vision tower and projector."""
        if "_params" not in self.__dict__:
            self.__dict__["_params"] = self._count_params()
        return self.__dict__["_params"]

    def _count_params(self) -> dict[str, int]:
        model = _meta_model(self.config)
        counts = {"total": _count(model)}
        inner = getattr(model, "model", model)
        for name, attr in (
            ("vision", "vision_tower"),
            ("vision", "vision_model"),
            ("projector", "multi_modal_projector"),
        ):
            part = getattr(inner, attr, None) or getattr(model, attr, None)
            if part is not None:
                counts[name] = _count(part)
        return counts

    def supports_logits_to_keep(self) -> bool:
        """Whether ``generate`` computes the logits of the last position only (LLaVA) or of
        the whole prompt too (BLIP-2)."""
        import inspect

        forward = _model_class(self.config).forward
        return "logits_to_keep" in inspect.signature(forward).parameters


def _model_class(config):
    from transformers import AutoModel

    if config.model_type == "llava":
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration
    if config.model_type == "blip-2":
        from transformers import Blip2ForConditionalGeneration

        return Blip2ForConditionalGeneration
    return AutoModel._model_mapping[type(config)]


def _meta_model(config):
    with torch.device("meta"):
        return _model_class(config)(copy.deepcopy(config))


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def pinned(model_id: str):
    """The config object of a model of the table."""
    from transformers import AutoConfig

    entry = PINNED[model_id]
    return AutoConfig.for_model(entry["model_type"], **copy.deepcopy(entry["config"]))


def resolve(model_id: str, revision: str | None = None) -> Arch:
    """The architecture of ``model_id``: a directory, the offline HF cache, or ``PINNED``."""
    from transformers import AutoConfig

    if Path(model_id).is_dir():
        config = AutoConfig.from_pretrained(model_id)
        return Arch(config, f"{Path(model_id) / 'config.json'}", path=str(model_id))
    try:
        config = AutoConfig.from_pretrained(model_id, revision=revision, local_files_only=True)
        return Arch(config, f"Hugging Face cache ({model_id})", path=model_id)
    except (OSError, ValueError):
        pass
    if model_id in PINNED:
        entry = PINNED[model_id]
        url = _HUB.format(id=model_id, rev=entry["revision"])
        return Arch(pinned(model_id), f"built-in table ({url})")
    raise ValueError(
        f"{model_id!r}: not a directory, not in the Hugging Face cache and not one of the "
        f"pinned models {sorted(PINNED)}"
    )


def bootstrap_llava(section: dict) -> Arch:
    """The miniature captioner the workflow trains (config ``bootstrap``), before it exists."""
    from dalipipe.config import llava_sizes
    from dalipipe.models.llava_config import llava_config

    class _Vocabulary:  # what llava_config reads from a tokenizer
        bos_token_id, eos_token_id, pad_token_id, image_token = 1, 2, 3, "<image>"

        def __len__(self):
            return int(section["vocab_size"])

        def convert_tokens_to_ids(self, token):
            return 4

    config = llava_config(_Vocabulary(), max_positions=512, **llava_sizes(section))
    return Arch(config, "config bootstrap section (models/llava not built yet)")
