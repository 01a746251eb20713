"""The evaluation protocol's switches (docs/protocol.md): reference de-duplication, line breaks
in generated captions, and the frames' geometry; the miniature's defaults, the authors' values
in configs/paper.yaml.

HF_HUB_OFFLINE=1 pytest tests/test_protocol.py -q
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dalipipe.config import load_config, section_defaults
from dalipipe.data.extract import extract_all, read_sources
from dalipipe.data.ffmpeg import grab_frame
from dalipipe.evaluate import datasets
from dalipipe.models.captioner import clean_caption

REPO = Path(__file__).resolve().parents[1]
AUDIOCAPS_CSV = Path("/work/shared/data/audiocaps/test.csv")
STREET_MP4 = Path("/work/shared/data/clips/vggsound_KlsG1EnBEjc_000361.mp4")  # 1280x720
FBANK = {"num_mel_bins": 32, "target_length": 128, "mean": -5.0, "std": 4.5}

# Two clips share captions; clip b's captions sit between clip a's, as AudioCaps lists them.
SHARED_CAPTIONS_CSV = """audiocap_id,youtube_id,start_time,caption
1,aaaaaaaaaaa,0,a dog barks
2,bbbbbbbbbbb,10,a cat meows
3,bbbbbbbbbbb,10,a dog barks
4,ccccccccccc,0,rain falls
5,aaaaaaaaaaa,0,rain falls
6,ccccccccccc,0,A dog barks
7,ddddddddddd,0,a cat meows
"""


# ----------------------------------------------------------------------------- references


def test_dedup_keeps_each_caption_in_its_first_csv_row_not_its_first_clip(tmp_path):
    path = tmp_path / "ac.csv"
    path.write_text(SHARED_CAPTIONS_CSV)
    refs, _ = datasets.group_references(datasets.dedup_references(datasets.audiocaps_rows(path)))
    # "rain falls" is row 4 (clip c) before row 5 (clip a), though clip a comes first; case
    # counts ("A dog barks" stays); clip d's only caption is row 2's, so d has none left
    assert refs == {
        "aaaaaaaaaaa_0": ["a dog barks"],
        "bbbbbbbbbbb_10000": ["a cat meows"],
        "ccccccccccc_0": ["rain falls", "A dog barks"],
    }
    # off, the references are the CSV's own
    assert datasets.read_audiocaps(path)[0]["aaaaaaaaaaa_0"] == ["a dog barks", "rain falls"]


def test_dedup_switch_reaches_the_evaluation_set(tmp_path):
    path = tmp_path / "ac.csv"
    path.write_text(SHARED_CAPTIONS_CSV)
    media = tmp_path / "media"
    for clip_id in ("aaaaaaaaaaa_0", "bbbbbbbbbbb_10000", "ccccccccccc_0", "ddddddddddd_0"):
        (media / clip_id).mkdir(parents=True)
        np.save(media / clip_id / "fbank.npy", np.zeros((4, 2), np.float16))
    on = datasets.load_dataset("audiocaps", {"csv": str(path), "media": str(media), "dedup": True})
    off = datasets.load_dataset(
        "audiocaps", {"csv": str(path), "media": str(media), "dedup": False}
    )
    assert on.references() == {
        "aaaaaaaaaaa_0": ["a dog barks"],
        "bbbbbbbbbbb_10000": ["a cat meows"],
        "ccccccccccc_0": ["rain falls", "A dog barks"],
    }
    assert len(off.references()) == 4
    assert off.references()["bbbbbbbbbbb_10000"] == ["a cat meows", "a dog barks"]


@pytest.mark.skipif(not AUDIOCAPS_CSV.is_file(), reason="AudioCaps test.csv not present")
def test_dedup_of_audiocaps_test_follows_the_row_order():
    rows = datasets.audiocaps_rows(AUDIOCAPS_CSV)
    refs, _ = datasets.group_references(datasets.dedup_references(rows))
    assert len(rows) == 4875 and len(refs) == 975  # no clip loses all five
    assert sum(map(len, refs.values())) == len({r[1] for r in rows}) == 4633
    # "Rain and thunder" is on rows 1652, 2693, 2860 and 4146: the first row's clip keeps it,
    # not the clip that comes first (Lbken4JCr94, listed first on row 12)
    assert "Rain and thunder" in refs["SGaIvgwwWSE_30000"]
    assert refs["Lbken4JCr94_10000"] == [
        "Thunder and a gentle rain",
        "Thunder roars in the distance as rain falls",
        "Rolling thunder with lightning strikes",
        "Rain falling with thunder in the distance",
    ]
    assert refs["CM49C3RkzV8_30000"] == [
        "An adult female speaks, and muted speech occurs briefly in the background",
        "Female speaking",
        "A woman delivers a speech",
    ]


# ----------------------------------------------------------------------------- line breaks


def test_line_breaks_are_replaced_or_deleted_as_the_authors_do():
    text = " A dog barks.\nA man speaks\n\n"
    assert clean_caption(text, "space") == "A dog barks. A man speaks"
    # the authors strip, then delete: the two sentences run together
    assert clean_caption(text, "delete") == "A dog barks.A man speaks"
    assert clean_caption("a dog \nbarks", "delete") == "a dog barks"
    with pytest.raises(ValueError, match="newlines='keep': one of space, delete"):
        clean_caption(text, "keep")


# ----------------------------------------------------------------------------- frames


def clip_processor():
    """CLIP ViT-L/14-336's image processor, as LLaVA-1.5 ships it: short side to 336 (bicubic),
    centre 336 square, CLIP's mean and std."""
    from transformers import CLIPImageProcessor

    from dalipipe.models.llava_config import CLIP_MEAN, CLIP_STD

    return CLIPImageProcessor(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )


