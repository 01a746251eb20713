"""`snakemake --profile slurm -n` on a fresh copy of the repository shows the whole paper graph.

The copy holds the repository's files only (no data/, no results/, no ../shared), as a fresh
clone does: every input a user would otherwise place by hand must be a job of the graph (the
fetch rules of rules/fetch.smk), not a MissingInputException. A dry run submits nothing, so
this needs no Slurm cluster (the executor plugin is loaded but never asked to submit).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.snakemake import snakemake

REPO = Path(__file__).resolve().parents[1]
# each paper stage, as the rule name or the start of it (extract_part, filter_part/_merge, shard)
PAPER_STAGES = {
    "audioset_select": r"audioset_select",
    "audioset_download": r"audioset_download",
    "extract": r"extract\w*",
    "filter": r"filter\w*",
    "shard": r"shard\w*",
    "prefix": r"prefix",
    "align": r"align",
    "pseudolabel": r"pseudolabel",
    "distill": r"distill",
    "evaluate": r"evaluate",
}
FETCHED = [
    "data/audioset/balanced_train_segments.csv",
    "data/audioset/unbalanced_train_segments.csv",
    "data/audioset/eval_segments.csv",
    "data/audioset/class_labels_indices.csv",
    "data/audioset/ontology.json",
    "data/audiocaps/train.csv",
    "data/audiocaps/val.csv",
    "data/audiocaps/test.csv",
    "data/clotho/clotho_captions_evaluation.csv",
    "data/clotho/clotho_audio_evaluation.7z",
    "data/models/cav-mae-scale++.pth",
    "data/prefix/prefixDS.json",
    "data/models/fense/echecker_clotho_audiocaps_base.ckpt",
    "data/models/stanford-corenlp-full-2015-12-09.zip",
]
# the hub models of configs/paper.yaml, into the Hugging Face cache at their pinned revisions
HUB_MODELS = {
    "llava-hf/llava-1.5-7b-hf": "b234b804b114d9e37bb655e11cbbb5f5e971b7a9",
    "Salesforce/blip2-opt-2.7b": "51572668da0eb669e01a189dc22abe6088589a24",
    "gpt2": "607a30d783dfa663caf39e06633721c8d4cfcd7e",
}
FETCHED_FOLDERS = [  # a model as the files of its folder: FENSE's sentence encoder, BERT config
    "data/models/fense/paraphrase-TinyBERT-L6-v2",
    "data/models/fense/bert-base-uncased",
]
MADE = {  # the inputs that are not plain downloads, and the rule that makes each
    "data/audiocaps/clips": "audiocaps_download",
    "data/clotho/evaluation": "unpack_clotho_audio",
    "data/prefix/pairs.csv": "prefix_pairs",
    "data/models/corenlp": "corenlp_jars",
}


def repository_files() -> list[str]:
    """The files a clone has (tracked, plus new ones not ignored, as in a checkout at work)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return [f for f in listed.split("\0") if f and (REPO / f).is_file()]


@pytest.fixture
def fresh_clone(tmp_path) -> Path:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs git and the repository's .git")
    root = tmp_path / "dalipipe"
    for name in repository_files():
        if name.startswith(("results/", "data/")):
            continue
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, root / name)
    return root


def hub_cache(root: Path) -> Path:
    return root.parent / "hf-cache"


def marker(root: Path, repo_id: str) -> str:
    return f"{hub_cache(root)}/dalipipe-{repo_id.replace('/', '--')}-{HUB_MODELS[repo_id]}.done"


