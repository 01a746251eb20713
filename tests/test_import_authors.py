"""`dalipipe import-authors`: the authors' released DALI files as a trained-captioner directory.

The files are written here with the authors' key names (docs/authors-implementation.md §2, §8):
`audio_backbone.pth` is the state dict of `DataParallel(CAVMAE(use_clip, dali, x_attn))`,
`prefixMLP.bin` holds LLaVA's `model.mm_projector.{0,2}`, `prefix.bin` `model.audio_tower.prefix`.
Every tensor is drawn from a generator seeded by its own key, so a test can draw it again to
compare, one tensor at a time, instead of holding two copies of a 87M-parameter encoder.

    pytest tests/test_import_authors.py -x -q
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dalipipe import cli
from dalipipe.models.artifacts import load_state, read_config
from tests.support.authors import backbone_shapes, drawn, write_authors_files

# The authors' CAV-MAE audio branch and projector (cav_mae.py:121-210, LLaVA-1.5-7B).
PAPER = dict(mel=128, frames=1024, patch=16, width=768, depth=11, out=1024)
LM_WIDTH = 4096
# A small version for the tiny LLaVA of tests/conftest.py (image tokens 32 wide, LM 64 wide).
SMALL = dict(mel=32, frames=64, patch=16, width=32, depth=2, out=32)
SMALL_CONFIG = dict(
    num_mel_bins=32, target_length=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, out_dim=32
)
WAV = Path("/work/shared/data/clips/vggsound_FwVYUHKoLtQ_000034.wav")

# What the import keeps of the backbone: the audio branch, each block with the norms it runs.
AUDIO_BRANCH = re.compile(
    r"^module\.(patch_embed_a\.|pos_embed_a$|modality_a$|norm_a\.|proj\."
    r"|blocks_a\.\d+\.(norm1|norm2|attn|mlp)\.|blocks_u\.\d+\.(norm1_a|norm2_a|attn|mlp)\.)"
)


def import_argv(files: Path, base, out: Path, *, prefix: bool = True, sizes=None) -> list[str]:
    argv = ["import-authors", "--backbone", str(files / "audio_backbone.pth")]
    argv += ["--mlp", str(files / "prefixMLP.bin"), "--base", str(base), "--out", str(out)]
    if prefix:
        argv += ["--prefix", str(files / "prefix.bin")]
    if sizes:
        argv += ["--encoder-config", json.dumps(sizes)]
    return argv


@pytest.fixture(scope="module")
def paper_base(tmp_path_factory) -> Path:
    """The config of LLaVA-1.5-7B's widths (image tokens 1024, LM 4096): all the import reads."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    out = tmp_path_factory.mktemp("llava-1.5-widths")
    vision = CLIPVisionConfig(
        hidden_size=1024, num_attention_heads=16, image_size=336, patch_size=14
    )
    text = LlamaConfig(hidden_size=LM_WIDTH, num_attention_heads=32, vocab_size=32064)
    LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-2).save_pretrained(
        out
    )
    return out


@pytest.fixture(scope="module")
def small_files(tmp_path_factory) -> Path:
    return write_authors_files(tmp_path_factory.mktemp("authors-small"), SMALL, 64, n_prefix=4)


@pytest.fixture(scope="module")
def paper_import(tmp_path_factory, paper_base) -> tuple[Path, Path]:
    """(the authors' files at the paper's sizes, the directory import-authors made of them)."""
    root = tmp_path_factory.mktemp("authors-paper")
    files = write_authors_files(root / "zenodo", PAPER, LM_WIDTH)
    out = root / "authors"
    assert cli.main(import_argv(files, paper_base, out)) == 0
    return files, out


# --- the authors' chain, transcribed from their code -------------------------------------------
# Written from hugomalard/AnEyeForAnEar (cav-mae/src/models/cav_mae.py: `Block`, timm's
# `Attention` and `Mlp` it imports, `CAVMAE.forward_audio_feat`, `proj`; LLaVA/llava/model:
# `llava_arch.encode_audios`, `multimodal_projector/builder.py` `mlp2x_gelu`), on the tensors of
# their files under their own key names, without dalipipe's modules, in float64.


