"""The synthetic world: sound-making object classes, how they look, how they sound, and how
captions describe them.

    from dalipipe.world.classes import world_classes, audio_caption, visual_caption
    classes = world_classes(12)
    audio_caption(["bell", "dog"])    # 'a bell chimes and a dog barks'
    visual_caption(["bell", "dog"])   # 'a photo of a red bell and an orange dog'

Each class has one unique colour (so a tiny captioner can name it from a 64x64 frame), one of
eight shapes, and a synthesised sound built from a different recipe (struck partials, barks,
thumps, chirps, sweeps, pulse trains, clicks, noise bands), so that classes can be told apart
from the audio alone. Audio captions say what is heard ("a bell chimes"); visual captions say
what is seen ("a photo of a red bell"): different wording, so that prefix tuning has a style
to steer towards. Clips are composed and written by `dalipipe.world.synthetic`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "hexagon", "ring")


@dataclass(frozen=True)
class SoundClass:
    name: str  # one word, used in every caption
    verb: str  # "a bell chimes"
    gerund: str  # "a bell chiming"
    colour: str  # colour word used in visual captions, unique per class
    rgb: tuple[int, int, int]
    shape: str  # one of SHAPES
    sound: str  # recipe name in SOUNDS


# Ordered so that the first n classes of any world have well-separated colours; the colours
# stay clear of the light-grey background. No verb is a class name plus "s" ("a bird whistles"
# would name a whistle when captions are scored).
CLASSES: tuple[SoundClass, ...] = (
    SoundClass("bell", "chimes", "chiming", "red", (220, 30, 30), "circle", "bell"),
    SoundClass("dog", "barks", "barking", "orange", (255, 140, 0), "square", "bark"),
    SoundClass("drum", "booms", "booming", "yellow", (240, 220, 0), "triangle", "drum"),
    SoundClass("bird", "chirps", "chirping", "green", (30, 150, 40), "diamond", "chirp"),
    SoundClass("siren", "wails", "wailing", "blue", (30, 60, 220), "star", "siren"),
    SoundClass("whistle", "blows", "blowing", "purple", (130, 40, 180), "cross", "whistle"),
    SoundClass("frog", "croaks", "croaking", "teal", (0, 128, 128), "hexagon", "croak"),
    SoundClass("clock", "ticks", "ticking", "pink", (255, 105, 180), "ring", "tick"),
    SoundClass("engine", "rumbles", "rumbling", "brown", (115, 65, 20), "square", "rumble"),
    SoundClass("cricket", "trills", "trilling", "lime", (150, 240, 50), "triangle", "trill"),
    SoundClass("phone", "rings", "ringing", "cyan", (0, 220, 235), "diamond", "ring"),
    SoundClass("horn", "honks", "honking", "black", (20, 20, 20), "circle", "honk"),
    SoundClass("fan", "hums", "humming", "navy", (10, 20, 100), "ring", "hum"),
    SoundClass("owl", "hoots", "hooting", "magenta", (215, 0, 200), "star", "hoot"),
    SoundClass("shaker", "rattles", "rattling", "olive", (128, 128, 0), "hexagon", "rattle"),
    SoundClass("cow", "moos", "mooing", "maroon", (110, 0, 30), "cross", "moo"),
)
BY_NAME = {c.name: c for c in CLASSES}
BACKGROUND_RGB = (200, 200, 200)


def world_classes(n: int) -> list[SoundClass]:
    """The first `n` classes of the world (2..16)."""
    if not 1 <= n <= len(CLASSES):
        raise ValueError(f"world.n_classes must be between 1 and {len(CLASSES)}, got {n}")
    return list(CLASSES[:n])


# ----------------------------------------------------------------------------- captions


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _with_article(phrase: str) -> str:
    return f"{_article(phrase)} {phrase}"


def _join(parts: Sequence[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _classes(names: Iterable[str]) -> list[SoundClass]:
    names = list(names)
    if not names:
        raise ValueError("a caption needs at least one class name")
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise ValueError(f"unknown world class name(s): {unknown}")
    return [BY_NAME[n] for n in names]


def _clauses(classes: Sequence[SoundClass]) -> list[str]:
    return [f"{_with_article(c.name)} {c.verb}" for c in classes]


def _gerunds(classes: Sequence[SoundClass], copula: bool = False) -> list[str]:
    be = " is" if copula else ""
    return [f"{_with_article(c.name)}{be} {c.gerund}" for c in classes]


def audio_caption(heard: Sequence[str], rng: np.random.Generator | None = None) -> str:
    """'a bell chimes, a dog barks and a drum booms'.

    Without `rng` the sounds are named in the order given (the canonical caption a clip
    stores); with `rng` their order is shuffled.
    """
    classes = _classes(heard)
    if rng is not None:
        classes = [classes[i] for i in rng.permutation(len(classes))]
    return _join(_clauses(classes))


def visual_caption(seen: Sequence[str]) -> str:
    """'a photo of a red bell and an orange dog'; 'a photo of an empty room' when none."""
    if not seen:
        return "a photo of an empty room"
    classes = _classes(seen)
    return "a photo of " + _join([_with_article(f"{c.colour} {c.name}") for c in classes])


def reference_captions(heard: Sequence[str], rng: np.random.Generator) -> list[str]:
    """Five distinct phrasings of what is heard; the first is the canonical audio caption."""
    classes = _classes(heard)

    def shuffled() -> list[SoundClass]:
        return [classes[i] for i in rng.permutation(len(classes))]

    return [
        _join(_clauses(classes)),
        "the sound of " + _join(_gerunds(shuffled())),
        _join(_gerunds(shuffled(), copula=True)),
        "you can hear " + _join(_gerunds(shuffled())),
        "there is " + _join(_gerunds(shuffled())) + " nearby",
    ]


def _names(classes: Iterable[SoundClass | str]) -> list[str]:
    return [c if isinstance(c, str) else c.name for c in classes]


def classes_named(caption: str, classes: Iterable[SoundClass | str]) -> set[str]:
    """Which of `classes` a caption mentions (whole words; a plural 's' counts)."""
    words = set(re.findall(r"[a-z]+", caption.lower()))
    return {n for n in _names(classes) if n in words or n + "s" in words}


_CLAUSE = re.compile(r"^an? ([a-z]+) ([a-z]+)$")


def is_well_formed(caption: str) -> bool:
    """True when a caption fits the audio-caption grammar: clauses 'a NAME VERB' of distinct
    world classes with their own verbs, joined by ', ' and a final ' and '."""
    text = caption.strip().lower().rstrip(".")
    head, sep, last = text.rpartition(" and ")
    parts = (head.split(", ") if sep else []) + [last]
    if sep and not head:
        return False
    names = []
    for part in parts:
        match = _CLAUSE.match(part)
        if not match:
            return False
        name, verb = match.groups()
        if name not in BY_NAME or BY_NAME[name].verb != verb:
            return False
        names.append(name)
    return len(names) == len(set(names))


# ----------------------------------------------------------------------------- looks


def shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Pixels (offsets dx, dy from the centre) inside a shape of radius `r`."""
    dist = np.hypot(dx, dy)
    if shape == "circle":
        return dist <= r
    if shape == "square":
        return np.maximum(abs(dx), abs(dy)) <= 0.8 * r
    if shape == "diamond":
        return abs(dx) + abs(dy) <= r
    if shape == "triangle":  # apex up, base at 0.8 r below the centre
        return (dy >= -r) & (dy <= 0.8 * r) & (abs(dx) <= (dy + r) * 0.55)
    if shape == "cross":
        arm = 0.35 * r
        return ((abs(dx) <= arm) & (abs(dy) <= r)) | ((abs(dy) <= arm) & (abs(dx) <= r))
    if shape == "hexagon":
        return (abs(dy) <= 0.87 * r) & (0.87 * abs(dx) + 0.5 * abs(dy) <= 0.87 * r)
    if shape == "ring":
        return (dist <= r) & (dist >= 0.55 * r)
    if shape == "star":
        angle = np.arctan2(dy, dx)
        return dist <= r * (0.68 + 0.32 * np.cos(5 * angle + np.pi / 2))
    raise ValueError(f"unknown shape {shape!r}")


