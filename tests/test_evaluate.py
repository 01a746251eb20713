"""Evaluation sets, world scores and the evaluate stage on tiny real models.

HF_HUB_OFFLINE=1 pytest tests/test_evaluate.py -x -q
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from dalipipe.config import section_defaults
from dalipipe.evaluate import datasets, run, tables
from dalipipe.world.scores import WORLD_METRICS, world_scores
from tests.support.authors import write_authors_files
from tests.support.runs import make_world_llava
from tests.support.shards import FRAMES, MEL, write_test_shard

SHARED = Path("/work/shared/data")
AUDIOCAPS_CSV = SHARED / "audiocaps" / "test.csv"
CLOTHO_CSV = SHARED / "clotho" / "clotho_captions_evaluation.csv"
CLIP_MP4 = SHARED / "clips" / "audioset_00W1lcxW-WU_40_50.mp4"
CLIP_WAV = SHARED / "clips" / "vggsound_FwVYUHKoLtQ_000034.wav"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="shared real data not present")


# ----------------------------------------------------------------------------- world scores


def test_world_scores_pool_counts_over_clips():
    meta = {
        "a": {"heard": ["dog", "bell"], "seen": ["dog"]},  # bell is off-screen
        "b": {"heard": ["bird"], "seen": ["bird", "drum"]},  # drum is silent
        "c": {"heard": ["frog"], "seen": []},
    }
    captions = {
        "a": "a dog barks and a bell chimes",  # 2 hits, well formed
        "b": "a drum booms",  # names a silent object: 0 hits, 1 named
        "c": "frogs frogs frogs",  # 1 hit (plural counts), not well formed
    }
    scores = world_scores(captions, meta)
    assert scores["class_recall"] == pytest.approx(3 / 4)
    assert scores["class_precision"] == pytest.approx(3 / 4)
    assert scores["well_formed"] == pytest.approx(2 / 3)
    assert scores["offscreen_recall"] == pytest.approx(2 / 2)  # bell (a) and frog (c)


def test_world_scores_without_anything_named_is_none_not_zero():
    scores = world_scores(
        {"a": "a photo of an empty room"}, {"a": {"heard": ["dog"], "seen": ["dog"]}}
    )
    assert scores["class_recall"] == 0 and scores["class_precision"] is None
    assert scores["offscreen_recall"] is None
    with pytest.raises(ValueError, match="no world metadata for 1 clip"):
        world_scores({"zz": "x"}, {})


# ----------------------------------------------------------------------------- datasets


@needs_shared
def test_audiocaps_references_group_five_per_clip_and_dedup_is_a_switch():
    refs, meta = datasets.read_audiocaps(AUDIOCAPS_CSV)
    assert len(refs) == 975 and all(len(r) == 5 for r in refs.values())
    assert refs["7fmOlUlwoNg_20000"][0] == "Constant rattling noise and sharp vibrations"
    assert meta["7fmOlUlwoNg_20000"]["youtube_id"] == "7fmOlUlwoNg"
    deduped, _ = datasets.group_references(
        datasets.dedup_references(datasets.audiocaps_rows(AUDIOCAPS_CSV))
    )
    total = sum(map(len, refs.values()))
    distinct = len({c for r in refs.values() for c in r})
    assert sum(map(len, deduped.values())) == distinct < total


@needs_shared
def test_clotho_reads_five_captions_and_audio_only(tmp_path):
    refs, meta = datasets.read_clotho(CLOTHO_CSV)
    assert len(refs) == 1045
    assert refs["Santa_Motor"][1] == "A person is using electric clippers to trim bushes."
    (tmp_path / "Santa Motor.wav").write_bytes(CLIP_WAV.read_bytes())
    ds = datasets.load_dataset(
        "clotho",
        {"csv": str(CLOTHO_CSV), "media": str(tmp_path)},
        {"num_mel_bins": 64, "target_length": 256},
    )
    assert not ds.has_video and [c.clip_id for c in ds.clips] == ["Santa_Motor"]
    assert len(ds.failed) == 1044 and "no media for" in ds.failed[0]["reason"]
    fbank, frame = ds.clips[0].load()
    assert fbank.shape == (256, 64) and frame is None


@needs_shared
def test_audiocaps_media_file_gives_fbank_and_middle_frame(tmp_path):
    csv_path = tmp_path / "ac.csv"
    csv_path.write_text(
        "audiocap_id,youtube_id,start_time,caption\n"
        "1,00W1lcxW-WU,40,someone whistles\n2,00W1lcxW-WU,40,a whistle blows\n"
        "3,abcdefghijk,0,a dog barks\n"
    )
    media = tmp_path / "media"
    media.mkdir()
    (media / "00W1lcxW-WU.mp4").write_bytes(CLIP_MP4.read_bytes())
    broken = media / "abcdefghijk_0.mp4"
    broken.write_bytes(b"not a video")
    ds = datasets.load_dataset(
        "audiocaps",
        {"csv": str(csv_path), "media": str(media)},
        {"num_mel_bins": 64, "target_length": 256},
    )
    assert [c.clip_id for c in ds.clips] == ["00W1lcxW-WU_40000", "abcdefghijk_0"]
    fbank, frame = ds.clips[0].load()
    assert fbank.shape == (256, 64) and fbank.dtype == np.float32
    assert frame.size == (256, 144)  # the clip is 256x144
    with pytest.raises(Exception, match="abcdefghijk_0.mp4"):
        ds.clips[1].load()


def test_pick_frame_is_the_authors_frame_5_of_10():
    assert (
        datasets.pick_frame(10) == 5 and datasets.pick_frame(3) == 1 and datasets.pick_frame(1) == 0
    )
    assert datasets.pick_frame(3, 7) == 2


# ----------------------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny run: base captioner, prefix, two aligned encoders, one distilled captioner."""
    import torch

    from dalipipe.models.captioner import AudioCaptioner
    from dalipipe.models.cavmae import AudioEncoderConfig, CavMaeAudioEncoder, save_encoder

    root = tmp_path_factory.mktemp("run")
    make_world_llava(root / "models" / "llava")
    config = AudioEncoderConfig(
        num_mel_bins=MEL,
        target_length=FRAMES,
        patch_size=16,
        embed_dim=32,
        depth=1,
        num_heads=2,
        out_dim=32,
    )
    for i, method in enumerate(["mmd", "ot"]):
        torch.manual_seed(10 + i)
        save_encoder(CavMaeAudioEncoder(config), root / "align" / method)
    captioner = AudioCaptioner.from_base(root / "models" / "llava")
    captioner.init_prefix(n_tokens=4, std=0.02, seed=0)
    (root / "prefix").mkdir()
    captioner.save_prefix(root / "prefix" / "prefix.safetensors")
    torch.manual_seed(20)
    distilled = AudioCaptioner.from_base(
        root / "models" / "llava", audio_encoder=CavMaeAudioEncoder(config)
    )
    distilled.save_dir(root / "distill" / "mmd")
    write_test_shard(root / "shards" / "test")
    return root


