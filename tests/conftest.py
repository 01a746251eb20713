"""Shared pytest fixtures. `tiny_models`: the output of `dalipipe make-tiny`, built once.

def test_something(tiny_models):
    AudioCaptioner.from_base(tiny_models.llava, audio_encoder=tiny_models.audio_encoder())
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# Two workers share the suite (tests/support/scheduling.py says how and why).
@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    from tests.support.scheduling import scope_of

    class FilesWithSlurmTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return scope_of(nodeid)

    return FilesWithSlurmTogether(config, log)


def pytest_collection_modifyitems(config, items):
    from tests.support.scheduling import SLURM_FILES, rank

    items.sort(key=lambda item: rank(item.path.name))  # stable: a file keeps its tests' order
    for item in items:
        if item.get_closest_marker("slurm") and item.path.name not in SLURM_FILES:
            raise pytest.UsageError(
                f"{item.nodeid} uses the Slurm cluster: add its file to SLURM_FILES in "
                "tests/support/scheduling.py, so that it runs beside the other Slurm tests"
            )


@dataclass(frozen=True)
class TinyModels:
    root: Path
    llava: Path  # LlavaForConditionalGeneration + processor: 32 px frames, 16 image tokens of 32
    llava_336: Path  # the same with LLaVA-1.5's geometry: 336 px, patch 14, 576 tokens
    blip2: Path  # Blip2ForConditionalGeneration (OPT) + Blip2Processor
    gpt2: Path  # GPT2LMHeadModel + tokenizer
    cavmae: Path  # official-key-style .pth (module. prefix, no proj)
    cavmae_config: Path  # its AudioEncoderConfig as JSON (fbank 64 x 32 -> 8 tokens of 32)

    def audio_encoder_settings(self) -> dict:
        """Sizes of the tiny CAV-MAE (config `models.audio_encoder` style)."""
        return json.loads(self.cavmae_config.read_text())

    def audio_encoder(self, checkpoint: bool = True):
        """A CavMaeAudioEncoder fitting `llava` (out_dim 32), loaded from the tiny .pth."""
        from dalipipe.models.cavmae import build_encoder

        settings = self.audio_encoder_settings()
        if checkpoint:
            settings["checkpoint"] = str(self.cavmae)
        return build_encoder(settings)

    def __getitem__(self, name: str) -> Path:
        return getattr(self, name)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> TinyModels:
    from dalipipe.testing.checkpoints import make_all

    root = tmp_path_factory.mktemp("tiny-models")
    paths = make_all(root)
    return TinyModels(
        root=root,
        llava=paths["llava"],
        llava_336=paths["llava_336"],
        blip2=paths["blip2"],
        gpt2=paths["gpt2"],
        cavmae=paths["cavmae"],
        cavmae_config=paths["cavmae"].with_suffix(".json"),
    )


@pytest.fixture(scope="session")
def snakemake_in():
    """Run this repository's workflow in another working directory; returns its output.

    The workflow's rules call `dalipipe`, so the running interpreter's bin/ goes first on PATH.
    """
    from tests.support.snakemake import SNAKEFILE, snakemake, workflow_env

    env = workflow_env()

    def run(workdir, *args: str, timeout: int = 900) -> str:
        result = snakemake(
            "--cores", "2", "-s", str(SNAKEFILE), "-d", str(workdir), *args,
            env=env, timeout=timeout, merged=True,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout[-5000:]
        return result.stdout

    return run


@pytest.fixture(scope="module")
def align_world(tmp_path_factory) -> dict:
    """The align stage's tiny world (tests/support/runs.py `make_align_world`), once a module."""
    from tests.support.runs import make_align_world

    return make_align_world(tmp_path_factory.mktemp("align"))
