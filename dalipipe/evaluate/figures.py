"""The paper's per-clip figures: image tokens against audio tokens (Figure 6) and the attentive
scorer's token weights (Figure 7).

    dalipipe figure pca-clip --params '{"seed": 0, "evaluate": {...}, "models": {...}}' \
        --dataset miniature --shards results/miniature/shards/test \
        --captioner results/miniature/models/llava \
        --align results/miniature/align/mmd results/miniature/align/ot ... \
        --out results/miniature/report/pca_clip.png
    dalipipe figure attention ... --align results/miniature/align/ot_att \
        --out results/miniature/report/attention.png

Figure 6 takes one clip (``evaluate.figures.pca_clip``, else the first test clip), its frame's
CLIP tokens and every encoder's audio tokens (the untrained one too), and projects them all
onto one PCA plane, one panel per encoder on shared axes: distribution alignment puts the audio
tokens among the image tokens, where Figure 4's mean tokens only show the gap closing.
Figure 7 runs ot_att's trained scorer (saved beside its encoder, align.attentive.save_scorer)
on chosen clips (``evaluate.figures.attention_clips``): the weight of each image token as a
heatmap over the frame CLIP saw, and of each audio token over the filterbank (time along x,
mel bins up). Weights are drawn as multiples of the uniform share 1/N. An align directory written
before scorers were saved gets a figure that says so instead.
The clips are read as the evaluate stage reads them (evaluate.datasets, evaluate.frame); the
captioner is loaded as every stage loads it (models.captioner_revision, models.options).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from dalipipe.common import add_params, atomic_path, pick_device, read_stage
from dalipipe.config import section_defaults

log = logging.getLogger(__name__)


# --- inputs shared with the probe ----------------------------------------------------------


def eval_settings(params: dict) -> dict:
    """Config `evaluate` with its defaults, `figures` too."""
    settings = {**section_defaults("evaluate"), **(params.get("evaluate") or {})}
    settings["figures"] = {
        **section_defaults("evaluate")["figures"],
        **(settings.get("figures") or {}),
    }
    return settings


def eval_seed(params: dict) -> int:
    """The evaluate stage's seed (its untrained encoder is drawn from it)."""
    seed = eval_settings(params).get("seed")
    return int(seed if seed is not None else params["seed"])


def open_test_set(params: dict, dataset: str, shards=None):
    """The evaluation set as the evaluate stage opens it; clips load lazily."""
    from dalipipe.evaluate.datasets import load_dataset

    settings = eval_settings(params)
    ds_cfg = dict((settings.get("datasets") or {}).get(dataset) or {})
    if dataset == "miniature":
        if not shards:
            raise ValueError("dataset miniature: --shards (the test shards) is required")
        ds_cfg.setdefault("shards", str(shards))
    fbank_cfg = (params.get("extract") or {}).get("fbank") or {}
    return load_dataset(dataset, ds_cfg, fbank_cfg, settings["frame"])


def choose_clips(ds, spec, setting: str, *, need_frame: bool) -> list[tuple]:
    """(clip, fbank, frame) for ``spec``: a count of first readable clips, a clip id, a list of
    ids, or None (the first clip). A named clip that is missing or unreadable is an error."""
    if spec is None:
        spec = 1
    if isinstance(spec, int):
        chosen = []
        for clip in ds.clips:
            try:
                fbank, frame = clip.load()
            except Exception as err:  # a broken clip is skipped: the next one stands in
                log.warning("%s: clip %s skipped: %s", setting, clip.clip_id, err)
                continue
            if need_frame and frame is None:
                log.warning("%s: clip %s skipped: no frame", setting, clip.clip_id)
                continue
            chosen.append((clip, fbank, frame))
            if len(chosen) == spec:
                break
        if not chosen:
            raise ValueError(f"{setting}: no readable clip in the {ds.name} test set")
        return chosen
    ids = [spec] if isinstance(spec, str) else list(spec)
    by_id = {c.clip_id: c for c in ds.clips}
    chosen = []
    for clip_id in ids:
        if clip_id not in by_id:
            raise ValueError(f"{setting}: clip {clip_id!r} is not in the {ds.name} test set")
        try:
            fbank, frame = by_id[clip_id].load()
        except Exception as err:
            raise ValueError(f"{setting}: clip {clip_id!r} cannot be read ({err})") from err
        if need_frame and frame is None:
            raise ValueError(f"{setting}: clip {clip_id!r} has no frame")
        chosen.append((by_id[clip_id], fbank, frame))
    return chosen


