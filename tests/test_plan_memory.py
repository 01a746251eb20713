"""The memory plan (dalipipe.memory): estimates against a measured step, the paper config's
fit, the command's output and its overrides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dalipipe.memory import measure
from dalipipe.memory.plan import load_config, main, override, plan
from dalipipe.memory.stages import Planner

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "configs" / "paper.yaml"
GIB = 2**30

ENCODER = {  # a small CAV-MAE: 4 x 16 = 64 audio tokens, output 32 wide (the tiny CLIP width)
    "num_mel_bins": 64,
    "target_length": 256,
    "patch_size": 16,
    "embed_dim": 64,
    "depth": 1,
    "shared_depth": 0,
    "num_heads": 4,
    "mlp_ratio": 4.0,
    "out_dim": 32,
}
CAPTIONS = [
    "a dog barks twice while a car passes by on a wet road and a bird sings",
    "someone is speaking and a bird chirps in the background",
    "a bell rings",
    "rain falls on a roof and thunder rolls in the distance",
]


def make_llava(out: Path, vocab: int) -> Path:
    """A LLaVA of the real classes, 512 wide and 4 layers deep (activations dominate), its
    language model's vocabulary set to ``vocab`` (ids past the tokenizer's are never used)."""
    from transformers import LlavaForConditionalGeneration

    from dalipipe.models.llava_config import llava_config, llava_processor
    from dalipipe.models.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(CAPTIONS, vocab_size=600)
    config = llava_config(
        tokenizer,
        image_size=32,
        patch_size=8,
        vision_hidden=32,
        vision_layers=1,
        vision_heads=2,
        text_hidden=512,
        text_layers=4,
        text_heads=8,
    )
    config.text_config.vocab_size = vocab
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(out)
    llava_processor(tokenizer, 32, 8).save_pretrained(out)
    return out


@pytest.mark.parametrize(
    "dtype, vocab, checkpointing",
    [
        (torch.float32, 1000, False),  # activations dominate, float32 (a CPU run)
        (torch.bfloat16, 1000, False),  # bf16 weights, float32 projector under autocast (GPU)
        (torch.bfloat16, 1000, True),  # only the layer inputs kept, one layer recomputed
        (torch.float32, 32000, False),  # LLaMA's vocabulary: the caption's logits ~1/5 of the peak
    ],
    ids=["fp32", "bf16", "bf16-checkpointing", "fp32-vocab32k"],
)
def test_distill_estimate_matches_a_measured_step(tmp_path, dtype, vocab, checkpointing):
    """One distill step (caption_loss summed over a micro-batch, backward, AdamW on the audio
    projector) of a real-class LLaVA on the CPU, measured against the plan's estimate.

    What is measured: ``measure.peak_bytes``, the peak of the tensor storages the step creates
    (each ATen operator's new outputs, counted until a weakref on the storage reports it freed),
    i.e. what ``torch.cuda.max_memory_allocated`` tells on a GPU. It is exact and deterministic,
    so it holds on a busy 2-core machine where the peak RSS of a process (allocator caches,
    threads, other processes' pressure) would not. Tensors that exist before the step (the
    weights, the float32 projector and its Adam moments after a first step) are not counted,
    so the estimate's peak less those bytes, counted from the model itself, is compared. The
    estimate's own measurements are of a one-layer model, not of this one: per position and
    layer, scaled to 4 layers, the micro-batch and the positions the plan derives from the
    config (which must equal the step's padded length exactly: the tokenizer is on disk).
    """
    from dalipipe.caption.distill import summed_loss
    from dalipipe.models.captioner import AudioCaptioner, CaptionerOptions
    from dalipipe.models.cavmae import AudioEncoderConfig, CavMaeAudioEncoder
    from dalipipe.training import activation_checkpointing

    base = make_llava(tmp_path / "llava", vocab)
    options = CaptionerOptions(template="vicuna_v1")
    torch.manual_seed(0)
    encoder = CavMaeAudioEncoder(AudioEncoderConfig(**ENCODER))
    captioner = AudioCaptioner.from_base(base, options=options, audio_encoder=encoder, dtype=dtype)
    if dtype != torch.float32:
        captioner.audio_projector.float()  # as fit_projector does
    params = captioner.trainable_parameters("audio_projector")
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    rng = torch.Generator().manual_seed(0)
    examples = [
        {"caption": c, "fbank": torch.randn(256, 64, generator=rng).numpy()} for c in CAPTIONS
    ]
    settings = {"modality": "audio", "use_prefix": False}
    lengths = []
    captioner.llava.register_forward_pre_hook(
        lambda m, a, k: lengths.append(k["inputs_embeds"].shape[1]), with_kwargs=True
    )

    def step():
        optimizer.zero_grad(set_to_none=True)
        summed_loss(captioner, examples, settings).backward()
        optimizer.step()

    with activation_checkpointing(captioner.language_model, checkpointing):
        step()  # Adam's moments exist from here on, as in every step but the first
        measured = measure.peak_bytes(step)

    longest = max(len(captioner._caption_ids("vicuna_v1", options.prompt, c)) for c in CAPTIONS)
    config = {
        "models": {"captioner": str(base), "audio_encoder": ENCODER, "options": options.to_dict()},
        "pseudolabel": {"max_new_tokens": longest - 1},  # + the end token
        "distill": {
            "modality": "audio",
            "use_prefix": False,
            "batch_size": len(examples),
            "activation_checkpointing": checkpointing,
        },
    }
    est = Planner(config, dtype=dtype).estimate("distill")
    assert est.positions == lengths[-1]  # the layout derived from the config is the step's

    existing = sum(p.numel() * p.element_size() for p in captioner.parameters())
    existing += sum(p.numel() * 8 for p in params)  # Adam's two float32 moments
    trainable = sum(p.numel() for p in params)
    # the estimate's weights and optimizer state are the tensors that existed: check them too
    autocast_copies = trainable * 2 if dtype != torch.float32 else 0
    frozen_and_state = est.components["weights"] - autocast_copies
    frozen_and_state += est.components["optimizer_state"]
    assert frozen_and_state == pytest.approx(existing, rel=0.01)
    expected = est.peak - existing
    assert expected == pytest.approx(measured, rel=0.15), (est.components, measured)


def test_measured_layer_is_linear_in_positions():
    """The per-position bytes do not depend on which two lengths measure them (no term grows
    faster than the length, e.g. an attention matrix, hides in the slope)."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=100,
    )
    first = measure.decoder_layer(config, torch.float32)
    measure._CACHE.clear()
    saved = measure.LENGTHS
    try:
        measure.LENGTHS = (64, 160)
        second = measure.decoder_layer(config, torch.float32)
    finally:
        measure.LENGTHS = saved
        measure._CACHE.clear()
    assert second.saved == pytest.approx(first.saved, rel=0.01)
    assert second.forward == pytest.approx(first.forward, rel=0.05)
    # a float32 LLaMA layer saves at least its 2 norms' inputs, q, k, v, the attention output
    # and 3 MLP tensors: 4 bytes x (6 x hidden + 3 x intermediate) per position
    assert first.saved >= 4 * (6 * 256 + 3 * 688)


@pytest.fixture(scope="module")
def paper_plan():
    return plan(load_config([PAPER]), gpu_gb=80)


def test_paper_config_fits_80gb_in_every_stage(paper_plan):
    stages = {"filter", "prefix", "align", "pseudolabel", "distill", "evaluate"}
    assert set(paper_plan) == stages
    too_big = {s: row["peak_gb"] for s, row in paper_plan.items() if not row["fits"]}
    assert not too_big, f"configs/paper.yaml does not fit 80 GB: {too_big}"
    # the paper's numbers come from the pinned table (no model is downloaded here)
    assert paper_plan["distill"]["positions"] > 600  # 512 audio + ~60 text + 129 caption
    assert paper_plan["distill"]["weights_gb"] == pytest.approx(7.06e9 * 2 / GIB, rel=0.02)


def test_distill_without_checkpointing_does_not_fit():
    config = load_config([PAPER], ["distill.activation_checkpointing=false"])
    row = plan(config, gpu_gb=80)["distill"]
    assert not row["fits"]
    assert row["activations_gb"] > 90  # ~100 GiB: 40 x ~700 positions x 32 layers x ~130 kB
    assert 0 < row["max_micro_batch"] < 40


def test_json_output_override_and_max_micro_batch(capsys):
    assert main(["--configfile", str(PAPER), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    for stage, row in rows.items():
        assert isinstance(row["peak_gb"], float) and isinstance(row["fits"], bool), stage
        assert isinstance(row["max_micro_batch"], int), stage
        phases = {name: sum(row[f"{c}_gb"] for c in parts) for name, parts in row["phases"].items()}
        assert row["peak_gb"] == pytest.approx(max(phases.values()), abs=0.01), stage
        assert phases[row["peak_phase"]] == pytest.approx(row["peak_gb"], abs=0.01), stage
    assert (
        main(["--configfile", str(PAPER), "--config", "distill.micro_batch_size=8", "--json"]) == 0
    )
    smaller = json.loads(capsys.readouterr().out)
    assert smaller["distill"]["micro_batch"] == 8
    assert smaller["distill"]["peak_gb"] < rows["distill"]["peak_gb"]
    assert smaller["prefix"] == rows["prefix"]

    planner = Planner(load_config([PAPER]))
    gpu = 80 * GIB
    for stage in ("distill", "evaluate", "align"):
        m = rows[stage]["max_micro_batch"]
        assert planner.estimate(stage, m).peak <= gpu < planner.estimate(stage, m + 1).peak


def test_config_layers_and_overrides():
    base = {"a": {"b": 1, "c": {"d": 2}}, "e": [1]}
    assert override(base, "a.c.d=false") == {"a": {"b": 1, "c": {"d": False}}, "e": [1]}
    assert override(base, "a.b=null")["a"]["b"] is None
    assert override(base, "e=[2, 3]")["e"] == [2, 3]
    with pytest.raises(ValueError):
        override(base, "novalue")
    config = load_config([PAPER], ["distill.batch_size=8"])
    assert config["distill"]["batch_size"] == 8
    assert config["distill"]["lr"] == 2e-4  # the rest of paper.yaml's section
    assert config["distill"]["micro_batch_size"] is None  # a default from the schema
