"""Scores that only the synthetic world can give: which sounding classes a caption names.

    from dalipipe.world.scores import world_scores
    world_scores({"c1": "a dog barks"}, {"c1": {"heard": ["dog"], "seen": []}})

Each test clip's metadata says which classes are ``heard`` (make sound) and which are ``seen``
(on screen). Counts are pooled over clips (micro averages), so a clip with three sounding
objects weighs three times a clip with one:
- class_recall: named and heard / heard;
- class_precision: named and heard / named (any world class the caption names counts);
- well_formed: share of captions that fit the world's audio-caption grammar;
- offscreen_recall: recall on heard objects that are not seen, the case where only audio can
  tell; an image-only captioner cannot name them.
A ratio with nothing to count (no caption named a class) is None, not 0.
"""

from __future__ import annotations

from dalipipe.world import classes as world

WORLD_METRICS = ["class_recall", "class_precision", "well_formed", "offscreen_recall"]


def clip_counts(caption: str, meta: dict) -> dict[str, int]:
    """The four tallies of one clip that the corpus ratios are built from."""
    named = world.classes_named(caption, world.BY_NAME)
    heard = set(meta.get("heard") or [])
    offscreen = heard - set(meta.get("seen") or [])
    return {
        "named": len(named),
        "heard": len(heard),
        "hits": len(named & heard),
        "offscreen": len(offscreen),
        "offscreen_hits": len(named & offscreen),
        "well_formed": int(world.is_well_formed(caption)),
    }


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def world_scores(captions: dict[str, str], metadata: dict[str, dict]) -> dict[str, float | None]:
    """Corpus world scores of ``captions`` (clip id -> caption) given each clip's metadata."""
    missing = sorted(set(captions) - set(metadata))
    if missing:
        raise ValueError(f"no world metadata for {len(missing)} clip(s), e.g. {missing[:3]}")
    if not captions:
        raise ValueError("no captions to score")
    total = dict.fromkeys(
        ("named", "heard", "hits", "offscreen", "offscreen_hits", "well_formed"), 0
    )
    for clip_id, caption in captions.items():
        for key, value in clip_counts(caption, metadata[clip_id]).items():
            total[key] += value
    return {
        "class_recall": _ratio(total["hits"], total["heard"]),
        "class_precision": _ratio(total["hits"], total["named"]),
        "well_formed": total["well_formed"] / len(captions),
        "offscreen_recall": _ratio(total["offscreen_hits"], total["offscreen"]),
    }
