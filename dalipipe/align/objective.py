"""One alignment method as a function of a batch: the encoder's loss and, for ot_att, the scorer's.

    objective = Objective("ot_att", OTSolver("exact"), AttentiveWeights(1024))
    out = objective(audio_tokens, image_tokens, entropy_lambda=500.0)
    out.loss            # what the audio encoder minimises
    out.scorer_loss     # OT - lambda * H, what the cross-attention scorer minimises (or None)

Validation (``train=False``) uses uniform OT weights for ot_att, as the authors do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dalipipe.align.attentive import AttentiveWeights, entropy
from dalipipe.align.losses import contrastive_loss, mmd_loss
from dalipipe.align.ot import OTSolver

METHODS = ("mmd", "ot", "ot_att", "contrastive")


@dataclass
class BatchLosses:
    loss: torch.Tensor
    scorer_loss: torch.Tensor | None = None
    logged: dict[str, float] = field(default_factory=dict)


class Objective:
    """``double_gradient`` reproduces the authors' quirk: the encoder also receives the gradient of
    the scorer's loss OT - lambda*H (their main grads are not re-zeroed between the two backward
    passes), i.e. about 2*grad(OT) - lambda*grad(H) from the second epoch on."""

    def __init__(
        self,
        method: str,
        solver: OTSolver | None = None,
        scorer: AttentiveWeights | None = None,
        double_gradient: bool = False,
    ):
        if method not in METHODS:
            raise ValueError(f"align method: unknown {method!r}, expected one of {METHODS}")
        if method in ("ot", "ot_att") and solver is None:
            raise ValueError(f"align method {method}: needs an OT solver")
        if method == "ot_att" and scorer is None:
            raise ValueError("align method ot_att: needs an AttentiveWeights scorer")
        self.method, self.solver, self.scorer = method, solver, scorer
        self.double_gradient = double_gradient

    def __call__(
        self,
        audio: torch.Tensor,
        image: torch.Tensor,
        entropy_lambda: float | None = None,
        train: bool = True,
    ) -> BatchLosses:
        if self.method == "mmd":
            loss = mmd_loss(audio, image)
            return BatchLosses(loss, logged={"mmd": loss.item()})
        if self.method == "contrastive":
            loss = contrastive_loss(audio, image)
            return BatchLosses(loss, logged={"infonce": loss.item()})
        if self.method == "ot" or not train:
            loss = self.solver(audio, image).mean()
            return BatchLosses(loss, logged={"ot": loss.item()})
        a, b = self.scorer(audio, image)
        transport = self.solver(audio, image, a, b).mean()
        weight_entropy = (entropy(a) + entropy(b)).mean()
        logged = {"ot": transport.item(), "entropy": weight_entropy.item()}
        if entropy_lambda is None:  # the scorer is frozen this epoch
            return BatchLosses(transport, logged=logged)
        scorer_loss = transport - entropy_lambda * weight_entropy
        loss = transport + scorer_loss if self.double_gradient else transport
        return BatchLosses(loss, scorer_loss, logged)