def _evaluate(root: Path, out: Path, models: dict | None = None, **settings):
    params = {
        "seed": 0,
        "device": "cpu",
        "evaluate": {"max_new_tokens": 6, "batch_size": 4, **settings},
        "models": models or {},
    }
    return run.evaluate(
        params,
        "miniature",
        out,
        captioner_dir=root / "models" / "llava",
        prefix_dir=root / "prefix",
        align_dirs=[root / "align" / "mmd", root / "align" / "ot"],
        distill_dirs=[root / "distill" / "mmd"],
        shards=root / "shards" / "test",
    )


@pytest.mark.slow
def test_evaluate_writes_every_system_and_a_table(run_dir):
    out = run_dir / "evaluate" / "miniature"
    summary = _evaluate(run_dir, out)
    expected = [
        "image",
        "untrained",
        "mmd_audio",
        "mmd_audio_image",
        "mmd_audio_distilled",
        "mmd_audio_image_distilled",
        "ot_audio",
        "ot_audio_image",
    ]
    assert summary["systems"] == expected
    assert summary["n_clips"] == 6 and summary["n_failed"] == 1
    failed = list(csv.DictReader(open(out / "failed.csv")))
    assert failed[0]["clip_id"] == "clip-bad" and "missing" in failed[0]["reason"]

    rows = tables.read_csv(out / "table.csv")
    assert list(rows[0]) == tables.columns(world=True)
    assert [r["system"] for r in rows] == expected
    image = json.loads((out / "image.json").read_text())
    assert image["modality"] == "image" and image["use_prefix"] is True
    assert len(image["captions"]) == 6
    # The table holds the scores of the captions it was written from, recomputed here.
    ws = world_scores(image["captions"], {m["clip_id"]: m for m in _metas(run_dir)})
    assert rows[0]["class_recall"] == pytest.approx(ws["class_recall"])
    assert rows[0]["well_formed"] == pytest.approx(ws["well_formed"])
    assert rows[0]["spider"] is None  # no CoreNLP here; null, never a stand-in
    assert rows[0]["fense"] is None and rows[0]["vocab"] >= 1  # no FENSE models configured
    distilled = json.loads((out / "mmd_audio_distilled.json").read_text())
    assert distilled["distilled"] is True and distilled["use_prefix"] is False

    md = (out / "table.md").read_text()
    assert "| DALI-MMD | audio |" in md and "METEOR (distilled)" in md
    mmd_line = next(line for line in md.splitlines() if line.startswith("| DALI-MMD | audio |"))
    ot_line = next(line for line in md.splitlines() if line.startswith("| DALI-OT | audio |"))
    assert mmd_line.count("|") == ot_line.count("|")
    n_distilled = len(tables.MD_METRICS) + len(WORLD_METRICS)  # no distilled OT: empty cells
    assert [c.strip() for c in ot_line.split("|")[-n_distilled - 1 : -1]] == [""] * n_distilled
    assert "n.c. SPIDEr: not computed: Stanford CoreNLP 3.6.0 missing" in md

    gap = np.load(out / "gap.npz")
    assert gap["image"].shape == (6, 32)
    assert set(gap.files) == {"clip_ids", "image", "audio/untrained", "audio/mmd", "audio/ot"}
    assert not np.allclose(gap["audio/mmd"], gap["audio/ot"])

    # Greedy and seeded: a second run, through the command line, writes the same captions.
    again = run_dir / "evaluate" / "again"
    settings = {"max_new_tokens": 6, "batch_size": 4, "systems": ["untrained", "audio"]}
    argv = ["--params", json.dumps({"seed": 0, "device": "cpu", "evaluate": settings})]
    argv += ["--dataset", "miniature", "--shards", str(run_dir / "shards" / "test")]
    argv += ["--captioner", str(run_dir / "models" / "llava"), "--prefix", str(run_dir / "prefix")]
    argv += ["--align", str(run_dir / "align" / "mmd"), str(run_dir / "align" / "ot"), "--distill"]
    assert run.main([*argv, "--out", str(again)]) == 0
    assert json.loads((again / "summary.json").read_text())["systems"] == [
        "untrained",
        "mmd_audio",
        "ot_audio",
    ]
    for name in ("untrained", "mmd_audio"):
        first = json.loads((out / f"{name}.json").read_text())["captions"]
        second = json.loads((again / f"{name}.json").read_text())["captions"]
        assert first == second


