"""The authors' preprocessing of one clip, as their scripts do it, for bench/extract.py.

CAV-MAE's ``src/preprocess/extract_video_frame.py`` (which DALI uses): OpenCV opens the video,
takes ``total = min(frame_count, int(fps * 10))`` and for i = 0..9 seeks to frame
``int(i * total / 10) - 1`` and reads one frame; BGR -> RGB, resize the short side to 224
(bilinear, what torchvision's ``Resize`` does on a PIL image), centre-crop 224 x 224, save as
JPEG (``save_image``: PIL's default quality). ``extract_audio.py``: ``ffmpeg -i X -vn -ar 16000
tmp.wav``, then ``sox tmp.wav out.wav remix 1`` (keep channel 1) and delete tmp.wav. Their
filterbank is computed later, in every training loader, from that WAV (torchaudio's Kaldi
fbank; here dalipipe's re-implementation of the same function, ``model_input_from_wave``).
Their seeks, decoder threads and separate processes are kept, because they are the cost
being compared.
"""

from __future__ import annotations

import shutil
import subprocess
import wave
from pathlib import Path

import numpy as np

from dalipipe.data.ffmpeg import ffmpeg_exe
from dalipipe.data.local import AUDIO_EXTENSIONS

FRAMES = 10
SIZE = 224


def missing_tools() -> list[str]:
    """What the authors' pipeline needs and this machine lacks."""
    missing = []
    try:
        import cv2  # noqa: F401
    except ImportError:
        missing.append("cv2 (pip install opencv-python-headless)")
    if shutil.which("sox") is None:
        missing.append("sox (apt-get install sox)")
    return missing


def extract_frames(src: str, out: Path) -> int:
    import cv2
    from PIL import Image

    capture = cv2.VideoCapture(src)
    fps = capture.get(cv2.CAP_PROP_FPS)
    total = min(int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), int(fps * 10))
    written = 0
    for i in range(FRAMES):
        capture.set(cv2.CAP_PROP_POS_FRAMES, int(i * (total / FRAMES)) - 1)
        ok, frame = capture.read()
        if not ok:  # their script raised here and skipped the rest of the clip
            break
        image = Image.fromarray(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
        w, h = image.size
        scale = SIZE / min(w, h)
        image = image.resize((max(SIZE, round(w * scale)), max(SIZE, round(h * scale))),
                             Image.BILINEAR)  # fmt: skip
        left, top = (image.width - SIZE) // 2, (image.height - SIZE) // 2
        image.crop((left, top, left + SIZE, top + SIZE)).save(out / f"frame_{i}.jpg")
        written += 1
    capture.release()
    return written


def extract_audio(src: str, out: Path) -> Path:
    intermediate, wav = out / "intermediate.wav", out / "audio.wav"
    subprocess.run([ffmpeg_exe(), "-nostdin", "-y", "-i", src, "-vn", "-ar", "16000",
                    str(intermediate)], capture_output=True, check=True)  # fmt: skip
    subprocess.run(["sox", str(intermediate), str(wav), "remix", "1"], check=True)
    intermediate.unlink()
    return wav


def training_loader_fbank(wav: Path, fbank: dict) -> np.ndarray:
    from dalipipe.data.fbank import model_input_from_wave

    with wave.open(str(wav)) as f:
        rate, width = f.getframerate(), f.getsampwidth()
        samples = np.frombuffer(f.readframes(f.getnframes()), dtype=f"<i{width}")
    return model_input_from_wave(samples / float(1 << (8 * width - 1)), rate, fbank)


def preprocess(src: str, out: Path, fbank: dict) -> int:
    """Frames, WAV and filterbank of one clip; returns the number of frames."""
    out.mkdir(parents=True, exist_ok=True)
    frames = 0 if Path(src).suffix.lower() in AUDIO_EXTENSIONS else extract_frames(src, out)
    training_loader_fbank(extract_audio(src, out), fbank)
    return frames
