"""The training kernel every stage shares, and the checkpoints that let it resume exactly.

A stage brings only its step: which examples a step takes and what their loss is. `TrainLoop`
owns the rest: the step counter, the progress bar, the optimizer step, gradients averaged across
`accelerate` processes, the curve, a checkpoint every `checkpoint_every` steps, and on SIGTERM
(Slurm pre-emption) a checkpoint and exit 143, from which a rerun resumes bit for bit.

    loop = TrainLoop(f"{out}.ckpt", {"model": model, "optimizer": opt}, settings=settings,
                     checkpoint_every=50)   # a checkpoint under other settings is not resumed
    loop.resume()                           # state, step, curve and RNG of the last checkpoint

    def step(index):                        # forward and backward of optimizer step `index`
        epoch, k = divmod(index, steps_per_epoch)
        loss = model(batch_of(epoch, k)).mean()
        loss.backward()
        return {"epoch": epoch + 1, "loss": loss.detach()}   # the step's row of the curve

    curve = loop.fit(step, total_steps, optimizer=opt)
    write_curve(out / "curve.csv", curve)

Gradient accumulation and activation checkpointing, the memory options of the LLaVA-side stages:
a step backs its examples `micro_batch_size(settings, ...)` at a time through `accumulate`, and
`fit(..., recompute=language_model)` runs under `activation_checkpointing`. A loop of its own
(alignment: two optimisers, per-epoch streams) calls `end_step()` after each optimizer step.

A checkpoint is a directory holding ``state.safetensors`` (every tensor) and ``state.json`` (the
nested structure, with each tensor replaced by its name), so nothing is ever unpickled. The
Python, NumPy and torch (CPU and CUDA) random states are saved with it and restored by load. It
is written to a temporary directory and renamed, so a kill during a save leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import random
import shutil
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

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
        if stored is None and "fingerprint" in saved["states"]:  # align's, before issue 16
            stored = json.dumps(saved["states"].pop("fingerprint"))
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


# --- the loop ------------------------------------------------------------------------------------


def _state_of(thing) -> Any:
    if isinstance(thing, dict):  # plain values (counters), kept as they are
        return thing
    if isinstance(thing, (list, tuple)):  # tensors trained in place (a prefix, a projector)
        return [tensor.detach() for tensor in thing]
    return thing.state_dict()  # a module, an optimizer, a scheduler


def _load_state(thing, saved) -> None:
    if isinstance(thing, dict):
        thing.clear()
        thing.update(saved)
    elif isinstance(thing, (list, tuple)):
        with torch.no_grad():
            for tensor, value in zip(thing, saved):
                tensor.copy_(value)
    else:
        thing.load_state_dict(saved)


class TrainLoop:
    """One training run: its step counter, curve and checkpoints in ``checkpoint_dir``.

    ``state`` names what a checkpoint holds: modules, optimizers and schedulers (by their
    state_dict), lists of tensors trained in place, and dicts of plain values (restored in place).
    ``settings`` (JSON-able): a checkpoint written under other settings is not resumed.
    ``accelerator``: under ``accelerate launch``, the main process writes the checkpoints,
    gradients are averaged across processes and the curve holds the processes' mean losses.
    """

    def __init__(
        self, checkpoint_dir, state: dict, *, settings=None, checkpoint_every: int, accelerator=None
    ):
        self.checkpoint = TrainCheckpoint(checkpoint_dir, settings=settings)
        self.state, self.every, self.accelerator = state, checkpoint_every, accelerator
        self.world = accelerator.num_processes if accelerator is not None else 1
        self.is_main = accelerator is None or accelerator.is_main_process
        self.step, self.curve = 0, []  # optimizer steps done; rows of curve.csv

    def resume(self) -> bool:
        """Restore state, step, curve and random states from the checkpoint, if there is one."""
        saved = self.checkpoint.load()
        if saved is None:
            return False
        for name, thing in self.state.items():
            _load_state(thing, saved[name])
        self.step, self.curve = int(saved["step"]), list(saved.get("curve", []))
        return True

    def save(self) -> None:
        if self.is_main:
            states = {name: _state_of(thing) for name, thing in self.state.items()}
            self.checkpoint.save({**states, "curve": self.curve}, step=self.step)
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    def end_step(self) -> None:
        """Count an optimizer step; checkpoint every ``checkpoint_every`` steps, and on SIGTERM
        checkpoint and exit (also on a SIGTERM that arrives during a periodic checkpoint)."""
        self.step += 1
        preempted = sigterm_requested()
        if preempted or self.step % self.every == 0:
            self.save()
            if preempted or sigterm_requested():
                log.warning("SIGTERM: checkpoint saved at step %d; rerun to resume", self.step)
                raise SystemExit(PREEMPTED_EXIT_CODE)

    def average_gradients(self, params: Iterable[torch.Tensor]) -> None:
        """Each gradient becomes the mean of the processes' (a no-op in one process)."""
        if self.world > 1:
            for param in params:
                if param.grad is not None:
                    param.grad = self.accelerator.reduce(param.grad, reduction="mean")

    def _mean(self, value) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        if self.world > 1:
            value = self.accelerator.reduce(value, reduction="mean")
        return value.item()

    def fit(
        self,
        step: Callable[[int], dict],
        total_steps: int,
        *,
        optimizer: torch.optim.Optimizer,
        scheduler=None,
        average: Iterable[torch.Tensor] = (),
        desc: str = "train",
        recompute=None,
    ) -> list[dict]:
        """Run optimizer steps ``self.step`` to ``total_steps - 1``; returns the curve.

        ``step(index)`` runs the forward and backward passes of step ``index`` and returns its
        row of the curve (tensors become the processes' mean); the row gets the step number and,
        with a ``scheduler`` (stepped after each optimizer step), the step's learning rate.
        ``average``: the parameters whose gradients are averaged across processes.
        ``recompute``: a transformers model whose decoder layers recompute their activations in
        the backward pass (`activation_checkpointing`); None: everything is kept.
        """
        if total_steps < 1:  # no data: a stage would save its untrained weights as trained
            raise ValueError(f"{desc}: {total_steps} optimizer steps to run, nothing to train on")
        if self.step:
            log.info("%s: resuming at step %d of %d", desc, self.step, total_steps)
        average = list(average)
        steps = range(self.step, total_steps)
        bar = tqdm(steps, desc=desc, initial=self.step, total=total_steps, disable=not self.is_main)
        with activation_checkpointing(recompute, enabled=recompute is not None):
            for index in bar:
                optimizer.zero_grad(set_to_none=True)
                values = step(index)
                self.average_gradients(average)
                lr = scheduler.get_last_lr()[0] if scheduler is not None else None
                optimizer.step()
                row = {"step": index + 1, **{k: self._mean(v) for k, v in values.items()}}
                if scheduler is not None:
                    scheduler.step()
                    row["lr"] = lr
                self.curve.append(row)
                shown = {k: f"{v:.3f}" for k, v in row.items() if k not in ("step", "epoch", "lr")}
                bar.set_postfix(shown)
                self.end_step()
        return self.curve


def write_curve(path, rows: list[dict], columns: Sequence[str] | None = None) -> None:
    """``rows`` as CSV; ``columns`` by default in the order the rows first name them."""
    columns = columns or list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU as the authors ran it; float32 on a CPU, where bf16 matmuls are slow."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def epoch_order(n: int, epoch: int, seed: int) -> list[int]:
    """The sample order of one epoch, a function of (seed, epoch) only, so a resumed run
    draws exactly the batches the killed one would have drawn."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


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


def accumulate(items: Sequence, size: int, summed_loss: Callable, count) -> torch.Tensor:
    """Back-propagate one step's mean loss over ``items``, ``size`` at a time: each micro-batch's
    ``summed_loss(part)`` divided by ``count`` (the step's token count), so the accumulated
    gradient is the whole batch's. Returns that mean loss, detached."""
    total = 0.0
    for part in micro_batches(items, size):
        loss = summed_loss(part) / count
        loss.backward()
        total = total + loss.detach()
    return total


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
