"""Acquire, synthetic source: write one part of the synthetic world as real MP4 clips.

    dalipipe acquire-synthetic --params '{"seed": 0, "world": {...}, "acquire": {"parts": 2}}' \\
        --part 0 --out results/miniature/acquire/part-0

Clip i of a split is drawn from its own generator seeded by (seed, split, i), so a clip is the
same whatever the number of parts; part p holds the clips whose global index is p mod parts.
Each clip has 1..max_objects objects of distinct classes, all seen and heard, except that a
share `offscreen_fraction` of clips has one object heard but not seen and a share
`silent_fraction` one object seen but silent (those clips have at least two objects, so
something is always seen and something always heard). Frames: large objects on a near-uniform
light-grey background, drifting slowly; audio: the heard objects' sounds at random gains plus
pink background noise. Raw RGB frames and PCM audio of 8 clips at a time go to one ffmpeg
process, which writes each clip as its own H.264 MP4 with 16-bit PCM audio (`audio_codec`;
`aac` at 64 kbit/s costs 15.6 ms of CPU per clip against PCM's 2.0 ms, measured on a 2-core
Intel Xeon: four fifths of the whole encoding, ~100 s of a miniature run). `lossless_video` (the default)
picks lossless H.264 (`-qp 0`) over x264's `-crf 18`: x264's lossy choices are not always the
same from run to run (measured: 2 of 7,116 clips got another first GOP in one of two runs,
pixels off by up to 23/255), enough to make two miniature runs of one seed differ; lossless,
the decoded frames are the rendered ones (after 4:2:0 chroma subsampling) whatever the encoder
decides.

Output: OUT/clips/<clip_id>.mp4, OUT/manifest.csv and OUT/metadata.jsonl (DEVELOPING.md).
Manifest paths start with OUT as given, so they are relative to the working directory when
OUT is.
"""

from __future__ import annotations

import logging
import math
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dalipipe.common import atomic_path, read_stage, stage_parser, write_jsonl
from dalipipe.config import section_defaults
from dalipipe.data.ffmpeg import ffmpeg_exe, file_url
from dalipipe.data.manifest import ACQUIRE_FIELDS, write_manifest
from dalipipe.faults import MachineFault, machine_fault, stop_on_machine_fault
from dalipipe.world import classes as world

log = logging.getLogger(__name__)

SPLITS = ("align", "pseudolabel", "prefix", "test")
BATCH_SIZE = 8  # clips per ffmpeg process
# ffmpeg's audio encoder options per world.audio_codec
AUDIO_CODECS = {"pcm_s16le": ["-c:a", "pcm_s16le"], "aac": ["-c:a", "aac", "-b:a", "64k"]}


def world_config(params: dict | None) -> dict:
    cfg = {**section_defaults("world"), **(params or {})}
    unknown = set(cfg["splits"]) - set(SPLITS)
    if unknown:
        raise ValueError(f"world.splits: unknown split(s) {sorted(unknown)}; use {SPLITS}")
    if cfg["offscreen_fraction"] + cfg["silent_fraction"] > 1:
        raise ValueError("world.offscreen_fraction + world.silent_fraction must not exceed 1")
    return cfg


def all_clips(splits: dict) -> list[tuple[str, str, int]]:
    """(clip_id, split, index within split) for every clip, in a fixed global order."""
    return [
        (f"{split}-{i:06d}", split, i) for split in SPLITS for i in range(int(splits.get(split, 0)))
    ]


def clip_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split), index])


