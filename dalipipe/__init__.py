"""dalipipe: zero-shot audio captioning from a frozen image captioner (DALI).

The package is grouped by concern: ``data`` (acquisition, extraction, filtering, shards),
``models`` (the CAV-MAE audio encoder and the LLaVA captioner wrapper), ``align`` (the
distribution-alignment losses and the alignment stage), ``caption`` (prefix tuning,
pseudo-labels, distillation), ``describe`` (captioning your own recordings: ``Captioner``,
``dalipipe caption``, ``export`` and ``serve``) and ``evaluate`` (metrics, tables, report).
Every workflow rule calls one ``dalipipe`` sub-command; each sub-command is a module with a
``main(argv)`` function, listed in :mod:`dalipipe.cli`.

    from dalipipe import Captioner, Clip
"""

__version__ = "0.1.0"

# torch and transformers load only when the API is first used: `import dalipipe` stays cheap
_LAZY = {"Captioner": "dalipipe.describe.captioner", "Clip": "dalipipe.describe.inputs"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dalipipe' has no attribute {name!r}")
