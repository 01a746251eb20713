"""The Kaldi filterbank against kaldi-native-fbank, and the model-input layout.

    HF_HUB_OFFLINE=1 pytest tests/test_fbank.py -x -q

kaldi-native-fbank (a C++ port of Kaldi's feature code) is the oracle: same signals, same
options, our output must match to 1e-3 in the log domain (0.1% in energy). It refuses more than 126 mel bins
at 16 kHz with a 512-point FFT, because the 4th filter then contains no FFT bin; the paper uses
128, where torchaudio silently emits log(float32 eps) for that filter. So at 128 bins the tests
check that the same construction extends consistently: the filters match the HTK mel formula
written out independently, exactly filter 3 is empty (and floored), and pure tones peak in the
filter whose centre is nearest.

The definitive 128-bin check needs torchaudio, which installs only beside a CUDA build of torch.
To make that fixture: on such a machine (``pip install torchaudio``) run
``python tests/fixtures/make_torchaudio_fbank.py``; it writes
``tests/fixtures/torchaudio_fbank128.npz`` (the input waves and torchaudio's outputs for the
official call), and ``test_matches_torchaudio_fixture`` below then compares against it instead
of skipping.
"""

import math
import time
import wave as wavefile
from pathlib import Path

import kaldi_native_fbank as knf
import numpy as np
import pytest

from dalipipe.config import section_defaults
from dalipipe.data import fbank as fb

SR = 16000
FLOOR = math.log(np.finfo(np.float32).eps)  # -15.942385...
FIXTURE = Path(__file__).parent / "fixtures" / "torchaudio_fbank128.npz"


def knf_fbank(wave, sample_rate, num_mel_bins):
    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = sample_rate
    opts.frame_opts.dither = 0.0
    opts.frame_opts.window_type = "hanning"
    opts.mel_opts.num_bins = num_mel_bins
    opts.use_energy = False
    opts.htk_compat = True
    online = knf.OnlineFbank(opts)
    online.accept_waveform(sample_rate, wave.tolist())
    online.input_finished()
    return np.stack([online.get_frame(i) for i in range(online.num_frames_ready)])


def knf_filters(num_mel_bins, sample_rate=SR):
    mel_opts = knf.MelBanksOptions()
    mel_opts.num_bins = num_mel_bins
    frame_opts = knf.FrameExtractionOptions()
    frame_opts.samp_freq = sample_rate
    return np.array(knf.MelBanks(mel_opts, frame_opts, 1.0).get_matrix())


