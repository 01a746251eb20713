"""`dalipipe fetch-hf` fills a Hugging Face cache from a local stand-in for the Hub, and stages
then load the model from it with HF_HUB_OFFLINE=1.

The stand-in (127.0.0.1) speaks the part of the Hub's API that huggingface_hub's
snapshot_download uses: the tree listing of a revision (/api/models/<id>/tree/<rev>), the
revision info of a branch (/api/models/<id>/revision/<rev>), and each file by HEAD and GET
(/<id>/resolve/<rev>/<file>, with X-Repo-Commit, ETag and Content-Length); an unknown revision
is a 404 with X-Error-Code RevisionNotFound, as the Hub answers.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dalipipe.data import hf_cache
from dalipipe.data.hf_cache import HubModel
from tests.support.hub import HubServer, tiny_gpt2_files
from tests.support.video_host import serving

REPO_ID = "dalipipe-test/tiny-gpt2"
COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory) -> dict[str, bytes]:
    return tiny_gpt2_files(tmp_path_factory.mktemp("tiny") / "gpt2")


def lay_out(files: dict[str, bytes], cache: Path, repo_id: str, commit: str) -> Path:
    """The files in ``cache`` as ``hf download --revision <commit>`` leaves them: blobs and a
    snapshot of links at the commit, no refs/."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return repo


def fetch_hf(cache: Path, marker: Path, endpoint: str, revision: str = COMMIT, **env):
    command = ["dalipipe", "fetch-hf", REPO_ID, "--revision", revision, "--marker", str(marker)]
    command += ["--cache", str(cache), "--key", "filter.gpt2"]
    environment = {
        **os.environ,
        "HF_ENDPOINT": endpoint,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        **env,
    }
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)