def compose(rng: np.random.Generator, cfg: dict) -> dict:
    """Which objects a clip has, where they are, and which are seen and heard."""
    classes = world.world_classes(cfg["n_classes"])
    max_objects = min(cfg["max_objects"], len(classes))
    draw = rng.random()
    case = "matched"
    if max_objects >= 2 and draw < cfg["offscreen_fraction"]:
        case = "offscreen"
    elif max_objects >= 2 and draw < cfg["offscreen_fraction"] + cfg["silent_fraction"]:
        case = "silent"
    low = 1 if case == "matched" else 2
    count = int(rng.integers(low, max_objects + 1))
    chosen = sorted(rng.choice(len(classes), size=count, replace=False).tolist())
    odd_one = int(rng.integers(count)) if case != "matched" else -1

    size = cfg["frame_size"]
    objects = []
    for k, index in enumerate(chosen):
        objects.append(
            {
                "name": classes[index].name,
                "seen": not (case == "offscreen" and k == odd_one),
                "heard": not (case == "silent" and k == odd_one),
                "r": float(size * rng.uniform(0.19, 0.25)),
                "v": (rng.uniform(-1.5, 1.5, size=2) * size / 64).tolist(),  # pixels per second
                "gain": float(rng.uniform(0.5, 1.0)),
                "pitch": float(rng.uniform(0.95, 1.05)),
            }
        )
    _place([o for o in objects if o["seen"]], size, rng)
    return {"case": case, "objects": objects}


def _place(objects: list[dict], size: int, rng: np.random.Generator) -> None:
    """Random centres, objects not overlapping; shrink them if no room is found."""
    for _ in range(20):
        placed = []
        for obj in objects:
            r = obj["r"]
            for _ in range(100):
                c = rng.uniform(r, size - r, size=2)
                if all(np.hypot(*(c - p)) >= r + q + 1 for p, q in placed):
                    placed.append((c, r))
                    break
            else:
                break
        if len(placed) == len(objects):
            for obj, (c, _) in zip(objects, placed):
                obj["c"] = c.tolist()
            return
        for obj in objects:
            obj["r"] *= 0.9
    raise RuntimeError("could not place the objects without overlap")


def render_frames(spec: dict, cfg: dict, rng: np.random.Generator) -> np.ndarray:
    """(n_frames, S, S, 3) uint8: a static near-uniform background, objects drifting."""
    size, fps = cfg["frame_size"], cfg["fps"]
    n_frames = max(1, math.ceil(cfg["clip_seconds"] * fps))
    shade = np.array(world.BACKGROUND_RGB) + rng.integers(-12, 13)
    background = shade + rng.integers(-4, 5, size=(size, size, 3))
    background = np.clip(background, 0, 255).astype(np.uint8)
    frames = np.empty((n_frames, size, size, 3), np.uint8)
    for k in range(n_frames):
        frame = frames[k]
        frame[:] = background
        for obj in spec["objects"]:
            if not obj["seen"]:
                continue
            r = obj["r"]
            cx, cy = (np.array(obj["c"]) + np.array(obj["v"]) * k / fps).clip(r, size - r)
            world.draw(frame, world.BY_NAME[obj["name"]], cx, cy, r)
    return frames


