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
CLIP tokens and every encoder's audio tokens (the untrained one too), and projects them onto
the plane of the image tokens' two leading principal components, one panel per encoder on the
same axes: distribution alignment puts the audio tokens among the image tokens, where Figure 4's
mean tokens only show the gap closing. The plane is fit on the image tokens alone, so it does
not depend on which encoders are drawn, and a reader compares encoders on one set of axes.
Figure 7 runs ot_att's trained scorer (saved beside its encoder, align.attentive.save_scorer)
on chosen clips (``evaluate.figures.attention_clips``): the weight of each image token as a
heatmap over the frame CLIP saw, and of each audio token over the filterbank (time along x,
mel bins up). Each is drawn twice: the scorer's softmax weights (the paper's eqs. 6-7, where
"many tokens have scores close to zero") and, beside them, the transport weights OT used, those
mixed half and half with uniform weights (never below half the uniform share). Weights are drawn
as multiples of the uniform share 1/N. An align directory written before scorers were saved gets
a figure that says so instead. The colour scale is logarithmic, so that weights near zero and
the mixed weights' floor both show.
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
    from dalipipe.evaluate.datasets import load_dataset, stored_square

    settings = eval_settings(params)
    ds_cfg = dict((settings.get("datasets") or {}).get(dataset) or {})
    if dataset == "miniature":
        if not shards:
            raise ValueError("dataset miniature: --shards (the test shards) is required")
        ds_cfg.setdefault("shards", str(shards))
    fbank_cfg = (params.get("extract") or {}).get("fbank") or {}
    square = stored_square(params.get("extract"))
    return load_dataset(dataset, ds_cfg, fbank_cfg, settings["frame"], square)


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


def image_plane(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), axes (2, D)): the image tokens' two leading principal components, each axis
    signed so that its largest loading is positive (an SVD may return either sign)."""
    mean = image.mean(0)
    _, _, vt = np.linalg.svd(image - mean, full_matrices=False)
    axes = vt[:2]
    signs = np.sign(axes[np.arange(len(axes)), np.abs(axes).argmax(1)])
    return mean, axes * signs[:, None]


def pca_clip_points(image: np.ndarray, audio: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every token set on the image tokens' principal plane: {"image": (Nv, 2), name: (Na, 2)}."""
    image = np.asarray(image, np.float64)
    mean, axes = image_plane(image)
    points = {"image": (image - mean) @ axes.T}
    for name, tokens in audio.items():
        points[name] = (np.asarray(tokens, np.float64) - mean) @ axes.T
    return points


