"""Figures 6 and 7 on tiny models, the attentive scorer saved with its encoder, and the targets
of rules/figures.smk planned in the miniature and at paper scale.

    HF_HUB_OFFLINE=1 pytest tests/test_figures.py -x -q
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dalipipe.align.attentive import (
    SCORER_CONFIG,
    SCORER_WEIGHTS,
    AttentiveWeights,
    load_scorer,
    save_scorer,
)
from dalipipe.evaluate.datasets import miniature_set
from dalipipe.paper import figures
from tests.support.runs import make_model_run, run_align
from tests.support.shards import FRAMES, MEL
from tests.support.snakemake import snakemake

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_model_run(tmp_path_factory.mktemp("figures"))


def params(**figure_settings) -> dict:
    return {"seed": 0, "device": "cpu", "evaluate": {"figures": figure_settings}}


# --- the scorer saved with the encoder --------------------------------------------------------


def test_a_reloaded_scorer_gives_the_same_weights(tmp_path):
    torch.manual_seed(0)
    scorer = AttentiveWeights(16, heads=4, tau=5.0, uniform_mix=0.25)
    for p in scorer.parameters():  # not the initial values: a trained scorer's
        p.data += torch.randn_like(p) * 0.1
    audio, image = torch.randn(2, 6, 16), torch.randn(2, 9, 16)
    save_scorer(scorer, tmp_path)
    again = load_scorer(tmp_path)
    assert (again.heads, again.tau, again.uniform_mix) == (4, 5.0, 0.25)
    with torch.no_grad():
        for before, after in zip(scorer(audio, image), again(audio, image)):
            torch.testing.assert_close(before, after, rtol=0, atol=0)


def test_an_align_folder_without_a_scorer_loads_none_and_a_broken_one_is_named(tmp_path):
    assert load_scorer(tmp_path) is None  # written before scorers were saved
    save_scorer(AttentiveWeights(8, heads=2), tmp_path)
    (tmp_path / SCORER_CONFIG).write_text('{"dim": 16, "heads": 2, "tau": 20, "uniform_mix": 0.5}')
    with pytest.raises(ValueError, match=SCORER_WEIGHTS):
        load_scorer(tmp_path)


@pytest.mark.slow
def test_align_ot_att_saves_its_scorer_and_other_methods_none(align_world, tmp_path):
    run_align(align_world, "ot_att", tmp_path / "ot_att", epochs=2, lr_milestones=[])
    scorer = load_scorer(tmp_path / "ot_att")
    assert scorer is not None and scorer.dim == 32
    assert (tmp_path / "ot_att" / "audio_encoder.safetensors").is_file()
    run_align(align_world, "mmd", tmp_path / "mmd", epochs=1, lr_milestones=[])
    assert load_scorer(tmp_path / "mmd") is None


# --- pieces ---------------------------------------------------------------------------------


def test_square_grid_reads_patches_row_major_and_drops_a_cls_token():
    weights = np.arange(16, dtype=float)
    assert figures.square_grid(weights, "x")[1, 0] == 4
    with_cls = np.concatenate([[99.0], weights])
    np.testing.assert_array_equal(figures.square_grid(with_cls, "x"), weights.reshape(4, 4))
    with pytest.raises(ValueError, match="clip c: 15 image tokens are not a square grid"):
        figures.square_grid(np.ones(15), "clip c")


def test_chosen_clips_by_count_by_id_and_a_missing_id_named(run_dir):
    ds = miniature_set(run_dir / "shards" / "test")
    chosen = figures.choose_clips(ds, 2, "evaluate.figures.x", need_frame=True)
    assert [c.clip_id for c, _, _ in chosen] == ["clip-000", "clip-001"]
    fbank, frame = chosen[0][1], chosen[0][2]
    assert fbank.shape == (FRAMES, MEL) and isinstance(frame, Image.Image)
    by_id = figures.choose_clips(ds, ["clip-004"], "evaluate.figures.x", need_frame=True)
    assert by_id[0][0].clip_id == "clip-004"
    assert figures.choose_clips(ds, None, "s", need_frame=True)[0][0].clip_id == "clip-000"
    with pytest.raises(ValueError, match="evaluate.figures.pca_clip: clip 'nope' is not in"):
        figures.choose_clips(ds, "nope", "evaluate.figures.pca_clip", need_frame=True)


def peaked_scorer(dim: int = 8) -> AttentiveWeights:
    """A scorer whose softmax is far from uniform, as a trained one's (low temperature)."""
    torch.manual_seed(1)
    scorer = AttentiveWeights(dim, heads=2, tau=0.05).eval()
    for p in scorer.parameters():
        p.data += torch.randn_like(p) * 0.5
    return scorer


