"""Every paper-shape figure in one command, with its plain-library baseline from the same run.

    python bench/suite.py --scale paper --out bench/results/    # one H100/H200, < 8 min, bf16
    python bench/suite.py --scale tiny --out /tmp/suite         # the same code on CPU, seconds
    python bench/readme_table.py                                # bench/README.md table from the newest

Random weights (the cost of a pass does not depend on them), models built from their
`transformers` config classes on the device. Figures (`figure_names`):
- alignment step per method at batch 256 (frozen CLIP forward, CAV-MAE encoder forward and
  backward, the loss, Adam): MMD, contrastive, OT and attentive OT with the fast solver
  (`scaled` Sinkhorn where dalipipe has it, else `sinkhorn`) beside exact EMD one clip after
  another (POT, the authors' way); exact EMD in a pool of all CPU cores; the fast solver's
  transport cost against exact EMD's on the same batch;
- prefix and distillation steps with activation checkpointing (baseline: without), and their
  peak memory beside `dalipipe plan-memory`'s estimate;
- pseudo-label clips/s by batch (`AudioCaptioner.generate`; its fast path where it has one);
- BLIP-2 frames captioned/s by batch (`FrameCaptioner`, the filter's path; baseline: the
  processor and `generate` called directly);
- extraction clips/s per CPU core (`extract_all` on synthetic clips).
A section that fails (out of memory, say) becomes error entries; the suite goes on. One JSON,
`<out>/<UTC timestamp>-<gpu or cpu name>.json` (bench/common.py), and a table on stdout.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    PAPER_LLAVA,
    attempt,
    cpu_seconds,
    failed,
    figure,
    machine_info,
    median_seconds,
    peak_bytes,
    resident_bytes,
    write_result,
)

log = logging.getLogger("bench.suite")
REPO = Path(__file__).resolve().parents[1]
GIB = 2**30


# --- the two scales -----------------------------------------------------------------------------


def scale_settings(scale: str) -> dict:
    """Shapes and batch sizes: the paper's from configs/paper.yaml, or tiny ones for the CPU."""
    from dalipipe.config import load_config
    from dalipipe.memory.sequences import PREFIX_CAPTION_TOKENS

    if scale == "tiny":
        return {
            "device": "cpu",
            "config": load_config(),
            "llava": dict(
                image_size=64,
                patch_size=8,
                vision_hidden=32,
                vision_layers=2,
                vision_heads=2,
                text_hidden=64,
                text_layers=2,
                text_heads=4,
                max_positions=2048,
            ),  # fmt: skip
            "encoder": dict(num_mel_bins=64, target_length=256, embed_dim=64, depth=2, num_heads=4),
            "align_batch": 4,
            "prefix_batch": 4,
            "distill_batch": 4,
            "prefix_caption_tokens": PREFIX_CAPTION_TOKENS,
            "distill_caption_tokens": 17,
            "generate_batches": [2, 4],
            "generate_tokens": 8,
            "filter_batches": [2, 4],
            "filter_tokens": 4,
            "frame_side": 64,
            "extract": dict(clips=2, seconds=2.56, size=64),
            "extract_settings": {
                "frame_short_side": 64,
                "fbank": {"num_mel_bins": 64, "target_length": 256},
            },
            "repeats": 1,
        }
    if scale != "paper":
        raise ValueError(f"--scale: unknown {scale!r}, expected tiny or paper")
    config = load_config(REPO / "configs" / "paper.yaml")
    encoder = dict(config["models"]["audio_encoder"])
    encoder.pop("checkpoint", None)
    return {
        "device": "cuda",
        "config": config,
        "llava": PAPER_LLAVA,
        "encoder": encoder,
        "align_batch": 256,  # the authors' global batch (4 GPUs x 64) on one GPU
        "prefix_batch": config["prefix"]["batch_size"],
        "distill_batch": config["distill"]["batch_size"],
        # the memory plan's assumptions: the longest caption of each stage
        "prefix_caption_tokens": PREFIX_CAPTION_TOKENS,
        "distill_caption_tokens": config["pseudolabel"]["max_new_tokens"] + 1,
        "generate_batches": sorted({config["pseudolabel"]["batch_size"], 64}),
        "generate_tokens": 32,  # docs/performance-anchors.md's shape
        "filter_batches": sorted({config["filter"]["batch_size"], 256}),
        "filter_tokens": config["filter"]["max_new_tokens"],
        "frame_side": config["extract"]["frame_short_side"],
        "extract": dict(clips=12, seconds=config["extract"]["window_seconds"], size=336),
        "extract_settings": config["extract"],
        "repeats": 3,
    }


