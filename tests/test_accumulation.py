"""Gradient accumulation and activation checkpointing on the tiny LLaVA: micro-batches weighted by
their share of the step's caption tokens add up to the full-batch gradient, and checkpointing the
frozen LLM changes memory, not the loss or the gradients.

    pytest tests/test_accumulation.py -x -q
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dalipipe.training import activation_checkpointing, micro_batch_size, micro_batches

# captions of unequal lengths: a mean of per-micro-batch means would weight tokens unequally
CAPTIONS = ["a dog barks", "a bell rings loudly twice in the distance", "birds", "a car passes"]
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


@pytest.fixture(scope="module")
def captioner(tiny_models):
    from dalipipe.models.captioner import AudioCaptioner

    captioner = AudioCaptioner.from_base(
        tiny_models.llava, audio_encoder=tiny_models.audio_encoder()
    )
    captioner.init_prefix(n_tokens=4, std=0.1, seed=0)
    captioner.trainable_parameters("prefix")
    captioner.trainable_parameters("audio_projector")
    return captioner


@pytest.fixture(scope="module")
def inputs(captioner):
    frames = [np.full((40, 48, 3), c, dtype=np.uint8) for c in COLOURS]
    fbank = torch.from_numpy(np.random.default_rng(0).normal(size=(4, 64, 32)).astype(np.float32))
    return {"pixel_values": captioner.pixel_values(frames), "fbank": fbank}


def loss_and_grads(captioner, inputs, rows, *, modality, reduction="mean", scale=1.0):
    """The caption loss of examples `rows` (times `scale`), back-propagated: (loss, grads)."""
    params = [captioner.prefix, *captioner.audio_projector.parameters()]
    for p in params:
        p.grad = None
    loss = (
        captioner.caption_loss(
            captions=[CAPTIONS[i] for i in rows],
            modality=modality,
            pixel_values=inputs["pixel_values"][rows],
            fbank=inputs["fbank"][rows],
            use_prefix=True,
            reduction=reduction,
        )
        * scale
    )
    loss.backward()
    return loss.detach(), [None if p.grad is None else p.grad.clone() for p in params]


def accumulated(captioner, inputs, rows, size, *, modality):
    """What the training loops do: each micro-batch's summed loss over the step's token count."""
    n_tokens = captioner.caption_token_count([CAPTIONS[i] for i in rows])
    total_loss, total_grads = 0.0, None
    for part in micro_batches(rows, size):
        loss, grads = loss_and_grads(
            captioner, inputs, part, modality=modality, reduction="sum", scale=1 / n_tokens
        )
        total_loss += loss
        if total_grads is None:
            total_grads = grads
        else:
            total_grads = [a if b is None else a + b for a, b in zip(total_grads, grads)]
    return total_loss, total_grads


def assert_grads_equal(actual, expected, atol=1e-6):
    assert any(g is not None and g.abs().max() > 0 for g in expected)
    for a, e in zip(actual, expected):
        if e is None:
            assert a is None
        else:
            torch.testing.assert_close(a, e, rtol=0, atol=atol)


def test_summed_loss_over_the_token_count_is_the_mean(captioner, inputs):
    rows = [0, 1, 2, 3]
    mean, _ = loss_and_grads(captioner, inputs, rows, modality="image")
    summed, _ = loss_and_grads(captioner, inputs, rows, modality="image", reduction="sum")
    count = captioner.caption_token_count([CAPTIONS[i] for i in rows])
    assert count > 4 * 2  # every caption's tokens and its end token
    torch.testing.assert_close(summed / count, mean, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="reduction"):
        captioner.caption_loss(captions=CAPTIONS[:1], modality="image", reduction="none")


@pytest.mark.parametrize("modality", ["image", "audio"])
def test_accumulated_gradient_is_the_full_batch_gradient(captioner, inputs, modality):
    rows = [2, 0, 1, 3]
    loss, grads = loss_and_grads(captioner, inputs, rows, modality=modality)
    for size in (1, 2, 3):
        acc_loss, acc_grads = accumulated(captioner, inputs, rows, size, modality=modality)
        torch.testing.assert_close(acc_loss, loss, rtol=0, atol=1e-6)
        assert_grads_equal(acc_grads, grads)
    # the naive mean of micro-batch means is another gradient: the test can tell them apart
    halves = [loss_and_grads(captioner, inputs, h, modality=modality)[1] for h in ([2, 0], [1, 3])]
    naive = [None if a is None else (a + b) / 2 for a, b in zip(*halves)]
    trained = 0 if modality == "image" else 1  # the prefix or the projector's first weight
    assert not torch.allclose(naive[trained], grads[trained], rtol=0, atol=1e-5)


def saved_bytes_loss_and_grads(captioner, inputs, rows, modality):
    """Bytes autograd saves for the backward during the forward, then (loss, grads)."""
    saved = {"bytes": 0}

    def pack(tensor):
        saved["bytes"] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = captioner.caption_loss(
            captions=[CAPTIONS[i] for i in rows],
            modality=modality,
            pixel_values=inputs["pixel_values"][rows],
            fbank=inputs["fbank"][rows],
            use_prefix=True,
        )
    params = [captioner.prefix, *captioner.audio_projector.parameters()]
    for p in params:
        p.grad = None
    loss.backward()
    return (
        saved["bytes"],
        loss.detach(),
        [None if p.grad is None else p.grad.clone() for p in params],
    )


@pytest.mark.parametrize("modality", ["image", "audio"])
def test_checkpointing_keeps_loss_and_gradients_and_saves_less(captioner, inputs, modality):
    rows = [0, 1, 2, 3]
    assert captioner.llava.config.text_config.num_hidden_layers == 2
    plain_bytes, plain_loss, plain_grads = saved_bytes_loss_and_grads(
        captioner, inputs, rows, modality
    )
    with activation_checkpointing(captioner.language_model):
        ckpt_bytes, ckpt_loss, ckpt_grads = saved_bytes_loss_and_grads(
            captioner, inputs, rows, modality
        )
    torch.testing.assert_close(ckpt_loss, plain_loss, rtol=0, atol=1e-6)
    assert_grads_equal(ckpt_grads, plain_grads)
    # measured: 4.1 MB without, 1.4 MB with (two layers; the LM head's logits remain)
    assert ckpt_bytes < 0.6 * plain_bytes
    again_bytes, _, _ = saved_bytes_loss_and_grads(captioner, inputs, rows, modality)
    assert again_bytes == plain_bytes  # off again after the block


def test_checkpointing_raises_only_the_decoder_layers_own_training_flag(captioner):
    from transformers.modeling_layers import GradientCheckpointingLayer

    language_model = captioner.language_model
    with activation_checkpointing(language_model):
        layers = [m for m in language_model.modules() if isinstance(m, GradientCheckpointingLayer)]
        assert len(layers) == 2 and all(layer.training for layer in layers)
        assert all(layer.gradient_checkpointing for layer in layers)
        # attention (whose dropout reads its own flag), MLP, norms: still eval; so is CLIP
        children = [m for layer in layers for m in layer.modules() if m is not layer]
        assert children and not any(m.training for m in children)
        assert not any(m.training for m in captioner.vision_tower.modules())
        assert not any(m.training for m in captioner.audio_encoder.modules())
        assert not language_model.training
    assert not any(m.training for m in captioner.llava.modules())
    assert not any(getattr(m, "gradient_checkpointing", False) for m in captioner.llava.modules())
    with activation_checkpointing(language_model, enabled=False):
        assert not any(m.training for m in captioner.llava.modules())


def test_micro_batch_size_must_divide_batch_size():
    assert micro_batch_size({"batch_size": 40, "micro_batch_size": None}, "distill") == 40
    assert micro_batch_size({"batch_size": 40}, "distill") == 40
    assert micro_batch_size({"batch_size": 40, "micro_batch_size": 8}, "distill") == 8
    with pytest.raises(ValueError, match=r"distill\.micro_batch_size=3 does not divide "):
        micro_batch_size({"batch_size": 40, "micro_batch_size": 3}, "distill")
    with pytest.raises(ValueError, match=r"prefix\.micro_batch_size=0"):
        micro_batch_size({"batch_size": 16, "micro_batch_size": 0}, "prefix")


def test_micro_batches_are_consecutive_slices():
    assert micro_batches([5, 1, 4, 2, 3], 2) == [[5, 1], [4, 2], [3]]
    assert micro_batches([5, 1], 4) == [[5, 1]]
