"""The miniature run shows the paper's claims: `snakemake --cores 2` with config.yaml, end to end.

    pytest tests/test_miniature.py -m slow           # the run itself, then the claims
    pytest tests/test_miniature.py -m "not slow"     # the checks, on tables made to break them

It runs the README's first command in a fresh working directory and checks, on the held-out
synthetic test clips of results/miniature/table.csv, the claims of the paper's Table 1 that the
miniature reproduces. Each margin was set from three seeds (0, 1, 2) measured on a 2-core Intel
Xeon (README, "The miniature run: what it shows") with one thread per job, plus seed 2 with two
threads per job (the nested run of the seeds target, `snakemake --cores 2`), and left below the
weakest of them, since another seed, CPU or thread count gives other digits; an ordering those
runs did not all show is not checked. A regression in any stage (world, extraction, filter, bootstrap, prefix,
alignment, pseudo-labels, distillation, scoring) moves these numbers.
"""

import csv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DISTRIBUTION = ("mmd", "ot", "ot_att")  # aligned on token distributions
OT_VARIANTS = ("ot", "ot_att")
LIFTED = ("ot", "ot_att", "contrastive")  # the paper: distillation lifts these (MMD: flat)

# Margins; the measured minimum over seeds 0 / 1 / 2 is in each comment.
# Class F1 over the untrained encoder's: the best distribution-aligned encoder (1.16x: seed 0 2.02,
# seed 1 1.16, seed 2 1.63) and every one after distillation (1.10x: 2.06 / 1.10 / 1.66). Each
# aligned encoder before distillation is not checked: seed 1 gave 0.94-1.16x (README).
BEST_F1_OVER_UNTRAINED = 1.1
DISTILLED_F1_OVER_UNTRAINED = 1.0
# Well-formed over contrastive's (+0.39: 0.78 / 0.92 / 0.39; seed 2 two threads +0.20). CIDEr-D
# over contrastive's is not checked: 1.13-7x on the three seeds, but at seed 2 with two threads
# OT and OT-Att were below contrastive (0.41 / 0.40 against 0.54; MMD 0.58).
WELL_FORMED_OVER_CONTRASTIVE = 0.1
# distillation's lift, audio only, of OT, OT-Att and contrastive (CIDEr-D +0.092, METEOR +0.025)
LIFT = {"cider_d": 0.03, "meteor": 0.01}
# audio+image over audio alone, CIDEr-D, OT and OT-Att (+0.529: 0.74 / 0.54 / 0.53)
AUDIO_IMAGE_OVER_AUDIO = 0.2
# off-screen recall of audio over the image's (image 0.00 / 0.03 / 0.00; audio 0.12-0.30; seed 2
# two threads: image 0.029, OT-Att 0.057, of 35 off-screen clips)
OFFSCREEN_OVER_IMAGE = 1.0
# Not checked, as the runs did not show it: the best OT variant at least MMD after distillation
# (MMD ahead on all three seeds: 1.08 / 0.72 / 0.84 against 1.01 / 0.66 / 0.83).


def class_f1(row: dict[str, float]) -> float:
    """Harmonic mean of sounding-class recall and precision."""
    recall, precision = row["class_recall"], row["class_precision"]
    return 2 * recall * precision / (recall + precision) if recall + precision else 0.0


def aligned_above_untrained(table) -> list[str]:
    untrained = class_f1(table["untrained"])
    best = max(DISTRIBUTION, key=lambda m: class_f1(table[f"{m}_audio"]))
    failures = []
    if class_f1(table[f"{best}_audio"]) <= BEST_F1_OVER_UNTRAINED * untrained:
        failures.append(
            f"best aligned ({best}): class F1 {class_f1(table[f'{best}_audio']):.3f} not above "
            f"{BEST_F1_OVER_UNTRAINED} x untrained {untrained:.3f}"
        )
    for m in DISTRIBUTION:
        distilled = class_f1(table[f"{m}_audio_distilled"])
        if distilled <= DISTILLED_F1_OVER_UNTRAINED * untrained:
            failures.append(f"{m} distilled: class F1 {distilled:.3f} not above untrained")
    return failures


def distribution_above_contrastive(table) -> list[str]:
    contrastive = table["contrastive_audio"]
    failures = []
    for m in DISTRIBUTION:
        row = table[f"{m}_audio"]
        # InfoNCE tokens break the caption grammar
        if row["well_formed"] <= contrastive["well_formed"] + WELL_FORMED_OVER_CONTRASTIVE:
            failures.append(f"{m}: well-formed {row['well_formed']:.2f} not above contrastive's")
    return failures


