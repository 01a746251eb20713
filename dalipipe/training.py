"""Checkpoints that resume a training loop exactly, and a SIGTERM flag for Slurm pre-emption.

    ckpt = TrainCheckpoint(f"{out}.ckpt")     # also starts catching SIGTERM
    saved = ckpt.load()                       # None on a fresh start; restores the RNG states
    if saved:
        model.load_state_dict(saved["model"])
        start = saved["step"]
    for ...:
        ...
        if step % every == 0 or sigterm_requested():
            ckpt.save({"model": model.state_dict(), "opt": opt.state_dict()}, step=step)
        if sigterm_requested():
            raise SystemExit(PREEMPTED_EXIT_CODE)   # non-zero; a rerun resumes

Gradient accumulation and activation checkpointing, the memory options of the LLaVA-side stages:

    micro = micro_batch_size(settings, "distill")   # examples per forward/backward
    with activation_checkpointing(captioner.language_model, settings["activation_checkpointing"]):
        for step in ...:
            for part in micro_batches(step_examples, micro):
                (loss_sum(part) / step_tokens).backward()   # adds up to the step's mean

A checkpoint is a directory holding ``state.safetensors`` (every tensor) and ``state.json`` (the
nested structure, with each tensor replaced by its name), so nothing is ever unpickled. The
Python, NumPy and torch (CPU and CUDA) random states are saved with it and restored by load. It is written to a
temporary directory and renamed, so a kill during a save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import shutil
import signal
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from dalipipe.common import atomic_path

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, what a shell reports for a job killed by SIGTERM
_sigterm = {"requested": False, "installed": False}


def _on_sigterm(signum, frame) -> None:
    log.warning("SIGTERM received: checkpointing after the current step, then exiting")
    _sigterm["requested"] = True


def catch_sigterm() -> None:
    """From now on SIGTERM only sets a flag that the training loop polls between steps.

    Called by ``TrainCheckpoint()`` and ``sigterm_requested()``; a no-op outside the main
    thread, where Python cannot install signal handlers.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
        _sigterm["installed"] = True


def clear_sigterm() -> None:
    """Forget a SIGTERM already handled (tests, or a process that runs several stages)."""
    _sigterm["requested"] = False


def sigterm_requested() -> bool:
    if not _sigterm["installed"]:
        catch_sigterm()
    return _sigterm["requested"]


# --- nested state <-> (tensors, JSON) ---------------------------------------------------------


