"""AudioSet selection on the real segment CSVs, class index and ontology in ../shared/data."""

import json
import re
from pathlib import Path

import pytest

from dalipipe.config import load_config
from dalipipe.data import audioset
from tests.support.snakemake import snakemake

DATA = Path("/work/shared/data")
AS = DATA / "audioset"
pytestmark = pytest.mark.skipif(not AS.exists(), reason="needs the shared AudioSet files")


@pytest.fixture(scope="module")
def class_index():
    return audioset.read_class_index(AS / "class_labels_indices.csv")


def test_real_files_parse_completely(class_index):
    assert len(class_index) == 527
    assert class_index["/m/09x0r"] == "Speech"
    segments, problems = audioset.read_segments(
        AS / "balanced_train_segments.csv", "balanced_train", class_index
    )
    assert problems == []
    assert len(segments) == 22160  # the header says num_segs=22160
    first = segments[0]
    assert (first.youtube_id, first.start_s, first.end_s) == ("--PJHxphWEs", 30.0, 40.0)
    assert first.labels == ["Speech", "Gush"]
    assert first.clip_id == "--PJHxphWEs_30000"


def test_malformed_rows_are_reported_by_line_and_skipped(tmp_path, class_index):
    csv_path = tmp_path / "segments.csv"
    csv_path.write_text(
        "# Segments csv\n"
        "# YTID, start_seconds, end_seconds, positive_labels\n"
        '--PJHxphWEs, 30.000, 40.000, "/m/09x0r"\n'  # line 3: fine
        'bad id!, 0.000, 10.000, "/m/09x0r"\n'  # line 4
        'abcdefghijk, ten, 20.000, "/m/09x0r"\n'  # line 5
        'abcdefghijk, 20.000, 10.000, "/m/09x0r"\n'  # line 6
        'abcdefghijk, 0.000, 10.000, "/m/nonexistent"\n'  # line 7
        "abcdefghijk, 0.000, 10.000\n"  # line 8
        'ABCDEFGHIJK, 23.700, 33.700, "/m/09x0r,/m/05tny_"\n'  # line 9: fine, fractional start
    )
    segments, problems = audioset.read_segments(csv_path, "eval", class_index)
    assert [s.clip_id for s in segments] == ["--PJHxphWEs_30000", "ABCDEFGHIJK_23700"]
    assert segments[1].labels == ["Speech", "Bark"]
    assert [p.split(":")[1] for p in problems] == ["4", "5", "6", "7", "8"]
    assert "bad YouTube id" in problems[0] and "not in the class index" in problems[3]


def test_class_names_expand_through_the_ontology(class_index):
    ontology = audioset.read_ontology(AS / "ontology.json")
    dog = audioset.resolve_classes(["dog"], class_index, ontology)
    assert {"/m/0bt9lr", "/m/05tny_", "/m/07r_k2n", "/m/07srf8z"} <= dog  # Dog, Bark, Yip, Bay
    assert len(dog) == 8
    assert audioset.resolve_classes(["/m/05tny_"], class_index, ontology) == {"/m/05tny_"}
    with pytest.raises(ValueError, match="unknown AudioSet class 'Dragon'"):
        audioset.resolve_classes(["Dragon"], class_index, ontology)


def test_audiocaps_ids_are_read_for_exclusion():
    val = audioset.read_id_list(DATA / "audiocaps" / "val.csv")
    test = audioset.read_id_list(DATA / "audiocaps" / "test.csv")
    assert (len(val), len(test)) == (495, 975)
    assert "7fmOlUlwoNg" in test