# --- models ------------------------------------------------------------------------------------


def build_captioner(s: dict, device, dtype):
    """A random LLaVA of the scale's shape with a random CAV-MAE encoder, on ``device``."""
    from transformers import LlavaForConditionalGeneration

    from dalipipe.models.captioner import AudioCaptioner, CaptionerOptions
    from dalipipe.models.cavmae import build_encoder
    from dalipipe.models.llava_config import llava_config, llava_processor
    from dalipipe.models.tokenizer import build_tokenizer
    from dalipipe.prompts import PROMPTS, TEMPLATES

    # the prompts in the corpus: their words become single tokens, as in a real tokenizer
    corpus = [t.format(prompt=p) for t in TEMPLATES.values() for p in PROMPTS.values()]
    tokenizer = build_tokenizer(corpus + [CAPTION_WORDS] * 4, vocab_size=1000)
    config = llava_config(tokenizer, **s["llava"])
    if s["llava"]["vision_hidden"] == 1024:  # CLIP ViT-L's, as the hub's config.json
        config.vision_config.projection_dim = 768
        config.text_config.rms_norm_eps = 1e-5
    torch.manual_seed(0)
    with torch.device(device):
        llava = LlavaForConditionalGeneration(config).to(dtype)
        encoder = build_encoder(s["encoder"], out_dim=config.vision_config.hidden_size).to(dtype)
    llava.generation_config.pad_token_id = tokenizer.pad_token_id
    processor = llava_processor(tokenizer, s["llava"]["image_size"], s["llava"]["patch_size"])
    options = CaptionerOptions.from_dict(s["config"]["models"].get("options"))
    captioner = AudioCaptioner(llava, processor, options=options, audio_encoder=encoder)
    return captioner.to(device=device, dtype=dtype)


CAPTION_WORDS = "a dog barks in the distance while a man speaks and cars pass by on a wet road"


def caption_of(captioner, tokens: int) -> str:
    """A caption that `caption_loss` scores as ``tokens`` tokens (with its end token), or the
    first length past it."""
    words = CAPTION_WORDS.split()
    text = words[0]  # a caption is never empty (training_ids refuses one)
    while captioner.caption_token_count([text]) < tokens:
        text = f"{text} {words[len(text.split()) % len(words)]}".strip()
    return text


def noise_frames(n: int, side: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(n)]


def plan_estimate(s: dict, stage: str, captioner_dir, batch: int) -> float:
    """`dalipipe plan-memory`'s peak for ``stage`` at ``batch``, in GiB, for the scale's config
    (tiny: the miniature config with the suite's tiny captioner and encoder)."""
    from dalipipe.config import merge
    from dalipipe.memory.stages import Planner

    config = s["config"]
    if captioner_dir is not None:
        config = merge(
            config,
            {
                "models": {"captioner": str(captioner_dir), "audio_encoder": s["encoder"]},
                "pseudolabel": {"max_new_tokens": s["distill_caption_tokens"] - 1},
            },
        )
    return Planner(config).estimate(stage, batch).peak / GIB


# --- alignment ---------------------------------------------------------------------------------


def solver_kwargs(solver: str, ot: dict) -> dict:
    """The config's align.ot settings that OTSolver takes (it gains keywords over time)."""
    from dalipipe.align.ot import OTSolver

    accepted = inspect.signature(OTSolver).parameters
    skip = {"solver", "workers", "pool"}
    return {k: v for k, v in ot.items() if k in accepted and k not in skip} | {"solver": solver}


