"""Tiny runs on disk: the align stage's world and its call, the models and shards the figure and
probe stages read, and the evaluate outputs the report reads."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from dalipipe.align.attentive import AttentiveWeights, save_scorer
from dalipipe.align.train import align
from dalipipe.evaluate import tables
from dalipipe.evaluate.run import System
from dalipipe.paper import report
from tests.support.shards import FRAMES, MEL, make_clips, write_shard, write_test_shard

ENCODER = dict(
    num_mel_bins=32, target_length=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, out_dim=32
)


def make_align_world(root: Path) -> dict:
    """Shards of 24 training and 8 validation clips whose audio follows their colour, and a tiny
    LLaVA: {"root": the shard folders' parent, "llava": the model folder}."""
    from dalipipe.testing.checkpoints import make_tiny_llava

    rng = np.random.default_rng(0)
    (root / "train").mkdir()
    (root / "val").mkdir()
    clips = make_clips(rng, "train", 24)
    write_shard(root / "train" / "align-000000.tar", clips[:12])
    write_shard(root / "train" / "align-000001.tar", clips[12:])
    write_shard(root / "val" / "test-000000.tar", make_clips(rng, "val", 8))
    for split in ("train", "val"):
        files = sorted(p.name for p in (root / split).glob("*.tar"))
        (root / split / "index.json").write_text(
            json.dumps({"shards": [{"file": f} for f in files]})
        )
    return {"root": root, "llava": make_tiny_llava(root / "llava")}


def params_for(**align):
    settings = {
        "batch_size": 4,
        "epochs": 3,
        "lr": 1e-3,
        "lr_milestones": [2],
        "checkpoint_every": 2,
        "frame": "random",
        **align,
    }
    return {"seed": 0, "device": "cpu", "align": settings, "models": {"audio_encoder": ENCODER}}


def run_align(world, method, out, **settings):
    r = world["root"]
    return align(params_for(**settings), method, r / "train", r / "val", world["llava"], out)


def make_world_llava(out: Path) -> Path:
    """A tiny LLaVA whose vocabulary holds the synthetic world's audio and visual captions."""
    from dalipipe.testing.checkpoints import make_tiny_llava
    from dalipipe.world import classes as synthetic

    corpus = [
        c
        for cls in synthetic.CLASSES
        for c in (synthetic.audio_caption([cls.name]), synthetic.visual_caption([cls.name]))
    ]
    return make_tiny_llava(out, corpus=corpus, vocab_size=300)


def make_model_run(root: Path) -> Path:
    """A tiny run: base captioner, test shard, aligned encoders mmd and ot_att (with a scorer)
    and an ot_att trained before scorers were saved (encoder only)."""
    from dalipipe.models.cavmae import AudioEncoderConfig, CavMaeAudioEncoder, save_encoder

    make_world_llava(root / "models" / "llava")
    config = AudioEncoderConfig(
        num_mel_bins=MEL,
        target_length=FRAMES,
        patch_size=8,
        embed_dim=32,
        depth=1,
        num_heads=2,
        out_dim=32,
    )
    for i, method in enumerate(["mmd", "ot_att", "old_ot_att"]):
        torch.manual_seed(10 + i)
        save_encoder(CavMaeAudioEncoder(config), root / "align" / method)
    torch.manual_seed(3)
    save_scorer(AttentiveWeights(32, heads=2), root / "align" / "ot_att")
    write_test_shard(root / "shards" / "test")
    return root


SHARED_WAV = Path("/work/shared/data/clips/vggsound_FwVYUHKoLtQ_000034.wav")


def make_evaluate_dir(out: Path, metas: list[dict]) -> None:
    """An evaluate stage output, written by hand: two systems with known scores."""
    out.mkdir(parents=True)
    systems = [
        System("image", "image", "", "image", False, True),
        System("mmd_audio", "audio", "mmd", "audio", False, True),
        System("mmd_audio_distilled", "audio_distilled", "mmd", "audio", True, False),
    ]
    refs = {m["clip_id"]: m["references"] for m in metas}
    rows = []
    for i, system in enumerate(systems):
        captions = {m["clip_id"]: f"{system.name} says {m['heard'][0]}" for m in metas}
        scores = {
            "bleu_4": 0.1 * i,
            "meteor": 0.2 + i / 100,
            "rouge_l": 0.3,
            "cider_d": 0.5,
            "spice": None,
            "spider": None,
        }
        scores |= {
            "class_recall": 0.5,
            "class_precision": 0.75,
            "well_formed": 1.0,
            "offscreen_recall": None,
        }
        (out / f"{system.name}.json").write_text(
            json.dumps({"captions": captions, "scores": scores})
        )
        rows.append(tables.table_row(system, scores))
    tables.write_csv(out / "table.csv", rows, tables.columns(world=True))
    notes = {"spider": "not computed: Stanford CoreNLP 3.6.0 missing"}
    (out / "table.md").write_text(tables.markdown(rows, "miniature", world=True, notes=notes))
    (out / "references.json").write_text(json.dumps(refs))
    summary = {
        "dataset": "miniature",
        "n_clips": len(metas),
        "n_failed": 1,
        "systems": [s.name for s in systems],
    }
    (out / "summary.json").write_text(json.dumps(summary))
    rng = np.random.default_rng(0)
    image = rng.normal(0, 1, (len(metas), 8))
    np.savez(
        out / "gap.npz",
        clip_ids=np.array(sorted(refs)),
        image=image,
        **{
            "audio/mmd": image + rng.normal(0, 0.1, image.shape),
            "audio/untrained": rng.normal(5, 1, image.shape),
        },
    )


def make_report_run(root: Path) -> Path:
    """results/miniature with what report_figures reads: evaluate output, curves, shards, manifest."""
    run = root / "results" / "miniature"
    metas = write_test_shard(run / "shards" / "test")
    for stage in ("align/mmd", "prefix"):
        (run / stage).mkdir(parents=True)
        lines = ["step,epoch,loss,lr"] + [f"{s},{s // 5},{2.0 / (1 + s)},0.001" for s in range(20)]
        (run / stage / "curve.csv").write_text("\n".join(lines) + "\n")
    (run / "models" / "llava").mkdir(parents=True)
    (run / "acquire").mkdir()
    wav = run / "acquire" / "clip-000.wav"
    if SHARED_WAV.is_file():
        shutil.copyfile(SHARED_WAV, wav)
    else:  # a plain tone, written with the standard library
        wav.write_bytes(report._wav_bytes(np.sin(np.arange(16000) / 5.0) * 0.3, 16000))
    (run / "acquire" / "manifest.csv").write_text(
        f"clip_id,path,status,reason,split,start_s,labels\nclip-000,{wav},ok,,test,0,dog\n"
    )
    time.sleep(0.05)  # the evaluate output must be newer than its inputs (mtime rerun trigger)
    make_evaluate_dir(run / "evaluate" / "miniature", metas)
    return run