def test_selection_by_class_count_seed_and_exclusion(tmp_path, class_index):
    segments, _ = audioset.read_segments(AS / "eval_segments.csv", "eval", class_index)
    ontology = audioset.read_ontology(AS / "ontology.json")
    wanted = audioset.resolve_classes(["Dog"], class_index, ontology)
    pool = [s for s in segments if wanted.intersection(s.mids)]
    excluded = {s.youtube_id for s in pool[:7]}
    kw = dict(wanted_mids=wanted, exclude_ids=excluded, max_clips=50)
    chosen, counts = audioset.select_segments(segments, seed=3, **kw)
    again, _ = audioset.select_segments(list(reversed(segments)), seed=3, **kw)
    other, _ = audioset.select_segments(segments, seed=4, **kw)
    assert [s.clip_id for s in chosen] == [s.clip_id for s in again]  # CSV order does not matter
    assert [s.clip_id for s in chosen] != [s.clip_id for s in other]
    assert len(chosen) == 50 and counts["excluded_eval_ids"] == 7
    assert counts["not_in_classes"] == len(segments) - len(pool)
    assert not excluded & {s.youtube_id for s in chosen}
    parts = audioset.split_parts(chosen, 3)
    assert [len(p) for p in parts] == [17, 17, 16]
    assert sorted(s.clip_id for p in parts for s in p) == sorted(s.clip_id for s in chosen)


def select_eval(tmp_path, out: str, evaluation_id: str, **settings) -> tuple[dict, list[list]]:
    """`dalipipe audioset` over eval_segments.csv in two parts, `evaluation_id` on the list of
    evaluation ids it must leave out; `settings`: the other acquire.audioset keys. Returns its
    summary and the rows of each part."""
    ids = tmp_path / "eval_ids.txt"
    ids.write_text(evaluation_id + "\n")
    params = {
        "seed": 0,
        "acquire": {
            "parts": 2,
            "audioset": {
                "segments": {"eval": str(AS / "eval_segments.csv")},
                "class_index": str(AS / "class_labels_indices.csv"),
                "split": "eval",
                **settings,
            },
        },
        "filter": {"exclude_id_lists": [str(ids)]},
    }
    assert audioset.main(["--params", json.dumps(params), "--out", str(tmp_path / out)]) == 0
    summary = json.loads((tmp_path / out / "summary.json").read_text())
    return summary, [audioset.read_selection(tmp_path / out / f"part-{i}.jsonl") for i in range(2)]


def test_command_writes_parts_and_summary(tmp_path):
    summary, rows = select_eval(
        tmp_path,
        "sel",
        "--4gqARaEJE",  # the first row of eval_segments.csv
        ontology=str(AS / "ontology.json"),
        split_names={"eval": "align"},
        classes=["Dog"],
        max_clips=None,
    )
    assert summary["parts"] == [len(rows[0]), len(rows[1])]
    assert summary["excluded_eval_ids"] == 1  # --4gqARaEJE is labelled Dog
    assert all(r.split == "align" and r.youtube_id != "--4gqARaEJE" for p in rows for r in p)
    assert sum(summary["parts"]) == summary["selected"] > 100


def test_rule_files_build_the_audioset_and_filter_jobs(tmp_path):
    """rules/audioset.smk and rules/filter.smk, with common.smk and acquire.smk (the gather rule of
    every source), in a Snakemake dry run."""

    import yaml

    repo = Path(__file__).resolve().parents[1]
    for name in ("rules",):
        (tmp_path / name).symlink_to(repo / name)
    config = load_config()  # config.yaml with the schema's defaults
    config["acquire"].update(source="audioset", parts=3)
    config["acquire"]["audioset"].update(
        segments={"eval": str(AS / "eval_segments.csv")},
        class_index=str(AS / "class_labels_indices.csv"),
        ontology=str(AS / "ontology.json"),
        split=["eval"],
        split_names={"eval": "align"},  # a split the shards take (dalipipe/config_checks.py)
        subset=str(tmp_path / "subset.csv"),  # an input of the selection: missing at first
    )
    config["filter"]["captioner"] = "Salesforce/blip2-opt-2.7b"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "Snakefile").write_text(
        'configfile: "config.yaml"\n'
        + "".join(
            f'include: "rules/{f}.smk"\n' for f in ("common", "acquire", "audioset", "filter")
        )
    )
    for i in range(3):  # the extract stage is another rule file's
        (tmp_path / f"results/{config['run']}/extract/part-{i}").mkdir(parents=True)

    def dry_run():
        return snakemake(
            "-n", "--cores", "1", f"results/{config['run']}/filter/kept.txt",
            cwd=tmp_path, timeout=120,
        )  # fmt: skip

    result = dry_run()
    assert result.returncode != 0 and "subset.csv" in result.stdout + result.stderr
    (tmp_path / "subset.csv").write_text("YTID\n--4gqARaEJE\n")
    result = dry_run()
    assert result.returncode == 0, result.stderr[-2000:]
    jobs = dict(re.findall(r"^(\w+)\s+(\d+)$", result.stdout + result.stderr, re.M))
    assert jobs == {"audioset_select": "1", "audioset_download": "3", "acquire_gather": "1",
                    "filter_part": "3", "filter_merge": "1", "total": "9"}  # fmt: skip


