"""``dalipipe plan-memory``: the estimated peak GPU memory of each GPU stage of a config.

    dalipipe plan-memory --configfile configs/paper.yaml
    dalipipe plan-memory --configfile configs/paper.yaml --config distill.activation_checkpointing=false
    dalipipe plan-memory --configfile configs/paper.yaml --gpu-gb 40 --json

The config is built as the workflow builds it (``dalipipe.config.load_config``): --base (the
Snakefile's config.yaml, when given), each --configfile laid over it key by key, the schema's
defaults for the rest; then each
--config key=value (dotted keys, YAML values). One process per GPU; GB
means GiB (2^30 bytes). See ``dalipipe.memory.stages`` for what each component holds.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import textwrap
from pathlib import Path

import yaml

from dalipipe.memory.components import SOURCES, gib
from dalipipe.memory.stages import Planner

COLUMNS = (  # table column -> components summed into it
    ("weights", ("weights",)),
    ("optim+grad", ("optimizer_state", "gradients")),
    ("activ.", ("activations",)),
    ("logits", ("logits",)),
    ("work", ("workspace",)),
    ("kv", ("kv_cache",)),
    ("other", ("vision", "targets", "loss", "text_encoder")),
)


def override(config: dict, item: str) -> dict:
    """Apply one ``a.b.c=value`` (value parsed as YAML: true, 40, null, [1, 2])."""
    from dalipipe.config import merge

    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ValueError(f"--config {item!r}: expected key=value")
    nested = yaml.safe_load(text)
    for part in reversed(key.split(".")):
        nested = {part: nested}
    return merge(config, nested)


def load_config(configfiles=(), overrides=(), base: str | Path | None = None) -> dict:
    """``dalipipe.config.load_config`` (base, presets, the schema's defaults), then overrides."""
    from dalipipe.config import load_config as load_presets

    config = load_presets(*configfiles, base=base)
    for item in overrides:
        config = override(config, item)
    return config


def plan(config: dict, gpu_gb: float = 80.0) -> dict[str, dict]:
    """One entry per stage: peak_gb, fits, max_micro_batch, the components in GB, settings."""
    planner = Planner(config)
    gpu = gpu_gb * 2**30
    out = {}
    for stage in planner.stages():
        est = planner.estimate(stage)
        row = {
            "peak_gb": round(gib(est.peak), 3),
            "fits": bool(est.peak <= gpu),
            "max_micro_batch": planner.max_micro_batch(stage, gpu),
            "micro_batch": est.micro_batch,
            "positions": est.positions,
            "peak_phase": est.peak_phase,
        }
        row.update({f"{k}_gb": round(gib(v), 3) for k, v in est.components.items()})
        row["phases"] = {name: list(parts) for name, parts in est.phases.items()}
        row["settings"] = est.settings
        row["sources"] = est.sources
        out[stage] = row
    return out


def model_sources(config: dict) -> list[str]:
    planner = Planner(config)
    lines = []
    models = planner.config["models"]
    lines.append(f"captioner {models['captioner']}: {planner.captioner().source}")
    section = planner.config["filter"]
    if section["enabled"]:
        arch = planner._arch(section["captioner"], section["captioner_revision"])
        lines.append(f"filter captioner {section['captioner']}: {arch.source}")
    lines.append("audio encoder: config models.audio_encoder (CavMaeAudioEncoder)")
    return lines


def format_table(rows: dict[str, dict], gpu_gb: float) -> str:
    head = ["stage", "batch", "pos"] + [c for c, _ in COLUMNS] + ["peak", "fits", "max batch"]
    table = [head]
    for stage, row in rows.items():
        cells = [stage, str(row["micro_batch"]), str(row["positions"])]
        for _, parts in COLUMNS:
            values = [row[f"{p}_gb"] for p in parts if f"{p}_gb" in row]
            cells.append(f"{sum(values):.1f}" if values else "-")
        cells += [f"{row['peak_gb']:.1f}", "yes" if row["fits"] else "NO"]
        cells.append(str(row["max_micro_batch"]))
        table.append(cells)
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    lines = [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in table
    ]
    lines.insert(1, "-" * len(lines[0]))
    lines.append("")
    lines += textwrap.wrap(
        f"GB = GiB (2^30 bytes) of one process; fits: peak <= {gpu_gb:g} GB. The peak is the "
        "largest phase, a sum of the components alive together (not of every column).",
        width=100,
    )
    for stage, row in rows.items():
        s = dict(row["settings"])
        phase = " + ".join(row["phases"][row["peak_phase"]])
        text = f"{stage}: {s.pop('layout')}; peak {row['peak_phase']} = {phase}"
        measured = s.pop("measured", None)
        if s:
            text += "; " + ", ".join(f"{k} {v}" for k, v in s.items())
        if measured:
            text += f"; measured: {measured}"
        lines += textwrap.wrap(text, width=100, subsequent_indent="    ")
    lines.append("")
    lines.append("Components (measured on this machine's CPU, real width, or computed):")
    lines += [f"  {name}: {text}" for name, text in SOURCES.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dalipipe plan-memory", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--configfile",
        nargs="+",
        action="extend",
        default=[],
        help="YAML files laid over the base config",
    )
    parser.add_argument(
        "--config",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="overrides, dotted keys",
    )
    parser.add_argument(
        "--base", help="a base config under the presets (config.yaml; it restates the defaults)"
    )
    parser.add_argument("--gpu-gb", type=float, default=80.0, help="GPU memory in GiB (default 80)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    config = load_config(args.configfile, args.config, args.base)
    rows = plan(config, args.gpu_gb)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print("\n".join(model_sources(config)))
        print()
        print(format_table(rows, args.gpu_gb))
    return 0


if __name__ == "__main__":
    sys.exit(main())
