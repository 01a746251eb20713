"""Tests of AudioCaptioner on a tiny LLaVA: equality with plain LLaVA, batching, gradients, files.

pytest tests/test_captioner.py -x -q
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from dalipipe.models.captioner import AudioCaptioner, CaptionerOptions, scored_tail
from dalipipe.prompts import TEMPLATES


@pytest.fixture(scope="module")
def frames():
    rs = np.random.RandomState(0)
    return [rs.randint(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(3)]


@pytest.fixture(scope="module")
def fbank():
    return torch.randn(3, 64, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def captioner(tiny_models):
    return AudioCaptioner.from_base(tiny_models.llava, audio_encoder=tiny_models.audio_encoder())


@pytest.mark.parametrize("template", ["vicuna_v1", "plain"])
def test_image_only_generation_equals_plain_llava(tiny_models, frames, template):
    cap = AudioCaptioner.from_base(tiny_models.llava, options={"template": template})
    ours = cap.generate(modality="image", pixel_values=cap.pixel_values(frames), max_new_tokens=8)

    model = LlavaForConditionalGeneration.from_pretrained(tiny_models.llava).eval()
    processor = AutoProcessor.from_pretrained(tiny_models.llava)
    text = TEMPLATES[template].format(prompt=cap.options.prompt)
    inputs = processor(
        images=[Image.fromarray(f) for f in frames], text=[text] * 3, return_tensors="pt"
    )
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    theirs = processor.batch_decode(
        out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
    )
    assert ours == [t.strip() for t in theirs]
    assert len(set(ours)) > 1  # the frames differ, so must the captions


def test_caption_loss_equals_llava_loss_on_caption_tokens(tiny_models, frames):
    cap = AudioCaptioner.from_base(tiny_models.llava, options={"template": "plain"})
    captions = ["a dog barks", "a bell rings twice and a bird sings"]
    ours = cap.caption_loss(
        captions=captions, modality="image", pixel_values=cap.pixel_values(frames[:2])
    )

    model = LlavaForConditionalGeneration.from_pretrained(tiny_models.llava).eval()
    processor = AutoProcessor.from_pretrained(tiny_models.llava)
    tok = processor.tokenizer
    prompt = TEMPLATES["plain"].format(prompt=cap.options.prompt)
    total, count = 0.0, 0
    for frame, caption in zip(frames[:2], captions):
        p = processor(images=[Image.fromarray(frame)], text=[prompt], return_tensors="pt")
        full = processor(
            images=[Image.fromarray(frame)], text=[f"{prompt} {caption}"], return_tensors="pt"
        )
        ids = torch.cat([full["input_ids"], torch.tensor([[tok.eos_token_id]])], dim=1)
        labels = ids.clone()
        labels[:, : p["input_ids"].shape[1]] = -100
        n = int((labels[:, 1:] != -100).sum())
        loss = model(input_ids=ids, pixel_values=full["pixel_values"], labels=labels).loss
        total, count = total + loss.item() * n, count + n
    # token-level mean over the batch: caption tokens and the end token only
    assert ours.item() == pytest.approx(total / count, rel=1e-5)


def test_caption_loss_runs_the_lm_head_on_the_scored_tail_only(captioner, frames, fbank):
    """The LM head sees each caption's positions and the one before them, none of the prompt's
    or the modality's; loss and gradient are those of every position's logits scored on the
    caption (what caption_loss computed before the head was cut to the tail)."""
    captioner.init_prefix(4, std=0.5, seed=0)
    captioner.trainable_parameters("prefix")
    captions = ["a dog barks", "a bell rings twice and a bird sings", "silence"]
    pixel_values = captioner.pixel_values(frames)
    seen = []
    hook = captioner.llava.lm_head.register_forward_hook(lambda m, a, out: seen.append(a[0].shape))
    loss = captioner.caption_loss(
        captions=captions,
        modality="audio+image",
        pixel_values=pixel_values,
        fbank=fbank,
        use_prefix=True,
    )
    hook.remove()
    loss.backward()
    grad, captioner.prefix.grad = captioner.prefix.grad, None

    options = captioner.options
    mm = captioner.modality_embeds("audio+image", pixel_values, fbank)
    seqs = [
        captioner._sequence(options.template, options.prompt, e, True, caption=c)
        for e, c in zip(mm, captions)
    ]
    embeds, mask, positions, labels = captioner._batch(seqs, left_pad=False)
    logits = captioner.llava(
        inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False
    ).logits
    every_position = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1)
    )
    every_position.backward()

    shortest_context = min(sample_labels.count(-100) for _, sample_labels in seqs)
    tail = labels.shape[1] - shortest_context + 1
    assert seen == [torch.Size([3, tail, 64])]
    assert tail < labels.shape[1] // 2  # a tail, not the sequence
    assert loss.item() == pytest.approx(every_position.item(), rel=1e-6)
    torch.testing.assert_close(grad, captioner.prefix.grad, rtol=1e-5, atol=1e-7)


def test_scored_tail_needs_a_scored_token_in_every_row():
    labels = torch.tensor([[-100, -100, 5, 6], [-100, 7, 8, -100]])
    assert scored_tail(labels) == 4  # from position 0, which predicts row 1's first label
    with pytest.raises(ValueError, match="no scored token"):
        scored_tail(torch.tensor([[-100, 5], [-100, -100]]))


def test_batched_greedy_equals_one_by_one(captioner, frames, fbank):
    prompts = ["Describe the sound.", "What sound can be heard in this scene ?", "Describe it."]
    pv = captioner.pixel_values(frames)
    kwargs = dict(modality="audio+image", use_prefix=True, max_new_tokens=8)
    captioner.init_prefix(4, std=0.5, seed=0)
    batched = captioner.generate(pixel_values=pv, fbank=fbank, prompt=prompts, **kwargs)
    single = [
        captioner.generate(
            pixel_values=pv[i : i + 1], fbank=fbank[i : i + 1], prompt=prompts[i], **kwargs
        )[0]
        for i in range(3)
    ]
    assert batched == single


def test_prefix_gets_gradients_and_nothing_frozen_does(captioner, frames, fbank):
    captioner.init_prefix(16)
    params = captioner.trainable_parameters("prefix")
    assert params[0].shape == (16, 64) and params[0].std().item() < 1e-3
    loss = captioner.caption_loss(
        captions=["a dog barks", "a bell rings", "silence"],
        modality="audio+image",
        pixel_values=captioner.pixel_values(frames),
        fbank=fbank,
        use_prefix=True,
    )
    loss.backward()
    with_grad = [n for n, p in captioner.named_parameters() if p.grad is not None]
    assert with_grad == ["prefix"]
    assert captioner.prefix.grad.abs().sum() > 0


def test_audio_projector_trains_and_starts_as_image_projector(captioner, fbank):
    for a, b in zip(captioner.audio_projector.parameters(), captioner.image_projector.parameters()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    captioner.trainable_parameters("audio_projector")
    captioner.caption_loss(captions=["a dog barks"] * 3, modality="audio", fbank=fbank).backward()
    with_grad = {n.split(".")[0] for n, p in captioner.named_parameters() if p.grad is not None}
    assert with_grad == {"audio_projector"}


def test_prefix_and_modality_placement(captioner, frames):
    captioner.init_prefix(2)
    captioner.prefix.data.fill_(7.0)
    mm = captioner.modality_embeds("image", captioner.pixel_values(frames[:1]))[0]
    before, after = captioner._prompt_ids("vicuna_v1", "hi")
    seq, labels = captioner._sequence("vicuna_v1", "hi", mm, use_prefix=True)
    k, n = len(before), mm.shape[0]
    assert torch.equal(seq[k : k + n], mm)
    assert torch.all(seq[k + n : k + n + 2] == 7.0)
    assert seq.shape[0] == k + n + 2 + len(after) and set(labels) == {-100}
    captioner.options.prefix_position = "start"
    seq, _ = captioner._sequence("vicuna_v1", "hi", mm, use_prefix=True)
    assert torch.all(seq[1:3] == 7.0) and torch.equal(seq[k + 2 : k + 2 + n], mm)


def test_audio_image_puts_image_tokens_first(captioner, frames, fbank):
    pv = captioner.pixel_values(frames)
    both = captioner.modality_embeds("audio+image", pv, fbank)
    image = captioner.modality_embeds("image", pv)
    audio = captioner.modality_embeds("audio", fbank=fbank)
    assert both.shape == (3, 16 + 8, 64)
    assert torch.equal(both, torch.cat([image, audio], dim=1))


def test_share_projector_routes_image_tokens_through_audio_projector(tiny_models, frames):
    cap = AudioCaptioner.from_base(tiny_models.llava, options={"share_projector": True})
    pv = cap.pixel_values(frames[:1])
    before = cap.modality_embeds("image", pv)
    with torch.no_grad():
        cap.audio_projector.linear_2.bias.add_(1.0)
    assert torch.allclose(cap.modality_embeds("image", pv), before + 1.0, atol=1e-5)


def test_seeded_sampling_is_reproducible(captioner, fbank):
    kw = dict(modality="audio", fbank=fbank, do_sample=True, temperature=1.0, max_new_tokens=8)
    a = captioner.generate(seed=3, **kw)
    assert a == captioner.generate(seed=3, **kw)
    assert a != captioner.generate(seed=4, **kw)


def test_save_dir_round_trip(captioner, tmp_path, frames, fbank):
    captioner.init_prefix(4, std=0.3, seed=1)
    with torch.no_grad():
        captioner.audio_projector.linear_1.weight.mul_(1.5)
    captioner.save_dir(tmp_path / "cap", metadata={"fbank": {"num_mel_bins": 32}})
    info = json.loads((tmp_path / "cap" / "captioner.json").read_text())
    assert info["base"] == str(captioner.base)
    assert info["options"]["prompt"] == "Describe the sound that can be heard in this scene."
    loaded = AudioCaptioner.from_dir(tmp_path / "cap")
    assert loaded.metadata == {"fbank": {"num_mel_bins": 32}}
    kw = dict(modality="audio+image", pixel_values=captioner.pixel_values(frames), fbank=fbank)
    assert loaded.generate(use_prefix=True, **kw) == captioner.generate(use_prefix=True, **kw)
    assert torch.equal(loaded.prefix, captioner.prefix)
    assert torch.equal(
        loaded.audio_projector.linear_1.weight, captioner.audio_projector.linear_1.weight
    )


def test_real_image_geometry_gives_576_clip_tokens(tiny_models):
    cap = AudioCaptioner.from_base(tiny_models.llava_336)
    frame = np.zeros((224, 300, 3), dtype=np.uint8)  # padded to a square, then 336 px
    pv = cap.pixel_values([frame])
    assert pv.shape == (1, 3, 336, 336)
    assert cap.image_tokens(pv).shape == (1, 576, 32)


def test_clear_errors(tiny_models, frames):
    cap = AudioCaptioner.from_base(tiny_models.llava)
    with pytest.raises(ValueError, match="no audio encoder"):
        cap.generate(modality="audio", fbank=torch.zeros(1, 64, 32))
    with pytest.raises(ValueError, match="modality 'video'"):
        cap.generate(modality="video", pixel_values=cap.pixel_values(frames))
    with pytest.raises(ValueError, match="use_prefix"):
        cap.generate(modality="image", pixel_values=cap.pixel_values(frames), use_prefix=True)
    with pytest.raises(ValueError, match="prefix_position"):
        CaptionerOptions(prefix_position="middle")
    assert CaptionerOptions(prompt="paper").prompt == "What sound can be heard in this scene ?"


def widescreen_frame() -> np.ndarray:
    """A 640x360 (16:9) frame: red, with blue bands in its outer 100 columns on each side, so
    that a centre crop sees only red."""
    frame = np.zeros((360, 640, 3), dtype=np.uint8)
    frame[:] = (200, 30, 30)
    frame[:, :100] = frame[:, -100:] = (30, 30, 200)
    return frame


@pytest.mark.parametrize("aspect, expected_padding", [("pad", 1 - 360 / 640), ("crop", 0.0)])
def test_image_aspect_pads_or_centre_crops_a_widescreen_frame(
    tiny_models, aspect, expected_padding
):
    """pad: LLaVA-1.5's square letterbox in the CLIP mean (0 after normalisation), 44% of a
    16:9 frame; crop: resize the short side, then the centre square, as CAV-MAE's frames are."""
    cap = AudioCaptioner.from_base(tiny_models.llava_336, options={"image_aspect": aspect})
    pixels = cap.pixel_values([widescreen_frame()])[0]  # (3, 336, 336), normalised
    padded_rows = (pixels.abs() < 1e-2).all(dim=0).all(dim=1).float().mean().item()
    assert padded_rows == pytest.approx(
        expected_padding, abs=4 / 336
    )  # resampling blends ~1 row per edge
    blue_columns = (pixels[2] > pixels[0]).any(dim=0).float().mean().item()
    assert blue_columns > 0.2 if aspect == "pad" else blue_columns == 0.0


def test_the_paper_preset_centre_crops_frames_as_the_authors_did():
    """The authors' frames are centre crops, so padding never acts on them; letterboxing would
    make 44% of the 576 CLIP target tokens of a 16:9 frame describe grey padding."""
    from pathlib import Path

    import yaml

    paper = yaml.safe_load((Path(__file__).parents[1] / "configs" / "paper.yaml").read_text())
    assert CaptionerOptions.from_dict(paper["models"]["options"]).image_aspect == "crop"