def test_subset_file_formats_are_read(tmp_path):
    """The authors' 500k list: its exact format is not public, so the usual ones are read."""
    cases = {
        # a header naming the columns (any case), starts in seconds
        "ytid.csv": "YTID,start_seconds\n--4gqARaEJE,0.000\n--BfvyPmVMo,20\n",
        # pandas' index column first, CAV-MAE/AudioSet file names carrying the start
        "files.csv": ",file_id,set\n0,Y--4gqARaEJE_0.000_10.000,x\n1,--BfvyPmVMo_20.000,x\n",
        # a segment CSV without header (comment lines), or a plain list of ids
        "segments.csv": "# YTID, start_seconds, end_seconds, positive_labels\n"
        '--4gqARaEJE, 0.000, 10.000, "/m/068hy"\n--BfvyPmVMo, 20.000, 30.000, "/m/03l9g"\n',
        "ids.txt": "--4gqARaEJE\n--BfvyPmVMo\n",
        # the authors' CAV-MAE training list (AS500k.json)
        "AS500k.json": json.dumps(
            {"data": [{"video_id": "--4gqARaEJE", "wav": "/x.wav"}, {"video_id": "--BfvyPmVMo"}]}
        ),
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        subset = audioset.read_subset(tmp_path / name)
        assert set(subset) == {"--4gqARaEJE", "--BfvyPmVMo"}, name
        with_starts = name in ("ytid.csv", "files.csv", "segments.csv")
        assert subset["--BfvyPmVMo"] == ({20000} if with_starts else None), name
    (tmp_path / "none.csv").write_text("name\nnot an id\n")
    with pytest.raises(ValueError, match="no YouTube ids found"):
        audioset.read_subset(tmp_path / "none.csv")


def test_subset_restricts_the_selection_to_the_clips_it_lists(tmp_path, class_index):
    segments, _ = audioset.read_segments(AS / "eval_segments.csv", "eval", class_index)
    listed = segments[100:160]
    rows = [f"{s.youtube_id},{s.start_s}" for s in listed[:50]]
    rows += [f"{s.youtube_id},{s.start_s + 1}" for s in listed[50:55]]  # another start: not it
    rows += [s.youtube_id for s in listed[55:]]  # no start: any segment of the video
    rows += ["zzzzzzzzzzz,0"]  # a video in none of the splits read
    subset_file = tmp_path / "subset.csv"
    subset_file.write_text("youtube_id,start_seconds\n" + "\n".join(rows) + "\n")
    evaluation_id = listed[0].youtube_id  # evaluation ids still never train
    settings = {"ontology": None, "classes": [], "subset": str(subset_file)}
    summary, parts = select_eval(tmp_path, "sel", evaluation_id, **settings)
    chosen = [r for part in parts for r in part]
    expected = {s.clip_id for s in listed[1:50] + listed[55:]}
    assert {r.clip_id for r in chosen} == expected
    assert summary["selected"] == len(expected) == 54 and summary["excluded_eval_ids"] == 1
    assert summary["not_in_subset"] == len(segments) - 60 + 5
    assert summary["subset"] == {"path": str(subset_file), "videos_listed": 61, "videos_found": 55}
    # with a count on top: a seeded sample of the subset
    _, parts = select_eval(tmp_path, "ten", evaluation_id, **settings, max_clips=10)
    ten = [r for part in parts for r in part]
    assert len(ten) == 10 and {r.clip_id for r in ten} <= expected