def _linear(x, state, name):
    return F.linear(x, state[name + ".weight"].double(), state[name + ".bias"].double())


def _layer_norm(x, state, name):
    weight, bias = state[name + ".weight"].double(), state[name + ".bias"].double()
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps=1e-5)  # nn.LayerNorm's default


def _timm_attention(x, state, name, heads):
    """qkv in one Linear, heads split from it, softmax(q k^T / sqrt(head width)) v, then proj."""
    batch, tokens, width = x.shape
    qkv = _linear(x, state, name + ".qkv").reshape(batch, tokens, 3, heads, width // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    attention = (q @ k.transpose(-2, -1) * (width // heads) ** -0.5).softmax(dim=-1)
    return _linear(
        (attention @ v).transpose(1, 2).reshape(batch, tokens, width), state, name + ".proj"
    )


def _cavmae_block(x, state, name, heads, norms):
    """`Block.forward(x, modality)`: pre-norm attention and MLP; `norms` picks the LayerNorms
    ("" for modality None, "_a" for audio)."""
    x = x + _timm_attention(
        _layer_norm(x, state, f"{name}.norm1{norms}"), state, name + ".attn", heads
    )
    hidden = F.gelu(
        _linear(_layer_norm(x, state, f"{name}.norm2{norms}"), state, name + ".mlp.fc1")
    )
    return x + _linear(hidden, state, name + ".mlp.fc2")


def authors_audio_tokens(backbone: dict, mlp: dict, fbank: torch.Tensor, heads: int):
    """`encode_audios`: forward_audio_feat, then proj (768 -> 1024), then mm_projector."""
    state = {k.removeprefix("module."): v for k, v in backbone.items()}
    patch = state["patch_embed_a.proj.weight"]
    image = fbank.double().unsqueeze(1).transpose(2, 3)  # (B, 1, mel, frames)
    x = F.conv2d(
        image, patch.double(), state["patch_embed_a.proj.bias"].double(), stride=patch.shape[-1]
    )
    x = x.flatten(2).transpose(1, 2) + state["pos_embed_a"].double() + state["modality_a"].double()
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks_a.")})
    for i in range(depth):
        x = _cavmae_block(x, state, f"blocks_a.{i}", heads, norms="")
    x = _cavmae_block(x, state, "blocks_u.0", heads, norms="_a")  # 12 - 11 shared blocks: one
    x = _linear(_layer_norm(x, state, "norm_a"), state, "proj")
    hidden = F.gelu(_linear(x, mlp, "model.mm_projector.0"))  # nn.Sequential(Linear, GELU, Linear)
    return _linear(hidden, mlp, "model.mm_projector.2")


def test_the_imported_models_audio_tokens_are_the_authors(tmp_path, paper_base):
    """Forward parity at the paper's widths: a random 10-s filterbank (1024 x 128) through the
    imported encoder and projector (LLaVA-hf's own projector class) gives the tokens the authors'
    chain gives on their files, 512 tokens of 4096. Two audio blocks instead of eleven (then the
    shared one), to keep the test short on a CPU; test_real_shapes_import_to_the_same_tensors
    checks that all eleven are imported."""
    from transformers import LlavaConfig
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    from dalipipe.models.cavmae import load_encoder

    files = write_authors_files(tmp_path / "zenodo", dict(PAPER, depth=2), LM_WIDTH)
    out = tmp_path / "authors"
    assert cli.main(import_argv(files, paper_base, out, sizes={"depth": 2})) == 0
    fbank = torch.randn(
        1, PAPER["frames"], PAPER["mel"], generator=torch.Generator().manual_seed(7)
    )
    encoder = load_encoder(out, dtype=torch.float64).eval()
    assert encoder.config.embed_dim == 768 and encoder.config.num_tokens == 512
    projector = LlavaMultiModalProjector(LlavaConfig.from_pretrained(paper_base))
    projector.load_state_dict(load_state(out / "audio_projector.safetensors"), strict=True)
    with torch.no_grad():
        ours = projector.double()(encoder(fbank.double()))
        theirs = authors_audio_tokens(
            torch.load(files / "audio_backbone.pth", weights_only=True),
            torch.load(files / "prefixMLP.bin", weights_only=True),
            fbank,
            heads=12,
        )
    assert ours.shape == theirs.shape == (1, 512, LM_WIDTH)
    assert theirs.std() > 0.1  # tokens that differ from one another, not a collapsed output
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9)


