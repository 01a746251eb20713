"""Sharing a trained captioner: `dalipipe export` writes a self-contained folder with a model card,
and a Hub id `owner/name@revision` loads it (and its base LLaVA) through the local Hub stand-in
of tests/test_hf_cache.py, then from the cache with no network. Every path gives the captions
`dalipipe caption` gave before (tests/test_describe_api.py).

    pytest tests/test_describe_share.py -x -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dalipipe.describe.export import export
from dalipipe.evaluate import tables
from tests.support.describe import BEFORE, FEATURES, TOKENS, VIDEO, WAV16K, write_model
from tests.support.hub import HubServer
from tests.support.video_host import serving

BASE_ID, BASE_COMMIT = "dalipipe-test/tiny-llava", "1" * 40
MODEL_ID, MODEL_COMMIT = "dalipipe-test/tiny-dali", "2" * 40

pytestmark = pytest.mark.skipif(not VIDEO.exists(), reason="shared data clips missing")


@pytest.fixture(scope="module")
def run(tiny_models, tmp_path_factory) -> Path:
    """results/<run>/ with a distilled ot_att and the evaluation table of two datasets."""
    root = tmp_path_factory.mktemp("results") / "miniature"
    model = write_model(root / "distill" / "ot_att", tiny_models, {"features": FEATURES})
    info = json.loads((model / "captioner.json").read_text())
    # as stage distill records a local base: relative to the model's folder
    info["base"] = os.path.relpath(tiny_models.llava, model)
    (model / "captioner.json").write_text(json.dumps(info))
    cols = tables.columns(world=False)
    for dataset, meteor in [("audiocaps", 0.125), ("clotho", 0.0625)]:
        rows = [
            {"system": "ot_att_distilled", "method": "ot_att", "modality": "audio",
             "distilled": True, "decoding": "sampled T=0.2 top-k 50 seed 0", "meteor": meteor,
             "cider_d": 0.5, "spice": None},
            {"system": "mmd_distilled", "method": "mmd", "modality": "audio", "distilled": True,
             "decoding": "greedy", "meteor": 0.9},
        ]  # fmt: skip
        (root / "evaluate" / dataset).mkdir(parents=True)
        tables.write_csv(root / "evaluate" / dataset / "table.csv", rows, cols)
    return root


def card_block(folder: Path) -> dict:
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_export_bundles_a_local_base_and_writes_a_card_with_the_runs_scores(run, tmp_path):
    out = tmp_path / "shared"
    info = export(run / "distill" / "ot_att", out, name="someone/tiny-dali")
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "audio_encoder.json", "audio_encoder.safetensors",
        "audio_projector.safetensors", "base", "captioner.json", "prefix.safetensors",
    ]  # fmt: skip
    assert (info["base"], info["revision"]) == ("base", None)
    assert (out / "base" / "config.json").is_file()
    block = card_block(out)
    assert block["license"] == "cc-by-nc-4.0" and block["datasets"] == ["audiocaps", "clotho"]
    assert block["metrics"] == ["meteor", "cider_d"]  # spice was not computed
    [index] = block["model-index"]
    assert index["name"] == "someone/tiny-dali"
    assert [r["dataset"]["name"] for r in index["results"]] == ["audiocaps", "clotho"]
    assert index["results"][0]["metrics"] == [
        {"type": "meteor", "name": "METEOR (sampled T=0.2 top-k 50 seed 0)", "value": 0.125},
        {"type": "cider_d", "name": "CIDEr-D (sampled T=0.2 top-k 50 seed 0)", "value": 0.5},
    ]
    text = (out / "README.md").read_text()
    assert (
        "| audiocaps | ot_att_distilled | audio | sampled T=0.2 top-k 50 seed 0 | 0.1250 |" in text
    )
    assert "mmd_distilled" not in text and str(run) not in text  # no path of this machine

    from dalipipe import Captioner

    moved = tmp_path / "elsewhere"
    out.rename(moved)  # self-contained: it loads wherever it lies
    records = Captioner.load(moved, device="cpu").caption(list(BEFORE), max_new_tokens=TOKENS)
    assert [r.caption for r in records] == list(BEFORE.values())


def test_export_refuses_what_others_could_not_load(run, tmp_path, capsys):
    from dalipipe.describe import export as command

    model = run / "distill" / "ot_att"
    assert command.main(["--model", str(model), "--out", str(tmp_path / "a"),
                         "--base-id", "owner/name"]) == 2  # fmt: skip
    assert "expected owner/name@revision" in capsys.readouterr().err
    hub_based = tmp_path / "hub-based"
    hub_based.mkdir()
    info = json.loads((model / "captioner.json").read_text()) | {"base": "llava-hf/x"}
    (hub_based / "captioner.json").write_text(json.dumps(info))
    assert command.main(["--model", str(hub_based), "--out", str(tmp_path / "b")]) == 2
    assert "has no pinned revision" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def repo_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_hub_id_is_fetched_at_its_revision_then_loaded_offline(run, tiny_models, tmp_path):
    from dalipipe import Captioner

    shared = tmp_path / "shared"
    export(run / "distill" / "ot_att", shared, base_id=f"{BASE_ID}@{BASE_COMMIT}")
    assert json.loads((shared / "captioner.json").read_text())["base"] == BASE_ID
    repos = {
        BASE_ID: (BASE_COMMIT, repo_files(Path(tiny_models.llava))),
        MODEL_ID: (MODEL_COMMIT, repo_files(shared)),
    }
    cache = tmp_path / "hub"
    with serving(HubServer(repos)) as hub:
        captioner = Captioner.load(
            f"{MODEL_ID}@{MODEL_COMMIT}", device="cpu", cache=cache, endpoint=hub.endpoint
        )
        served = hub.served_files()
    assert f"{MODEL_COMMIT}/captioner.json" in served and f"{BASE_COMMIT}/config.json" in served
    records = captioner.caption(list(BEFORE), max_new_tokens=TOKENS)
    assert [r.caption for r in records] == list(BEFORE.values())

    # the server is gone: the command line finds both models in the cache
    env = {k: v for k, v in os.environ.items() if k != "HF_ENDPOINT"}
    env |= {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [sys.executable, "-m", "dalipipe.cli", "caption", str(WAV16K), "--json"]
    command += ["--model", f"{MODEL_ID}@{MODEL_COMMIT}", "--device", "cpu"]
    out = subprocess.run(
        [*command, "--max-new-tokens", str(TOKENS)], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["caption"] == BEFORE[WAV16K]


def test_an_unknown_hub_id_is_one_clear_error(tmp_path, capsys):
    from dalipipe.describe.caption import main

    with serving(HubServer({})) as hub:
        os.environ["HF_ENDPOINT"] = hub.endpoint
        try:
            code = main([str(WAV16K), "--model", "nobody/nothing@main", "--device", "cpu"])
        finally:
            del os.environ["HF_ENDPOINT"]
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("dalipipe caption: error: --model nobody/nothing@main: model ")
    assert "did not give it" in err
