"""`dalipipe fetch` against a local HTTP server on 127.0.0.1, and the paper-input helpers.

The server answers byte ranges; per path it can misbehave: ``trunc-once`` promises the whole
body on the first request and sends a third, ``no-range`` ignores Range requests. It records
every request's Range header, so a test can see that a download was resumed.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import http.server
import io
import json
import re
import shutil
import threading
import zipfile
from pathlib import Path

import pytest

from dalipipe.data import fetch as fetch_mod
from dalipipe.data import paper_inputs
from dalipipe.data.fetch import FetchError, fetch, part_path
from dalipipe.scoring import assets
from tests.support.hub import HubServer, tiny_gpt2_files
from tests.support.snakemake import SNAKEFILE, snakemake, workflow_env
from tests.support.video_host import serving

REPO = Path(__file__).resolve().parents[1]
SHARED = next(
    (p for p in (REPO.parent / "shared" / "data", Path("/work/shared/data")) if p.is_dir()),
    Path("/nonexistent"),
)
BODY = bytes(range(256)) * 4096  # 1 MiB, every byte value


class FileServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, files: dict[str, bytes], behaviours: dict[str, str]):
        super().__init__(("127.0.0.1", 0), FileHandler)
        self.files, self.behaviours = files, behaviours
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.lock = threading.Lock()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def ranges(self, path: str) -> list[str | None]:
        return [r for p, r in self.requests if p == path]


class FileHandler(http.server.BaseHTTPRequestHandler):
    server: FileServer

    def log_message(self, *args):
        pass

    def do_GET(self):
        server = self.server
        with server.lock:
            server.requests.append((self.path, self.headers.get("Range")))
            first = len(server.ranges(self.path)) == 1
        if self.path not in server.files:
            return self.send_error(404)
        data, behaviour = server.files[self.path], server.behaviours.get(self.path)
        start = 0
        ranged = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if ranged and behaviour != "no-range":
            start = int(ranged.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        chunk = data[start:]
        if behaviour == "trunc-once" and first:
            chunk = chunk[: len(chunk) // 3]  # promise everything, send a third, hang up
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(chunk)


def serve(files: dict[str, bytes], behaviours: dict[str, str] | None = None):
    return serving(FileServer(files, behaviours or {}))


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def test_download_with_a_pinned_checksum(tmp_path):
    out = tmp_path / "sub" / "file.bin"
    with serve({"/f.bin": BODY}) as host:
        assert fetch(host.url("/f.bin"), out, md5=md5(BODY), progress=False) == out
    assert out.read_bytes() == BODY
    assert not part_path(out).exists()


def test_404_names_the_file_and_the_url_and_leaves_nothing(tmp_path):
    out = tmp_path / "file.csv"
    with serve({}) as host, pytest.raises(FetchError) as err:
        fetch(host.url("/gone.csv"), out, progress=False)
    message = str(err.value)
    assert str(out) in message and host.url("/gone.csv") in message and "404" in message
    assert "place it at" in message  # what to do
    assert not out.exists() and not part_path(out).exists()


def test_a_wrong_checksum_leaves_no_finished_file(tmp_path):
    out = tmp_path / "file.bin"
    with serve({"/f.bin": BODY}) as host, pytest.raises(FetchError) as err:
        fetch(host.url("/f.bin"), out, sha256="0" * 64, progress=False)
    message = str(err.value)
    assert str(out) in message and host.url("/f.bin") in message and "sha256" in message
    assert not out.exists() and not part_path(out).exists()


def test_a_truncated_body_fails_then_resumes_with_a_range_request(tmp_path):
    out = tmp_path / "file.bin"
    with serve({"/f.bin": BODY}, {"/f.bin": "trunc-once"}) as host:
        with pytest.raises(FetchError) as err:
            fetch(host.url("/f.bin"), out, md5=md5(BODY), progress=False)
        assert "stopped at" in str(err.value) and str(out) in str(err.value)
        assert "run the same command again" in str(err.value)
        assert not out.exists()
        kept = part_path(out).stat().st_size
        assert 0 < kept < len(BODY)
        fetch(host.url("/f.bin"), out, md5=md5(BODY), progress=False)
        assert host.ranges("/f.bin") == [None, f"bytes={kept}-"]
    assert out.read_bytes() == BODY
    assert not part_path(out).exists()


def test_retries_resume_within_one_call(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch_mod.time, "sleep", lambda s: None)
    out = tmp_path / "file.bin"
    with serve({"/f.bin": BODY}, {"/f.bin": "trunc-once"}) as host:
        fetch(host.url("/f.bin"), out, md5=md5(BODY), retries=1, progress=False)
        assert host.ranges("/f.bin")[1].startswith("bytes=")
    assert out.read_bytes() == BODY


def test_a_server_ignoring_range_is_read_from_the_start(tmp_path):
    out = tmp_path / "file.bin"
    part_path(out).write_bytes(b"x" * 1000)  # a stale part (not even a prefix of the file)
    with serve({"/f.bin": BODY}, {"/f.bin": "no-range"}) as host:
        fetch(host.url("/f.bin"), out, md5=md5(BODY), progress=False)
        assert host.ranges("/f.bin") == ["bytes=1000-"]
    assert out.read_bytes() == BODY


def test_a_complete_part_is_finished_without_downloading_again(tmp_path):
    out = tmp_path / "file.bin"
    part_path(out).write_bytes(BODY)
    with serve({"/f.bin": BODY}) as host:
        fetch(host.url("/f.bin"), out, md5=md5(BODY), progress=False)
    assert out.read_bytes() == BODY


def test_the_checksum_is_recorded_at_first_download_and_checked_later(tmp_path):
    record = tmp_path / "record.json"
    out = tmp_path / "file.csv"
    files = {"/f.csv": b"a,b\n1,2\n"}
    with serve(files) as host:
        url = host.url("/f.csv")
        fetch(url, out, record=record, progress=False)
        entry = json.loads(record.read_text())[url]
        assert entry["sha256"] == hashlib.sha256(files["/f.csv"]).hexdigest()
        assert entry["size"] == 8
        out.unlink()
        fetch(url, out, record=record, progress=False)  # same bytes: accepted
        out.unlink()
        files["/f.csv"] = b"a,b\n1,3\n"  # the server changed the file
        with pytest.raises(FetchError) as err:
            fetch(url, out, record=record, progress=False)
        message = str(err.value)
        assert str(out) in message and url in message and str(record) in message
        assert "delete its entry" in message
        assert not out.exists() and not part_path(out).exists()
    assert json.loads(record.read_text())[url]["sha256"] == entry["sha256"]  # unchanged


def test_a_second_run_does_nothing(tmp_path):
    out = tmp_path / "file.bin"
    with serve({"/f.bin": BODY}) as host:
        fetch(host.url("/f.bin"), out, md5=md5(BODY), progress=False)
        mtime = out.stat().st_mtime_ns
        fetch(host.url("/f.bin"), out, md5=md5(BODY), progress=False)
        assert len(host.requests) == 1
    assert out.stat().st_mtime_ns == mtime


def test_the_command_line(tmp_path, capsys):
    from dalipipe.cli import main

    out = tmp_path / "file.bin"
    with serve({"/f.bin": BODY}) as host:
        assert main(["fetch", host.url("/f.bin"), "--out", str(out), "--md5", md5(BODY)]) == 0
        assert out.read_bytes() == BODY
        missing = tmp_path / "missing.bin"
        assert main(["fetch", host.url("/nope"), "--out", str(missing), "--retries", "0"]) == 1
        assert not missing.exists()


def test_a_folder_appears_only_when_all_its_files_are_there(tmp_path):
    # a model as the files of its folder (FENSE's sentence encoder): one file missing on the
    # server leaves no folder; the next run fetches only what is still missing
    record, out = tmp_path / "record.json", tmp_path / "models" / "sbert"
    files = {"/m/resolve/main/config.json": b"{}", "/m/resolve/main/1_Pooling/config.json": b"[]"}
    names = ["config.json", "1_Pooling/config.json"]
    with serve(files) as host:
        base = host.url("/m/resolve/main/")
        gone = dict(files)
        del gone["/m/resolve/main/1_Pooling/config.json"]
        with serve(gone) as broken, pytest.raises(FetchError, match="1_Pooling/config.json"):
            fetch_mod.fetch_folder(broken.url("/m/resolve/main/"), names, out, record=record)
        assert not out.exists() and (part_path(out) / "config.json").exists()
        fetch_mod.fetch_folder(base, names, out, record=record, progress=False)
        assert [p for p, _ in host.requests] == ["/m/resolve/main/1_Pooling/config.json"]
    assert (out / "1_Pooling" / "config.json").read_bytes() == b"[]"
    assert not part_path(out).exists()
    assert len(json.loads(record.read_text())) == 2  # each file's checksum, by its URL
    with pytest.raises(ValueError, match="leaves the folder"):
        fetch_mod.fetch_folder(base, ["../x"], tmp_path / "other", record=record)


# ----------------------------------------------------------------------------- paper inputs


def test_unpack_a_7z_archive_with_one_top_folder(tmp_path):
    py7zr = pytest.importorskip("py7zr")
    src = tmp_path / "evaluation"
    src.mkdir()
    (src / "a b.wav").write_bytes(b"RIFF1")
    (src / "c.wav").write_bytes(b"RIFF2")
    archive = tmp_path / "clotho_audio_evaluation.7z"
    with py7zr.SevenZipFile(archive, "w") as z:
        z.writeall(src, arcname="evaluation")
    out = tmp_path / "data" / "evaluation"
    paper_inputs.unpack(archive, out)
    assert sorted(p.name for p in out.iterdir()) == ["a b.wav", "c.wav"]
    assert (out / "c.wav").read_bytes() == b"RIFF2"


def test_audiocaps_selection_gives_the_evaluation_clip_ids(tmp_path):
    from dalipipe.data.audioset import read_selection

    path = tmp_path / "test.csv"
    path.write_text(
        "audiocap_id,youtube_id,start_time,caption\n"
        "1,--0w1YA1Hm4,30,A man talks\n2,--0w1YA1Hm4,30,Speech\n3,-AheI8Epim4,0,Rain\n"
    )
    assert paper_inputs.audiocaps_selection(path, tmp_path / "sel") == 2
    rows = read_selection(tmp_path / "sel" / "part-0.jsonl")  # what acquire-audioset reads
    assert [(r.clip_id, r.start_s, r.end_s) for r in rows] == [
        ("--0w1YA1Hm4_30000", 30.0, 40.0),
        ("-AheI8Epim4_0", 0.0, 10.0),
    ]


PREFIX_DS = SHARED / "authors" / "prefixDS.json"


def make_clip(path: Path) -> None:
    """A 10-s H.264 clip at 10 fps: red for the first 5 s, blue after."""
    import subprocess

    import imageio_ffmpeg

    colours = "color=red:s=64x48:r=10:d=5[a];color=blue:s=64x48:r=10:d=5[b];[a][b]concat=n=2"
    subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", "-f", "lavfi", "-i", colours,
         "-c:v", "libx264", "-pix_fmt", "yuv420p", str(path)],
        check=True,
    )  # fmt: skip


@pytest.mark.skipif(not PREFIX_DS.exists(), reason="needs ../shared/data/authors/prefixDS.json")
def test_prefix_selection_finds_the_start_of_each_authors_clip(tmp_path):
    """Start times from AudioCaps (caption matched), else from the AudioSet segment CSVs."""
    from dalipipe.data.audioset import read_selection

    pairs = paper_inputs.read_prefix_pairs(PREFIX_DS)
    assert len(pairs) == 16
    audiocaps = tmp_path / "train.csv"
    with open(audiocaps, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["audiocap_id", "youtube_id", "start_time", "caption"])
        for n, pair in enumerate(pairs[:-2]):
            writer.writerow([n, pair["id"], 10 * n, "another caption of the clip"])
            writer.writerow([n + 100, pair["id"], 10 * n, pair["caption"]])
    segments = tmp_path / "unbalanced.csv"
    segments.write_text(
        "# YTID, start_seconds, end_seconds, positive_labels\n"
        f'{pairs[-2]["id"]}, 250.000, 260.000, "/m/09x0r"\n'
    )
    rows = paper_inputs.prefix_selection(PREFIX_DS, tmp_path / "sel", [audiocaps], [segments])
    assert [r["youtube_id"] for r in rows] == [p["id"] for p in pairs[:-1]]  # last: unknown
    read = read_selection(tmp_path / "sel" / "part-0.jsonl")
    assert read[0].start_s == 0.0 and read[1].start_s == 10.0 and read[-1].start_s == 250.0


@pytest.mark.skipif(not PREFIX_DS.exists(), reason="needs ../shared/data/authors/prefixDS.json")
def test_prefix_pairs_pair_the_frame_at_5_s_with_the_authors_caption(tmp_path):
    pairs = paper_inputs.read_prefix_pairs(PREFIX_DS)
    clips = tmp_path / "clips"
    (clips / "clips").mkdir(parents=True)
    ok, gone = f"{pairs[0]['id']}_0", f"{pairs[1]['id']}_560000"
    make_clip(clips / "clips" / f"{ok}.mp4")
    with open(clips / "manifest.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["clip_id", "path", "status", "reason", "split", "start_s", "labels"])
        writer.writerow([ok, str(clips / "clips" / f"{ok}.mp4"), "ok", "", "prefix", 0.0, ""])
        writer.writerow([gone, "", "removed", "removed by the uploader", "prefix", 0.0, ""])
    with open(clips / "metadata.jsonl", "w") as f:
        for clip_id, pair in ((ok, pairs[0]), (gone, pairs[1])):
            f.write(json.dumps({"clip_id": clip_id, "youtube_id": pair["id"]}) + "\n")
    out = tmp_path / "prefix" / "pairs.csv"
    summary = paper_inputs.prefix_pairs(PREFIX_DS, clips, out, tmp_path / "prefix" / "frames")
    assert summary["pairs"] == 1 and summary["of"] == 2 and gone in summary["left_out"][0]
    from dalipipe.caption.pairs import load_pairs

    (pair,) = load_pairs(out)  # what the prefix stage reads
    assert pair.caption == pairs[0]["caption"] and pair.clip_id == ok
    # the clip's frame at 5 s: the test clip is red before 5 s and blue from 5 s on
    r, g, b = pair.image.convert("RGB").resize((1, 1)).getpixel((0, 0))
    assert b > 150 and r < 100


# ----------------------------------------------------------------------------- through Snakemake


def segment_csv(rows: list[tuple[str, float]]) -> bytes:
    lines = ["# Segments csv created Sun Mar  5 10:54:31 2017", "# num_ytids=1", "# YTID, ..."]
    lines += [f'{vid}, {start:.3f}, {start + 10:.3f}, "/m/09x0r"' for vid, start in rows]
    return ("\n".join(lines) + "\n").encode()


def seven_zip(folder: Path, archive: Path) -> bytes:
    import py7zr

    with py7zr.SevenZipFile(archive, "w") as z:
        z.writeall(folder, arcname=folder.name)
    return archive.read_bytes()


def test_the_fetch_rules_make_every_missing_input(tmp_path, snakemake_in):
    """configs/paper.yaml with its fetch URLs and YouTube pointed at 127.0.0.1: the fetch,
    unpack, AudioCaps-clip and prefix-pair rules run for real (real yt-dlp and ffmpeg)."""
    import yaml

    from tests.support.video_host import make_video, serve_videos

    pytest.importorskip("py7zr")
    audio = tmp_path / "evaluation"
    audio.mkdir()
    (audio / "Santa Motor.wav").write_bytes(b"RIFF-not-really")
    captions = b"file_name,caption_1,caption_2,caption_3,caption_4,caption_5\n"
    prefix_ds = [  # the authors' format; prefixMiss1 is in no CSV, prefixGone1 is gone
        {"id": vid, "image": f"/x/frame_5/{vid}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the sound."},
            {"from": "gpt", "value": caption}]}
        for vid, caption in [("prefixClip1", "A dog barks"), ("prefixGone1", "Rain falls"),
                             ("prefixMiss1", "Wind blows")]
    ]  # fmt: skip
    files = {
        "/as/balanced.csv": segment_csv([("balancedId1", 0.0)]),
        "/as/unbalanced.csv": segment_csv([("prefixGone1", 3.0)]),
        "/as/eval.csv": segment_csv([("evalClipId1", 0.0)]),
        "/as/classes.csv": b'index,mid,display_name\n0,/m/09x0r,"Speech"\n',
        "/as/ontology.json": b"[]\n",
        "/ac/train.csv": b"audiocap_id,youtube_id,start_time,caption\n1,prefixClip1,2,A dog barks\n",
        "/ac/val.csv": b"audiocap_id,youtube_id,start_time,caption\n2,valClipId01,0,Birds\n",
        "/ac/test.csv": (
            b"audiocap_id,youtube_id,start_time,caption\n"
            b"3,acTestClip1,0,A car passes\n4,acTestClip1,0,Engine noise\n5,acTestClip2,4,Talk\n"
        ),
        "/clotho/captions.csv": captions + b"Santa Motor.wav,a,b,c,d,e\n",
        "/clotho/clotho_audio_evaluation.7z": seven_zip(audio, tmp_path / "a.7z"),
        "/models/audio_model.21.pth": b"weights",
        "/prefixDS.json": json.dumps(prefix_ds).encode(),
        "/hf/bert/resolve/main/config.json": b'{"model_type": "bert"}',
        "/hf/bert/resolve/main/vocab.txt": b"[PAD]\n[UNK]\n",
    }
    names = {
        "audioset_balanced_train": "/as/balanced.csv",
        "audioset_unbalanced_train": "/as/unbalanced.csv",
        "audioset_eval": "/as/eval.csv",
        "audioset_class_index": "/as/classes.csv",
        "audioset_ontology": "/as/ontology.json",
        "audiocaps_train": "/ac/train.csv",
        "audiocaps_val": "/ac/val.csv",
        "audiocaps_test": "/ac/test.csv",
        "clotho_captions_evaluation": "/clotho/captions.csv",
        "clotho_audio_evaluation": "/clotho/clotho_audio_evaluation.7z",
        "cavmae_checkpoint": "/models/audio_model.21.pth",
        "prefix_pairs": "/prefixDS.json",
    }
    pinned = {"clotho_captions_evaluation", "clotho_audio_evaluation"}
    video = tmp_path / "video.mp4"
    make_video(video)
    workdir = tmp_path / "work"
    workdir.mkdir()
    shutil.copy(REPO / "config.yaml", workdir / "config.yaml")
    targets = ["data/prefix/pairs.csv", "data/clotho/evaluation", "data/audiocaps/clips"]
    targets += ["data/models/cav-mae-scale++.pth", "data/models/fense/bert-base-uncased"]
    with serve(files) as host, serve_videos(video.read_bytes(), {"prefixGone1": "missing"}) as yt:
        fetch_config = {
            name: {"url": host.url(path)} | ({"md5": md5(files[path])} if name in pinned else {})
            for name, path in names.items()
        }
        # a model as the files of its folder (fetch_folder)
        fetch_config["fense_echecker_encoder"] = {
            "url": host.url("/hf/bert/resolve/main/"),
            "files": ["config.json", "vocab.txt"],
        }
        overlay = workdir / "local.yaml"
        overlay.write_text(yaml.safe_dump({
            "fetch": fetch_config,
            "acquire": {"audioset": {"url_template": yt.url_template, "height": 120,
                                     "retries": 1, "backoff_s": 0.1, "rate_limit": 0}},
        }))  # fmt: skip
        configs = ["--configfile", str(REPO / "configs/paper.yaml"), str(overlay)]
        snakemake_in(workdir, *targets, *configs)
        plan = snakemake_in(workdir, *configs, "-n")  # the whole paper graph, nothing runs
        served = [path for path, _ in host.requests]
    data = workdir / "data"
    # downloads: each once, where the config wants them; pinned ones checked, others recorded
    assert sorted(served) == sorted(set(served))
    assert (data / "models/cav-mae-scale++.pth").read_bytes() == b"weights"
    record = json.loads((data / "fetch-record.json").read_text())
    assert set(record) == {host.url(p) for p in served} - {host.url(names[n]) for n in pinned}
    assert (data / "models/fense/bert-base-uncased/vocab.txt").read_bytes() == b"[PAD]\n[UNK]\n"
    assert host.url("/hf/bert/resolve/main/config.json") in record
    assert not any(host.url(names[n]) in record for n in pinned)
    assert not list(data.rglob("*.part"))
    # Clotho: the archive's evaluation/ folder is the media folder
    assert (data / "clotho/evaluation/Santa Motor.wav").read_bytes() == b"RIFF-not-really"
    # AudioCaps test clips, under the clip ids evaluation looks for
    with open(data / "audiocaps/clips/manifest.csv", newline="") as f:
        status = {row["clip_id"]: row["status"] for row in csv.DictReader(f)}
    assert status == {"acTestClip1_0": "ok", "acTestClip2_4000": "ok"}
    # prefix pairs: the clip found through AudioCaps train; the gone one and the unknown one out
    with open(data / "prefix/pairs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows == [{"image": "frames/prefixClip1_2000.jpg", "caption": "A dog barks",
                     "id": "prefixClip1_2000"}]  # fmt: skip
    assert (data / "prefix/frames/prefixClip1_2000.jpg").stat().st_size > 0
    summary = json.loads((data / "prefix/pairs.summary.json").read_text())
    assert summary["pairs"] == 1 and "prefixGone1_3000" in summary["left_out"][0]
    # the paper graph now fetches only what these targets did not need, and makes nothing
    # of the inputs that exist (no rule is defined for an input that exists)
    jobs = set(re.findall(r"^(?:local)?rule (\w+):$", plan, re.M))
    assert {"audioset_select", "align", "evaluate"} <= jobs
    assert not jobs & {"unpack_clotho_audio", "audiocaps_download", "prefix_pairs"}
    fetch_jobs = re.findall(r"^(?:local)?rule fetch:\n\s+output: (\S+)$", plan, re.M)
    assert sorted(fetch_jobs) == [
        "data/audiocaps/val.csv",
        "data/audioset/class_labels_indices.csv",
        "data/audioset/ontology.json",
        "data/clotho/clotho_captions_evaluation.csv",
        "data/models/fense/echecker_clotho_audiocaps_base.ckpt",
        "data/models/stanford-corenlp-full-2015-12-09.zip",
    ]


# ----------------------------------------------------------------------------- CoreNLP for SPICE


def corenlp_zip(jars: dict[str, bytes], release: str = assets.CORENLP_RELEASE) -> bytes:
    """A release zip as Stanford's is laid out: everything under one folder, the jars in it
    (here fake ones: the extraction and the checksum are tested, not Java)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr(f"{release}/README.txt", "Stanford CoreNLP\n")
        for name, data in jars.items():
            zf.writestr(f"{release}/{name}", data)
    return buffer.getvalue()


