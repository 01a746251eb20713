"""The CAV-MAE audio branch as the DALI authors use it, loadable from official checkpoints.

    from dalipipe.models.cavmae import AudioEncoderConfig, CavMaeAudioEncoder, load_cavmae_checkpoint
    encoder = CavMaeAudioEncoder(AudioEncoderConfig())          # paper size: 1024x128 fbank
    load_cavmae_checkpoint(encoder, "cav-mae-scale++.pth")      # official weights, `module.` keys
    tokens = encoder(fbank)                                     # (B, 1024, 128) -> (B, 512, 1024)

The fbank (B, T, M) becomes an image (B, 1, M, T); 16x16 patches flatten frequency-major
(token = f * n_t + t); a fixed 2-D sin-cos position embedding and a learned modality embedding
are added; 11 audio blocks, then the shared block run with its audio LayerNorms, then `norm_a`,
then a new Linear to the image-token width (docs/authors-implementation.md §2).
Parameter names are the official ones so `cav-mae-scale++.pth` state dicts load unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

CONFIG_FILE = "audio_encoder.json"
WEIGHTS_FILE = "audio_encoder.safetensors"


@dataclass
class AudioEncoderConfig:
    num_mel_bins: int = 128
    target_length: int = 1024
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 11  # audio-specific blocks; the shared block comes on top
    shared_depth: int = 1
    num_heads: int = 12
    mlp_ratio: float = 4.0
    out_dim: int = 1024  # width of the image tokens the encoder is aligned to

    def __post_init__(self):
        for name in ("num_mel_bins", "target_length"):
            if getattr(self, name) % self.patch_size:
                raise ValueError(
                    f"AudioEncoderConfig.{name}={getattr(self, name)} is not a multiple of "
                    f"patch_size={self.patch_size}"
                )
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"AudioEncoderConfig.embed_dim={self.embed_dim} is not divisible by "
                f"num_heads={self.num_heads}"
            )

    @property
    def grid(self) -> tuple[int, int]:
        """(frequency patches, time patches)."""
        return self.num_mel_bins // self.patch_size, self.target_length // self.patch_size

    @property
    def num_tokens(self) -> int:
        n_f, n_t = self.grid
        return n_f * n_t

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AudioEncoderConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"AudioEncoderConfig: unknown fields {sorted(unknown)}")
        return cls(**d)


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """MAE-style 1-D embedding: half sines, half cosines, frequencies 1/10000^(i/(dim/2))."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.outer(positions.reshape(-1), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(dim: int, n_rows: int, n_cols: int) -> np.ndarray:
    """(n_rows * n_cols, dim), row-major; first half encodes the column, second the row.

    This is the MAE/CAV-MAE layout (their meshgrid puts the width coordinate first).
    """
    cols, rows = np.meshgrid(
        np.arange(n_cols, dtype=np.float64), np.arange(n_rows, dtype=np.float64)
    )
    return np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (
            self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        )
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block; `audio_norms` selects the shared block's `norm1_a`/`norm2_a`."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, audio_norms: bool = False):
        super().__init__()
        self.audio_norms = audio_norms
        suffix = "_a" if audio_norms else ""
        # Registered under the official names (norm1 / norm1_a ...) so checkpoints map one to one.
        self.add_module("norm1" + suffix, nn.LayerNorm(dim))
        self.attn = Attention(dim, num_heads)
        self.add_module("norm2" + suffix, nn.LayerNorm(dim))
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm1 = self.norm1_a if self.audio_norms else self.norm1
        norm2 = self.norm2_a if self.audio_norms else self.norm2
        x = x + self.attn(norm1(x))
        return x + self.mlp(norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(1, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        # (B, D, n_f, n_t) -> (B, n_f * n_t, D): frequency-major token order.
        return self.proj(image).flatten(2).transpose(1, 2)


class CavMaeAudioEncoder(nn.Module):
    """fbank (B, T, M) -> tokens (B, (M/p) * (T/p), out_dim)."""

    def __init__(self, config: AudioEncoderConfig | None = None):
        super().__init__()
        self.config = config = config or AudioEncoderConfig()
        n_f, n_t = config.grid
        self.patch_embed_a = PatchEmbed(config.patch_size, config.embed_dim)
        pos = sincos_2d(config.embed_dim, n_f, n_t)
        self.pos_embed_a = nn.Parameter(torch.from_numpy(pos).float().unsqueeze(0))
        self.modality_a = nn.Parameter(torch.zeros(1, 1, config.embed_dim))
        self.blocks_a = nn.ModuleList(
            Block(config.embed_dim, config.num_heads, config.mlp_ratio) for _ in range(config.depth)
        )
        self.blocks_u = nn.ModuleList(
            Block(config.embed_dim, config.num_heads, config.mlp_ratio, audio_norms=True)
            for _ in range(config.shared_depth)
        )
        self.norm_a = nn.LayerNorm(config.embed_dim)
        self.proj = nn.Linear(config.embed_dim, config.out_dim)
        # CAV-MAE initialises modality embeddings with a small normal; keep them non-zero so a
        # model trained from scratch (the miniature) does not start from a degenerate value.
        nn.init.normal_(self.modality_a, std=0.02)

    def features(self, fbank: torch.Tensor) -> torch.Tensor:
        """The 768-d CAV-MAE output before `proj` (the authors' `forward_audio_feat`)."""
        t, m = self.config.target_length, self.config.num_mel_bins
        if fbank.ndim != 3 or fbank.shape[1:] != (t, m):
            raise ValueError(
                f"audio encoder expects fbank of shape (B, {t}, {m}), got {tuple(fbank.shape)}"
            )
        x = self.patch_embed_a(fbank.to(self.proj.weight.dtype).unsqueeze(1).transpose(2, 3))
        x = x + self.pos_embed_a + self.modality_a
        for block in self.blocks_a:
            x = block(x)
        for block in self.blocks_u:
            x = block(x)
        return self.norm_a(x)

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        return self.proj(self.features(fbank))


# --- official checkpoints -------------------------------------------------------------------

NEW_KEYS = ("proj.weight", "proj.bias")  # the DALI projection is not in CAV-MAE pretraining files


def audio_branch_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip DataParallel's `module.` prefix."""
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state.items()}


def load_cavmae_checkpoint(
    encoder: CavMaeAudioEncoder, path: str | Path, *, allow_missing_proj: bool = True
) -> tuple[list[str], list[str]]:
    """Load an official CAV-MAE (or DALI `audio_backbone.pth`) state dict into `encoder`.

    Returns (missing, unexpected). Raises if any audio-branch weight is missing or has the
    wrong shape; visual, decoder and CLIP weights in the file are reported as unexpected.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path}: not a readable CAV-MAE checkpoint ({err})") from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    state = audio_branch_state(state)
    own = encoder.state_dict()
    shape_errors = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if shape_errors:
        raise ValueError(f"{path}: shape mismatch for " + "; ".join(shape_errors))
    result = encoder.load_state_dict(state, strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    required = [k for k in missing if not (allow_missing_proj and k in NEW_KEYS)]
    if required:
        raise ValueError(f"{path}: audio-branch weights missing from the checkpoint: {required}")
    if missing:
        log.info("%s: newly initialised (not in the file): %s", path, missing)
    if unexpected:
        log.info(
            "%s: %d keys not used by the audio branch (visual/decoder/CLIP)", path, len(unexpected)
        )
    return missing, unexpected


# --- our own artifacts (safetensors + JSON; see DEVELOPING.md) ------------------------------


def save_encoder(encoder: CavMaeAudioEncoder, directory: str | Path) -> None:
    """Write `audio_encoder.safetensors` and `audio_encoder.json` into `directory`."""
    from dalipipe.models.artifacts import save_state, write_config

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_state(directory / WEIGHTS_FILE, encoder.state_dict())
    write_config(directory / CONFIG_FILE, encoder.config.to_dict())


def load_encoder(directory: str | Path, *, device="cpu", dtype=None) -> CavMaeAudioEncoder:
    from dalipipe.models.artifacts import load_state, read_config

    directory = Path(directory)
    config = AudioEncoderConfig.from_dict(read_config(directory / CONFIG_FILE))
    encoder = CavMaeAudioEncoder(config)
    encoder.load_state_dict(load_state(directory / WEIGHTS_FILE), strict=True)
    return encoder.to(device=device, dtype=dtype)


def build_encoder(settings: dict, *, out_dim: int | None = None) -> CavMaeAudioEncoder:
    """An encoder from config `models.audio_encoder` (sizes + optional official `checkpoint`)."""
    settings = dict(settings or {})
    checkpoint = settings.pop("checkpoint", None)
    if out_dim is not None:
        settings.setdefault("out_dim", out_dim)
    encoder = CavMaeAudioEncoder(AudioEncoderConfig.from_dict(settings))
    if checkpoint:
        load_cavmae_checkpoint(encoder, checkpoint)
    return encoder


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
