"""The tiny trained-captioner directory and the clips the describe-API tests caption, with the
captions `dalipipe caption` gave before the API existed (tests/test_describe_*.py)."""

from __future__ import annotations

from pathlib import Path

DATA = Path("/work/shared/data/clips")
VIDEO = DATA / "audioset_00W1lcxW-WU_40_50.mp4"  # 10 s, 256x144, AAC 44.1 kHz stereo
WAV16K = DATA / "vggsound_FwVYUHKoLtQ_000034.wav"  # 16 kHz mono int16
VIDEO2 = DATA / "vggsound_KlsG1EnBEjc_000361.mp4"
FEATURES = {
    "fbank": {"num_mel_bins": 32, "target_length": 64},
    "frame_short_side": 32,
    "window_seconds": 10.0,
}
TOKENS = 8
# `dalipipe caption FILES --model <model_dir> --max-new-tokens 8 --json` before the API (greedy,
# audio): the tiny captioner's untrained words, the same for every path below
BEFORE = {
    VIDEO: "photo that\ufffdon\ufffd anlli an",
    WAV16K: "photo that\ufffdon\ufffd an\ufffd-",
    VIDEO2: "photo that\ufffdon\ufffd anlli an",
}
BEFORE_SAMPLED = {  # the same with --sample (seed 0)
    VIDEO: "\ufffd The\x02\ufffd\u0418 intelligence\ufffd",
    WAV16K: "\ufffd The(m\x1b\ufffdT\ufffd",
    VIDEO2: "\ufffdB\ufffd\ufffd\u0418 intelligence\ufffd",
}


def write_model(out: Path, tiny_models, metadata: dict) -> Path:
    import torch

    from dalipipe.models.captioner import AudioCaptioner

    torch.manual_seed(0)  # the tiny encoder's `proj` is not in its checkpoint: drawn
    # the options the captions of BEFORE were made with (CaptionerOptions' defaults then; they
    # are the schema's now), so that a change of defaults does not change the model under test
    options = {"template": "vicuna_v1", "prompt": "code"}
    captioner = AudioCaptioner.from_base(
        tiny_models.llava, options=options, audio_encoder=tiny_models.audio_encoder()
    )
    captioner.init_prefix(n_tokens=4, std=0.5, seed=0)
    captioner.save_dir(out, metadata=metadata)
    return out
