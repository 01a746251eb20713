"""`dalipipe export`: a trained-captioner folder made self-contained and ready for `hf upload`.

    dalipipe export --model results/miniature/distill/ot_att --out shared/ot_att
    hf upload owner/name shared/ot_att

The folder holds the weights (safetensors, copied as they are), captioner.json naming the base
model by Hub id and pinned revision, and a model card (README.md, dalipipe.describe.card) with
the scores of the run's evaluation table (`<run>/evaluate/*/table.csv`, or --evaluation) for
this method. A base that is a local folder (the miniature's bootstrap captioner) is copied into
`base/`, since nobody else has it; --base-id names a Hub copy of it instead. `dalipipe
import-authors` writes the same layout, so the authors' release and a trained run are shared and
loaded the same way. Nothing is written unless everything is (the folder appears complete).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from dalipipe.common import atomic_path, package_versions, setup_logging
from dalipipe.describe.card import evaluation_rows, model_card
from dalipipe.describe.hub import parse_model_id
from dalipipe.models.artifacts import read_config, write_config

WEIGHTS = ["audio_encoder.safetensors", "audio_projector.safetensors", "prefix.safetensors"]
SETTINGS = ["audio_encoder.json"]


def write_card(folder: Path, info: dict, *, name: str, license: str, rows=(), datasets=()):
    """README.md beside the captioner.json `info` in `folder` (also import-authors')."""
    files = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != "README.md")
    card = model_card(
        info,
        name=name,
        license=license,
        datasets=sorted(set(datasets) | {r["dataset"] for r in rows}),
        rows=list(rows),
        versions=package_versions(),
        files=files,
    )
    (folder / "README.md").write_text(card, encoding="utf-8")


def export(
    model: str | Path,
    out: str | Path,
    *,
    base_id: str | None = None,
    license: str = "cc-by-nc-4.0",
    evaluation: str | Path | None = None,
    name: str | None = None,
) -> dict:
    """Write the shareable folder `out` from the trained-captioner folder `model`; returns
    its captioner.json."""
    model, out = Path(model), Path(out)
    info = read_config(model / "captioner.json")
    if "base" not in info:
        raise ValueError(f"{model / 'captioner.json'}: missing field 'base'")
    if out.exists():
        raise ValueError(f"--out {out}: exists; give a new folder")
    base = Path(info["base"])  # a folder relative to the model's (stage distill's), or as is
    if not base.exists() and (model / base).exists():
        base = model / base
    bundle = None
    if base_id is not None:
        parsed = parse_model_id(base_id)
        if parsed is None or parsed[1] is None:
            raise ValueError(f"--base-id {base_id}: expected owner/name@revision (a pinned commit)")
        info["base"], info["revision"] = parsed
    elif base.is_dir():
        bundle = base  # a local base nobody else has: it travels in the folder
        info["base"], info["revision"] = "base", None
    elif parse_model_id(str(info["base"])) is None:
        raise ValueError(f"{model / 'captioner.json'}: base {info['base']!r} is neither a folder "
                         "nor a Hub id; give --base-id owner/name@revision")  # fmt: skip
    elif not info.get("revision"):
        raise ValueError(
            f"{model / 'captioner.json'}: base {info['base']} has no pinned revision; give "
            f"--base-id {info['base']}@<commit> so that others load the same model"
        )
    missing = [f for f in ["audio_projector.safetensors", *SETTINGS] if not (model / f).is_file()]
    if missing:
        raise ValueError(f"--model {model}: not a trained captioner, it lacks {', '.join(missing)}")
    run = model.parent.parent  # results/<run>/distill/<method>
    evaluate_dir = Path(evaluation) if evaluation else run / "evaluate"
    if evaluation and not evaluate_dir.is_dir():
        raise ValueError(f"--evaluation {evaluate_dir}: no such folder")
    rows = evaluation_rows(evaluate_dir, model.name)
    from dalipipe import __version__

    info.setdefault("metadata", {})["exported"] = {"dalipipe": __version__}
    with atomic_path(out, directory=True) as tmp:
        for name_ in WEIGHTS + SETTINGS:
            if (model / name_).is_file():
                shutil.copyfile(model / name_, tmp / name_)
        if bundle is not None:
            shutil.copytree(bundle, tmp / "base", symlinks=False)
        write_config(tmp / "captioner.json", info)
        write_card(tmp, info, name=name or out.name, license=license, rows=rows)
    return info


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dalipipe export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="a trained-captioner folder")
    parser.add_argument("--out", required=True, type=Path, help="the folder to write (new)")
    parser.add_argument("--base-id", help="owner/name@revision of the base model on the Hub")
    parser.add_argument("--license", default="cc-by-nc-4.0", help="the card's license")
    parser.add_argument("--evaluation", help="evaluate folder (default: the run's evaluate/)")
    parser.add_argument("--name", help="the model's name in its card (default: --out's name)")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        export(
            args.model,
            args.out,
            base_id=args.base_id,
            license=args.license,
            evaluation=args.evaluation,
            name=args.name,
        )
    except (OSError, ValueError) as err:
        print(f"dalipipe export: error: {err}", file=sys.stderr)
        return 2
    print(args.out)
    return 0