def pink_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-variance noise with a 1/f power spectrum."""
    spec = np.fft.rfft(rng.standard_normal(n))
    freqs = np.arange(len(spec))
    spec[1:] /= np.sqrt(freqs[1:])
    spec[0] = 0
    noise = np.fft.irfft(spec, n)
    return noise / (noise.std() or 1.0)


def render_audio(spec: dict, cfg: dict, rng: np.random.Generator) -> np.ndarray:
    """float32 mono: heard objects mixed to a peak of 0.8, plus background noise."""
    sr, seconds = cfg["sample_rate"], cfg["clip_seconds"]
    n = int(round(seconds * sr))
    mix = np.zeros(n)
    for obj in spec["objects"]:
        if obj["heard"]:
            sound = world.synthesize(world.BY_NAME[obj["name"]], seconds, sr, rng, obj["pitch"])
            mix += obj["gain"] * sound
    peak = np.abs(mix).max()
    if peak > 0:
        mix *= 0.8 / peak
    mix += cfg["noise_level"] * pink_noise(n, rng)
    return np.clip(mix, -1, 1).astype(np.float32)


@dataclass
class Rendered:
    """One clip drawn and synthesised, waiting to be encoded."""

    clip_id: str
    path: Path  # the MP4 to write
    frames: np.ndarray  # (n, h, w, 3) uint8
    audio: np.ndarray  # float32 mono
    meta: dict


def encode_mp4s(
    clips: list[Rendered],
    fps: int,
    sr: int,
    scratch: Path,
    lossless: bool = False,
    audio_codec: str = "pcm_s16le",
) -> None:
    """H.264 MP4s (audio: AAC or 16-bit PCM) from raw RGB frames and 16-bit PCM, all with one ffmpeg process
    (its start-up costs as much as encoding a miniature clip). Each output has its own
    encoders, so a clip's bytes do not depend on which clips share its process."""
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", "-y"]
    outputs = []
    quality = ["-qp", "0"] if lossless else ["-crf", "18"]
    if audio_codec not in AUDIO_CODECS:
        raise ValueError(
            f"world.audio_codec: {audio_codec!r}, expected one of {list(AUDIO_CODECS)}"
        )
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        for k, clip in enumerate(clips):
            n, h, w, _ = clip.frames.shape
            video, audio = scratch / f"{clip.clip_id}.rgb", scratch / f"{clip.clip_id}.s16"
            video.write_bytes(clip.frames.tobytes())
            audio.write_bytes((clip.audio * 32767).round().astype("<i2").tobytes())
            cmd += ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", str(fps)]
            cmd += ["-i", file_url(video)]
            cmd += ["-f", "s16le", "-ar", str(sr), "-ac", "1", "-i", file_url(audio)]
            outputs += [
                "-map", f"{2 * k}:v", "-map", f"{2 * k + 1}:a",
                "-c:v", "libx264", "-preset", "veryfast", *quality, "-pix_fmt", "yuv420p",
                "-threads", "1", "-g", str(fps),
                *AUDIO_CODECS[audio_codec],
                "-movflags", "+faststart", file_url(clip.path),
            ]  # fmt: skip
        result = subprocess.run(cmd + outputs, capture_output=True, timeout=60 + 30 * len(clips))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if result.returncode != 0:
        names = ", ".join(c.clip_id for c in clips)
        raise RuntimeError(
            f"ffmpeg encoding of {names} failed: {result.stderr.decode(errors='replace')}"
        )


def clip_metadata(clip_id: str, split: str, spec: dict, rng: np.random.Generator) -> dict:
    heard = [o["name"] for o in spec["objects"] if o["heard"]]
    seen = [o["name"] for o in spec["objects"] if o["seen"]]
    meta = {
        "clip_id": clip_id,
        "split": split,
        "labels": heard,
        "start_s": 0.0,
        "heard": heard,
        "seen": seen,
        "case": spec["case"],
        "audio_caption": world.audio_caption(heard),
        "visual_caption": world.visual_caption(seen),
    }
    if split == "test":
        meta["references"] = world.reference_captions(heard, rng)
    return meta


def render_clip(clip: tuple[str, str, int], cfg: dict, seed: int, clips_dir: Path) -> Rendered:
    """Compose, draw and synthesise one clip."""
    clip_id, split, index = clip
    rng = clip_rng(seed, split, index)
    spec = compose(rng, cfg)
    frames = render_frames(spec, cfg, rng)
    audio = render_audio(spec, cfg, rng)
    meta = clip_metadata(clip_id, split, spec, rng)
    return Rendered(clip_id, clips_dir / f"{clip_id}.mp4", frames, audio, meta)


