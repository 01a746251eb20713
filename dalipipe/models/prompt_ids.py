"""A prompt's token ids, built the way LLaVA's code builds them.

    before, after = slot_ids(tokenizer, TEMPLATES["llava_v1"].format(prompt=PROMPTS["code"]))
    before, context, caption = training_ids(tokenizer, text, "A bell rings once.")

LLaVA (`tokenizer_image_token`) splits the text at the `<image>` slot and tokenises each chunk on
its own, so the chunk after the slot starts as a text of its own: with LLaMA's sentencepiece
vocabulary it opens with the dummy-prefix piece "▁" before "\\n". Tokenising the whole text with
`<image>` as a special token instead makes what follows the slot depend on the tokenizer's
`legacy` setting (with `legacy: false` the "▁" is gone). Building the ids chunk by chunk gives
the authors' ids whatever that setting (tests/test_parity.py checks it against LLaVA's code).
"""

from __future__ import annotations

from dalipipe.prompts import IMAGE_SLOT


def slot_ids(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """Ids before and after the one `<image>` slot of `text`, each chunk tokenised alone."""
    chunks = text.split(IMAGE_SLOT)
    if len(chunks) != 2:
        raise ValueError(f"prompt {text!r}: needs exactly one {IMAGE_SLOT}, has {len(chunks) - 1}")
    before, after = (tokenizer(chunk, add_special_tokens=True)["input_ids"] for chunk in chunks)
    bos = tokenizer.bos_token_id
    if bos is not None and before[:1] == [bos]:
        # LLaVA keeps the first chunk's BOS and drops the first id of every later chunk (its BOS)
        after = after[1:]
    return before, after


def training_ids(tokenizer, text: str, caption: str) -> tuple[list[int], list[int], list[int]]:
    """A training sample "<text> <caption></s>" as ids: before the slot, after it up to the
    caption (not scored), and the scored caption ids with the end token.

    As LLaVA's `preprocess_v1`: the whole conversation is tokenised (chunk-wise), and the
    instruction "... ASSISTANT: " tokenised alone, less its BOS and its last piece (the trailing
    space), is what the labels mask after the first token; the rest is scored."""
    caption = caption.strip()
    if not caption:
        raise ValueError(f"training_ids: empty caption for prompt {text!r}")
    before, after = slot_ids(tokenizer, f"{text} {caption}")
    _, instruction = slot_ids(tokenizer, f"{text} ")
    n_context = len(instruction) - 1  # the trailing space's piece is part of the caption's first
    if not 0 <= n_context < len(after):
        raise ValueError(f"training_ids: caption {caption!r} leaves no scored token after {text!r}")
    return before, after[:n_context], after[n_context:] + [tokenizer.eos_token_id]
