"""The report: pages and figures from evaluate outputs, then `snakemake --report` in Chromium.

    HF_HUB_OFFLINE=1 pytest tests/test_report.py -x -q

The Chromium test renders the Snakemake report headless and keeps a screenshot under
test-artifacts/; it is skipped only where chromium is not installed (CI installs it).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from dalipipe.config import load_config
from dalipipe.evaluate import tables
from dalipipe.paper import report
from tests.support.runs import SHARED_WAV, make_report_run
from tests.support.snakemake import snakemake, workflow_env

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"


def test_pca_2d_matches_the_covariance_eigenvectors():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 5)) * np.array([5.0, 2.0, 1.0, 0.5, 0.1])
    points = report.pca_2d(x)
    _, vecs = np.linalg.eigh(np.cov(x - x.mean(0), rowvar=False))
    expected = (x - x.mean(0)) @ vecs[:, ::-1][:, :2]
    # Eigenvectors are defined up to sign.
    for k in range(2):
        assert np.allclose(np.abs(points[:, k]), np.abs(expected[:, k]), atol=1e-8)
    assert points[:, 0].var() > points[:, 1].var()


def test_markdown_table_becomes_an_html_table():
    md = "**x**: a | b\n\n| system | modality | METEOR |\n|---|---|---|\n| DALI-MMD | audio | 0.1000 |\n\nn.c. SPIDEr: why\n"
    out = report.markdown_table_to_html(md)
    assert (
        "<th>METEOR</th>" in out
        and "<td class='text'>DALI-MMD</td>" in out
        and "<td>0.1000</td>" in out
    )
    assert "<p>n.c. SPIDEr: why</p>" in out and "---" not in out


def test_build_report_writes_pages_and_figures(tmp_path):
    run = make_report_run(tmp_path)
    written = report.build_report(
        [run / "evaluate" / "miniature"],
        run / "report",
        curves=[run / "align" / "mmd" / "curve.csv", run / "prefix" / "curve.csv"],
        acquire_manifest=run / "acquire" / "manifest.csv",
        shards=run / "shards" / "test",
        n_examples=2,
    )
    assert sorted(p.name for p in written) == [
        "curves.png",
        "examples.html",
        "modality_gap.png",
        "results.html",
    ]
    results = (run / "report" / "results.html").read_text()
    assert "<td class='text'>DALI-MMD</td>" in results and "<td>0.2100</td>" in results
    examples = (run / "report" / "examples.html").read_text()
    assert examples.count("<div class='clip'>") == 2
    assert "src='data:audio/wav;base64," in examples  # clip-000 has acquired media
    assert examples.count("src='data:image/jpeg;base64,") == 2
    assert "mmd_audio says bell" in examples
    from PIL import Image

    assert Image.open(run / "report" / "modality_gap.png").size[0] > 400
    report.gather_tables([run / "evaluate" / "miniature"], run / "table.csv", run / "table.md")
    head = (run / "table.csv").read_text().splitlines()[0]
    assert head == "dataset," + ",".join(tables.columns(world=True))


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium(*args: str, profile: Path, timeout: int = 120) -> str:
    cmd = [_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="chromium not installed")
def test_snakemake_report_renders_in_headless_chromium(tmp_path):
    run = make_report_run(tmp_path)
    config = load_config()  # config.yaml with the schema's defaults
    config["evaluate"] = {
        **config.get("evaluate", {}),
        "methods": ["mmd"],
        "systems": ["image", "audio"],
        "examples": 2,
    }
    config["evaluate"]["datasets"] = {"miniature": {}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "Snakefile").write_text(
        'configfile: "config.yaml"\n'
        f'include: "{REPO}/rules/common.smk"\n'
        f'include: "{REPO}/rules/evaluate.smk"\n'
    )
    env = workflow_env()
    # Only modification times decide what reruns: the hand-made upstream outputs have no metadata.
    target = ["results/miniature/table.csv", "--rerun-triggers", "mtime"]
    done = snakemake("--cores", "1", *target, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run / "report" / "modality_gap.png").is_file()
    # The evaluate rule's command as Snakemake would run it: every input named, lists expanded.
    dry = snakemake(
        "--cores", "1", *target, "--forcerun", "evaluate", "-n", "-p", cwd=tmp_path, env=env
    )
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert (
        "--dataset miniature --shards results/miniature/shards/test --captioner results/miniature/models/llava"
        " --prefix results/miniature/prefix --align results/miniature/align/mmd --distill  --out"
        " results/miniature/evaluate/miniature" in dry.stdout
    )
    built = snakemake(
        "--cores", "1", "results/miniature/table.csv", "--report", "report.html",
        cwd=tmp_path, env=env,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    html_file = tmp_path / "report.html"
    assert html_file.stat().st_size > 10_000

    ARTIFACTS.mkdir(exist_ok=True)
    profile = tmp_path / "chromium-profile"
    chromium(
        "--window-size=1400,1000",
        f"--screenshot={ARTIFACTS / 'snakemake-report.png'}",
        html_file.as_uri(),
        profile=profile,
    )
    dom = chromium("--virtual-time-budget=5000", "--dump-dom", html_file.as_uri(), profile=profile)
    # The rendered report lists each category and result the rules declared.
    for text in ("Results", "Modality gap", "Training", "Examples"):
        assert text in dom, text
    for name in ("table.csv", "results.html", "modality_gap.png", "curves.png"):
        assert name in dom, name

    # The results page itself, as the report opens it: the table is there, rendered.
    results = run / "report" / "results.html"
    chromium(
        "--window-size=1400,700",
        f"--screenshot={ARTIFACTS / 'results-table.png'}",
        results.as_uri(),
        profile=profile,
    )
    page = chromium("--dump-dom", results.as_uri(), profile=profile)
    assert "<table>" in page and "DALI-MMD" in page and "0.2100" in page
    assert (ARTIFACTS / "snakemake-report.png").stat().st_size > 5_000


@pytest.mark.skipif(not SHARED_WAV.is_file(), reason="shared real data not present")
def test_examples_of_an_audio_only_set_play_the_configured_media(tmp_path):
    csv_file = tmp_path / "clotho.csv"
    csv_file.write_text(
        "file_name,caption_1,caption_2,caption_3,caption_4,caption_5\n"
        "Violin take.wav,a violin plays,strings,a bow on strings,music,a fiddle tune\n"
    )
    media = tmp_path / "audio"
    media.mkdir()
    shutil.copyfile(SHARED_WAV, media / "Violin take.wav")
    out = tmp_path / "evaluate" / "clotho"
    out.mkdir(parents=True)
    (out / "references.json").write_text(json.dumps({"Violin_take": ["a violin plays"]}))
    (out / "summary.json").write_text(json.dumps({"dataset": "clotho", "systems": ["mmd_audio"]}))
    (out / "mmd_audio.json").write_text(json.dumps({"captions": {"Violin_take": "a bird chirps"}}))
    params = {
        "evaluate": {"datasets": {"clotho": {"csv": str(csv_file), "media": str(media)}}},
        "extract": {"fbank": {"num_mel_bins": 64, "target_length": 256}},
    }
    page = report.examples_page(out, 3, {}, None, params)
    assert page.count("<div class='clip'>") == 1 and "(no frame)" in page
    assert "src='data:audio/wav;base64," in page and "a bird chirps" in page
    # Without the dataset's configuration the page still renders, without media.
    assert "(no audio)" in report.examples_page(out, 3, {}, None, {})
