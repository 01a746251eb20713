"""What the captioner reads from one input: the window's fbank and its middle frame.

A file is prepared exactly as the extract stage prepares a training clip (the fbank and frame
settings come from the model's captioner.json `features`): ffmpeg reads the window, the audio
becomes 16 kHz int16 samples, then the float16 `fbank.npy`; the frames are the first of each
second as JPEG, and the image is the middle one. A waveform held in memory is written to a
float WAV and goes the same way, so it gives the file's caption; frames held in memory are
taken as they are (the middle one).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from dalipipe.caption.pairs import as_pil, middle


class UnusableInput(Exception):
    """An input the captioner cannot read; the message says why (and names the file)."""


@dataclass
class Clip:
    """A sound (and its frames) already in memory, captioned as a file would be.

    waveform: samples in [-1, 1], shape (n,) or (channels, n), channels first; the first
    channel is used, as for files. rate: its sample rate (Hz). frames: the video's frames, one
    per second (HxWx3 uint8 arrays or PIL images); the middle one is the image."""

    waveform: np.ndarray | None = None
    rate: int | None = None
    frames: list = field(default_factory=list)
    name: str = "in-memory clip"

    def __str__(self) -> str:
        return self.name


@dataclass
class Prepared:
    frame: Image.Image | None  # the image the captioner sees (image modalities), or None
    fbank: np.ndarray | None  # (target_length, num_mel_bins) float32 (audio modalities)


def prepare_file(path: str | Path, features: dict, modality: str, start_s: float = 0.0) -> Prepared:
    """The middle frame and the fbank of one file, as the extract stage makes them."""
    from dalipipe.data.extract import extract_clip

    with tempfile.TemporaryDirectory(prefix="dalipipe-caption-") as tmp:
        clip_dir = Path(tmp) / "clip"
        # raises ExtractError, naming the file and the reason, for a file it cannot use
        extract_clip(
            path,
            clip_dir,
            start_s=start_s,
            window_s=features.get("window_seconds") or 10.0,
            short_side=features.get("frame_short_side") or 336,
            crop=bool(features.get("frame_crop")),  # folders written before it: no crop
            fbank=features.get("fbank") or {},
        )
        frames = sorted(clip_dir.glob("frame_*.jpg"))
        frame = None
        if "image" in modality:
            if not frames:
                raise UnusableInput(
                    f"modality {modality} needs a video stream, and the file has none"
                )
            with Image.open(middle(frames)) as im:
                frame = im.convert("RGB")
        fbank = None
        if "audio" in modality:
            fbank_file = clip_dir / "fbank.npy"
            if not fbank_file.exists():
                raise UnusableInput(
                    f"modality {modality} needs an audio stream, and the file has none"
                )
            fbank = np.load(fbank_file).astype(np.float32)
    return Prepared(frame, fbank)


def write_float_wav(path: Path, waveform: np.ndarray, rate: int) -> None:
    """A 32-bit float WAV of `waveform` (channels first), read back by ffmpeg sample-exactly."""
    from scipy.io import wavfile

    samples = np.asarray(waveform, dtype=np.float32)
    wavfile.write(path, int(rate), samples.T if samples.ndim == 2 else samples)


def prepare_clip(clip: Clip, features: dict, modality: str, start_s: float = 0.0) -> Prepared:
    """The middle frame and the fbank of a clip in memory (see the module's docstring)."""
    frame = fbank = None
    if "image" in modality:
        if not clip.frames:
            raise UnusableInput(f"{clip}: modality {modality} needs frames, and none were given")
        frame = as_pil(middle(list(clip.frames))).convert("RGB")
    if "audio" in modality:
        if clip.waveform is None or clip.rate is None:
            raise UnusableInput(f"{clip}: modality {modality} needs a waveform and its rate")
        waveform = np.asarray(clip.waveform)
        if waveform.ndim not in (1, 2) or waveform.shape[-1] == 0:
            raise UnusableInput(
                f"{clip}: waveform of shape {waveform.shape}: expected (samples,) or "
                "(channels, samples)"
            )
        if not np.issubdtype(waveform.dtype, np.floating):
            raise UnusableInput(
                f"{clip}: waveform of dtype {waveform.dtype}: expected floats in [-1, 1]"
            )
        if not (isinstance(clip.rate, int | np.integer) and clip.rate > 0):
            raise UnusableInput(f"{clip}: rate {clip.rate!r}: expected a positive integer (Hz)")
        with tempfile.TemporaryDirectory(prefix="dalipipe-caption-") as tmp:
            wav = Path(tmp) / "waveform.wav"
            write_float_wav(wav, waveform, clip.rate)
            try:
                fbank = prepare_file(wav, features, "audio", start_s).fbank
            except Exception as err:  # the temporary file's name means nothing to the caller
                reason = getattr(err, "reason", None) or str(err)
                raise UnusableInput(f"{clip}: {reason.replace(str(wav), 'waveform')}") from None
    return Prepared(frame, fbank)
