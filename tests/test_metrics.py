"""Caption metrics against values that are known independently of this code.

HF_HUB_OFFLINE=1 pytest tests/test_metrics.py -x -q
"""

from __future__ import annotations

import json
import math
import zipfile

import pytest

from dalipipe.scoring import assets, fense, metrics

# Papineni et al. 2002, "BLEU: a Method for Automatic Evaluation of Machine Translation", §2.1:
# candidate 1 and its three references. The paper gives the unigram precision 17/18; NLTK
# documents sentence_bleu on this quadruple as 0.5045666840058485 (nltk/translate/bleu_score.py,
# modified precisions 17/18, 10/17, 7/16, 4/15, brevity penalty 1).
PAPINENI_CANDIDATE = "It is a guide to action which ensures that the military always obeys the commands of the party."
PAPINENI_REFERENCES = [
    "It is a guide to action that ensures that the military will forever heed Party commands.",
    "It is the guiding principle which guarantees the military forces always being under the "
    "command of the Party.",
    "It is the practical guide for the army always to heed the directions of the party.",
]


@pytest.fixture(scope="module")
def scored():
    """One Java round trip for most checks: three clips with known answers."""
    predictions = {
        "papineni": PAPINENI_CANDIDATE,
        "dog": "A dog barks loudly",
        "rain": "",  # an untrained captioner can say nothing; that must score 0, not crash
    }
    references = {
        "papineni": PAPINENI_REFERENCES,
        "dog": ["The dog barks."],
        "rain": ["Rain falls on a tin roof.", "Heavy rain on a roof"],
    }
    return metrics.score_captions(predictions, references)


def test_bleu_matches_published_papineni_example(scored):
    _, per_clip, _ = scored
    clip = per_clip["papineni"]
    assert clip["bleu_1"] == pytest.approx(17 / 18, abs=1e-6)
    assert clip["bleu_2"] == pytest.approx(math.sqrt(17 / 18 * 10 / 17), abs=1e-6)
    assert clip["bleu_4"] == pytest.approx(0.5045666840058485, abs=1e-6)


def test_rouge_l_is_the_lcs_f_measure_with_beta_1_2(scored):
    # Lin 2004: LCS("a dog barks loudly", "the dog barks") = 2, P = 2/4, R = 2/3, beta = 1.2.
    _, per_clip, _ = scored
    p, r, b2 = 2 / 4, 2 / 3, 1.2**2
    assert per_clip["dog"]["rouge_l"] == pytest.approx((1 + b2) * p * r / (r + b2 * p), abs=1e-9)


def test_empty_caption_scores_zero_and_spice_is_reported_missing(scored, monkeypatch, tmp_path):
    corpus, per_clip, notes = scored
    assert per_clip["rain"]["bleu_4"] == pytest.approx(0, abs=1e-6)
    assert per_clip["rain"]["cider_d"] == 0
    assert per_clip["rain"]["meteor"] == 0
    assert set(corpus) == set(metrics.METRICS)
    if assets.spice_missing_reason() is not None:
        assert corpus["spice"] is None and corpus["spider"] is None
        assert notes["spider"].startswith("not computed: Stanford CoreNLP 3.6.0 missing")


def test_cider_d_of_a_perfect_caption_is_ten():
    # With disjoint vocabularies across two clips every n-gram has idf log(2), and a caption
    # equal to all its references has cosine 1 at each n = 1..4 and no length penalty: 10 * 1.
    # Two words have only 1- and 2-grams: 10 * 2/4.
    predictions = {"a": "a dog barks loudly", "b": "heavy rain falls softly", "c": "wind blows"}
    references = {
        "a": ["a dog barks loudly"] * 2,
        "b": ["heavy rain falls softly"] * 2,
        "c": ["wind blows"] * 2,
    }
    corpus, per_clip, _ = metrics.score_captions(predictions, references, spice=False)
    assert per_clip["a"]["cider_d"] == pytest.approx(10.0, abs=1e-9)
    assert per_clip["b"]["cider_d"] == pytest.approx(10.0, abs=1e-9)
    assert per_clip["c"]["cider_d"] == pytest.approx(10.0 * 2 / 4, abs=1e-9)
    assert per_clip["a"]["meteor"] > 0.5


