"""The paper run's compute bill: GPU-hours per stage from the suite's figures and a config.

    from bill import compute_bill                  # bench/ on sys.path
    bill = compute_bill(load_result(path), load_config("configs/paper.yaml"))
    bill["rows"]            # [{"stage", "hours", "how"}], one per stage (and method)
    bill["total_hours"]     # the sum; bill["missing"] names figures the suite lacked

Epochs, batch sizes, methods, token limits and the kept pool come from the config; the clip
counts, which depend on what can be downloaded, are the lists' own (PAPER_CLIPS: every listed
clip, an upper bound). A GPU-hour is one GPU of the suite's machine busy for an hour: a stage
spread over 4 GPUs costs the same GPU-hours as on one, communication aside.
"""

from __future__ import annotations

import math

# Clips of the paper's data, as listed (AudioSet v1 segment CSVs; AudioCaps v1 test.csv's clips;
# Clotho v2.1 evaluation files). Fewer are online, so the bill is an upper bound.
PAPER_CLIPS = {
    "align_pool": 2_041_789,  # unbalanced_train: the pool the filter keeps filter.keep of
    "pseudolabel": 22_160,  # balanced_train
    "evaluate": 975 + 1_045,  # AudioCaps test + Clotho evaluation
}
PREFIX_PAIRS = 16  # the authors' prefixDS.json (configs/paper.yaml prefix.pairs)


def figures_by_name(result: dict) -> dict[str, dict]:
    """The figures that have a value (failed ones left out)."""
    return {f["name"]: f for f in result["figures"] if f.get("value") is not None}


def by_batch(figures: dict, prefix: str, batch: int) -> tuple[dict | None, int | None]:
    """The figure ``<prefix>.batch<N>`` measured at ``batch``, else at the nearest batch."""
    measured = {
        int(name.rsplit("batch", 1)[1]): f
        for name, f in figures.items()
        if name.startswith(prefix + ".batch")
    }
    if not measured:
        return None, None
    nearest = min(measured, key=lambda b: (abs(math.log(b / batch)), -b))
    return measured[nearest], nearest


def align_step_seconds(figures: dict, method: str, solver: str) -> tuple[float | None, str]:
    """Seconds per step at the suite's batch; for exact OT the pooled EMD step (OT-Att: its
    fast step plus the pooled EMD's extra over the fast OT step)."""
    step = figures.get(f"align.{method}.step")
    if step is None:
        return None, f"align.{method}.step"
    if method in ("mmd", "contrastive"):
        return step["value"], f"{step['value']:.3g} s/step"
    if solver != "exact":  # the suite measures its fastest solver: config and figure may differ
        return step["value"], f"{step['value']:.3g} s/step ({step['shape'].get('solver')})"
    pooled, fast_ot = figures.get("align.ot_exact_pool.step"), figures.get("align.ot.step")
    if pooled is None or fast_ot is None:
        return None, "align.ot_exact_pool.step"
    seconds = pooled["value"] + (step["value"] - fast_ot["value"])
    workers = pooled["shape"].get("solver", "a pool")
    return seconds, f"{seconds:.3g} s/step with exact EMD ({workers})"


def compute_bill(result: dict, config: dict, clips: dict | None = None) -> dict:
    from dalipipe.align.train import method_settings

    clips = {**PAPER_CLIPS, **(clips or {})}
    figures = figures_by_name(result)
    rows: list[dict] = []
    missing: list[str] = []

    def add(stage: str, hours: float | None, how: str, needs: str | None = None) -> None:
        if hours is None:
            missing.append(needs or how)
        rows.append({"stage": stage, "hours": hours, "how": how})

    filt = config["filter"]
    if filt.get("enabled", True):
        frames = clips["align_pool"] * int(config["extract"]["window_seconds"])  # 1 per second
        f, batch = by_batch(figures, "filter", filt["batch_size"])
        hours = frames / f["value"] / 3600 if f else None
        add(
            "filter",
            hours,
            f"{frames:,} frames at {f['value']:.0f} frames/s (batch {batch})" if f else "",
            "filter.batch*",
        )

    prefix, step = config["prefix"], figures.get("prefix.step")
    steps = prefix["epochs"] * math.ceil(PREFIX_PAIRS / prefix["batch_size"])
    add(
        "prefix",
        steps * step["value"] / 3600 if step else None,
        f"{steps} steps at {step['value']:.3g} s" if step else "",
        "prefix.step",
    )

    mmd = figures.get("align.mmd.step")
    align_batch = mmd["shape"]["batch"] if mmd else None
    for method in config["align"]["methods"]:
        settings = method_settings(config["align"], method)
        seconds, how = align_step_seconds(figures, method, settings["ot"]["solver"])
        steps = settings["epochs"] * (filt["keep"] // align_batch) if align_batch else 0
        add(
            f"align {method}",
            steps * seconds / 3600 if seconds and steps else None,
            f"{steps:,} steps of {align_batch} at {how}" if seconds and steps else "",
            how if seconds is None else "align.mmd.step",
        )

    label, batch_size = config["pseudolabel"], config["pseudolabel"]["batch_size"]
    f, batch = by_batch(figures, "pseudolabel", batch_size)
    tokens = f["shape"]["new_tokens"] if f else None
    for method in config["align"]["methods"]:
        add(
            f"pseudolabel {method}",
            clips["pseudolabel"] / f["value"] / 3600 if f else None,
            f"{clips['pseudolabel']:,} clips at {f['value']:.1f} clips/s (batch {batch}, "
            f"{tokens} new tokens measured, up to {label['max_new_tokens']})"
            if f
            else "",
            "pseudolabel.batch*",
        )

    # the measured step's batch (the config's per-GPU batch at paper scale): GPU-hours are the
    # clips' share of steps, however many GPUs take them
    distill, step = config["distill"], figures.get("distill.step")
    batch = step["shape"]["batch"] if step else distill["batch_size"]
    steps = distill["epochs"] * math.ceil(clips["pseudolabel"] / batch)
    for method in config["align"]["methods"]:
        add(
            f"distill {method}",
            steps * step["value"] / 3600 if step else None,
            f"{steps} steps of {batch} at {step['value']:.3g} s" if step else "",
            "distill.step",
        )

    evaluate = config["evaluate"]
    methods = evaluate.get("methods") or config["align"]["methods"]
    per_method = [s for s in evaluate["systems"] if s.startswith("audio")]
    systems = len(evaluate["systems"]) - len(per_method) + len(per_method) * len(methods)
    captions = clips["evaluate"] * systems
    f, batch = by_batch(figures, "pseudolabel", evaluate["batch_size"])
    add(
        "evaluate",
        captions / f["value"] / 3600 if f else None,
        f"{captions:,} captions ({systems} systems) at {f['value']:.1f} clips/s (batch {batch})"
        if f
        else "",
        "pseudolabel.batch*",
    )
    total = sum(r["hours"] for r in rows if r["hours"] is not None)
    return {"rows": rows, "total_hours": total, "missing": missing}
