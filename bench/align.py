"""Alignment costs side by side: loss step per method, and exact OT solvers against Sinkhorn.

    python bench/align.py                        # CPU: batch 4 for the losses, 8 clips for OT
    python bench/align.py --device cuda --batch 256 --ot-batch 64 --encoder
    python bench/align.py --tokens 64x64,64x128  # other shapes (audio NxD, image NxD)

Shapes default to the paper's: 512 audio tokens (CAV-MAE, already projected to 1024) against 576
CLIP-L/336 tokens of 1024. Token values are random normals (the frozen CLIP forward costs the same
for every method and is left out). Part 1 times one training step of each loss: forward, backward
into the audio tokens (and the scorer for ot_att); with --encoder, the full CAV-MAE audio encoder
forward and backward is included. Part 2 solves one batch of exact OT problems with POT one after
another, in a thread pool and in a process pool, then with the batched log-domain Sinkhorn, plain
(fixed eps and iterations) and scaled (eps scaling, marginal stopping rule, rounding: solver
`scaled`), and prints each one's transport cost beside exact EMD's on the same batch. Part 3
puts the scaled solver (OTSolver("scaled"), its exact fallback included) beside exact EMD on
Gaussian tokens and on the same tokens with 4 image tokens per clip at 5-20x the norm of the
rest, as CLIP ViT-L has: cost gap, the cosine of the gradient in the audio tokens, iterations,
clips it could not certify, seconds.
Compare with docs/performance-anchors.md (58 ms per 512x576 EMD on one core).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from dalipipe.align.attentive import AttentiveWeights
from dalipipe.align.objective import METHODS, Objective
from dalipipe.align.ot import OTSolver, emd_batch, sinkhorn_batch, squared_distances
from dalipipe.align.sinkhorn import scaled_sinkhorn


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def loss_steps(args, device) -> None:
    (na, da), (nv, dv) = args.shapes
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(args.batch, nv, dv, generator=gen).to(device)
    fbank = audio_in = None
    encoder = None
    if args.encoder:
        from dalipipe.models.cavmae import AudioEncoderConfig, CavMaeAudioEncoder

        encoder = CavMaeAudioEncoder(AudioEncoderConfig(out_dim=dv)).to(device)
        fbank = torch.randn(args.batch, 1024, 128, generator=gen).to(device)
    else:
        audio_in = torch.randn(args.batch, na, da, generator=gen).to(device)
        project = torch.nn.Linear(da, dv).to(device)
    print(
        f"\n## one training step per method, batch {args.batch}, audio {na}x{da} -> {dv}, "
        f"image {nv}x{dv}, {'with the CAV-MAE encoder' if encoder else 'loss only'}, "
        f"{args.precision}, {device}"
    )
    print(f"{'method':<24}{'seconds':>10}{'x mmd':>8}")
    base = None
    for method in METHODS:
        variants = [
            ("exact", {"solver": "exact", "workers": args.workers}),
            ("sinkhorn", {"solver": "sinkhorn", "eps": 0.05, "iters": 50}),
            ("scaled", {"solver": "scaled", "target_eps": args.scaled_eps[-1]}),
        ]
        for name, ot in variants if method in ("ot", "ot_att") else [("", {})]:
            solver = OTSolver(**ot) if ot else None
            scorer = AttentiveWeights(dv).to(device) if method == "ot_att" else None
            objective = Objective(method, solver, scorer)

            def step(objective=objective, scorer=scorer):
                with torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16"):
                    audio = encoder(fbank) if encoder is not None else project(audio_in)
                    out = objective(audio, image, 100.0 if scorer is not None else None)
                if out.scorer_loss is not None:
                    torch.autograd.grad(
                        out.scorer_loss, list(scorer.parameters()), retain_graph=True
                    )
                out.loss.backward()

            seconds = timed(step, args.repeats, device)
            base = base or seconds
            label = f"{method} ({name})" if name else method
            print(f"{label:<24}{seconds:>10.3f}{seconds / base:>8.2f}")
            if solver is not None:
                solver.close()


def ot_solvers(args, device) -> None:
    (na, da), (nv, dv) = args.shapes
    gen = torch.Generator().manual_seed(1)
    audio = torch.randn(args.ot_batch, na, dv, generator=gen)
    image = torch.randn(args.ot_batch, nv, dv, generator=gen)
    cost = squared_distances(audio, image).double()
    a = torch.full((args.ot_batch, na), 1 / na, dtype=torch.float64)
    b = torch.full((args.ot_batch, nv), 1 / nv, dtype=torch.float64)
    cost_np, a_np, b_np = cost.numpy(), a.numpy(), b.numpy()
    print(
        f"\n## exact OT for a batch of {args.ot_batch} clips, {na}x{nv} points of {dv}-d, "
        f"{os.cpu_count()} CPU cores"
    )
    print(f"{'solver':<34}{'batch s':>10}{'per clip ms':>13}{'speed-up':>10}")
    serial = None
    exact_values = None
    workers = args.workers or os.cpu_count()
    for label, kind in [
        ("POT emd, serial", None),
        (f"POT emd, {workers} threads", "thread"),
        (f"POT emd, {workers} processes", "process"),
    ]:
        solver = OTSolver("exact", workers=workers if kind else 0, pool=kind or "thread")

        def solve(solver=solver):
            return emd_batch(cost_np, a_np, b_np, pool=solver.pool())

        seconds = timed(solve, args.repeats, torch.device("cpu"))
        plan = solve()[0]
        solver.close()
        exact_values = (plan * cost_np).sum((1, 2))
        serial = serial or seconds
        print(
            f"{label:<34}{seconds:>10.3f}{1000 * seconds / args.ot_batch:>13.1f}"
            f"{serial / seconds:>10.2f}"
        )
    cost_dev, a_dev, b_dev = (t.float().to(device) for t in (cost, a, b))
    print(f"\n## batched log-domain Sinkhorn on {device} (float32) vs exact EMD, same batch")
    print(
        f"{'eps (of max cost)':<20}{'iters':>6}{'batch s':>10}{'rel. diff of cost (mean / max)':>34}"
    )
    for eps, iters in [(0.05, 50), (0.05, 200), (0.01, 200), (0.005, 500)]:
        seconds = timed(
            lambda eps=eps, iters=iters: sinkhorn_batch(cost_dev, a_dev, b_dev, eps, iters),
            args.repeats,
            device,
        )
        plan = sinkhorn_batch(cost_dev, a_dev, b_dev, eps, iters)[0].double().cpu()
        values = (plan * cost).sum((1, 2)).numpy()
        rel = np.abs(values - exact_values) / exact_values
        print(f"{eps:<20}{iters:>6}{seconds:>10.3f}{rel.mean():>22.2e} / {rel.max():.2e}")
    print(
        f"\n## scaled Sinkhorn on {device} (float32; eps 1 -> target by x0.5, tol 1e-3 L1, "
        "rounded) vs exact EMD, same batch"
    )
    print(
        f"{'target eps (of range)':<22}{'iters':>6}{'marg. err':>11}{'batch s':>10}"
        f"{'rel. diff of cost (mean / max)':>34}"
    )
    for eps in args.scaled_eps:
        seconds = timed(
            lambda eps=eps: scaled_sinkhorn(cost_dev, a_dev, b_dev, eps=eps),
            args.repeats,
            device,
        )
        result = scaled_sinkhorn(cost_dev, a_dev, b_dev, eps=eps)
        values = (result.plan.double().cpu() * cost).sum((1, 2)).numpy()
        rel = (values - exact_values) / exact_values
        print(
            f"{eps:<22}{result.iterations:>6}{result.marginal_error:>11.1e}{seconds:>10.3f}"
            f"{rel.mean():>22.2e} / {rel.max():.2e}"
        )


def with_high_norm_tokens(image: torch.Tensor, seed: int, count=4, low=5.0, high=20.0):
    """`count` tokens of each clip scaled to low..high times their norm."""
    gen = torch.Generator().manual_seed(seed)
    image = image.clone()
    for clip in image:
        rows = torch.randperm(clip.shape[0], generator=gen)[:count]
        clip[rows] *= low + (high - low) * torch.rand(count, 1, generator=gen)
    return image


def audio_gradient(plan, audio, image, a):
    """d<P, C>/d audio for the squared-Euclidean cost: 2 (a_i x_i - sum_j P_ij y_j)."""
    return 2 * (a.unsqueeze(-1) * audio - plan @ image)


def scaled_against_exact(args, device) -> None:
    (na, _), (nv, dv) = args.shapes
    gen = torch.Generator().manual_seed(2)
    audio = torch.randn(args.ot_batch, na, dv, generator=gen, dtype=torch.float64)
    image = torch.randn(args.ot_batch, nv, dv, generator=gen, dtype=torch.float64)
    a = torch.full((args.ot_batch, na), 1 / na, dtype=torch.float64)
    b = torch.full((args.ot_batch, nv), 1 / nv, dtype=torch.float64)
    print(
        f"\n## scaled Sinkhorn (OTSolver defaults) on {device} vs exact EMD, {args.ot_batch} "
        f"clips, {na}x{nv} points of {dv}-d: Gaussian tokens, and 4 image tokens per clip at "
        "5-20x norm"
    )
    print(
        f"{'tokens':<12}{'gap % (mean / max)':>20}{'grad cos (min)':>16}{'iters':>7}"
        f"{'exact clips':>13}{'scaled s':>10}{'exact s':>9}"
    )
    for label, img in [("Gaussian", image), ("high-norm", with_high_norm_tokens(image, 3))]:
        cost = squared_distances(audio, img)
        start = time.perf_counter()
        exact_plan = torch.from_numpy(emd_batch(cost.numpy(), a.numpy(), b.numpy())[0])
        exact_s = time.perf_counter() - start
        solver = OTSolver("scaled")
        cost_dev, a_dev, b_dev = (t.float().to(device) for t in (cost, a, b))
        seconds = timed(
            lambda solver=solver, inputs=(cost_dev, a_dev, b_dev): solver.plans(*inputs),
            args.repeats,
            device,
        )
        plan = solver.plans(cost_dev, a_dev, b_dev)[0].double().cpu()
        exact_value = (exact_plan * cost).sum((1, 2))
        gap = ((plan * cost).sum((1, 2)) - exact_value) / exact_value * 100
        cosine = torch.nn.functional.cosine_similarity(
            audio_gradient(plan, audio, img, a).flatten(1),
            audio_gradient(exact_plan, audio, img, a).flatten(1),
        )
        stats = solver.last_stats
        print(
            f"{label:<12}{gap.mean():>11.3f} / {gap.max():<6.3f}{cosine.min():>16.4f}"
            f"{stats['iterations']:>7}{len(stats['exact_clips']):>13}{seconds:>10.3f}"
            f"{exact_s:>9.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4, help="clips per loss step")
    parser.add_argument("--ot-batch", type=int, default=8, help="clips per OT batch")
    parser.add_argument("--tokens", default="512x1024,576x1024", help="audio NxD,image NxD")
    parser.add_argument("--workers", type=int, default=0, help="pool size (0: all cores)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--encoder", action="store_true", help="include the CAV-MAE encoder")
    parser.add_argument("--skip-losses", action="store_true")
    parser.add_argument("--skip-ot", action="store_true", help="only the loss steps")
    parser.add_argument(
        "--only-high-norm",
        action="store_true",
        help="only part 3, the scaled solver on Gaussian and high-norm token sets",
    )
    parser.add_argument(
        "--scaled-eps",
        default="0.01,0.003,0.001",
        help="target eps values of the scaled Sinkhorn (the last one is timed in the loss steps)",
    )
    args = parser.parse_args()
    args.shapes = [tuple(int(x) for x in s.split("x")) for s in args.tokens.split(",")]
    args.scaled_eps = [float(x) for x in args.scaled_eps.split(",")]
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")
    if args.only_high_norm:
        args.skip_losses = args.skip_ot = True
    if not args.skip_losses:
        loss_steps(args, device)
    if not args.skip_ot:
        ot_solvers(args, device)
    if not args.skip_ot or args.only_high_norm:
        scaled_against_exact(args, device)


if __name__ == "__main__":
    main()