def draw(frame: np.ndarray, cls: SoundClass, cx: float, cy: float, r: float) -> None:
    """Paint one object onto an (H, W, 3) uint8 frame in place."""
    h, w, _ = frame.shape
    y0, y1 = max(int(cy - r) - 1, 0), min(int(cy + r) + 2, h)
    x0, x1 = max(int(cx - r) - 1, 0), min(int(cx + r) + 2, w)
    if y0 >= y1 or x0 >= x1:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1]
    mask = shape_mask(cls.shape, xx + 0.5 - cx, yy + 0.5 - cy, r)
    frame[y0:y1, x0:x1][mask] = cls.rgb


# ----------------------------------------------------------------------------- sounds
# Every recipe takes the time axis t (seconds), the sample rate, a per-clip pitch factor
# (around 1) and a generator, and returns a signal with peak about 1. Onsets start at a
# random phase so that no two clips of a class are sample-identical.


def _onsets(seconds: float, period: float, rng: np.random.Generator) -> np.ndarray:
    first = rng.uniform(0, min(period, seconds / 2))
    period = period * rng.uniform(0.9, 1.1)
    return np.arange(first, seconds, period)


def _events(t, sr, onsets, make_event, length: float) -> np.ndarray:
    """Sum of events of `length` seconds; make_event(tau) gets the time since onset."""
    out = np.zeros_like(t)
    for onset in onsets:
        start = int(np.ceil(onset * sr))
        stop = min(len(t), start + int(length * sr))
        if start < stop:
            out[start:stop] += make_event(t[start:stop] - onset)
    return out


