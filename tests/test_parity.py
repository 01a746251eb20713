"""Parity with the authors' code, token for token (docs/parity.md).

Item 1, the ids: every prompt dalipipe builds (evaluation and pseudo-labels with `llava_v1`,
prefix tuning and distillation with `vicuna_v1` and a caption, the probe's question) against
LLaVA's own `tokenizer_image_token`, `conv_templates` and `preprocess_v1` (llava-torch
1.2.2.post1, tests/llava_oracle.py), over LLaMA's real 32,000-piece vocabulary with `legacy`
true and false, and over the miniature's byte-level tokenizer.

Item 2, the sequence: dalipipe's input embeddings and labels against the authors' splice
(`prepare_inputs_labels_for_multimodal` of hugomalard/AnEyeForAnEar, LLaVA/llava/model/
llava_arch.py, transcribed below as `authors_splice`) fed with those original ids and labels, on
a tiny LLaVA, for audio, image and audio+image, with and without the prefix.
"""

from __future__ import annotations

import llava_oracle
import pytest
import torch

from dalipipe.config import section_defaults
from dalipipe.models.captioner import MODALITIES, AudioCaptioner, CaptionerOptions
from dalipipe.models.cavmae import AudioEncoderConfig, CavMaeAudioEncoder
from dalipipe.models.prompt_ids import slot_ids, training_ids
from dalipipe.prompts import PROMPTS, TEMPLATES

PROBE_PROMPT = section_defaults("evaluate")["figures"]["probe_prompt"]
ASKED = [PROMPTS["code"], PROMPTS["paper"], PROBE_PROMPT]
CAPTIONS = ["Toilet flushing", "A bell rings once.", "Someone speaks, then a dog barks twice"]
TOKENIZERS = ["llama-legacy", "llama", "miniature"]
AUTHORS_MODALITY = {"audio": "audio", "image": "image", "audio+image": "audio_vis"}


@pytest.fixture(scope="module")
def oracle():
    return llava_oracle.load()


@pytest.fixture(scope="module")
def tokenizers(oracle):
    from dalipipe.models.tokenizer import build_tokenizer

    return {
        "llama-legacy": llava_oracle.llama_tokenizer(oracle, legacy=True),
        "llama": llava_oracle.llama_tokenizer(oracle, legacy=False),
        "miniature": build_tokenizer(CAPTIONS, vocab_size=400),
    }


def asked_ids(oracle, tokenizer, prompt: str) -> list[int]:
    """The authors' generation prompt: llava_v1, "<image>\\n" + question, open reply."""
    conv = oracle.conv_templates["llava_v1"].copy()
    conv.append_message(conv.roles[0], "<image>\n" + prompt)
    conv.append_message(conv.roles[1], None)
    return oracle.tokenizer_image_token(conv.get_prompt(), tokenizer)


def trained_ids(oracle, tokenizer, prompt: str, caption: str) -> tuple[list[int], list[int]]:
    """The authors' training sample: vicuna_v1 (`--version v1`) through preprocess_v1."""
    oracle.default_conversation.default_conversation = oracle.conv_templates["vicuna_v1"]
    turns = [{"from": "human", "value": "<image>\n" + prompt}, {"from": "gpt", "value": caption}]
    out = oracle.preprocess_v1([turns], tokenizer, has_image=True)
    return out["input_ids"][0].tolist(), out["labels"][0].tolist()


# --- item 1: ids and label masks ------------------------------------------------------------


@pytest.mark.parametrize("legacy", [True, False])
def test_llama_ids_around_the_slot(oracle, legacy):
    """The issue's numbers: "USER: " then the slot, then "▁" "\\n" "Describe", whatever `legacy`."""
    tokenizer = llava_oracle.llama_tokenizer(oracle, legacy=legacy)
    before, after = slot_ids(tokenizer, TEMPLATES["llava_v1"].format(prompt=PROMPTS["code"]))
    assert before[0] == 1 and before[-3:] == [1001, 29901, 29871]
    assert after[:3] == [29871, 13, 4002]
    # the whole text with <image> as a special token loses the "▁" after the slot under
    # legacy: false: why the ids are built chunk by chunk
    whole = tokenizer(TEMPLATES["llava_v1"].format(prompt=PROMPTS["code"]))["input_ids"]
    k = whole.index(llava_oracle.IMAGE_SLOT_ID)
    assert whole[k + 1 : k + 3] == ([29871, 13] if legacy else [13, 4002])


