"""Optimal transport between each clip's audio tokens and its own image tokens.

    from dalipipe.align.ot import OTSolver
    solver = OTSolver("exact", workers=4)          # or OTSolver("sinkhorn", eps=0.05, iters=50)
    loss = solver(audio, image).mean()             # (B,Na,D), (B,Nv,D) -> (B,) transport costs
    solver = OTSolver.from_settings(config["align"]["ot"])   # the schema's align.ot keys

Three solvers give the same kind of answer, a transport plan and centred dual potentials per clip:
- ``exact``: POT's network simplex (``ot.emd``) in float64 on the CPU, as the authors do; the clips
  of a batch can be solved in a thread or process pool. POT's compiled solver releases the GIL
  (its extension calls PyEval_SaveThread): threads gave up to 1.6x on 2 busy cores at 512x576
  (bench/align.py), while processes were slower than serial there, since each clip's 2.4 MB
  cost matrix is pickled to the worker.
- ``sinkhorn``: a batched log-domain Sinkhorn on the tensors' own device, with the regularisation
  ``eps`` relative to each clip's cost scaled to a maximum of 1, a fixed number of iterations.
- ``scaled``: the same on the device, on the cost reduced by its row and column minima and scaled
  by its median, with epsilon scaling towards ``target_eps``, a stopping rule on the marginal
  error, rounding onto the marginals and a duality-gap certificate (sinkhorn.py); its plan is
  feasible, so the loss is a true transport cost, within 1% of exact EMD's at the paper's shape,
  with or without high-norm image tokens (tests/test_sinkhorn.py, bench/align.py). A clip whose
  certified gap stays above ``gap_tol`` is solved exactly instead, with a warning.

``plans_async`` starts a batch's plans and returns a future: the exact solver then runs on the
CPU pool while the caller's thread goes on queueing GPU work that does not need the plans. The
alignment step (train.py) does not use it yet: within a step everything after the encoder's
forward needs the plans, and the next step's forward needs this step's update, so the only GPU
work to overlap is the next batch's frozen CLIP forward, which means prefetching that batch
across steps (a change to the loop, not the step). Even then it hides ~0.1 s of the ~15 s of
CPU that 256 exact problems take per step (~58 ms each, docs/performance-anchors.md).

The loss is then built from those detached quantities (``transport_cost``) so that its value is
<P, M> and its gradients are the plan for M and the centred duals for the weights, the envelope
theorem POT's ``emd2`` also uses.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np
import torch

from dalipipe.align.sinkhorn import check_settings, scaled_sinkhorn

log = logging.getLogger(__name__)

SOLVERS = ("exact", "sinkhorn", "scaled")


def squared_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Batched squared Euclidean cost (B,N,D),(B,M,D) -> (B,N,M), in float32 even under autocast.

    The expansion |x|^2 + |y|^2 - 2<x,y> cancels badly in bf16, so autocast is switched off here.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        x, y = x.to(dtype), y.to(dtype)
        d = (
            x.pow(2).sum(-1, keepdim=True)
            + y.pow(2).sum(-1).unsqueeze(-2)
            - 2 * x @ y.transpose(-1, -2)
        )
        return d.clamp_min(0)


def uniform_weights(batch: int, n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.full((batch, n), 1.0 / n, dtype=like.dtype, device=like.device)


def transport_cost(
    cost: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    plan: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
) -> torch.Tensor:
    """<plan, cost> per clip, differentiable: d/dcost = plan, d/da = u - mean(u), d/db = v - mean(v).

    The dual terms are multiplied by (w - w.detach()), which is zero in value but carries the
    gradient of the weights, so the value stays exactly the transport cost.
    """
    plan, u, v = plan.detach(), u.detach(), v.detach()
    u = u - u.mean(-1, keepdim=True)
    v = v - v.mean(-1, keepdim=True)
    value = (plan * cost).sum((-2, -1))
    return value + (u * (a - a.detach())).sum(-1) + (v * (b - b.detach())).sum(-1)


def _emd_one(cost: np.ndarray, a: np.ndarray, b: np.ndarray, max_iter: int):
    """One exact problem in float64; a non-finite cost gives a zero plan (that clip adds no loss)."""
    if not np.isfinite(cost).all():
        return np.zeros_like(cost), np.zeros_like(a), np.zeros_like(b), "non-finite cost"
    import ot  # POT imports scikit-learn (~2 s): only the exact solver's jobs pay for it

    a = a / a.sum()
    b = b / b.sum()
    plan, info = ot.emd(a, b, cost, numItermax=max_iter, log=True)
    warning = info.get("warning")
    return plan, info["u"], info["v"], warning


def emd_batch(
    cost: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    max_iter: int = 100_000,
    pool: Executor | None = None,
):
    """Exact OT for each clip of a batch: cost (B,N,M), a (B,N), b (B,M) -> plans, u, v (numpy)."""
    jobs = [(cost[i], a[i], b[i], max_iter) for i in range(len(cost))]
    results = pool.map(_emd_one, *zip(*jobs)) if pool is not None else map(_emd_one, *zip(*jobs))
    plans, us, vs = [], [], []
    for i, (plan, u, v, warning) in enumerate(results):
        if warning:
            log.warning("exact OT, clip %d of the batch: %s", i, warning)
        plans.append(plan)
        us.append(u)
        vs.append(v)
    return np.stack(plans), np.stack(us), np.stack(vs)


@torch.no_grad()
def sinkhorn_batch(
    cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float, iters: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-domain Sinkhorn on (B,N,M) costs; eps is relative to each clip's maximum cost.

    Returns the plan and the dual potentials in the units of ``cost``.
    """
    scale = cost.amax((-2, -1), keepdim=True).clamp_min(1e-12)
    c = cost / scale
    log_a, log_b = a.clamp_min(1e-30).log(), b.clamp_min(1e-30).log()
    f = torch.zeros_like(a)
    g = torch.zeros_like(b)
    for _ in range(iters):
        f = -eps * torch.logsumexp((g.unsqueeze(-2) - c) / eps + log_b.unsqueeze(-2), dim=-1)
        g = -eps * torch.logsumexp((f.unsqueeze(-1) - c) / eps + log_a.unsqueeze(-1), dim=-2)
    log_plan = (
        (f.unsqueeze(-1) + g.unsqueeze(-2) - c) / eps + log_a.unsqueeze(-1) + log_b.unsqueeze(-2)
    )
    s = scale.squeeze(-1)
    return log_plan.exp(), f * s, g * s


