"""Batched log-domain Sinkhorn with epsilon scaling, a marginal-error stopping rule and rounding.

    result = scaled_sinkhorn(cost, a, b, eps=3e-3)   # cost (B,N,M), a (B,N), b (B,M)
    result.plan, result.u, result.v                  # a feasible plan and dual potentials
    result.iterations, result.marginal_error         # what the stopping rule saw

Plain Sinkhorn at a small eps needs thousands of iterations from zero potentials, since its
contraction rate is about 1 - exp(-range/eps). Here eps starts large (``eps_start``), where a
few iterations converge, and shrinks geometrically (``eps_decay``) to the target, each stage
warm-started from the previous stage's potentials (Schmitzer 2019, "Stabilized sparse scaling
algorithms for entropy regularized transport problems"). Each stage runs until the L1 violation
of the row marginals, the largest over the clips of the batch, falls below ``tol`` (the columns
are exact after each column update), checked every ``check_every`` iterations: each check costs a
device-to-host synchronisation, the iterations themselves do not. ``max_iters`` caps the
iterations of all stages together.

The plan left by the last stage is then rounded onto the transport polytope (Altschuler, Weed and
Rigollet 2017, Algorithm 2): rows and columns scaled down to their marginals, then the missing
mass added as a rank-one term. The rounded plan is feasible, so its cost <P, C> is a true
transport cost, never below exact EMD's, and it moves by at most the marginal error times the
largest cost.

The cost is shifted and scaled per clip to [0, 1] (``eps`` is relative to each clip's range of
costs): the plan does not change under a shift, and in float32 the high-dimensional costs, which
are all close to their mean, would otherwise keep few significant bits in (g - c) / eps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass
class SinkhornResult:
    plan: torch.Tensor  # (B,N,M), feasible when rounded
    u: torch.Tensor  # (B,N) dual potentials in the units of the cost
    v: torch.Tensor  # (B,M)
    iterations: int  # row+column updates, all stages together
    stages: int  # eps values visited
    marginal_error: float  # max over clips of the L1 row-marginal violation before rounding
    converged: bool  # the last stage met tol before max_iters


def check_settings(eps: float, eps_decay: float, tol: float, check_every: int, max_iters: int):
    """Bad settings named by their config key (align.ot.*)."""
    problems = {
        "target_eps": (eps > 0, "> 0"),
        "eps_decay": (0 < eps_decay < 1, "a factor in (0, 1)"),
        "tol": (tol > 0, "> 0"),
        "check_every": (check_every >= 1, ">= 1"),
        "max_iters": (max_iters >= 1, ">= 1"),
    }
    values = dict(
        target_eps=eps, eps_decay=eps_decay, tol=tol, check_every=check_every, max_iters=max_iters
    )
    for key, (ok, expected) in problems.items():
        if not ok:
            raise ValueError(f"align.ot.{key}: expected {expected}, got {values[key]}")


def eps_schedule(eps: float, eps_start: float, eps_decay: float) -> list[float]:
    """eps_start, eps_start * decay, ... down to eps, which is always the last stage."""
    stages = []
    current = max(eps_start, eps)
    while current > eps:
        stages.append(current)
        current *= eps_decay
    return stages + [eps]


def round_to_marginals(plan: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Altschuler et al. (2017), Algorithm 2, batched: the nearest feasible plan in their sense."""
    rows = plan.sum(-1)
    plan = plan * (a / rows.clamp_min(1e-38)).clamp_max(1).unsqueeze(-1)
    cols = plan.sum(-2)
    plan = plan * (b / cols.clamp_min(1e-38)).clamp_max(1).unsqueeze(-2)
    missing_a = (a - plan.sum(-1)).clamp_min(0)
    missing_b = (b - plan.sum(-2)).clamp_min(0)
    mass = missing_a.sum(-1, keepdim=True).clamp_min(1e-38)
    return plan + missing_a.unsqueeze(-1) * missing_b.unsqueeze(-2) / mass.unsqueeze(-1)


@torch.no_grad()
def scaled_sinkhorn(
    cost: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    eps: float = 3e-3,
    eps_start: float = 1.0,
    eps_decay: float = 0.5,
    tol: float = 1e-3,
    check_every: int = 10,
    max_iters: int = 2000,
    rounding: bool = True,
) -> SinkhornResult:
    """Entropic OT per clip of a batch, on cost's device, in cost's dtype (at least float32)."""
    check_settings(eps, eps_decay, tol, check_every, max_iters)
    dtype = torch.promote_types(cost.dtype, torch.float32)
    cost, a, b = cost.to(dtype), a.to(dtype), b.to(dtype)
    low = cost.amin((-2, -1), keepdim=True)
    spread = (cost.amax((-2, -1), keepdim=True) - low).clamp_min(1e-12)
    c = (cost - low) / spread
    log_a = a.clamp_min(1e-38).log().unsqueeze(-1)
    log_b = b.clamp_min(1e-38).log().unsqueeze(-2)
    f = torch.zeros_like(a)
    g = torch.zeros_like(b)
    schedule = eps_schedule(eps, eps_start, eps_decay)
    iterations, error, converged = 0, float("inf"), False

    # c / e once per stage: each update is then one full-size pass before the logsumexp
    def row_update(g, e, c_e):
        return -e * torch.logsumexp((log_b + g.unsqueeze(-2) / e) - c_e, dim=-1)

    def col_update(f, e, c_e):
        return -e * torch.logsumexp((log_a + f.unsqueeze(-1) / e) - c_e, dim=-2)

    stages = 0
    for e in schedule:
        stages += 1
        c_e = c / e
        f = row_update(g, e, c_e)
        stage_iters, converged = 0, False
        while iterations < max_iters:
            g = col_update(f, e, c_e)
            iterations += 1
            stage_iters += 1
            f_next = row_update(g, e, c_e)
            if stage_iters % check_every == 0 or iterations == max_iters:
                # The rows of the plan of (f, g) sum to a * exp((f - f_next) / e), its columns
                # to b exactly, so this is the plan's whole L1 marginal violation.
                error = (a * (((f - f_next) / e).exp() - 1)).abs().sum(-1).amax().item()
                converged = error < tol
                if converged or iterations == max_iters:
                    break
            f = f_next
        if not converged:
            break
    if not converged:
        log.warning(
            "scaled Sinkhorn: marginal error %.2e above tol %.2e after max_iters=%d "
            "(stage %d of %d, eps %.2e); the plan is rounded to the marginals",
            error,
            tol,
            max_iters,
            stages,
            len(schedule),
            e,
        )
    plan = (log_a + log_b + (f.unsqueeze(-1) + g.unsqueeze(-2) - c) / e).exp()
    if rounding:
        plan = round_to_marginals(plan, a, b)
    s = spread.squeeze(-1)
    return SinkhornResult(plan, f * s, g * s, iterations, stages, error, converged)
