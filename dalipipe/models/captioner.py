"""A frozen LLaVA that captions image tokens, audio tokens, or both, with an optional prefix.

    from dalipipe.models.captioner import AudioCaptioner, CaptionerOptions
    cap = AudioCaptioner.from_base("llava-hf/llava-1.5-7b-hf", audio_encoder=encoder)
    pv = cap.pixel_values(frames)                       # list of HxWx3 uint8 arrays or PIL images
    cap.generate(modality="audio+image", pixel_values=pv, fbank=fbank)   # -> list[str]

The wrapper builds the LLM's input embeddings itself (docs/authors-implementation.md §6):
    [BOS] system "USER: " [image tokens][audio tokens][prefix] "\n" prompt " ASSISTANT:" caption </s>
Image tokens are CLIP's hidden layer -2 without CLS, through LLaVA's projector; audio tokens
are the audio encoder's output through the audio projector, a copy of the image projector that
stage distill fine-tunes. The LLaVA model and CLIP stay frozen.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from dalipipe.config import section_defaults
from dalipipe.models.artifacts import load_state, read_config, save_state, write_config
from dalipipe.models.cavmae import CavMaeAudioEncoder, load_encoder, save_encoder
from dalipipe.models.fast_generate import generate_fast
from dalipipe.models.prompt_ids import slot_ids, training_ids
from dalipipe.prompts import PROMPTS, TEMPLATES

log = logging.getLogger(__name__)

MODALITIES = ("image", "audio", "audio+image")
PREFIX_POSITIONS = ("after_modality", "before_modality", "start")


# A captioner built without a config prompts as the workflow's defaults do: one set of defaults,
# the schema's (config models.options), where each option's meaning is written.
_DEFAULT = section_defaults("models")["options"]


@dataclass
class CaptionerOptions:
    prompt: str = _DEFAULT["prompt"]
    template: str = _DEFAULT["template"]  # used by caption_loss (training)
    generate_template: str | None = _DEFAULT["generate_template"]  # generate; None: `template`
    prefix_position: str = _DEFAULT["prefix_position"]
    share_projector: bool = _DEFAULT["share_projector"]  # image tokens through the audio projector
    image_aspect: str = _DEFAULT["image_aspect"]  # "pad" (LLaVA-1.5) or "crop"

    def __post_init__(self):
        for name in ("template", "generate_template"):
            value = getattr(self, name)
            if value is not None and value not in TEMPLATES:
                raise ValueError(f"CaptionerOptions.{name}={value!r}: use one of {list(TEMPLATES)}")
        if self.prefix_position not in PREFIX_POSITIONS:
            raise ValueError(
                f"CaptionerOptions.prefix_position={self.prefix_position!r}: "
                f"use one of {PREFIX_POSITIONS}"
            )
        if self.image_aspect not in ("pad", "crop"):
            raise ValueError(f"CaptionerOptions.image_aspect={self.image_aspect!r}: pad or crop")
        self.prompt = PROMPTS.get(self.prompt, self.prompt)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> CaptionerOptions:
        d = dict(d or {})
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"CaptionerOptions: unknown fields {sorted(unknown)}")
        return cls(**d)


# What a generated caption's line breaks become: a space, or nothing, as in the authors'
# evaluation (eval_captions_AC.py), which strips the ends and then deletes every "\n".
NEWLINE_RULES = ("space", "delete")


def clean_caption(text: str, newlines: str = "space") -> str:
    """A decoded caption as it is scored: its ends stripped and its line breaks removed."""
    if newlines == "space":
        return text.replace("\n", " ").strip()
    if newlines == "delete":
        return text.strip().replace("\n", "")
    raise ValueError(f"newlines={newlines!r}: one of {', '.join(NEWLINE_RULES)}")


def pad_to_square(image: Image.Image, mean: list[float]) -> Image.Image:
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), tuple(int(round(255 * m)) for m in mean))
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def scored_tail(labels: torch.Tensor) -> int:
    """How many last positions of a right-padded batch the LM head must see: from the one
    before the first scored label (it predicts that label) to the end.

    Only the caption's tokens are scored and they end every sequence, so the head need not see
    the prompt, image or audio positions: at LLaMA-7B's widths it costs per position about two
    thirds of a decoder layer, and all positions' logits (12 bytes per vocabulary entry around
    the cross-entropy) would be a paper micro-batch's largest transient tensor."""
    scored = labels != -100
    if not bool(scored.any(dim=1).all()):
        raise ValueError("caption_loss: a sequence with no scored token")
    first = max(1, int(scored.int().argmax(dim=1).min()))  # argmax: the first scored one
    return labels.shape[1] - first + 1


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"):
    """Cross-entropy of each position's logits against the next position's label, for logits of
    the last ``logits.shape[1]`` positions (all, or a `scored_tail`); -100 labels are ignored."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        labels[:, labels.shape[1] - logits.shape[1] + 1 :].reshape(-1),
        ignore_index=-100,
        reduction=reduction,
    )


class AudioCaptioner(nn.Module):
    def __init__(
        self, llava, processor, *, options=None, audio_encoder=None, base=None, revision=None
    ):
        super().__init__()
        self.llava = llava.eval().requires_grad_(False)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.options = options or CaptionerOptions()
        self.base, self.revision = base, revision
        self.metadata: dict = {}
        self.audio_encoder = audio_encoder
        if audio_encoder is not None:
            audio_encoder.eval().requires_grad_(False)
        self.audio_projector = copy.deepcopy(self.image_projector).requires_grad_(False)
        self.prefix: nn.Parameter | None = None
        self._compiled_cache = None  # generate(compile=True) keeps its static KV cache here
        config = llava.config
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.image_token_id = config.image_token_id
        self.vision_feature_layer = config.vision_feature_layer
        self.drop_cls = config.vision_feature_select_strategy == "default"

    # --- loading and saving -------------------------------------------------------------------

    @classmethod
    def from_base(
        cls,
        base: str | Path,
        *,
        revision: str | None = None,
        options: CaptionerOptions | dict | None = None,
        audio_encoder: CavMaeAudioEncoder | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> AudioCaptioner:
        """A captioner over a `save_pretrained` LLaVA (hub id or directory) and its processor."""
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        if isinstance(options, dict) or options is None:
            options = CaptionerOptions.from_dict(options)
        try:
            llava = LlavaForConditionalGeneration.from_pretrained(
                str(base), revision=revision, dtype=dtype
            )
            processor = AutoProcessor.from_pretrained(str(base), revision=revision)
        except OSError as err:
            raise OSError(f"captioner base {base!r}: cannot load a LLaVA model ({err})") from err
        captioner = cls(
            llava,
            processor,
            options=options,
            audio_encoder=audio_encoder,
            base=str(base),
            revision=revision,
        )
        return captioner.to(device=device, dtype=dtype)

    @classmethod
    def from_dir(
        cls,
        directory: str | Path,
        *,
        dtype: torch.dtype = torch.float32,
        device="cpu",
        base: str | Path | None = None,
    ) -> AudioCaptioner:
        """Load a trained-captioner directory (DEVELOPING.md) in one call. `base`: where the
        base model captioner.json names already is (a Hub model its caller put in the cache)."""
        directory = Path(directory)
        info = read_config(directory / "captioner.json")
        if "base" not in info:
            raise ValueError(f"{directory / 'captioner.json'}: missing field 'base'")
        if base is None:
            base = Path(info["base"])
            if not base.exists() and (directory / base).exists():
                base = directory / base
        encoder = None
        if (directory / "audio_encoder.json").exists():
            encoder = load_encoder(directory)
        captioner = cls.from_base(
            base,
            revision=info.get("revision"),
            options=info.get("options"),
            audio_encoder=encoder,
            dtype=dtype,
            device=device,
        )
        captioner.metadata = info.get("metadata", {})
        if (directory / "audio_projector.safetensors").exists():
            state = load_state(directory / "audio_projector.safetensors", device=device)
            captioner.audio_projector.load_state_dict(state, strict=True)
        if (directory / "prefix.safetensors").exists():
            captioner.load_prefix(directory / "prefix.safetensors")
        return captioner

    def save_dir(self, directory: str | Path, *, metadata: dict | None = None) -> None:
        """Write captioner.json, the audio encoder, the audio projector and the prefix (if any)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.base is None:
            raise ValueError("save_dir: this captioner has no base model id or path to record")
        info = {
            "base": self.base,
            "revision": self.revision,
            "options": self.options.to_dict(),
            "metadata": {**self.metadata, **(metadata or {})},
        }
        write_config(directory / "captioner.json", info)
        if self.audio_encoder is not None:
            save_encoder(self.audio_encoder, directory)
        save_state(directory / "audio_projector.safetensors", self.audio_projector.state_dict())
        if self.prefix is not None:
            self.save_prefix(directory / "prefix.safetensors")

    def save_prefix(self, path: str | Path) -> None:
        if self.prefix is None:
            raise ValueError("save_prefix: no prefix (call init_prefix or load_prefix first)")
        save_state(path, {"prefix": self.prefix.data})

    def load_prefix(self, path: str | Path) -> None:
        state = load_state(path)
        if "prefix" not in state:
            raise ValueError(f"{path}: no tensor named 'prefix'")
        prefix = state["prefix"]
        if prefix.ndim != 2 or prefix.shape[1] != self.hidden_size:
            raise ValueError(
                f"{path}: prefix of shape {tuple(prefix.shape)} does not fit an LM of width "
                f"{self.hidden_size}"
            )
        self.prefix = nn.Parameter(prefix.to(self.device, torch.float32), requires_grad=False)

    # --- parts --------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.llava.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.llava.lm_head.weight.dtype

    @property
    def hidden_size(self) -> int:
        return self.llava.config.text_config.hidden_size

    @property
    def image_projector(self) -> nn.Module:
        return self.llava.model.multi_modal_projector

    @property
    def language_model(self) -> nn.Module:
        """The frozen LLM's decoder (embeddings, layers, final norm; not the LM head)."""
        return self.llava.model.language_model

    @property
    def vision_tower(self) -> nn.Module:
        return self.llava.model.vision_tower

    def init_prefix(self, n_tokens: int = 16, std: float = 1e-4, seed: int | None = None) -> None:
        """A fresh learned prefix of `n_tokens` x LM width, N(0, std^2) as the authors."""
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        values = torch.randn(n_tokens, self.hidden_size, generator=generator) * std
        self.prefix = nn.Parameter(values.to(self.device))

    def trainable_parameters(self, part: str) -> list[nn.Parameter]:
        """Unfreeze and return one part: "prefix" or "audio_projector"; the rest stays frozen."""
        if part == "prefix":
            if self.prefix is None:
                raise ValueError("trainable_parameters('prefix'): call init_prefix first")
            params = [self.prefix]
        elif part == "audio_projector":
            params = list(self.audio_projector.parameters())
        else:
            raise ValueError(
                f"trainable_parameters: unknown part {part!r} (prefix, audio_projector)"
            )
        for p in params:
            p.requires_grad_(True)
        return params

    def pixel_values(self, frames: list) -> torch.Tensor:
        """CLIP input for a list of frames (HxWx3 uint8 arrays or PIL images)."""
        images = []
        mean = self.processor.image_processor.image_mean
        for frame in frames:
            image = frame if isinstance(frame, Image.Image) else Image.fromarray(np.asarray(frame))
            image = image.convert("RGB")
            if self.options.image_aspect == "pad":
                image = pad_to_square(image, mean)
            images.append(image)
        out = self.processor.image_processor(images=images, return_tensors="pt")
        return out["pixel_values"].to(self.device, self.dtype)

    @torch.no_grad()
    def image_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLIP tokens the audio encoder is aligned to: (B, N, D_vision), before the projector."""
        out = self.vision_tower(
            pixel_values.to(self.device, self.dtype), output_hidden_states=True, return_dict=True
        )
        tokens = out.hidden_states[self.vision_feature_layer]
        return tokens[:, 1:] if self.drop_cls else tokens

    def audio_tokens(self, fbank: torch.Tensor) -> torch.Tensor:
        """The audio encoder's tokens (B, N, D_vision), before the projector."""
        if self.audio_encoder is None:
            raise ValueError("audio modality requested but the captioner has no audio encoder")
        fbank = torch.as_tensor(fbank).to(self.device)
        return self.audio_encoder(fbank.to(next(self.audio_encoder.parameters()).dtype))

    def modality_embeds(self, modality: str, pixel_values=None, fbank=None) -> torch.Tensor:
        """(B, N, D_lm): image tokens, audio tokens, or image then audio, projected into the LM."""
        if modality not in MODALITIES:
            raise ValueError(f"modality {modality!r}: use one of {MODALITIES}")
        parts = []
        if "image" in modality:
            if pixel_values is None:
                raise ValueError(f"modality {modality!r} needs pixel_values")
            projector = (
                self.audio_projector if self.options.share_projector else self.image_projector
            )
            parts.append(projector(self.image_tokens(pixel_values)))
        if "audio" in modality:
            if fbank is None:
                raise ValueError(f"modality {modality!r} needs fbank")
            parts.append(self.audio_projector(self.audio_tokens(fbank)))
        return torch.cat(parts, dim=1)

    # --- sequences ----------------------------------------------------------------------------

    def _prompt_ids(self, template: str, prompt: str) -> tuple[list[int], list[int]]:
        """Token ids before and after the modality slot, as LLaVA builds them (prompt_ids.py)."""
        return slot_ids(self.tokenizer, TEMPLATES[template].format(prompt=prompt))

    def _caption_ids(self, template: str, prompt: str, caption: str) -> list[int]:
        """The scored ids of a training sample: the caption's, then the end token."""
        text = TEMPLATES[template].format(prompt=prompt)
        return training_ids(self.tokenizer, text, caption)[2]

    def _sequence(self, template, prompt, modality_embeds, use_prefix, caption=None):
        """One sample's input embeddings and labels (-100 everywhere but the caption)."""
        embed = self.llava.get_input_embeddings()
        text = TEMPLATES[template].format(prompt=prompt)
        if caption is None:
            before, after = slot_ids(self.tokenizer, text)
            caption_ids = []
        else:
            before, after, caption_ids = training_ids(self.tokenizer, text, caption)
        as_embeds = lambda ids: embed(torch.tensor(ids, dtype=torch.long, device=self.device))  # noqa: E731
        pieces = [as_embeds(before)]
        if use_prefix:
            if self.prefix is None:
                raise ValueError("use_prefix=True but no prefix (init_prefix or load_prefix)")
            prefix = self.prefix.to(self.dtype)
            position = self.options.prefix_position
            if position == "start":
                n_bos = 1 if before and before[0] == self.tokenizer.bos_token_id else 0
                pieces = [as_embeds(before[:n_bos]), prefix, as_embeds(before[n_bos:])]
                pieces.append(modality_embeds)
            elif position == "before_modality":
                pieces += [prefix, modality_embeds]
            else:
                pieces += [modality_embeds, prefix]
        else:
            pieces.append(modality_embeds)
        pieces.append(as_embeds(after))
        n_context = sum(p.shape[0] for p in pieces)
        labels = [-100] * n_context
        if caption_ids:
            pieces.append(as_embeds(caption_ids))
            labels += caption_ids
        return torch.cat([p.to(self.dtype) for p in pieces]), labels

    def _pad_embed(self) -> torch.Tensor:
        return self.llava.get_input_embeddings()(
            torch.tensor([self.tokenizer.pad_token_id], device=self.device)
        )[0]

    def _batch(self, sequences, *, left_pad: bool):
        """Stack variable-length sequences with padding; returns embeds, mask, positions, labels."""
        longest = max(e.shape[0] for e, _ in sequences)
        pad_embed = self._pad_embed()
        embeds, masks, labels = [], [], []
        for e, lab in sequences:
            n_pad = longest - e.shape[0]
            pad = pad_embed.expand(n_pad, -1)
            embeds.append(torch.cat([pad, e] if left_pad else [e, pad]))
            mask = [0] * n_pad + [1] * e.shape[0] if left_pad else [1] * e.shape[0] + [0] * n_pad
            masks.append(mask)
            labels.append([-100] * n_pad + lab if left_pad else lab + [-100] * n_pad)
        mask = torch.tensor(masks, device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return (
            torch.stack(embeds),
            mask,
            positions,
            torch.tensor(labels, dtype=torch.long, device=self.device),
        )

    def _prompts(self, prompt, batch_size: int) -> list[str]:
        if prompt is None:
            return [self.options.prompt] * batch_size
        if isinstance(prompt, str):
            return [prompt] * batch_size
        if len(prompt) != batch_size:
            raise ValueError(f"{len(prompt)} prompts for a batch of {batch_size}")
        return list(prompt)

    # --- training and captioning ----------------------------------------------------------

    def caption_loss(
        self,
        *,
        captions: list[str],
        modality: str,
        pixel_values=None,
        fbank=None,
        use_prefix: bool = False,
        prompt: str | list[str] | None = None,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """Cross-entropy on the caption tokens and the end token: their mean, or with
        ``reduction="sum"`` their sum (`caption_token_count` tokens), which gradient
        accumulation divides by the whole step's count so that micro-batches add up exactly."""
        if reduction not in ("mean", "sum"):
            raise ValueError(f"caption_loss: reduction={reduction!r}: use 'mean' or 'sum'")
        mm = self.modality_embeds(modality, pixel_values, fbank)
        if mm.shape[0] != len(captions):
            raise ValueError(f"{len(captions)} captions for {mm.shape[0]} inputs")
        prompts = self._prompts(prompt, len(captions))
        template = self.options.template
        seqs = [
            self._sequence(template, p, mm[i], use_prefix, caption=c)
            for i, (p, c) in enumerate(zip(prompts, captions))
        ]
        embeds, mask, positions, labels = self._batch(seqs, left_pad=False)
        keep = scored_tail(labels)
        logits = self.llava(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions,
            use_cache=False,
            logits_to_keep=keep,
        ).logits
        return next_token_loss(logits, labels, reduction)

    def caption_token_count(
        self, captions: list[str], prompt: str | list[str] | None = None
    ) -> int:
        """How many tokens `caption_loss` scores for these captions (each caption's tokens and
        its end token): what a micro-batch's summed loss is divided by."""
        prompts = self._prompts(prompt, len(captions))
        template = self.options.template
        return sum(len(self._caption_ids(template, p, c)) for p, c in zip(prompts, captions))

    @torch.no_grad()
    def generate(
        self,
        *,
        modality: str,
        pixel_values=None,
        fbank=None,
        use_prefix: bool = False,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 0.2,
        seed: int | None = None,
        prompt: str | list[str] | None = None,
        fast: bool = True,
        static_cache: bool = True,
        compile: bool = False,
        share_prefix: bool = True,
        newlines: str = "space",
    ) -> list[str]:
        """Captions for a batch; greedy, or sampled at `temperature` with a seed; line breaks
        replaced by a space or deleted (`newlines`, see `clean_caption`).

        `fast` (dalipipe/models/fast_generate.py): the positions every sequence shares are
        computed once (`share_prefix`) and the rest continues from their cache, preallocated with
        `static_cache`, its decode step compiled with `compile` (GPU only); the same captions as
        `fast=False`, plain transformers `generate` over left-padded sequences."""
        if newlines not in NEWLINE_RULES:  # before the generation it would waste
            raise ValueError(f"newlines={newlines!r}: one of {', '.join(NEWLINE_RULES)}")
        mm = self.modality_embeds(modality, pixel_values, fbank)
        prompts = self._prompts(prompt, mm.shape[0])
        template = self.options.generate_template or self.options.template
        seqs = [self._sequence(template, p, mm[i], use_prefix) for i, p in enumerate(prompts)]
        settings = dict(
            do_sample=do_sample,
            max_new_tokens=max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        if do_sample:
            # The authors' decoding: temperature 0.2, HF's default top-k 50, no nucleus cut.
            settings.update(temperature=temperature, top_k=50, top_p=1.0)
        rng = torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])
        with rng if seed is not None else contextlib.nullcontext():
            if seed is not None:
                torch.manual_seed(seed)
            if fast:
                out, cache = generate_fast(
                    self.llava,
                    [e for e, _ in seqs],
                    self._pad_embed(),
                    share_prefix=share_prefix,
                    static_cache=static_cache,
                    compile=compile,
                    reuse=self._compiled_cache,
                    **settings,
                )
                # only a compiled decode step gains from keeping the cache's memory between calls
                self._compiled_cache = cache if compile and static_cache else None
            else:
                embeds, mask, _, _ = self._batch(seqs, left_pad=True)
                out = self.llava.generate(inputs_embeds=embeds, attention_mask=mask, **settings)
        texts = self.tokenizer.batch_decode(out, skip_special_tokens=True)
        return [clean_caption(t, newlines) for t in texts]