def distillation_lifts(table) -> list[str]:
    failures = []
    for m in LIFTED:
        for key, margin in LIFT.items():
            before, after = table[f"{m}_audio"][key], table[f"{m}_audio_distilled"][key]
            if after < before + margin:
                failures.append(f"{m}: {key} {before:.3f} -> {after:.3f} distilled, not +{margin}")
    return failures


def audio_image_at_least_audio(table) -> list[str]:
    return [
        f"{m}: audio+image CIDEr-D {table[f'{m}_audio_image']['cider_d']:.3f} not "
        f"{AUDIO_IMAGE_OVER_AUDIO} above audio {table[f'{m}_audio']['cider_d']:.3f}"
        for m in OT_VARIANTS
        if table[f"{m}_audio_image"]["cider_d"]
        < table[f"{m}_audio"]["cider_d"] + AUDIO_IMAGE_OVER_AUDIO
    ]


CLAIMS = (
    aligned_above_untrained,
    distribution_above_contrastive,
    distillation_lifts,
    audio_image_at_least_audio,
)


# --------------------------------------------------------------------- the checks can fail


def made_up_table() -> dict[str, dict[str, float]]:
    """A table where every claim holds with room to spare; each unit test breaks one claim."""
    row = lambda cider, recall, precision, well_formed: {  # noqa: E731
        "cider_d": cider,
        "meteor": cider / 4,
        "class_recall": recall,
        "class_precision": precision,
        "well_formed": well_formed,
    }
    table = {"untrained": row(0.3, 0.15, 0.12, 0.3)}
    for m in ("mmd", "ot", "ot_att", "contrastive"):
        good = m != "contrastive"
        zero_shot = row(1.2 if good else 0.3, 0.5, 0.45, 0.7 if good else 0.1)
        table[f"{m}_audio"] = zero_shot
        table[f"{m}_audio_distilled"] = {k: v * 1.3 for k, v in zero_shot.items()}
        table[f"{m}_audio_image"] = {**zero_shot, "cider_d": zero_shot["cider_d"] + 0.5}
    return table


def test_the_made_up_table_passes_every_claim():
    table = made_up_table()
    assert [failure for claim in CLAIMS for failure in claim(table)] == []


@pytest.mark.parametrize(
    ("claim", "system", "key", "value"),
    [
        (aligned_above_untrained, "mmd_audio_distilled", "class_recall", 0.05),
        (distribution_above_contrastive, "ot_att_audio", "well_formed", 0.05),
        (distillation_lifts, "contrastive_audio_distilled", "cider_d", 0.3),
        (distillation_lifts, "ot_audio_distilled", "meteor", 0.305),
        (aligned_above_untrained, "ot_att_audio_distilled", "class_precision", 0.05),
        (audio_image_at_least_audio, "ot_att_audio_image", "cider_d", 1.0),
    ],
)
def test_each_claim_fails_where_its_ordering_is_broken(claim, system, key, value):
    table = made_up_table()
    table[system] = {**table[system], key: value}
    assert claim(table), (claim.__name__, system, key)


# --------------------------------------------------------------------- the run


@pytest.fixture(scope="module")
def table(tmp_path_factory, snakemake_in) -> dict[str, dict[str, float]]:
    workdir = tmp_path_factory.mktemp("miniature")
    (workdir / "config.yaml").write_text((REPO / "config.yaml").read_text())
    snakemake_in(workdir, timeout=3600)
    rows = csv.DictReader(open(workdir / "results" / "miniature" / "table.csv"))
    return {
        row["system"]: {k: float(v) for k, v in row.items() if v not in ("", None) and _number(v)}
        for row in rows
    }


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@pytest.mark.slow
def test_every_system_has_a_row_with_world_scores(table):
    systems = {"image", "untrained"}
    for method in ("mmd", "ot", "ot_att", "contrastive"):
        systems |= {f"{method}_audio", f"{method}_audio_image", f"{method}_audio_distilled"}
    assert systems <= set(table)
    for name in systems:
        for score in ("cider_d", "class_recall", "class_precision", "well_formed"):
            assert score in table[name], (name, score)


@pytest.mark.slow
@pytest.mark.parametrize("claim", CLAIMS, ids=lambda claim: claim.__name__)
def test_the_paper_claim_holds(table, claim):
    assert claim(table) == []


@pytest.mark.slow
def test_audio_names_off_screen_sounds_that_the_image_cannot(table):
    image = table["image"]["offscreen_recall"]
    for method in DISTRIBUTION:
        assert table[f"{method}_audio"]["offscreen_recall"] > OFFSCREEN_OVER_IMAGE * image, method