@pytest.mark.slow
def test_evaluate_prompts_with_the_configured_options(run_dir):
    """config `models.options` (template, prompt) reach every system not yet distilled; a
    distilled captioner keeps the options it was trained with (its captioner.json)."""
    from dalipipe.models.captioner import AudioCaptioner

    # other than the defaults the run's captioners were trained with (the schema's: plain)
    options = {"template": "vicuna_v1", "prompt": "What sound is it?"}
    out = run_dir / "evaluate" / "options"
    systems = ["image", "untrained", "audio", "audio_distilled"]
    _evaluate(run_dir, out, models={"options": options}, systems=systems)
    for name in ("image", "untrained", "mmd_audio", "ot_audio"):
        used = json.loads((out / f"{name}.json").read_text())["options"]
        assert {k: used[k] for k in options} == options, name
    distilled = json.loads((out / "mmd_audio_distilled.json").read_text())["options"]
    assert distilled == AudioCaptioner.from_dir(run_dir / "distill" / "mmd").options.to_dict()
    assert distilled["template"] == "plain"


def _metas(root: Path) -> list[dict]:
    samples = datasets.read_shard_dir(root / "shards" / "test")
    return [json.loads(s["json"]) for s in samples if "fbank.npy" in s]


def test_plan_systems_orders_like_table_1_and_rejects_unknown_names():
    settings = section_defaults("evaluate")
    names = [s.name for s in run.plan_systems(settings, ["mmd", "ot_att"], ["ot_att"])]
    assert names == [
        "image",
        "untrained",
        "mmd_audio",
        "mmd_audio_image",
        "ot_att_audio",
        "ot_att_audio_image",
        "ot_att_audio_distilled",
        "ot_att_audio_image_distilled",
    ]
    with pytest.raises(ValueError, match="evaluate.systems: unknown"):
        run.plan_systems({**settings, "systems": ["audio", "beam"]}, [], [])


