"""The AudioSet downloader for real: yt-dlp against a local HTTP server serving generated MP4s.

The server (tests/support/video_host.py: threaded, on 127.0.0.1) answers byte ranges like a
video host, and has ids that 404, 403, fail once, stall, or cut the body short. yt-dlp's generic extractor
reads them, and ffmpeg cuts the segment's 10 s out of a 20 s video whose tone changes from
440 Hz to 880 Hz at 10 s, so the test can hear where the cut fell.
"""

import csv
import json
import time
from collections import Counter

import numpy as np
import pytest

from dalipipe.data import download
from dalipipe.data.audioset import Segment
from dalipipe.data.manifest import ACQUIRE_FIELDS
from tests.support.video_host import make_video, serve_videos

GOOD, SLOW, FLAKY = "goodVideo01", "slowVideo01", "flakyVideo1"
MISSING, FORBIDDEN, STALL, TRUNC = "missingVid1", "forbidden01", "stallVideo1", "truncVideo1"
MEMBERS = "membersOnly"  # its page is served only with the cookie session=let-me-in
LATER = "comesLater1"  # 404 until a test makes the host serve it
BEHAVIOURS = {SLOW: "slow", FLAKY: "flaky", MISSING: "missing", FORBIDDEN: "forbidden",
              STALL: "stall", TRUNC: "trunc", MEMBERS: "members", LATER: "missing"}  # fmt: skip


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """The local video host (tests/support/video_host.py); ``host.url_template``,
    ``host.requests``."""
    path = tmp_path_factory.mktemp("host") / "video.mp4"
    make_video(path)
    with serve_videos(path.read_bytes(), BEHAVIOURS, stall_s=3.0) as server:
        yield server


def segment(vid, start=5.0):
    return Segment(
        clip_id=f"{vid}_{round(start * 1000)}",
        youtube_id=vid,
        start_s=start,
        end_s=start + 10.0,
        mids=["/m/05tny_"],
        labels=["Bark"],
        split="balanced_train",
    )


def tone_hz(wave, sample_rate=16000):
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return np.argmax(spectrum) * sample_rate / len(wave)


def test_segment_url_accepts_only_youtube_ids():
    template = "https://www.youtube.com/watch?v={youtube_id}"
    assert (
        download.segment_url(template, "--PJHxphWEs")
        == "https://www.youtube.com/watch?v=--PJHxphWEs"
    )
    for bad in ["../../etc/pa", "abc", "a b;rm -rf", "x" * 12, "$(reboot)00", None]:
        with pytest.raises(ValueError, match="not a YouTube id"):
            download.segment_url(template, bad)
    with pytest.raises(ValueError, match="url_template"):
        download.segment_url("https://example.org/watch", "--PJHxphWEs")


def test_errors_are_classified_from_ytdlp_messages():
    cases = {
        "[youtube] abc: Private video. Sign in if you've been granted access": "private",
        "[youtube] abc: Video unavailable. This video has been removed by the uploader": "removed",
        "[youtube] abc: Sign in to confirm you're not a bot. Use --cookies": "blocked",
        "[generic] x: Unable to download webpage: HTTP Error 404: Not Found": "unavailable",
        "[youtube] abc: Video unavailable": "unavailable",
        "ffmpeg exited with code 183": "error",
    }
    assert {m: download.classify_error(m) for m in cases} == cases


def test_rate_limit_spaces_requests():
    limiter = download.RateLimiter(per_minute=600)  # one every 0.1 s
    start = time.monotonic()
    for _ in range(4):
        limiter.wait()
    assert 0.29 < time.monotonic() - start < 1.0