def _flatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able skeleton of obj; tensors go to ``tensors`` under generated names.

    Dict keys keep their type (optimizer state is keyed by int), tuples stay tuples.
    """
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": name}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": _flatten(torch.from_numpy(obj.copy()), tensors)}
    if isinstance(obj, dict):
        return {"__dict__": [[_flatten(k, tensors), _flatten(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_flatten(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_flatten(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    raise TypeError(f"checkpoint: cannot store a value of type {type(obj).__name__}")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return _unflatten(obj["__ndarray__"], tensors).numpy()
    if "__tuple__" in obj:
        return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
    return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj["__dict__"]}


def capture_rng() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class TrainCheckpoint:
    """The latest checkpoint of one training run, in ``directory`` (e.g. ``<output>.ckpt``)."""

    def __init__(self, directory: str | Path, settings: Any = None):
        """``settings`` (anything JSON-able: the stage's config and inputs) is stored with each
        checkpoint; a checkpoint written under other settings is discarded, not resumed, so a
        changed config never continues a stale run."""
        self.directory = Path(directory)
        self.latest = self.directory / "latest"
        self.settings = (
            None if settings is None else json.dumps(settings, sort_keys=True, default=str)
        )
        if not _sigterm["installed"]:
            catch_sigterm()

    def exists(self) -> bool:
        return (self.latest / "state.json").is_file()

    def save(self, states: dict[str, Any], step: int | None = None) -> None:
        """Store ``states`` (state_dicts, tensors or plain values) and the RNG states.

        ``step``, if given, is stored as ``states["step"]``.
        """
        states = dict(states) if step is None else {**states, "step": step}
        if self.settings is not None:
            states["__settings__"] = self.settings
        tensors: dict[str, torch.Tensor] = {}
        skeleton = _flatten({"states": states, "rng": capture_rng()}, tensors)
        self.directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.latest, directory=True) as tmp:
            save_file(tensors, str(tmp / "state.safetensors"))
            (tmp / "state.json").write_text(json.dumps(skeleton))
        log.info("checkpoint (step %s) written to %s", states.get("step"), self.latest)

    def load(self, restore_random_state: bool = True) -> dict[str, Any] | None:
        """The states of the latest checkpoint, or None if there is none."""
        if not self.exists():
            return None
        try:
            tensors = load_file(str(self.latest / "state.safetensors"))
            saved = _unflatten(json.loads((self.latest / "state.json").read_text()), tensors)
        except Exception as err:
            raise ValueError(
                f"{self.latest}: unreadable checkpoint ({err}); delete it to restart"
            ) from err
        stored = saved["states"].pop("__settings__", None)
        if self.settings is not None and stored != self.settings:
            log.warning("%s was written with other settings: starting afresh", self.latest)
            self.remove()
            return None
        if restore_random_state:
            restore_rng(saved["rng"])
        log.info("resuming from %s (step %s)", self.latest, saved["states"].get("step"))
        return saved["states"]

    def remove(self) -> None:
        """Drop the checkpoints once the stage's output is complete."""
        shutil.rmtree(self.directory, ignore_errors=True)


# --- gradient accumulation and activation checkpointing ------------------------------------------


def micro_batch_size(settings: dict, section: str) -> int:
    """The examples per forward/backward: ``settings["micro_batch_size"]`` (null: the whole
    ``batch_size``), which must divide ``batch_size`` (the examples per optimizer step)."""
    batch = settings["batch_size"]
    micro = settings.get("micro_batch_size")
    if micro is None:
        return batch
    if isinstance(micro, bool) or not isinstance(micro, int) or micro < 1:
        raise ValueError(f"{section}.micro_batch_size={micro!r}: a positive integer or null")
    if batch % micro:
        raise ValueError(
            f"{section}.micro_batch_size={micro} does not divide {section}.batch_size={batch}: "
            "an optimizer step accumulates batch_size / micro_batch_size micro-batches"
        )
    return micro


def micro_batches(items: Sequence, size: int) -> list[Sequence]:
    """``items`` (one optimizer step's examples) in consecutive slices of at most ``size``."""
    if size < 1:
        raise ValueError(f"micro_batches: size {size} < 1")
    return [items[i : i + size] for i in range(0, len(items), size)]


@contextlib.contextmanager
def activation_checkpointing(model, enabled: bool = True) -> Iterator[None]:
    """Within the block, ``model`` (a transformers model: the captioner's frozen LLM) keeps only
    each decoder layer's input for the backward pass and recomputes the rest, non-reentrant
    (``use_reentrant=False``), so gradients reach inputs that need them (the prefix, the
    projector's tokens) though the layers' own weights are frozen. Loss and gradients are the
    same as without; memory falls from every activation of every layer to one tensor a layer.

    transformers checkpoints a layer only while ``layer.training`` is set, and the captioner
    keeps its LLaVA in eval mode. Only that flag of the decoder layers themselves is raised
    here: their attention, MLP and norms stay in eval mode, so no dropout can switch on (the
    attention reads its own ``training`` flag), and nothing outside the LLM (CLIP, the audio
    encoder) is touched. Everything is restored on exit. ``enabled=False``: a no-op.
    """
    if not enabled:
        yield
        return
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ValueError(
            f"activation_checkpointing: {type(model).__name__} has no checkpointable layers"
        )
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        disable = model.activation_checkpointing_disable
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        disable = model.gradient_checkpointing_disable
    modes = [layer.training for layer in layers]
    for layer in layers:
        layer.training = True  # the layer's own flag, not its children's (no .train())
    try:
        yield
    finally:
        for layer, mode in zip(layers, modes):
            layer.training = mode
        disable()