def test_real_shapes_import_to_the_same_tensors(paper_import):
    from safetensors import safe_open

    from dalipipe.models.cavmae import AudioEncoderConfig, CavMaeAudioEncoder

    files, out = paper_import

    # the paper's encoder, whose every parameter (a strict load) is the file's tensor
    config = AudioEncoderConfig.from_dict(read_config(out / "audio_encoder.json"))
    assert config == AudioEncoderConfig() and config.depth == 11 and config.out_dim == 1024
    with torch.device("meta"):
        own = CavMaeAudioEncoder(config).state_dict()
    kept = {k for k in backbone_shapes(**PAPER) if AUDIO_BRANCH.match(k)}
    assert len(kept) == 4 + 12 * 12 + 4 and {f"module.{k}" for k in own} == kept
    with safe_open(out / "audio_encoder.safetensors", "pt") as f:  # one tensor at a time
        assert set(f.keys()) == set(own)
        for name in own:
            tensor = f.get_tensor(name)
            assert tensor.shape == own[name].shape, name
            assert torch.equal(tensor, drawn(f"module.{name}", tensor.shape)), name

    projector = load_state(out / "audio_projector.safetensors")
    assert sorted(projector) == [
        "linear_1.bias",
        "linear_1.weight",
        "linear_2.bias",
        "linear_2.weight",
    ]
    for authors, ours in (("0", "linear_1"), ("2", "linear_2")):
        for part in ("weight", "bias"):
            tensor = projector[f"{ours}.{part}"]
            assert tensor.dtype == torch.bfloat16
            assert torch.equal(
                tensor, drawn(f"model.mm_projector.{authors}.{part}", tensor.shape, torch.bfloat16)
            )
    assert tuple(projector["linear_1.weight"].shape) == (4096, 1024)
    prefix = load_state(out / "prefix.safetensors")["prefix"]
    assert torch.equal(prefix, drawn("prefix", (16, LM_WIDTH), torch.bfloat16))

    info = read_config(out / "captioner.json")
    assert info["options"]["generate_template"] == "llava_v1"
    assert info["options"]["template"] == "vicuna_v1"
    assert info["options"]["prompt"] == "Describe the sound that can be heard in this scene."
    assert info["options"]["share_projector"] is True
    assert info["metadata"]["features"]["fbank"] == {
        "num_mel_bins": 128,
        "target_length": 1024,
        "mean": -5.081,
        "std": 4.4849,
    }
    assert set(info["metadata"]["imported"]["files"]) == {"backbone", "mlp", "prefix"}