def extract_first_frame(tmp_path: Path, name: str, **frames) -> Image.Image:
    table = tmp_path / f"{name}.csv"
    table.write_text(f"clip_id,path\nstreet,{STREET_MP4}\n")
    params = {"window_seconds": 2.0, "fbank": FBANK, **frames}
    (row,) = extract_all(read_sources(table), tmp_path / name, params)
    assert row["status"] == "ok", row["reason"]
    assert (row["width"], row["height"]) == (1280, 720)  # the source's, whatever is stored
    return Image.open(tmp_path / name / "street" / "frame_00.jpg").convert("RGB")


def authors_frame(frame: Image.Image, left: int) -> np.ndarray:
    """torchvision's Resize(224) (bilinear, long side truncated: 1280x720 -> 398x224), then a
    224 square from column `left` (CenterCrop's is round((398 - 224) / 2) = 87)."""
    small = frame.resize((398, 224), Image.BILINEAR)
    return np.asarray(small.crop((left, 0, left + 224, 224)), np.float32)


@pytest.mark.skipif(not STREET_MP4.is_file(), reason="shared clip not present")
def test_frames_as_the_authors_stored_them_then_upscaled_like_native_336(tmp_path):
    authors = extract_first_frame(tmp_path, "authors", frame_short_side=224, frame_crop=True)
    native = extract_first_frame(tmp_path, "native", frame_short_side=336, frame_crop=False)
    assert authors.size == (224, 224) and native.size == (598, 336)

    # the stored square is the authors' centre square: within the two JPEG encoders' and
    # resamplers' error (5.3 levels here) of it, where a crop one column off is 18 levels away
    source = grab_frame(STREET_MP4, 0.0)
    stored = np.asarray(authors, np.float32)
    assert np.abs(stored - authors_frame(source, 87)).mean() < 6.0
    for left in (86, 88):
        assert np.abs(stored - authors_frame(source, left)).mean() > 12.0

    # CLIP's processor upscales the 224 square to 336 (bicubic) and crops the native frame's
    # centre: both show the same centre square of the source, the upscaled one less sharp
    processor = clip_processor()
    up, sharp = (
        processor(images=[im], return_tensors="np")["pixel_values"][0] for im in (authors, native)
    )
    assert up.shape == sharp.shape == (3, 336, 336)
    mean = np.array(processor.image_mean, np.float32)[:, None, None]
    std = np.array(processor.image_std, np.float32)[:, None, None]
    bicubic = np.asarray(authors.resize((336, 336), Image.BICUBIC), np.float32)
    expected = (bicubic.transpose(2, 0, 1) / 255 - mean) / std
    np.testing.assert_allclose(up, expected, atol=1e-5)
    # the same centre square of the source: 0.114 apart (CLIP-normalised units), the 224 one
    # blurred; the native view 12 columns to the side (an off-centre crop) is 0.44 apart
    assert 0.05 < np.abs(up - sharp).mean() < 0.15
    assert np.abs(up[:, :, 12:] - sharp[:, :, :-12]).mean() > 0.3


# ----------------------------------------------------------------------------- presets