def dry_run(root: Path, *args: str) -> tuple[str, dict[str, int]]:
    # no site settings from the calling shell: the profile's defaults, as on a new cluster
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "DALIPIPE_SLURM"))}
    env["HF_HUB_CACHE"] = str(hub_cache(root))  # an empty cache of the clone's own
    result = snakemake(
        "--profile", "slurm", "-n", *args, cwd=root, env=env, timeout=600, merged=True
    )
    assert result.returncode == 0, result.stdout[-5000:]
    stats = result.stdout.split("Job stats:")[-1].split("Reasons:")[0]
    counts = {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", stats, re.M)}
    return result.stdout, counts


def outputs_of(plan: str, rule: str) -> set[str]:
    blocks = re.findall(rf"^(?:local)?rule {rule}:\n(.*?)(?:\n\n|\Z)", plan, re.M | re.S)
    return {m for b in blocks for m in re.findall(r"^\s+output: (.+)$", b, re.M)}


def inputs_of(plan: str, rule: str) -> set[str]:
    """Every input file of the jobs of ``rule``."""
    blocks = re.findall(rf"^(?:local)?rule {rule}:\n(.*?)(?:\n\n|\Z)", plan, re.M | re.S)
    lines = [m for b in blocks for m in re.findall(r"^\s+input: (.+)$", b, re.M)]
    return {path for line in lines for path in line.split(", ")}


def test_the_paper_graph_of_a_fresh_clone_fetches_every_input(fresh_clone):
    plan, counts = dry_run(fresh_clone)
    for stage, rule in PAPER_STAGES.items():
        jobs = sum(n for name, n in counts.items() if re.fullmatch(rule, name))
        assert jobs >= 1, f"{stage} missing from the plan: {counts}"
    assert counts["audioset_download"] == 100 and counts["align"] == 4
    assert counts["evaluate"] == 2  # AudioCaps and Clotho
    assert outputs_of(plan, "fetch") == set(FETCHED)
    assert outputs_of(plan, "fetch_folder") == set(FETCHED_FOLDERS)
    assert outputs_of(plan, "fetch_hf_model") == {marker(fresh_clone, m) for m in HUB_MODELS}
    for path, rule in MADE.items():
        assert any(path in o for o in outputs_of(plan, rule)), f"{rule} does not make {path}"
    for rule in ("audiocaps_selection", "prefix_selection", "prefix_download"):
        assert counts.get(rule) == 1, rule
    # the published checksums are pinned; the others are recorded at the first download
    assert "--md5 4569624ccadf96223f19cb59fe4f849f" in plan
    assert "--md5 1b16b9e57cf7bdb7f13a13802aeb57e2" in plan
    assert "--sha256 1a719f090af70614bbdb9f9437530b7e133c48cfa4a58d964de0d47fc974a2fa" in plan
    assert "--files modules.json sentence_bert_config.json 1_Pooling/config.json" in plan
    # every stage that loads a hub model waits for it to be in the cache; SPICE for its jars
    for rule in ("prefix", "align", "pseudolabel", "distill", "evaluate"):
        assert marker(fresh_clone, "llava-hf/llava-1.5-7b-hf") in inputs_of(plan, rule), rule
    filter_inputs = inputs_of(plan, "filter_part")
    assert {marker(fresh_clone, m) for m in ("Salesforce/blip2-opt-2.7b", "gpt2")} <= filter_inputs
    assert "data/models/corenlp" in inputs_of(plan, "evaluate")
    assert counts["fetch_hf_model"] == 3 and counts["corenlp_jars"] == 1
    recorded = len(FETCHED) - 3 + len(FETCHED_FOLDERS)
    assert plan.count("--record data/fetch-record.json") == recorded
    assert not (fresh_clone / "data").exists()  # a dry run fetches nothing


def test_a_file_the_user_already_has_is_used_as_it_is(fresh_clone):
    ontology = fresh_clone / "data" / "audioset" / "ontology.json"
    ontology.parent.mkdir(parents=True)
    ontology.write_text("[]\n")
    pairs = fresh_clone / "data" / "prefix" / "pairs.csv"
    pairs.parent.mkdir(parents=True)
    pairs.write_text("image,caption\n")
    for folder in ("data/clotho/evaluation", "data/audiocaps/clips"):  # media of one's own
        (fresh_clone / folder).mkdir(parents=True)
        (fresh_clone / folder / "a.wav").write_bytes(b"RIFF")
    plan, counts = dry_run(fresh_clone)
    # nor what only the prefix pairs and the Clotho audio are made from
    unneeded = {"data/audioset/ontology.json", "data/clotho/clotho_audio_evaluation.7z"}
    unneeded |= {"data/prefix/prefixDS.json", "data/audiocaps/train.csv"}
    assert outputs_of(plan, "fetch") == set(FETCHED) - unneeded
    for rule in ("prefix_selection", "prefix_download", "prefix_pairs", "unpack_clotho_audio"):
        assert rule not in counts
    assert "audiocaps_selection" not in counts and "audiocaps_download" not in counts
    assert counts["evaluate"] == 2
    assert counts["prefix"] == 1 and counts["audioset_select"] == 1


def test_hub_models_and_jars_the_user_already_has_are_used_as_they_are(fresh_clone):
    """A cache holding GPT-2 at its revision (filled by `hf download`: no marker) and CoreNLP's
    jars in place: no job fetches them, and no stage waits for a marker."""
    snapshot = hub_cache(fresh_clone) / "models--gpt2" / "snapshots" / HUB_MODELS["gpt2"]
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot / "model.safetensors").write_bytes(b"weights")
    (fresh_clone / "data" / "models" / "corenlp").mkdir(parents=True)
    plan, counts = dry_run(fresh_clone)
    wanted = {
        marker(fresh_clone, m) for m in ("llava-hf/llava-1.5-7b-hf", "Salesforce/blip2-opt-2.7b")
    }
    assert outputs_of(plan, "fetch_hf_model") == wanted
    assert marker(fresh_clone, "gpt2") not in plan
    assert "corenlp_jars" not in counts
    assert "data/models/stanford-corenlp-full-2015-12-09.zip" not in outputs_of(plan, "fetch")
    assert "data/models/corenlp" in inputs_of(plan, "evaluate")


def test_paper_figures_plans_every_item_at_paper_scale(fresh_clone):
    """`paper_figures` at paper scale: Tables 1/3 on AudioCaps and Clotho, the figures of
    rules/figures.smk, and the prefix-pairs sweep (1 to 16 pairs) on AudioCaps; no seeds."""
    plan, counts = dry_run(fresh_clone, "paper_figures")
    assert counts["paper_figures"] == 1 and counts["evaluate"] == 2
    assert counts["prefix_sweep"] == 5 and counts["prefix_sweep_evaluate"] == 5
    assert counts["prefix_sweep_report"] == 1
    assert "seed_run" not in counts and "seeds_report" not in counts
    for n in (1, 2, 4, 8, 16):
        assert f"results/paper/experiments/prefix_pairs/{n}/evaluate" in plan
    assert "--dataset audiocaps" in plan and '"decoding": "sampled"' in plan
    assert "--pairs data/prefix/pairs.csv" in plan


def test_the_rehearsal_plans_paper_figures(fresh_clone):
    """The rehearsal's configs (tests/test_rehearsal.py) plan the same target, over 4 pairs."""
    configs = ["configs/paper.yaml", "configs/rehearsal.yaml"]
    plan, counts = dry_run(fresh_clone, "--configfile", *configs, "--", "paper_figures")
    assert counts["prefix_sweep"] == 3 and counts["prefix_sweep_evaluate"] == 3
    assert counts["paper_figures"] == 1 and "seed_run" not in counts
    assert "results/rehearsal/report/prefix_pairs.png" in plan