FAKE_JARS = {name: f"jar {name}".encode() for name in assets.CORENLP_JARS}


def test_the_jars_are_extracted_into_a_folder_that_appears_complete(tmp_path):
    archive = tmp_path / "corenlp.zip"
    archive.write_bytes(corenlp_zip(FAKE_JARS))
    dest = tmp_path / "models" / "corenlp"
    assert assets.main(["--archive", str(archive), "--dest", str(dest)]) == 0
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == FAKE_JARS
    assert assets.spice_missing_reason(dest) in (
        None,
        "java not found on PATH (SPICE needs Java 8+)",
    )
    # a zip without the models jar: an error naming the archive and the jar, and no folder
    archive.write_bytes(corenlp_zip({assets.CORENLP_JARS[0]: b"jar"}))
    other = tmp_path / "other"
    assert assets.main(["--archive", str(archive), "--dest", str(other)]) == 1
    assert not other.exists() and not list(tmp_path.glob(".other*"))
    with pytest.raises(FileNotFoundError, match=assets.CORENLP_JARS[1]):
        assets.extract_to_folder(archive, other)
    archive.write_bytes(b"<html>not a zip</html>")
    with pytest.raises(ValueError, match="not a zip"):
        assets.extract_to_folder(archive, other)


def test_spice_runs_with_the_jars_of_the_configured_folder(tmp_path):
    """SPICE's class path names the configured folder's jars and the installed SPICE jar;
    missing jars are named with the config key that points at them."""
    command = assets.spice_command(tmp_path, tmp_path / "in.json", tmp_path / "out.json")
    classpath = command[command.index("-cp") + 1].split(":")
    assert classpath[0].endswith("spice-1.0.jar")
    assert classpath[1:] == [str(tmp_path.resolve() / name) for name in assets.CORENLP_JARS]
    assert "-cache" not in command  # nothing written beside the installed jar
    if shutil.which("java"):
        reason = assets.spice_missing_reason(tmp_path)
        assert "evaluate.corenlp" in reason and assets.CORENLP_JARS[0] in reason


