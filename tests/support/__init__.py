"""What several test modules share; test modules import from here, never from each other.

- `shards`: shards in the shard stage's layout (through `dalipipe.data.shard`, as raw tar
  members for the align stage, a labelled test split for evaluate), and their solid frames.
- `runs`: tiny runs on disk: the align stage's world and its call, the models the figure and
  probe stages read (`make_model_run`), the evaluate outputs the report reads (`make_report_run`).
- `training`: the captioner the training stages start from, SIGTERM from inside a step, and the
  check that accumulation and checkpointing train like the whole batch.
- `snakemake`: the one Snakemake runner (and the environment a workflow run gets); the
  `snakemake_in` fixture of tests/conftest.py uses it.
- `slurm`: the `cluster` mark and what the Slurm tests read back from the cluster;
  `slurm_polls` (run by path, not imported) starts their Snakemake with the plugin's status polls
  at most 2 s apart.
- `scheduling`: how the two test workers share the suite (tests/conftest.py applies it).
- `describe`: the tiny trained-captioner folder and the captions the describe API must give.
- `hub`: a local stand-in for the Hugging Face Hub and a tiny GPT-2 as a repository's files.
- `video_host`: a local stand-in for YouTube serving generated MP4s.
- `authors`: the authors' released DALI files, written at any size.

Fixtures that several modules use (`tiny_models`, `snakemake_in`, `align_world`) live in
tests/conftest.py. pytest's `pythonpath = ["."]` (pyproject.toml) makes `tests.support` and
`bench` importable as packages of the repository root.
"""
