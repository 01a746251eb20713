"""The miniature bootstrap captioner: learns visual captions from world frames, reloads.

pytest tests/test_bootstrap.py -x -q
"""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dalipipe.caption.bootstrap import bootstrap, main
from dalipipe.world import classes as world
from dalipipe.world import synthetic


def _member(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_world_shards(out: Path, n_clips: int, *, n_classes=4, frame_size=16, seed=0) -> Path:
    """Align-split shards of synthetic-world clips (frames + metadata) in the shard layout."""
    cfg = synthetic.world_config(
        {"n_classes": n_classes, "frame_size": frame_size, "max_objects": 1, "clip_seconds": 1.0}
    )
    out.mkdir(parents=True)
    with tarfile.open(out / "align-000000.tar", "w") as tar:
        for i in range(n_clips):
            rng = synthetic.clip_rng(seed, "align", i)
            spec = synthetic.compose(rng, cfg)
            frames = synthetic.render_frames(spec, cfg, rng)
            meta = synthetic.clip_metadata(f"align-{i:06d}", "align", spec, rng)
            key = meta["clip_id"]
            for k, frame in enumerate(frames):
                buf = io.BytesIO()
                Image.fromarray(frame).save(buf, format="JPEG", quality=95)
                _member(tar, f"{key}.frame{k}.jpg", buf.getvalue())
            buf = io.BytesIO()
            np.save(buf, np.zeros((16, 16), np.float16))
            _member(tar, f"{key}.fbank.npy", buf.getvalue())
            _member(tar, f"{key}.json", json.dumps(meta).encode())
    index = {
        "split": "align",
        "total": n_clips,
        "shards": [{"file": "align-000000.tar", "count": n_clips}],
    }
    (out / "index.json").write_text(json.dumps(index))
    return out


def write_world_extract(root: Path, n_clips: int, *, n_classes=2, frame_size=16, seed=0):
    """One extract part (manifest.csv + clip dirs) and a metadata.jsonl, as the workflow has them."""
    cfg = synthetic.world_config(
        {"n_classes": n_classes, "frame_size": frame_size, "max_objects": 1, "clip_seconds": 1.0}
    )
    part = root / "extract" / "part-0"
    part.mkdir(parents=True)
    rows, metas = ["clip_id,status,reason"], []
    for i in range(n_clips):
        rng = synthetic.clip_rng(seed, "align", i)
        spec = synthetic.compose(rng, cfg)
        meta = synthetic.clip_metadata(f"align-{i:06d}", "align", spec, rng)
        clip_dir = part / meta["clip_id"]
        clip_dir.mkdir()
        Image.fromarray(synthetic.render_frames(spec, cfg, rng)[0]).save(clip_dir / "frame_00.jpg")
        np.save(clip_dir / "fbank.npy", np.zeros((16, 16), np.float16))
        rows.append(f"{meta['clip_id']},ok,")
        metas.append(json.dumps(meta))
    (part / "manifest.csv").write_text("\n".join(rows) + "\n")
    (root / "metadata.jsonl").write_text("\n".join(metas) + "\n")
    return part, root / "metadata.jsonl"


TINY = {
    "image_size": 16,
    "patch_size": 8,
    "vision_hidden": 64,
    "vision_layers": 2,
    "vision_heads": 2,
    "text_hidden": 64,
    "text_layers": 2,
    "text_heads": 2,
    "epochs": 30,
    "batch_size": 16,
    "lr": 3e-3,
    "holdout": 20,
    "template": "plain",
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("bootstrap")
    shards = write_world_shards(root / "shards", 180)
    summary = bootstrap(TINY, shards, root / "llava", seed=0, device="cpu")
    return root / "llava", summary


@pytest.mark.slow
def test_learns_visual_captions_of_held_out_frames(trained):
    _, summary = trained
    assert summary["heldout_clips"] == 20 and summary["train_clips"] == 160
    # 4 classes, one object each: a captioner that learned the colours names all held-out frames
    assert summary["heldout_exact"] >= 0.9, summary["examples"]
    assert summary["final_sound_loss"] < 0.5


def test_output_loads_as_an_audio_captioner(trained):
    from dalipipe.models.captioner import AudioCaptioner

    path, _ = trained
    assert (path / "curve.csv").is_file() and not Path(f"{path}.ckpt").exists()
    cap = AudioCaptioner.from_base(path, options={"template": "plain"})
    cfg = synthetic.world_config({"n_classes": 4, "frame_size": 16, "max_objects": 1})
    rng = np.random.default_rng(123)
    spec = {
        "objects": [
            {"name": "dog", "seen": True, "heard": True, "r": 3.5, "c": [8.0, 8.0], "v": [0, 0]}
        ]
    }
    frame = synthetic.render_frames(spec, {**cfg, "clip_seconds": 1.0}, rng)[0]
    captions = cap.generate(
        modality="image",
        pixel_values=cap.pixel_values([frame]),
        prompt="What can you see in this image?",
    )
    assert captions == [world.visual_caption(["dog"])]
    # asked for sounds, it names what the pictured object would make: a sighted guess
    sounds = cap.generate(
        modality="image",
        pixel_values=cap.pixel_values([frame]),
        prompt="What sounds would the things in this image make?",
    )
    assert sounds == [world.audio_caption(["dog"])]
    assert "Ġbarks" in cap.tokenizer.get_vocab()


def test_unknown_setting_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown settings"):
        bootstrap({"n_layers": 3}, tmp_path, tmp_path / "out")


def test_command_line_reads_the_extract_output(tmp_path):
    part, metadata = write_world_extract(tmp_path, 30)
    params = json.dumps(
        {"seed": 1, "device": "cpu", "bootstrap": {**TINY, "epochs": 1, "holdout": 5}}
    )
    argv = ["--params", params, "--extract", str(part), "--metadata", str(metadata)]
    assert main(argv + ["--out", str(tmp_path / "m")]) == 0
    summary = json.loads((tmp_path / "m" / "bootstrap_summary.json").read_text())
    assert summary["steps"] == 25 // 16 and summary["heldout_clips"] == 5
    assert summary["train_clips"] == 25
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_two_templates_are_both_trained(tmp_path):
    from dalipipe.caption.bootstrap import Sequences
    from dalipipe.models.tokenizer import build_tokenizer

    tok = build_tokenizer([], vocab_size=400)
    seqs = Sequences(tok, ["plain", "vicuna_v1"], ["What can you see?"], n_image_tokens=4)
    assert len(seqs.prompts) == 2
    ids, labels = seqs.visual(1, "a photo of a red bell")
    image_id = tok.convert_tokens_to_ids("<image>")
    assert ids.count(image_id) == 4
    answer = [t for t, lab in zip(ids, labels) if lab != -100]
    assert tok.decode(answer) == " a photo of a red bell</s>"
    assert "curious user" in tok.decode(ids)


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import dalipipe.training as training

    shards = write_world_shards(tmp_path / "shards", 40, n_classes=2)
    settings = {**TINY, "epochs": 3, "holdout": 4, "batch_size": 8}
    bootstrap(settings, shards, tmp_path / "straight", seed=0, device="cpu")

    calls = {"n": 0}

    def stop_mid_epoch():  # asked once per step: SIGTERM arrives during step 3 of 4
        calls["n"] += 1
        return calls["n"] >= 3

    monkeypatch.setattr(training, "sigterm_requested", stop_mid_epoch)
    with pytest.raises(SystemExit):
        bootstrap(settings, shards, tmp_path / "resumed", seed=0, device="cpu")
    assert (tmp_path / "resumed.ckpt").is_dir() and not (tmp_path / "resumed").exists()
    steps_after_resume = []
    monkeypatch.setattr(
        training, "sigterm_requested", lambda: steps_after_resume.append(1) and False
    )
    summary = bootstrap(settings, shards, tmp_path / "resumed", seed=0, device="cpu")
    # 12 steps in all; the rerun does only the 9 left (+ one check per epoch it finishes)
    assert summary["steps"] == 12 and len(steps_after_resume) == 9 + 3

    straight = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