def load_base(params: dict, captioner_dir):
    """The base captioner without an audio encoder; encoders are swapped in one at a time."""
    from dalipipe.models.assemble import load_captioner
    from dalipipe.training import default_dtype

    device = pick_device(params["device"])
    dtype = default_dtype(device)
    captioner = load_captioner(captioner_dir, params.get("models"), device=device, dtype=dtype)
    return captioner.eval()


def encoders(align_dirs: list, seed: int):
    """(name, encoder) for the untrained encoder (drawn from ``seed``, as the evaluate stage's)
    and every aligned one, named after its directory (the method); loaded one at a time."""
    from dalipipe.evaluate.run import untrained_encoder
    from dalipipe.models.cavmae import load_encoder

    dirs = {Path(d).name: Path(d) for d in align_dirs}
    yield "untrained", untrained_encoder(dirs, seed)
    for name, directory in dirs.items():
        yield name, load_encoder(directory).eval()


def clip_tokens(captioner, encoder, fbank: np.ndarray, frame=None):
    """(image tokens (Nv, D) or None, audio tokens (Na, D), CLIP's pixel values or None)."""
    import torch

    captioner.audio_encoder = encoder.to(captioner.device, captioner.dtype)
    with torch.no_grad():
        audio = captioner.audio_tokens(torch.from_numpy(np.asarray(fbank, np.float32))[None])
        pixels = image = None
        if frame is not None:
            pixels = captioner.pixel_values([frame])
            image = captioner.image_tokens(pixels)[0].float().cpu().numpy()
    return image, audio[0].float().cpu().numpy(), pixels


# --- Figure 6 --------------------------------------------------------------------------------


