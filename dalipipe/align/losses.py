"""Distribution losses between each clip's audio tokens and its own image tokens.

    from dalipipe.align.losses import mmd_loss, contrastive_loss
    loss = mmd_loss(audio, image)            # audio (B,Na,D), image (B,Nv,D) -> scalar

All losses are per clip and averaged over the batch (docs/authors-implementation.md §4): no
token is ever compared with another clip's tokens, except in the contrastive baseline, whose
negatives are the other clips of the batch. They compute in float32 even under autocast, because
squared distances and exponentials lose too much in bf16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dalipipe.align.ot import squared_distances

# GMMN-style mixture: the bandwidth times 2^k, k = -2..2 (paper App. E).
MMD_BANDWIDTH_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)
CONTRASTIVE_TEMPERATURE = 0.05


def mmd_per_clip(
    audio: torch.Tensor, image: torch.Tensor, factors: tuple[float, ...] = MMD_BANDWIDTH_FACTORS
) -> torch.Tensor:
    """Biased MMD^2 per clip (B,) with a sum of RBF kernels.

    The bandwidth is the mean off-diagonal squared distance of the clip's pooled tokens, detached
    (the authors compute it from ``.data``), times each factor.
    """
    with torch.autocast(audio.device.type, enabled=False):
        n_audio = audio.shape[1]
        dtype = torch.promote_types(audio.dtype, torch.float32)
        pooled = torch.cat([audio.to(dtype), image.to(dtype)], dim=1)
        n = pooled.shape[1]
        dist = squared_distances(pooled, pooled)
        bandwidth = (dist.detach().sum((-2, -1)) / (n * n - n)).clamp_min(1e-12)[:, None, None]
        kernel = sum(torch.exp(-dist / (bandwidth * f)) for f in factors)
        k_aa = kernel[:, :n_audio, :n_audio].mean((-2, -1))
        k_av = kernel[:, :n_audio, n_audio:].mean((-2, -1))
        k_vv = kernel[:, n_audio:, n_audio:].mean((-2, -1))
        return k_aa - 2 * k_av + k_vv


def mmd_loss(audio: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    return mmd_per_clip(audio, image).mean()


def contrastive_loss(
    audio: torch.Tensor, image: torch.Tensor, temperature: float = CONTRASTIVE_TEMPERATURE
) -> torch.Tensor:
    """Symmetric InfoNCE on the mean token of each clip; the other clips are the negatives."""
    with torch.autocast(audio.device.type, enabled=False):
        a = F.normalize(audio.float().mean(1), dim=-1)
        v = F.normalize(image.float().mean(1), dim=-1)
        logits = a @ v.T / temperature
        target = torch.arange(len(a), device=a.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
