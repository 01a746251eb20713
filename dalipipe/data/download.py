"""Download one part of an AudioSet selection with yt-dlp: only each segment's seconds.

    dalipipe acquire-audioset --params P --selection results/<run>/acquire/selection \
        --part 0 --out results/<run>/acquire/part-0

For every segment of ``<selection>/part-<i>.jsonl`` (written by ``dalipipe audioset-select``)
yt-dlp cuts the segment's time range from the video (``download_ranges``, through ffmpeg), video
and audio, in the format and height from config ``acquire.audioset``. Transient failures are
retried with exponential back-off; requests are spaced by a rate limit. Each finished clip goes to
a journal beside the output (``<out>.work/``), so a restart fetches only what is not finished:
``ok``, ``unavailable``, ``private`` and ``removed`` are final, ``blocked`` and ``error`` are
tried again. The journal records the settings it was written under: another ``format`` or
``height`` fetches every clip again (other files), another ``url_template``, ``ytdlp_options``
or a cookies file given or taken away tries the final failures again (``unavailable`` can be
the answer to a format no client could get). The output directory holds ``clips/<clip_id>.mp4``
(hard links into the work dir), ``manifest.csv`` and ``metadata.jsonl`` (DEVELOPING.md). The manifest's ``start_s`` is the
offset in the file (0: the file holds only the segment); the metadata's ``start_s`` is the
segment's start in the YouTube video.

YouTube ids are checked against ``^[A-Za-z0-9_-]{11}$`` before any URL is built, and yt-dlp runs
ffmpeg with argument lists, so no shell ever sees an id or a path.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from tqdm import tqdm

from dalipipe.common import atomic_path, read_stage, stage_parser, write_json, write_jsonl
from dalipipe.config import section_defaults
from dalipipe.data.audioset import YOUTUBE_ID, Segment, read_selection
from dalipipe.data.manifest import ACQUIRE_FIELDS, write_manifest
from dalipipe.faults import MachineFault, fault_in_text, machine_fault

log = logging.getLogger(__name__)

FINAL_STATUSES = {"ok", "unavailable", "private", "removed"}  # never fetched again

# yt-dlp's messages, first match wins (YouTube prefixes most with "Video unavailable").
_STATUS_PATTERNS = [
    ("private", ("private video", "video is private")),
    ("removed", ("removed by the uploader", "has been removed", "account associated with",
                 "has been terminated", "copyright claim", "violating youtube")),
    ("blocked", ("sign in to confirm", "not a bot", "http error 429", "too many requests",
                 "http error 403", "not available in your country", "blocked", "geo restrict")),
    ("unavailable", ("video unavailable", "not available", "http error 404", "http error 410",
                     "does not exist", "no video formats found", "requested format is not")),
]  # fmt: skip


def classify_error(message: str) -> str:
    text = message.lower()
    for status, needles in _STATUS_PATTERNS:
        if any(n in text for n in needles):
            return status
    return "error"


def segment_url(template: str, youtube_id: str) -> str:
    """The page yt-dlp opens for a YouTube id; refuses anything that is not an id."""
    if not isinstance(youtube_id, str) or not YOUTUBE_ID.match(youtube_id):
        raise ValueError(f"not a YouTube id: {youtube_id!r}")
    if "{youtube_id}" not in template:
        raise ValueError(f"acquire.audioset.url_template lacks {{youtube_id}}: {template!r}")
    return template.format(youtube_id=youtube_id)


class RateLimiter:
    """At most ``per_minute`` requests a minute, spaced evenly (YouTube flags bursts)."""

    def __init__(self, per_minute: float):
        self.interval = 60.0 / per_minute if per_minute else 0.0
        self.last = -float("inf")

    def wait(self) -> None:
        pause = self.last + self.interval - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        self.last = time.monotonic()


class _YtdlpLog:
    """yt-dlp's messages into our log (its own console output is off)."""

    def debug(self, msg):
        log.debug("yt-dlp: %s", msg)

    info = debug

    def warning(self, msg):
        log.info("yt-dlp: %s", msg)

    def error(self, msg):
        log.debug("yt-dlp: %s", msg)  # also raised as DownloadError, logged there


def ffmpeg_dir(work_dir: Path) -> Path:
    """A folder with ``ffmpeg`` linked to imageio-ffmpeg's binary.

    yt-dlp decides whether it can cut sections by looking for ``ffmpeg`` on PATH, ignoring
    ``ffmpeg_location``, so the folder goes on PATH as well as into that option.
    """
    import imageio_ffmpeg

    folder = work_dir / "bin"
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / "ffmpeg"
    target = imageio_ffmpeg.get_ffmpeg_exe()
    if not link.exists() or os.path.realpath(link) != os.path.realpath(target):
        link.unlink(missing_ok=True)
        link.symlink_to(target)
    if str(folder) not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = str(folder) + os.pathsep + os.environ.get("PATH", "")
    return folder


