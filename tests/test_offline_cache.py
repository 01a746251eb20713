"""Every stage loads a hub captioner at its pinned revision from an offline Hugging Face cache.

    pytest tests/test_offline_cache.py -m slow      # ~3 min on 2 cores

docs/cluster.md fills compute nodes' caches with `hf download ID --revision <commit>` and then
runs with `HF_HUB_OFFLINE=1`. A cache filled that way holds `snapshots/<commit>/` and no
`refs/main`, so a stage that loads the model without the configured revision cannot find it
offline (and, with network, would silently load `main`). Here a tiny LLaVA is laid out exactly
like that under a hub id, and the CI preset runs with `models.captioner` and `filter.captioner`
set to that id at that commit: the filter (a LLaVA captioner), prefix, align, pseudolabel,
distill and evaluate jobs, then `dalipipe caption` on the distilled model, must all load it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support.snakemake import SNAKEFILE, snakemake, workflow_env

REPO = Path(__file__).resolve().parents[1]
HUB_ID = "dalipipe-test/tiny-llava"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def lay_out_as_hf_download(model_dir: Path, cache: Path, repo_id: str, commit: str) -> Path:
    """Copy a save_pretrained folder into `cache` as `hf download --revision <commit>` leaves it:
    content-addressed blobs, a snapshot of symlinks at the commit, and no refs/ (a commit hash is
    not a ref, so huggingface_hub writes none)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / path.relative_to(model_dir)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return repo


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    from dalipipe.testing.checkpoints import make_tiny_llava

    root = tmp_path_factory.mktemp("offline-cache")
    # the CI preset's widths: 64-wide image tokens (models.audio_encoder.out_dim)
    model = make_tiny_llava(
        root / "model", vision_hidden=64, text_hidden=64, text_layers=1, text_heads=2
    )
    cache = root / "hub"
    repo = lay_out_as_hf_download(model, cache, HUB_ID, COMMIT)
    assert not (repo / "refs").exists()

    workdir = root / "work"
    workdir.mkdir()
    pinned = {"captioner": HUB_ID, "captioner_revision": COMMIT}
    overlay = {
        "run": "offline",
        "models": pinned,
        "filter": {**pinned, "llava_template": "plain"},
    }
    (workdir / "offline.yaml").write_text(yaml.safe_dump(overlay))
    (workdir / "config.yaml").write_text((REPO / "config.yaml").read_text())
    env = workflow_env(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    configs = [str(REPO / "configs" / "ci.yaml"), "offline.yaml"]
    result = snakemake(
        "--cores", "2", "-s", str(SNAKEFILE), "-d", str(workdir),
        "--configfile", *configs, "--show-failed-logs",
        cwd=workdir, env=env, timeout=1800,
    )  # fmt: skip
    return workdir, env, result


@pytest.mark.slow
def test_every_stage_loads_the_pinned_revision_offline(offline_run):
    workdir, _, result = offline_run
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    results = workdir / "results" / "offline"
    # the hub captioner replaces the bootstrap one: nothing trained a local LLaVA
    assert not (results / "models" / "llava").exists()
    for done in (
        "filter/kept.txt",
        "prefix/prefix.safetensors",
        "align/mmd/audio_encoder.safetensors",
        "align/ot/audio_encoder.safetensors",
        "pseudolabel/mmd.jsonl",
        "distill/mmd/captioner.json",
        "evaluate/miniature/table.csv",
    ):
        assert (results / done).exists(), done
    info = yaml.safe_load((results / "distill" / "mmd" / "captioner.json").read_text())
    assert (info["base"], info["revision"]) == (HUB_ID, COMMIT)


@pytest.mark.slow
def test_caption_command_loads_the_distilled_model_offline(offline_run):
    workdir, env, result = offline_run
    assert result.returncode == 0, result.stderr[-4000:]
    clip = next((workdir / "results" / "offline" / "acquire").rglob("*.mp4"))
    model = workdir / "results" / "offline" / "distill" / "mmd"
    done = subprocess.run(
        ["dalipipe", "caption", str(clip), "--model", str(model), "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert row["file"] == str(clip) and isinstance(row["caption"], str)
