"""The caption filter with tiny BLIP-2, LLaVA and GPT-2 of the real classes, and real MiniLM."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from dalipipe.data import filter as flt
from dalipipe.data.filter_merge import keep_count, merge
from dalipipe.data.filter_merge import main as filter_merge_main

CORPUS = ["a dog on the grass", "a red car in the street", "Dog, Bark", "Car, Vehicle"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from dalipipe.testing.checkpoints import make_tiny_blip2, make_tiny_gpt2, make_tiny_llava

    root = tmp_path_factory.mktemp("tiny")
    return {
        "blip2": str(make_tiny_blip2(root / "blip2", corpus=CORPUS)),
        "llava": str(make_tiny_llava(root / "llava", corpus=CORPUS)),
        "gpt2": str(make_tiny_gpt2(root / "gpt2", corpus=CORPUS)),
    }


def noise_image(seed, size=(40, 30)):
    """A random colour with noise: different enough that a random captioner tells them apart."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, 3) + rng.normal(0, 40, (size[1], size[0], 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_extract_part(root, clips):
    """The extract stage's layout: <clip_id>/frame_<kk>.jpg and manifest.csv."""
    root.mkdir(parents=True)
    with open(root / "manifest.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["clip_id", "status", "reason", "n_frames"])
        for k, (clip_id, status, n_frames) in enumerate(clips):
            writer.writerow([clip_id, status, "" if status == "ok" else "bad", n_frames])
            if status == "ok":
                (root / clip_id).mkdir()
                for j in range(n_frames):
                    noise_image(100 * k + j).save(root / clip_id / f"frame_{j:02d}.jpg")
    return root


def test_cosine_distance_exact():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    b = np.array([[0.0, 3.0], [2.0, 2.0], [-1.0, 0.0], [1.0, 0.0]])
    np.testing.assert_allclose(flt.cosine_distance(a, b), [1.0, 0.0, 2.0, 1.0], atol=1e-12)


def test_keep_count():
    assert [keep_count(k, 10) for k in (0.9, 0.25, 1.0, 3, 100)] == [9, 2, 10, 3, 10]
    with pytest.raises(ValueError, match="whole"):
        keep_count(2.5, 10)


def test_gpt2_embedding_is_the_mean_of_the_last_hidden_state(tiny):
    from transformers import AutoTokenizer, GPT2Model

    embed = flt.Gpt2Embedder(tiny["gpt2"])
    texts = ["Dog, Bark", "a red car in the street and a dog on the grass", ""]
    got = embed(texts, batch_size=8)
    tok = AutoTokenizer.from_pretrained(tiny["gpt2"])
    model = GPT2Model.from_pretrained(tiny["gpt2"]).eval()
    for text, row in zip(texts[:2], got[:2]):
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            expected = model(ids).last_hidden_state[0].mean(0).numpy()
        np.testing.assert_allclose(row, expected, atol=1e-5)  # padding in the batch changes nothing
    assert not got[2].any()  # an empty caption embeds to zero: distance 1


def test_minilm_distance_follows_meaning():
    embed = flt.MiniLmEmbedder()
    emb = embed(["Dog, Bark", "a dog barking in a yard", "a red car parked on a street"])
    near, far = flt.cosine_distance(emb[1:], emb[:1].repeat(2, 0))
    assert near < far - 0.2


def test_batched_captions_equal_one_by_one(tiny):
    from transformers import AutoProcessor, Blip2ForConditionalGeneration

    captioner = flt.FrameCaptioner(tiny["blip2"], prompt="", max_new_tokens=6)
    images = [noise_image(i) for i in range(5)]
    batched = captioner(images)
    processor = AutoProcessor.from_pretrained(tiny["blip2"])
    model = Blip2ForConditionalGeneration.from_pretrained(tiny["blip2"]).eval()
    for image, caption in zip(images, batched):
        inputs = processor(images=image, text="", return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1] :]
        assert caption == processor.decode(new, skip_special_tokens=True).strip()
    assert len(set(batched)) > 1  # the images differ, so should some captions


