"""Figures and pages for the Snakemake report (``snakemake --report report.html``).

    dalipipe report --evaluate results/miniature/evaluate/miniature ... \
        --curves results/miniature/align/mmd/curve.csv results/miniature/prefix/curve.csv \
        --histogram results/miniature/filter/histogram.png \
        --acquire results/miniature/acquire/manifest.csv --out results/miniature/report

Writes into ``--out``:
- ``results.html``: every evaluated set's table (the paper's Table 1 layout) and CSV rows;
- ``examples.html``: a few test clips, each with its frame, a playable audio clip, the
  references and every system's caption (frames and audio embedded, so the page is standalone);
- ``curves.png``: training curves (loss against step or epoch) of each stage given;
- ``modality_gap.png``: PCA of the mean audio token and mean image token per clip, one panel
  per encoder (paper Fig. 4), fitted on all tokens together so the panels share axes;
- ``filter_histogram.png``: a copy of the filter stage's histogram, when given.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import logging
import shutil
from pathlib import Path

import numpy as np

from dalipipe.common import atomic_path, read_stage, stage_parser

log = logging.getLogger(__name__)

STYLE = """
body { font-family: sans-serif; margin: 1em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.5em; text-align: right; }
th:first-child, td:first-child, td.text { text-align: left; }
.clip { display: flex; gap: 1em; border-top: 1px solid #ccc; padding: 0.8em 0; }
.clip img { width: 160px; image-rendering: pixelated; }
"""


def _page(title: str, body: str) -> str:
    return (
        f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n"
    )


def markdown_table_to_html(md: str) -> str:
    """The pipe tables ``tables.markdown`` writes, as HTML (notes become paragraphs)."""
    out, rows = [], []

    def flush():
        if rows:
            head, *body = rows
            out.append(
                "<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>"
            )
            for row in body:
                cells = "".join(
                    f"<td class='text'>{html.escape(c)}</td>"
                    if i < 2
                    else f"<td>{html.escape(c)}</td>"
                    for i, c in enumerate(row)
                )
                out.append(f"<tr>{cells}</tr>")
            out.append("</table>")
            rows.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            if set(line) <= set("|-: "):
                continue
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
        else:
            flush()
            if line.strip():
                out.append(f"<p>{html.escape(line.replace('**', ''))}</p>")
    flush()
    return "\n".join(out)


def decoding_note(summary: dict) -> str:
    """The decoding the systems used (summary ``decoding``: system -> label; older runs: greedy)."""
    labels = sorted(set((summary.get("decoding") or {}).values())) or ["greedy, fixed seed"]
    return "; ".join(labels)


def results_page(evaluate_dirs: list[Path]) -> str:
    parts = []
    for directory in evaluate_dirs:
        md = (directory / "table.md").read_text(encoding="utf-8")
        summary = json.loads((directory / "summary.json").read_text())
        parts.append(f"<h2>{html.escape(summary['dataset'])}</h2>")
        parts.append(
            f"<p>{summary['n_clips']} clips scored, {summary['n_failed']} unreadable "
            f"(listed in failed.csv); decoding: {html.escape(decoding_note(summary))}.</p>"
        )
        parts.append(markdown_table_to_html(md))
    return _page("Captioning results", "\n".join(parts))


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _wav_bytes(wave: np.ndarray, sample_rate: int) -> bytes:
    import wave as wavmod

    pcm = (np.clip(wave, -1, 1) * 32767).astype("<i2").tobytes()
    buf = io.BytesIO()
    with wavmod.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm)
    return buf.getvalue()


def clip_media(acquire_manifest: Path | None) -> dict[str, Path]:
    """Clip id -> the acquired media file, from the acquire stage's manifest."""
    if acquire_manifest is None or not Path(acquire_manifest).is_file():
        return {}
    with open(acquire_manifest, newline="", encoding="utf-8") as f:
        return {
            row["clip_id"]: Path(row["path"])
            for row in csv.DictReader(f)
            if row.get("status") == "ok" and row.get("path")
        }


def _example_media(clip, media: dict[str, Path], max_seconds: float = 10.0):
    """(frame JPEG data URI or None, WAV data URI or None) for one clip."""
    from dalipipe.data.ffmpeg import decode_audio

    frame_uri = audio_uri = None
    try:
        fbank, frame = clip.load()
        if frame is not None:
            buf = io.BytesIO()
            frame.save(buf, format="JPEG")
            frame_uri = _data_uri(buf.getvalue(), "image/jpeg")
    except Exception as err:  # a broken clip loses its picture, not the page
        log.warning("example %s: %s", clip.clip_id, err)
    path = media.get(clip.clip_id)
    if path is not None and path.is_file():
        try:
            wave = decode_audio(path, 16000, duration_s=max_seconds)
            audio_uri = _data_uri(_wav_bytes(wave, 16000), "audio/wav")
        except Exception as err:
            log.warning("example %s: no audio (%s)", clip.clip_id, err)
    return frame_uri, audio_uri


def example_clips(evaluate_dir: Path, ids: list[str], params: dict, shards: Path | None) -> dict:
    """The evaluated clips ``ids`` with their loaders: from the test shards for the miniature,
    else from the dataset as configured (``evaluate.datasets.<name>``)."""
    from dalipipe.evaluate.datasets import load_dataset, miniature_set

    dataset = json.loads((evaluate_dir / "summary.json").read_text())["dataset"]
    settings = params.get("evaluate") or {}
    try:
        if dataset == "miniature":
            clips = miniature_set(shards).clips if shards and Path(shards).is_dir() else []
        else:
            cfg = (settings.get("datasets") or {}).get(dataset)
            fbank_cfg = (params.get("extract") or {}).get("fbank") or {}
            clips = load_dataset(dataset, cfg, fbank_cfg).clips if cfg else []
    except (OSError, ValueError) as err:  # examples are a courtesy; the tables stand alone
        log.warning("examples of %s: cannot open the clips (%s)", dataset, err)
        clips = []
    return {c.clip_id: c for c in clips if c.clip_id in ids}


def examples_page(
    evaluate_dir: Path,
    n_examples: int,
    media: dict[str, Path],
    shards: Path | None,
    params: dict | None = None,
) -> str:
    """Frame, audio, references and every system's caption for the first ``n_examples`` clips."""
    references = json.loads((evaluate_dir / "references.json").read_text())
    systems = json.loads((evaluate_dir / "summary.json").read_text())["systems"]
    captions = {
        s: json.loads((evaluate_dir / f"{s}.json").read_text())["captions"] for s in systems
    }
    ids = sorted(references)[:n_examples]
    loaded = example_clips(evaluate_dir, ids, params or {}, shards)
    blocks = []
    for clip_id in ids:
        clip = loaded.get(clip_id)
        sounds = {clip_id: clip.media} if clip is not None and clip.media else media
        frame_uri, audio_uri = _example_media(clip, sounds) if clip else (None, None)
        if audio_uri is None and clip_id in media:
            audio_uri = _example_media_audio_only(media[clip_id])
        left = (
            f"<img alt='frame of {html.escape(clip_id)}' src='{frame_uri}'>"
            if frame_uri
            else "<p>(no frame)</p>"
        )
        left += (
            f"<br><audio controls src='{audio_uri}'></audio>" if audio_uri else "<p>(no audio)</p>"
        )
        rows = "".join(
            f"<tr><td class='text'>{html.escape(s)}</td><td class='text'>{html.escape(captions[s].get(clip_id, ''))}</td></tr>"
            for s in systems
        )
        refs = "".join(f"<li>{html.escape(r)}</li>" for r in references[clip_id])
        blocks.append(
            f"<div class='clip'><div>{left}</div><div><h3>{html.escape(clip_id)}</h3>"
            f"<table><tr><th>system</th><th>caption</th></tr>{rows}</table>"
            f"<p>references:</p><ul>{refs}</ul></div></div>"
        )
    return _page(f"Example captions ({evaluate_dir.name})", "\n".join(blocks))


def _example_media_audio_only(path: Path) -> str | None:
    from dalipipe.data.ffmpeg import decode_audio

    try:
        return _data_uri(_wav_bytes(decode_audio(path, 16000, duration_s=10.0), 16000), "audio/wav")
    except Exception as err:
        log.warning("%s: no audio (%s)", path, err)
        return None


def _read_curve(path: Path) -> tuple[str, np.ndarray, dict[str, np.ndarray]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path}: empty curve")
    cols = list(rows[0])
    x_name = next((c for c in ("step", "epoch") if c in cols), None)

    def column(name):
        return np.array([float(r[name]) if r[name] not in ("", None) else np.nan for r in rows])

    x = column(x_name) if x_name else np.arange(len(rows), dtype=float)
    ys = {c: column(c) for c in cols if "loss" in c.lower()}
    if not ys:
        raise ValueError(f"{path}: no loss column in {cols}")
    return x_name or "row", x, ys


def plot_curves(curves: list[Path], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, max(1, len(curves)), figsize=(4 * max(1, len(curves)), 3.2), squeeze=False
    )
    for ax, path in zip(axes[0], curves):
        x_name, x, ys = _read_curve(path)
        for name, y in ys.items():
            ax.plot(x, y, label=name)
        ax.set_title(
            f"{path.parent.parent.name}/{path.parent.name}"
            if path.parent.parent.name == "align"
            else path.parent.name
        )
        ax.set_xlabel(x_name)
        ax.legend(fontsize=7)
    if not curves:
        axes[0][0].text(0.5, 0.5, "no training curves", ha="center")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def pca_2d(x: np.ndarray) -> np.ndarray:
    """Projection onto the two leading principal components (SVD of the centred data)."""
    centred = x - x.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T


def plot_modality_gap(gap_file: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gap = np.load(gap_file)
    audio_keys = sorted(k for k in gap.files if k.startswith("audio/"))
    if "image" not in gap.files or not audio_keys:
        raise ValueError(f"{gap_file}: needs 'image' and at least one 'audio/<method>' array")
    image = gap["image"]
    points = pca_2d(np.concatenate([image] + [gap[k] for k in audio_keys]))
    n = len(image)
    fig, axes = plt.subplots(
        1, len(audio_keys), figsize=(3.4 * len(audio_keys), 3.4), squeeze=False
    )
    for i, (ax, key) in enumerate(zip(axes[0], audio_keys)):
        audio = points[n * (i + 1) : n * (i + 2)]
        ax.scatter(points[:n, 0], points[:n, 1], s=6, c="tab:orange", label="image")
        ax.scatter(audio[:, 0], audio[:, 1], s=6, c="tab:blue", label="audio")
        ax.set_title(key.split("/", 1)[1])
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Mean token per clip, PCA (shared axes)", fontsize=9)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def gather_tables(evaluate_dirs: list[Path], out_csv: Path, out_md: Path) -> None:
    """The run's tables: every set's rows with a leading ``dataset`` column, and the Markdown."""
    from dalipipe.paper import published

    rows, cols, md = [], ["dataset"], []
    for directory in evaluate_dirs:
        dataset = json.loads((directory / "summary.json").read_text())["dataset"]
        with open(directory / "table.csv", newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            cols += [c for c in reader.fieldnames if c not in cols]
            measured = [{"dataset": dataset, **row} for row in reader]
        md.append((directory / "table.md").read_text(encoding="utf-8"))
        if published.has_published(dataset):  # AudioCaps, Clotho: the paper's values beside
            measured = published.with_published(measured, dataset)
            cols += [f"paper_{m}" for m in published.METRICS if f"paper_{m}" not in cols]
            md.append(published.markdown(measured, dataset))
        rows += measured
    with atomic_path(out_csv) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=cols, restval="")
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    with atomic_path(out_md) as tmp:
        tmp.write_text("\n".join(md), encoding="utf-8")


def build_report(
    evaluate_dirs: list[Path],
    out: Path,
    *,
    curves: list[Path] = (),
    histogram: Path | None = None,
    acquire_manifest: Path | None = None,
    shards: Path | None = None,
    n_examples: int = 6,
    params: dict | None = None,
) -> list[Path]:
    if not evaluate_dirs:
        raise ValueError("report: no --evaluate folder given")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with atomic_path(out / "results.html") as tmp:
        tmp.write_text(results_page(evaluate_dirs), encoding="utf-8")
    written.append(out / "results.html")
    media = clip_media(acquire_manifest)
    with atomic_path(out / "examples.html") as tmp:
        tmp.write_text(
            examples_page(evaluate_dirs[0], n_examples, media, shards, params), encoding="utf-8"
        )
    written.append(out / "examples.html")
    present = [Path(c) for c in curves if Path(c).is_file()]
    for missing in set(map(Path, curves)) - set(present):
        log.warning("curve %s not found; left out", missing)
    plot_curves(present, out / "curves.png")
    written.append(out / "curves.png")
    gap_file = next((d / "gap.npz" for d in evaluate_dirs if (d / "gap.npz").is_file()), None)
    if gap_file is not None:
        plot_modality_gap(gap_file, out / "modality_gap.png")
        written.append(out / "modality_gap.png")
    if histogram is not None:
        shutil.copyfile(histogram, out / "filter_histogram.png")
        written.append(out / "filter_histogram.png")
    return written


def main(argv: list[str]) -> int:
    parser = stage_parser("report", __doc__, "sections evaluate and extract (the examples)")
    parser.add_argument(
        "--evaluate", nargs="+", required=True, help="evaluate stage output folders"
    )
    parser.add_argument(
        "--curves", nargs="*", default=[], help="curve.csv files of training stages"
    )
    parser.add_argument("--histogram", help="the filter stage's histogram.png")
    parser.add_argument("--acquire", help="acquire manifest.csv (audio for the examples)")
    parser.add_argument("--shards", help="test shards (frames for the examples)")
    parser.add_argument("--examples", type=int, default=6, help="how many example clips")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--table-csv", help="also write the run's table.csv (all sets) here")
    parser.add_argument("--table-md", help="and its Markdown here")
    args, params = read_stage(parser, argv)
    evaluate_dirs = [Path(d) for d in args.evaluate]
    if args.table_csv or args.table_md:
        if not (args.table_csv and args.table_md):
            parser.error("--table-csv and --table-md go together")
        gather_tables(evaluate_dirs, Path(args.table_csv), Path(args.table_md))
    written = build_report(
        evaluate_dirs,
        Path(args.out),
        curves=[Path(c) for c in args.curves],
        histogram=Path(args.histogram) if args.histogram else None,
        acquire_manifest=Path(args.acquire) if args.acquire else None,
        shards=Path(args.shards) if args.shards else None,
        n_examples=args.examples,
        params=params,
    )
    for path in written:
        log.info("wrote %s", path)
    return 0