def ytdlp_options(cfg: dict, seg: Segment, clips_dir: Path, ffmpeg_folder: Path) -> dict:
    from yt_dlp.utils import download_range_func

    opts = {
        "format": cfg["format"].format(height=int(cfg["height"])),
        "merge_output_format": "mp4",
        "outtmpl": str(clips_dir / f"{seg.clip_id}.%(ext)s"),
        "download_ranges": download_range_func(None, [(seg.start_s, seg.end_s)]),
        "force_keyframes_at_cuts": True,  # cut exactly at the segment, not the keyframe before
        "ffmpeg_location": str(ffmpeg_folder),
        "socket_timeout": cfg["socket_timeout"],
        # ffmpeg reads the media itself when cutting sections: give it the same timeout (us)
        "external_downloader_args": {
            "ffmpeg_i": ["-rw_timeout", str(int(cfg["socket_timeout"] * 1e6))]
        },
        "retries": 0,  # we retry whole clips, with back-off
        "noplaylist": True,
        "quiet": True,
        "no_warnings": False,
        "noprogress": True,
        "logger": _YtdlpLog(),
        "overwrites": True,
    }
    if cfg.get("cookies"):
        opts["cookiefile"] = str(cfg["cookies"])
    opts.update(cfg.get("ytdlp_options") or {})
    return opts


def _finished_file(clips_dir: Path, clip_id: str) -> Path | None:
    for path in clips_dir.glob(f"{clip_id}.*"):
        if path.suffix not in {".part", ".ytdl", ".temp"} and ".part" not in path.suffixes:
            return path
    return None


def _check_clip(path: Path, seg: Segment) -> str:
    """Empty string when the file is a usable clip, else the reason it is not."""
    from dalipipe.data.ffmpeg import MediaError, probe

    try:
        info = probe(path)
    except MediaError as err:
        return f"downloaded file unreadable: {err.reason}"
    if not info.has_video:
        return "downloaded file has no video stream"
    if not info.has_audio:
        return "downloaded file has no audio stream"
    wanted = seg.end_s - seg.start_s
    if info.duration is not None and info.duration < 0.5 * wanted:
        return f"downloaded only {info.duration:.2f} s of {wanted:.2f} s"
    return ""


def fetch_segment(seg: Segment, cfg: dict, clips_dir: Path, ffmpeg_folder: Path, limiter) -> dict:
    """Download one segment, retrying transient failures; returns ``status``, ``reason``, ``path``."""
    import yt_dlp

    url = segment_url(cfg["url_template"], seg.youtube_id)
    status, reason = "error", ""
    for attempt in range(int(cfg["retries"]) + 1):
        if attempt:
            pause = float(cfg["backoff_s"]) * 2 ** (attempt - 1)
            log.info("%s: %s (%s); retry %d in %.1f s", seg.clip_id, status, reason, attempt, pause)
            time.sleep(pause)
        limiter.wait()
        for stale in clips_dir.glob(f"{seg.clip_id}.*"):
            stale.unlink()
        try:
            with yt_dlp.YoutubeDL(ytdlp_options(cfg, seg, clips_dir, ffmpeg_folder)) as ydl:
                ydl.download([url])
        except yt_dlp.utils.DownloadError as err:
            reason = str(err).removeprefix("ERROR: ").strip()
            fault = fault_in_text(reason, clips_dir)  # e.g. a full disk: not the video's fault
            if fault is not None:
                raise fault from err
            status = classify_error(reason)
        else:
            path = _finished_file(clips_dir, seg.clip_id)
            reason = _check_clip(path, seg) if path else "yt-dlp reported success but wrote no file"
            if not reason:
                return {"status": "ok", "reason": "", "path": path}
            # the host answered and the file is bad (e.g. a segment past the video's end):
            # the same request would give the same file, so no retry in this run
            status = "error"
            break
        if status in FINAL_STATUSES:
            break
    return {"status": status, "reason": reason, "path": None}


def _read_journal(path: Path) -> dict[str, dict]:
    done = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                done[row["clip_id"]] = row
            except (json.JSONDecodeError, KeyError):
                continue  # a line cut short by a kill: that clip is fetched again
    return done


def fetch_settings(cfg: dict) -> dict:
    """What a journal row depends on: ``media`` (the files) and ``access`` (final failures)."""
    return {
        "media": {"format": cfg["format"].format(height=int(cfg["height"]))},
        "access": {
            "url_template": cfg["url_template"],
            "cookies": bool(cfg.get("cookies")),
            "ytdlp_options": cfg.get("ytdlp_options") or {},
        },
    }


