"""dalipipe: zero-shot audio captioning from a frozen image captioner (DALI).

The package is grouped by concern: ``data`` (acquisition, extraction, filtering, shards),
``models`` (the CAV-MAE audio encoder and the LLaVA captioner wrapper), ``align`` (the
distribution-alignment losses and the alignment stage), ``caption`` (prefix tuning,
pseudo-labels, distillation, ``dalipipe caption``) and ``evaluate`` (metrics, tables, report).
Every workflow rule calls one ``dalipipe`` sub-command; each sub-command is a module with a
``main(argv)`` function, listed in :mod:`dalipipe.cli`.
"""

__version__ = "0.1.0"