@pytest.mark.parametrize("kind", TOKENIZERS)
@pytest.mark.parametrize("prompt", ASKED)
def test_generation_ids_are_llavas(oracle, tokenizers, kind, prompt):
    tokenizer = tokenizers[kind]
    before, after = slot_ids(tokenizer, TEMPLATES["llava_v1"].format(prompt=prompt))
    assert before + [oracle.IMAGE_TOKEN_INDEX] + after == asked_ids(oracle, tokenizer, prompt)


@pytest.mark.parametrize("kind", TOKENIZERS)
@pytest.mark.parametrize("caption", CAPTIONS)
def test_training_ids_and_mask_are_llavas(oracle, tokenizers, kind, caption):
    tokenizer = tokenizers[kind]
    text = TEMPLATES["vicuna_v1"].format(prompt=PROMPTS["code"])
    before, context, scored = training_ids(tokenizer, text, caption)
    ids, labels = trained_ids(oracle, tokenizer, PROMPTS["code"], caption)
    assert before + [oracle.IMAGE_TOKEN_INDEX] + context + scored == ids
    assert [-100] * (len(before) + 1 + len(context)) + scored == labels
    assert scored[-1] == tokenizer.eos_token_id and len(scored) >= 2


def test_llama_vocabulary_is_llamas(oracle):
    """transformers' own example of LLaMA's ids (LlamaTokenizer's docstring)."""
    tokenizer = llava_oracle.llama_tokenizer(oracle, legacy=False)
    assert tokenizer("Hello this is a test")["input_ids"] == [1, 15043, 445, 338, 263, 1243]


def test_llama_caption_ids(oracle):
    """Exact ids of one scored caption: what follows the ":" of "ASSISTANT:", then </s>
    (the same ids llama-tokenizer-js's own encoder gives for "Toilet flushing")."""
    tokenizer = llava_oracle.llama_tokenizer(oracle, legacy=False)
    text = TEMPLATES["vicuna_v1"].format(prompt=PROMPTS["code"])
    _, context, scored = training_ids(tokenizer, text, "Toilet flushing")
    assert context[-4:] == [1799, 9047, 13566, 29901]  # "IST" "ANT" ":" of "ASSISTANT:"
    assert scored == [1763, 488, 29873, 1652, 21616, 2]
    assert tokenizer.convert_ids_to_tokens(scored) == ["▁To", "ile", "t", "▁fl", "ushing", "</s>"]


def test_a_prompt_needs_one_slot():
    from dalipipe.models.tokenizer import build_tokenizer

    tokenizer = build_tokenizer([], vocab_size=300)
    with pytest.raises(ValueError, match="exactly one <image>, has 2"):
        slot_ids(tokenizer, "USER: <image><image>\nhi ASSISTANT:")
    with pytest.raises(ValueError, match="empty caption"):
        training_ids(tokenizer, TEMPLATES["vicuna_v1"].format(prompt="hi"), "  ")


# --- item 2: the sequence the language model sees -------------------------------------------


def authors_splice(embed, ids, labels, slot_id, image, audio, prefix, modality):
    """The authors' splice for one sample, transcribed (not copied) from their
    prepare_inputs_labels_for_multimodal: the text ids between slots are embedded; each slot
    becomes [audio] ('audio'), [image, audio] ('audio_vis') or [image] ('image'), then the
    prefix when the prefix is on; everything inserted is labelled -100."""
    slots = [i for i, t in enumerate(ids) if t == slot_id]
    bounds = [-1, *slots, len(ids)]
    inserted = {"audio": [audio], "audio_vis": [image, audio], "image": [image]}[modality]
    if prefix is not None:
        inserted = inserted + [prefix]
    filler = torch.cat(inserted)
    pieces, new_labels = [], []
    for n, (a, b) in enumerate(zip(bounds, bounds[1:])):
        pieces.append(embed(torch.tensor(ids[a + 1 : b], dtype=torch.long)))
        new_labels += labels[a + 1 : b]
        if n < len(slots):
            pieces.append(filler)
            new_labels += [-100] * filler.shape[0]
    return torch.cat(pieces), new_labels


