"""Faults injected for real: each ends with a non-zero exit, a message naming the file or the
setting, and nothing left that looks finished. pytest tests/test_faults.py -x -q

- a full disk (a small tmpfs, filled part-way and filled beforehand), a read-only filesystem:
  need root and mount; skipped with the reason where the machine refuses them;
- the file size limit (RLIMIT_FSIZE) in ffmpeg and in Python, and a part whose clips mostly
  fail: need nothing special;
- shards cut at a member header, cut mid-member, emptied or with one byte changed, read by the
  training reader, the evaluation reader and `dalipipe align`;
- `dalipipe align` killed by SIGKILL after its first checkpoint, then rerun: the same bytes as
  an uninterrupted run.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dalipipe.data.ffmpeg import ffmpeg_exe
from dalipipe.data.manifest import EXTRACT_FIELDS, write_manifest
from dalipipe.data.shard import write_split
from dalipipe.data.shard_reader import ShardError, ShardReader, iter_raw_samples
from dalipipe.faults import MachineFault, fault_in_text, machine_fault

N_CLIPS = 16
CLIP_SECONDS = 4  # 128 kB of PCM and as much WAV per clip: 16 clips need ~4.5 MB
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def dalipipe(*args: str, preexec_fn=None, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dalipipe.cli", *args],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=preexec_fn,
    )


def leftovers(directory: Path) -> list[str]:
    """What a stopped stage left in ``directory``: its output or a temporary sibling."""
    return sorted(p.name for p in directory.iterdir() if "part-0" in p.name)


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    """A folder of N_CLIPS real video clips (MJPEG + PCM in AVI: cheap to make)."""
    folder = tmp_path_factory.mktemp("media")
    first = folder / "clip00.avi"
    subprocess.run(
        [ffmpeg_exe(), "-loglevel", "error", "-f", "lavfi", "-i",
         f"testsrc=size=96x64:rate=5:duration={CLIP_SECONDS}", "-f", "lavfi", "-i",
         f"sine=frequency=440:duration={CLIP_SECONDS}", "-c:v", "mjpeg", "-c:a", "pcm_s16le",
         "-shortest", str(first)],
        check=True,
    )  # fmt: skip
    for i in range(1, N_CLIPS):
        shutil.copyfile(first, folder / f"clip{i:02d}.avi")
    return folder


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size, *options) -> a fresh tmpfs of that size; unmounted after the test."""
    mounted = []

    def mount(size: str, name: str = "disk") -> Path:
        point = tmp_path / name
        point.mkdir()
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=True)


def remount(point: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(point)], check=True)


# ------------------------------------------------------------------- machine faults in extract


def test_a_disk_that_fills_up_stops_extract_and_the_rerun_redoes_the_part(media, tmpfs):
    disk = tmpfs("1m")
    out = disk / "part-0"
    result = dalipipe("extract", str(media), "--out", str(out))
    assert result.returncode == 1, result.stderr[-3000:]
    assert "No space left on device" in result.stderr and f"{out} was not written" in result.stderr
    assert "free space" in result.stderr  # what to do
    assert leftovers(disk) == []  # no part, no temporary directory

    remount(disk, "size=32m")  # space freed: the same command now extracts every clip
    result = dalipipe("extract", str(media), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "manifest.csv")))
    assert [r["status"] for r in rows] == ["ok"] * N_CLIPS
    assert leftovers(disk) == ["part-0"]


def test_a_full_disk_stops_extract_before_any_clip(media, tmpfs):
    disk = tmpfs("1m")
    with open(disk / "filler", "wb") as f, pytest.raises(OSError) as full:
        while True:
            f.write(b"\0" * 65536)
            f.flush()
    assert full.value.errno == errno.ENOSPC
    result = dalipipe("extract", str(media), "--out", str(disk / "part-0"))
    assert result.returncode == 1, result.stderr[-3000:]
    assert "No space left on device" in result.stderr and str(disk) in result.stderr
    assert "extracted 0 of" not in result.stderr
    assert leftovers(disk) == []


def test_a_read_only_filesystem_stops_extract(media, tmpfs):
    disk = tmpfs("8m")
    remount(disk, "ro")
    result = dalipipe("extract", str(media), "--out", str(disk / "part-0"))
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Read-only file system" in result.stderr and str(disk / "part-0") in result.stderr
    assert "Traceback" not in result.stderr
    assert leftovers(disk) == []


