"""Alignment losses against direct references: pytest tests/test_losses.py -x -q"""

import itertools
import math

import numpy as np
import ot
import pytest
import torch

from dalipipe.align.attentive import AttentiveWeights, entropy, entropy_weight
from dalipipe.align.losses import contrastive_loss, mmd_loss, mmd_per_clip
from dalipipe.align.objective import Objective
from dalipipe.align.ot import OTSolver, sinkhorn_batch, squared_distances


def tokens(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def mmd_reference(x, y):
    """Biased MMD^2 with five RBFs, written as plain loops over token pairs."""
    pooled = list(x) + list(y)
    n = len(pooled)
    sq = lambda p, q: float(((p - q) ** 2).sum())  # noqa: E731
    bandwidth = sum(sq(p, q) for p, q in itertools.permutations(pooled, 2)) / (n * n - n)

    def k(p, q):
        return sum(math.exp(-sq(p, q) / (bandwidth * f)) for f in (0.25, 0.5, 1, 2, 4))

    def mean_k(s, t):
        return sum(k(p, q) for p in s for q in t) / (len(s) * len(t))

    return mean_k(x, x) - 2 * mean_k(x, y) + mean_k(y, y)


def test_mmd_is_zero_for_identical_sets():
    x = tokens(3, 7, 5)
    assert torch.allclose(mmd_per_clip(x, x.clone()), torch.zeros(3, dtype=x.dtype), atol=1e-12)


def test_mmd_equals_double_loop_reference():
    audio, image = tokens(2, 4, 3, seed=1), tokens(2, 5, 3, seed=2) + 0.5
    got = mmd_per_clip(audio, image)
    expected = [mmd_reference(audio[i], image[i]) for i in range(2)]
    assert got.tolist() == pytest.approx(expected, rel=1e-10)
    assert mmd_loss(audio, image).item() == pytest.approx(sum(expected) / 2, rel=1e-10)


def test_mmd_is_per_clip_not_pooled_over_the_batch():
    # Swapping which clip an image set belongs to changes the loss: clips are not pooled.
    audio = tokens(2, 4, 3, seed=3)
    image = torch.stack([audio[0] + 0.01, audio[1] + 3.0])
    assert mmd_loss(audio, image) < mmd_loss(audio, image.flip(0))


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_ot_equals_pot_value(workers):
    audio, image = tokens(3, 6, 4, seed=4), tokens(3, 7, 4, seed=5)
    a = torch.softmax(tokens(3, 6, seed=6), -1)
    b = torch.softmax(tokens(3, 7, seed=7), -1)
    solver = OTSolver("exact", workers=workers)
    got_uniform, got_weighted = solver(audio, image), solver(audio, image, a, b)
    solver.close()
    for i in range(3):
        cost = ot.dist(audio[i].numpy(), image[i].numpy())
        assert got_uniform[i].item() == pytest.approx(ot.emd2([], [], cost), rel=1e-12)
        assert got_weighted[i].item() == pytest.approx(
            ot.emd2(a[i].numpy(), b[i].numpy(), cost), rel=1e-12
        )


def test_exact_ot_gradient_matches_finite_differences():
    audio = tokens(1, 5, 3, seed=8).requires_grad_()
    image = tokens(1, 6, 3, seed=9)
    a = torch.softmax(tokens(1, 5, seed=10), -1).requires_grad_()
    b = torch.softmax(tokens(1, 6, seed=11), -1)
    solver = OTSolver("exact")
    solver(audio, image, a, b).sum().backward()
    h = 1e-6
    value = lambda x, w: solver(x, image, w, b).item()  # noqa: E731
    for index in [(0, 0, 0), (0, 2, 1), (0, 4, 2)]:
        bumped = audio.detach().clone()
        bumped[index] += h
        down = audio.detach().clone()
        down[index] -= h
        numeric = (value(bumped, a.detach()) - value(down, a.detach())) / (2 * h)
        assert audio.grad[index].item() == pytest.approx(numeric, rel=1e-5, abs=1e-8)
    # Along a direction that keeps the total mass, the weight gradient is a difference of duals.
    direction = torch.zeros_like(a)
    direction[0, 1], direction[0, 3] = 1.0, -1.0
    numeric = (
        value(audio.detach(), a.detach() + h * direction)
        - value(audio.detach(), a.detach() - h * direction)
    ) / (2 * h)
    assert (a.grad * direction).sum().item() == pytest.approx(numeric, rel=1e-5, abs=1e-8)


def test_sinkhorn_approaches_exact_ot_as_eps_shrinks():
    audio, image = tokens(2, 6, 3, seed=12), tokens(2, 7, 3, seed=13)
    exact = OTSolver("exact")(audio, image)
    errors = []
    for eps in (0.1, 0.03, 0.01, 0.003):
        approx = OTSolver("sinkhorn", eps=eps, iters=3000)(audio, image)
        errors.append(((approx - exact).abs() / exact).max().item())
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 5e-3 and errors[0] > 10 * errors[-1]


def test_sinkhorn_plan_has_the_requested_marginals():
    cost = squared_distances(tokens(2, 5, 3, seed=14), tokens(2, 8, 3, seed=15))
    a = torch.softmax(tokens(2, 5, seed=16), -1)
    b = torch.full((2, 8), 1 / 8, dtype=torch.float64)
    plan, _, _ = sinkhorn_batch(cost, a, b, eps=0.05, iters=500)
    assert torch.allclose(plan.sum(-1), a, atol=1e-8)
    assert torch.allclose(plan.sum(-2), b, atol=1e-10)


def test_attentive_weights_sum_to_one_and_stay_above_half_uniform():
    torch.manual_seed(0)
    scorer = AttentiveWeights(dim=16, heads=8, tau=1e-4)  # a tiny tau makes the softmax peaky
    a, b = scorer(
        tokens(3, 10, 16, dtype=torch.float32), tokens(3, 12, 16, seed=1, dtype=torch.float32)
    )
    assert torch.allclose(a.sum(-1), torch.ones(3), atol=1e-6)
    assert torch.allclose(b.sum(-1), torch.ones(3), atol=1e-6)
    assert a.min() >= 0.5 / 10 - 1e-7 and b.min() >= 0.5 / 12 - 1e-7
    assert a.max() > 0.5 + 0.5 / 10 - 1e-3  # one token took nearly all of the softmax half


def test_entropy_of_uniform_weights_and_lambda_schedule():
    assert entropy(torch.full((1, 512), 1 / 512)).item() == pytest.approx(math.log(512), rel=1e-6)
    assert [entropy_weight(e) for e in range(1, 9)] == [None, 500, 400, 300, 200, 100, 100, 100]


def test_contrastive_loss_exact_value():
    # Cosines [[1, .6], [0, .8]] over temperature 0.05 give logits [[20, 12], [0, 16]].
    audio = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    image = torch.tensor([[[2.0, 0.0]], [[0.6, 0.8]]])
    expected = sum(math.log1p(math.exp(-m)) for m in (8, 16, 20, 4)) / 4
    assert contrastive_loss(audio, image).item() == pytest.approx(expected, rel=1e-5)


def test_ot_att_gradients_reach_the_scorer_only_through_its_loss():
    torch.manual_seed(0)
    scorer = AttentiveWeights(dim=8, heads=2)
    audio = tokens(2, 5, 8, dtype=torch.float32).requires_grad_()
    image = tokens(2, 6, 8, seed=1, dtype=torch.float32)
    objective = Objective("ot_att", OTSolver("exact"), scorer)
    frozen = objective(audio, image, entropy_lambda=None)
    assert frozen.scorer_loss is None
    out = objective(audio, image, entropy_lambda=500.0)
    assert out.loss.item() == pytest.approx(out.logged["ot"], rel=1e-6)
    expected = out.logged["ot"] - 500.0 * out.logged["entropy"]
    assert out.scorer_loss.item() == pytest.approx(expected, rel=1e-5)
    quirk = Objective("ot_att", OTSolver("exact"), scorer, double_gradient=True)(
        audio, image, 500.0
    )
    assert quirk.loss.item() == pytest.approx(
        2 * out.logged["ot"] - 500 * out.logged["entropy"], rel=1e-5
    )


@pytest.mark.parametrize("method", ["mmd", "ot", "ot_att", "contrastive"])
def test_losses_in_float32_and_under_bf16_autocast(method):
    torch.manual_seed(0)
    project = torch.nn.Linear(16, 16)
    audio_in, image = (
        tokens(4, 10, 16, dtype=torch.float32),
        tokens(4, 12, 16, seed=1, dtype=torch.float32),
    )
    scorer = AttentiveWeights(16, heads=8)
    objective = Objective(method, OTSolver("exact"), scorer)
    full = objective(project(audio_in), image, entropy_lambda=100.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        audio = project(audio_in)
        assert audio.dtype == torch.bfloat16
        half = objective(audio, image, entropy_lambda=100.0)
    assert full.loss.dtype == torch.float32 and half.loss.dtype == torch.float32
    half.loss.backward()
    assert torch.isfinite(project.weight.grad).all() and project.weight.grad.abs().sum() > 0
    assert half.loss.item() == pytest.approx(full.loss.item(), rel=3e-2)


def test_unknown_solver_and_method_are_named():
    with pytest.raises(ValueError, match="align.ot.solver"):
        OTSolver("greedy")
    with pytest.raises(ValueError, match="unknown 'cosine'"):
        Objective("cosine")


def test_nonfinite_cost_clip_contributes_zero():
    audio, image = tokens(2, 4, 3), tokens(2, 5, 3, seed=1)
    audio[1, 0, 0] = float("nan")
    costs = OTSolver("exact")(audio, image)
    assert costs[1].item() == 0.0 and np.isfinite(costs[0].item()) and costs[0].item() > 0
