"""FENSE, SPIDEr-FL and Vocab: the captioning metrics DCASE ranks with today, via aac-metrics.

- FENSE (Zhou et al., ICASSP 2022; DCASE 2024's ranking metric): the Sentence-BERT cosine
  (paraphrase-TinyBERT-L6-v2) of a caption to each of its references, averaged, multiplied by
  1 - 0.9 when a fluency-error detector ("echecker", a BERT classifier trained on Clotho and
  AudioCaps captions) gives the caption an error probability above 0.9.
- SPIDEr-FL (DCASE 2023): SPIDEr with the same fluency penalty.
- Vocab: how many distinct words a system's captions use, over the whole test set.

The arithmetic is aac-metrics' (``fense``, ``_spider_fl_from_outputs``, ``vocab``), fed the
PTB-tokenised captions as its ``evaluate`` feeds them. The models are read from disk only
(config ``evaluate.fense``, fetched by rules/fetch.smk): the sentence encoder as a
sentence-transformers folder, the echecker as its released checkpoint plus the folder with the
config and tokenizer of the BERT it was trained from (bert-base-uncased). Without them the
metric is null with the reason, never a stand-in.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# The metric's definition (FENSE's evaluator, DCASE 2023's SPIDEr-FL), not settings.
PENALTY = 0.9
ERROR_THRESHOLD = 0.9


@dataclass(frozen=True)
class FenseModels:
    """Where the models are: config ``evaluate.fense``; None where not configured."""

    sentence_encoder: str | None = None
    echecker: str | None = None
    echecker_encoder: str | None = None

    @classmethod
    def from_settings(cls, settings: dict | None) -> FenseModels:
        settings = settings or {}
        return cls(
            **{k: settings.get(k) for k in ("sentence_encoder", "echecker", "echecker_encoder")}
        )

    def missing_reason(self, *, sentence_encoder: bool) -> str | None:
        """Why the fluency check (and, with ``sentence_encoder``, FENSE) cannot run, or None."""
        needed = ["echecker", "echecker_encoder"] + (
            ["sentence_encoder"] if sentence_encoder else []
        )
        for key in needed:
            path = getattr(self, key)
            if not path:
                return f"evaluate.fense.{key} is not set (configs/paper.yaml sets and fetches it)"
            if not Path(path).exists():
                return f"evaluate.fense.{key}: {path} not found (rules/fetch.smk fetches it)"
        return None


def vocab_size(tokenised: list[str]) -> int:
    """Distinct words over all captions (aac-metrics' ``vocab.cands``, split on spaces)."""
    from aac_metrics.functional.vocab import vocab

    return int(vocab(list(tokenised), None, return_all_scores=False).item())


def spider_fl(spider: list[float], fluency_errors: list[float]) -> list[float]:
    """Per-clip SPIDEr-FL from per-clip SPIDEr and the echecker's 0/1 verdicts."""
    import torch
    from aac_metrics.functional.spider_fl import _spider_fl_from_outputs

    spider_t = torch.tensor(spider, dtype=torch.float64)
    fer_t = torch.tensor(fluency_errors, dtype=torch.float64)
    _, sents = _spider_fl_from_outputs(
        ({"spider": spider_t.mean()}, {"spider": spider_t}),
        ({"fer": fer_t.mean()}, {"fer": fer_t}),
        PENALTY,
    )
    return [float(v) for v in sents["spider_fl"]]


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_echecker(checkpoint: str | Path, encoder_dir: str | Path, device=None):
    """The echecker and its tokenizer: the checkpoint's weights on the encoder's config."""
    import torch
    from aac_metrics.functional.fer import BERTFlatClassifier
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    class Echecker(BERTFlatClassifier):
        def __init__(self, config, num_classes: int, model_type: str):
            # BERTFlatClassifier.__init__ would load bert-base-uncased's own pretrained weights
            # (440 MB) only to have the checkpoint overwrite every one of them.
            torch.nn.Module.__init__(self)
            self.model_type = model_type
            self.num_classes = num_classes
            self.encoder = AutoModel.from_config(config)
            self.dropout = torch.nn.Dropout(config.hidden_dropout_prob)
            self.clf = torch.nn.Linear(config.hidden_size, num_classes)

    try:
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as err:
        raise ValueError(f"{checkpoint}: not a readable echecker checkpoint ({err})") from None
    missing = [k for k in ("model_type", "num_classes", "state_dict") if k not in saved]
    if missing:
        raise ValueError(f"{checkpoint}: not an echecker checkpoint (no {', '.join(missing)})")
    model = Echecker(
        AutoConfig.from_pretrained(encoder_dir), int(saved["num_classes"]), saved["model_type"]
    )
    state = dict(saved["state_dict"])
    # transformers >= 4.31 keeps position_ids out of the state dict; the release has it
    state.pop("encoder.embeddings.position_ids", None)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(
            f"{checkpoint}: does not fit the encoder config in {encoder_dir} ({err})"
        ) from None
    model.to(device or _device()).eval()
    return model, AutoTokenizer.from_pretrained(encoder_dir)


def load_sentence_encoder(path: str | Path, device=None):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device=str(device or _device()), local_files_only=True)


class FluencyScorer:
    """Per-clip echecker verdicts and FENSE for each system, the models loaded once."""

    def __init__(self, models: FenseModels):
        self.models = models
        self.fluency_missing = models.missing_reason(sentence_encoder=False)
        self.fense_missing = models.missing_reason(sentence_encoder=True)
        self._loaded = None

    def _load(self):
        if self._loaded is None:
            device = _device()
            echecker, tokenizer = load_echecker(
                self.models.echecker, self.models.echecker_encoder, device
            )
            encoder = None
            if self.fense_missing is None:
                encoder = load_sentence_encoder(self.models.sentence_encoder, device)
            self._loaded = (device, echecker, tokenizer, encoder)
            log.info("FENSE models loaded on %s", device)
        return self._loaded

    def score(self, candidates: list[str], references: list[list[str]]) -> dict[str, list[float]]:
        """``error_prob`` and ``fluency_error`` (0/1) per caption, and ``sbert_sim`` and
        ``fense`` where the sentence encoder is there; {} when the echecker is missing."""
        if self.fluency_missing is not None:
            return {}
        device, echecker, tokenizer, encoder = self._load()
        if encoder is None:
            from aac_metrics.functional.fer import fer

            _, sents = fer(
                candidates,
                echecker=echecker,
                echecker_tokenizer=tokenizer,
                error_threshold=ERROR_THRESHOLD,
                device=device,
                return_probs=True,
            )
        else:
            from aac_metrics.functional.fense import fense

            _, sents = fense(
                candidates,
                references,
                sbert_model=encoder,
                echecker=echecker,
                echecker_tokenizer=tokenizer,
                error_threshold=ERROR_THRESHOLD,
                penalty=PENALTY,
                device=device,
                return_probs=True,
            )
        out = {"error_prob": sents["fer.error_prob"], "fluency_error": sents["fer"]}
        if encoder is not None:
            out |= {"sbert_sim": sents["sbert_sim"], "fense": sents["fense"]}
        return {k: [float(x) for x in v] for k, v in out.items()}
