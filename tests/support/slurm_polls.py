"""`python tests/support/slurm_polls.py ARGS`: Snakemake, with the Slurm plugin polling the
cluster at most `POLL_CAP_S` apart. The Slurm tests submit through it.

The plugin (snakemake-executor-plugin-slurm 2.8.0) polls `--slurm-init-seconds-before-status-checks`
after a job is seen to finish, then waits 10 s longer after every poll that finds nothing
finished, up to 180 s: kind to a busy cluster's controller, but on the tests' one-node cluster,
where most jobs take seconds, a job that runs 5 s is seen done at 12 s and one that runs 120 s at
156 s. The step is hard-coded, so this caps the wait the plugin has set after each poll. Nothing
else changes: jobs are submitted, polled (sacct), cancelled and run (the jobstep executor) by the
plugin as in `python -m snakemake --profile slurm`.
"""

import sys
from pathlib import Path

# Run by path, this folder comes first on sys.path, where its snakemake.py would hide Snakemake.
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

from snakemake.cli import main  # noqa: E402
from snakemake_executor_plugin_slurm import Executor  # noqa: E402

POLL_CAP_S = 2

_check_active_jobs = Executor.check_active_jobs


async def check_active_jobs(self, active_jobs):
    async for still_running in _check_active_jobs(self, active_jobs):
        yield still_running
    self.next_seconds_between_status_checks = min(
        self.next_seconds_between_status_checks, POLL_CAP_S
    )


Executor.check_active_jobs = check_active_jobs

if __name__ == "__main__":
    sys.exit(main())
