"""`Captioner`: a trained DALI captioner for describing your own recordings from Python.

    from dalipipe import Captioner
    c = Captioner.load("results/miniature/distill/ot_att")     # a folder, or owner/name[@rev]
    for r in c.caption(["a.wav", "b.mp4"], modality="audio"):
        print(r.source, r.caption or r.error, r.decoding)
    c.caption([Clip(waveform=wave, rate=44100)])              # a sound already in memory

Each input is prepared as the extract stage prepares a training clip (`dalipipe.describe.inputs`)
and captioned in batches, on the GPU when there is one. Greedy captions are batched; sampled
ones are drawn one input at a time with the decoding's seed, so an input's caption never depends
on the inputs beside it. An input that cannot be read gets a record with the error, and the
others are still captioned.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from PIL import Image

from dalipipe.describe.decoding import Decoding
from dalipipe.describe.inputs import Clip, Prepared, prepare_clip, prepare_file

MODALITIES = ("audio", "audio+image", "image")


@dataclass
class Caption:
    """One input's result: its caption, or the reason it has none."""

    source: str  # the file as given, or the clip's name
    modality: str
    decoding: str  # how it was decoded (Decoding.__str__)
    caption: str | None = None
    error: str | None = None
    frame: Image.Image | None = None  # the image the captioner saw (image modalities)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        """The record as JSON-ready fields (without the frame)."""
        row = {"file": self.source, "modality": self.modality, "decoding": self.decoding}
        return row | ({"caption": self.caption} if self.ok else {"error": self.error})


def _reason(err: Exception, source: str) -> str:
    reason = getattr(err, "reason", None) or str(err) or type(err).__name__
    return reason.removeprefix(f"{source}: ")  # extract errors already name the file


class Captioner:
    """A loaded trained captioner (`AudioCaptioner`) with the decoding its folder records."""

    def __init__(self, model, *, name: str, decoding: Decoding, batch_size: int = 8):
        if batch_size < 1:
            raise ValueError(f"batch_size {batch_size}: at least 1")
        self.model = model
        self.name = name
        self.decoding = decoding
        self.batch_size = batch_size
        self.features = model.metadata.get("features") or {}

    @classmethod
    def load(
        cls,
        model: str | os.PathLike,
        *,
        device: str = "auto",
        batch_size: int = 8,
        cache: str | os.PathLike | None = None,
        endpoint: str | None = None,
    ) -> Captioner:
        """A trained-captioner folder, or a Hub id `owner/name[@revision]` (dalipipe.describe.hub),
        on `device` ("auto": the GPU when there is one), in bf16 on a GPU and float32 on a CPU."""
        from dalipipe.common import pick_device
        from dalipipe.describe.hub import resolve_model
        from dalipipe.models.captioner import AudioCaptioner
        from dalipipe.training import default_dtype

        folder, base = resolve_model(model, cache=cache, endpoint=endpoint)
        torch_device = pick_device(device)
        loaded = AudioCaptioner.from_dir(
            folder, device=torch_device, dtype=default_dtype(torch_device), base=base
        )
        decoding = Decoding.recorded(loaded.metadata, where=str(folder / "captioner.json"))
        return cls(loaded, name=str(model), decoding=decoding, batch_size=batch_size)

    def prepare(
        self, item: str | os.PathLike | Clip, modality: str, start_s: float = 0.0
    ) -> Prepared:
        if isinstance(item, Clip):
            return prepare_clip(item, self.features, modality, start_s)
        return prepare_file(item, self.features, modality, start_s)

    def caption(
        self,
        inputs: Iterable[str | os.PathLike | Clip] | str | os.PathLike | Clip,
        modality: str = "audio",
        *,
        start_s: float = 0.0,
        **decoding,
    ) -> list[Caption]:
        """One record per input, in order. `decoding`: sample, temperature, seed,
        max_new_tokens, prefix (Decoding); what is not given is what the model folder records."""
        return list(self.captions(inputs, modality, start_s=start_s, **decoding))

    def captions(
        self,
        inputs: Iterable[str | os.PathLike | Clip] | str | os.PathLike | Clip,
        modality: str = "audio",
        *,
        start_s: float = 0.0,
        **decoding,
    ) -> Iterator[Caption]:
        """`caption`, one record at a time as each batch finishes (for long lists)."""
        if modality not in MODALITIES:
            raise ValueError(f"modality {modality!r}: use one of {MODALITIES}")
        how = self.decoding.but(**decoding)
        if isinstance(inputs, str | os.PathLike | Clip):
            inputs = [inputs]
        # greedy captions batch exactly; a sampled caption is drawn alone with the seed
        size = self.batch_size if not how.sample else 1
        pending: list[tuple[Caption, Prepared]] = []
        for item in inputs:
            record = Caption(str(item), modality, str(how))
            try:
                prepared = self.prepare(item, modality, start_s)
            except Exception as err:  # one unreadable input never stops the others
                record.error = _reason(err, record.source)
                if pending:  # records come back in input order
                    yield from self._generate(pending, modality, how)
                    pending = []
                yield record
                continue
            record.frame = prepared.frame
            pending.append((record, prepared))
            if len(pending) == size:
                yield from self._generate(pending, modality, how)
                pending = []
        if pending:
            yield from self._generate(pending, modality, how)

    def _generate(self, batch, modality: str, how: Decoding) -> list[Caption]:
        import numpy as np
        import torch

        model = self.model
        frames = [p.frame for _, p in batch]
        fbanks = [p.fbank for _, p in batch]
        texts = model.generate(
            modality=modality,
            pixel_values=model.pixel_values(frames) if "image" in modality else None,
            fbank=torch.from_numpy(np.stack(fbanks)) if "audio" in modality else None,
            use_prefix=how.prefix,
            max_new_tokens=how.max_new_tokens,
            do_sample=how.sample,
            temperature=how.temperature,
            seed=how.seed,
        )
        records = [record for record, _ in batch]
        for record, text in zip(records, texts):
            record.caption = text.replace("\n", " ").strip()
        return records