@pytest.mark.parametrize(
    "limit, words",
    [
        (60_000, "ffmpeg exceeded the file size limit (SIGXFSZ)"),  # ffmpeg's PCM output
        (128_010, "File too large"),  # ffmpeg's PCM fits; Python's audio.wav (+44 bytes) does not
    ],
)
def test_the_file_size_limit_stops_extract(media, tmp_path, limit, words):
    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = dalipipe("extract", str(media), "--out", str(tmp_path / "part-0"), preexec_fn=limited)
    assert result.returncode == 1, result.stderr[-3000:]
    assert words in result.stderr and "ulimit -f" in result.stderr
    assert str(tmp_path / "part-0") in result.stderr
    assert leftovers(tmp_path) == []


def test_a_part_whose_clips_mostly_fail_stops_extract_naming_the_setting(media, tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    shutil.copyfile(media / "clip00.avi", source / "good.avi")
    for name in ("broken1.mp4", "broken2.mp4", "broken3.mp4"):
        (source / name).write_bytes(b"not a video at all" * 64)
    result = dalipipe("extract", str(source), "--out", str(tmp_path / "part-0"))
    assert result.returncode == 1, result.stderr[-3000:]
    assert "3 of 4 clips failed" in result.stderr
    assert "extract.max_failed_fraction 0.5" in result.stderr
    assert "commonest reasons: 3 x " in result.stderr  # one cause, its file names taken out
    assert leftovers(tmp_path) == []

    params = json.dumps({"extract": {"max_failed_fraction": 0.75}})  # the setting is read
    result = dalipipe("extract", str(source), "--out", str(tmp_path / "part-0"), "--params", params)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {
        r["clip_id"]: r["status"] for r in csv.DictReader(open(tmp_path / "part-0/manifest.csv"))
    }
    assert rows == {"broken1": "failed", "broken2": "failed", "broken3": "failed", "good": "ok"}


def test_what_a_killed_writer_left_is_removed_by_the_next_one(tmp_path):
    from dalipipe.common import atomic_path

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".part-0.tmp-{dead.pid}"  # as a SIGKILLed extract leaves it
    (stale / "clip").mkdir(parents=True)
    alive = tmp_path / f".part-0.tmp-{os.getppid()}"  # a running writer's: kept
    alive.mkdir()
    with atomic_path(tmp_path / "part-0", directory=True) as tmp:
        (tmp / "manifest.csv").write_text("clip_id\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == [alive.name, "part-0"]


def test_machine_fault_tells_the_machine_from_the_input(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(FileNotFoundError) as missing_input:
        open(tmp_path / "no-such-clip.mp4", "rb")
    assert machine_fault(missing_input.value, out) is None  # an input's problem
    shutil.rmtree(out)
    with pytest.raises(FileNotFoundError) as vanished:
        open(out / "clip" / "audio.wav", "wb")
    fault = machine_fault(vanished.value, out)  # the output directory itself is gone
    assert isinstance(fault, MachineFault) and fault.where == str(out / "clip" / "audio.wav")
    assert "restore it" in str(fault)
    wrapped = RuntimeError("while writing")
    wrapped.__cause__ = OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), "/q/x")
    assert machine_fault(wrapped, out).where == "/q/x"
    assert machine_fault(MemoryError(), out).cause == "out of memory"
    assert machine_fault(ValueError("corrupt header"), out) is None
    line = f"[out#0/image2] {out}/c/frame_00.jpg: Permission denied"
    assert fault_in_text(line, out).cause == line
    assert fault_in_text("[in] /media/x.mp4: Permission denied", out) is None  # input side


# ------------------------------------------------------------------------------------ shards

FRAME = 32  # the tiny LLaVA's frames
FBANK_SHAPE = (64, 32)  # the tiny CAV-MAE's input: target_length x num_mel_bins
ENCODER = dict(
    num_mel_bins=32, target_length=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, out_dim=32
)


def make_split(root: Path, split: str, n: int, per_shard: int, seed: int) -> Path:
    """Extracted clips -> the shard stage's writer: a real shard directory with index.json."""
    rng = np.random.default_rng(seed)
    part = root / f"extract-{split}"
    rows, metadata = [], []
    for i in range(n):
        clip_id = f"{split}-{i:03d}"
        colour = rng.integers(0, 256, 3)
        (part / clip_id).mkdir(parents=True)
        for k in range(3):
            frame = np.broadcast_to(colour, (FRAME, FRAME, 3)).astype(np.uint8)
            Image.fromarray(frame).save(part / clip_id / f"frame_{k:02d}.jpg")
        fbank = rng.normal(size=FBANK_SHAPE) + colour[0] / 128.0  # audio follows the look
        np.save(part / clip_id / "fbank.npy", fbank.astype(np.float16))
        rows.append({"clip_id": clip_id, "status": "ok", "reason": "", "n_frames": 3})
        metadata.append({"clip_id": clip_id, "split": split, "labels": ["dog"], "start_s": 0.0})
    write_manifest(part / "manifest.csv", rows, EXTRACT_FIELDS)
    (root / f"{split}.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metadata))
    out = root / "shards" / split
    write_split([part], root / f"{split}.jsonl", split, out, samples_per_shard=per_shard)
    return out


@pytest.fixture
def shards(tmp_path) -> Path:
    return make_split(tmp_path, "test", 6, 3, seed=0)  # two shards of three clips


def member_offsets(tar_path: Path) -> list[tuple[str, int, int]]:
    """(name, header offset, data offset) of every member."""
    with tarfile.open(tar_path) as tar:
        return [(m.name, m.offset, m.offset_data) for m in tar.getmembers()]


def cut(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def forget_sizes(shard_dir: Path) -> None:
    """The index as shards written before it held size and sha256: only the count is left."""
    index = json.loads((shard_dir / "index.json").read_text())
    for entry in index["shards"]:
        del entry["bytes"], entry["sha256"]
    (shard_dir / "index.json").write_text(json.dumps(index))


def at_header_of_third_sample(tar_path: Path) -> int:
    return next(head for name, head, _ in member_offsets(tar_path) if name.startswith("test-002"))


def test_the_index_records_count_size_and_checksum_of_every_shard(shards):
    index = json.loads((shards / "index.json").read_text())
    assert [(e["file"], e["count"]) for e in index["shards"]] == [
        ("test-000000.tar", 3),
        ("test-000001.tar", 3),
    ]
    for entry in index["shards"]:
        assert entry["bytes"] == (shards / entry["file"]).stat().st_size
        assert len(entry["sha256"]) == 64
    assert [s["clip_id"] for s in ShardReader(shards)] == [f"test-{i:03d}" for i in range(6)]


def test_a_shard_cut_at_a_header_stops_the_reader_before_any_sample(shards):
    tar = shards / "test-000000.tar"
    cut(tar, at_header_of_third_sample(tar))
    with pytest.raises(ShardError, match=f"{tar}: .* bytes where its index.json records"):
        ShardReader(shards)


def test_a_shard_cut_at_a_header_is_found_by_its_count_in_an_older_index(shards):
    from dalipipe.evaluate.datasets import read_shard_dir

    tar = shards / "test-000000.tar"
    cut(tar, at_header_of_third_sample(tar))
    forget_sizes(shards)
    with tarfile.open(tar) as intact_looking:  # what the reader used to accept: a smaller tar
        assert len({m.name.split(".")[0] for m in intact_looking}) == 2
    message = f"{tar}: 2 samples where its index.json records 3: cut short"
    with pytest.raises(ShardError, match=message):
        list(ShardReader(shards))
    with pytest.raises(ShardError, match=message):  # evaluation's reader
        read_shard_dir(shards)


@pytest.mark.parametrize("where", ["mid-member", "empty"])
def test_a_shard_cut_mid_member_or_empty_names_the_shard(shards, where):
    tar = shards / "test-000001.tar"
    _, _, data = member_offsets(tar)[2]
    cut(tar, data + 10 if where == "mid-member" else 0)
    with pytest.raises(ShardError, match=f"{tar}: .* bytes where"):
        ShardReader(shards)
    forget_sizes(shards)
    with pytest.raises(ShardError, match=f"{tar}: not a readable tar shard"):
        list(ShardReader(shards))


def test_a_changed_byte_fails_the_checksum(shards):
    tar = shards / "test-000000.tar"
    _, _, data = member_offsets(tar)[0]  # inside the first JPEG
    with open(tar, "r+b") as f:
        f.seek(data + 200)
        byte = f.read(1)
        f.seek(data + 200)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ShardError, match=f"{tar}: sha256 differs from its index.json's"):
        list(iter_raw_samples(tar))


# ------------------------------------------------------------------------ a training stage


@pytest.fixture(scope="module")
def align_world(tmp_path_factory):
    from dalipipe.testing.checkpoints import make_tiny_llava

    root = tmp_path_factory.mktemp("align-world")
    return {
        "train": make_split(root, "align", 8, 4, seed=1),
        "val": make_split(root, "test", 4, 4, seed=2),
        "llava": make_tiny_llava(root / "llava"),
    }


def align_command(world, out: Path, train: Path | None = None) -> list[str]:
    settings = {"batch_size": 4, "epochs": 2, "lr": 1e-3, "lr_milestones": [1]}
    settings |= {"checkpoint_every": 1, "frame": "random"}  # 4 steps, 4 checkpoints
    params = {"seed": 0, "device": "cpu", "align": settings, "models": {"audio_encoder": ENCODER}}
    return [
        "align", "--params", json.dumps(params), "--method", "mmd",
        "--shards", str(train or world["train"]), "--val-shards", str(world["val"]),
        "--captioner", str(world["llava"]), "--out", str(out),
    ]  # fmt: skip


def test_a_cut_training_shard_stops_align_naming_it(align_world, tmp_path):
    train = tmp_path / "train"
    shutil.copytree(align_world["train"], train)
    tar = train / "align-000001.tar"
    cut(tar, next(h for n, h, _ in member_offsets(tar) if n.startswith("align-006")))
    out = tmp_path / "mmd"
    result = dalipipe(*align_command(align_world, out, train))
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"{tar}: " in result.stderr and "bytes where its index.json records" in result.stderr
    assert not out.exists() and not Path(f"{out}.ckpt").exists()


@pytest.mark.slow
def test_align_killed_by_sigkill_then_rerun_writes_the_same_bytes(align_world, tmp_path):
    reference = tmp_path / "uninterrupted"
    result = dalipipe(*align_command(align_world, reference))
    assert result.returncode == 0, result.stderr[-3000:]

    out = tmp_path / "killed"
    job = subprocess.Popen(
        [sys.executable, "-m", "dalipipe.cli", *align_command(align_world, out)],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    state = Path(f"{out}.ckpt") / "latest" / "state.json"
    deadline = time.time() + 900
    while not state.exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    job.send_signal(signal.SIGKILL)  # no handler runs: the last checkpoint is all there is
    assert job.wait(timeout=60) == -signal.SIGKILL
    assert not out.exists()  # nothing that looks finished

    result = dalipipe(*align_command(align_world, out))  # resumes from the checkpoint
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resum" in result.stderr.lower()
    assert not Path(f"{out}.ckpt").exists()
    for name in ("audio_encoder.safetensors", "audio_encoder.json"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name

    def without_clock(directory: Path) -> list[dict]:
        return [
            {k: v for k, v in row.items() if k != "seconds"}
            for row in csv.DictReader(open(directory / "curve.csv"))
        ]

    assert without_clock(out) == without_clock(reference)


# ----------------------------------------------------------------------------------- acquire


def test_a_full_disk_stops_acquire_instead_of_recording_failed_downloads(tmpfs):
    from dalipipe.data import download
    from dalipipe.data.audioset import Segment
    from tests.support.video_host import make_video, serve_videos

    disk = tmpfs("64k")  # the journal fits, a clip does not
    video = disk.parent / "video.mp4"
    make_video(video)
    segments = [
        Segment(f"goodVideo0{i}_5000", f"goodVideo0{i}", 5.0, 15.0, ["/m/05tny_"], ["Bark"], "x")
        for i in range(1, 4)
    ]
    cfg = {"retries": 0, "backoff_s": 0.05, "rate_limit": 0, "socket_timeout": 5, "height": 240}
    with (
        serve_videos(video.read_bytes(), {}) as host,
        pytest.raises((MachineFault, OSError)) as stop,
    ):
        download.acquire_part(segments, {**cfg, "url_template": host.url_template}, disk / "part-0")
    fault = machine_fault(stop.value, disk)  # what `dalipipe acquire-audioset` reports, exit 1
    assert fault is not None and "No space left on device" in fault.cause
    # yt-dlp's failed download stopped the part (closing the journal may fail after it)
    assert isinstance(stop.value, MachineFault) or isinstance(stop.value.__context__, MachineFault)
    assert not (disk / "part-0").exists()


def test_a_full_disk_stops_the_synthetic_world_instead_of_failing_its_clips(tmpfs):
    disk = tmpfs("1m")  # a few clips fit, not the part
    result = dalipipe("acquire-synthetic", "--out", str(disk / "part-0"))
    assert result.returncode == 1, result.stderr[-3000:]
    assert "No space left on device" in result.stderr and str(disk) in result.stderr
    assert "clips written" not in result.stderr
    assert leftovers(disk) == []
