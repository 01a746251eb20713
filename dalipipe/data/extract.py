"""Extract: frames, 16 kHz mono WAV and the model's filterbank input for every clip.

    dalipipe extract results/<run>/acquire/part-0/manifest.csv --out results/<run>/extract/part-0 \\
        --params '{"extract": {"window_seconds": 10, "frame_short_side": 64, "fbank": {...}}}'
    dalipipe extract my_videos/ --out /tmp/extracted      # a folder or CSV works too

ffmpeg reads each clip's window [start_s, start_s + window_seconds) once and writes both the
frames (the first frame of each second, short side `frame_short_side`, and with `frame_crop`
its centre square; JPEG) and the audio
(first channel, resampled to 16 kHz with the SoX resampler, trimmed sample-exactly); Python
checks the audio, writes the WAV and computes `fbank.npy` with `dalipipe.data.fbank`. Eight
clips share one ffmpeg process, whose start-up costs as much as decoding a miniature clip; if
that process fails, its clips are extracted one by one so that a broken file fails alone.
The stream summary ffmpeg prints is parsed for the manifest, so no separate probe runs.

Output: OUT/<clip_id>/frame_<kk>.jpg, audio.wav, fbank.npy (float16) and OUT/manifest.csv:
`clip_id,status,reason,n_frames,duration_s,sample_rate,channels,width,height`, where
duration_s is the audio extracted and sample_rate, channels, width and height describe the
source file. A clip that cannot be used (no audio, silent, too short, unreadable, ...) is a
`failed` row with the reason; the stage goes on. An audio-only file gets n_frames 0.
A fault of the machine (a full disk, a read-only or vanished output: dalipipe/faults.py) stops
the stage with exit 1 and nothing renamed into place, as do failures of more than
`max_failed_fraction` of the clips tried.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import logging
import math
import signal
import subprocess
import wave
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dalipipe.common import atomic_path, read_stage, stage_parser
from dalipipe.config import section_defaults
from dalipipe.data.ffmpeg import (
    MediaError,
    MediaInfo,
    check_file,
    ffmpeg_exe,
    file_url,
    first_channel_filter,
    parse_info,
    seek_and_skip,
)
from dalipipe.data.local import AUDIO_EXTENSIONS, list_source
from dalipipe.data.manifest import EXTRACT_FIELDS, write_manifest
from dalipipe.faults import (
    ANYWHERE,
    MachineFault,
    fault_in_text,
    ffmpeg_exit_fault,
    machine_fault,
    stop_on_machine_fault,
)

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
BATCH_SIZE = 8  # clips per ffmpeg process


class StageFailed(RuntimeError):
    """Too many clips failed for the part to be used: the stage stops, nothing is renamed."""


class ExtractError(Exception):
    """A clip that cannot be extracted; `reason` is written to the manifest."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


def frame_geometry(short_side: int, crop: bool = False) -> str:
    """The ffmpeg filter that gives a frame its stored size: the short side scaled to
    `short_side`, keeping the aspect ratio, and with `crop` the centre square, the geometry of
    CAV-MAE's extract_video_frame.py (Resize, then CenterCrop, to 224; docs/protocol.md)."""
    portrait = "lte(iw,ih)"
    scale = f"scale=w='if({portrait},{short_side},-2)':h='if({portrait},-2,{short_side})'"
    # crop centres by default; exact=1, or ffmpeg moves an odd x to the even column before it
    # (a 1280x720 frame is 398 wide at 224: CenterCrop's column 87, not 86)
    square = f",crop={short_side}:{short_side}:exact=1" if crop else ""
    return f"{scale}:flags=area{square},setsar=1"


def _frame_filter(short_side: int, skip_s: float, window_s: float, crop: bool = False) -> str:
    # Keep a frame when its whole second (counted from the window start) is later than the
    # last kept frame's: the first frame of each second, whatever the frame rate. Then give
    # it the stored size.
    trim = f"trim=start={skip_s:.6f}:duration={window_s:.6f}"
    second = f"floor(t-{skip_s:.6f})"
    previous = f"floor(prev_selected_t-{skip_s:.6f})"
    select = f"select='isnan(prev_selected_t)+gte({second}-{previous},1)'"
    return f"{trim},{select},{frame_geometry(short_side, crop)}"


