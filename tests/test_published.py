"""published.yaml against the paper's text: Tables 5 and 6 (App. G) list the DALI rows in one
fixed order, OT-Att, MMD, OT, then Contrastive (the argument is in published.yaml's comment and
docs/authors-implementation.md §11); every published row must be that table's row.

    pytest tests/test_published.py -x -q
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dalipipe.paper import published

PAPER = Path("/work/shared/paper/an-eye-for-an-ear.txt")
METRICS = ["bleu_4", "meteor", "rouge_l", "cider_d", "spice", "spider"]
ORDER = ["ot_att", "mmd", "ot", "contrastive"]  # the DALI rows of Tables 5 and 6, in order


def appendix_g_rows(text: str) -> list[list[list[float]]]:
    """The six scores of each DALI row of Tables 5 and 6, table by table, in printed order
    (other papers' rows and the headers left out)."""
    tables = []
    for block in text.split("Appendix G", 1)[1].split("| Alignment | BLEU_4")[1:]:
        rows = []
        for line in block.splitlines():
            if not line.startswith("|") or "Salewski" in line or "Shaharabany" in line:
                continue
            numbers = [float(x) for x in re.findall(r"(?<![\w.])\d+\.\d+", line)]
            if len(numbers) == 6:
                rows.append(numbers)
        tables.append(rows)
    return tables


def scores(entry: dict) -> list[float]:
    return [entry[m] for m in METRICS]


def entry(dataset: str, method: str, modality: str, distilled: bool) -> dict:
    (found,) = [
        e
        for e in published.load()["systems"]
        if (e["dataset"], e["method"], e["modality"], e["distilled"])
        == (dataset, method, modality, distilled)
    ]
    return found


@pytest.mark.skipif(not PAPER.is_file(), reason=f"{PAPER} (reference text) is not here")
def test_every_published_row_is_its_methods_row_of_tables_5_and_6():
    audiocaps, clotho = appendix_g_rows(PAPER.read_text(encoding="utf-8"))
    # Table 5: image only, four distilled DALI rows, +Image, four rows before distillation;
    # Table 6: four distilled rows, four before
    assert len(audiocaps) == 10 and len(clotho) == 8
    assert scores(entry("audiocaps", "", "image", False)) == audiocaps[0]
    assert scores(entry("audiocaps", "ot_att", "audio+image", True)) == audiocaps[5]
    for i, method in enumerate(ORDER):
        assert scores(entry("audiocaps", method, "audio", True)) == audiocaps[1 + i], method
        assert scores(entry("audiocaps", method, "audio", False)) == audiocaps[6 + i], method
        assert scores(entry("clotho", method, "audio", True)) == clotho[i], method
        assert scores(entry("clotho", method, "audio", False)) == clotho[4 + i], method
    # what the text says of them, in SPIDEr
    spider = {
        (m, d): entry("audiocaps", m, "audio", d)["spider"] for m in ORDER for d in (False, True)
    }
    assert (spider["mmd", False], spider["mmd", True]) == (0.1385, 0.1360)
    assert (spider["ot_att", False], spider["ot_att", True]) == (0.1443, 0.1592)
    assert (spider["ot", False], spider["ot", True]) == (0.1183, 0.1422)
    clotho_mmd, clotho_ot_att = (entry("clotho", m, "audio", True)["spider"] for m in ORDER[1::-1])
    assert clotho_ot_att < clotho_mmd < clotho_ot_att + 0.005  # "marginally outperforms"