def test_a_missing_tensor_or_a_wrong_shape_is_named(tmp_path, small_files, tiny_models, capsys):
    sizes = SMALL_CONFIG
    out = tmp_path / "out"

    def rewrite(name: str, change) -> Path:
        state = torch.load(small_files / name, weights_only=True)
        change(state)
        broken = tmp_path / f"broken-{name}"
        broken.mkdir(exist_ok=True)
        for other in ("audio_backbone.pth", "prefixMLP.bin", "prefix.bin"):
            if other != name:
                (broken / other).write_bytes((small_files / other).read_bytes())
        torch.save(state, broken / name)
        return broken

    def error(files: Path) -> str:
        assert cli.main(import_argv(files, tiny_models.llava, out, sizes=sizes)) == 2
        assert not out.exists()  # nothing is written when the import fails
        return capsys.readouterr().err

    files = rewrite("audio_backbone.pth", lambda s: s.pop("module.blocks_a.1.mlp.fc2.weight"))
    assert "--backbone" in (msg := error(files)) and "module.blocks_a.1.mlp.fc2.weight" in msg
    assert "missing" in msg
    files = rewrite("audio_backbone.pth", lambda s: s.pop("module.proj.bias"))
    assert "module.proj.bias" in error(files)
    files = rewrite(
        "audio_backbone.pth", lambda s: s.update({"module.proj.weight": torch.zeros(48, 32)})
    )
    msg = error(files)
    assert "module.proj.weight: (48, 32), expected (32, 32)" in msg and "unexpected shape" in msg
    files = rewrite("prefixMLP.bin", lambda s: s.pop("model.mm_projector.2.bias"))
    assert "--mlp" in (msg := error(files)) and "model.mm_projector.2.bias" in msg
    files = rewrite(
        "prefixMLP.bin", lambda s: s.update({"model.mm_projector.0.weight": torch.zeros(64, 1024)})
    )
    assert "model.mm_projector.0.weight: (64, 1024), expected (64, 32)" in error(files)
    files = rewrite("prefix.bin", lambda s: s.clear())
    assert "--prefix" in (msg := error(files)) and "model.audio_tower.prefix" in msg
    # an encoder for another base: the paper's sizes against the tiny LLaVA
    assert cli.main(import_argv(small_files, tiny_models.llava, out)) == 2
    assert "out_dim 1024 does not fit" in capsys.readouterr().err
    # the prefix-tuning run's prefixMLP.bin (prefix and undistilled projector) given as --mlp
    files = rewrite(
        "prefixMLP.bin", lambda s: s.update({"model.audio_tower.prefix": torch.zeros(4, 64)})
    )
    msg = error(files)
    assert f"--mlp {files / 'prefixMLP.bin'}: holds model.audio_tower.prefix" in msg
    assert "prefix-tuning run's prefixMLP.bin" in msg and "undistilled" in msg
    assert "Give --mlp the distillation run's prefixMLP.bin" in msg


