"""The image-bias probe (the paper's Table 2): ask LLaVA what it *sees* in audio tokens.

    dalipipe probe --params '{"seed": 0, "evaluate": {...}, "models": {...}}' \
        --dataset miniature --shards results/miniature/shards/test \
        --captioner results/miniature/models/llava \
        --align results/miniature/align/mmd results/miniature/align/ot ... \
        --out results/miniature/report/probe

Each encoder (the untrained one, drawn as the evaluate stage draws it, and every aligned one)
gives its audio tokens to the frozen captioner with the probe's question
(``evaluate.figures.probe_prompt``, "What can you see? Answer concisely") and no prefix, decoded
greedily; the frame itself, asked the same, stands beside them as what the captioner says of
the picture. The paper's finding: distribution-aligned tokens make LLaVA describe visual scenes.
The first ``evaluate.figures.probe_clips`` test clips are asked.

Where the clips come from the synthetic world (metadata ``heard`` and ``seen``), each system's
captions are also scored by which objects they name, pooled over clips:
- seen_only: named / present among objects on screen that make no sound (image bias: audio
  cannot tell them);
- heard: named / present among sounding objects (what audio can tell);
- absent: named / present among the world's objects neither seen nor heard (the chance level);
- photo_form: share of answers phrased as the world's picture descriptions ("a photo of ..."),
  the register the captioner learned for frames; sound_form: share phrased as its audio captions
  ("a dog barks and a bell chimes"). The most direct sign of image bias the world gives.
Writes ``<out>.csv`` (captions side by side), ``<out>.json`` (everything), ``<out>.md`` and
``<out>.html`` (the report's page).
"""

from __future__ import annotations

import csv
import html
import json
import logging
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dalipipe.common import atomic_path, read_stage, stage_parser, write_json
from dalipipe.paper.figures import (
    ENCODER_INPUTS_READ,
    add_encoder_inputs,
    choose_clips,
    encoders,
    eval_seed,
    eval_settings,
    load_base,
    open_test_set,
)

log = logging.getLogger(__name__)

IMAGE = "image"  # the frame itself, asked the same question
RATES = ("seen_only", "heard", "absent")
PHOTO_FORM = "a photo of"  # how the synthetic world's visual captions begin


def naming_rates(captions: dict[str, str], metas: dict[str, dict]) -> dict:
    """Pooled naming rates of one system's captions (see the module docstring), or {} when the
    clips carry no world metadata. A rate with nothing to count is None."""
    from dalipipe.world import classes as world

    if not metas or any("heard" not in m or "seen" not in m for m in metas.values()):
        return {}
    objects = {n for m in metas.values() for n in (m["heard"] or []) + (m["seen"] or [])}
    hits, present = dict.fromkeys(RATES, 0), dict.fromkeys(RATES, 0)
    for clip_id, caption in captions.items():
        heard, seen = set(metas[clip_id]["heard"] or []), set(metas[clip_id]["seen"] or [])
        named = world.classes_named(caption, objects)
        groups = {"seen_only": seen - heard, "heard": heard, "absent": objects - seen - heard}
        for rate, group in groups.items():
            present[rate] += len(group)
            hits[rate] += len(named & group)
    rates = {rate: hits[rate] / present[rate] if present[rate] else None for rate in RATES}
    texts = [caption.strip().lower() for caption in captions.values()]
    forms = {
        "photo_form": sum(t.startswith(PHOTO_FORM) for t in texts) / max(len(texts), 1),
        "sound_form": sum(world.is_well_formed(t) for t in texts) / max(len(texts), 1),
    }
    return {**rates, **{f"{rate}_count": present[rate] for rate in RATES}, **forms}


def ask(captioner, modality: str, inputs: list, prompt: str, settings: dict, seed: int) -> list:
    """Greedy answers to ``prompt`` for (fbank, frame) inputs, without the prefix."""
    import torch

    size, answers = int(settings["batch_size"]), []
    for index in range(0, len(inputs), size):
        batch = inputs[index : index + size]
        fbank = pixels = None
        if modality == "audio":
            fbank = torch.from_numpy(np.stack([f for f, _ in batch]).astype(np.float32))
        else:
            pixels = captioner.pixel_values([frame for _, frame in batch])
        answers += captioner.generate(
            modality=modality,
            fbank=fbank,
            pixel_values=pixels,
            use_prefix=False,
            prompt=prompt,
            max_new_tokens=int(settings["max_new_tokens"]),
            do_sample=False,
            seed=seed + index // size,
        )
    return answers


