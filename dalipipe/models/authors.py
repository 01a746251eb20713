"""The authors' released DALI model, read: their PyTorch files as dalipipe's tensors and options.

`dalipipe import-authors` (dalipipe/describe/import_authors.py) writes what is read here as a
trained-captioner folder.

The authors publish their DALI OT-Att model on Zenodo (record 14224316) as two PyTorch files,
which their `LLaVA/eval_captions_AC.py` (lines 207-236) and `LLaVA/generate_pseudo_labels.py`
(lines 203-217) load. Both are read here with `torch.load(weights_only=True)` (memory-mapped
where the file allows), never unpickled, and mapped to dalipipe's names
(docs/authors-implementation.md §2, §8, §9):

`audio_backbone.pth`: the state dict of `DataParallel(CAVMAE(use_clip, dali, x_attn))` saved by
the alignment loop (`traintest_distribution_alignment.py:194`), hence the `module.` prefix their
loaders strip. dalipipe's `CavMaeAudioEncoder` keeps CAV-MAE's parameter names, so the audio
branch maps one to one once `module.` is gone: `patch_embed_a.proj`, `pos_embed_a` (learned
during alignment: taken from the file, not recomputed), `modality_a`, `blocks_a.<0..10>` (norm1,
attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2), `blocks_u.0` with its audio norms (`norm1_a`,
`norm2_a`), `norm_a`, and `proj`, the 768 -> 1024 layer DALI adds (`cav_mae.py:159`), which must
be present. Everything else in the file is left out: the CLIP tower (`vision_tower.*`), the
visual branch and decoder, the OT-Att scorers (`audio_scorer`, `image_scorer`, `a_*`, `i_*`) and
the norms a block keeps for the other modalities.

`prefixMLP.bin`: written by `safe_save_model_for_hf_trainer` (`trainPrefixTuningAudio.py:192-209`)
with every parameter whose name holds `mm_projector` or `prefix`; the distillation run's copy is
LLaVA's `mlp2x_gelu` projector (`nn.Sequential(Linear, GELU, Linear)`) under
`model.mm_projector.{0,2}.{weight,bias}`, which LLaVA in transformers' format calls
`multi_modal_projector.linear_{1,2}`. It becomes the audio projector. The evaluation loads it into
LLaVA's single projector (`--use_mlp`), so image tokens pass through it too:
`share_projector: true` below. The prefix-tuning run writes a file of the same name whose
`mm_projector` is LLaVA-1.5's, undistilled; its `model.audio_tower.prefix` gives it away, and
the import refuses it as `--mlp`.

`prefix.bin` (optional; the prefix-tuning run's `prefixMLP.bin`, renamed as their scripts expect):
the learned prefix under `model.audio_tower.prefix` (16 x 4096).

`AUTHORS_OPTIONS` are the options their evaluation ran with: the prompt "Describe the sound that
can be heard in this scene.", the `llava_v1` template for generation (their conversation mode for
a "v1" model name) and `vicuna_v1` for training (`--version v1`), the prefix right after the
modality tokens, the shared projector, and `crop` frames (CAV-MAE's extraction centre-crops, so
LLaVA's padding never acted on them); `AUDIOSET_FBANK` is the CAV-MAE filterbank's normalisation
(AudioSet's mean -5.081 and std 4.4849). A missing tensor or one of an unexpected shape stops the
import, naming it; so does an empty, damaged or non-PyTorch file, or one holding more than
tensors, in the import's own words.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import torch

from dalipipe.models.captioner import PROMPTS
from dalipipe.models.cavmae import AudioEncoderConfig, CavMaeAudioEncoder

log = logging.getLogger(__name__)

ZENODO_RECORD = "https://zenodo.org/records/14224316"
BACKBONE_PREFIX = "module."  # DataParallel's, stripped by the authors' loaders
# prefixMLP.bin (LLaVA's mm_projector, nn.Sequential index) -> LLaVA-hf's multi_modal_projector
PROJECTOR_KEYS = {
    "model.mm_projector.0.weight": "linear_1.weight",
    "model.mm_projector.0.bias": "linear_1.bias",
    "model.mm_projector.2.weight": "linear_2.weight",
    "model.mm_projector.2.bias": "linear_2.bias",
}
PREFIX_KEY = "model.audio_tower.prefix"
# The first bytes of torch.save's two formats: a zip archive, or the legacy pickle stream, which
# opens with torch's magic number pickled at protocol 2.
ZIP_MAGIC = b"PK\x03\x04"
LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"
# The options of the authors' evaluation (eval_captions_AC.py, inference.sh).
AUTHORS_OPTIONS = {
    "prompt": PROMPTS["code"],
    "template": "vicuna_v1",
    "generate_template": "llava_v1",
    "prefix_position": "after_modality",
    "share_projector": True,
    "image_aspect": "crop",
}
# CAV-MAE's filterbank statistics (AudioSet), as every loader of the authors normalises.
AUDIOSET_FBANK = {"mean": -5.081, "std": 4.4849}


def torch_file_format(path: Path, what: str) -> str:
    """The file's format, read from its first bytes: "zip" (torch.save's since torch 1.6) or
    "legacy" (the pickle stream before it); an empty or any other file stops the import."""
    with open(path, "rb") as f:
        head = f.read(len(LEGACY_MAGIC))
    if not head:
        raise ValueError(f"{what} {path}: empty file (0 bytes); download it again")
    if head.startswith(ZIP_MAGIC):
        return "zip"
    if head == LEGACY_MAGIC:
        return "legacy"
    raise ValueError(
        f"{what} {path}: not a PyTorch file (neither torch.save's zip format nor its legacy "
        f"format; it starts with {head[:8]!r})"
    )


def read_weights(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """A state dict from a PyTorch file, with `torch.load(weights_only=True)`, mapped lazily.

    torch's own messages are not passed on: for a file holding more than tensors they advise
    `weights_only=False`, i.e. running the file's pickled code, which this import never does."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path}: no such file")
    kind = torch_file_format(path, what)
    try:
        # only the zip format can be memory-mapped
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=kind == "zip")
    except pickle.UnpicklingError as err:
        log.debug("%s %s: torch.load: %s", what, path, err)
        raise ValueError(
            f"{what} {path}: holds Python objects other than tensors, which are not loaded "
            "(weights only; nothing in the file is unpickled): the authors' files hold tensors "
            "only, so this is another file"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        log.debug("%s %s: torch.load: %s", what, path, err)
        raise ValueError(
            f"{what} {path}: a damaged PyTorch file ({kind} format, {path.stat().st_size} bytes: "
            "truncated or corrupted?); download it again"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{what} {path}: expected a dict of tensors, got {type(state).__name__}")
    return state


def _check(path, what: str, state: dict, wanted: dict[str, tuple[str, tuple]]) -> dict:
    """`wanted`: file key -> (our key, shape). Missing keys and wrong shapes stop the import."""
    missing = [k for k in wanted if k not in state]
    if missing:
        shown = ", ".join(missing[:8]) + (
            f" (and {len(missing) - 8} more)" if len(missing) > 8 else ""
        )
        raise ValueError(f"{what} {path}: tensor(s) missing: {shown}")
    wrong = [
        f"{k}: {tuple(state[k].shape)}, expected {shape}"
        for k, (_, shape) in wanted.items()
        if tuple(state[k].shape) != shape
    ]
    if wrong:
        raise ValueError(f"{what} {path}: unexpected shape of " + "; ".join(wrong))
    return {ours: state[k] for k, (ours, _) in wanted.items()}


def backbone_state(path, state: dict, config: AudioEncoderConfig) -> dict[str, torch.Tensor]:
    """The audio encoder's tensors from `audio_backbone.pth`, under dalipipe's names."""
    with torch.device("meta"):  # names and shapes only, no memory
        own = CavMaeAudioEncoder(config).state_dict()
    prefixed = any(k.startswith(BACKBONE_PREFIX) for k in state)
    wanted = {(BACKBONE_PREFIX + k if prefixed else k): (k, tuple(v.shape)) for k, v in own.items()}
    out = _check(path, "--backbone", state, wanted)
    log.info("--backbone %s: %d tensors used, %d left out", path, len(out), len(state) - len(out))
    return out


def projector_state(path, state: dict, vision: int, text: int) -> dict[str, torch.Tensor]:
    """The distilled projector from `prefixMLP.bin`, as LLaVA-hf's `linear_1`/`linear_2`."""
    state = {k.removeprefix(BACKBONE_PREFIX): v for k, v in state.items()}
    shapes = {
        "linear_1.weight": (text, vision),
        "linear_1.bias": (text,),
        "linear_2.weight": (text, text),
        "linear_2.bias": (text,),
    }
    if PREFIX_KEY in state:
        # Stage 1a and stage 2d both write prefixMLP.bin; only 1a has a prefix parameter, and its
        # mm_projector is LLaVA-1.5's own, frozen there (docs/authors-implementation.md §5, §8).
        raise ValueError(
            f"--mlp {path}: holds {PREFIX_KEY}, so it is the prefix-tuning run's prefixMLP.bin "
            "(stage 1a), whose mm_projector is LLaVA-1.5's undistilled image projector. Give "
            "--mlp the distillation run's prefixMLP.bin (audio_vis_distil.sh: model.mm_projector "
            f"only; the MLP file of {ZENODO_RECORD}); this file can be given as --prefix"
        )
    wanted = {k: (ours, shapes[ours]) for k, ours in PROJECTOR_KEYS.items()}
    return _check(path, "--mlp", state, wanted)


def prefix_state(path, state: dict, text: int) -> torch.Tensor:
    state = {k.removeprefix(BACKBONE_PREFIX): v for k, v in state.items()}
    if PREFIX_KEY not in state:
        raise ValueError(f"--prefix {path}: tensor missing: {PREFIX_KEY}")
    prefix = state[PREFIX_KEY]
    if prefix.ndim != 2 or prefix.shape[1] != text:
        raise ValueError(
            f"--prefix {path}: unexpected shape of {PREFIX_KEY}: {tuple(prefix.shape)}, "
            f"expected (n_tokens, {text})"
        )
    return prefix


def base_widths(base: str | Path, revision: str | None) -> tuple[int, int]:
    """(image-token width, LM width) of the base LLaVA, from its config alone."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(base), revision=revision)
    except (OSError, ValueError) as err:
        raise OSError(f"--base {base}: cannot read its config ({err})") from err
    if not hasattr(config, "vision_config") or not hasattr(config, "text_config"):
        raise ValueError(f"--base {base}: not a LLaVA model ({type(config).__name__})")
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(
            f"--base {base}: several vision feature layers ({layer}); LLaVA-1.5 has one"
        )
    return config.vision_config.hidden_size, config.text_config.hidden_size
