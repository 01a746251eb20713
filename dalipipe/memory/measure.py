"""Bytes that PyTorch keeps, measured on the CPU with the real module classes at the real width.

    measure.decoder_layer(LlamaConfig(), torch.bfloat16).saved    # bytes per position, one layer

- ``saved_bytes(run)``: bytes of the unique storages autograd saves for the backward pass while
  ``run()`` executes (``torch.autograd.graph.saved_tensors_hooks``), parameters left out;
- ``peak_bytes(run)``: the peak of the bytes that ``run()`` allocates above what was allocated
  before it, tensor storage by tensor storage (a ``TorchDispatchMode`` and weakrefs): on the CPU
  what ``torch.cuda.max_memory_allocated`` tells on a GPU, without the kernels' scratch space;
- ``decoder_layer(text_config, dtype)``: per position, what one decoder layer saves for backward,
  what is shared between layers (rotary tables), what the final norm saves, and the transient
  peaks of one layer's forward (no grad) and backward (with activation checkpointing, as
  ``dalipipe.training.activation_checkpointing`` sets it: recompute and backward); measured at
  two lengths, the slope;
- ``projector(llava_config, autocast)``: per token, what a trainable LLaVA projector saves;
- ``audio_encoder(config, autocast)``: per clip, what a CAV-MAE block and the rest save, and
  one block's backward peak;
- ``align_objective(method, ...)``: the peak of one clip's alignment loss, forward and backward.

Results are cached per architecture and dtype for the process (``_CACHE``): nothing is stored
between runs, so every number printed was measured by this run. A LLaMA-7B layer (200M
parameters, bf16) takes a few seconds; the whole paper plan ~20 s on 2 busy cores.
"""

from __future__ import annotations

import contextlib
import copy
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_CACHE: dict[tuple, object] = {}
LENGTHS = (16, 48)  # positions of the two measured runs: the slope is the cost per position


def _storage(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def saved_bytes(run: Callable[[], object], exclude=()) -> int:
    """Bytes of the unique storages saved for backward while ``run()`` executes."""
    skip = {_storage(t)[0] for t in exclude}
    seen: dict[int, int] = {}

    def pack(t):
        key, nbytes = _storage(t)
        if key not in skip:
            seen.setdefault(key, nbytes)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages that ATen operators create while the mode is on, and their
    peak: a storage counts from the operator that returns it until it is freed (a weakref on
    the storage, which PyTorch keeps as long as any tensor uses it). Views and in-place results
    alias an input and are not new. Scratch buffers inside a kernel are not seen."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        results = out if isinstance(out, (tuple, list)) else (out,)
        for i, result in enumerate(results):
            aliased = i < len(returns) and returns[i].alias_info is not None
            for t in result if isinstance(result, (tuple, list)) else (result,):
                if isinstance(t, torch.Tensor) and not aliased:
                    self._track(t.untyped_storage())
        return out

    def _track(self, storage) -> None:
        key = id(storage)
        if key in self.live:
            return
        self.live[key] = storage.nbytes()
        self.now += self.live[key]
        self.peak = max(self.peak, self.now)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)


def peak_bytes(run: Callable[[], object]) -> int:
    """Peak bytes of the storages that ``run()`` creates (see :class:`LiveBytes`); tensors that
    existed before never count, even while ``run()`` frees them (a backward pass frees the saved
    activations), so the peak is the most that ``run()`` adds at any moment."""
    with LiveBytes() as tracker:
        run()
    return tracker.peak


def _slope(measure: Callable[[int], float]) -> float:
    a, b = LENGTHS
    return (measure(b) - measure(a)) / (b - a)


@dataclass(frozen=True)
class LayerBytes:
    """Bytes per position (one sample) of a decoder-only language model."""

    saved: float  # saved for backward by one decoder layer
    shared: float  # saved by every layer but held once (rotary cos/sin)
    head: float  # saved by the final norm
    forward: float  # transient peak of one layer's forward without grad (generation's prefill)
    backward: float  # transient peak of one layer's backward above its saved tensors
    recompute: float  # the same with activation checkpointing: the layer's recompute + backward

    def to_dict(self) -> dict:
        return asdict(self)


