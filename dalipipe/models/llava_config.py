"""A LLaVA-1.5-class model's config and processor at any size, without its weights.

    config = llava_config(tokenizer, image_size=32, patch_size=8, text_hidden=64)
    processor = llava_processor(tokenizer, image_size=32, patch_size=8)

The miniature's bootstrap captioner is built from them and trained; plan-memory sizes it from
the same config before it exists; tests and the rehearsal build random-weight checkpoints from
them (dalipipe/testing/checkpoints.py). CLIP_MEAN and CLIP_STD are CLIP's normalisation, which
LLaVA-1.5's processor applies and the bootstrap applies to its frames.
"""

from __future__ import annotations

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def llava_config(
    tokenizer,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    vision_heads: int = 2,
    text_hidden: int = 64,
    text_layers: int = 2,
    text_heads: int = 4,
    max_positions: int = 1024,
    vocab_size: int | None = None,
    text_intermediate: int | None = None,
):
    """vocab_size: the LM's rows (default: the tokenizer's length; LLaVA-1.5 pads 32002 tokens
    to 32064 rows); text_intermediate: the MLP width (default: about 8/3 of text_hidden)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=4 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=text_hidden,
        intermediate_size=text_intermediate or int(8 / 3 * text_hidden) // 8 * 8,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        num_key_value_heads=text_heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(tokenizer.image_token),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


def llava_processor(tokenizer, image_size: int, patch_size: int):
    from transformers import CLIPImageProcessor, LlavaProcessor

    images = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_convert_rgb=True,
    )
    # num_additional_image_tokens=1: CLIP's CLS is counted, then dropped by the "default"
    # strategy; without it the processor inserts one image token too few.
    return LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