def test_a_file_torch_cannot_read_is_named_in_the_imports_words(
    tmp_path, small_files, tiny_models, capsys
):
    """Empty, not PyTorch, damaged, or holding pickled objects: one line each, and never torch's
    advice to load with weights_only=False (which would run the file's code)."""
    import argparse

    out = tmp_path / "out"
    empty, text, damaged, objects = (tmp_path / n for n in ("e.bin", "t.bin", "d.bin", "o.bin"))
    empty.write_bytes(b"")
    text.write_text("not a checkpoint")
    whole = (small_files / "prefixMLP.bin").read_bytes()
    damaged.write_bytes(whole[: len(whole) // 2])
    torch.save({"model.mm_projector.0.bias": torch.ones(2), "args": argparse.Namespace()}, objects)
    legacy = tmp_path / "legacy" / "prefixMLP.bin"  # torch's format before 1.6: read, not mapped
    legacy.parent.mkdir()
    state = torch.load(small_files / "prefixMLP.bin", weights_only=True)
    torch.save(state, legacy, _use_new_zipfile_serialization=False)

    def error(mlp: Path) -> str:
        argv = import_argv(small_files, tiny_models.llava, out, sizes=SMALL_CONFIG)
        argv[argv.index("--mlp") + 1] = str(mlp)
        assert cli.main(argv) == 2 and not out.exists()
        err = capsys.readouterr().err
        assert "weights_only" not in err
        (line,) = [x for x in err.splitlines() if x.startswith("dalipipe import-authors: error")]
        return line

    assert f"--mlp {empty}: empty file (0 bytes)" in error(empty)
    assert f"--mlp {text}: not a PyTorch file" in error(text)
    assert f"--mlp {damaged}: a damaged PyTorch file (zip format" in error(damaged)
    assert f"--mlp {objects}: holds Python objects other than tensors" in error(objects)

    argv = import_argv(small_files, tiny_models.llava, out, sizes=SMALL_CONFIG)
    argv[argv.index("--mlp") + 1] = str(legacy)
    assert cli.main(argv) == 0
    for name, tensor in load_state(out / "audio_projector.safetensors").items():
        index = {"linear_1": "0", "linear_2": "2"}[name.split(".")[0]]
        assert torch.equal(tensor, state[f"model.mm_projector.{index}.{name.split('.')[1]}"])


def test_small_import_loads_with_from_dir_and_captions(tmp_path, small_files, tiny_models, capsys):
    import numpy as np

    from dalipipe.describe import caption
    from dalipipe.models.captioner import AudioCaptioner

    out = tmp_path / "models" / "authors"
    assert cli.main(import_argv(small_files, tiny_models.llava, out, sizes=SMALL_CONFIG)) == 0
    info = read_config(out / "captioner.json")
    assert not Path(info["base"]).is_absolute()  # a local base moves with the directory

    captioner = AudioCaptioner.from_dir(out)
    assert captioner.options.generate_template == "llava_v1" and captioner.options.share_projector
    for name, tensor in captioner.audio_encoder.state_dict().items():
        assert torch.equal(tensor, drawn(f"module.{name}", tensor.shape)), name
    for name, tensor in captioner.audio_projector.state_dict().items():
        index = {"linear_1": "0", "linear_2": "2"}[name.split(".")[0]]
        key = f"model.mm_projector.{index}.{name.split('.')[1]}"
        assert torch.equal(tensor, drawn(key, tensor.shape, torch.bfloat16).float()), name
    assert torch.equal(captioner.prefix.data, drawn("prefix", (4, 64), torch.bfloat16).float())

    fbank = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 64, 32), np.float32))
    # the loaded captioner's audio tokens in the LM's space are the authors' chain's (float32 here)
    with torch.no_grad():
        ours = captioner.modality_embeds("audio", fbank=fbank)
        theirs = authors_audio_tokens(
            torch.load(small_files / "audio_backbone.pth", weights_only=True),
            torch.load(small_files / "prefixMLP.bin", weights_only=True),
            fbank,
            heads=SMALL_CONFIG["num_heads"],
        )
    n_tokens = (SMALL["mel"] // SMALL["patch"]) * (SMALL["frames"] // SMALL["patch"])
    assert ours.dtype == torch.float32 and ours.shape == theirs.shape == (2, n_tokens, 64)
    torch.testing.assert_close(ours.double(), theirs, rtol=1e-5, atol=1e-5)
    frames = [np.full((40, 60, 3), c, np.uint8) for c in (40, 200)]
    for modality in ("audio", "audio+image"):
        captions = captioner.generate(
            modality=modality,
            fbank=fbank,
            pixel_values=captioner.pixel_values(frames) if "image" in modality else None,
            use_prefix=True,
            max_new_tokens=5,
        )
        assert len(captions) == 2 and all(isinstance(c, str) for c in captions)

    if WAV.exists():  # `dalipipe caption` prepares a real file with the recorded fbank sizes
        assert caption.main([str(WAV), "--model", str(out), "--json", "--max-new-tokens", "4"]) == 0
        line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert line["file"] == str(WAV) and isinstance(line["caption"], str)


def test_the_import_is_laid_out_as_an_export_and_samples_as_the_authors(
    tmp_path, small_files, tiny_models
):
    import yaml

    out = tmp_path / "models" / "authors"
    assert cli.main(import_argv(small_files, tiny_models.llava, out, sizes=SMALL_CONFIG)) == 0
    info = read_config(out / "captioner.json")
    assert info["metadata"]["decoding"] == {"do_sample": True, "temperature": 0.2}
    card = (out / "README.md").read_text()
    assert yaml.safe_load(card.split("---\n")[1])["license"] == "other"
    assert "Default decoding: sampled at temperature 0.2 (top-k 50, seed 0) (" in card

    from dalipipe import Captioner

    assert Captioner.load(out, device="cpu").decoding.sample