def _one_layer_model(text_config, dtype: torch.dtype):
    from transformers import AutoModel

    config = copy.deepcopy(text_config)
    config.num_hidden_layers = 1
    config.vocab_size = 8  # the embedding table is not used: inputs_embeds
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:1]
    torch.manual_seed(0)
    model = AutoModel.from_config(config, dtype=dtype).eval().requires_grad_(False)
    return model


def decoder_layer(text_config, dtype: torch.dtype) -> LayerBytes:
    """Measure one decoder layer of ``text_config``'s width (see the module docstring)."""
    key = ("decoder", text_config.to_json_string(), str(dtype))
    if key in _CACHE:
        return _CACHE[key]
    model = _one_layer_model(text_config, dtype)
    layer = _layers(model)[0]
    frozen = list(model.parameters()) + list(model.buffers())
    width = text_config.hidden_size

    def inputs(n: int, grad: bool) -> torch.Tensor:
        generator = torch.Generator().manual_seed(n)
        x = torch.randn(1, n, width, generator=generator).to(dtype)
        return x.requires_grad_(grad)

    def split(n: int) -> tuple[float, float, float]:
        """(layer, shared, head) saved bytes at n positions."""
        shared_keys: set[int] = set()
        where = {"inside": False}

        def enter(module, args, kwargs):
            where["inside"] = True
            for value in kwargs.values():
                for t in value if isinstance(value, tuple) else (value,):
                    if isinstance(t, torch.Tensor):
                        shared_keys.add(_storage(t)[0])

        def leave(module, args, kwargs, out):
            where["inside"] = False

        sizes = {"layer": {}, "shared": {}, "head": {}}
        skip = {_storage(t)[0] for t in frozen}

        def pack(t):
            key, nbytes = _storage(t)
            if key not in skip:
                part = "shared" if key in shared_keys else "layer" if where["inside"] else "head"
                sizes[part].setdefault(key, nbytes)
            return t

        handles = [
            layer.register_forward_pre_hook(enter, with_kwargs=True),
            layer.register_forward_hook(leave, with_kwargs=True),
        ]
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                model(inputs_embeds=inputs(n, True), use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        # a shared tensor first seen before its layer's hook ran would sit in "layer": move it
        for key in list(sizes["layer"]):
            if key in shared_keys:
                sizes["shared"][key] = sizes["layer"].pop(key)
        return tuple(sum(sizes[p].values()) for p in ("layer", "shared", "head"))

    saved = {n: split(n) for n in LENGTHS}
    per = [
        (saved[LENGTHS[1]][i] - saved[LENGTHS[0]][i]) / (LENGTHS[1] - LENGTHS[0]) for i in (0, 1, 2)
    ]

    def forward_peak(n: int) -> float:
        x = inputs(n, False)
        with torch.inference_mode():
            return peak_bytes(lambda: model(inputs_embeds=x, use_cache=False))

    def backward_peak(n: int, checkpointing: bool = False) -> float:
        from dalipipe.training import activation_checkpointing

        x = inputs(n, True)
        with activation_checkpointing(model, checkpointing):
            out = model(inputs_embeds=x, use_cache=False).last_hidden_state
            grad = torch.ones_like(out)
            return peak_bytes(lambda: out.backward(grad))

    result = LayerBytes(
        saved=per[0],
        shared=per[1],
        head=per[2],
        forward=_slope(forward_peak),
        backward=_slope(backward_peak),
        recompute=_slope(lambda n: backward_peak(n, checkpointing=True)),
    )
    _CACHE[key] = result
    return result


def _layers(model) -> torch.nn.ModuleList:
    for name in ("layers", "h", "decoder.layers"):
        obj = model
        with contextlib.suppress(AttributeError):
            for part in name.split("."):
                obj = getattr(obj, part)
            return obj
    raise ValueError(f"{type(model).__name__}: no list of decoder layers found")


def _autocast(dtype: torch.dtype | None):
    return torch.autocast("cpu", dtype=dtype, enabled=dtype not in (None, torch.float32))


def projector(llava_config, autocast: torch.dtype | None) -> float:
    """Bytes per token saved by a trainable LLaVA projector (float32 weights) run under
    ``autocast`` (distill: the audio projector's master weights under bf16 autocast)."""
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    key = ("projector", llava_config.to_json_string(), str(autocast))
    if key not in _CACHE:
        torch.manual_seed(0)
        module = LlavaMultiModalProjector(llava_config)
        width = llava_config.vision_config.hidden_size

        def measure(n: int) -> float:
            x = torch.randn(1, n, width).to(autocast or torch.float32)
            with _autocast(autocast):
                return saved_bytes(lambda: module(x), exclude=list(module.parameters()))

        _CACHE[key] = _slope(measure)
    return _CACHE[key]


@dataclass(frozen=True)
class EncoderBytes:
    """Bytes per clip of the CAV-MAE audio encoder in training (all its tokens)."""

    block: float  # saved for backward by one block
    rest: float  # saved by the patch embedding, final norm and output projection
    backward: float  # transient peak of a one-block encoder's backward, parameter grads excluded

    def to_dict(self) -> dict:
        return asdict(self)


def audio_encoder(config, autocast: torch.dtype | None) -> EncoderBytes:
    """Measure the encoder of ``config`` (an AudioEncoderConfig) at one and two clips and one
    and two blocks; float32 weights under ``autocast`` as stage align runs it."""
    from dalipipe.models.cavmae import AudioEncoderConfig, CavMaeAudioEncoder

    key = ("cavmae", str(config.to_dict()), str(autocast))
    if key in _CACHE:
        return _CACHE[key]

    def build(depth: int):
        torch.manual_seed(0)
        settings = {**config.to_dict(), "depth": depth, "shared_depth": 0}
        return CavMaeAudioEncoder(AudioEncoderConfig(**settings)).train()

    encoders = {1: build(1), 2: build(2)}
    shape = (config.target_length, config.num_mel_bins)

    def saved(depth: int, clips: int) -> int:
        enc = encoders[depth]
        x = torch.randn(clips, *shape)
        with _autocast(autocast):
            return saved_bytes(lambda: enc(x), exclude=list(enc.parameters()))

    def backward(clips: int) -> int:
        enc = encoders[1]
        with _autocast(autocast):
            out = enc(torch.randn(clips, *shape))
        grad = torch.ones_like(out)
        enc.zero_grad(set_to_none=True)
        return peak_bytes(lambda: out.backward(grad))

    # differences over clips leave out what does not grow with the batch (autocast's bf16 copies
    # of the weights); differences over blocks isolate one block
    s = {(d, c): saved(d, c) for d in (1, 2) for c in (1, 2)}
    block = (s[2, 2] - s[1, 2]) - (s[2, 1] - s[1, 1])
    rest = (s[1, 2] - s[1, 1]) - block
    result = EncoderBytes(block=block, rest=rest, backward=backward(2) - backward(1))
    _CACHE[key] = result
    return result


def align_objective(method: str, audio_shape, image_shape, settings: dict) -> float:
    """Peak bytes per clip of one method's loss, forward and backward (the scorer's own
    gradient first, for ot_att), with the audio tokens requiring grad as the encoder's output."""
    from dalipipe.align.attentive import AttentiveWeights
    from dalipipe.align.objective import Objective
    from dalipipe.align.ot import OTSolver

    ot, att = settings["ot"], settings["attentive"]
    key = ("objective", method, tuple(audio_shape), tuple(image_shape), str(ot), str(att))
    if key in _CACHE:
        return _CACHE[key]
    width = audio_shape[-1]
    solver = scorer = None
    if method in ("ot", "ot_att"):
        solver = OTSolver(ot["solver"], ot["eps"], ot["iters"], 0)
    if method == "ot_att":
        torch.manual_seed(0)
        scorer = AttentiveWeights(width, att["heads"], att["tau"])
    objective = Objective(method, solver, scorer)

    def peak(clips: int) -> int:
        generator = torch.Generator().manual_seed(clips)
        audio = torch.randn(clips, *audio_shape, generator=generator).requires_grad_(True)
        image = torch.randn(clips, *image_shape, generator=generator)

        def step():
            out = objective(audio, image, entropy_lambda=500.0, train=True)
            if out.scorer_loss is not None:
                params = list(scorer.parameters())
                torch.autograd.grad(out.scorer_loss, params, retain_graph=True, allow_unused=True)
            out.loss.backward()

        return peak_bytes(step)

    _CACHE[key] = result = float(peak(2) - peak(1))
    if solver is not None:
        solver.close()
    return result
