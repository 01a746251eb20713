"""Tests of the CAV-MAE audio branch: official keys, token order, shapes, artifacts.

pytest tests/test_cavmae.py -x -q
"""

import math

import pytest
import torch

from dalipipe.models.cavmae import (
    AudioEncoderConfig,
    CavMaeAudioEncoder,
    load_cavmae_checkpoint,
    load_encoder,
    save_encoder,
)

SMALL = AudioEncoderConfig(
    num_mel_bins=32, target_length=64, patch_size=16, embed_dim=32, depth=2, num_heads=4, out_dim=24
)


def official_block_keys(prefix: str, dim: int) -> dict[str, tuple]:
    """Key names and shapes of one CAV-MAE `Block` as written in the official checkpoints."""
    keys = {}
    for norm in ("norm1", "norm1_a", "norm1_v", "norm2", "norm2_a", "norm2_v"):
        keys[f"{prefix}.{norm}.weight"] = (dim,)
        keys[f"{prefix}.{norm}.bias"] = (dim,)
    keys[f"{prefix}.attn.qkv.weight"] = (3 * dim, dim)
    keys[f"{prefix}.attn.qkv.bias"] = (3 * dim,)
    keys[f"{prefix}.attn.proj.weight"] = (dim, dim)
    keys[f"{prefix}.attn.proj.bias"] = (dim,)
    keys[f"{prefix}.mlp.fc1.weight"] = (4 * dim, dim)
    keys[f"{prefix}.mlp.fc1.bias"] = (4 * dim,)
    keys[f"{prefix}.mlp.fc2.weight"] = (dim, 4 * dim)
    keys[f"{prefix}.mlp.fc2.bias"] = (dim,)
    return keys


def official_scale_pp_shapes() -> dict[str, tuple]:
    """The cav-mae-scale++.pth layout (DataParallel prefix), audio and some visual keys."""
    dim = 768
    shapes = {
        "module.patch_embed_a.proj.weight": (dim, 1, 16, 16),
        "module.patch_embed_a.proj.bias": (dim,),
        "module.pos_embed_a": (1, 512, dim),
        "module.modality_a": (1, 1, dim),
        "module.norm_a.weight": (dim,),
        "module.norm_a.bias": (dim,),
        # visual branch and decoder pieces the audio encoder must ignore
        "module.patch_embed_v.proj.weight": (dim, 3, 16, 16),
        "module.pos_embed_v": (1, 196, dim),
        "module.modality_v": (1, 1, dim),
        "module.norm_v.weight": (dim,),
        "module.decoder_embed.weight": (512, dim),
    }
    for i in range(11):
        shapes.update(
            {f"module.{k}": s for k, s in official_block_keys(f"blocks_a.{i}", dim).items()}
        )
    shapes.update({f"module.{k}": s for k, s in official_block_keys("blocks_v.0", dim).items()})
    shapes.update({f"module.{k}": s for k, s in official_block_keys("blocks_u.0", dim).items()})
    return shapes


@pytest.mark.slow
def test_full_size_official_state_dict_loads_and_gives_512_tokens(tmp_path):
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=gen) * 0.02 for k, s in official_scale_pp_shapes().items()}
    path = tmp_path / "cav-mae-scale++.pth"
    torch.save(state, path)
    encoder = CavMaeAudioEncoder(AudioEncoderConfig())
    missing, unexpected = load_cavmae_checkpoint(encoder, path)
    assert sorted(missing) == ["proj.bias", "proj.weight"]
    assert "blocks_u.0.norm1.weight" in unexpected and "blocks_a.0.norm1_a.weight" in unexpected
    assert "patch_embed_v.proj.weight" in unexpected
    # The shared block runs with its audio norms: those are the weights that must have landed.
    assert torch.equal(
        encoder.blocks_u[0].norm1_a.weight, state["module.blocks_u.0.norm1_a.weight"]
    )
    assert torch.equal(
        encoder.blocks_a[10].mlp.fc2.weight, state["module.blocks_a.10.mlp.fc2.weight"]
    )
    assert torch.equal(encoder.pos_embed_a, state["module.pos_embed_a"])
    with torch.no_grad():
        out = encoder(torch.randn(2, 1024, 128, generator=gen))
    assert out.shape == (2, 512, 1024)
    assert sum(p.numel() for n, p in encoder.named_parameters() if not n.startswith("proj.")) > 85e6