def probe(params: dict, dataset: str, shards, captioner_dir, align_dirs: list, out) -> dict:
    """Run the probe and write its four files at ``out`` + .csv/.json/.md/.html."""
    if not align_dirs:
        raise ValueError("probe: no aligned encoder (--align)")
    settings = eval_settings(params)
    figures, seed = settings["figures"], eval_seed(params)
    ds = open_test_set(params, dataset, shards)
    chosen = choose_clips(
        ds, int(figures["probe_clips"]), "evaluate.figures.probe_clips", need_frame=False
    )
    ids = [clip.clip_id for clip, _, _ in chosen]
    inputs = [(fbank, frame) for _, fbank, frame in chosen]
    metas = {clip.clip_id: clip.meta for clip, _, _ in chosen}
    prompt = figures["probe_prompt"]
    captioner = load_base(params, captioner_dir)
    answers = {}
    if ds.has_video and all(frame is not None for _, frame in inputs):
        answers[IMAGE] = ask(captioner, "image", inputs, prompt, settings, seed)
    systems = encoders(align_dirs, seed)  # loaded one at a time
    for name, encoder in tqdm(systems, desc="probe", total=len(align_dirs) + 1, unit="encoder"):
        captioner.audio_encoder = encoder.to(captioner.device, captioner.dtype)
        answers[name] = ask(captioner, "audio", inputs, prompt, settings, seed)
    captions = {name: dict(zip(ids, texts)) for name, texts in answers.items()}
    rates = {name: naming_rates(caps, metas) for name, caps in captions.items()}
    result = {
        "dataset": dataset,
        "prompt": prompt,
        "clips": ids,
        "systems": list(captions),
        "captions": captions,
        "world": {i: {k: metas[i].get(k) for k in ("heard", "seen")} for i in ids}
        if any(rates.values())
        else None,
        "rates": rates if any(rates.values()) else None,
    }
    write_outputs(result, Path(out))
    for name, rate in rates.items():
        if rate:
            log.info("probe %s: %s", name, json.dumps({k: rate[k] for k in RATES}))
    return result


# --- outputs -----------------------------------------------------------------------------------


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def rates_markdown(result: dict) -> list[str]:
    if not result["rates"]:
        return []
    lines = [
        "| system | seen, not heard: named | heard: named | neither: named (chance) "
        "| answers as a photo | answers as sounds |",
        "|---|---|---|---|---|---|",
    ]
    for name, rate in result["rates"].items():
        cells = [f"{_fmt(rate[r])} (of {rate[f'{r}_count']})" for r in RATES]
        cells += [_fmt(rate["photo_form"]), _fmt(rate["sound_form"])]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def markdown(result: dict) -> str:
    lines = [
        f"Image-bias probe on {len(result['clips'])} {result['dataset']} test clips: "
        f'"{result["prompt"]}", audio tokens, no prefix, greedy.',
        "",
    ]
    if result["rates"]:
        lines += ["Share of the objects each system's answers name, pooled over clips.", ""]
        lines += rates_markdown(result) + [""]
    systems = result["systems"]
    lines += ["| clip | " + " | ".join(systems) + " |", "|---|" + "---|" * len(systems)]
    for clip_id in result["clips"]:
        cells = [result["captions"][s][clip_id].replace("|", "/") for s in systems]
        lines.append(f"| {clip_id} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def html_page(result: dict) -> str:
    from dalipipe.paper.report import _page, markdown_table_to_html

    world = result["world"] or {}
    rates = markdown_table_to_html("\n".join(rates_markdown(result)))
    systems = result["systems"]
    head = "<th>clip</th>" + ("<th>heard</th><th>seen</th>" if world else "")
    head += "".join(f"<th>{html.escape(s)}</th>" for s in systems)
    rows = []
    for clip_id in result["clips"]:
        cells = f"<td class='text'>{html.escape(clip_id)}</td>"
        if world:
            for key in ("heard", "seen"):
                cells += (
                    f"<td class='text'>{html.escape(', '.join(world[clip_id][key] or []))}</td>"
                )
        cells += "".join(
            f"<td class='text'>{html.escape(result['captions'][s][clip_id])}</td>" for s in systems
        )
        rows.append(f"<tr>{cells}</tr>")
    intro = (
        f"<p>{len(result['clips'])} {html.escape(result['dataset'])} test clips, asked "
        f"&ldquo;{html.escape(result['prompt'])}&rdquo; with each encoder's audio tokens and no "
        "prefix (greedy); <i>image</i> is the frame asked the same.</p>"
    )
    if world:
        intro += "<p>Share of the objects the answers name, pooled over the clips:</p>" + rates
    table = f"<table><tr>{head}</tr>{''.join(rows)}</table>"
    return _page("Image-bias probe (Table 2)", intro + table)


def write_outputs(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out.with_suffix(".json"), result)
    with atomic_path(out.with_suffix(".md")) as tmp:
        tmp.write_text(markdown(result), encoding="utf-8")
    with atomic_path(out.with_suffix(".html")) as tmp:
        tmp.write_text(html_page(result), encoding="utf-8")
    world = result["world"] or {}
    columns = ["clip_id"] + (["heard", "seen"] if world else []) + result["systems"]
    with atomic_path(out.with_suffix(".csv")) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for clip_id in result["clips"]:
            row = {
                "clip_id": clip_id,
                **{s: result["captions"][s][clip_id] for s in result["systems"]},
            }
            if world:
                row.update({k: " ".join(world[clip_id][k] or []) for k in ("heard", "seen")})
            writer.writerow(row)


def main(argv: list[str]) -> int:
    parser = stage_parser("probe", __doc__, ENCODER_INPUTS_READ)
    add_encoder_inputs(parser, datasets="miniature | audiocaps | clotho")
    parser.add_argument("--out", required=True, help="output stem: <out>.csv/.json/.md/.html")
    args, params = read_stage(parser, argv)
    try:
        probe(
            params,
            args.dataset,
            args.shards,
            args.captioner,
            args.align,
            args.out,
        )
    except (OSError, ValueError) as err:  # bad input: one clear line, no traceback
        log.error("probe: %s", err)
        return 1
    return 0
