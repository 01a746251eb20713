"""The Kaldi log-mel filterbank that CAV-MAE checkpoints were trained on, in NumPy.

    dalipipe features clip.mp4 --out clip.npy      # raw log-mel, the schema's extract.fbank bins
    dalipipe features clip.mp4 --out clip.npy --params '{"extract": {"fbank": {"num_mel_bins": 128}}}'
    dalipipe features clip.wav --out x.npy --normalized --params '{"extract": {"fbank": {...}}}'

The reference is ``torchaudio.compliance.kaldi.fbank(wave - wave.mean(), htk_compat=True,
use_energy=False, window_type='hanning', num_mel_bins=128, dither=0.0, frame_shift=10)`` with
Kaldi's other defaults: 25 ms frames, per-frame DC removal, pre-emphasis 0.97, a symmetric Hann
window, zero padding to a 512-point FFT, power spectrum, triangular filters evenly spaced on the
HTK mel scale from 20 Hz to Nyquist, and log with a float32-epsilon floor. torchaudio cannot be
installed beside the CPU build of torch, so this module is a re-implementation (checked against
kaldi-native-fbank in tests/test_fbank.py).

The model input then pads (zeros in the log-mel domain) or cuts to ``target_length`` frames and
normalises with the AudioSet statistics *after* padding, as the official loaders do, so padded
frames become ``(0 - mean) / std`` rather than zero.
"""

from __future__ import annotations

import functools
import logging
import math
from pathlib import Path

import numpy as np
import scipy.sparse

from dalipipe.common import atomic_path, read_stage, stage_parser

log = logging.getLogger(__name__)

MODEL_SAMPLE_RATE = 16000
# Kaldi and torchaudio floor the mel energies at float32 epsilon before the log, whatever the
# dtype of the computation; silence therefore maps to log(eps) = -15.942385.
LOG_FLOOR = float(np.finfo(np.float32).eps)
# The paper-scale settings (AudioSet statistics from the CAV-MAE loaders).
PAPER_FBANK = {"num_mel_bins": 128, "target_length": 1024, "mean": -5.081, "std": 4.4849}


def mel_scale(freq_hz):
    return 1127.0 * np.log1p(np.asarray(freq_hz, dtype=np.float64) / 700.0)