def test_download_part_against_local_host(host, tmp_path):
    import shutil

    from dalipipe.data.ffmpeg import decode_audio, probe

    cfg = {"url_template": host.url_template, "retries": 1, "backoff_s": 0.05, "rate_limit": 0,
           "socket_timeout": 1.5, "height": 240}  # fmt: skip
    vids = [GOOD, SLOW, FLAKY, MISSING, FORBIDDEN, STALL, TRUNC]
    segments = [segment(v) for v in vids]
    out = tmp_path / "part-0"
    rows = download.acquire_part(segments, cfg, out)
    status = {r["clip_id"].split("_")[0]: r["status"] for r in rows}
    assert status == {GOOD: "ok", SLOW: "ok", FLAKY: "ok", MISSING: "unavailable",
                      FORBIDDEN: "blocked", STALL: "error", TRUNC: "error"}  # fmt: skip
    assert host.requests[MISSING] == 1  # final: not retried
    assert host.requests[FLAKY] >= 2

    with open(out / "manifest.csv", newline="") as f:
        manifest = list(csv.DictReader(f))
    assert list(manifest[0]) == ACQUIRE_FIELDS
    assert [m["clip_id"] for m in manifest] == [s.clip_id for s in segments]
    good = manifest[0]
    assert good["path"] == str(out / "clips" / "goodVideo01_5000.mp4")
    assert (good["split"], float(good["start_s"]), good["labels"]) == (
        "balanced_train",
        0.0,  # the offset in the file: it holds only the segment
        "Bark",
    )
    assert "404" in manifest[3]["reason"] and manifest[3]["path"] == ""
    assert "timed out" in manifest[5]["reason"] and "ffmpeg exited" in manifest[6]["reason"]
    metadata = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert metadata[0] == {"clip_id": "goodVideo01_5000", "split": "balanced_train",
                           "labels": ["Bark"], "start_s": 5.0, "end_s": 15.0,
                           "youtube_id": GOOD, "mids": ["/m/05tny_"]}  # fmt: skip

    info = probe(good["path"])
    assert info.has_audio and info.has_video and abs(info.duration - 10.0) < 0.3
    wave = decode_audio(good["path"], 16000)
    assert abs(tone_hz(wave[: 3 * 16000]) - 440) < 5  # source seconds 5-8
    assert abs(tone_hz(wave[-3 * 16000 :]) - 880) < 5  # source seconds 12-15

    # A restart fetches only what is not final; a lost output dir is rebuilt without fetching.
    before = Counter(host.requests)
    shutil.rmtree(out)
    rows_again = download.acquire_part(segments, cfg, out)
    fetched = host.requests - before
    assert set(fetched) == {FORBIDDEN, STALL, TRUNC}
    assert [r["status"] for r in rows_again] == [r["status"] for r in rows]
    assert (out / "clips" / "goodVideo01_5000.mp4").stat().st_size > 10_000


def test_cookies_file_is_sent_and_left_untouched(host, tmp_path):
    cookies = tmp_path / "cookies.txt"
    text = (
        "# Netscape HTTP Cookie File\n127.0.0.1\tFALSE\t/\tFALSE\t4102444800\tsession\tlet-me-in\n"
    )
    cookies.write_text(text)
    cfg = {"url_template": host.url_template, "retries": 0, "rate_limit": 0, "socket_timeout": 5}
    without = download.acquire_part([segment(MEMBERS)], cfg, tmp_path / "a")
    with_cookies = download.acquire_part(
        [segment(MEMBERS)], {**cfg, "cookies": str(cookies)}, tmp_path / "b"
    )
    assert (without[0]["status"], with_cookies[0]["status"]) == ("blocked", "ok")
    assert cookies.read_text() == text  # yt-dlp saved its jar into the job's own copy
    with pytest.raises(FileNotFoundError, match="acquire.audioset.cookies"):
        download.acquire_part(
            [segment(MEMBERS)], {**cfg, "cookies": str(tmp_path / "no")}, tmp_path / "c"
        )


def test_journal_is_redone_under_other_fetch_settings(host, tmp_path):
    """Final failures are tried again under other access settings (url_template, ytdlp_options,
    cookies), every clip under another format or height; the same settings fetch nothing."""
    cfg = {"url_template": host.url_template, "retries": 0, "rate_limit": 0, "socket_timeout": 5,
           "height": 240}  # fmt: skip
    segments = [segment(GOOD, start=1.0), segment(LATER)]
    out = tmp_path / "part-0"

    def statuses(cfg):
        before = Counter(host.requests)
        rows = download.acquire_part(segments, cfg, out)
        fetched = host.requests - before
        return [r["status"] for r in rows], {v for v in (GOOD, LATER) if fetched[v]}

    assert statuses(cfg) == (["ok", "unavailable"], {GOOD, LATER})
    host.behaviours.pop(LATER)  # the video is there now (as with a format that works)
    assert statuses(cfg) == (["ok", "unavailable"], set())  # final: not asked again
    other_access = {**cfg, "ytdlp_options": {"http_headers": {"X-Test": "1"}}}
    assert statuses(other_access) == (["ok", "ok"], {LATER})
    assert statuses({**other_access, "height": 120}) == (["ok", "ok"], {GOOD, LATER})
    assert statuses({**other_access, "height": 120}) == (["ok", "ok"], set())