class OTSolver:
    """Per-clip transport cost between token sets, exact (POT) or entropic (batched Sinkhorn).

    ``workers`` > 1 solves the clips of a batch in a pool (``pool`` = thread or process) for the
    exact solver; 0 or 1 solves them one after another. ``max_iter`` caps the exact solver's
    network simplex; ``target_eps`` .. ``gap_tol`` set the ``scaled`` solver (sinkhorn.py), and
    ``max_iters`` caps its Sinkhorn iterations over all eps stages.
    """

    SCALED_KEYS = (
        "target_eps",
        "eps_start",
        "eps_decay",
        "tol",
        "check_every",
        "max_iters",
        "gap_tol",
    )

    def __init__(
        self,
        solver: str = "exact",
        eps: float = 0.05,
        iters: int = 50,
        workers: int = 0,
        pool: str = "thread",
        max_iter: int = 100_000,
        *,
        target_eps: float = 1e-3,
        eps_start: float = 1.0,
        eps_decay: float = 0.5,
        tol: float = 1e-3,
        check_every: int = 10,
        max_iters: int = 2000,
        rounding: bool = True,
        gap_tol: float = 0.05,
    ):
        if solver not in SOLVERS:
            raise ValueError(
                f"align.ot.solver: unknown solver {solver!r}, expected one of {SOLVERS}"
            )
        if pool not in ("thread", "process"):
            raise ValueError(f"align.ot.pool: expected 'thread' or 'process', got {pool!r}")
        self.solver, self.eps, self.iters, self.max_iter = solver, float(eps), int(iters), max_iter
        self.workers = int(workers) if workers >= 0 else os.cpu_count() or 1
        self.pool_kind = pool
        self._pool: Executor | None = None
        self._async: ThreadPoolExecutor | None = None
        self.scaled = dict(
            target_eps=float(target_eps),
            eps_start=float(eps_start),
            eps_decay=float(eps_decay),
            tol=float(tol),
            check_every=int(check_every),
            max_iters=int(max_iters),
            rounding=bool(rounding),
            gap_tol=float(gap_tol),
        )
        if solver == "scaled":
            s = self.scaled
            check_settings(
                s["target_eps"],
                s["eps_decay"],
                s["tol"],
                s["check_every"],
                s["max_iters"],
                s["gap_tol"],
            )
        # what the scaled solver's last batch took: iterations, marginal error, converged, the
        # certified gap per clip and the clips solved exactly instead
        self.last_stats: dict = {}

    @classmethod
    def from_settings(cls, ot: dict) -> OTSolver:
        """A solver from a config's ``align.ot`` section (every key the schema gives it)."""
        scaled = {k: ot[k] for k in (*cls.SCALED_KEYS, "rounding") if k in ot}
        return cls(ot["solver"], ot["eps"], ot["iters"], ot["workers"], ot["pool"], **scaled)

    def describe(self) -> dict:
        """What a run records in its summary: the solver and its settings."""
        if self.solver == "exact":
            return {"solver": "exact", "workers": self.workers, "pool": self.pool_kind}
        if self.solver == "scaled":
            return {"solver": "scaled", **self.scaled}
        return {"solver": "sinkhorn", "eps": self.eps, "iters": self.iters}

    def pool(self) -> Executor | None:
        if self.workers <= 1:
            return None
        if self._pool is None:
            make = ThreadPoolExecutor if self.pool_kind == "thread" else ProcessPoolExecutor
            self._pool = make(max_workers=self.workers)
        return self._pool

    def close(self) -> None:
        if self._async is not None:
            self._async.shutdown()
            self._async = None
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def plans(self, cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
        """Plan and duals for each clip, as float32 tensors on cost's device."""
        if self.solver == "sinkhorn":
            return sinkhorn_batch(cost.detach(), a.detach(), b.detach(), self.eps, self.iters)
        if self.solver == "scaled":
            s = dict(self.scaled)
            result = scaled_sinkhorn(
                cost.detach(), a.detach(), b.detach(), eps=s.pop("target_eps"), **s
            )
            self.last_stats = {
                "iterations": result.iterations,
                "stages": result.stages,
                "marginal_error": result.marginal_error,
                "converged": result.converged,
                "gap": result.gap.tolist(),
                "exact_clips": (~result.certified).nonzero().flatten().tolist(),
            }
            plan, u, v = result.plan, result.u, result.v
            if self.last_stats["exact_clips"]:
                plan, u, v = self.exact_for_uncertified(cost, a, b, result)
            to = lambda x: x.to(cost.dtype)  # noqa: E731
            return to(plan), to(u), to(v)
        as_np = lambda t: t.detach().double().cpu().numpy()  # noqa: E731
        plan, u, v = emd_batch(as_np(cost), as_np(a), as_np(b), self.max_iter, self.pool())
        to = lambda x: torch.from_numpy(x).to(cost.device, cost.dtype)  # noqa: E731
        return to(plan), to(u), to(v)

    def exact_for_uncertified(self, cost, a, b, result):
        """The scaled solver's plans and duals, with exact EMD's for the clips it could not
        certify within ``gap_tol``."""
        bad = (~result.certified).nonzero().flatten()
        log.warning(
            "scaled Sinkhorn: duality gap above gap_tol=%.3g for clip(s) %s of the batch "
            "(gap %s of the reduced cost, eps down to target_eps=%.3g, %d iterations); "
            "those clips are solved exactly",
            self.scaled["gap_tol"],
            bad.tolist(),
            ", ".join(f"{x:.3g}" for x in result.gap[bad].tolist()),
            self.scaled["target_eps"],
            result.iterations,
        )
        as_np = lambda t: t[bad].detach().double().cpu().numpy()  # noqa: E731
        exact = emd_batch(as_np(cost), as_np(a), as_np(b), self.max_iter, self.pool())
        out = [result.plan.clone(), result.u.clone(), result.v.clone()]
        for mine, theirs in zip(out, exact):
            mine[bad] = torch.from_numpy(theirs).to(mine.device, mine.dtype)
        return out

    def plans_async(self, cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> Future:
        """``plans`` started now, its result a future. The exact solver's inputs are copied to the
        host here (the one synchronisation), then solved on a coordinating thread that feeds the
        clip pool, so the calling thread is free until ``future.result()``; the device solvers
        are queued on the device at once and their future is already done."""
        if self.solver != "exact":
            future: Future = Future()
            future.set_result(self.plans(cost, a, b))
            return future
        as_np = lambda t: t.detach().double().cpu().numpy()  # noqa: E731
        cost_np, a_np, b_np = as_np(cost), as_np(a), as_np(b)
        device, dtype = cost.device, cost.dtype

        def solve():
            plan, u, v = emd_batch(cost_np, a_np, b_np, self.max_iter, self.pool())
            to = lambda x: torch.from_numpy(x).to(device, dtype)  # noqa: E731
            return to(plan), to(u), to(v)

        if self._async is None:
            # one coordinator: batches are solved in the order they were started
            self._async = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ot-exact")
        return self._async.submit(solve)

    def __call__(
        self,
        audio: torch.Tensor,
        image: torch.Tensor,
        a: torch.Tensor | None = None,
        b: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Transport cost per clip (B,), squared-Euclidean cost, uniform weights unless given."""
        cost = squared_distances(audio, image)
        broken = ~torch.isfinite(cost).flatten(1).all(1)
        if broken.any():
            # The authors leave such a clip's loss at 0; zeroing its tokens also keeps NaN out of
            # the gradients of the other clips.
            log.warning(
                "OT: non-finite cost for %d clip(s) of the batch, counted as 0", int(broken.sum())
            )
            keep = ~broken[:, None, None]
            cost = squared_distances(torch.where(keep, audio, 0), torch.where(keep, image, 0))
        batch, n_audio, n_image = cost.shape
        a = uniform_weights(batch, n_audio, cost) if a is None else a.to(cost.dtype)
        b = uniform_weights(batch, n_image, cost) if b is None else b.to(cost.dtype)
        plan, u, v = self.plans(cost, a, b)
        return transport_cost(cost, a, b, plan, u, v)