@dataclass(frozen=True)
class Job:
    """One clip to extract: where from, which window, where to."""

    src: str
    clip_dir: Path
    start_s: float = 0.0
    window_s: float = 10.0
    short_side: int = 336
    crop: bool = False  # the centre square of the resized frame

    @property
    def pcm(self) -> Path:
        return self.clip_dir / "audio.s16"


def _io_args(k: int, job: Job, video: bool) -> tuple[list[str], list[str]]:
    """ffmpeg input and output arguments of input #k."""
    seek, skip = seek_and_skip(job.start_s)  # exact trims, fast seeks into long files
    # One decoder thread: the stage runs clips in parallel (--workers), and frame threading
    # spends more CPU per frame (bytes out are the same either way).
    inputs = ["-threads", "1"] + (["-ss", f"{seek:.6f}"] if seek > 0 else [])
    inputs += ["-t", f"{skip + job.window_s + 1:.6f}", "-i", file_url(job.src)]
    outputs = []
    if video:
        vf = _frame_filter(job.short_side, skip, job.window_s, job.crop)
        outputs += ["-map", f"{k}:v:0", "-vf", vf, "-fps_mode", "passthrough"]
        outputs += ["-frames:v", str(math.ceil(job.window_s)), "-q:v", "2", "-start_number", "0"]
        outputs += ["-threads", "1"]  # the JPEG encoder's
        outputs += [file_url(job.clip_dir / "frame_%02d.jpg")]
    trim = f"atrim=start={skip:.6f}:duration={job.window_s:.6f}"
    af = f"{first_channel_filter(SAMPLE_RATE)},{trim}"  # trimmed after resampling: exact edges
    outputs += ["-map", f"{k}:a:0", "-af", af, "-f", "s16le", "-c:a", "pcm_s16le"]
    outputs += [file_url(job.pcm)]
    return inputs, outputs


def _run(jobs: list[Job], videos: list[bool]) -> tuple[int, str]:
    """One ffmpeg process for all `jobs`: each input gets its own frame and audio outputs."""
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-nostats", "-y", "-filter_threads", "1"]
    outputs = []
    for k, (job, video) in enumerate(zip(jobs, videos)):
        i, o = _io_args(k, job, video)
        cmd += i
        outputs += o
    try:
        result = subprocess.run(cmd + outputs, capture_output=True, timeout=600 * len(jobs))
    except subprocess.TimeoutExpired as exc:
        raise ExtractError(f"{jobs[0].src}: ffmpeg took longer than {exc.timeout} s") from exc
    err = result.stderr.decode("utf-8", "replace")
    if result.returncode != 0:
        # a full disk fails every clip alike: it stops the stage instead of failing the clips
        fault = (
            fault_in_text(err, jobs[0].clip_dir.parent)
            or ffmpeg_exit_fault(result.returncode, jobs[0].clip_dir.parent)
            or _killed(result.returncode, jobs)
        )
        if fault is not None:
            raise fault
    return result.returncode, err


def _killed(returncode: int, jobs: list[Job]) -> MachineFault | None:
    """ffmpeg killed by the machine, not stopped by a bad file: the file size limit (SIGXFSZ)
    or SIGKILL (the out-of-memory killer, or an operator)."""
    where = jobs[0].clip_dir.parent
    if returncode == -signal.SIGXFSZ:
        return MachineFault(
            where, "ffmpeg exceeded the file size limit (SIGXFSZ)", ANYWHERE[errno.EFBIG]
        )
    if returncode == -signal.SIGKILL:
        advice = "it was killed (SIGKILL: out of memory?): check the memory limit, then rerun"
        return MachineFault(where, f"ffmpeg on {jobs[0].src}", advice)
    return None


def _error_line(text: str) -> str:
    lines = [x.strip() for x in text.splitlines() if "rror" in x or "nvalid" in x]
    return lines[-1] if lines else (text.strip().splitlines() or ["no message"])[-1]


def _wants_video(job: Job) -> bool:
    return Path(job.src).suffix.lower() not in AUDIO_EXTENSIONS


def _info(err: str, job: Job, index: int = 0) -> MediaInfo:
    try:
        return parse_info(err, job.src, index)
    except MediaError as exc:
        raise ExtractError(str(exc)) from exc