def signal(name, seconds=1.0, sample_rate=SR):
    rng = np.random.default_rng(7)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    if name == "noise":
        x = 0.1 * rng.standard_normal(t.size)
    elif name == "tones":
        x = 0.4 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 3000 * t)
    elif name == "chirp":
        x = 0.5 * np.sin(2 * np.pi * (50 * t + 1900 * t**2))
    elif name == "silence":
        x = np.zeros_like(t)
    elif name == "silence_then_burst":
        # Exact zeros hit the log floor in every filter; the burst checks the transition frames.
        x = np.zeros_like(t)
        x[t.size // 2 : t.size // 2 + 1200] = 0.5 * rng.standard_normal(1200)
    elif name == "quiet_noise":
        x = 1e-4 * rng.standard_normal(t.size)  # near the floor in the low filters
    elif name == "offset_noise":
        x = 0.3 + 0.01 * rng.standard_normal(t.size)  # only per-frame DC removal hides the offset
    return x.astype(np.float32)


SIGNALS = [
    "noise",
    "tones",
    "chirp",
    "silence",
    "silence_then_burst",
    "quiet_noise",
    "offset_noise",
]


@pytest.mark.parametrize("name", SIGNALS)
@pytest.mark.parametrize("num_mel_bins", [23, 64, 126])
def test_matches_kaldi_native_fbank(name, num_mel_bins):
    wave = signal(name)
    ours = fb.kaldi_fbank(wave, SR, num_mel_bins=num_mel_bins)
    reference = knf_fbank(wave, SR, num_mel_bins)
    assert ours.shape == reference.shape == (98, num_mel_bins)
    assert ours.dtype == np.float32
    assert_same_fbank(ours, reference)


def assert_same_fbank(ours, reference):
    # Filters with real energy agree to 1e-3 in the log domain: Kaldi computes the filter weights
    # in float32 (~2e-5 off the formula, which is 5e-4 relative for a tone on a filter's edge).
    strong = reference > -8
    np.testing.assert_allclose(ours[strong], reference[strong], rtol=0, atol=1e-3)
    # Near the floor, a float32 FFT is only exact to eps times the frame's largest energy, so
    # compare energies: 0.1% or that rounding bound, whichever is larger.
    ours_energy, reference_energy = np.exp(ours.astype(np.float64)), np.exp(reference)
    rounding = np.finfo(np.float32).eps * reference_energy.max(axis=1, keepdims=True)
    assert np.all(np.abs(ours_energy - reference_energy) <= 1e-3 * reference_energy + rounding)


def test_matches_kaldi_native_fbank_at_8khz():
    wave = signal("chirp", sample_rate=8000)
    assert_same_fbank(fb.kaldi_fbank(wave, 8000, num_mel_bins=40), knf_fbank(wave, 8000, 40))


def test_silence_is_exactly_the_log_floor():
    out = fb.kaldi_fbank(np.zeros(SR, dtype=np.float32), SR, num_mel_bins=128)
    assert np.all(out == np.float32(FLOOR))


@pytest.mark.parametrize("num_mel_bins", [64, 110, 126])
def test_filter_matrix_matches_kaldi_native_fbank(num_mel_bins):
    ours = fb.mel_filter_matrix(num_mel_bins, 512, SR)
    assert ours.shape == (num_mel_bins, 257)
    np.testing.assert_allclose(ours, knf_filters(num_mel_bins), atol=5e-5)


def htk_filter_weight(m, k, num_mel_bins, n_fft=512, sample_rate=SR, low=20.0, high=8000.0):
    """Kaldi's mel-bank rule for one (filter, FFT bin) pair, written with scalars."""

    def mel(f):
        return 1127.0 * math.log(1.0 + f / 700.0)

    delta = (mel(high) - mel(low)) / (num_mel_bins + 1)
    left, center, right = (mel(low) + (m + j) * delta for j in range(3))
    if k >= n_fft // 2:
        return 0.0
    x = mel(k * sample_rate / n_fft)
    if not left < x < right:
        return 0.0
    return (x - left) / (center - left) if x <= center else (right - x) / (right - center)


def test_128_bin_filters_follow_the_htk_mel_formula():
    ours = fb.mel_filter_matrix(128, 512, SR)
    expected = np.array([[htk_filter_weight(m, k, 128) for k in range(257)] for m in range(128)])
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("num_mel_bins", [127, 128])
def test_128_bins_leave_exactly_filter_3_empty_where_kaldi_refuses(num_mel_bins):
    with pytest.raises(ValueError, match="num_mel_bins too large"):
        knf_filters(num_mel_bins)
    filters = fb.mel_filter_matrix(num_mel_bins, 512, SR)
    assert np.flatnonzero(filters.sum(axis=1) == 0).tolist() == [3]
    out = fb.kaldi_fbank(signal("noise"), SR, num_mel_bins=num_mel_bins)
    assert np.all(out[:, 3] == np.float32(FLOOR))
    # Every other filter sees the noise (single frames of the 1-bin low filters may still floor).
    assert np.all(np.delete(out, 3, axis=1).mean(axis=0) > FLOOR + 1)


def test_every_accepted_bin_count_has_no_empty_filter():
    # The consistency argument above: our empty filters appear exactly where Kaldi starts refusing.
    for num_mel_bins in (100, 120, 126):
        knf_filters(num_mel_bins)
        assert np.all(fb.mel_filter_matrix(num_mel_bins, 512, SR).sum(axis=1) > 0)


@pytest.mark.parametrize("freq", [100.0, 440.0, 1000.0, 3000.0, 7000.0])
def test_128_bin_tone_peaks_in_the_nearest_filter(freq):
    t = np.arange(SR) / SR
    out = fb.kaldi_fbank(np.sin(2 * np.pi * freq * t).astype(np.float32), SR, num_mel_bins=128)
    mel_low, mel_high = fb.mel_scale(20.0), fb.mel_scale(8000.0)
    centers_mel = mel_low + (mel_high - mel_low) / 129 * np.arange(1, 129)
    centers_hz = 700.0 * np.expm1(centers_mel / 1127.0)
    assert out.mean(axis=0).argmax() == np.abs(centers_hz - freq).argmin()


@pytest.mark.skipif(not FIXTURE.exists(), reason="run tests/fixtures/make_torchaudio_fbank.py")
def test_matches_torchaudio_fixture():
    data = np.load(FIXTURE)
    names = [key[: -len("_wave")] for key in data.files if key.endswith("_wave")]
    assert names
    for name in names:
        ours = fb.log_mel(data[f"{name}_wave"], SR, num_mel_bins=128)
        np.testing.assert_allclose(ours, data[f"{name}_fbank"], atol=1e-3, err_msg=name)


def test_frame_count_follows_snip_edges():
    assert fb.kaldi_fbank(np.ones(399, np.float32), SR, 64).shape == (0, 64)
    assert fb.kaldi_fbank(np.ones(400, np.float32), SR, 64).shape == (1, 64)
    assert fb.kaldi_fbank(np.ones(400 + 159, np.float32), SR, 64).shape == (1, 64)
    assert fb.kaldi_fbank(np.ones(400 + 160, np.float32), SR, 64).shape == (2, 64)
    assert fb.kaldi_fbank(np.zeros(10 * SR, np.float32), SR, 128).shape == (998, 128)


def test_log_mel_subtracts_the_mean_and_requires_16khz():
    wave = signal("tones")
    np.testing.assert_array_equal(
        fb.log_mel(wave + 0.25, SR, 64),
        fb.kaldi_fbank((wave + 0.25) - (wave + 0.25).astype(np.float64).mean(), SR, 64),
    )
    with pytest.raises(ValueError, match="16000 Hz"):
        fb.log_mel(wave, 44100, 64)
    with pytest.raises(ValueError, match="empty"):
        fb.log_mel(np.zeros(0, np.float32), SR, 64)


def test_bad_waveforms_are_rejected():
    with pytest.raises(ValueError, match="mono"):
        fb.kaldi_fbank(np.zeros((2, SR), np.float32), SR)
    with pytest.raises(ValueError, match="NaN"):
        fb.kaldi_fbank(np.full(SR, np.nan, np.float32), SR)


def test_pad_or_cut():
    x = np.arange(12, dtype=np.float32).reshape(4, 3) + 1
    padded = fb.pad_or_cut(x, 6)
    np.testing.assert_array_equal(padded[:4], x)
    np.testing.assert_array_equal(padded[4:], np.zeros((2, 3)))
    np.testing.assert_array_equal(fb.pad_or_cut(x, 2), x[:2])
    np.testing.assert_array_equal(fb.pad_or_cut(x, 4), x)
    with pytest.raises(ValueError, match="target_length"):
        fb.pad_or_cut(x, 0)


def test_model_input_pads_before_normalising():
    cfg = {"num_mel_bins": 128, "target_length": 1024, "mean": -5.081, "std": 4.4849}
    wave = signal("noise", seconds=10.0)
    model_input = fb.model_input_from_wave(wave, SR, cfg)
    assert model_input.shape == (1024, 128) and model_input.dtype == np.float32
    raw = fb.log_mel(wave, SR, 128)
    np.testing.assert_allclose(model_input[:998], (raw + 5.081) / 4.4849, rtol=1e-6)
    # Padded frames are zeros in the log-mel domain, so they become 5.081 / 4.4849 = 1.1329...
    np.testing.assert_allclose(model_input[998:], 1.1329126, rtol=1e-6)
    # The empty 4th filter is floored at log(eps), then normalised.
    np.testing.assert_allclose(model_input[:998, 3], (FLOOR + 5.081) / 4.4849, rtol=1e-6)


def test_model_input_cuts_long_audio_and_uses_the_config():
    cfg = {"num_mel_bins": 64, "target_length": 256, "mean": 0.0, "std": 2.0}
    wave = signal("chirp", seconds=4.0)
    model_input = fb.model_input_from_wave(wave, SR, cfg)
    np.testing.assert_allclose(model_input, fb.log_mel(wave, SR, 64)[:256] / 2.0, rtol=1e-6)
    with pytest.raises(ValueError, match="16000"):
        fb.model_input_from_wave(wave, 22050, cfg)
    with pytest.raises(ValueError, match="unknown keys"):
        fb.model_input_from_wave(wave, SR, {**cfg, "num_bins": 64})
    with pytest.raises(ValueError, match="std"):
        fb.model_input_from_wave(wave, SR, {**cfg, "std": 0.0})


def test_ten_seconds_take_a_few_milliseconds():
    wave = signal("noise", seconds=10.0)
    fb.kaldi_fbank(wave, SR, 128)  # build and cache the filters
    start = time.perf_counter()
    for _ in range(10):
        fb.kaldi_fbank(wave, SR, 128)
    per_clip = (time.perf_counter() - start) / 10
    # ~5-10 ms on one shared core; the bound only catches a loop over frames or a dense rebuild.
    assert per_clip < 0.1, f"{per_clip * 1e3:.1f} ms per 10 s clip"


def write_pcm16(path, samples, sample_rate, channels=1):
    pcm = np.clip(np.round(samples * 32767), -32768, 32767).astype("<i2")
    with wavefile.open(str(path), "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(pcm.tobytes())
    return pcm


def test_features_cli_on_a_real_wav(tmp_path):
    pytest.importorskip("dalipipe.data.ffmpeg", reason="decode_audio not written yet")
    pcm = write_pcm16(tmp_path / "clip.wav", signal("tones", seconds=3.0), SR)
    assert fb.main([str(tmp_path / "clip.wav"), "--out", str(tmp_path / "raw.npy")]) == 0
    raw = np.load(tmp_path / "raw.npy")
    # ffmpeg's s16 -> float conversion divides by 32768.
    # alone, the command takes the schema's filterbank (the miniature's bins), as every stage does
    bins = section_defaults("extract")["fbank"]["num_mel_bins"]
    np.testing.assert_allclose(raw, fb.log_mel(pcm / 32768.0, SR, bins), atol=1e-4)

    params = '{"extract": {"fbank": {"num_mel_bins": 64, "target_length": 256}}}'
    out = tmp_path / "input.npy"
    assert (
        fb.main([str(tmp_path / "clip.wav"), "--out", str(out), "--normalized", "--params", params])
        == 0
    )
    model_input = np.load(out)
    assert model_input.shape == (256, 64)
    np.testing.assert_allclose(model_input[298:], 5.081 / 4.4849, rtol=1e-5)


def test_features_cli_resamples_other_rates(tmp_path):
    pytest.importorskip("dalipipe.data.ffmpeg", reason="decode_audio not written yet")
    stereo = np.repeat(signal("noise", seconds=2.0, sample_rate=44100)[:, None], 2, axis=1)
    write_pcm16(tmp_path / "clip.wav", stereo.ravel(), 44100, channels=2)
    assert fb.main([str(tmp_path / "clip.wav"), "--out", str(tmp_path / "raw.npy")]) == 0
    bins = section_defaults("extract")["fbank"]["num_mel_bins"]  # alone: the schema's
    assert np.load(tmp_path / "raw.npy").shape == (198, bins)