def test_scorer_weights_are_the_softmax_and_the_mixed_weights():
    scorer = peaked_scorer()
    audio, image = np.random.default_rng(0).normal(size=(2, 6, 8)).astype(np.float32)
    w = figures.scorer_weights(scorer, audio, image)
    # the softmax of eq. 7, computed here from the scorer's parts
    with torch.no_grad():
        a, i = torch.from_numpy(audio)[None], torch.from_numpy(image)[None]
        on_image, _ = scorer.audio_scorer(scorer.i_q(i), scorer.a_k(a), scorer.a_v(a))
        expected = torch.softmax(on_image.mean(-1) / scorer.tau, dim=-1)[0].numpy()
        mixed = scorer(a, i)
    np.testing.assert_allclose(w["image_scores"], expected, rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(w["audio_weights"], mixed[0][0].numpy())  # what OT receives
    np.testing.assert_array_equal(w["image_weights"], mixed[1][0].numpy())
    for side in ("audio", "image"):
        scores, weights = w[f"{side}_scores"], w[f"{side}_weights"]
        assert scores.shape == weights.shape == (6,)
        assert scores.sum() == pytest.approx(1, abs=1e-6) == weights.sum()
        np.testing.assert_allclose(weights, 0.5 * scores + 0.5 / 6, rtol=1e-6)
        assert weights.min() >= 0.5 / 6 - 1e-7  # half of each token's weight is the uniform share
    # softmax weights near zero, which the mixed ones cannot show
    assert min(w["audio_scores"].min(), w["image_scores"].min()) < 0.01 / 6
    with pytest.raises(ValueError, match="the scorer weighs 8-d tokens"):
        figures.scorer_weights(scorer, np.ones((3, 4), np.float32), image)


def test_plot_attention_draws_softmax_and_mixed_weights_as_multiples_of_uniform(tmp_path):
    scorer = peaked_scorer()
    rng = np.random.default_rng(0)
    audio, image = rng.normal(size=(6, 8)).astype(np.float32), rng.normal(size=(9, 8))
    w = figures.scorer_weights(scorer, audio, image.astype(np.float32))
    row = {
        "clip_id": "c",
        "picture": np.zeros((12, 12, 3)),
        "fbank": rng.normal(size=(12, 8)).astype(np.float32),
        **{k: figures.square_grid(v, "c") for k, v in w.items() if k.startswith("image")},
        **{k: v.reshape(2, 3) for k, v in w.items() if k.startswith("audio")},
    }
    (drawn,) = figures.plot_attention([row], tmp_path / "a.png")
    assert [k for k, _, _ in figures.ATTENTION_PANELS] == list(drawn)
    np.testing.assert_array_equal(drawn["image_scores"], w["image_scores"].reshape(3, 3) * 9)
    np.testing.assert_array_equal(drawn["audio_weights"], w["audio_weights"].reshape(2, 3) * 6)
    assert drawn["image_weights"].min() >= 0.5 - 1e-6 and drawn["audio_weights"].min() >= 0.5 - 1e-6
    assert min(drawn["image_scores"].min(), drawn["audio_scores"].min()) < 0.5
    width, height = _png(tmp_path / "a.png")
    assert width > 3 * height  # four panels side by side


def test_pca_clip_axes_are_the_image_tokens_whatever_encoders_are_drawn(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(16, 8)) * np.array([5, 3, 1, 1, 1, 1, 1, 1.0])
    audio = {"untrained": rng.normal(5, 1, size=(4, 8)), "mmd": rng.normal(size=(4, 8))}
    both = figures.plot_pca_clip(image, audio, "c", tmp_path / "p.png")
    alone = figures.plot_pca_clip(image, {"mmd": audio["mmd"]}, "c", tmp_path / "q.png")
    assert set(both) == {"image", "untrained", "mmd"} and set(alone) == {"image", "mmd"}
    np.testing.assert_array_equal(both["image"], alone["image"])
    np.testing.assert_array_equal(both["mmd"], alone["mmd"])
    # the plane: the two leading eigenvectors of the image tokens' covariance (up to sign)
    values, vectors = np.linalg.eigh(np.cov(image.T))
    top = vectors[:, ::-1][:, :2]
    np.testing.assert_allclose(np.cov(both["image"].T), np.diag(values[::-1][:2]), atol=1e-9)
    for name in ("image", "untrained", "mmd"):
        tokens = image if name == "image" else audio[name]
        expected = (tokens - image.mean(0)) @ top
        np.testing.assert_allclose(np.abs(both[name]), np.abs(expected), atol=1e-9)
    with pytest.raises(ValueError, match="no audio tokens"):
        figures.plot_pca_clip(image, {}, "c", tmp_path / "r.png")


# --- the figures on tiny models ------------------------------------------------------------


def _png(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_pca_clip_draws_untrained_and_each_method_for_the_chosen_clip(run_dir, tmp_path):
    out = tmp_path / "pca_clip.png"
    align = [run_dir / "align" / "mmd", run_dir / "align" / "ot_att"]
    args = ("miniature", run_dir / "shards" / "test", run_dir / "models" / "llava", align, out)
    assert figures.pca_clip(params(pca_clip="clip-003"), *args) == "clip-003"
    width, height = _png(out)
    assert width > 3.3 * height  # four panels side by side: frame, untrained, mmd, ot_att
    assert figures.pca_clip(params(), *args[:-1], tmp_path / "first.png") == "clip-000"
    with pytest.raises(ValueError, match="pca_clip: clip 'clip-999'"):
        figures.pca_clip(params(pca_clip="clip-999"), *args)


def test_attention_draws_the_scorers_weights_and_says_when_there_is_no_scorer(run_dir, tmp_path):
    root = run_dir
    common = ("miniature", root / "shards" / "test", root / "models" / "llava")
    out = tmp_path / "attention.png"
    drawn = figures.attention(params(attention_clips=2), *common, root / "align" / "ot_att", out)
    assert drawn == ["clip-000", "clip-001"]
    width, height = _png(out)
    assert height > 0.3 * width  # two rows of four panels
    scorer = load_scorer(root / "align" / "ot_att")
    rows = figures.attention_rows(
        params(attention_clips=2), *common, root / "align" / "ot_att", scorer
    )
    assert [r["clip_id"] for r in rows] == drawn
    for row in rows:  # the grids: the patch grid of the picture, the encoder's token grid
        side = int(round(row["image_scores"].size ** 0.5))
        assert row["image_scores"].shape == row["image_weights"].shape == (side, side)
        assert row["audio_scores"].shape == row["audio_weights"].shape == (MEL // 8, FRAMES // 8)
        for side in ("image", "audio"):
            scores, weights = row[f"{side}_scores"], row[f"{side}_weights"]
            np.testing.assert_allclose(weights, 0.5 * scores + 0.5 / scores.size, rtol=1e-6)
    old = tmp_path / "old.png"
    assert figures.attention(params(), *common, root / "align" / "old_ot_att", old) == []
    assert _png(old)[0] > 0


def test_the_cli_names_a_bad_clip_and_exits_1(run_dir, tmp_path, capfd):
    from dalipipe.cli import main

    argv = ["figure", "attention", "--params", '{"device": "cpu", "evaluate": {"figures": '
            '{"attention_clips": ["nope"]}}}', "--dataset", "miniature",
            "--shards", str(run_dir / "shards" / "test"),
            "--captioner", str(run_dir / "models" / "llava"),
            "--align", str(run_dir / "align" / "ot_att"), "--out", str(tmp_path / "a.png")]  # fmt: skip
    assert main(argv) == 1
    assert "evaluate.figures.attention_clips: clip 'nope' is not in" in capfd.readouterr().err
    assert not (tmp_path / "a.png").exists()


# --- the workflow's targets -------------------------------------------------------------------


def dry_run(*args: str) -> str:
    result = snakemake("-n", "-p", "--cores", "1", *args, timeout=600, merged=True)
    assert result.returncode == 0, result.stdout[-4000:]
    return result.stdout


@pytest.mark.slow
def test_the_targets_are_planned_in_the_miniature_and_at_paper_scale():
    targets = ["report/probe.html", "report/pca_clip.png", "report/attention.png"]
    plan = dry_run(*(f"results/miniature/{t}" for t in targets))
    for rule in ("probe", "pca_clip", "attention"):
        assert f"rule {rule}:" in plan
    assert "--dataset miniature --shards results/miniature/shards/test" in plan
    paper = dry_run(*(f"results/paper/{t}" for t in targets), "--configfile", "configs/paper.yaml")
    for rule in ("probe", "pca_clip", "attention"):
        assert f"rule {rule}:" in paper
    assert "--dataset audiocaps" in paper and "data/audiocaps/test.csv" in paper


@pytest.mark.slow
def test_the_ci_preset_builds_the_figures_and_the_report_shows_them(tmp_path, snakemake_in):
    """From an empty directory: the CI miniature with ot and ot_att, only up to the figures
    (bootstrap, shards, align; no prefix, distillation or evaluation)."""
    import json
    import zipfile

    import yaml

    from dalipipe.config import load_config

    config = load_config(REPO / "configs" / "ci.yaml")
    config["run"] = "figures"
    config["align"]["methods"] = config["evaluate"]["methods"] = ["ot", "ot_att"]
    config["evaluate"]["figures"] = {"probe_clips": 4, "pca_clip": None, "attention_clips": 2}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    targets = [
        f"results/figures/report/{n}" for n in ("probe.html", "pca_clip.png", "attention.png")
    ]
    snakemake_in(tmp_path, *targets)
    record = json.loads((tmp_path / "results/figures/report/probe.json").read_text())
    assert record["systems"] == ["image", "untrained", "ot", "ot_att"]
    assert len(record["clips"]) == 4 and set(record["rates"]) == set(record["systems"])
    assert load_scorer(tmp_path / "results/figures/align/ot_att") is not None
    assert load_scorer(tmp_path / "results/figures/align/ot") is None
    snakemake_in(tmp_path, *targets, "--report", "report.zip")
    names = zipfile.ZipFile(tmp_path / "report.zip").namelist()
    for name in ("probe.html", "pca_clip.png", "attention.png"):
        assert any(n.endswith(name) for n in names), name