def _clear(job: Job) -> None:
    """Remove what extraction writes (only that: clip_dir may be a caller's folder)."""
    for path in [*job.clip_dir.glob("frame_*.jpg"), job.pcm] + [
        job.clip_dir / name for name in ("audio.wav", "fbank.npy")
    ]:
        path.unlink(missing_ok=True)


def _discard(job: Job) -> None:
    if job.clip_dir.is_dir():
        _clear(job)
        with contextlib.suppress(OSError):  # left in place when it holds other files
            job.clip_dir.rmdir()


def _reset(job: Job) -> None:
    try:  # not parents=True: an output directory that vanished must not come back half empty
        job.clip_dir.mkdir(exist_ok=True)
        _clear(job)
    except OSError as exc:
        fault = machine_fault(exc, job.clip_dir)
        if fault is None:
            raise
        raise fault from exc


def decode_window(job: Job) -> MediaInfo:
    """Run ffmpeg on one clip: frames and raw audio land in job.clip_dir."""
    video = _wants_video(job)
    code, err = _run([job], [video])
    if code != 0:
        info = _info(err, job)
        if not info.has_audio:
            raise ExtractError(f"{job.src}: no audio stream")
        if video and not info.has_video:  # an audio file with a video-like name: retry
            _reset(job)
            code, err = _run([job], [False])
        if code != 0:
            raise ExtractError(f"{job.src}: ffmpeg failed ({_error_line(err)})")
    return _info(err, job)


