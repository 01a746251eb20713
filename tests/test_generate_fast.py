"""The fast generation path (dalipipe/models/fast_generate.py) gives the plain path's tokens.

    pytest tests/test_generate_fast.py -x -q

Both paths run on the same tiny captioner; every new token id is compared, not only the text.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dalipipe.models.captioner import AudioCaptioner
from dalipipe.models.fast_generate import shared_length

N_CLIPS = 7  # batches of 3 leave a last batch of 1


@pytest.fixture(scope="module")
def frames():
    rs = np.random.RandomState(1)
    return [rs.randint(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(N_CLIPS)]


@pytest.fixture(scope="module")
def fbank():
    return torch.randn(N_CLIPS, 64, 32, generator=torch.Generator().manual_seed(1))


def make_captioner(tiny_models, **options):
    torch.manual_seed(0)  # the audio encoder's random init
    captioner = AudioCaptioner.from_base(
        tiny_models.llava, options=options, audio_encoder=tiny_models.audio_encoder()
    )
    captioner.init_prefix(4, std=0.5, seed=0)  # large, so the prefix changes captions
    return captioner


def new_tokens(captioner, frames, fbank, *, batch_size, modality, **kwargs):
    """Captions and the new token ids of every clip, generated `batch_size` clips at a time."""
    recorded = []
    generate = captioner.llava.generate

    def recording(*args, **kw):
        out = generate(*args, **kw)
        recorded.extend(out.tolist())
        return out

    captioner.llava.generate = recording
    captions = []
    try:
        for start in range(0, len(fbank), batch_size):
            batch = slice(start, start + batch_size)
            captions += captioner.generate(
                modality=modality,
                pixel_values=captioner.pixel_values(frames[batch]) if "image" in modality else None,
                fbank=fbank[batch] if "audio" in modality else None,
                **kwargs,
            )
    finally:
        captioner.llava.generate = generate
    return captions, recorded


def assert_same(captioner, frames, fbank, **kwargs):
    plain = new_tokens(captioner, frames, fbank, fast=False, **kwargs)
    fast = new_tokens(captioner, frames, fbank, fast=True, **kwargs)
    assert fast[1] == plain[1]
    assert fast[0] == plain[0]
    assert len(set(plain[0])) > 1  # the clips differ, so must their captions
    return plain


CASES = [  # (modality, use_prefix, static_cache): the growing cache with both prefix settings
    (modality, use_prefix, True)
    for modality in ("audio+image", "audio", "image")
    for use_prefix in (True, False)
] + [("audio+image", True, False), ("audio", False, False)]


@pytest.mark.parametrize("modality, use_prefix, static_cache", CASES)
def test_fast_greedy_tokens_equal_plain(
    tiny_models, frames, fbank, modality, use_prefix, static_cache
):
    captioner = make_captioner(tiny_models)
    assert_same(
        captioner,
        frames,
        fbank,
        batch_size=3,
        modality=modality,
        use_prefix=use_prefix,
        static_cache=static_cache,
        max_new_tokens=8,
    )


def test_static_cache_alone(tiny_models, frames, fbank):
    """share_prefix=False: no batch-1 pass; the whole batch starts from an empty static cache."""
    captioner = make_captioner(tiny_models)
    seen = []
    hook = captioner.language_model.register_forward_pre_hook(
        lambda _, args, kw: seen.append(kw["inputs_embeds"].shape[0]), with_kwargs=True
    )
    try:
        assert_same(
            captioner,
            frames,
            fbank,
            batch_size=4,
            modality="audio+image",
            use_prefix=True,
            share_prefix=False,
            max_new_tokens=6,
        )
    finally:
        hook.remove()
    assert set(seen) == {4, 3}  # 7 clips: batches of 4 and 3, no pass at batch 1


@pytest.mark.parametrize("position", ["start", "before_modality"])
def test_prefix_in_the_shared_part(tiny_models, frames, fbank, position):
    """With the prefix before the modality tokens, it is part of what is computed once."""
    captioner = make_captioner(tiny_models, prefix_position=position)
    before, _ = captioner._prompt_ids("vicuna_v1", captioner.options.prompt)
    mm = captioner.modality_embeds("audio", None, fbank[:3])
    seqs = [captioner._sequence("vicuna_v1", captioner.options.prompt, m, True)[0] for m in mm]
    assert shared_length(seqs) == len(before) + 4
    assert_same(captioner, frames, fbank, batch_size=4, modality="audio", use_prefix=True)


def test_the_batch_forward_skips_the_shared_positions(tiny_models, frames, fbank):
    captioner = make_captioner(tiny_models)
    template = captioner.options.generate_template or captioner.options.template
    before, after = captioner._prompt_ids(template, captioner.options.prompt)
    seen = []
    hook = captioner.language_model.register_forward_pre_hook(
        lambda _, args, kw: seen.append(
            (*kw["inputs_embeds"].shape[:2], type(kw["cache"]).__name__)
        ),
        with_kwargs=True,
    )
    try:
        captioner.generate(
            modality="audio", fbank=fbank[:5], use_prefix=True, max_new_tokens=3, fast=True
        )
    finally:
        hook.remove()
    n_audio = captioner.modality_embeds("audio", None, fbank[:1]).shape[1]
    rest = n_audio + 4 + len(after)
    # the shared positions once (into a growing cache, copied to the batch's static one), then
    # the rest of each sequence, then one position per new token
    assert seen == [
        (1, len(before), "DynamicCache"),
        (5, rest, "StaticCache"),
        (5, 1, "StaticCache"),
        (5, 1, "StaticCache"),
    ]


def test_end_token_at_different_steps(tiny_models, frames, fbank):
    """The end token's output row is made a copy of a token the captions use mid-way, so that
    captions stop where that token would have come (argmax ties go to the lower id, the end
    token's): rows finish at different steps and the finished ones are padded."""
    captioner = make_captioner(tiny_models)
    kwargs = dict(batch_size=4, modality="audio+image", use_prefix=True, max_new_tokens=12)
    _, tokens = new_tokens(captioner, frames, fbank, fast=False, **kwargs)
    eos = captioner.tokenizer.eos_token_id
    first_steps: dict[int, set] = {}  # token -> the steps at which it first comes, over rows
    for row in tokens:
        for token in set(row) - set(captioner.tokenizer.all_special_ids):
            if row.index(token) > 0:
                first_steps.setdefault(token, set()).add(row.index(token))
    stopper = max(first_steps, key=lambda t: len(first_steps[t]))
    with torch.no_grad():
        captioner.llava.lm_head.weight[eos] = captioner.llava.lm_head.weight[stopper]
    _, tokens = assert_same(captioner, frames, fbank, **kwargs)
    ends = {row.index(eos) for row in tokens if eos in row}
    assert len(ends) >= 2, f"the end token came at steps {ends} only"
    pad = captioner.tokenizer.pad_token_id
    assert all(set(row[row.index(eos) + 1 :]) <= {pad} for row in tokens if eos in row)


def test_prompts_of_different_lengths(tiny_models, frames, fbank):
    """One prompt per clip: rows padded after the shared part, positions from the mask."""
    captioner = make_captioner(tiny_models)
    prompts = ["Describe the sound.", "What sound can be heard in this scene ?", "Say it."]
    kwargs = dict(modality="audio", use_prefix=True, max_new_tokens=8)
    plain = captioner.generate(fbank=fbank[:3], prompt=prompts, fast=False, **kwargs)
    fast = captioner.generate(fbank=fbank[:3], prompt=prompts, fast=True, **kwargs)
    one_by_one = [
        captioner.generate(fbank=fbank[i : i + 1], prompt=prompts[i], fast=False, **kwargs)[0]
        for i in range(3)
    ]
    assert fast == plain == one_by_one


def test_sampled_decoding_is_the_plain_paths(tiny_models, frames, fbank):
    captioner = make_captioner(tiny_models)
    kwargs = dict(
        batch_size=3, modality="audio", do_sample=True, temperature=1.0, seed=5, max_new_tokens=8
    )
    assert_same(captioner, frames, fbank, **kwargs)


def test_shared_length_leaves_the_last_position(tiny_models):
    same = torch.ones(6, 4)
    assert shared_length([same, same.clone()]) == 5
    other = same.clone()
    other[2, 1] = 0
    assert shared_length([same, other]) == 2
    assert shared_length([same]) == 5


@pytest.mark.slow
def test_compiled_decode_step_gives_the_same_tokens(tiny_models, frames, fbank):
    """transformers compiles the decode step on a GPU only; here it is made to on the CPU
    (minutes). The static cache of the first batch is kept and reused by the next one."""
    from transformers import CompileConfig

    captioner = make_captioner(tiny_models)
    compile_config = CompileConfig()
    compile_config._compile_all_devices = True  # transformers' own switch for testing on CPU
    generate = captioner.llava.generate
    captioner.llava.generate = lambda *a, **kw: generate(*a, compile_config=compile_config, **kw)
    kwargs = dict(batch_size=3, modality="audio", use_prefix=True, max_new_tokens=6, compile=True)
    plain = new_tokens(captioner, frames[:6], fbank[:6], fast=False, **kwargs)
    kept = []
    for _ in range(2):
        fast = new_tokens(captioner, frames[:6], fbank[:6], fast=True, **kwargs)
        assert fast == plain
        kept.append(captioner._compiled_cache)
    assert kept[0] is kept[1] is not None
