"""Caption metrics: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, SPICE and SPIDEr, as in pycocoevalcap;
Vocab, SPIDEr-FL and FENSE, as in aac-metrics (dalipipe/scoring/fense.py).

    dalipipe score --predictions P.json --references R.json [--per-clip FILE] [--out FILE]
                   [--embedding] [--no-spice]
                   [--sentence-encoder DIR --echecker CKPT --echecker-encoder DIR]

P.json maps clip id -> caption (or holds that map under "captions"); R.json maps clip id -> list
of reference captions. Captions and references are PTB-tokenised by Stanford's tokenizer (Java),
as the COCO caption toolkit and the audio-captioning literature do. SPICE (and so SPIDEr =
(CIDEr-D + SPICE) / 2) needs the Stanford CoreNLP 3.6.0 jars (`dalipipe fetch-metric-assets`);
without them both are reported as null with the reason, never estimated. FENSE needs its
sentence encoder and fluency-error detector, SPIDEr-FL the detector and SPICE: without them they
are null with the reason too.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import subprocess
from pathlib import Path

from dalipipe.common import setup_logging, write_json
from dalipipe.scoring import assets
from dalipipe.scoring.fense import FenseModels, FluencyScorer, spider_fl, vocab_size

log = logging.getLogger(__name__)

METRICS = [
    "bleu_1",
    "bleu_2",
    "bleu_3",
    "bleu_4",
    "meteor",
    "rouge_l",
    "cider_d",
    "spice",
    "spider",
    "spider_fl",
    "fense",
    "vocab",
]
EMBEDDING_METRIC = "minilm_cosine"  # sentence-transformers all-MiniLM-L6-v2, mean cosine to refs


def load_predictions(path: str | Path) -> dict[str, str]:
    """Clip id -> caption, from ``{"id": "caption"}`` or ``{"captions": {...}}``."""
    data = _read_json(path)
    if isinstance(data, dict) and isinstance(data.get("captions"), dict):
        data = data["captions"]
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object clip id -> caption")
    for clip_id, caption in data.items():
        if not isinstance(caption, str):
            raise ValueError(f"{path}: caption of clip {clip_id!r} is not a string")
    return data


def load_references(path: str | Path) -> dict[str, list[str]]:
    """Clip id -> list of reference captions."""
    data = _read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object clip id -> list of references")
    for clip_id, refs in data.items():
        if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
            raise ValueError(
                f"{path}: references of clip {clip_id!r} must be a non-empty list of str"
            )
        for number, ref in enumerate(refs, 1):
            if not ref.strip():  # a blank reference would count as a caption no one can match
                raise ValueError(f"{path}: reference {number} of clip {clip_id!r} is blank")
    return data


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple]) -> dict:
    """A JSON object's pairs as a dict; a key given twice is an error (json keeps the last)."""
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def _read_json(path: str | Path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"), object_pairs_hook=_unique_keys)
    except _DuplicateKey as err:
        raise ValueError(f"{path}: clip id {err.args[0]!r} appears more than once") from None
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


def ptb_tokenize(
    systems: dict[str, dict[str, str]], references: dict[str, list[str]]
) -> tuple[dict[str, dict[str, list[str]]], dict[str, list[str]]]:
    """Lower-cased PTB tokens without punctuation, in one Java call for every system and the refs."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # Tuple keys keep each system's captions apart from each other and from the references.
    joined = {("ref", k): [{"caption": r} for r in refs] for k, refs in references.items()}
    for name, captions in systems.items():
        joined |= {("sys", name, k): [{"caption": v}] for k, v in captions.items()}
    tokens = PTBTokenizer().tokenize(joined)
    res = {
        name: {k: tokens[("sys", name, k)] for k in captions} for name, captions in systems.items()
    }
    gts = {k: tokens[("ref", k)] for k in references}
    return res, gts


def _check_ids(name: str, predictions: dict[str, str], references: dict[str, list[str]]) -> None:
    missing_refs = sorted(set(predictions) - set(references))
    if missing_refs:
        raise ValueError(
            f"{name}: no references for {len(missing_refs)} clip(s), e.g. {missing_refs[:3]}"
        )
    missing_preds = sorted(set(references) - set(predictions))
    if missing_preds:
        raise ValueError(
            f"{name}: no prediction for {len(missing_preds)} clip(s), e.g. {missing_preds[:3]}"
        )
    if not predictions:
        raise ValueError(f"{name}: no captions to score")


def score_captions(
    predictions: dict[str, str],
    references: dict[str, list[str]],
    *,
    spice: bool = True,
    embedding: bool = False,
    fense: FenseModels | None = None,
) -> tuple[dict, dict[str, dict], dict[str, str]]:
    """Corpus scores, per-clip scores and a note for every metric not computed.

    Every clip with a prediction must have references; clips with references but no prediction
    are an error too, so a missing caption can never raise a score.
    """
    return score_many(
        {"captions": predictions}, references, spice=spice, embedding=embedding, fense=fense
    )["captions"]


def score_many(
    systems: dict[str, dict[str, str]],
    references: dict[str, list[str]],
    *,
    spice: bool = True,
    embedding: bool = False,
    fense: FenseModels | None = None,
    corenlp: str | None = None,
) -> dict[str, tuple[dict, dict[str, dict], dict[str, str]]]:
    """``score_captions`` for several systems at once: one tokenizer run and one METEOR process,
    which is most of the time on small sets (Java start-up). ``fense``: where FENSE's models
    are (config ``evaluate.fense``); None, or a model missing, leaves FENSE and SPIDEr-FL null."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge

    for name, predictions in systems.items():
        _check_ids(name, predictions, references)
    # corenlp: the folder of CoreNLP's jars (config evaluate.corenlp); None: pycocoevalcap's lib
    reason = assets.spice_missing_reason(corenlp) if spice else "not requested (--no-spice)"
    tokens, gts_all = ptb_tokenize(systems, references)
    fluency = FluencyScorer(fense or FenseModels())
    meteor = Meteor()
    results = {}
    try:
        for name, res in tokens.items():
            ids = list(res)
            gts = {k: gts_all[k] for k in ids}
            corpus: dict[str, float | None] = {}
            per_clip: dict[str, dict] = {k: {} for k in ids}
            notes: dict[str, str] = {}

            def keep(metric, score, scores, corpus=corpus, per_clip=per_clip, ids=ids):
                corpus[metric] = float(score)
                for k, s in zip(ids, scores):
                    per_clip[k][metric] = float(s)

            bleu, bleu_clips = Bleu(4).compute_score(gts, res, verbose=0)
            for n in range(4):
                keep(f"bleu_{n + 1}", bleu[n], bleu_clips[n])
            keep("meteor", *meteor.compute_score(gts, res))
            keep("rouge_l", *Rouge().compute_score(gts, res))
            # pycocoevalcap's Cider is CIDEr-D: clipped n-gram counts, a length penalty (sigma 6).
            keep("cider_d", *Cider().compute_score(gts, res))
            spice_reason = reason
            if spice_reason is None:
                try:
                    score, scores = _spice(gts, res, corenlp)
                except (OSError, subprocess.CalledProcessError, ValueError) as err:
                    # SPICE writes a cache beside its jar and needs memory; a failure there
                    # leaves the other metrics standing and says why SPICE is missing.
                    spice_reason = f"SPICE failed ({err})"
                    log.warning("%s: %s", name, spice_reason)
            if spice_reason is None:
                keep("spice", score, scores)
                corpus["spider"] = (corpus["cider_d"] + corpus["spice"]) / 2
                for k in ids:
                    per_clip[k]["spider"] = (per_clip[k]["cider_d"] + per_clip[k]["spice"]) / 2
            else:
                for metric in ("spice", "spider"):
                    corpus[metric] = None
                    notes[metric] = f"not computed: {spice_reason}"
                    for k in ids:
                        per_clip[k][metric] = None
            _add_fluency_metrics(fluency, res, gts, corpus, per_clip, notes)
            if embedding:
                from dalipipe.scoring.embedding import caption_similarity

                captions = systems[name]
                sims = caption_similarity([captions[k] for k in ids], [references[k] for k in ids])
                keep(EMBEDDING_METRIC, sum(sims) / len(sims), sims)
            corpus = {
                k: (None if v is not None and math.isnan(v) else v) for k, v in corpus.items()
            }
            results[name] = (corpus, per_clip, notes)
    finally:
        _close_meteor(meteor)
    return results


def _add_fluency_metrics(fluency: FluencyScorer, res, gts, corpus, per_clip, notes) -> None:
    """Vocab, FENSE and SPIDEr-FL of one system, on the PTB-tokenised captions (as aac-metrics'
    ``evaluate`` scores them); a metric that cannot be computed is null with its reason."""
    ids = list(res)
    corpus["vocab"] = vocab_size([res[k][0] for k in ids])
    scores = fluency.score([res[k][0] for k in ids], [gts[k] for k in ids])
    for metric, reason in (
        ("fense", fluency.fense_missing),
        ("spider_fl", fluency.fluency_missing),
    ):
        if metric == "spider_fl" and reason is None and corpus["spider"] is None:
            reason = f"SPIDEr is null ({notes['spider'].removeprefix('not computed: ')})"
        if reason is not None:
            corpus[metric] = None
            notes[metric] = f"not computed: {reason}"
            for k in ids:
                per_clip[k][metric] = None
            continue
        if metric == "spider_fl":
            values = spider_fl([per_clip[k]["spider"] for k in ids], scores["fluency_error"])
        else:
            values = scores["fense"]
        corpus[metric] = sum(values) / len(values)
        for k, v in zip(ids, values):
            per_clip[k][metric] = v
    for k, p in zip(ids, scores.get("error_prob", [])):
        per_clip[k]["fluency_error_prob"] = p


def _spice(gts, res, corenlp: str | None = None) -> tuple[float, list[float]]:
    """SPICE F-score, corpus and per clip (Java; parses with Stanford CoreNLP 3.6.0)."""
    if corenlp is not None:
        return assets.run_spice(gts, res, corenlp)
    from pycocoevalcap.spice.spice import Spice

    score, scores = Spice().compute_score(gts, res)
    return float(score), [float(s["All"]["f"]) for s in scores]


def _close_meteor(scorer) -> None:
    """Reap METEOR's Java process now rather than whenever the scorer is collected."""
    scorer.meteor_p.stdin.close()
    scorer.meteor_p.kill()
    scorer.meteor_p.wait()
    scorer.meteor_p.stdout.close()
    scorer.meteor_p.stderr.close()


def format_scores(corpus: dict, notes: dict[str, str]) -> str:
    """One line per metric, the reason in place of a value that was not computed."""
    lines = []
    for name, value in corpus.items():
        if value is None:
            lines.append(f"{name:14s} {notes.get(name, 'null')}")
        else:  # a count (vocab) as it is
            lines.append(
                f"{name:14s} {value}" if isinstance(value, int) else f"{name:14s} {value:.4f}"
            )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dalipipe score", description=__doc__.split("\n\n")[0])
    parser.add_argument("--predictions", required=True, help="JSON: clip id -> caption")
    parser.add_argument("--references", required=True, help="JSON: clip id -> list of captions")
    parser.add_argument("--per-clip", help="write per-clip scores to this JSON file")
    parser.add_argument("--out", help="write corpus scores (and notes) to this JSON file")
    parser.add_argument("--embedding", action="store_true", help="add MiniLM cosine similarity")
    parser.add_argument("--no-spice", action="store_true", help="skip SPICE even if available")
    parser.add_argument("--sentence-encoder", help="FENSE's Sentence-BERT folder")
    parser.add_argument("--echecker", help="FENSE's fluency-error detector checkpoint")
    parser.add_argument("--echecker-encoder", help="folder with the echecker's BERT config")
    args = parser.parse_args(argv)
    models = FenseModels(args.sentence_encoder, args.echecker, args.echecker_encoder)
    setup_logging()
    try:
        predictions = load_predictions(args.predictions)
        references = load_references(args.references)
        corpus, per_clip, notes = score_captions(
            predictions,
            references,
            spice=not args.no_spice,
            embedding=args.embedding,
            fense=models,
        )
    except (OSError, ValueError) as err:
        log.error("%s", err)
        return 2
    print(format_scores(corpus, notes))
    if args.out:
        write_json(args.out, {"scores": corpus, "notes": notes, "n_clips": len(predictions)})
    if args.per_clip:
        write_json(args.per_clip, per_clip)
    return 0