def plot_pca_clip(
    image: np.ndarray, audio: dict[str, np.ndarray], clip_id: str, out, frame=None
) -> None:
    """One panel per encoder: the clip's image tokens and that encoder's audio tokens on the
    leading two principal components of all of them together (shared axes); the frame first,
    where given (HxWx3, as CLIP saw it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dalipipe.evaluate.report import pca_2d

    if not audio:
        raise ValueError("plot_pca_clip: no audio tokens to draw")
    names = list(audio)
    points = pca_2d(np.concatenate([image] + [audio[n] for n in names]).astype(np.float64))
    n_image = len(image)
    pad = 0.05 * (points.max(0) - points.min(0) + 1e-12)
    low, high = points.min(0) - pad, points.max(0) + pad
    panels = len(names) + (frame is not None)
    fig, axes = plt.subplots(1, panels, figsize=(3.2 * panels, 3.4), squeeze=False)
    if frame is not None:
        axes[0][0].imshow(frame)
        axes[0][0].set_title("the frame", fontsize=9)
        axes[0][0].axis("off")
    start = n_image
    for ax, name in zip(axes[0][panels - len(names) :], names):
        tokens = points[start : start + len(audio[name])]
        start += len(audio[name])
        ax.scatter(points[:n_image, 0], points[:n_image, 1], s=7, c="tab:orange", label="image")
        ax.scatter(tokens[:, 0], tokens[:, 1], s=7, c="tab:blue", label="audio")
        ax.set_xlim(low[0], high[0])
        ax.set_ylim(low[1], high[1])
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(
        f"clip {clip_id}: {n_image} image tokens against each encoder's "
        f"{len(audio[names[0]])} audio tokens, PCA (shared axes)",
        fontsize=9,
    )
    fig.tight_layout()
    _save(fig, out)


def pca_clip(params: dict, dataset: str, shards, captioner_dir, align_dirs: list, out) -> str:
    """Figure 6 into ``out``; returns the clip drawn."""
    if not align_dirs:
        raise ValueError("figure pca-clip: no aligned encoder (--align)")
    spec = eval_settings(params)["figures"]["pca_clip"]
    ds = open_test_set(params, dataset, shards)
    if not ds.has_video:
        raise ValueError(f"figure pca-clip: the {dataset} set has no video frames")
    clip, fbank, frame = choose_clips(ds, spec, "evaluate.figures.pca_clip", need_frame=True)[0]
    captioner = load_base(params, captioner_dir)
    image = pixels = None
    audio = {}
    for name, encoder in encoders(align_dirs, eval_seed(params)):
        # the frame's tokens once, with the first encoder
        tokens, audio[name], seen = clip_tokens(
            captioner, encoder, fbank, frame if image is None else None
        )
        image, pixels = (tokens, seen) if image is None else (image, pixels)
    shown = picture(pixels, captioner.processor.image_processor)
    plot_pca_clip(image, audio, clip.clip_id, out, frame=shown)
    return clip.clip_id


# --- Figure 7 --------------------------------------------------------------------------------


def square_grid(weights: np.ndarray, where: str) -> np.ndarray:
    """Image-token weights as the patch grid (row-major, as CLIP orders its patches); a leading
    CLS token (feature strategy "full") is left out."""
    n = len(weights)
    for count, values in ((n, weights), (n - 1, weights[1:])):
        side = int(round(count**0.5))
        if side * side == count and count > 0:
            return values.reshape(side, side)
    raise ValueError(f"{where}: {n} image tokens are not a square grid of patches")


def picture(pixel_values, image_processor) -> np.ndarray:
    """The square picture CLIP saw (HxWx3 in [0, 1]), from its normalised pixel values."""
    values = pixel_values[0].float().cpu().numpy()
    mean = np.asarray(image_processor.image_mean, np.float32)[:, None, None]
    std = np.asarray(image_processor.image_std, np.float32)[:, None, None]
    return np.clip(values * std + mean, 0, 1).transpose(1, 2, 0)


def scorer_weights(scorer, audio: np.ndarray, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(audio token weights (Na,), image token weights (Nv,)), each summing to one."""
    import torch

    if scorer.dim != audio.shape[-1] or scorer.dim != image.shape[-1]:
        raise ValueError(
            f"the scorer weighs {scorer.dim}-d tokens; the clip's are {audio.shape[-1]}-d (audio) "
            f"and {image.shape[-1]}-d (image)"
        )
    with torch.no_grad():
        a, b = scorer(torch.from_numpy(audio)[None].float(), torch.from_numpy(image)[None].float())
    return a[0].numpy(), b[0].numpy()


def plot_attention(rows: list[dict], out) -> None:
    """One row per clip: image-token weights over the picture, audio-token weights over the
    filterbank; each weight drawn as a multiple of the uniform share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 2, figsize=(9, 3.0 * len(rows)), squeeze=False)
    # one colour scale for every panel, spanning the weights drawn (a nearly untrained scorer
    # is nearly uniform: its range is widened to 0.001 so the scale stays readable)
    scaled = [
        (r["image_weights"] * r["image_weights"].size, r["audio_weights"] * r["audio_weights"].size)
        for r in rows
    ]
    low = min(float(w.min()) for pair in scaled for w in pair)
    high = max(float(w.max()) for pair in scaled for w in pair)
    if high - low < 1e-3:
        low, high = (low + high) / 2 - 5e-4, (low + high) / 2 + 5e-4
    shade = dict(alpha=0.55, cmap="magma", vmin=low, vmax=high, interpolation="nearest")
    for (left, right), row, (grid, strip) in zip(axes, rows, scaled):
        side = row["picture"].shape[0]
        square = (0, side, side, 0)
        left.imshow(row["picture"], extent=square)
        shown = left.imshow(grid, extent=square, **shade)
        left.set_title(f"{row['clip_id']}: image tokens", fontsize=9)
        left.set_xticks([])
        left.set_yticks([])
        fig.colorbar(shown, ax=left, fraction=0.046, label="weight / uniform", format="%.4f")
        fbank = row["fbank"]  # (time frames, mel bins); strip: (freq patches, time patches)
        extent = (0, fbank.shape[0], 0, fbank.shape[1])
        right.imshow(fbank.T, origin="lower", aspect="auto", cmap="gray", extent=extent)
        shown = right.imshow(strip, origin="lower", aspect="auto", extent=extent, **shade)
        right.set_title(f"{row['clip_id']}: audio tokens over the filterbank", fontsize=9)
        right.set_xlabel("frame")
        right.set_ylabel("mel bin")
        fig.colorbar(shown, ax=right, fraction=0.046, label="weight / uniform", format="%.4f")
    fig.suptitle(
        f"ot_att: the attentive scorer's token weights, {low:.4f} to {high:.4f} times uniform",
        fontsize=10,
    )
    fig.tight_layout()
    _save(fig, out)


def plot_message(text: str, out) -> None:
    """A figure that says why there is nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(8, 2.2))
    fig.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=10)
    _save(fig, out)


