"""bench/README.md's suite figures and compute bill, rendered from the newest GPU result of the suite.

    python bench/readme_table.py                 # rewrite bench/README.md between the markers
    python bench/readme_table.py --check         # exit 1 if bench/README.md is not up to date
    python bench/readme_table.py --print         # the section on stdout, README untouched

The newest paper-scale file in bench/results/ (bench/suite.py writes them) gives the table of
figures, the machine it came from, and the bill of a paper run (bench/bill.py) for
configs/paper.yaml as it is and with the fast OT solver the suite measured. Without such a file the
section says that no GPU run of the suite exists yet. Text outside the markers is left alone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bill import compute_bill  # noqa: E402
from common import load_result, newest_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BEGIN = "<!-- suite:begin (bench/readme_table.py writes this part) -->"
END = "<!-- suite:end -->"


def shape_text(shape: dict | None) -> str:
    if not shape:
        return ""
    return ", ".join(f"{k} {v}" for k, v in shape.items() if k != "solver")


def figure_rows(result: dict) -> list[str]:
    lines = [
        "| figure | shape | value | baseline (same run) | baseline value | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for f in result["figures"]:
        if f["value"] is None:
            lines.append(f"| {f['name']} | | **failed**: {f['error']} | | | |")
            continue
        base = f["baseline_value"]
        ratio = ""
        if base:
            # times and memory: how many times the baseline's; rates: how many times faster
            better = base / f["value"] if f["unit"] == "s/step" else f["value"] / base
            ratio = f"{better:.2f}x"
        lines.append(
            f"| {f['name']} | {shape_text(f['shape'])} | {f['value']:.4g} {f['unit']} | "
            f"{f['baseline'] or '-'} | {'' if base is None else f'{base:.4g}'} | {ratio} |"
        )
    return lines


def bill_rows(result: dict, config: dict) -> list[str]:
    from dalipipe.config import merge

    bill = compute_bill(result, config)
    ot_step = next((f for f in result["figures"] if f["name"] == "align.ot.step"), None)
    fast = ((ot_step or {}).get("shape") or {}).get("solver") or "sinkhorn"
    fast_bill = compute_bill(result, merge(config, {"align": {"ot": {"solver": fast}}}))
    lines = ["| stage | GPU-hours | how |", "|---|---|---|"]
    for row in bill["rows"]:
        hours = "missing" if row["hours"] is None else f"{row['hours']:.2f}"
        lines.append(f"| {row['stage']} | {hours} | {row['how']} |")
    lines.append(f"| **total** | **{bill['total_hours']:.1f}** | configs/paper.yaml as it is |")
    lines.append(
        f"| total with `align.ot.solver: {fast}` | {fast_bill['total_hours']:.1f} | "
        "the suite's fast solver for OT and OT-Att |"
    )
    if bill["missing"]:
        lines.append(f"\nNot in the total (figures missing): {', '.join(bill['missing'])}.")
    return lines


def render(results_dir, config: dict) -> str:
    """The text between the markers."""
    path = newest_result(results_dir, scale="paper")
    if path is None:
        return (
            "No GPU run of the suite exists yet: the figures and the compute bill of a paper run\n"
            "appear here once `bench/suite.py --scale paper` has written its JSON to\n"
            '`bench/results/`. Until then the estimates of "What a paper run needs, stage by\n'
            'stage" in docs/paper-scale.md (from docs/performance-anchors.md) stand.'
        )
    result = load_result(path)
    m = result["machine"]
    head = (
        f"Measured by `bench/suite.py --scale paper` on **{m['gpu']}** with {m['cpu']} "
        f"({m['cpu_cores']} cores), torch {m['torch']}, transformers {m['transformers']}, "
        f"Python {m['python']}, {m['date']}; random weights, bf16 "
        f"([{path.name}](bench/results/{path.name})). Ratios: times are the baseline's over "
        "ours (speed-up), rates ours over the baseline's, memory measured over the estimate."
    )
    bill_head = (
        f"**The compute bill of a paper run** ({m['gpu']}-hours, bench/bill.py: the clips every "
        "list holds, epochs, batch sizes and methods of configs/paper.yaml; goal: under 24 "
        "H200-hours with the filter):"
    )
    return "\n".join(
        [head, "", *figure_rows(result), "", bill_head, "", *bill_rows(result, config)]
    )


def replace_section(text: str, section: str, where: str = "README.md") -> str:
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"{where}: expected one {BEGIN!r} and then one {END!r}")
    before, rest = text.split(BEGIN)
    _, after = rest.split(END)
    return f"{before}{BEGIN}\n{section}\n{END}{after}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=str(REPO / "bench" / "results"))
    parser.add_argument("--readme", default=str(REPO / "bench" / "README.md"))
    parser.add_argument("--config", default=str(REPO / "configs" / "paper.yaml"))
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--check", action="store_true", help="exit 1 if the README is stale")
    group.add_argument("--print", action="store_true", help="print the section only")
    args = parser.parse_args(argv)
    from dalipipe.config import load_config

    section = render(args.results, load_config(args.config))
    if args.print:
        print(section)
        return 0
    readme = Path(args.readme)
    text = readme.read_text()
    updated = replace_section(text, section, str(readme))
    if args.check:
        if updated != text:
            print(f"{readme} is not up to date: run python bench/readme_table.py")
            return 1
        return 0
    readme.write_text(updated)
    print(f"{readme}: suite section rewritten")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
