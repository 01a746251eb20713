"""The AudioSet path end to end through Snakemake, against a local video host.

    HF_HUB_OFFLINE=1 pytest tests/test_audioset_workflow.py

metadata -> audioset_select -> audioset_download (2 parts, real yt-dlp + ffmpeg against
tests/support/video_host.py) -> acquire_gather -> extract -> filter (tiny BLIP-2 captions, tiny
GPT-2 embeddings: the paper's path) -> filter_merge -> shard (align), in a scratch directory. The
metadata is written here in Google's formats (segment CSVs with their comment header, the class
index, an ontology) with one malformed row, one clip outside the selected classes and one id of
an evaluation set. The host answers 404, 403, a truncated body and a stalled response for some
ids; each such clip must end as a non-ok manifest row and nothing else may suffer.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import yaml

from dalipipe.data.shard_reader import load_split
from tests.support.video_host import make_video, serve_videos

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
RUN = "audioset-e2e"
TARGET = f"results/{RUN}/shards/align"

BARK, DOG, MUSIC, GUITAR, SPEECH = "/m/05tny_", "/m/0bt9lr", "/m/04rlf", "/m/0342h", "/m/09x0r"
CLASS_INDEX = [  # index,mid,display_name: the real rows of these classes
    (0, SPEECH, "Speech"), (72, "/m/0jbk", "Animal"), (73, "/m/068hy", "Domestic animals, pets"),
    (74, DOG, "Dog"), (75, BARK, "Bark"), (137, MUSIC, "Music"),
    (138, "/m/04szw", "Musical instrument"), (139, "/m/0fx80y", "Plucked string instrument"),
    (140, GUITAR, "Guitar"),
]  # fmt: skip
ONTOLOGY = [  # the real tree above these classes, cut to them
    ("/m/09x0r", "Speech", []),
    ("/m/0jbk", "Animal", ["/m/068hy"]),
    ("/m/068hy", "Domestic animals, pets", ["/m/0bt9lr"]),
    ("/m/0bt9lr", "Dog", ["/m/05tny_"]),
    ("/m/05tny_", "Bark", []),
    ("/m/04rlf", "Music", ["/m/04szw"]),
    ("/m/04szw", "Musical instrument", ["/m/0fx80y"]),
    ("/m/0fx80y", "Plucked string instrument", ["/m/0342h"]),
    ("/m/0342h", "Guitar", []),
]

EXCLUDED = "evalClip001"  # in an evaluation set: never downloaded, never sharded
# youtube id -> (AudioSet split, start, end, mids, what the host does, expected status)
SEGMENTS = {
    "barkDog0001": ("balanced_train", 2.0, 12.0, [BARK], None, "ok"),
    "guitarMus01": ("balanced_train", 5.0, 15.0, [GUITAR, MUSIC], None, "ok"),
    "goneVideo01": ("balanced_train", 0.0, 10.0, [BARK], "missing", "unavailable"),
    EXCLUDED: ("balanced_train", 0.0, 10.0, [BARK], None, None),
    "musicOnly01": ("unbalanced_train", 10.0, 20.0, [MUSIC], None, "ok"),
    "dogBark0002": ("unbalanced_train", 0.0, 10.0, [BARK, DOG], None, "ok"),
    "flakyGuit01": ("unbalanced_train", 3.0, 13.0, [GUITAR], "flaky", "ok"),
    "slowMusic01": ("unbalanced_train", 14.0, 20.0, [MUSIC], "slow", "ok"),  # 6 s: video's end
    "goneVideo02": ("unbalanced_train", 4.0, 14.0, [MUSIC], "missing", "unavailable"),
    "blockedVid1": ("unbalanced_train", 0.0, 10.0, [GUITAR], "forbidden", "blocked"),
    "truncVideo1": ("unbalanced_train", 0.0, 10.0, [BARK], "trunc", "error"),
    "stallVideo1": ("unbalanced_train", 0.0, 10.0, [MUSIC], "stall", "error"),
    "speechOnly1": ("unbalanced_train", 0.0, 10.0, [SPEECH], None, None),  # not in the classes
}
MALFORMED = 'tooShort, 0.000, 10.000, "/m/05tny_"'  # an 8-character id
NAMES = {mid: name for _, mid, name in CLASS_INDEX}
OK = {v for v, s in SEGMENTS.items() if s[5] == "ok"}
SECONDS = {v: round(SEGMENTS[v][2] - SEGMENTS[v][1]) for v in OK}  # one frame per second
KEEP = 0.5


def clip_id(vid: str) -> str:
    return f"{vid}_{round(SEGMENTS[vid][1] * 1000)}"


def write_metadata(root: Path) -> dict:
    """Segment CSVs, class index, ontology and an AudioCaps-style evaluation list under root."""
    root.mkdir(parents=True)
    paths = {}
    for split in ("balanced_train", "unbalanced_train"):
        rows = [(v, s) for v, s in SEGMENTS.items() if s[0] == split]
        lines = [
            "# Segments csv created Sun Mar  5 10:54:31 2017",
            f"# num_ytids={len(rows)}, num_segs={len(rows)}, num_unique_labels=5",
            "# YTID, start_seconds, end_seconds, positive_labels",
        ]
        lines += [f'{v}, {s[1]:.3f}, {s[2]:.3f}, "{",".join(s[3])}"' for v, s in rows]
        if split == "balanced_train":
            lines.insert(5, MALFORMED)
        paths[split] = root / f"{split}_segments.csv"
        paths[split].write_text("\n".join(lines) + "\n")
    paths["class_index"] = root / "class_labels_indices.csv"
    paths["class_index"].write_text(
        "index,mid,display_name\n" + "".join(f'{i},{m},"{n}"\n' for i, m, n in CLASS_INDEX)
    )
    paths["ontology"] = root / "ontology.json"
    nodes = [{"id": i, "name": n, "description": "", "child_ids": c} for i, n, c in ONTOLOGY]
    paths["ontology"].write_text(json.dumps(nodes))
    paths["exclude"] = root / "audiocaps_test.csv"  # one id in the segments, one not
    paths["exclude"].write_text(
        "audiocap_id,youtube_id,start_time,caption\n"
        f"103549,{EXCLUDED},0,A dog barks twice\n"
        "103550,notInTheSet,30,Music plays\n"
    )
    return paths


def overlay(paths: dict, url_template: str, tiny) -> dict:
    return {
        "run": RUN,
        "device": "cpu",
        "acquire": {
            "source": "audioset",
            "parts": 2,
            "audioset": {
                "segments": {s: str(paths[s]) for s in ("balanced_train", "unbalanced_train")},
                "class_index": str(paths["class_index"]),
                "ontology": str(paths["ontology"]),
                "split": ["balanced_train", "unbalanced_train"],
                "split_names": {"balanced_train": "align", "unbalanced_train": "align"},
                "classes": ["Animal", "Music"],  # Bark, Dog, Guitar through the ontology
                "url_template": url_template,
                "height": 120,
                "retries": 1,
                "backoff_s": 0.1,
                "rate_limit": 0,
                "socket_timeout": 2.5,  # the stalled id answers after 6 s; margin for a busy CI
            },
        },
        "filter": {
            "enabled": True,
            "captioner": str(tiny.blip2),
            "text_encoder": "gpt2",
            "gpt2": str(tiny.gpt2),
            "keep": KEEP,
            "exclude_id_lists": [str(paths["exclude"])],
            "splits": ["align"],
            "batch_size": 16,
            "max_new_tokens": 6,
        },
        "shard": {"samples_per_shard": 2},
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_models, snakemake_in):
    """The workflow run once; yields (results dir, host, snakemake output, scratch dir)."""
    root = tmp_path_factory.mktemp("audioset-e2e")
    video = root / "video.mp4"
    make_video(video)  # 20 s: every segment lies inside it
    paths = write_metadata(root / "audioset")
    behaviours = {v: s[4] for v, s in SEGMENTS.items() if s[4]}
    with serve_videos(video.read_bytes(), behaviours, stall_s=6.0) as host:
        workdir = root / "work"
        workdir.mkdir()
        shutil.copy(REPO / "config.yaml", workdir / "config.yaml")
        config = workdir / "audioset.yaml"
        config.write_text(yaml.safe_dump(overlay(paths, host.url_template, tiny_models)))
        output = snakemake_in(workdir, TARGET, "--configfile", str(config))
        yield workdir / "results" / RUN, host, output, (workdir, config)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_selection_reports_malformed_excluded_and_other_classes(run):
    results, *_ = run
    summary = json.loads((results / "acquire/selection/summary.json").read_text())
    assert {k: summary[k] for k in ("read", "malformed", "excluded_eval_ids", "not_in_classes",
                                    "duplicate", "selected")} == {
        "read": 13, "malformed": 1, "excluded_eval_ids": 1, "not_in_classes": 1,
        "duplicate": 0, "selected": 11,
    }  # fmt: skip
    assert re.search(r"balanced_train_segments\.csv:6: bad YouTube id 'tooShort'",
                     summary["malformed_rows"][0])  # fmt: skip
    assert sorted(summary["parts"]) == [5, 6]


def test_every_failure_is_a_manifest_row_with_its_status(run):
    results, host, *_ = run
    manifest = read_csv(results / "acquire/manifest.csv")
    status = {row["clip_id"]: row["status"] for row in manifest}
    expected = {clip_id(v): s[5] for v, s in SEGMENTS.items() if s[5]}
    assert status == expected
    assert Counter(status.values()) == {"ok": 6, "unavailable": 2, "blocked": 1, "error": 2}
    by_id = {row["clip_id"]: row for row in manifest}
    for row in manifest:
        assert (row["status"] == "ok") == bool(row["path"]) == (row["reason"] == "")
        assert row["split"] == "align"
    assert "404" in by_id[clip_id("goneVideo01")]["reason"]
    assert "403" in by_id[clip_id("blockedVid1")]["reason"]
    assert "timed out" in by_id[clip_id("stallVideo1")]["reason"]
    assert "ffmpeg exited" in by_id[clip_id("truncVideo1")]["reason"]
    assert by_id[clip_id("guitarMus01")]["labels"] == "Guitar;Music"
    # the two acquire parts are the selection's parts, with all statuses kept
    parts = [read_csv(results / f"acquire/part-{i}/manifest.csv") for i in range(2)]
    assert sorted(len(p) for p in parts) == [5, 6]
    # what the host saw: final failures once, retried ones twice, never the excluded id
    assert host.requests["goneVideo01"] == host.requests["goneVideo02"] == 1
    assert host.requests["blockedVid1"] == 2 and host.requests["flakyGuit01"] >= 2
    assert host.requests[EXCLUDED] == 0 and host.requests["speechOnly1"] == 0

    summary = json.loads((results / "acquire/summary.json").read_text())
    assert summary["clips"] == 11 and summary["parts"] == 2
    assert summary["status"] == {"ok": 6, "unavailable": 2, "blocked": 1, "error": 2}
    assert summary["splits"] == {"align": summary["status"]}
    reasons = summary["top_failure_reasons"]  # grouped by cause, without the clip's id
    assert sum(reasons.values()) == 5
    assert reasons["Unable to download webpage: HTTP Error 404: Not Found"] == 2
    assert reasons["Unable to download webpage: HTTP Error 403: Forbidden"] == 1
    assert [k for k in reasons if k.startswith("Unable to download webpage: HTTPConnectionPool")
            and k.endswith("Read timed out. (read timeout=2.5)")]  # fmt: skip
    assert [k for k in reasons if k.startswith("ffmpeg exited with code")]
    metadata = [json.loads(line) for line in (results / "acquire/metadata.jsonl").open()]
    assert {m["clip_id"] for m in metadata} == set(expected)
    guitar = next(m for m in metadata if m["youtube_id"] == "guitarMus01")
    assert (guitar["labels"], guitar["start_s"], guitar["end_s"]) == (["Guitar", "Music"], 5, 15)


def test_extract_takes_the_ok_clips_and_lists_the_rest_as_failed(run):
    results, *_ = run
    rows = [r for i in range(2) for r in read_csv(results / f"extract/part-{i}/manifest.csv")]
    assert len(rows) == 11
    ok = {r["clip_id"]: int(r["n_frames"]) for r in rows if r["status"] == "ok"}
    assert ok == {clip_id(v): SECONDS[v] for v in OK}
    assert all("not acquired" in r["reason"] for r in rows if r["status"] != "ok")


def test_filter_captions_scores_and_keeps(run):
    results, *_ = run
    captions = [
        json.loads(line)
        for i in range(2)
        for line in (results / f"filter/part-{i}/captions.jsonl").open()
    ]
    assert {c["clip_id"]: len(c["captions"]) for c in captions} == {
        clip_id(v): SECONDS[v] for v in OK
    }
    assert sum(len(c["captions"]) for c in captions) == sum(SECONDS.values()) == 56
    distances = read_csv(results / "filter/distances.csv")
    assert {d["clip_id"] for d in distances} == {clip_id(v) for v in OK}
    for d in distances:
        frame_d = [float(x) for x in d["frame_distances"].split()]
        assert len(frame_d) == int(d["n_frames"]) == SECONDS[d["clip_id"].rsplit("_", 1)[0]]
        assert abs(sum(frame_d) / len(frame_d) - float(d["distance"])) < 1e-5
        assert 0.0 <= float(d["distance"]) <= 2.0
    ranked = sorted(distances, key=lambda d: (float(d["distance"]), d["clip_id"]))
    n_keep = round(KEEP * len(OK))
    kept = (results / "filter/kept.txt").read_text().split()
    assert kept == [d["clip_id"] for d in ranked[:n_keep]] and len(kept) == 3
    assert [int(d["kept"]) for d in ranked] == [1] * 3 + [0] * 3
    assert (results / "filter/histogram.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((results / "filter/summary.json").read_text())
    assert {k: summary[k] for k in ("parts", "scored", "kept", "skipped", "excluded_eval_ids",
                                    "frames_captioned", "text_encoder")} == {
        "parts": 2, "scored": 6, "kept": 3, "skipped": 5, "excluded_eval_ids": 0,
        "frames_captioned": 56, "text_encoder": "gpt2",
    }  # fmt: skip


def test_shards_hold_exactly_the_kept_clips(run):
    results, *_ = run
    kept = (results / "filter/kept.txt").read_text().split()
    index = json.loads((results / "shards/align/index.json").read_text())
    assert index["total"] == 3 and [s["count"] for s in index["shards"]] == [2, 1]
    # the evaluation id never reached the metadata, so the shard stage's own check finds none
    assert index["counts"] == {"excluded_eval_ids": 0, "filtered_out": 8, "written": 3}
    samples = load_split(results / "shards/align")
    assert [s["clip_id"] for s in samples] == sorted(kept)
    for sample in samples:
        assert len(sample["frames"]) == sample["meta"]["n_frames"]
        assert sample["meta"]["n_frames"] == SECONDS[sample["meta"]["youtube_id"]]
        assert sample["fbank"].shape == (256, 64)
    members = [
        name
        for tar in sorted((results / "shards/align").glob("*.tar"))
        for name in tarfile.open(tar).getnames()
    ]
    assert not [m for m in members if EXCLUDED in m]
    assert not list(results.rglob(f"*{EXCLUDED}*"))  # no file of the evaluation clip anywhere


def test_a_second_run_does_nothing(run, snakemake_in):
    *_, (workdir, config) = run
    assert "Nothing to be done" in snakemake_in(workdir, TARGET, "--configfile", str(config))


def test_a_changed_keep_reruns_only_the_merge_and_the_shards(run, snakemake_in):
    """filter.keep is read by the merge alone: a dry run plans no captioning."""
    *_, (workdir, config) = run
    settings = yaml.safe_load(config.read_text())
    settings["filter"]["keep"] = 2
    changed = config.with_name("audioset-keep-2.yaml")
    changed.write_text(yaml.safe_dump(settings))
    output = snakemake_in(workdir, TARGET, "-n", "--configfile", str(changed))
    jobs = dict(re.findall(r"^(\w+)\s+(\d+)$", output, re.M))
    assert jobs == {"filter_merge": "1", "shard": "1", "total": "2"}


def test_a_changed_caption_setting_recaptions_and_downloads_nothing(run, snakemake_in):
    """filter.max_new_tokens 6 -> 3: the filter parts rerun and caption again (greedy decoding:
    each new caption is the start of the old one), nothing is fetched, extracted or reselected.
    The caption journal of the first run must not be reused for the new settings."""
    results, host, _, (workdir, config) = run
    before = [
        json.loads(line)
        for i in range(2)
        for line in (results / f"filter/part-{i}/captions.jsonl").open()
    ]
    settings = yaml.safe_load(config.read_text())
    settings["filter"]["max_new_tokens"] = 3
    changed = config.with_name("audioset-3-tokens.yaml")
    changed.write_text(yaml.safe_dump(settings))
    requests = sum(host.requests.values())
    output = snakemake_in(workdir, TARGET, "--configfile", str(changed))
    jobs = dict(re.findall(r"^(\w+)\s+(\d+)$", output, re.M))
    assert jobs == {"filter_part": "2", "filter_merge": "1", "shard": "1", "total": "4"}
    assert sum(host.requests.values()) == requests
    after = {
        row["clip_id"]: row["captions"]
        for i in range(2)
        for row in map(json.loads, (results / f"filter/part-{i}/captions.jsonl").open())
    }
    pairs = [
        (old, new) for row in before for old, new in zip(row["captions"], after[row["clip_id"]])
    ]
    assert len(pairs) == 56 and all(old.startswith(new) for old, new in pairs)
    assert sum(len(new) < len(old) for old, new in pairs) > 28
