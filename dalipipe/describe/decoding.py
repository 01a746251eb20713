"""How a caption is decoded: greedy, or sampled at a temperature with a seed.

A model folder may record the decoding its authors evaluated with (captioner.json
`metadata.decoding`: `{"do_sample": true, "temperature": 0.2}` for the authors' release);
that is the default (a folder of the authors' release imported before folders recorded it
samples as they did), and anything the caller asks for overrides it. Every caption record
says how it was decoded (`str(decoding)`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

TOP_K = 50  # the authors' sampling keeps HF's default top-k (AudioCaptioner.generate)
AUTHORS_DECODING = {"do_sample": True, "temperature": 0.2}  # their eval_captions_AC.py


@dataclass(frozen=True)
class Decoding:
    sample: bool = False  # False: greedy
    temperature: float = 0.2
    seed: int = 0  # sampled decoding: each input is drawn with this seed, whatever its batch
    max_new_tokens: int = 64
    prefix: bool = False  # insert the learned prefix tokens (the authors' inference: no)

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"decoding temperature {self.temperature!r}: must be above 0")
        if self.max_new_tokens < 1:
            raise ValueError(f"decoding max_new_tokens {self.max_new_tokens!r}: at least 1")

    @classmethod
    def recorded(cls, metadata: dict, where: str = "captioner.json") -> Decoding:
        """The decoding a model folder records in its metadata (greedy when it records none)."""
        recorded = metadata.get("decoding")
        if recorded is None and "imported" in metadata:
            # the authors' release, imported before folders recorded their decoding
            recorded = AUTHORS_DECODING
        recorded = recorded or {}
        if not isinstance(recorded, dict):
            raise ValueError(f"{where}: metadata.decoding must be an object, got {recorded!r}")
        unknown = set(recorded) - {"do_sample", "temperature"}
        if unknown:
            raise ValueError(f"{where}: metadata.decoding: unknown keys {sorted(unknown)}")
        return cls(
            sample=bool(recorded.get("do_sample", False)),
            temperature=float(recorded.get("temperature", cls.temperature)),
        )

    def but(self, **changes) -> Decoding:
        """This decoding with the settings given (None: keep this one's)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def __str__(self) -> str:
        how = (
            f"sampled at temperature {self.temperature:g} (top-k {TOP_K}, seed {self.seed})"
            if self.sample
            else "greedy"
        )
        return how + (", with the prefix" if self.prefix else "")
