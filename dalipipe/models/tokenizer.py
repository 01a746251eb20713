"""A byte-level BPE tokenizer trained offline on a small corpus, wrapped for `transformers`.

    from dalipipe.models.tokenizer import build_tokenizer
    tok = build_tokenizer(["a dog barks", "a bell rings"], vocab_size=400)
    tok.save_pretrained("out/")     # reloads with AutoTokenizer.from_pretrained("out/")

Byte-level (as GPT-2 and OPT) so any text encodes without unknown tokens and decodes back
exactly; the vocabulary grows from the corpus, so a world's words become single tokens. Special
tokens follow Llama/LLaVA: <unk>, <s> (prepended), </s>, <pad>, and optionally <image>.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

UNK, BOS, EOS, PAD, IMAGE = "<unk>", "<s>", "</s>", "<pad>", "<image>"

# Text every captioner sees around its inputs: the conversation templates and default prompts.
BASE_CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions.",
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the human's questions.",
    "USER: ASSISTANT:",
    "Describe the sound that can be heard in this scene.",
    "What sound can be heard in this scene ?",
    "What can you see in this image? Answer concisely.",
    "Describe this image briefly.",
    "a dog barks while a car passes by",
    "a photo of a red bell and a dog",
    "someone is speaking and a bird chirps in the background",
]


def build_tokenizer(
    corpus: Iterable[str],
    *,
    vocab_size: int = 1000,
    image_token: bool = True,
    add_bos: bool = True,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `corpus` (+ the base corpus) and wrap it for transformers."""
    texts = list(BASE_CORPUS) + [t for t in corpus if t]
    specials = [UNK, BOS, EOS, PAD] + ([IMAGE] if image_token else [])
    core = Tokenizer(models.BPE(unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    bos_id = core.token_to_id(BOS)
    if add_bos:
        core.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
        )
    extra = {"image_token": IMAGE} if image_token else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        padding_side="left",
        extra_special_tokens=extra,
    )