def test_llava_captioner_uses_the_prompt(tiny):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    prompt = flt.llava_prompt({"llava_template": "vicuna_v1", "llava_prompt": "What is this?"})
    assert prompt.startswith("A chat between") and prompt.endswith(
        "USER: <image>\nWhat is this? ASSISTANT:"
    )
    captioner = flt.FrameCaptioner(tiny["llava"], prompt=prompt, max_new_tokens=5)
    assert captioner.kind == "llava"
    images = [noise_image(i) for i in range(3)]
    processor = AutoProcessor.from_pretrained(tiny["llava"])
    model = LlavaForConditionalGeneration.from_pretrained(tiny["llava"]).eval()
    inputs = processor(images=images[1], text=prompt, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    expected = processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert captioner(images)[1] == expected.strip()


def test_filter_part_scores_skips_excludes_and_resumes(tiny, tmp_path, monkeypatch):
    extract = write_extract_part(
        tmp_path / "extract" / "part-0",
        [("aaaaaaaaaaa_0", "ok", 3), ("bbbbbbbbbbb_0", "ok", 2), ("ccccccccccc_0", "ok", 2),
         ("ddddddddddd_0", "failed", 0), ("eeeeeeeeeee_0", "ok", 1), ("ggggggggggg_0", "ok", 1)],
    )  # fmt: skip
    metadata = tmp_path / "metadata.jsonl"
    metadata.write_text(
        json.dumps({"clip_id": "ggggggggggg_0", "labels": ["Dog"], "split": "test"})
        + "\n"
        + "\n".join(
            json.dumps({"clip_id": c, "labels": labels, "split": "eval", "start_s": 0.0})
            for c, labels in [("aaaaaaaaaaa_0", ["Dog", "Bark"]), ("bbbbbbbbbbb_0", ["Car"]),
                              ("ccccccccccc_0", ["Dog"]), ("ddddddddddd_0", ["Dog"]),
                              ("eeeeeeeeeee_0", [])]
        )
    )  # fmt: skip
    eval_ids = tmp_path / "eval_ids.txt"
    eval_ids.write_text("ccccccccccc\n")
    params = {
        "device": "cpu",
        "filter": {"captioner": tiny["blip2"], "text_encoder": "gpt2", "gpt2": tiny["gpt2"],
                   "exclude_id_lists": [str(eval_ids)], "batch_size": 2, "max_new_tokens": 6,
                   "splits": ["eval"]},
    }  # fmt: skip
    out = tmp_path / "filter" / "part-0"
    summary = flt.run_filter(params, extract, metadata, out)
    assert (summary["scored"], summary["skipped"], summary["excluded_eval_ids"]) == (2, 2, 1)
    assert summary["frames_captioned"] == 5

    captions = {r["clip_id"]: r["captions"] for r in map(json.loads, open(out / "captions.jsonl"))}
    assert {c: len(v) for c, v in captions.items()} == {"aaaaaaaaaaa_0": 3, "bbbbbbbbbbb_0": 2}
    # batches of 2 run across clips (a0 a1 | a2 b0 | b1); each caption is its own frame's
    one_by_one = flt.FrameCaptioner(tiny["blip2"], prompt="", max_new_tokens=6)
    for clip_id, caps in captions.items():
        for k, caption in enumerate(caps):
            frame = Image.open(extract / clip_id / f"frame_{k:02d}.jpg").convert("RGB")
            assert caption == one_by_one([frame])[0]
    assert len({c for caps in captions.values() for c in caps}) > 1

    embed = flt.Gpt2Embedder(tiny["gpt2"])
    with open(out / "distances.csv", newline="") as f:
        rows = {r["clip_id"]: r for r in csv.DictReader(f)}
    for clip_id, label in [("aaaaaaaaaaa_0", "Dog, Bark"), ("bbbbbbbbbbb_0", "Car")]:
        caps = captions[clip_id]
        expected = flt.cosine_distance(embed(caps), embed([label]).repeat(len(caps), 0)).mean()
        assert float(rows[clip_id]["distance"]) == pytest.approx(expected, abs=2e-6)
    with open(out / "skipped.csv", newline="") as f:
        skipped = {r["clip_id"]: r["reason"] for r in csv.DictReader(f)}
    assert skipped == {"ddddddddddd_0": "extract status failed: bad",
                       "eeeeeeeeeee_0": "no labels in the metadata"}  # fmt: skip

    # A rerun reads the caption journal instead of captioning again.
    def no_captioner(*args, **kwargs):
        raise AssertionError("captioner loaded again")

    monkeypatch.setattr(flt, "FrameCaptioner", no_captioner)
    first = (out / "distances.csv").read_text()
    flt.run_filter(params, extract, metadata, out)
    assert (out / "distances.csv").read_text() == first


def test_filter_with_llava_and_minilm_via_cli(tiny, tmp_path):
    extract = write_extract_part(tmp_path / "x", [("fffffffffff_0", "ok", 2)])
    metadata = tmp_path / "m.jsonl"
    metadata.write_text(json.dumps({"clip_id": "fffffffffff_0", "labels": ["Dog"]}) + "\n")
    params = {"device": "cpu", "filter": {"captioner": "unused", "text_encoder": "minilm",
                                          "batch_size": 4, "max_new_tokens": 4,
                                          "splits": None}}  # every split: the clip has none  # fmt: skip
    argv = ["--params", json.dumps(params), "--extract", str(extract), "--metadata",
            str(metadata), "--out", str(tmp_path / "f"), "--captioner", tiny["llava"]]  # fmt: skip
    assert flt.main(argv) == 0
    summary = json.loads((tmp_path / "f" / "summary.json").read_text())
    assert summary["captioner"] == tiny["llava"] and summary["scored"] == 1
    assert "MiniLM" in summary["embedding"]


def write_part(path, rows, excluded):
    path.mkdir(parents=True)
    flt.write_distances(path / "distances.csv", [
        {"clip_id": c, "distance": d, "n_frames": 10, "labels": "Dog", "frame_distances": [d]}
        for c, d in rows
    ])  # fmt: skip
    (path / "summary.json").write_text(json.dumps(
        {"scored": len(rows), "skipped": 1, "excluded_eval_ids": excluded, "text_encoder": "gpt2"}
    ))  # fmt: skip


def test_merge_keeps_the_closest_clips(tmp_path):
    write_part(tmp_path / "part-0", [("c1", 0.30), ("c2", 0.10), ("c3", 0.50)], excluded=2)
    write_part(tmp_path / "part-1", [("c4", 0.20), ("c5", 0.10), ("c6", 0.90)], excluded=1)
    parts = [tmp_path / "part-0", tmp_path / "part-1"]
    summary = merge({"filter": {"keep": 0.5}}, parts, tmp_path)
    assert (tmp_path / "kept.txt").read_text().split() == ["c2", "c5", "c4"]  # ties by id
    assert summary["kept"] == 3 and summary["threshold_distance"] == pytest.approx(0.2)
    assert (summary["excluded_eval_ids"], summary["skipped"]) == (3, 2)
    with open(tmp_path / "distances.csv", newline="") as f:
        ranked = [(r["clip_id"], r["rank"], r["kept"]) for r in csv.DictReader(f)]
    assert ranked[-1] == ("c6", "5", "0") and ranked[2] == ("c4", "2", "1")
    assert (tmp_path / "histogram.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    merge({"filter": {"keep": 5}}, parts, tmp_path)
    assert (tmp_path / "kept.txt").read_text().split() == ["c2", "c5", "c4", "c1", "c3"]
    write_part(tmp_path / "dup", [("c1", 0.1)], excluded=0)
    with pytest.raises(ValueError, match="more than one filter part"):
        merge({"filter": {"keep": 1.0}}, [*parts, tmp_path / "dup"], tmp_path / "m")


@pytest.mark.parametrize("kind", ["blip2", "llava"])
def test_decode_workers_give_the_same_captions_and_resume(tiny, tmp_path, kind):
    """Frames decoded in 2 DataLoader processes: the same captions as in this process, and an
    interrupted run's journal is kept and extended, not redone."""
    extract = write_extract_part(
        tmp_path / "x", [("aaaaaaaaaaa_0", "ok", 3), ("bbbbbbbbbbb_0", "ok", 4),
                         ("ccccccccccc_0", "ok", 2)]
    )  # fmt: skip
    clips = [
        {"clip_id": c, "frames": flt.frame_paths(extract / c), "labels": ["Dog"]}
        for c in ("aaaaaaaaaaa_0", "bbbbbbbbbbb_0", "ccccccccccc_0")
    ]
    prompt = flt.llava_prompt({"llava_template": "plain", "llava_prompt": "What is this?"})

    def make():
        return flt.FrameCaptioner(tiny[kind], prompt=prompt, max_new_tokens=5)

    in_process = flt.caption_clips(clips, make, 4, tmp_path / "j0.jsonl", decode_workers=0)
    in_workers = flt.caption_clips(clips, make, 4, tmp_path / "j2.jsonl", decode_workers=2)
    assert in_workers == in_process
    assert len({c for caps in in_process.values() for c in caps}) > 1
    assert [len(in_process[c["clip_id"]]) for c in clips] == [3, 4, 2]

    # the first clip journalled, then killed: a rerun with workers captions only the rest
    journal = tmp_path / "resumed.jsonl"
    journal.write_text(
        json.dumps({"clip_id": "aaaaaaaaaaa_0", "captions": in_process["aaaaaaaaaaa_0"]}) + "\n"
    )
    seen = []

    class Counting(flt.FrameCaptioner):
        def generate(self, inputs):
            seen.append(len(inputs["input_ids"]))
            return super().generate(inputs)

    def make_counting():
        return Counting(tiny[kind], prompt=prompt, max_new_tokens=5)

    assert flt.caption_clips(clips, make_counting, 4, journal, decode_workers=2) == in_process
    assert seen == [4, 2]  # 6 frames of b and c, in batches of 4 across the clip boundary
    assert len(journal.read_text().splitlines()) == 3


def test_frame_preparer_gives_the_processor_output_in_the_model_dtype(tiny):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny["blip2"])
    images = [noise_image(i) for i in range(2)]
    got = flt.FramePreparer(processor, "", torch.bfloat16)(images)
    expected = processor(images=images, text=["", ""], return_tensors="pt", padding=True)
    assert got["pixel_values"].dtype == torch.bfloat16
    assert torch.equal(got["pixel_values"], expected["pixel_values"].to(torch.bfloat16))
    assert torch.equal(got["input_ids"], expected["input_ids"])


@pytest.mark.parametrize(
    "keep, scored, reason",
    [
        (0.1, [("c1", 0.3), ("c2", 0.1)], "filter.keep 0.1 keeps none of the 2 scored clips"),
        (0.9, [], "filter.keep 0.9 keeps none of the 0 scored clips"),
    ],
)
def test_a_filter_that_keeps_nothing_stops_leaving_no_kept_list(tmp_path, keep, scored, reason):
    write_part(tmp_path / "part-0", scored, excluded=4)
    out = tmp_path / "filter"
    assert filter_merge_main([
        "--params", json.dumps({"filter": {"keep": keep}}),
        "--parts", str(tmp_path / "part-0"), "--out", str(out),
    ]) == 1  # fmt: skip
    with pytest.raises(ValueError) as error:
        merge({"filter": {"keep": keep}}, [tmp_path / "part-0"], out)
    assert str(error.value) == (
        f"{reason} of 1 part(s) (1 skipped, 4 evaluation ids excluded); filter.splits and "
        "filter.keep decide what is scored and kept"
    )
    assert not out.exists()