def attention(params: dict, dataset: str, shards, captioner_dir, align_dir, out) -> list[str]:
    """Figure 7 into ``out``; returns the clips drawn (none when the scorer is missing)."""
    from dalipipe.align.attentive import load_scorer
    from dalipipe.models.cavmae import load_encoder

    align_dir = Path(align_dir)
    scorer = load_scorer(align_dir)
    if scorer is None:
        text = (
            f"{align_dir} holds no attentive scorer (attentive_scorer.safetensors): it was "
            "trained before the scorer was saved with the encoder, or by a method without one. "
            "Train ot_att again to draw Figure 7."
        )
        log.warning("figure attention: %s", text)
        plot_message(text, out)
        return []
    spec = eval_settings(params)["figures"]["attention_clips"]
    ds = open_test_set(params, dataset, shards)
    if not ds.has_video:
        raise ValueError(f"figure attention: the {dataset} set has no video frames")
    chosen = choose_clips(ds, spec, "evaluate.figures.attention_clips", need_frame=True)
    captioner = load_base(params, captioner_dir)
    encoder = load_encoder(align_dir).eval()
    n_f, n_t = encoder.config.grid
    rows = []
    for clip, fbank, frame in chosen:
        image, audio, pixels = clip_tokens(captioner, encoder, fbank, frame)
        a, b = scorer_weights(scorer, audio, image)
        rows.append(
            {
                "clip_id": clip.clip_id,
                "picture": picture(pixels, captioner.processor.image_processor),
                "image_weights": square_grid(b, f"clip {clip.clip_id}"),
                "fbank": np.asarray(fbank, np.float32),
                "audio_weights": a.reshape(n_f, n_t),  # CAV-MAE's frequency-major token order
            }
        )
    plot_attention(rows, out)
    return [r["clip_id"] for r in rows]


def _save(fig, out) -> None:
    import matplotlib.pyplot as plt

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


# the settings figure and probe read
ENCODER_INPUTS_READ = "seed, device, evaluate, extract, models"


def add_encoder_inputs(parser: argparse.ArgumentParser, datasets: str) -> None:
    """The inputs of the commands that look at aligned encoders on a test set (figure, probe)."""
    parser.add_argument("--dataset", required=True, help=datasets)
    parser.add_argument("--shards", help="test shard folder (miniature)")
    parser.add_argument("--captioner", required=True, help="the base LLaVA-class captioner")
    parser.add_argument(
        "--align", nargs="+", required=True, help="aligned encoder folders (name = method)"
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dalipipe figure", description=__doc__.split("\n\n")[0])
    figures = parser.add_subparsers(dest="figure", required=True)
    for name, text in (("pca-clip", "Figure 6"), ("attention", "Figure 7")):
        sub = figures.add_parser(name, help=text)
        add_params(sub, ENCODER_INPUTS_READ)
        add_encoder_inputs(sub, datasets="miniature | audiocaps")
        sub.add_argument("--out", required=True, help="the PNG to write")
    args, params = read_stage(parser, argv)
    try:
        if args.figure == "pca-clip":
            clip = pca_clip(params, args.dataset, args.shards, args.captioner, args.align, args.out)
            log.info("figure pca-clip: clip %s -> %s", clip, args.out)
        else:
            if len(args.align) != 1:
                parser.error("attention: --align takes the one ot_att folder")
            clips = attention(
                params, args.dataset, args.shards, args.captioner, args.align[0], args.out
            )
            log.info("figure attention: clips %s -> %s", clips, args.out)
    except (OSError, ValueError) as err:  # bad input: one clear line, no traceback
        log.error("figure %s: %s", args.figure, err)
        return 1
    return 0