@pytest.fixture(scope="module")
def tiny_captioners(tokenizers):
    """A tiny LLaVA per tokenizer (rows for LLaMA's 32,000 pieces and <image>), one audio
    encoder, a prefix of 3 tokens."""
    from transformers import LlavaForConditionalGeneration

    from dalipipe.models.llava_config import llava_config, llava_processor

    captioners = {}
    for kind, tokenizer in tokenizers.items():
        if not hasattr(tokenizer, "image_token"):
            tokenizer.image_token = "<image>"
        config = llava_config(tokenizer, text_hidden=16, text_heads=2, vision_hidden=32)
        torch.manual_seed(0)
        llava = LlavaForConditionalGeneration(config).eval()
        encoder = CavMaeAudioEncoder(
            AudioEncoderConfig(
                num_mel_bins=32, target_length=32, embed_dim=32, depth=1, num_heads=2, out_dim=32
            )
        )
        captioner = AudioCaptioner(
            llava,
            llava_processor(tokenizer, 32, 8),
            options=CaptionerOptions(),
            audio_encoder=encoder,
        )
        captioner.init_prefix(n_tokens=3, std=1.0, seed=0)
        captioners[kind] = captioner
    return captioners


@pytest.mark.parametrize("kind", TOKENIZERS)
@pytest.mark.parametrize("modality", MODALITIES)
@pytest.mark.parametrize("use_prefix", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_sequence_is_the_authors_splice(
    oracle, tiny_captioners, kind, modality, use_prefix, training
):
    captioner = tiny_captioners[kind]
    tokenizer = captioner.tokenizer
    generator = torch.Generator().manual_seed(1)
    pixels = torch.randn(1, 3, 32, 32, generator=generator)
    fbank = torch.randn(1, 32, 32, generator=generator)
    with torch.no_grad():
        # the authors' encode_images: CLIP layer -2 without CLS, through the projector; the
        # audio: the aligned encoder's tokens through the (distilled) projector
        hidden = captioner.vision_tower(pixels, output_hidden_states=True).hidden_states[-2]
        image = captioner.image_projector(hidden[:, 1:])[0]
        audio = captioner.audio_projector(captioner.audio_encoder(fbank))[0]
        prefix = captioner.prefix.detach() if use_prefix else None
        if training:
            template, caption = "vicuna_v1", CAPTIONS[1]
            ids, labels = trained_ids(oracle, tokenizer, PROMPTS["code"], caption)
        else:
            template, caption = "llava_v1", None
            ids = asked_ids(oracle, tokenizer, PROMPTS["code"])
            labels = [-100] * len(ids)  # the splice labels nothing when given no labels
        expected, expected_labels = authors_splice(
            captioner.llava.get_input_embeddings(),
            ids,
            labels,
            oracle.IMAGE_TOKEN_INDEX,
            image,
            audio,
            prefix,
            AUTHORS_MODALITY[modality],
        )
        mm = captioner.modality_embeds(modality, pixel_values=pixels, fbank=fbank)[0]
        embeds, got_labels = captioner._sequence(
            template, PROMPTS["code"], mm, use_prefix, caption=caption
        )
    n_inserted = {"audio": 4, "image": 16, "audio+image": 20}[modality] + 3 * use_prefix
    assert embeds.shape == (len(ids) - 1 + n_inserted, 16)
    assert torch.equal(embeds, expected)
    assert got_labels == expected_labels
    assert (sum(t != -100 for t in got_labels) > 0) == training


@pytest.mark.parametrize("kind", TOKENIZERS)
def test_memory_plan_counts_the_authors_ids(oracle, tokenizers, kind):
    """plan-memory's prompt length is the authors' ids less the slot."""
    from dalipipe.memory.sequences import count_text

    tokenizer = tokenizers[kind]
    text = TEMPLATES["llava_v1"].format(prompt=PROMPTS["code"])
    assert count_text(text, tokenizer) == (
        len(asked_ids(oracle, tokenizer, PROMPTS["code"])) - 1,
        "tokenizer",
    )