def _noise(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal(n)


def _band(x: np.ndarray, sr: int, lo: float, hi: float) -> np.ndarray:
    """Band-pass by zeroing FFT bins: exact and cheap for a few seconds of audio."""
    spec = np.fft.rfft(x)
    freqs = np.fft.rfftfreq(len(x), 1 / sr)
    spec[(freqs < lo) | (freqs > hi)] = 0
    return np.fft.irfft(spec, len(x))


def _bell(t, sr, pitch, rng):
    f0 = 660 * pitch
    partials = ((1.0, 1.0), (2.76, 0.6), (5.4, 0.35), (8.93, 0.2))

    def strike(tau):
        return sum(a * np.sin(2 * np.pi * f0 * k * tau) for k, a in partials) * np.exp(-tau / 0.35)

    return _events(t, sr, _onsets(t[-1], 0.9, rng), strike, 1.75)


def _bark(t, sr, pitch, rng):
    f0 = 380 * pitch

    def woof(tau):
        env = (tau < 0.13) * np.sin(np.pi * np.clip(tau / 0.13, 0, 1)) ** 0.5
        glide = f0 * (1 - 0.3 * tau)
        saw = 2 * ((glide * tau) % 1.0) - 1
        return env * (saw + 0.3 * rng.standard_normal(len(tau)))

    onsets = _onsets(t[-1], 0.65, rng)
    onsets = np.sort(np.concatenate([onsets, onsets + 0.2]))  # barks come in pairs
    return _events(t, sr, onsets, woof, 0.13)


def _drum(t, sr, pitch, rng):
    f0 = 80 * pitch

    def thump(tau):
        phase = 2 * np.pi * (f0 * tau + 60 * 0.04 * (1 - np.exp(-tau / 0.04)))  # pitch drop
        return np.sin(phase) * np.exp(-tau / 0.18)

    return _events(t, sr, _onsets(t[-1], 0.33, rng), thump, 0.9)


def _chirp(t, sr, pitch, rng):
    lo, hi, dur = 2500 * pitch, 5000 * pitch, 0.06

    def tweet(tau):
        live = tau < dur
        freq_phase = 2 * np.pi * (lo * tau + (hi - lo) * tau**2 / (2 * dur))
        return live * np.sin(freq_phase) * np.sin(np.pi * np.clip(tau / dur, 0, 1))

    groups = _onsets(t[-1], 0.8, rng)
    onsets = np.concatenate([groups + 0.09 * k for k in range(3)])  # three tweets per group
    return _events(t, sr, onsets, tweet, 0.06)


def _siren(t, sr, pitch, rng):
    freq = 1000 * pitch + 350 * np.sin(2 * np.pi * 0.8 * t + rng.uniform(0, 2 * np.pi))
    return np.sin(2 * np.pi * np.cumsum(freq) / sr)


def _whistle(t, sr, pitch, rng):
    freq = 2200 * pitch + 40 * np.sin(2 * np.pi * 6 * t)
    gate = (np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 2 * np.pi)) > -0.6).astype(float)
    return np.sin(2 * np.pi * np.cumsum(freq) / sr) * gate


def _croak(t, sr, pitch, rng):
    f0 = 180 * pitch

    def croak(tau):
        live = tau < 0.3
        pulses = (np.sin(2 * np.pi * 25 * tau) > 0).astype(float)
        return live * pulses * np.sign(np.sin(2 * np.pi * f0 * tau)) * 0.8

    return _events(t, sr, _onsets(t[-1], 0.7, rng), croak, 0.3)