def test_missing_audio_weight_raises_naming_it(tmp_path):
    encoder = CavMaeAudioEncoder(SMALL)
    state = {f"module.{k}": v for k, v in encoder.state_dict().items()}
    del state["module.blocks_a.1.mlp.fc1.weight"]
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"blocks_a\.1\.mlp\.fc1\.weight"):
        load_cavmae_checkpoint(CavMaeAudioEncoder(SMALL), path)


def test_shape_mismatch_and_unreadable_file_raise(tmp_path):
    state = {f"module.{k}": v for k, v in CavMaeAudioEncoder(SMALL).state_dict().items()}
    state["module.norm_a.weight"] = torch.ones(7)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match="norm_a.weight"):
        load_cavmae_checkpoint(CavMaeAudioEncoder(SMALL), path)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        load_cavmae_checkpoint(CavMaeAudioEncoder(SMALL), junk)


def test_tokens_are_frequency_major():
    torch.manual_seed(0)
    encoder = CavMaeAudioEncoder(SMALL).eval()
    captured = {}
    encoder.patch_embed_a.register_forward_hook(lambda m, i, o: captured.update(out=o))
    fbank = torch.zeros(1, 64, 32)
    fbank[0, 16:32, 16:32] = 1.0  # time patch 1, frequency patch 1
    encoder(fbank)
    n_f, n_t = SMALL.grid
    assert (n_f, n_t) == (2, 4)
    tokens = captured["out"][0]
    bias = encoder.patch_embed_a.proj.bias
    changed = [i for i in range(n_f * n_t) if not torch.allclose(tokens[i], bias)]
    assert changed == [1 * n_t + 1]


def test_position_embedding_is_mae_sincos():
    pos = CavMaeAudioEncoder(SMALL).pos_embed_a[0]
    d = SMALL.embed_dim
    n_t = SMALL.grid[1]
    f, t = 1, 3
    token = f * n_t + t
    # first half: the time (column) coordinate, second half: the frequency (row) coordinate
    assert pos[token, 0].item() == pytest.approx(math.sin(t), abs=1e-6)
    assert pos[token, d // 4].item() == pytest.approx(math.cos(t), abs=1e-6)
    assert pos[token, d // 2].item() == pytest.approx(math.sin(f), abs=1e-6)
    assert pos[token, 1].item() == pytest.approx(math.sin(t / 10000 ** (1 / (d // 4))), abs=1e-6)


def test_attention_matches_explicit_softmax():
    torch.manual_seed(0)
    block = CavMaeAudioEncoder(SMALL).blocks_a[0]
    x = torch.randn(2, 5, SMALL.embed_dim)
    attn = block.attn
    q, k, v = attn.qkv(x).chunk(3, dim=-1)
    h, hd = SMALL.num_heads, SMALL.embed_dim // SMALL.num_heads
    split = lambda z: z.view(2, 5, h, hd).transpose(1, 2)  # noqa: E731
    weights = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(hd), dim=-1)
    expected = attn.proj((weights @ split(v)).transpose(1, 2).reshape(2, 5, -1))
    assert torch.allclose(attn(x), expected, atol=1e-6)


def test_bad_fbank_shape_is_named():
    with pytest.raises(ValueError, match=r"\(B, 64, 32\)"):
        CavMaeAudioEncoder(SMALL)(torch.zeros(1, 32, 64))


def test_config_validation_and_round_trip():
    assert AudioEncoderConfig.from_dict(SMALL.to_dict()) == SMALL
    with pytest.raises(ValueError, match="target_length"):
        AudioEncoderConfig(target_length=1000)
    with pytest.raises(ValueError, match="unknown fields"):
        AudioEncoderConfig.from_dict({"n_layers": 3})


def test_save_and_load_encoder_round_trip(tmp_path):
    torch.manual_seed(1)
    encoder = CavMaeAudioEncoder(SMALL).eval()
    save_encoder(encoder, tmp_path / "enc")
    assert sorted(p.name for p in (tmp_path / "enc").iterdir()) == [
        "audio_encoder.json",
        "audio_encoder.safetensors",
    ]
    loaded = load_encoder(tmp_path / "enc").eval()
    fbank = torch.randn(3, 64, 32)
    with torch.no_grad():
        assert torch.equal(encoder(fbank), loaded(fbank))
    assert loaded.config == SMALL
