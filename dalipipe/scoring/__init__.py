"""Caption scoring: the paper's metrics (metrics.py, `dalipipe score`), FENSE and SPIDEr-FL
(fense.py), the files the metrics need (assets.py) and an embedding similarity (embedding.py)."""
