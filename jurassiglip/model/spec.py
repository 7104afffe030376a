"""The model spec: everything needed to rebuild a model, frozen at training time.

A `ModelSpec` travels inside every checkpoint (as `to_dict()`, plain JSON
values), so inference and the next stage rebuild the model from the
checkpoint alone, never from today's params.yaml. It is made once from the
params (`from_params`) and read back once from a checkpoint (`from_dict`);
everything else reads its typed fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from jurassiglip.config import DecoderConfig, LoraConfig, Params, RealPreset, TinyPreset

PROTOTYPE = DecoderConfig(kind="prototype", blocks=0, guide_channels=0, guide_to_grid=False)  # the notebook's head
ARCHS: dict[str, type[TinyPreset] | type[RealPreset]] = {"tiny": TinyPreset, "real": RealPreset}


@dataclass(frozen=True)
class ModelSpec:
    preset: Literal["tiny", "real"]
    arch: TinyPreset | RealPreset     # the preset's block of params.yaml's model section
    decoder: DecoderConfig            # model.decoder: the prototype's head or the refinement decoder
    image_mean: tuple[float, ...]     # RGB, applied to pixels scaled to [0, 1]
    image_std: tuple[float, ...]
    lora: LoraConfig
    vocab_size: int                   # the caption tokenizer's, special tokens included
    pad_token_id: int | None
    bos_token_id: int | None
    eos_token_id: int | None
    logit_scale_init: float           # contrastive temperature (stage 1), kept for the rebuilt module
    logit_scale_max: float

    @property
    def embeds_base(self) -> bool:
        """Whether a checkpoint of this spec stores the towers' base weights too.

        Only the tiny preset's: its random towers have no other source. The
        real preset's bases are published checkpoints, named with their
        revisions in the checkpoint's metadata.
        """
        return self.preset == "tiny"

    @classmethod
    def from_params(cls, params: Params, tokenizer: Any) -> ModelSpec:
        return cls(preset=params.model.preset, arch=params.model.arch, decoder=params.model.decoder,
                   image_mean=tuple(params.model.image_mean),
                   image_std=tuple(params.model.image_std), lora=params.lora, vocab_size=len(tokenizer),
                   pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id, logit_scale_init=params.pretrain.logit_scale_init,
                   logit_scale_max=params.pretrain.logit_scale_max)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (lists, not tuples), as a checkpoint stores them."""
        values = dataclasses.asdict(self)
        values["image_mean"], values["image_std"] = list(self.image_mean), list(self.image_std)
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelSpec:
        """The inverse of `to_dict`. A spec without `decoder` (written before decoders were a
        choice) is the prototype's.

        Raises:
            ValueError: a key missing or unknown, or an unknown preset, naming it.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        if isinstance(values, dict) and "decoder" not in values:
            values = {**values, "decoder": dataclasses.asdict(PROTOTYPE)}
        _same_keys("model spec", values, fields)
        preset = values["preset"]
        if preset not in ARCHS:
            raise ValueError(f"model spec preset {preset!r}: expected one of {sorted(ARCHS)}")
        arch_type = ARCHS[preset]
        _same_keys(f"model spec arch ({preset})", values["arch"], {f.name for f in dataclasses.fields(arch_type)})
        _same_keys("model spec lora", values["lora"], {f.name for f in dataclasses.fields(LoraConfig)})
        _same_keys("model spec decoder", values["decoder"], {f.name for f in dataclasses.fields(DecoderConfig)})
        return cls(**{**values, "arch": arch_type(**values["arch"]), "lora": LoraConfig(**values["lora"]),
                      "decoder": DecoderConfig(**values["decoder"]),
                      "image_mean": tuple(values["image_mean"]), "image_std": tuple(values["image_std"])})


def _same_keys(what: str, values: Any, expected: set[str]) -> None:
    if not isinstance(values, dict):
        raise ValueError(f"{what}: expected a mapping, got {type(values).__name__}")
    missing, unknown = sorted(expected - set(values)), sorted(set(values) - expected)
    if missing or unknown:
        raise ValueError(f"{what}: " + "; ".join(
            part for part in (f"missing {missing}" if missing else "", f"unknown {unknown}" if unknown else "")
            if part))