def test_a_model_fetched_into_the_cache_loads_offline_at_its_revision(tmp_path, tiny_repo):
    cache, marker = tmp_path / "hub", tmp_path / "hub" / "marker.done"
    with serving(HubServer({REPO_ID: (COMMIT, tiny_repo)})) as hub:
        done = fetch_hf(cache, marker, hub.endpoint)
        assert done.returncode == 0, done.stderr
        fetched = sorted(hub.served_files())
        again = fetch_hf(cache, marker, hub.endpoint)  # a second run: nothing downloaded
        assert again.returncode == 0, again.stderr
        assert sorted(hub.served_files()) == fetched
    wanted = sorted(set(tiny_repo) - {"flax_model.msgpack", "pytorch_model.bin"})
    assert fetched == [f"{COMMIT}/{name}" for name in wanted]
    record = json.loads(marker.read_text())
    assert (record["repo_id"], record["revision"]) == (REPO_ID, COMMIT)
    assert sorted(record["files"]) == wanted
    assert record["files"]["model.safetensors"] == len(tiny_repo["model.safetensors"])
    assert hf_cache.snapshot_complete(cache, REPO_ID, COMMIT)
    # the stage's way of loading it, with no network (HF_HUB_OFFLINE=1, no endpoint)
    load = (
        "import sys, torch\n"
        "from transformers import AutoModel, AutoTokenizer\n"
        f"model = AutoModel.from_pretrained({REPO_ID!r}, revision={COMMIT!r})\n"
        f"tok = AutoTokenizer.from_pretrained({REPO_ID!r}, revision={COMMIT!r})\n"
        "print(len(tok('a dog barks').input_ids), float(model.wte.weight.sum()))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "HF_ENDPOINT"}
    env |= {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", load], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    from safetensors.torch import load as load_safetensors

    weights = load_safetensors(tiny_repo["model.safetensors"])
    n_tokens, wte_sum = out.stdout.split()
    assert int(n_tokens) >= 1
    assert float(wte_sum) == pytest.approx(float(weights["transformer.wte.weight"].sum()), rel=1e-5)


def test_an_unknown_revision_names_the_model_the_revision_and_what_to_do(tmp_path, tiny_repo):
    cache, marker = tmp_path / "hub", tmp_path / "marker.done"
    wrong = "0" * 40
    with serving(HubServer({REPO_ID: (COMMIT, tiny_repo)})) as hub:
        done = fetch_hf(cache, marker, hub.endpoint, revision=wrong)
    assert done.returncode == 1
    message = done.stderr
    assert REPO_ID in message and wrong in message and "filter.gpt2" in message
    assert "hf download" in message and "commits" in message  # what to do
    assert not marker.exists()
    assert not hf_cache.snapshot_complete(cache, REPO_ID, wrong)


def test_no_hub_reachable_is_an_error_naming_the_model_and_the_cache(tmp_path):
    with serving(HubServer({})) as hub:
        endpoint = hub.endpoint  # closed below: nothing listens there any more
    done = fetch_hf(tmp_path / "hub", tmp_path / "m.done", endpoint)
    assert done.returncode == 1
    assert REPO_ID in done.stderr and str(tmp_path / "hub") in done.stderr
    assert "internet" in done.stderr and not (tmp_path / "m.done").exists()


def test_a_cut_download_is_not_complete(tmp_path, tiny_repo):
    """A snapshot that lost its weights (an interrupted download) is fetched again."""
    lay_out(
        {k: v for k, v in tiny_repo.items() if k != "pytorch_model.bin"}, tmp_path, REPO_ID, COMMIT
    )
    assert hf_cache.snapshot_complete(tmp_path, REPO_ID, COMMIT)
    (
        tmp_path / f"models--{REPO_ID.replace('/', '--')}/snapshots/{COMMIT}/model.safetensors"
    ).unlink()
    assert not hf_cache.snapshot_complete(tmp_path, REPO_ID, COMMIT)
    assert not hf_cache.snapshot_complete(tmp_path, REPO_ID, "main")  # no refs/main


def test_hub_models_are_what_the_config_loads_from_the_hub(tmp_path):
    paper = {
        "run": "paper",
        "models": {"captioner": "llava-hf/llava-1.5-7b-hf", "captioner_revision": "a" * 40},
        "filter": {
            "enabled": True,
            "captioner": "Salesforce/blip2-opt-2.7b",
            "captioner_revision": "b" * 40,
            "text_encoder": "gpt2",
            "gpt2": "gpt2",
            "gpt2_revision": None,
        },
    }
    models = hf_cache.hub_models(paper)
    assert [(m.key, m.repo_id, m.revision) for m in models] == [
        ("models.captioner", "llava-hf/llava-1.5-7b-hf", "a" * 40),
        ("filter.captioner", "Salesforce/blip2-opt-2.7b", "b" * 40),
        ("filter.gpt2", "gpt2", "main"),
    ]
    assert models[0].marker(tmp_path).name == f"dalipipe-llava-hf--llava-1.5-7b-hf-{'a' * 40}.done"
    # the miniature: a bootstrap captioner and one under results/; a folder given as the model
    local = tmp_path / "my-llava"
    local.mkdir()
    mini = {
        "run": "miniature",
        "models": {"captioner": str(local)},
        "filter": {
            "enabled": True,
            "captioner": "results/{run}/models/llava",
            "text_encoder": "minilm",
        },
    }
    assert hf_cache.hub_models(mini) == []
    assert hf_cache.hub_models({**paper, "filter": {**paper["filter"], "enabled": False}}) == [
        models[0]
    ]
    # the same model named twice is fetched once
    same = {**paper, "filter": {**paper["filter"], "captioner": "llava-hf/llava-1.5-7b-hf",
                                "captioner_revision": "a" * 40, "text_encoder": "minilm"}}  # fmt: skip
    assert hf_cache.hub_models(same) == [models[0]]


def test_ignore_patterns_keep_the_safetensors_or_else_the_bin():
    assert "pytorch_model*.bin" in hf_cache.ignore_patterns(
        ["model.safetensors", "pytorch_model.bin"]
    )
    assert "pytorch_model*.bin" not in hf_cache.ignore_patterns(
        ["pytorch_model.bin", "config.json"]
    )
    assert HubModel("k", "org/name", "main").name == "org--name-main"