def make_clips(clips: list, cfg: dict, seed: int, clips_dir: Path) -> list[tuple[dict | None, str]]:
    """Render and encode a batch of clips; (metadata, "") or (None, reason) for each. When the
    shared ffmpeg process fails, the clips are encoded one by one so that only the broken
    one fails."""
    results: list = [None] * len(clips)
    rendered = []
    for i, clip in enumerate(clips):
        try:
            rendered.append((i, render_clip(clip, cfg, seed, clips_dir)))
        except Exception as exc:  # one broken clip is recorded; a full disk stops the part
            stop_on_machine_fault(exc, clips_dir)
            results[i] = (None, f"{type(exc).__name__}: {exc}")

    def encode(group: list[tuple[int, Rendered]]) -> None:
        scratch = clips_dir / f".raw-{group[0][1].clip_id}"
        encode_mp4s(
            [r for _, r in group],
            cfg["fps"],
            cfg["sample_rate"],
            scratch,
            cfg["lossless_video"],
            cfg["audio_codec"],
        )
        for i, r in group:
            results[i] = (r.meta, "")

    try:
        if rendered:
            encode(rendered)
    except Exception:
        for one in rendered:
            try:
                encode([one])
            except Exception as exc:
                stop_on_machine_fault(exc, clips_dir)
                results[one[0]] = (None, f"{type(exc).__name__}: {exc}")
    return results


def generate_part(
    cfg: dict, seed: int, part: int, parts: int, out: Path, workers: int = 1
) -> list[dict]:
    """Write part `part` of `parts` to `out`; returns the manifest rows."""
    if not 0 <= part < parts:
        raise ValueError(f"--part must be in [0, {parts}), got {part}")
    clips = all_clips(cfg["splits"])[part::parts]
    batches = [clips[i : i + BATCH_SIZE] for i in range(0, len(clips), BATCH_SIZE)]
    log.info("part %d/%d: %d clips of %.2f s", part, parts, len(clips), cfg["clip_seconds"])
    with atomic_path(out, directory=True) as tmp:
        clips_dir = tmp / "clips"
        clips_dir.mkdir()
        rows, metas = [], []
        with (
            ThreadPoolExecutor(max(1, workers)) as pool,
            tqdm(total=len(clips), desc=f"synthetic part {part}", unit="clip") as progress,
        ):
            done = pool.map(lambda batch: make_clips(batch, cfg, seed, clips_dir), batches)
            for batch, results in zip(batches, done):
                for (clip_id, split, _), (meta, reason) in zip(batch, results):
                    if reason:
                        log.warning("clip %s failed: %s", clip_id, reason)
                    rows.append(
                        {
                            "clip_id": clip_id,
                            "path": str(out / "clips" / f"{clip_id}.mp4"),
                            "status": "ok" if meta else "failed",
                            "reason": reason,
                            "split": split,
                            "start_s": 0.0,
                            "labels": ";".join(meta["labels"]) if meta else "",
                        }
                    )
                    if meta:
                        metas.append(meta)
                progress.update(len(batch))
        write_manifest(tmp / "manifest.csv", rows, ACQUIRE_FIELDS)
        write_jsonl(tmp / "metadata.jsonl", metas)
    failed = sum(r["status"] != "ok" for r in rows)
    log.info("part %d: %d clips written, %d failed", part, len(rows) - failed, failed)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("acquire-synthetic", __doc__, "seed, sections world and acquire")
    parser.add_argument("--part", type=int, default=0)
    parser.add_argument("--parts", type=int, help="default: acquire.parts")
    parser.add_argument("--out", required=True, help="the part directory to write")
    parser.add_argument("--workers", type=int, default=1, help="clips encoded at once")
    args, params = read_stage(parser, argv)
    cfg = world_config(params["world"])
    parts = args.parts or params["acquire"]["parts"]
    try:
        generate_part(cfg, int(params["seed"]), args.part, parts, Path(args.out), args.workers)
    except (MachineFault, OSError) as err:
        fault = machine_fault(err, Path(args.out).parent)
        if fault is None:
            raise
        log.error("acquire stopped, %s was not written: %s", args.out, fault)
        return 1
    return 0
