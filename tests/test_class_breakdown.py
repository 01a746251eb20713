"""`dalipipe class-breakdown`: per-class recall, on a run written by hand.

    pytest tests/test_class_breakdown.py -q

The run holds metadata, two systems' captions and one pseudo-label file, so every recall is
known by counting.
"""

from __future__ import annotations

import json

import pytest

from dalipipe.cli import main as cli_main
from dalipipe.world.class_breakdown import per_class_recall

METADATA = {
    "t0": {"clip_id": "t0", "heard": ["dog", "bell"], "seen": ["dog"]},
    "t1": {"clip_id": "t1", "heard": ["dog"], "seen": ["dog"]},
    "t2": {"clip_id": "t2", "heard": ["bell"], "seen": []},
    "p0": {"clip_id": "p0", "heard": ["siren"], "seen": ["siren", "frog"]},
    "p1": {"clip_id": "p1", "heard": ["frog"], "seen": ["frog"]},
}


def test_per_class_recall_counts_each_heard_class_per_clip():
    captions = {"t0": "a dog barks", "t1": "dogs bark", "t2": "a dog barks and a bell chimes"}
    # dog: heard in t0, t1, named in both (plural counts); bell: heard in t0, t2, named in t2
    assert per_class_recall(captions, METADATA) == {"bell": 0.5, "dog": 1.0}


def test_per_class_recall_needs_metadata_for_every_clip():
    with pytest.raises(ValueError, match="no world metadata .*t9"):
        per_class_recall({"t9": "a dog barks"}, METADATA)


def write_run(run) -> None:
    (run / "acquire").mkdir(parents=True)
    with open(run / "acquire" / "metadata.jsonl", "w") as f:
        f.writelines(json.dumps(m) + "\n" for m in METADATA.values())
    evaluate = run / "evaluate" / "miniature"
    evaluate.mkdir(parents=True)
    systems = {
        "image": {"t0": "a dog barks", "t1": "a dog barks", "t2": "a siren wails"},
        "ot_audio": {"t0": "a bell chimes", "t1": "a frog croaks", "t2": "a bell chimes"},
    }
    for name, captions in systems.items():
        (evaluate / f"{name}.json").write_text(json.dumps({"name": name, "captions": captions}))
    (run / "pseudolabel").mkdir()
    rows = [
        {"clip_id": "p0", "caption": "a siren wails and a frog croaks"},
        {"clip_id": "p1", "caption": "a frog croaks"},
    ]
    with open(run / "pseudolabel" / "ot.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def breakdown_args(run) -> list[str]:
    return [
        "class-breakdown",
        *("--metadata", str(run / "acquire" / "metadata.jsonl")),
        *("--evaluate", str(run / "evaluate" / "miniature")),
        *("--pseudolabels", str(run / "pseudolabel" / "ot.jsonl")),
    ]


def test_class_breakdown_command_writes_both_tables(tmp_path):
    write_run(tmp_path / "run")
    out = tmp_path / "classes.md"
    assert cli_main([*breakdown_args(tmp_path / "run"), "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert "| system | bell | dog |" in lines
    assert "| image | 0.00 | 1.00 |" in lines
    assert "| ot_audio | 1.00 | 0.00 |" in lines
    # pseudo-labels: 2 of 2 heard named; 3 named, 2 heard; both captions well-formed; no
    # off-screen object in the pool (None, shown empty)
    assert "| ot | 2 | 1.00 | 0.67 | 1.00 |  |" in lines


def test_class_breakdown_names_the_folder_without_results(tmp_path):
    write_run(tmp_path / "run")
    for path in (tmp_path / "run" / "evaluate" / "miniature").iterdir():
        path.unlink()
    with pytest.raises(FileNotFoundError, match="evaluate/miniature"):
        cli_main(breakdown_args(tmp_path / "run"))