def align_figures(s: dict, captioner, device) -> list[dict]:
    from dalipipe.align.attentive import AttentiveWeights
    from dalipipe.align.objective import Objective
    from dalipipe.align.ot import OTSolver
    from dalipipe.models.cavmae import build_encoder

    batch, repeats = s["align_batch"], s["repeats"]
    width = captioner.llava.config.vision_config.hidden_size
    side = s["llava"]["image_size"]
    ot, att = s["config"]["align"]["ot"], s["config"]["align"]["attentive"]
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    encoder = build_encoder(s["encoder"], out_dim=width).to(device)  # float32, as stage align
    cfg = encoder.config
    fbank = torch.randn(batch, cfg.target_length, cfg.num_mel_bins, generator=gen).to(device)
    pixels = torch.randn(batch, 3, side, side, generator=gen).to(device, captioner.dtype)
    optimizer = torch.optim.Adam(encoder.parameters(), lr=1e-4)
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    shape = {
        "batch": batch,
        "audio_tokens": cfg.num_tokens,
        "image_tokens": (side // s["llava"]["patch_size"]) ** 2,
        "width": width,
        "encoder": f"CAV-MAE {cfg.embed_dim}x{cfg.depth}+{cfg.shared_depth}",
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
    }

    def objective_for(method: str, solver: str | None, workers: int = 0):
        scorer = AttentiveWeights(width, att["heads"], att["tau"], att["uniform_mix"])
        scorer = scorer.to(device) if method == "ot_att" else None
        ot_solver = None
        if solver is not None:
            kwargs = solver_kwargs(solver, ot)
            ot_solver = OTSolver(**kwargs, workers=workers, pool=ot["pool"])
        return Objective(method, ot_solver, scorer), scorer

    def step_of(objective, scorer):
        """One step of stage align (dalipipe/align/train.py Run.train_step) on random inputs."""
        scorer_opt = torch.optim.Adam(scorer.parameters(), lr=1e-4) if scorer else None

        def step():
            with torch.no_grad(), torch.autocast(**autocast):
                image = captioner.image_tokens(pixels).float()
            with torch.autocast(**autocast):
                audio = encoder(fbank)
                out = objective(audio, image, att["lambdas"][0] if scorer else None, train=True)
            optimizer.zero_grad(set_to_none=True)
            if out.scorer_loss is not None:
                scorer_opt.zero_grad(set_to_none=True)
                params = list(scorer.parameters())
                grads = torch.autograd.grad(
                    out.scorer_loss, params, retain_graph=True, allow_unused=True
                )
            out.loss.backward()
            optimizer.step()
            if out.scorer_loss is not None:
                for param, grad in zip(params, grads):
                    param.grad = grad
                scorer_opt.step()

        return step

    def seconds(method, solver=None, workers=0, exact=False):
        objective, scorer = objective_for(method, solver, workers)
        try:
            # exact EMD: its CPU solve dominates, the GPU kernels are warm from the fast runs
            warmup, times = (0, 1) if exact and device.type == "cuda" else (1, repeats)
            return median_seconds(step_of(objective, scorer), device, times, warmup)
        finally:
            if objective.solver is not None:
                objective.solver.close()

    out = []
    for method in ("mmd", "contrastive"):
        out.append(figure(f"align.{method}.step", shape, seconds(method), "s/step"))
    serial = {}
    fast_solver = fast_solver_name()
    for method in ("ot", "ot_att"):
        fast = seconds(method, fast_solver)
        serial[method] = seconds(method, "exact", exact=True)
        out.append(
            figure(
                f"align.{method}.step",
                shape | {"solver": fast_solver},
                fast,
                "s/step",
                "exact EMD one clip after another (POT, 1 core)",
                serial[method],
                solver_settings=solver_kwargs(fast_solver, ot),
            )
        )
    workers = os.cpu_count() or 1
    pooled = seconds("ot", "exact", workers=workers, exact=True)
    out.append(
        figure(
            "align.ot_exact_pool.step",
            shape | {"solver": f"exact EMD, {ot['pool']} pool of {workers}"},
            pooled,
            "s/step",
            "exact EMD one clip after another (POT, 1 core)",
            serial["ot"],
        )
    )
    out.append(cost_gap(encoder, captioner, fbank, pixels, autocast, ot, shape))
    return out


def fast_solver_name() -> str:
    """The fastest OT solver near exact EMD that dalipipe has: ``scaled`` (epsilon scaling, a
    stopping rule and rounding) where it exists, else the fixed-iteration ``sinkhorn``."""
    from dalipipe.align.ot import SOLVERS

    return "scaled" if "scaled" in SOLVERS else "sinkhorn"


def cost_gap(encoder, captioner, fbank, pixels, autocast, ot, shape) -> dict:
    """The fast solver's transport cost per clip against exact EMD's on the same batch (and the
    fixed-iteration Sinkhorn's, where the fast solver is another)."""
    from dalipipe.align.ot import OTSolver

    with torch.no_grad(), torch.autocast(**autocast):
        image = captioner.image_tokens(pixels).float()
        audio = encoder(fbank).float()
    exact_solver = OTSolver("exact", workers=os.cpu_count() or 1, pool=ot["pool"])
    try:
        exact = exact_solver(audio, image).double().cpu()
    finally:
        exact_solver.close()
    gaps, means = {}, {}
    for solver in dict.fromkeys([fast_solver_name(), "sinkhorn"]):
        cost = OTSolver(**solver_kwargs(solver, ot))(audio, image).double().cpu()
        gaps[solver] = ((cost - exact).abs() / exact).numpy() * 100
        means[solver] = float(cost.mean())
        print(
            f"transport cost, {len(exact)} clips: exact EMD mean {exact.mean():.4g}, {solver} "
            f"mean {cost.mean():.4g}, relative gap mean {gaps[solver].mean():.3f}% "
            f"max {gaps[solver].max():.3f}%"
        )
    fast = fast_solver_name()
    return figure(
        "align.ot.cost_gap",
        shape | {"solver": fast},
        float(gaps[fast].mean()),
        "% of exact EMD",
        "exact EMD (POT)",
        None,
        max_percent=float(gaps[fast].max()),
        exact_mean=float(exact.mean()),
        solver_mean=means[fast],
        solver_settings=solver_kwargs(fast, ot),
        sinkhorn_mean_percent=float(gaps["sinkhorn"].mean()),
    )


# --- prefix and distillation --------------------------------------------------------------------


def training_figures(s, captioner, device, stage: str, captioner_dir) -> list[dict]:
    """One optimizer step of stage prefix or distill (their loss, `accumulate`, AdamW), with
    and without activation checkpointing of the frozen LLM, and its peak memory."""
    from dalipipe.caption.schedule import adamw_cosine
    from dalipipe.training import accumulate, activation_checkpointing

    if stage == "prefix":
        batch = s["prefix_batch"]
        caption = caption_of(captioner, s["prefix_caption_tokens"])
        settings = {"modality": "image", "use_prefix": True}
        captioner.init_prefix(n_tokens=s["config"]["prefix"]["n_tokens"], std=1e-4, seed=0)
        part = "prefix"
        pixel_values = captioner.pixel_values(noise_frames(batch, s["frame_side"]))
    else:
        batch = s["distill_batch"]
        caption = caption_of(captioner, s["distill_caption_tokens"])
        settings = {"modality": "audio", "use_prefix": False}
        if captioner.dtype != torch.float32:  # float32 master weights, as fit_projector
            captioner.audio_projector.float()
        part = "audio_projector"
        cfg = captioner.audio_encoder.config
        rng = np.random.default_rng(0)
        fbanks = rng.normal(size=(batch, cfg.target_length, cfg.num_mel_bins)).astype(np.float16)
    captions = [caption] * batch
    n_tokens = captioner.caption_token_count(captions)
    params = captioner.trainable_parameters(part)
    optimizer, _ = adamw_cosine(params, lr=1e-4, total_steps=1000)

    def summed_loss(indices):
        if stage == "prefix":
            return captioner.caption_loss(
                captions=[captions[i] for i in indices],
                modality="image",
                pixel_values=pixel_values[indices],
                use_prefix=True,
                reduction="sum",
            )
        from dalipipe.caption.distill import summed_loss as distill_loss

        examples = [{"caption": captions[i], "fbank": fbanks[i]} for i in indices]
        return distill_loss(captioner, examples, settings)

    def step_with(checkpointing: bool):
        def step():
            with activation_checkpointing(captioner.language_model, enabled=checkpointing):
                optimizer.zero_grad(set_to_none=True)
                accumulate(list(range(batch)), batch, summed_loss, n_tokens)
                optimizer.step()

        return step

    shape = {
        "batch": batch,
        "caption_tokens": n_tokens // batch,
        "modality": settings["modality"],
        "dtype": str(captioner.dtype).replace("torch.", ""),
    }
    checkpointed = median_seconds(step_with(True), device, s["repeats"])
    peak = peak_bytes(step_with(True), device, resident_bytes(captioner)) / GIB
    try:
        plain = median_seconds(step_with(False), device, s["repeats"])
        plain_error = None
    except torch.OutOfMemoryError as error:  # the baseline may not fit where the stage does
        plain, plain_error = None, str(error).splitlines()[0]
        torch.cuda.empty_cache()
    estimate = plan_estimate(s, stage, captioner_dir, batch)
    extra = {"error": plain_error} if plain_error else {}
    return [
        figure(
            f"{stage}.step",
            shape | {"activation_checkpointing": True},
            checkpointed,
            "s/step",
            "without activation checkpointing",
            plain,
            **extra,
        ),
        figure(
            f"{stage}.peak_memory",
            shape | {"activation_checkpointing": True},
            peak,
            "GiB",
            "dalipipe plan-memory estimate",
            estimate,
        ),
    ]


# --- pseudo-labels -----------------------------------------------------------------------------


FAST_KEYWORDS = ("fast", "fast_path", "fast_generate")


def fast_keyword(captioner) -> str | None:
    """The keyword that selects `AudioCaptioner.generate`'s fast path, if it has one."""
    accepted = inspect.signature(captioner.generate).parameters
    return next((name for name in FAST_KEYWORDS if name in accepted), None)


def generate_figures(s, captioner, device) -> list[dict]:
    """Clips/s of `AudioCaptioner.generate` as stage pseudolabel calls it (audio + image +
    prefix, greedy), the frames' preprocessing included."""
    cfg = captioner.audio_encoder.config
    tokens = s["generate_tokens"]
    if captioner.prefix is None:
        captioner.init_prefix(n_tokens=s["config"]["prefix"]["n_tokens"], std=1e-4, seed=0)
    fast = fast_keyword(captioner)
    plain_options = {fast: False} if fast else {}
    out = []
    for batch in s["generate_batches"]:
        frames = noise_frames(batch, s["frame_side"])
        fbank = torch.randn(batch, cfg.target_length, cfg.num_mel_bins)

        def run(options, frames=frames, fbank=fbank):
            return lambda: captioner.generate(
                modality="audio+image",
                pixel_values=captioner.pixel_values(frames),
                fbank=fbank,
                use_prefix=True,
                max_new_tokens=tokens,
                do_sample=False,
                **options,
            )

        plain = batch / median_seconds(run(plain_options), device, s["repeats"])
        shape = {"batch": batch, "new_tokens": tokens, "modality": "audio+image", "prefix": True}
        if fast is None:
            out.append(figure(f"pseudolabel.batch{batch}", shape, plain, "clips/s", fast_path=None))
            continue
        value = batch / median_seconds(run({fast: True}), device, s["repeats"])
        out.append(
            figure(
                f"pseudolabel.batch{batch}",
                shape | {"path": f"{fast}=True"},
                value,
                "clips/s",
                "plain generate",
                plain,
            )
        )
    return out


# --- the caption filter ------------------------------------------------------------------------


def make_blip2(scale: str, out: Path, device) -> Path:
    """A random BLIP-2 saved where `FrameCaptioner` loads it: OPT-2.7B's shapes at full depth
    (ViT-g 39 layers, Q-Former 12, OPT 32) at paper scale, built on the device."""
    from dalipipe.testing.checkpoints import make_paper_width_blip2, make_tiny_blip2

    if scale == "tiny":
        return make_tiny_blip2(out, image_size=224, patch_size=14, hidden=64)
    with torch.device(device):
        return make_paper_width_blip2(
            out, corpus=[CAPTION_WORDS], vision_layers=39, qformer_layers=12, opt_layers=32
        )


def filter_figures(s, scale, device, tmp: Path) -> list[dict]:
    from PIL import Image

    from dalipipe.data.filter import FrameCaptioner

    path = make_blip2(scale, tmp / "blip2", device)
    captioner = FrameCaptioner(
        str(path), device=device, prompt="", max_new_tokens=s["filter_tokens"]
    )
    model, processor = captioner.model, captioner.processor

    def plain(images):  # the processor and generate, as the model card shows them
        inputs = processor(images=images, text=[""] * len(images), return_tensors="pt").to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        with torch.inference_mode():
            ids = model.generate(**inputs, max_new_tokens=s["filter_tokens"], do_sample=False)
        return processor.batch_decode(ids, skip_special_tokens=True)

    out = []
    for batch in s["filter_batches"]:
        images = [Image.fromarray(f) for f in noise_frames(batch, s["frame_side"])]
        value = batch / median_seconds(lambda i=images: captioner(i), device, s["repeats"])
        baseline = batch / median_seconds(lambda i=images: plain(i), device, s["repeats"])
        shape = {
            "batch": batch,
            "frame": f"{s['frame_side']} px",
            "new_tokens": s["filter_tokens"],
            "model": f"BLIP-2, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters",
        }
        out.append(
            figure(
                f"filter.batch{batch}",
                shape,
                value,
                "frames/s",
                "processor + generate",
                baseline,
            )
        )
    return out


# --- extraction --------------------------------------------------------------------------------


def extract_figures(s, tmp: Path) -> list[dict]:
    """Clips extracted per CPU second (this process and its ffmpeg children), one worker."""
    from dalipipe.data.extract import extract_all, read_sources
    from dalipipe.world import synthetic

    e = s["extract"]
    world = synthetic.world_config(
        {
            "clip_seconds": e["seconds"],
            "frame_size": e["size"],
            "splits": {"align": e["clips"], "pseudolabel": 0, "prefix": 0, "test": 0},
        }
    )
    synthetic.generate_part(world, 0, 0, 1, tmp / "acquire", 1)
    entries = read_sources(tmp / "acquire" / "manifest.csv")
    began, wall = cpu_seconds(), time.perf_counter()
    rows = extract_all(entries, tmp / "extract", s["extract_settings"], 1)
    cpu, wall = cpu_seconds() - began, time.perf_counter() - wall
    ok = sum(r["status"] == "ok" for r in rows)
    if ok != len(entries):
        raise RuntimeError(f"extraction: {len(entries) - ok} of {len(entries)} clips failed")
    fbank = s["extract_settings"]["fbank"]
    shape = {
        "clips": ok,
        "clip": f"{e['seconds']} s synthetic, {e['size']} px",
        "frame_short_side": s["extract_settings"]["frame_short_side"],
        "fbank": f"{fbank['target_length']}x{fbank['num_mel_bins']}",
    }
    authors, missing = authors_per_core(entries, tmp / "authors", fbank)
    extra = {"authors_skipped": missing} if missing else {}
    return [
        figure(
            "extract.per_core",
            shape,
            ok / cpu,
            "clips/s/core",
            None if missing else "the authors' preprocessing (bench/extract_authors.py)",
            authors,
            wall_clips_per_s=ok / wall,
            **extra,
        )
    ]


def authors_per_core(entries, out: Path, fbank: dict) -> tuple[float | None, str | None]:
    """The authors' preprocessing of the same clips (OpenCV frames, ffmpeg + sox WAV, the
    loader's fbank), clips per CPU second; (None, why) where its tools are missing."""
    try:
        import extract_authors
    except ImportError as error:
        return None, f"bench/extract_authors.py: {error}"
    missing = extract_authors.missing_tools()
    if missing:
        return None, ", ".join(missing) + " not available"
    # the AudioSet statistics their loader normalises with (configs/paper.yaml's)
    fbank = {**fbank, "mean": -5.081, "std": 4.4849}
    began = cpu_seconds()
    for entry in entries:
        extract_authors.preprocess(entry["path"], out / entry["clip_id"], fbank)
    return len(entries) / (cpu_seconds() - began), None


# --- the suite ---------------------------------------------------------------------------------


def figure_names(s: dict) -> list[str]:
    """Every figure the suite measures at a scale, in its order."""
    names = [f"align.{m}.step" for m in ("mmd", "contrastive", "ot", "ot_att")]
    names += ["align.ot_exact_pool.step", "align.ot.cost_gap"]
    names += [f"pseudolabel.batch{b}" for b in s["generate_batches"]]
    for stage in ("prefix", "distill"):
        names += [f"{stage}.step", f"{stage}.peak_memory"]
    names += [f"filter.batch{b}" for b in s["filter_batches"]]
    return names + ["extract.per_core"]


def run_suite(scale: str, out_dir, budget_s: float = 480.0) -> Path:
    """Every section in turn; the JSON is rewritten after each, so a run killed midway keeps
    what it measured, and sections not started within ``budget_s`` seconds are recorded as
    not run."""
    s = scale_settings(scale)
    if s["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--scale paper needs a CUDA GPU (use --scale tiny on a CPU)")
    device = torch.device(s["device"])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    machine = machine_info(device, scale)
    log.info("suite at scale %s on %s (%s)", scale, machine["gpu"] or "CPU", machine["cpu"])
    names = figure_names(s)
    figures: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="suite-") as tmp:
        tmp = Path(tmp)
        captioner_dir = None
        captioner = None

        def captioner_figures(section):
            nonlocal captioner, captioner_dir
            if captioner is None:
                torch.set_grad_enabled(True)
                captioner = build_captioner(s, device, dtype)
                if scale == "tiny":  # the memory plan reads a local captioner's config
                    captioner_dir = tmp / "llava"
                    captioner.llava.save_pretrained(captioner_dir)
                    captioner.processor.save_pretrained(captioner_dir)
            return section()

        sections = [
            ("align", lambda: captioner_figures(lambda: align_figures(s, captioner, device))),
            ("pseudolabel", lambda: captioner_figures(lambda: generate_figures(s, captioner, device))),  # noqa: E501
            ("prefix", lambda: captioner_figures(lambda: training_figures(s, captioner, device, "prefix", captioner_dir))),  # noqa: E501
            ("distill", lambda: captioner_figures(lambda: training_figures(s, captioner, device, "distill", captioner_dir))),  # noqa: E501
            ("filter", lambda: filter_figures(s, scale, device, tmp)),
            ("extract", lambda: extract_figures(s, tmp)),
        ]  # fmt: skip
        started = time.perf_counter()
        for name, section in tqdm(sections, desc=f"suite {scale}", unit="section"):
            if name == "filter":  # the LLaVA makes room for BLIP-2
                captioner = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            began = time.perf_counter()
            expected = [n for n in names if n.startswith(name + ".")]
            if began - started > budget_s:
                spent = TimeoutError(f"not run: the suite's {budget_s:.0f} s budget was spent")
                figures += [failed(n, spent) for n in expected]
            else:
                figures += attempt(expected, section)
            path = write_result(out_dir, machine, figures)
            log.info("%s: %.1f s", name, time.perf_counter() - began)
    print_table(machine, figures)
    print(f"wrote {path}")
    return path