@pytest.fixture
def tiny_hub_repo(tmp_path):
    return tiny_gpt2_files(tmp_path / "tiny-gpt2")


def test_the_workflow_fetches_corenlp_and_a_hub_model(tmp_path, tiny_hub_repo):
    """configs/paper.yaml with fetch.corenlp and fetch.hf_models pointed at 127.0.0.1: the
    `fetch` and `corenlp_jars` rules make evaluate.corenlp (the zip's checksum recorded), and
    `fetch_hf_model` puts filter.gpt2 into the cache at its pinned revision."""
    import os

    import yaml

    paper = yaml.safe_load((REPO / "configs" / "paper.yaml").read_text())
    gpt2_revision = paper["filter"]["gpt2_revision"]
    workdir = tmp_path / "work"
    workdir.mkdir()
    shutil.copy(REPO / "config.yaml", workdir / "config.yaml")
    cache = tmp_path / "hf-cache"
    marker = cache / f"dalipipe-gpt2-{gpt2_revision}.done"
    zip_bytes = corenlp_zip(FAKE_JARS)
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",  # as exported for the jobs: the fetch rule goes online anyway
    }
    workflow = ["--cores", "2", "-s", str(SNAKEFILE), "-d", str(workdir)]
    configs = ["--configfile", str(REPO / "configs/paper.yaml"), "local.yaml"]
    with (
        serve({"/corenlp.zip": zip_bytes}) as host,
        serving(HubServer({"gpt2": (gpt2_revision, tiny_hub_repo)})) as hub,
    ):
        fetch_config = {
            "corenlp": {"url": host.url("/corenlp.zip")},
            "hf_models": {"url": hub.endpoint},
        }
        (workdir / "local.yaml").write_text(yaml.safe_dump({"fetch": fetch_config}))
        done = snakemake(
            *workflow, "data/models/corenlp", str(marker), *configs,
            cwd=workdir, env=workflow_env(env), timeout=900,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        served = [path for path, _ in host.requests]
        # the paper graph now: no job fetches them again, the stages read what is there
        plan = snakemake(*workflow, "-n", *configs, cwd=workdir, env=workflow_env(env), timeout=900)
        assert plan.returncode == 0, plan.stdout[-3000:] + plan.stderr[-3000:]
    jobs = set(re.findall(r"^(?:local)?rule (\w+):$", plan.stdout, re.M))
    assert "filter_part" in jobs and "evaluate" in jobs and "corenlp_jars" not in jobs
    assert f"output: {marker}" not in plan.stdout and f", {marker}" in plan.stdout  # an input
    assert "fetch_hf_model" in jobs  # LLaVA and BLIP-2, not in this cache
    assert served == ["/corenlp.zip"]  # once
    jars = workdir / "data" / "models" / "corenlp"
    assert {p.name: p.read_bytes() for p in jars.glob("*.jar")} == FAKE_JARS
    record = json.loads((workdir / "data" / "fetch-record.json").read_text())
    assert record[host.url("/corenlp.zip")]["sha256"] == hashlib.sha256(zip_bytes).hexdigest()
    assert json.loads(marker.read_text())["revision"] == gpt2_revision
    from dalipipe.data.hf_cache import snapshot_complete

    assert snapshot_complete(cache, "gpt2", gpt2_revision)