def plot_pca_clip(
    image: np.ndarray, audio: dict[str, np.ndarray], clip_id: str, out, frame=None
) -> dict[str, np.ndarray]:
    """One panel per encoder: the clip's image tokens and that encoder's audio tokens on the
    image tokens' principal plane, every panel with the same axes and limits; the frame first,
    where given (HxWx3, as CLIP saw it). Returns the points drawn (pca_clip_points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not audio:
        raise ValueError("plot_pca_clip: no audio tokens to draw")
    names = list(audio)
    points = pca_clip_points(image, audio)
    everything = np.concatenate(list(points.values()))
    pad = 0.05 * (everything.max(0) - everything.min(0) + 1e-12)
    low, high = everything.min(0) - pad, everything.max(0) + pad
    panels = len(names) + (frame is not None)
    fig, axes = plt.subplots(1, panels, figsize=(3.2 * panels, 3.4), squeeze=False)
    if frame is not None:
        axes[0][0].imshow(frame)
        axes[0][0].set_title("the frame", fontsize=9)
        axes[0][0].axis("off")
    shown = points["image"]
    for ax, name in zip(axes[0][panels - len(names) :], names):
        ax.scatter(shown[:, 0], shown[:, 1], s=7, c="tab:orange", label="image")
        ax.scatter(points[name][:, 0], points[name][:, 1], s=7, c="tab:blue", label="audio")
        ax.set_xlim(low[0], high[0])
        ax.set_ylim(low[1], high[1])
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("image PC 1", fontsize=8)
        ax.set_ylabel("image PC 2", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(
        f"clip {clip_id}: {len(shown)} image tokens against each encoder's "
        f"{len(audio[names[0]])} audio tokens, on the image tokens' two principal components",
        fontsize=9,
    )
    fig.tight_layout()
    _save(fig, out)
    return points


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


def scorer_weights(scorer, audio: np.ndarray, image: np.ndarray) -> dict[str, np.ndarray]:
    """The scorer's weights of one clip's tokens, each summing to one: ``audio_scores`` (Na,) and
    ``image_scores`` (Nv,), its softmax weights, and ``audio_weights``, ``image_weights``, the
    same mixed with uniform weights, as OT received them."""
    import torch

    if scorer.dim != audio.shape[-1] or scorer.dim != image.shape[-1]:
        raise ValueError(
            f"the scorer weighs {scorer.dim}-d tokens; the clip's are {audio.shape[-1]}-d (audio) "
            f"and {image.shape[-1]}-d (image)"
        )
    with torch.no_grad():
        a, b = scorer.scores(
            torch.from_numpy(audio)[None].float(), torch.from_numpy(image)[None].float()
        )
        mixed_a, mixed_b = scorer.mix(a), scorer.mix(b)
    return {
        "audio_scores": a[0].numpy(),
        "image_scores": b[0].numpy(),
        "audio_weights": mixed_a[0].numpy(),
        "image_weights": mixed_b[0].numpy(),
    }


# Figure 7's colour scale starts here (multiples of the uniform share)
SCALE_FLOOR = 1e-3
# Figure 7's panels, left to right: (key of the row, what it shows, drawn over)
ATTENTION_PANELS = (
    ("image_scores", "image tokens, softmax", "picture"),
    ("image_weights", "image tokens, mixed with uniform", "picture"),
    ("audio_scores", "audio tokens, softmax", "fbank"),
    ("audio_weights", "audio tokens, mixed with uniform", "fbank"),
)


def plot_attention(rows: list[dict], out) -> list[dict[str, np.ndarray]]:
    """One row per clip: the image tokens' softmax and mixed weights over the picture, then the
    audio tokens' over the filterbank; each weight drawn as a multiple of the uniform share, on
    one logarithmic colour scale for every panel. Returns, per clip, the arrays drawn, in
    multiples of uniform: image (side, side), audio (frequency patches, time patches)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    drawn = [{key: row[key] * row[key].size for key, _, _ in ATTENTION_PANELS} for row in rows]
    # A log scale: softmax weights near zero and the mixed weights' floor of 0.5 both show; a
    # weight under SCALE_FLOOR times uniform takes the floor's colour.
    low = max(min(float(w.min()) for d in drawn for w in d.values()), SCALE_FLOOR)
    high = max(float(w.max()) for d in drawn for w in d.values())
    if high / low < 1.01:  # a nearly untrained scorer: widen the range so the scale stays readable
        low, high = (low * high) ** 0.5 / 1.005, (low * high) ** 0.5 * 1.005
    shade = dict(alpha=0.55, cmap="magma", norm=LogNorm(low, high), interpolation="nearest")
    panels = len(ATTENTION_PANELS)
    fig, axes = plt.subplots(
        len(rows), panels, figsize=(4.2 * panels, 3.0 * len(rows)), squeeze=False
    )
    for ax_row, row, arrays in zip(axes, rows, drawn):
        for ax, (key, what, under) in zip(ax_row, ATTENTION_PANELS):
            if under == "picture":
                side = row["picture"].shape[0]
                square = (0, side, side, 0)
                ax.imshow(row["picture"], extent=square)
                shown = ax.imshow(np.maximum(arrays[key], low), extent=square, **shade)
                ax.set_xticks([])
                ax.set_yticks([])
            else:
                fbank = row["fbank"]  # (time frames, mel bins); weights: (freq, time patches)
                extent = (0, fbank.shape[0], 0, fbank.shape[1])
                ax.imshow(fbank.T, origin="lower", aspect="auto", cmap="gray", extent=extent)
                weights = np.maximum(arrays[key], low)
                shown = ax.imshow(weights, origin="lower", aspect="auto", extent=extent, **shade)
                ax.set_xlabel("frame")
                ax.set_ylabel("mel bin")
            ax.set_title(f"{row['clip_id']}: {what}", fontsize=9)
            fig.colorbar(shown, ax=ax, fraction=0.046, label="weight / uniform (log)")
    fig.suptitle(
        f"ot_att: the attentive scorer's token weights, {low:.3g} to {high:.3g} times uniform; "
        "softmax weights, and beside them the transport weights (mixed half with uniform)",
        fontsize=10,
    )
    fig.tight_layout()
    _save(fig, out)
    return drawn


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
    rows = attention_rows(params, dataset, shards, captioner_dir, align_dir, scorer)
    plot_attention(rows, out)
    return [r["clip_id"] for r in rows]


def attention_rows(params: dict, dataset: str, shards, captioner_dir, align_dir, scorer):
    """Figure 7's data, one dict per chosen clip: ``clip_id``, ``picture`` (what CLIP saw),
    ``fbank``, and the weights of scorer_weights as grids (image: the patch grid; audio:
    (frequency patches, time patches), CAV-MAE's frequency-major token order)."""
    from dalipipe.models.cavmae import load_encoder

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
        weights = scorer_weights(scorer, audio, image)
        where = f"clip {clip.clip_id}"
        rows.append(
            {
                "clip_id": clip.clip_id,
                "picture": picture(pixels, captioner.processor.image_processor),
                "fbank": np.asarray(fbank, np.float32),
                **{k: square_grid(v, where) for k, v in weights.items() if k.startswith("image")},
                **{k: v.reshape(n_f, n_t) for k, v in weights.items() if k.startswith("audio")},
            }
        )
    return rows


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