def test_media_index_finds_acquire_and_extract_layouts(tmp_path):
    (tmp_path / "part-0" / "clips").mkdir(parents=True)
    (tmp_path / "part-0" / "clips" / "abc_1000.mp4").write_bytes(b"x")
    (tmp_path / "part-1" / "def_0").mkdir(parents=True)
    np.save(tmp_path / "part-1" / "def_0" / "fbank.npy", np.zeros((4, 2), np.float16))
    (tmp_path / "notes.txt").write_text("ignored")
    extracted, files = datasets.index_media(tmp_path)
    assert list(extracted) == ["def_0"] and list(files) == ["abc_1000"]
    with pytest.raises(FileNotFoundError, match="media folder not found"):
        datasets.index_media(tmp_path / "absent")


def test_extra_systems_are_evaluated_as_distilled_captioners(run_dir, tmp_path):
    """config `evaluate.extra_systems`: an imported model (the authors' released weights through
    `dalipipe import-authors`, here at a tiny width) is scored beside the run's own systems."""
    from dalipipe import cli

    files = write_authors_files(
        tmp_path / "zenodo",
        dict(mel=MEL, frames=FRAMES, patch=16, width=32, depth=1, out=32),
        64,
        n_prefix=4,
    )
    sizes = dict(num_mel_bins=MEL, target_length=FRAMES, embed_dim=32, depth=1, num_heads=2)
    authors = tmp_path / "models" / "authors"
    argv = ["import-authors", "--backbone", str(files / "audio_backbone.pth")]
    argv += ["--mlp", str(files / "prefixMLP.bin"), "--base", str(run_dir / "models" / "llava")]
    argv += ["--encoder-config", json.dumps({**sizes, "out_dim": 32}), "--out", str(authors)]
    assert cli.main(argv) == 0

    out = tmp_path / "evaluate"
    systems = ["audio", "audio_distilled", "audio_image_distilled"]
    summary = _evaluate(run_dir, out, systems=systems, extra_systems={"authors": str(authors)})
    assert summary["systems"] == [
        "mmd_audio",
        "mmd_audio_distilled",
        "mmd_audio_image_distilled",
        "ot_audio",
        "authors_audio_distilled",
        "authors_audio_image_distilled",
    ]
    record = json.loads((out / "authors_audio_distilled.json").read_text())
    assert record["method"] == "authors" and record["distilled"] is True
    assert record["use_prefix"] is False and len(record["captions"]) == 6
    assert record["options"]["generate_template"] == "llava_v1"  # the authors' options
    assert record["options"]["share_projector"] is True
    rows = {r["system"]: r for r in tables.read_csv(out / "table.csv")}
    assert rows["authors_audio_image_distilled"]["modality"] == "audio+image"
    md = (out / "table.md").read_text()
    assert "| authors | audio |" in md and "| authors | audio+image |" in md

    # an extra system must read the run's filterbank, and may not take a method's name
    params = {"seed": 0, "device": "cpu", "extract": {"fbank": {"mean": -1.07, "std": 2.44}}}
    params["evaluate"] = {"systems": systems, "extra_systems": {"authors": str(authors)}}
    with pytest.raises(ValueError, match=r"extra_systems.authors .*normalised with mean -5.081"):
        run.evaluate(
            params,
            "miniature",
            tmp_path / "refused",
            captioner_dir=run_dir / "models" / "llava",
            shards=run_dir / "shards" / "test",
        )
    settings = {**section_defaults("evaluate"), "systems": systems}
    with pytest.raises(ValueError, match="'mmd' is also an evaluated method"):
        run.plan_systems(settings, ["mmd"], ["mmd"], ["mmd"])
    with pytest.raises(ValueError, match="needs audio_distilled or audio_image_distilled"):
        run.plan_systems({**settings, "systems": ["audio"]}, ["mmd"], [], ["authors"])


def test_an_evaluation_of_no_clip_stops_naming_the_set_and_leaves_no_table(tmp_path):
    """A Clotho CSV whose audio is in none of the media folder's files: nothing to caption."""
    table = tmp_path / "captions.csv"
    table.write_text(
        "file_name,caption_1,caption_2,caption_3,caption_4,caption_5\n"
        "rain on a roof.wav,a,b,c,d,e\nwind.wav,a,b,c,d,e\n"
    )
    (tmp_path / "media").mkdir()
    settings = {"datasets": {"clotho": {"csv": str(table), "media": str(tmp_path / "media")}}}
    out = tmp_path / "evaluate" / "clotho"
    with pytest.raises(ValueError) as error:
        run.evaluate(
            {"seed": 0, "device": "cpu", "evaluate": settings},
            "clotho",
            out,
            captioner_dir=tmp_path / "none",
        )
    assert str(error.value) == (
        "evaluate.datasets.clotho: no readable clip to evaluate, 2 clip(s) failed; the first: "
        f"{tmp_path / 'media'}: no media for rain_on_a_roof"
    )
    assert not out.exists()