def test_spice_missing_message_names_the_jar(tmp_path):
    reason = assets.spice_missing_reason(tmp_path)
    assert reason.startswith("Stanford CoreNLP 3.6.0 missing")
    assert str(tmp_path / "stanford-corenlp-3.6.0.jar") in reason
    for name in assets.CORENLP_JARS:
        (tmp_path / name).write_bytes(b"jar")
    assert assets.spice_missing_reason(tmp_path) is None


def test_missing_prediction_is_an_error_naming_the_clip():
    with pytest.raises(ValueError, match="no prediction for 1 clip.*'b'"):
        metrics.score_captions({"a": "x"}, {"a": ["x"], "b": ["y"]})


def test_bad_files_name_the_file(tmp_path):
    bad = tmp_path / "refs.json"
    bad.write_text('{"a": "not a list"}')
    with pytest.raises(ValueError, match=r"refs\.json: references of clip 'a'"):
        metrics.load_references(bad)
    broken = tmp_path / "preds.json"
    broken.write_text("{")
    with pytest.raises(ValueError, match=r"preds\.json: not valid JSON"):
        metrics.load_predictions(broken)


def test_score_command_writes_per_clip_scores(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(assets, "spice_lib_dir", lambda: tmp_path / "nolib")
    preds = tmp_path / "p.json"
    refs = tmp_path / "r.json"
    preds.write_text(json.dumps({"captions": {"x": "a bird sings", "y": "a car passes"}}))
    refs.write_text(json.dumps({"x": ["a bird sings"], "y": ["an engine hums"]}))
    per_clip = tmp_path / "per_clip.json"
    out = tmp_path / "scores.json"
    rc = metrics.main(
        [
            "--predictions",
            str(preds),
            "--references",
            str(refs),
            "--per-clip",
            str(per_clip),
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "spider         not computed: Stanford CoreNLP 3.6.0 missing" in printed
    clips = json.loads(per_clip.read_text())
    assert clips["x"]["bleu_1"] == pytest.approx(1.0, abs=1e-6)
    assert clips["y"]["bleu_1"] < 0.5
    saved = json.loads(out.read_text())
    assert saved["scores"]["spice"] is None and saved["n_clips"] == 2


def test_asset_paths_and_extraction(tmp_path):
    assert (
        assets.CORENLP_URL
        == "http://nlp.stanford.edu/software/stanford-corenlp-full-2015-12-09.zip"
    )
    assert assets.spice_lib_dir().name == "lib"
    assert (assets.spice_lib_dir().parent / "spice-1.0.jar").is_file()
    archive = tmp_path / "corenlp.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for member in assets.members_in_archive():
            zf.writestr(member, f"content of {member}")
        zf.writestr("stanford-corenlp-full-2015-12-09/README.txt", "other files are left out")
    dest = tmp_path / "lib"
    written = assets.extract_jars(archive, dest)
    assert sorted(p.name for p in dest.iterdir()) == sorted(assets.CORENLP_JARS)
    assert written[1].read_text().endswith("stanford-corenlp-3.6.0-models.jar")


def test_fetch_failure_message_says_what_to_do(tmp_path):
    with pytest.raises(ConnectionError, match="could not download file:///.*needs internet access"):
        assets.fetch(f"file://{tmp_path}/absent.zip", dest=tmp_path / "lib")
    not_zip = tmp_path / "x.zip"
    not_zip.write_text("html error page")
    with pytest.raises(ValueError, match=r"x\.zip: not a zip archive"):
        assets.extract_jars(not_zip, tmp_path / "lib")


def test_minilm_similarity_ranks_a_paraphrase_above_an_unrelated_caption():
    from dalipipe.scoring.embedding import caption_similarity

    close, far = caption_similarity(
        ["a dog is barking", "a violin plays a melody"],
        [["a dog barks loudly"], ["a dog barks loudly"]],
    )
    assert close > 0.6 and far < 0.3


def test_spider_is_the_mean_of_cider_d_and_spice_and_a_spice_failure_is_reported(monkeypatch):
    def fake_spice(gts, res, corenlp=None):  # stands in for Java; SPIDEr arithmetic is ours
        if any("fails" in caps[0] for caps in res.values()):
            raise OSError("cannot write cache")
        return 0.25, [0.25 for _ in res]

    monkeypatch.setattr(assets, "spice_missing_reason", lambda lib_dir=None: None)
    monkeypatch.setattr(metrics, "_spice", fake_spice)
    refs = {"a": ["a dog barks loudly"] * 2, "b": ["heavy rain falls softly"] * 2}
    results = metrics.score_many(
        {
            "ok": {"a": "a dog barks loudly", "b": "heavy rain falls softly"},
            "bad": {"a": "it fails", "b": "x"},
        },
        refs,
    )
    ok, _, ok_notes = results["ok"]
    assert ok["spice"] == 0.25 and ok["spider"] == pytest.approx((10.0 + 0.25) / 2)
    assert set(ok_notes) == {"fense", "spider_fl"}  # no FENSE models given
    bad, bad_clips, bad_notes = results["bad"]
    assert bad["spider"] is None and bad_clips["a"]["spice"] is None
    assert bad_notes["spice"] == "not computed: SPICE failed (cannot write cache)"


def test_score_command_names_the_bad_file_and_exits_2(tmp_path, capsys):
    refs = tmp_path / "refs.json"
    refs.write_text('{"a": ["x"]}')
    rc = metrics.main(["--predictions", str(tmp_path / "absent.json"), "--references", str(refs)])
    assert rc == 2 and "absent.json: file not found" in capsys.readouterr().err


@pytest.mark.parametrize(
    "predictions, references, error",
    [
        ('{"a": "x", "b": "y", "a": "z"}', '{"a": ["x"], "b": ["y"]}',
         "preds.json: clip id 'a' appears more than once"),
        ('{"captions": {"a": "x"}}', '{"a": ["x"], "a": ["y"]}',
         "refs.json: clip id 'a' appears more than once"),
        ('{"a": "x"}', '{"a": ["x", "  "]}', "refs.json: reference 2 of clip 'a' is blank"),
    ],
)  # fmt: skip
def test_score_refuses_duplicate_ids_and_blank_references(
    tmp_path, capsys, predictions, references, error
):
    (tmp_path / "preds.json").write_text(predictions)
    (tmp_path / "refs.json").write_text(references)
    out = tmp_path / "scores.json"
    rc = metrics.main([
        "--predictions", str(tmp_path / "preds.json"), "--references", str(tmp_path / "refs.json"),
        "--out", str(out), "--no-spice",
    ])  # fmt: skip
    assert rc == 2 and capsys.readouterr().err.strip().endswith(f"{tmp_path}/{error}")
    assert not out.exists()


# ------------------------------------------------------------------ Vocab, FENSE, SPIDEr-FL

TINY_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + (
    "a the dog barks loudly heavy rain falls softly on tin roof bird sings car passes engine hums"
).split()


def _tiny_bert(path, seed):
    """A 2-layer, 32-wide BERT and its word-level WordPiece tokenizer, saved in ``path``."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path.mkdir(parents=True)
    (path / "vocab.txt").write_text("\n".join(TINY_WORDS) + "\n")
    BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    config = BertConfig(
        vocab_size=len(TINY_WORDS),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    torch.manual_seed(seed)
    model = BertModel(config)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def fense_models(tmp_path_factory):
    """A tiny sentence encoder, and two echeckers in the released checkpoint's format whose
    classifier answers the same error probability for every caption: 0.95 and 0.85, either
    side of the 0.9 threshold."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    root = tmp_path_factory.mktemp("fense")
    _tiny_bert(root / "sbert-bert", seed=1)
    encoder = SentenceTransformer(
        modules=[Transformer(str(root / "sbert-bert")), Pooling(32, "mean")]
    )
    encoder.save(str(root / "sbert"))
    bert = _tiny_bert(root / "echecker-bert", seed=2)
    checkpoints = {}
    for prob in (0.95, 0.85):
        state = {f"encoder.{k}": v for k, v in bert.state_dict().items()}
        state["encoder.embeddings.position_ids"] = torch.arange(128)[None]  # as released
        state["clf.weight"] = torch.zeros(6, 32)
        # the sixth output is "error"; the other five are the error kinds
        state["clf.bias"] = torch.tensor([0.0] * 5 + [math.log(prob / (1 - prob))])
        ckpt = root / f"echecker-{prob}.ckpt"
        torch.save({"model_type": "bert-base-uncased", "num_classes": 6, "state_dict": state}, ckpt)
        checkpoints[prob] = fense.FenseModels(
            str(root / "sbert"), str(ckpt), str(root / "echecker-bert")
        )
    return checkpoints


def test_vocab_counts_distinct_ptb_words_of_a_system(scored):
    corpus, _, notes = scored
    # Papineni's candidate has 16 distinct lower-cased words ("the" three times), "a dog barks
    # loudly" adds dog, barks, loudly; the empty caption adds nothing.
    assert corpus["vocab"] == 19 and isinstance(corpus["vocab"], int)
    assert fense.vocab_size(["a dog barks", "a dog", ""]) == 3
    # no FENSE models configured: null with the reason, never a value
    assert corpus["fense"] is None and corpus["spider_fl"] is None
    assert notes["fense"] == "not computed: evaluate.fense.echecker is not set " + (
        "(configs/paper.yaml sets and fetches it)"
    )


def test_spider_fl_is_spider_times_one_tenth_where_the_echecker_flags_an_error():
    assert fense.spider_fl([0.5, 0.4, 0.0], [1.0, 0.0, 1.0]) == pytest.approx([0.05, 0.4, 0.0])


def test_fense_penalises_a_caption_only_above_the_error_threshold(fense_models):
    captions = ["a dog barks loudly", "heavy rain falls on a tin roof"]
    refs = [["a dog barks loudly"], ["a bird sings", "a car passes"]]
    flagged = fense.FluencyScorer(fense_models[0.95]).score(captions, refs)
    passed = fense.FluencyScorer(fense_models[0.85]).score(captions, refs)
    assert flagged["error_prob"] == pytest.approx([0.95, 0.95], abs=1e-6)
    assert flagged["fluency_error"] == [1.0, 1.0] and passed["fluency_error"] == [0.0, 0.0]
    # a caption equal to its only reference has cosine 1 under any encoder
    assert passed["sbert_sim"][0] == pytest.approx(1.0, abs=1e-5)
    assert -1.0 <= passed["sbert_sim"][1] < 0.999
    assert passed["fense"] == pytest.approx(passed["sbert_sim"], abs=1e-6)
    assert flagged["sbert_sim"] == pytest.approx(passed["sbert_sim"], abs=1e-6)
    assert flagged["fense"] == pytest.approx([0.1 * s for s in passed["sbert_sim"]], abs=1e-6)


def test_spider_fl_and_fense_in_the_scores(fense_models, monkeypatch):
    monkeypatch.setattr(assets, "spice_missing_reason", lambda lib_dir=None: None)
    monkeypatch.setattr(
        metrics, "_spice", lambda gts, res, corenlp=None: (0.25, [0.25 for _ in res])
    )
    refs = {"a": ["a dog barks loudly"] * 2, "b": ["heavy rain falls softly"] * 2}
    preds = {"a": "A dog barks loudly.", "b": "heavy rain falls softly"}
    corpus, per_clip, notes = metrics.score_captions(preds, refs, fense=fense_models[0.95])
    assert not notes and corpus["vocab"] == 8  # a dog barks loudly heavy rain falls softly
    # CIDEr-D 10 and SPICE 0.25 (see above) give SPIDEr 5.125; the echecker flags both
    assert corpus["spider"] == pytest.approx(5.125)
    assert corpus["spider_fl"] == pytest.approx(0.5125)
    assert per_clip["a"]["fense"] == pytest.approx(0.1, abs=1e-5)  # cosine 1, penalised
    assert corpus["fense"] == pytest.approx(0.1, abs=1e-5)


def test_a_missing_fense_model_is_null_with_the_path_in_the_reason(fense_models, tmp_path):
    models = fense.FenseModels(
        str(tmp_path / "absent"), fense_models[0.95].echecker, fense_models[0.95].echecker_encoder
    )
    assert models.missing_reason(sentence_encoder=False) is None
    reason = models.missing_reason(sentence_encoder=True)
    assert reason == f"evaluate.fense.sentence_encoder: {tmp_path / 'absent'} not found" + (
        " (rules/fetch.smk fetches it)"
    )
    scores = fense.FluencyScorer(models).score(["a dog barks"], [["a dog barks"]])
    assert scores["fluency_error"] == [1.0] and "fense" not in scores


def test_a_bad_echecker_checkpoint_names_the_file(fense_models, tmp_path):
    import torch

    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {}}, bad)
    with pytest.raises(ValueError, match=r"bad\.ckpt: not an echecker checkpoint \(no model_type"):
        fense.load_echecker(bad, fense_models[0.95].echecker_encoder)
    torch.save({"model_type": "bert-base-uncased", "num_classes": 6, "state_dict": {}}, bad)
    with pytest.raises(ValueError, match=r"bad\.ckpt: does not fit the encoder config"):
        fense.load_echecker(bad, fense_models[0.95].echecker_encoder)