def _journal_under(journal_path: Path, done: dict[str, dict], settings: dict) -> dict[str, dict]:
    """The journal rows still valid under ``settings``; the journal is rewritten to hold them."""
    stamp = journal_path.with_name("settings.json")
    old = json.loads(stamp.read_text()) if stamp.is_file() else None
    kept = done
    if old is None and done:
        log.warning("%s: no settings recorded (an older version); kept as is", journal_path)
    elif old is not None and old.get("media") != settings["media"]:
        kept = {}
        log.info("format settings changed: all %d journalled clips are fetched again", len(done))
    elif old is not None and old.get("access") != settings["access"]:
        kept = {k: row for k, row in done.items() if row["status"] == "ok"}
        log.info("access settings changed: %d failed clips are tried again", len(done) - len(kept))
    if kept is not done:
        write_jsonl(journal_path, kept.values())
    write_json(stamp, settings)
    return kept


def acquire_part(segments: list[Segment], cfg: dict, out_dir: str | Path) -> list[dict]:
    """Fetch every segment not finished before; write the part directory; return manifest rows."""
    cfg = {
        **section_defaults("acquire")["audioset"],
        **{k: v for k, v in cfg.items() if v is not None},
    }
    if cfg.get("cookies") and not Path(cfg["cookies"]).is_file():
        raise FileNotFoundError(f"acquire.audioset.cookies: no such file {cfg['cookies']!r}")
    out_dir = Path(out_dir)
    work = out_dir.with_name(out_dir.name + ".work")
    clips_dir = work / "clips"
    clips_dir.mkdir(parents=True, exist_ok=True)
    journal_path = work / "journal.jsonl"
    done = _journal_under(journal_path, _read_journal(journal_path), fetch_settings(cfg))
    folder = ffmpeg_dir(work)
    if cfg.get("cookies"):
        # yt-dlp writes the cookie jar back on exit: each job gets its own copy, so parallel
        # parts never write the user's file at once
        own = work / "cookies.txt"
        shutil.copyfile(cfg["cookies"], own)
        cfg["cookies"] = str(own)
    limiter = RateLimiter(float(cfg["rate_limit"] or 0))
    results: dict[str, dict] = {}
    with open(journal_path, "a", encoding="utf-8") as journal:
        for seg in tqdm(segments, desc="download", unit="clip", mininterval=10):
            old = done.get(seg.clip_id)
            if old and old["status"] in FINAL_STATUSES:
                if old["status"] != "ok" or _finished_file(clips_dir, seg.clip_id):
                    results[seg.clip_id] = old
                    continue
            if not YOUTUBE_ID.match(seg.youtube_id):
                result = {"status": "error", "reason": f"not a YouTube id: {seg.youtube_id!r}"}
            else:
                result = fetch_segment(seg, cfg, clips_dir, folder, limiter)
            row = {"clip_id": seg.clip_id, "status": result["status"], "reason": result["reason"]}
            journal.write(json.dumps(row) + "\n")
            journal.flush()
            results[seg.clip_id] = row
            if row["status"] != "ok":
                log.warning("%s: %s: %s", seg.clip_id, row["status"], row["reason"])
    return _write_part(segments, results, clips_dir, out_dir)


def _write_part(segments, results, clips_dir: Path, out_dir: Path) -> list[dict]:
    rows = []
    with atomic_path(out_dir, directory=True) as tmp:
        (tmp / "clips").mkdir()
        for seg in segments:
            result = results[seg.clip_id]
            path = ""
            if result["status"] == "ok":
                src = _finished_file(clips_dir, seg.clip_id)
                dst = tmp / "clips" / src.name
                try:
                    os.link(src, dst)  # no copy: the work dir keeps the clip for later reruns
                except OSError:
                    shutil.copy2(src, dst)
                path = str(out_dir / "clips" / src.name)
            rows.append({
                "clip_id": seg.clip_id,
                "path": path,
                "status": result["status"],
                "reason": result["reason"],
                "split": seg.split,
                "start_s": 0.0,  # where the clip starts in its file: downloads are cut already
                "labels": ";".join(seg.labels),
            })  # fmt: skip
        write_manifest(tmp / "manifest.csv", rows, ACQUIRE_FIELDS)
        write_jsonl(
            tmp / "metadata.jsonl",
            (
                {
                    "clip_id": s.clip_id,
                    "split": s.split,
                    "labels": s.labels,
                    "start_s": s.start_s,
                    "end_s": s.end_s,
                    "youtube_id": s.youtube_id,
                    "mids": s.mids,
                }
                for s in segments
            ),
        )
    counts = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    log.info("part %s: %s", out_dir.name, counts)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("acquire-audioset", __doc__, "section acquire.audioset")
    parser.add_argument("--selection", required=True, help="dir of part-<i>.jsonl selections")
    parser.add_argument("--part", type=int, required=True)
    parser.add_argument("--out", required=True, help="this part's output directory")
    args, params = read_stage(parser, argv)
    segments = read_selection(Path(args.selection) / f"part-{args.part}.jsonl")
    try:
        acquire_part(segments, params["acquire"]["audioset"], args.out)
    except (MachineFault, OSError) as err:  # the journal keeps the clips fetched so far
        fault = machine_fault(err, Path(args.out).parent)
        if fault is None:
            raise
        log.error("acquire stopped, %s was not written: %s", args.out, fault)
        return 1
    return 0
