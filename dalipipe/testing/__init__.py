"""Random-weight checkpoints of the real model classes, for tests, benchmarks and the rehearsal
(`dalipipe make-tiny`). No stage of the workflow imports this package."""