def mel_filter_matrix(
    num_mel_bins: int,
    n_fft: int,
    sample_rate: float,
    low_freq: float = 20.0,
    high_freq: float = 0.0,
) -> np.ndarray:
    """Triangular filters, ``(num_mel_bins, n_fft // 2 + 1)`` float64; the Nyquist column is 0.

    Filter m rises from mel edge m to edge m+1 and falls to edge m+2, the edges being evenly
    spaced on the mel scale; the response is evaluated at each FFT bin's mel value (Kaldi's
    construction, not librosa's). A non-positive ``high_freq`` counts back from Nyquist.
    """
    nyquist = 0.5 * sample_rate
    if high_freq <= 0.0:
        high_freq += nyquist
    if not 0.0 <= low_freq < high_freq <= nyquist:
        raise ValueError(
            f"mel range must satisfy 0 <= low_freq < high_freq <= Nyquist ({nyquist} Hz), "
            f"got low_freq={low_freq}, high_freq={high_freq}"
        )
    mel_low, mel_high = mel_scale(low_freq), mel_scale(high_freq)
    edges = mel_low + (mel_high - mel_low) / (num_mel_bins + 1) * np.arange(num_mel_bins + 2)
    left, center, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    bin_mel = mel_scale(sample_rate / n_fft * np.arange(n_fft // 2))[None, :]
    rising = (bin_mel - left) / (center - left)
    falling = (right - bin_mel) / (right - center)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    return np.pad(weights, ((0, 0), (0, 1)))


@functools.lru_cache(maxsize=16)
def _sparse_filters(num_mel_bins, n_fft, sample_rate, low_freq, high_freq):
    # Each FFT bin feeds at most two filters, so a sparse product is ~40x cheaper than a dense
    # matmul and does not depend on how many BLAS threads the machine's neighbours leave us.
    weights = mel_filter_matrix(num_mel_bins, n_fft, sample_rate, low_freq, high_freq)
    return scipy.sparse.csc_array(weights.T)


def kaldi_fbank(
    wave: np.ndarray,
    sample_rate: int,
    num_mel_bins: int = 128,
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
    preemphasis: float = 0.97,
    low_freq: float = 20.0,
    high_freq: float = 0.0,
) -> np.ndarray:
    """Kaldi log-mel filterbank of a mono waveform, ``(frames, num_mel_bins)`` float32.

    ``frames = 1 + (len(wave) - frame_length) // frame_shift`` (Kaldi's snip_edges); a wave
    shorter than one frame gives zero frames. The wave is used as given: the CAV-MAE loaders
    subtract its mean first (see ``log_mel``).
    """
    wave = np.asarray(wave)
    if wave.ndim != 1:
        raise ValueError(f"expected a mono 1-D waveform, got shape {wave.shape}")
    if not np.all(np.isfinite(wave)):
        raise ValueError("waveform contains NaN or infinite samples")
    frame_length = int(sample_rate * frame_length_ms * 0.001)
    frame_shift = int(sample_rate * frame_shift_ms * 0.001)
    n_fft = 1 << (frame_length - 1).bit_length()
    n_frames = 0 if len(wave) < frame_length else 1 + (len(wave) - frame_length) // frame_shift
    filters = _sparse_filters(num_mel_bins, n_fft, sample_rate, float(low_freq), float(high_freq))
    if n_frames == 0:
        return np.zeros((0, num_mel_bins), dtype=np.float32)

    windows = np.lib.stride_tricks.sliding_window_view(wave, frame_length)
    # One float64 buffer already zero-padded to the FFT size; every step below works in place.
    padded = np.zeros((n_frames, n_fft))
    frames = padded[:, :frame_length]
    frames[:] = windows[: (n_frames - 1) * frame_shift + 1 : frame_shift]
    frames -= frames.mean(axis=1, keepdims=True)
    # Pre-emphasis; Kaldi treats the sample before each frame's first one as that sample itself.
    frames[:, 1:] -= preemphasis * frames[:, :-1]
    frames[:, 0] *= 1.0 - preemphasis
    n = np.arange(frame_length)
    frames *= 0.5 - 0.5 * np.cos(2.0 * math.pi * n / (frame_length - 1))  # symmetric Hann
    spectrum = np.fft.rfft(padded, axis=1)
    power = spectrum.real**2 + spectrum.imag**2
    energies = power @ filters
    return np.log(np.maximum(energies, LOG_FLOOR)).astype(np.float32)


def log_mel(wave: np.ndarray, sample_rate: int, num_mel_bins: int = 128) -> np.ndarray:
    """The raw CAV-MAE feature: ``kaldi_fbank`` of the mean-subtracted wave, 16 kHz only."""
    if sample_rate != MODEL_SAMPLE_RATE:
        raise ValueError(
            f"the filterbank expects {MODEL_SAMPLE_RATE} Hz audio, got {sample_rate} Hz: "
            "resample first (CAV-MAE checkpoints were trained on 16 kHz features)"
        )
    wave = np.asarray(wave, dtype=np.float64)
    if wave.size == 0:
        raise ValueError("empty waveform")
    return kaldi_fbank(wave - wave.mean(), sample_rate, num_mel_bins=num_mel_bins)


def pad_or_cut(fb: np.ndarray, target_length: int) -> np.ndarray:
    """Zero-pad at the end or keep the first ``target_length`` frames."""
    if target_length <= 0:
        raise ValueError(f"target_length must be positive, got {target_length}")
    missing = target_length - fb.shape[0]
    if missing > 0:
        return np.pad(fb, ((0, missing), (0, 0)))
    return fb[:target_length]


def normalize(fb: np.ndarray, mean: float, std: float) -> np.ndarray:
    if not std > 0:
        raise ValueError(f"fbank std must be positive, got {std}")
    return ((fb - mean) / std).astype(np.float32)


def fbank_settings(fbank_cfg: dict | None) -> dict:
    """The paper settings overridden by config ``extract.fbank``; unknown keys are an error."""
    fbank_cfg = dict(fbank_cfg or {})
    unknown = set(fbank_cfg) - set(PAPER_FBANK)
    if unknown:
        raise ValueError(f"extract.fbank: unknown keys {sorted(unknown)}")
    return {**PAPER_FBANK, **fbank_cfg}


def model_input_from_wave(wave: np.ndarray, sample_rate: int, fbank_cfg: dict) -> np.ndarray:
    """The audio encoder's input, ``(target_length, num_mel_bins)`` float32."""
    cfg = fbank_settings(fbank_cfg)
    fb = log_mel(wave, sample_rate, num_mel_bins=int(cfg["num_mel_bins"]))
    return normalize(pad_or_cut(fb, int(cfg["target_length"])), cfg["mean"], cfg["std"])


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("features", __doc__.split("\n")[0], "section extract.fbank")
    parser.add_argument("file", type=Path, help="any audio or video file ffmpeg can decode")
    parser.add_argument("--out", type=Path, required=True, help="output .npy (float32)")
    parser.add_argument(
        "--normalized",
        action="store_true",
        help="write the model input (padded/cut, normalised) instead of the raw log-mel",
    )
    args, params = read_stage(parser, argv)

    from dalipipe.data.ffmpeg import decode_audio

    cfg = fbank_settings(params["extract"]["fbank"])
    if not args.file.is_file():
        parser.error(f"{args.file}: no such file")
    wave = decode_audio(args.file, sample_rate=MODEL_SAMPLE_RATE)
    if args.normalized:
        features = model_input_from_wave(wave, MODEL_SAMPLE_RATE, cfg)
    else:
        features = log_mel(wave, MODEL_SAMPLE_RATE, num_mel_bins=int(cfg["num_mel_bins"]))
    with atomic_path(args.out) as tmp, open(tmp, "wb") as f:
        np.save(f, features)
    log.info(
        "%s: %.2f s of audio -> %s %s",
        args.file,
        len(wave) / MODEL_SAMPLE_RATE,
        args.out,
        features.shape,
    )
    return 0