def print_table(machine: dict, figures: list[dict]) -> None:
    print(
        f"\n{machine['gpu'] or 'CPU only'}, {machine['cpu']} x{machine['cpu_cores']}, "
        f"torch {machine['torch']}, transformers {machine['transformers']}, "
        f"scale {machine['scale']}, {machine['date']}"
    )
    print(f"{'figure':<28}{'value':>12}  {'unit':<15}{'baseline':>12}  {'x':>6}  baseline")
    for f in figures:
        if f["value"] is None:
            print(f"{f['name']:<28}{'error':>12}  {f['error']}")
            continue
        base = f["baseline_value"]
        ratio = ""
        if base:
            faster = f["unit"] in ("s/step",)  # lower is better for times
            ratio = f"{(base / f['value'] if faster else f['value'] / base):.2f}"
        base_text = "" if base is None else f"{base:.4g}"
        print(
            f"{f['name']:<28}{f['value']:>12.4g}  {f['unit']:<15}{base_text:>12}  {ratio:>6}  "
            f"{f['baseline'] or ''}"
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=["tiny", "paper"], default="tiny")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"), help="result folder")
    parser.add_argument(
        "--budget", type=float, default=480.0, help="seconds after which no section starts"
    )
    args = parser.parse_args(argv)
    from dalipipe.common import setup_logging

    setup_logging()
    began = time.perf_counter()
    path = run_suite(args.scale, args.out, args.budget)
    log.info("suite done in %.0f s: %s", time.perf_counter() - began, path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
