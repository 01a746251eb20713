"""Caption generation that computes the shared prompt prefix once and keeps a preallocated cache.

Every sequence a captioner generates from starts with the same positions: BOS, the system text
and "USER: " (and the learned prefix, for prefix_position "start" or "before_modality").
`generate_fast` runs the decoder over them once, at batch 1, copies their keys and values into
the batch's cache, and lets transformers' own `generate` continue from that cache over the rest of
each sequence, so logits processing, stopping and sampling are the plain path's.

- `static_cache`: the cache is preallocated for the prompt plus the new tokens (`StaticCache`), so
  a decode step writes its keys and values in place. transformers' default cache concatenates
  the whole cache at every step: at the pseudo-label shape (batch 64, ~1,150 positions, a 7B
  Llama in bf16) that is ~40 GB read and written per step, about half of a decode step's time.
- `compile`: transformers compiles the decode step (it does so only on a GPU, and only with the
  static cache); the first batch of each shape pays the compilation, so it is worth it for long
  runs of equal batches only.

Rows of different lengths (one prompt per clip) are padded in the middle, right after the shared
part, so that part stays aligned; positions come from the attention mask, so each row's tokens
get the positions the plain path's left padding gives them.
"""

from __future__ import annotations

import inspect

import torch


def cache_keyword(module) -> str:
    """The name under which `module.forward` takes the KV cache: `cache` in the transformers
    this project pins, `past_key_values` in the earlier 5.x releases."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def shared_length(sequences: list[torch.Tensor]) -> int:
    """How many leading positions hold the same embedding in every sequence. At least the last
    position of each sequence is left out: the batch's own forward pass must produce the logits
    of the first new token."""
    first = sequences[0]
    limit = min(s.shape[0] for s in sequences) - 1
    same = torch.ones(limit, dtype=torch.bool, device=first.device)
    for s in sequences[1:]:
        same &= (s[:limit] == first[:limit]).all(dim=-1)
    return int(same.long().cumprod(0).sum()) if limit > 0 else 0


def mid_padded(
    sequences: list[torch.Tensor], shared: int, pad_embed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack the sequences with each row's padding placed after its first `shared` positions;
    returns the embeddings (batch, longest, width) and the 0/1 attention mask."""
    longest = max(s.shape[0] for s in sequences)
    rows, masks = [], []
    for s in sequences:
        n_pad = longest - s.shape[0]
        rows.append(torch.cat([s[:shared], pad_embed.expand(n_pad, -1), s[shared:]]))
        masks.append([1] * shared + [0] * n_pad + [1] * (s.shape[0] - shared))
    return torch.stack(rows), torch.tensor(masks, device=pad_embed.device)


def reusable(cache, batch_size: int, max_cache_len: int, like: torch.Tensor) -> bool:
    """Whether a StaticCache of an earlier call has the shape and kind this call needs."""
    from transformers import StaticCache

    if not isinstance(cache, StaticCache) or not cache.layers[0].is_initialized:
        return False
    keys = cache.layers[0].keys
    return (
        keys.shape[0] == batch_size
        and keys.shape[2] == max_cache_len
        and keys.dtype == like.dtype
        and keys.device == like.device
    )


def prefilled_cache(
    llava, shared: torch.Tensor, batch_size: int, max_cache_len: int | None, reuse=None
):
    """A cache for `batch_size` rows holding the keys and values of the `shared` embeddings
    (computed once, at batch 1). `max_cache_len`: a StaticCache of that length (`reuse`, an
    earlier one, is emptied and taken if it fits); None: the growing DynamicCache the plain
    `generate` uses."""
    from transformers import DynamicCache, StaticCache

    once = DynamicCache(config=llava.config)
    if shared.shape[0]:
        positions = torch.arange(shared.shape[0], device=shared.device)[None]
        decoder = llava.model.language_model
        decoder(
            inputs_embeds=shared[None],
            position_ids=positions,
            use_cache=True,
            **{cache_keyword(decoder): once},
        )
    if max_cache_len is None:
        cache = DynamicCache(config=llava.config)
    elif reusable(reuse, batch_size, max_cache_len, llava.lm_head.weight):
        cache = reuse
        cache.reset()
    else:
        cache = StaticCache(config=llava.config, max_cache_len=max_cache_len)
    if shared.shape[0]:
        for index, layer in enumerate(once.layers):
            keys = layer.keys.expand(batch_size, -1, -1, -1).contiguous()
            values = layer.values.expand(batch_size, -1, -1, -1).contiguous()
            cache.update(keys, values, index)
    return cache


def generate_fast(
    llava,
    sequences: list[torch.Tensor],
    pad_embed: torch.Tensor,
    *,
    max_new_tokens: int,
    share_prefix: bool = True,
    static_cache: bool = True,
    compile: bool = False,
    reuse=None,
    **generate_kwargs,
):
    """New token ids (batch, steps) for input-embedding sequences, as `llava.generate` from
    `inputs_embeds` gives them (`generate_kwargs` go to it unchanged), and the cache used. Pass
    that cache back as `reuse` on the next call when compiling: a compiled decode step keeps
    working on the same cache tensors instead of meeting new ones every batch. `share_prefix`
    False: every row computes its own first positions (only the cache differs from the plain
    path), which isolates the two levers when measuring them: a prefilled cache makes the batch's
    prefill attend with an explicit mask, where the plain path's unpadded batch is plainly causal
    (flash attention on a GPU)."""
    shared = shared_length(sequences) if share_prefix else 0
    embeds, mask = mid_padded(sequences, shared, pad_embed)
    max_cache_len = embeds.shape[1] + max_new_tokens if static_cache else None
    cache = prefilled_cache(llava, sequences[0][:shared], len(sequences), max_cache_len, reuse)
    tokens = llava.generate(
        inputs_embeds=embeds,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        **{cache_keyword(llava): cache},
        disable_compile=not compile,
        **generate_kwargs,
    )
    return tokens, cache
