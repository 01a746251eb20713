"""Positions per sample, from the config and the captioner's prompt layout (models/captioner.py):

    [BOS] system "USER: " [image tokens][audio tokens][prefix] "\\n" prompt " ASSISTANT:" caption </s>

Image tokens: (image_size / patch_size)^2 (CLS dropped, LLaVA's "default" strategy); audio
tokens: the CAV-MAE patch grid of ``models.audio_encoder``; prefix: ``prefix.n_tokens``. The text
is counted with the captioner's tokenizer where it is on disk, else approximated (below).
Training batches are padded to their longest sample and the longest caption is assumed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from dalipipe.models.prompt_ids import slot_ids
from dalipipe.prompts import IMAGE_SLOT, PROMPTS, TEMPLATES

# The prefix stage's captions are the user's pairs file, not read here: its longest caption is
# assumed to take this many tokens (AudioCaps captions are ~10 words, the longest ~50 tokens).
PREFIX_CAPTION_TOKENS = 64
# Without the tokenizer: LLaMA's SentencePiece splits English into ~1.2 tokens per word or
# punctuation mark on this text ("ASSISTANT" and "USER" are several pieces each).
APPROX_TOKENS_PER_WORD = 1.25
_WORDS = re.compile(r"\w+|[^\w\s]")


@dataclass(frozen=True)
class Layout:
    """Positions of one sample, by part; ``text_source`` says how the text was counted."""

    text: int  # BOS, template, prompt
    image: int = 0
    audio: int = 0
    prefix: int = 0
    caption: int = 0  # training: the caption and its end token
    new: int = 0  # generation: max_new_tokens
    text_source: str = "tokenizer"

    @property
    def prompt(self) -> int:
        """Positions before generation starts (or without the caption)."""
        return self.text + self.image + self.audio + self.prefix

    @property
    def total(self) -> int:
        return self.prompt + self.caption + self.new

    def describe(self) -> str:
        parts = [f"{self.text} text ({self.text_source})"]
        for name in ("image", "audio", "prefix", "caption", "new"):
            if getattr(self, name):
                parts.append(f"{getattr(self, name)} {name}")
        return " + ".join(parts)


def _tokenizer(path: str | None):
    if path is None:
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError):
        return None


def count_text(text: str, tokenizer=None) -> tuple[int, str]:
    """Tokens of a template ``text`` with its BOS, the ``<image>`` slot not counted: exact with
    ``tokenizer`` (the chunks either side of the slot, as the captioner builds them), else
    approximated."""
    if tokenizer is not None:
        if IMAGE_SLOT in text:
            before, after = slot_ids(tokenizer, text)
            return len(before) + len(after), "tokenizer"
        plain = tokenizer(text.replace(IMAGE_SLOT, ""), add_special_tokens=True)["input_ids"]
        return len(plain), "tokenizer"
    words = len(_WORDS.findall(text.replace(IMAGE_SLOT, "")))
    return 1 + math.ceil(APPROX_TOKENS_PER_WORD * words), "approx."


def template_text(template: str, prompt: str) -> str:
    """The conversation text of a sample, with its modality slot."""
    return TEMPLATES[template].format(prompt=PROMPTS.get(prompt, prompt))


def image_tokens(vision_config) -> int:
    return (vision_config.image_size // vision_config.patch_size) ** 2


def audio_tokens(encoder: dict) -> int:
    from dalipipe.models.cavmae import AudioEncoderConfig

    return AudioEncoderConfig.from_dict(encoder).num_tokens


def captioner_layout(
    arch,
    *,
    template: str,
    prompt: str,
    modality: str,
    encoder: dict | None = None,
    prefix_tokens: int = 0,
    caption: int = 0,
    new: int = 0,
) -> Layout:
    """A LLaVA captioner's sample (models/captioner.py): text, modality tokens, prefix."""
    text, source = count_text(template_text(template, prompt), _tokenizer(arch.path))
    return Layout(
        text=text,
        image=image_tokens(arch.config.vision_config) if "image" in modality else 0,
        audio=audio_tokens(encoder or {}) if "audio" in modality else 0,
        prefix=prefix_tokens,
        caption=caption,
        new=new,
        text_source=source,
    )


def blip2_layout(arch, new: int) -> Layout:
    """BLIP-2 in the filter: the query tokens, BOS and no prompt, then the caption."""
    return Layout(text=1, image=arch.config.num_query_tokens, new=new, text_source="BOS only")