def write_wav(path: Path, samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(samples.astype("<i2").tobytes())


def _check_audio(job: Job, info: MediaInfo, samples: np.ndarray, min_s: float) -> None:
    src, start_s = job.src, job.start_s
    seconds = len(samples) / SAMPLE_RATE
    if info.duration is not None and start_s >= info.duration:
        raise ExtractError(f"{src}: start_s {start_s:g} is past the end ({info.duration:g} s)")
    if seconds < min_s:
        raise ExtractError(f"{src}: too short: {seconds:.2f} s of audio (minimum {min_s:g} s)")
    if info.duration is not None:
        expected = min(info.duration - start_s, job.window_s)
        if seconds < 0.5 * expected:
            raise ExtractError(
                f"{src}: truncated or corrupt: decoded {seconds:.2f} s of {expected:.2f} s"
            )
    if np.abs(samples.astype(np.int32)).max() <= 1:
        raise ExtractError(f"{src}: silent audio (every sample is zero)")


def _finish(job: Job, info: MediaInfo, fbank: dict, min_seconds: float) -> dict:
    """Check what ffmpeg wrote, then write audio.wav and fbank.npy; returns the row."""
    from dalipipe.data.fbank import model_input_from_wave  # another stage's module

    samples = np.fromfile(job.pcm, dtype="<i2") if job.pcm.exists() else np.zeros(0, "<i2")
    job.pcm.unlink(missing_ok=True)
    _check_audio(job, info, samples, min_seconds)
    frames = sorted(job.clip_dir.glob("frame_*.jpg"))
    if not info.has_video:  # e.g. cover art in an audio file: not video frames
        for frame in frames:
            frame.unlink()
        frames = []
    elif not frames:
        raise ExtractError(f"{job.src}: the video stream gave no frames")
    write_wav(job.clip_dir / "audio.wav", samples)
    features = model_input_from_wave(samples.astype(np.float32) / 32768.0, SAMPLE_RATE, fbank)
    if not np.isfinite(features).all():
        raise ExtractError(f"{job.src}: filterbank has non-finite values")
    np.save(job.clip_dir / "fbank.npy", features.astype(np.float16))
    return {
        "status": "ok",
        "reason": "",
        "n_frames": len(frames),
        "duration_s": round(len(samples) / SAMPLE_RATE, 4),
        "sample_rate": info.sample_rate,
        "channels": info.channels,
        "width": info.width if info.has_video else "",
        "height": info.height if info.has_video else "",
    }


def _guarded(job: Job, work) -> dict | ExtractError:
    """Run work(); on failure leave no clip directory and return the error."""
    try:
        return work()
    except ExtractError as exc:
        _discard(job)
        return exc
    except Exception as exc:  # a bug shows in the log, but one clip never stops the stage...
        _discard(job)
        stop_on_machine_fault(exc, job.clip_dir)  # ...and a fault of the machine always does
        log.exception("%s: unexpected error", job.src)
        return ExtractError(f"{job.src}: {type(exc).__name__}: {exc}")
    except BaseException:
        _discard(job)
        raise


def extract_batch(jobs: list[Job], fbank: dict, min_seconds: float = 1.0) -> list:
    """Extract several clips with one ffmpeg process (its start-up costs as much as a small
    clip's decoding); if that process fails, each clip is extracted alone so that one broken
    file only fails itself. Returns a row or an ExtractError per job."""
    results: list = [None] * len(jobs)
    ready = []
    for i, job in enumerate(jobs):
        try:
            check_file(job.src)
        except MediaError as exc:
            results[i] = ExtractError(str(exc))
            continue
        _reset(job)
        ready.append(i)
    if len(ready) > 1:
        batch = [jobs[i] for i in ready]
        code, err = _run(batch, [_wants_video(job) for job in batch])
        if code == 0:
            for k, i in enumerate(ready):
                job = jobs[i]
                results[i] = _guarded(
                    job, lambda job=job, k=k: _finish(job, _info(err, job, k), fbank, min_seconds)
                )
            return results
        for job in batch:
            _reset(job)
    for i in ready:
        job = jobs[i]
        results[i] = _guarded(
            job, lambda job=job: _finish(job, decode_window(job), fbank, min_seconds)
        )
    return results


def extract_clip(
    src,
    clip_dir,
    *,
    start_s: float = 0.0,
    window_s: float = 10.0,
    short_side: int = 336,
    crop: bool = False,
    fbank: dict,
    min_seconds: float = 1.0,
) -> dict:
    """Frames, audio.wav and fbank.npy of one clip into clip_dir; returns its manifest row
    (without clip_id). Raises ExtractError with the reason; what it wrote is then removed."""
    job = Job(str(src), Path(clip_dir), start_s, window_s, short_side, crop)
    job.clip_dir.parent.mkdir(parents=True, exist_ok=True)
    (result,) = extract_batch([job], fbank, min_seconds)
    if isinstance(result, ExtractError):
        raise result
    return result


def read_sources(source) -> list[dict]:
    """Clips to extract from an acquire manifest.csv, a local CSV or a folder: dicts with
    clip_id, path, start_s and, for clips acquire did not get, the reason."""
    source = Path(source)
    if source.is_file() and source.suffix.lower() == ".csv":
        with open(source, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
        if {"clip_id", "path", "status"} <= set(header):
            return _read_acquire_manifest(source)
    return [
        {
            "clip_id": e["clip_id"],
            "path": e["source"],
            "start_s": e["start_s"],
            "reason": e.get("reason", ""),
        }
        for e in list_source(source)
    ]


def _read_acquire_manifest(manifest: Path) -> list[dict]:
    entries = []
    with open(manifest, newline="", encoding="utf-8") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):
            reason = ""
            if row["status"] != "ok":
                reason = f"not acquired ({row['status']}): {row.get('reason') or 'no reason given'}"
            path = Path(row.get("path") or "")
            # Paths are relative to the working directory (as the workflow writes them) or,
            # failing that, to the manifest's folder.
            if row.get("path") and not path.is_absolute() and not path.exists():
                if (manifest.parent / path).exists():
                    path = manifest.parent / path
            try:
                start_s = float(row.get("start_s") or 0.0)
            except ValueError:
                start_s = 0.0
                reason = (
                    reason or f"{manifest}, line {line}: start_s {row['start_s']!r} is not a number"
                )
            entries.append(
                {"clip_id": row["clip_id"], "path": str(path), "start_s": start_s, "reason": reason}
            )
    return entries


def check_failed_share(attempted: list[dict], rows: list[dict], limit: float, out) -> None:
    """Stop the stage when more than ``limit`` of the clips it tried failed: a healthy part
    loses a few clips, a systemic fault (a broken ffmpeg, a wrong setting) loses most of them.
    Clips acquire did not get are not counted: they were never tried."""
    if not attempted:
        return
    sources = {e["clip_id"]: e["path"] for e in attempted}
    causes: Counter = Counter()
    for row in rows:
        if row["clip_id"] in sources and row["status"] != "ok":
            # the reason without its file name, so that one cause counts once
            causes[row["reason"].replace(sources[row["clip_id"]], "").lstrip(": ")] += 1
    failed = sum(causes.values())
    if failed > limit * len(attempted):
        commonest = "; ".join(f"{n} x {cause}" for cause, n in causes.most_common(3))
        raise StageFailed(
            f"{out}: {failed} of {len(attempted)} clips failed, more than "
            f"extract.max_failed_fraction {limit:g} allows; commonest reasons: {commonest}"
        )


def extract_all(entries: list[dict], out, params: dict, workers: int = 1) -> list[dict]:
    """Extract every clip into `out` (written atomically); returns the manifest rows."""
    from dalipipe.data.fbank import fbank_settings

    cfg = {**section_defaults("extract"), **(params or {})}
    fbank_settings(cfg["fbank"])  # a bad fbank section stops the stage before any clip
    if "%" in str(out):
        raise ValueError(f"{out}: ffmpeg would read '%' in the output path as a frame number")
    ids = [e["clip_id"] for e in entries]
    if len(set(ids)) != len(ids):
        raise ValueError(
            "duplicate clip ids in the source: "
            + str(sorted({i for i in ids if ids.count(i) > 1})[:5])
        )
    empty = dict.fromkeys(EXTRACT_FIELDS[3:], "")
    rows = {
        e["clip_id"]: {"clip_id": e["clip_id"], "status": "failed", "reason": e["reason"], **empty}
        for e in entries
    }
    todo = [e for e in entries if not e["reason"]]
    batches = [todo[i : i + BATCH_SIZE] for i in range(0, len(todo), BATCH_SIZE)]

    with atomic_path(out, directory=True) as tmp:

        def run(batch: list[dict]) -> list[tuple[str, dict | ExtractError]]:
            jobs = [
                Job(e["path"], tmp / e["clip_id"], e["start_s"], window_s, short_side, crop)
                for e in batch
            ]
            results = extract_batch(jobs, cfg["fbank"], float(cfg["min_seconds"]))
            return [(e["clip_id"], r) for e, r in zip(batch, results)]

        window_s, short_side = float(cfg["window_seconds"]), int(cfg["frame_short_side"])
        crop = bool(cfg["frame_crop"])
        with (
            ThreadPoolExecutor(max(1, workers)) as pool,
            tqdm(total=len(todo), desc="extract", unit="clip") as progress,
        ):
            try:
                for done in pool.map(run, batches):
                    for clip_id, result in done:
                        if isinstance(result, ExtractError):
                            rows[clip_id]["reason"] = result.reason
                        else:
                            rows[clip_id].update(result)
                    progress.update(len(done))
            except BaseException:  # a machine fault: the batches not started would fail alike
                pool.shutdown(wait=True, cancel_futures=True)
                raise
        rows = list(rows.values())
        for row in rows:
            if row["status"] != "ok":
                log.warning("%s failed: %s", row["clip_id"], row["reason"])
        check_failed_share(todo, rows, float(cfg["max_failed_fraction"]), out)
        try:
            write_manifest(tmp / "manifest.csv", rows, EXTRACT_FIELDS)
        except OSError as exc:
            fault = machine_fault(exc, tmp)
            if fault is None:
                raise
            raise fault from exc
    ok = sum(r["status"] == "ok" for r in rows)
    log.info("extracted %d of %d clips into %s", ok, len(rows), out)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("extract", __doc__, "section extract")
    parser.add_argument("source", help="an acquire manifest.csv, a CSV of media files or a folder")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--part", type=int, default=0, help="extract only clips i with i %% parts == part"
    )
    parser.add_argument("--parts", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1, help="clips extracted at once")
    args, params = read_stage(parser, argv)
    entries = read_sources(args.source)[args.part :: args.parts]
    try:
        extract_all(entries, args.out, params["extract"], args.workers)
    except (MachineFault, StageFailed, OSError) as err:
        # e.g. a read-only filesystem refusing the temporary output directory itself
        fault = machine_fault(err, Path(args.out).parent) if isinstance(err, OSError) else err
        if fault is None:
            raise
        log.error("extract stopped, %s was not written: %s", args.out, fault)
        return 1
    return 0
