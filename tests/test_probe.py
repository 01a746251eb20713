"""The image-bias probe (Table 2): its naming rates, and a run on tiny models.

HF_HUB_OFFLINE=1 pytest tests/test_probe.py -x -q
"""

from __future__ import annotations

import csv
import json

import pytest

from dalipipe.paper import probe
from tests.support.runs import make_model_run

METAS = {
    "a": {"heard": ["dog"], "seen": ["dog", "bell"]},  # bell: seen, silent
    "b": {"heard": ["siren"], "seen": []},  # siren: off screen
    "c": {"heard": ["bell"], "seen": ["frog"]},  # frog: seen, silent
}


def test_naming_rates_count_seen_only_heard_and_absent_objects():
    captions = {"a": "a photo of a bell and a dog", "b": "a dog barks", "c": "a frog"}
    rates = probe.naming_rates(captions, METAS)
    # seen, not heard: bell (a), frog (c): both named
    assert rates["seen_only"] == 1.0 and rates["seen_only_count"] == 2
    # heard: dog (a, named), siren (b, not), bell (c, not)
    assert rates["heard"] == pytest.approx(1 / 3) and rates["heard_count"] == 3
    # the world here: dog, bell, siren, frog; neither seen nor heard: a {siren, frog},
    # b {dog, bell, frog} (dog named), c {dog, siren} -> 1 of 7
    assert rates["absent"] == pytest.approx(1 / 7) and rates["absent_count"] == 7
    # one answer describes a photo (a), one is a sound caption (b), one neither (c)
    assert rates["photo_form"] == pytest.approx(1 / 3)
    assert rates["sound_form"] == pytest.approx(1 / 3)
    sounds = probe.naming_rates({"b": "a siren wails and a dog barks"}, METAS)
    assert sounds["sound_form"] == 1 and sounds["photo_form"] == 0


def test_naming_rates_need_world_metadata_and_none_where_nothing_counts():
    assert probe.naming_rates({"x": "a dog"}, {"x": {"references": []}}) == {}
    rates = probe.naming_rates({"b": "a siren wails"}, {"b": METAS["b"]})
    assert rates["seen_only"] is None and rates["heard"] == 1.0 and rates["absent"] is None


def test_outputs_hold_the_captions_side_by_side(tmp_path):
    result = {
        "dataset": "miniature",
        "prompt": "What can you see? Answer concisely",
        "clips": ["a", "b"],
        "systems": ["image", "mmd"],
        "captions": {"image": {"a": "a dog", "b": "nothing"}, "mmd": {"a": "a | bell", "b": "x"}},
        "world": {k: METAS[k] for k in ("a", "b")},
        "rates": {s: probe.naming_rates({"a": "a dog", "b": "x"}, METAS) for s in ("image", "mmd")},
    }
    probe.write_outputs(result, tmp_path / "probe")
    with open(tmp_path / "probe.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[0] == {"clip_id": "a", "heard": "dog", "seen": "dog bell", "image": "a dog",
                       "mmd": "a | bell"}  # fmt: skip
    md = (tmp_path / "probe.md").read_text()
    assert "| a | a dog | a / bell |" in md and "| mmd | 0.00 (of 1) | 0.50 (of 2) |" in md
    assert "| answers as a photo | answers as sounds |" in md
    page = (tmp_path / "probe.html").read_text()
    assert "What can you see? Answer concisely" in page and "a | bell" in page
    assert json.loads((tmp_path / "probe.json").read_text()) == result


@pytest.mark.slow
def test_probe_asks_every_encoder_without_the_prefix(tmp_path, monkeypatch):
    from dalipipe.models.captioner import AudioCaptioner

    root = make_model_run(tmp_path / "run")
    asked = []
    generate = AudioCaptioner.generate

    def spy(self, **kwargs):
        asked.append({k: kwargs[k] for k in ("modality", "use_prefix", "prompt", "do_sample")})
        return generate(self, **kwargs)

    monkeypatch.setattr(AudioCaptioner, "generate", spy)
    params = {
        "seed": 0,
        "device": "cpu",
        "evaluate": {"max_new_tokens": 5, "batch_size": 4, "figures": {"probe_clips": 5}},
    }
    align = [root / "align" / "mmd", root / "align" / "ot_att"]
    shards = root / "shards" / "test"
    result = probe.probe(
        params, "miniature", shards, root / "models" / "llava", align, tmp_path / "p"
    )
    assert result["systems"] == ["image", "untrained", "mmd", "ot_att"]
    assert result["clips"] == [f"clip-{i:03d}" for i in range(5)]
    assert all(len(result["captions"][s]) == 5 for s in result["systems"])
    # two batches (4 + 1) per system, each without the prefix, greedy, with the probe's question
    assert [a["modality"] for a in asked] == ["image"] * 2 + ["audio"] * 6
    assert all(a["prompt"] == "What can you see? Answer concisely" for a in asked)
    assert not any(a["use_prefix"] or a["do_sample"] for a in asked)
    # the synthetic world's metadata gives each system its naming rates
    assert set(result["rates"]) == set(result["systems"])
    assert result["rates"]["mmd"]["heard_count"] == 5
    assert (tmp_path / "p.html").is_file() and (tmp_path / "p.csv").is_file()
    # the same settings give the same answers (greedy, seeded untrained encoder)
    again = probe.probe(
        params, "miniature", shards, root / "models" / "llava", align, tmp_path / "q"
    )
    assert again["captions"] == result["captions"]