def test_the_miniature_keeps_its_protocol_and_the_paper_follows_the_authors():
    mini = load_config()
    paper = load_config(REPO / "configs" / "paper.yaml")
    assert (mini["extract"]["frame_short_side"], mini["extract"]["frame_crop"]) == (64, False)
    assert mini["evaluate"]["caption_newlines"] == "space"
    assert (paper["extract"]["frame_short_side"], paper["extract"]["frame_crop"]) == (224, True)
    assert paper["evaluate"]["caption_newlines"] == "delete"
    assert paper["evaluate"]["datasets"]["audiocaps"]["dedup"] is True
    # the authors had no Clotho evaluation: its references stay the dataset's own
    assert "dedup" not in paper["evaluate"]["datasets"]["clotho"]
    # evaluation frames read from media files: the paper's 224 square, the miniature's whole
    assert datasets.stored_square(paper["extract"]) == 224
    assert datasets.stored_square(mini["extract"]) is None
    # a stage called alone reads the miniature's values
    assert section_defaults("evaluate")["caption_newlines"] == "space"
    assert section_defaults("extract")["frame_crop"] is False


@pytest.mark.skipif(not STREET_MP4.is_file(), reason="shared clip not present")
def test_evaluation_frames_from_media_files_take_the_stored_square(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    (media / "KlsG1EnBEjc.mp4").symlink_to(STREET_MP4)
    path = tmp_path / "ac.csv"
    path.write_text("audiocap_id,youtube_id,start_time,caption\n1,KlsG1EnBEjc,0,traffic\n")
    cfg = {"csv": str(path), "media": str(media)}
    _, whole = datasets.load_dataset("audiocaps", cfg, FBANK).clips[0].load()
    _, square = datasets.load_dataset("audiocaps", cfg, FBANK, square=224).clips[0].load()
    assert whole.size == (1280, 720) and square.size == (224, 224)
    # the middle frame (second 5) as the extract stage stores it with the paper's settings:
    # 4.3 levels apart (the JPEG's error, and its colours converted from YUV without RGB in
    # between), where the same square one column to the side is 10 or more away
    table = tmp_path / "clips.csv"
    table.write_text(f"clip_id,path\nstreet,{STREET_MP4}\n")
    params = {"fbank": FBANK, "frame_short_side": 224, "frame_crop": True}
    extract_all(read_sources(table), tmp_path / "out", params)
    stored = Image.open(tmp_path / "out" / "street" / "frame_05.jpg").convert("RGB")
    stored, square = np.asarray(stored, np.float32), np.asarray(square, np.float32)
    assert np.abs(stored - square).mean() < 5.0
    assert np.abs(stored[:, 1:] - square[:, :-1]).mean() > 10.0
    assert np.abs(stored[:, :-1] - square[:, 1:]).mean() > 10.0


PREFIX_DS = Path("/work/shared/data/authors/prefixDS.json")


@pytest.mark.skipif(not PREFIX_DS.is_file(), reason="the authors' prefixDS.json not present")
def test_prefix_pair_frames_take_the_stored_square(tmp_path):
    import json
    import subprocess

    from dalipipe.caption.pairs import load_pairs
    from dalipipe.data import paper_inputs
    from dalipipe.data.ffmpeg import ffmpeg_exe

    pair = paper_inputs.read_prefix_pairs(PREFIX_DS)[0]
    clips = tmp_path / "clips"
    (clips / "clips").mkdir(parents=True)
    clip_id = f"{pair['id']}_0"
    video = clips / "clips" / f"{clip_id}.mp4"
    # 80x48: a red band 16 px wide each side of a blue 48x48 centre square
    scene = "color=blue:s=80x48:r=10:d=10,drawbox=x=0:y=0:w=16:h=48:c=red:t=fill"
    scene += ",drawbox=x=64:y=0:w=16:h=48:c=red:t=fill"
    cmd = [ffmpeg_exe(), "-v", "error", "-y", "-f", "lavfi", "-i", scene, "-pix_fmt", "yuv420p"]
    subprocess.run([*cmd, str(video)], check=True)
    (clips / "manifest.csv").write_text(
        f"clip_id,path,status,reason,split,start_s,labels\n{clip_id},{video},ok,,prefix,0.0,\n"
    )
    (clips / "metadata.jsonl").write_text(
        json.dumps({"clip_id": clip_id, "youtube_id": pair["id"]}) + "\n"
    )
    sizes = {}
    for name, square in (("whole", None), ("square", 32)):
        out = tmp_path / name / "pairs.csv"
        paper_inputs.prefix_pairs(PREFIX_DS, clips, out, tmp_path / name / "frames", square)
        (loaded,) = load_pairs(out)
        sizes[name] = loaded.image.size
        if square:  # the centre square: blue from edge to edge, none of the red bands
            edges = np.asarray(loaded.image.convert("RGB"), np.float32)[:, [0, -1]]
            assert edges[..., 2].min() > 150 and edges[..., 0].max() < 100
    assert sizes == {"whole": (80, 48), "square": (32, 32)}
