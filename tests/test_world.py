"""The synthetic world's classes, captions, looks and sounds.

pytest tests/test_world.py -q
"""

import numpy as np
import pytest

from dalipipe.world import classes as world
from dalipipe.world.classes import (
    audio_caption,
    classes_named,
    is_well_formed,
    reference_captions,
    visual_caption,
    world_classes,
)


def test_classes_have_unique_names_colours_and_sounds():
    classes = world_classes(16)
    assert len({c.name for c in classes}) == 16
    assert len({c.rgb for c in classes}) == 16
    assert len({c.colour for c in classes}) == 16
    assert len({c.sound for c in classes}) == 16
    names = {c.name for c in classes}
    assert not any(c.verb[:-1] in names or c.gerund in names for c in classes)
    assert all(c.shape in world.SHAPES for c in classes)
    assert [c.name for c in world_classes(3)] == ["bell", "dog", "drum"]
    with pytest.raises(ValueError, match="n_classes"):
        world_classes(17)


def test_audio_and_visual_captions_use_different_wording():
    assert audio_caption(["bell"]) == "a bell chimes"
    assert audio_caption(["bell", "owl", "engine"]) == (
        "a bell chimes, an owl hoots and an engine rumbles"
    )
    assert visual_caption(["bell", "dog"]) == "a photo of a red bell and an orange dog"
    assert visual_caption([]) == "a photo of an empty room"
    shuffled = audio_caption(["bell", "dog", "drum"], np.random.default_rng(1))
    assert sorted(shuffled.replace(" and ", ", ").split(", ")) == [
        "a bell chimes",
        "a dog barks",
        "a drum booms",
    ]
    with pytest.raises(ValueError, match="unknown"):
        audio_caption(["unicorn"])


def test_reference_captions_are_five_distinct_and_name_the_same_classes():
    rng = np.random.default_rng(0)
    refs = reference_captions(["frog", "clock"], rng)
    assert len(set(refs)) == 5
    assert refs[0] == "a frog croaks and a clock ticks"
    for ref in refs:
        assert classes_named(ref, world_classes(12)) == {"frog", "clock"}
    assert reference_captions(["fan"], rng)[1] == "the sound of a fan humming"


def test_classes_named_matches_whole_words_and_plurals():
    classes = world_classes(12)
    assert classes_named("two dogs and a bell", classes) == {"dog", "bell"}
    assert classes_named("a doghouse with bellows", classes) == set()
    assert classes_named("a fan hums", classes) == set()  # fan is not among the first 12


def test_well_formed_follows_the_audio_grammar_only():
    assert is_well_formed("a bell chimes")
    assert is_well_formed("a bell chimes, an owl hoots and an engine rumbles")
    assert is_well_formed("a dog barks and a bell chimes.")
    assert not is_well_formed("a photo of a red bell")  # visual style
    assert not is_well_formed("a bell barks")  # wrong verb for the class
    assert not is_well_formed("a bell chimes and a bell chimes")  # repeated class
    assert not is_well_formed("a bell chimes and")
    assert not is_well_formed("bird bird bird bird")
    assert not is_well_formed("a bell chimes, a dog barks")  # missing the final 'and'


def test_shapes_cover_the_expected_area():
    yy, xx = np.mgrid[0:200, 0:200] - 99.5  # pixel centres
    r = 80.0
    areas = {s: world.shape_mask(s, xx, yy, r).sum() / (np.pi * r * r) for s in world.SHAPES}
    assert areas["circle"] == pytest.approx(1.0, abs=0.01)
    assert areas["square"] == pytest.approx(4 * 0.8**2 / np.pi, abs=0.01)
    assert areas["diamond"] == pytest.approx(2 / np.pi, abs=0.01)
    assert areas["ring"] == pytest.approx(1 - 0.55**2, abs=0.01)
    assert all(0.2 < a <= 1.01 for a in areas.values())


def test_draw_paints_the_class_colour_at_the_centre_only():
    frame = np.zeros((64, 64, 3), np.uint8)
    world.draw(frame, world.BY_NAME["bell"], 20.0, 30.0, 8.0)
    assert tuple(frame[30, 20]) == (220, 30, 30)
    assert tuple(frame[30, 40]) == (0, 0, 0)
    assert (frame.any(axis=2)).sum() == pytest.approx(np.pi * 64, rel=0.1)


def _band_energy(wave, sr, lo, hi):
    spec = np.abs(np.fft.rfft(wave)) ** 2
    freqs = np.fft.rfftfreq(len(wave), 1 / sr)
    return spec[(freqs >= lo) & (freqs < hi)].sum() / spec.sum()


def test_sounds_are_normalised_deterministic_and_spectrally_distinct():
    sr = 16000
    waves = {}
    for cls in world_classes(16):
        wave = world.synthesize(cls, 2.56, sr, np.random.default_rng(3))
        again = world.synthesize(cls, 2.56, sr, np.random.default_rng(3))
        assert wave.shape == (40960,)
        assert np.abs(wave).max() == pytest.approx(1.0)
        np.testing.assert_array_equal(wave, again)
        waves[cls.name] = wave
    # Recipes put their energy where they were designed to.
    assert _band_energy(waves["drum"], sr, 0, 200) > 0.9
    assert _band_energy(waves["engine"], sr, 0, 300) > 0.9
    assert _band_energy(waves["cricket"], sr, 4000, 5000) > 0.9
    assert _band_energy(waves["shaker"], sr, 5900, 8000) > 0.9
    assert _band_energy(waves["whistle"], sr, 2000, 2400) > 0.9


def test_classes_can_be_told_apart_from_audio_alone():
    """A nearest-centroid classifier on log-spaced band energies (like a log-mel input)
    separates all 16 classes, with random pitch, gain and background noise."""
    sr = 16000
    edges = np.unique(np.geomspace(1, 256, 33).astype(int))

    def features(wave):
        frames = np.lib.stride_tricks.sliding_window_view(wave, 512)[::256] * np.hanning(512)
        power = np.abs(np.fft.rfft(frames)) ** 2
        bands = np.log(np.add.reduceat(power, edges, axis=1) + 1e-6)
        return np.concatenate([bands.mean(0), bands.std(0)])

    x, y = [], []
    for label, cls in enumerate(world_classes(16)):
        for k in range(10):
            rng = np.random.default_rng([label, k])
            wave = world.synthesize(cls, 2.56, sr, rng, pitch=rng.uniform(0.95, 1.05))
            wave = wave * rng.uniform(0.5, 1.0) + 0.05 * rng.standard_normal(len(wave))
            x.append(features(wave))
            y.append(label)
    x, y = np.array(x), np.array(y)
    train = np.arange(len(y)) % 2 == 0
    centroids = np.array([x[train & (y == c)].mean(0) for c in range(16)])
    pred = np.argmin(((x[~train][:, None] - centroids) ** 2).sum(-1), axis=1)
    assert (pred == y[~train]).mean() == 1.0
