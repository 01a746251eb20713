"""Repository-wide pytest set-up: no test may reach a model hub (offline machines, CI)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The two test workers share the cores with each other's jobs (tests/conftest.py), so an OpenMP
# thread that waits at a barrier sleeps instead of spinning through the time slice its partner
# thread needs. The miniature's bootstrap (two threads) on a 2-core AMD EPYC, steps in the same
# minute: 179 alone, 43 beside two busy processes, 91 beside them with passive waiting (185
# alone). The wait policy changes no result.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
