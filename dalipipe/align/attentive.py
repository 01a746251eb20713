"""Attentive OT: token weights from cross-attention, and their entropy schedule (paper App. F).

    scorer = AttentiveWeights(dim=1024)
    a, b = scorer(audio, image)                  # (B,Na), (B,Nv): each row sums to one
    a, b = scorer.scores(audio, image)           # the softmax before the uniform mix (Fig. 7)
    lam = entropy_weight(epoch, params)          # None while the scorer is frozen (epoch 1)
    save_scorer(scorer, "align/ot_att"); load_scorer("align/ot_att")   # beside the encoder

As in the authors' code (docs/authors-implementation.md §4.3): each side has an extra Linear for
query, key and value in front of an 8-head ``nn.MultiheadAttention``; the attention output is
averaged over features, divided by tau = 20 and soft-maxed over tokens, then mixed half and half
with uniform weights, so no token ever gets less than half of its uniform share. The scorer
minimises OT - lambda*H: it is pushed towards high entropy, away from putting all the mass on a
few tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

DEFAULT_LAMBDAS = (500.0, 400.0, 300.0, 200.0)
DEFAULT_FINAL_LAMBDA = 100.0
# the trained scorer, saved beside audio_encoder.* in the align output (Figure 7 reads it)
SCORER_WEIGHTS = "attentive_scorer.safetensors"
SCORER_CONFIG = "attentive_scorer.json"


class AttentiveWeights(nn.Module):
    def __init__(self, dim: int, heads: int = 8, tau: float = 20.0, uniform_mix: float = 0.5):
        super().__init__()
        self.dim, self.heads = dim, heads
        self.tau, self.uniform_mix = tau, uniform_mix
        self.a_q, self.a_k, self.a_v = (nn.Linear(dim, dim) for _ in range(3))
        self.i_q, self.i_k, self.i_v = (nn.Linear(dim, dim) for _ in range(3))
        # image_scorer weighs audio tokens by attending to the image, audio_scorer the reverse.
        self.image_scorer = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.audio_scorer = nn.MultiheadAttention(dim, heads, batch_first=True)

    def _softmax(self, attended: torch.Tensor) -> torch.Tensor:
        return torch.softmax(attended.float().mean(-1) / self.tau, dim=-1)

    def scores(self, audio: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The softmax weights of audio and image tokens before the mix with uniform weights
        (the paper's eqs. 6-7; Figure 7 shows them)."""
        on_audio, _ = self.image_scorer(
            self.a_q(audio), self.i_k(image), self.i_v(image), need_weights=False
        )
        on_image, _ = self.audio_scorer(
            self.i_q(image), self.a_k(audio), self.a_v(audio), need_weights=False
        )
        return self._softmax(on_audio), self._softmax(on_image)

    def mix(self, scores: torch.Tensor) -> torch.Tensor:
        """The transport weights: the scores mixed with uniform weights (the authors' code)."""
        uniform = 1.0 / scores.shape[-1]
        return (1 - self.uniform_mix) * scores + self.uniform_mix * uniform

    def forward(
        self, audio: torch.Tensor, image: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.scores(audio, image)
        return self.mix(a), self.mix(b)


def entropy(weights: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of each row of probability weights."""
    return -(weights * weights.clamp_min(1e-30).log()).sum(-1)


def entropy_weight(
    epoch: int,
    frozen_epochs: int = 1,
    lambdas: tuple[float, ...] = DEFAULT_LAMBDAS,
    final: float = DEFAULT_FINAL_LAMBDA,
) -> float | None:
    """lambda for a 1-based epoch: None while the scorer is frozen, then the schedule, then final.

    Authors' defaults: epoch 1 frozen, epochs 2-5 get 500/400/300/200, epoch 6 on gets 100.
    """
    if epoch <= frozen_epochs:
        return None
    index = epoch - frozen_epochs - 1
    return float(lambdas[index]) if index < len(lambdas) else float(final)


def save_scorer(scorer: AttentiveWeights, directory: str | Path) -> None:
    """Write the scorer's weights and sizes into ``directory`` (an align output)."""
    from dalipipe.models.artifacts import save_state, write_config

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_state(directory / SCORER_WEIGHTS, scorer.state_dict())
    sizes = {"dim": scorer.dim, "heads": scorer.heads, "tau": scorer.tau}
    write_config(directory / SCORER_CONFIG, {**sizes, "uniform_mix": scorer.uniform_mix})


def load_scorer(directory: str | Path, *, device="cpu") -> AttentiveWeights | None:
    """The scorer saved in an align output, or None where there is none (another method, or a
    directory written before scorers were saved)."""
    from dalipipe.models.artifacts import load_state, read_config

    directory = Path(directory)
    if not (directory / SCORER_WEIGHTS).is_file():
        return None
    sizes = read_config(directory / SCORER_CONFIG)
    try:
        scorer = AttentiveWeights(
            int(sizes["dim"]), int(sizes["heads"]), float(sizes["tau"]), float(sizes["uniform_mix"])
        )
    except KeyError as err:
        raise ValueError(f"{directory / SCORER_CONFIG}: missing field {err}") from None
    try:
        scorer.load_state_dict(load_state(directory / SCORER_WEIGHTS), strict=True)
    except RuntimeError as err:
        raise ValueError(f"{directory / SCORER_WEIGHTS}: does not fit {sizes} ({err})") from None
    return scorer.to(device).eval()