def _tick(t, sr, pitch, rng):
    clicks = np.zeros_like(t)
    for onset in _onsets(t[-1], 0.25, rng):
        i = int(onset * sr)
        n = min(int(0.005 * sr), len(t) - i)
        clicks[i : i + n] = _noise(n, rng) * np.exp(-np.arange(n) / (0.001 * sr))
    return _band(clicks, sr, 3000 * pitch, 8000)


def _rumble(t, sr, pitch, rng):
    f0 = 45 * pitch
    wobble = 1 + 0.2 * np.sin(2 * np.pi * 3 * t)
    tone = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 6))
    return wobble * (tone + 2 * _band(_noise(len(t), rng), sr, 20, 250))


def _trill(t, sr, pitch, rng):
    gate = (np.sin(2 * np.pi * 40 * t) > 0) * (
        np.sin(2 * np.pi * 1.1 * t + rng.uniform(0, 6)) > -0.3
    )
    return np.sin(2 * np.pi * 4500 * pitch * t) * gate


def _ring(t, sr, pitch, rng):
    switch = np.sin(2 * np.pi * 16 * t) > 0
    freq = np.where(switch, 1000 * pitch, 1250 * pitch)
    on = ((t + rng.uniform(0, 0.8)) % 0.8) < 0.5
    return np.sin(2 * np.pi * np.cumsum(freq) / sr) * on


def _honk(t, sr, pitch, rng):
    def honk(tau):
        live = tau < 0.35
        return live * sum(2 * ((f * pitch * tau) % 1.0) - 1 for f in (280, 350)) * 0.5

    return _events(t, sr, _onsets(t[-1], 0.75, rng), honk, 0.35)


def _hum(t, sr, pitch, rng):
    tone = np.sin(2 * np.pi * 120 * pitch * t) + 0.5 * np.sin(2 * np.pi * 240 * pitch * t)
    return 0.5 * tone + 2 * _band(_noise(len(t), rng), sr, 300, 900)


def _hoot(t, sr, pitch, rng):
    f0 = 420 * pitch

    def hoot(tau):
        live = tau < 0.4
        phase = 2 * np.pi * (f0 * tau - 60 * tau**2)  # slow downward glide
        return live * np.sin(phase) * np.sin(np.pi * np.clip(tau / 0.4, 0, 1))

    onsets = _onsets(t[-1], 1.2, rng)
    return _events(t, sr, np.sort(np.concatenate([onsets, onsets + 0.5])), hoot, 0.4)


def _rattle(t, sr, pitch, rng):
    env = _events(t, sr, _onsets(t[-1], 0.125, rng), lambda tau: np.exp(-tau / 0.03), 0.15)
    return _band(_noise(len(t), rng), sr, 6000 * pitch, 8000) * env


def _moo(t, sr, pitch, rng):
    f0 = 140 * pitch

    def moo(tau):
        live = tau < 0.9
        saw = 2 * ((f0 * (1 + 0.15 * tau) * tau) % 1.0) - 1
        return live * saw * np.sin(np.pi * np.clip(tau / 0.9, 0, 1))

    return _events(t, sr, _onsets(t[-1], 1.4, rng), moo, 0.9)


SOUNDS: dict[str, Callable] = {
    "bell": _bell,
    "bark": _bark,
    "drum": _drum,
    "chirp": _chirp,
    "siren": _siren,
    "whistle": _whistle,
    "croak": _croak,
    "tick": _tick,
    "rumble": _rumble,
    "trill": _trill,
    "ring": _ring,
    "honk": _honk,
    "hum": _hum,
    "hoot": _hoot,
    "rattle": _rattle,
    "moo": _moo,
}


def synthesize(
    cls: SoundClass, seconds: float, sample_rate: int, rng: np.random.Generator, pitch: float = 1.0
) -> np.ndarray:
    """The sound of one object: float64, peak 1 (silence if the recipe gave none)."""
    t = np.arange(int(round(seconds * sample_rate))) / sample_rate
    wave = np.asarray(SOUNDS[cls.sound](t, sample_rate, pitch, rng), dtype=np.float64)
    peak = np.abs(wave).max() if wave.size else 0.0
    return wave / peak if peak > 0 else wave
