"""Vision backbones: one registry, each entry knowing its preprocessing and its pooling.

A backbone wraps a `transformers` vision tower behind three steps that token masking will hook
into: `embed` (patches -> tokens with position embeddings), `encode` (tokens -> hidden states) and
`pool` (hidden states -> one feature vector). With every token kept, `forward` equals the
transformers model's own `pooler_output`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import (
    AutoConfig,
    CLIPVisionConfig,
    CLIPVisionModel,
    PretrainedConfig,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from vlfit.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preprocess:
    """How a backbone wants its pixels: input side, normalisation, and how eval images are resized."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = "shortest_edge"  # shortest_edge + center crop (CLIP) or "squash" to a square (SigLIP)
    interpolation: str = "bicubic"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        return cls(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})


class Backbone(nn.Module):
    """A vision tower as embed -> encode -> pool. Subclasses bind one transformers family."""

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]  # transformers `model_type`s this class loads
    hf_class: ClassVar[type]
    config_class: ClassVar[type[PretrainedConfig]]

    def __init__(self, hf_model: nn.Module, preprocess: Preprocess):
        super().__init__()
        self.hf = hf_model
        self.preprocess = preprocess

    @property
    def tower(self) -> nn.Module:
        # transformers 4.x nests the tower as `.vision_model`; 5.x puts its parts on the model itself.
        return getattr(self.hf, "vision_model", self.hf)

    @property
    def hf_config(self) -> PretrainedConfig:
        return self.hf.config

    @property
    def feature_dim(self) -> int:
        return self.hf_config.hidden_size

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, N, D) tokens, position embeddings already added."""
        raise NotImplementedError

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, N, D) hidden states of the last layer."""
        return self.tower.encoder(inputs_embeds=tokens).last_hidden_state

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, D) image features."""
        raise NotImplementedError

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.pool(self.encode(self.embed(pixels)))


class ClipBackbone(Backbone):
    family = "clip"
    model_types = ("clip", "clip_vision_model")
    hf_class = CLIPVisionModel
    config_class = CLIPVisionConfig
    default_preprocess = dict(mean=tuple(OPENAI_CLIP_MEAN), std=tuple(OPENAI_CLIP_STD), resize="shortest_edge")

    def embed(self, pixels):
        # CLIP applies a LayerNorm to the embeddings before the encoder; it is per-token, so it can
        # run before any token is dropped.
        return self.tower.pre_layrnorm(self.tower.embeddings(pixels))

    def pool(self, hidden):
        return self.tower.post_layernorm(hidden[:, 0])  # CLS token


class SiglipBackbone(Backbone):
    family = "siglip"
    model_types = ("siglip", "siglip_vision_model")
    hf_class = SiglipVisionModel
    config_class = SiglipVisionConfig
    default_preprocess = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize="squash")

    def embed(self, pixels):
        return self.tower.embeddings(pixels)

    def pool(self, hidden):
        hidden = self.tower.post_layernorm(hidden)
        if getattr(self.tower, "use_head", True) and hasattr(self.tower, "head"):
            return self.tower.head(hidden)  # attention pooling with a learned probe: SigLIP has no CLS
        return hidden.mean(dim=1)


FAMILIES: dict[str, type[Backbone]] = {cls.family: cls for cls in (ClipBackbone, SiglipBackbone)}


def _family_for(model_type: str) -> type[Backbone]:
    for cls in FAMILIES.values():
        if model_type in cls.model_types:
            return cls
    known = ", ".join(t for c in FAMILIES.values() for t in c.model_types)
    raise UserError(f"model.backbone: model type '{model_type}' is not supported (supported: {known})")


# Offline presets: real architectures with random weights, small enough to train in seconds on a CPU.
_TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
             image_size=64, patch_size=8)
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny-clip": ("clip", _TINY),
    "tiny-siglip": ("siglip", _TINY),
}


def build_backbone(name: str, attn_implementation: str = "sdpa", trust_remote_code: bool = False) -> Backbone:
    """A backbone from a preset name, a hub id or a local directory (pretrained weights loaded)."""
    if name in PRESETS:
        family, kwargs = PRESETS[name]
        cls = FAMILIES[family]
        config = cls.config_class(**kwargs)
        return backbone_from_config(family, config.to_dict(), attn_implementation)
    return _load_pretrained(name, attn_implementation, trust_remote_code)


def backbone_from_config(
    family: str, config: dict[str, Any], attn_implementation: str = "sdpa", preprocess: Preprocess | None = None
) -> Backbone:
    """A backbone with the architecture in `config` and freshly initialised weights."""
    cls = FAMILIES[family]
    hf_config = cls.config_class.from_dict(config)
    hf_config._attn_implementation = attn_implementation
    torch_model = cls.hf_class(hf_config)
    preprocess = preprocess or Preprocess(image_size=hf_config.image_size, **cls.default_preprocess)
    return cls(torch_model, preprocess)


def _load_pretrained(name: str, attn_implementation: str, trust_remote_code: bool) -> Backbone:
    is_dir = Path(name).is_dir()
    if not is_dir and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise UserError(f"model.backbone: '{name}' is not a preset, not an existing directory, and not a hub id")
    try:
        model_type = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code).model_type
    except (OSError, ValueError) as err:  # no network, no such repo, or no usable config.json
        raise UserError(
            f"model.backbone: cannot load '{name}': {_first_line(err)}\n"
            "  If this machine is offline, download the model elsewhere and point model.backbone at its "
            "directory, or use a preset (tiny-clip, tiny-siglip)."
        ) from None
    cls = _family_for(model_type)
    try:
        # safetensors only: pickle-based weights (pytorch_model.bin) can run code when loaded.
        hf_model, info = cls.hf_class.from_pretrained(
            name, attn_implementation=attn_implementation, torch_dtype=torch.float32,
            output_loading_info=True, trust_remote_code=trust_remote_code, use_safetensors=True,
        )
    except OSError as err:
        raise UserError(
            f"model.backbone: cannot load weights of '{name}': {_first_line(err)}\n"
            "  vlfit loads weights only from model.safetensors; pickle files (pytorch_model.bin) can run "
            "code and are refused. Convert them with a tool you trust, or use a revision that has safetensors."
        ) from None
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise UserError(f"model.backbone: '{name}' lacks {len(missing)} vision weights, e.g. {missing[:3]}")
    return cls(hf_model, _read_preprocess(name, cls, hf_model.config.image_size))


def _read_preprocess(name: str, cls: type[Backbone], image_size: int) -> Preprocess:
    """The model's own processor constants where it ships a preprocessor_config.json, else its family's."""
    from transformers.utils import cached_file

    defaults = Preprocess(image_size=image_size, **cls.default_preprocess)
    try:
        path = cached_file(name, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
    except OSError:
        path = None
    if not path:
        log.warning("%s has no preprocessor_config.json; using %s defaults", name, cls.family)
        return defaults
    proc = json.loads(Path(path).read_text())
    size = proc.get("crop_size") if proc.get("do_center_crop") else proc.get("size")
    if isinstance(size, dict):
        size = size.get("height") or size.get("shortest_edge")
    resample = {2: "bilinear", 3: "bicubic"}.get(proc.get("resample"), defaults.interpolation)
    return Preprocess(
        image_size=int(size or image_size),
        mean=tuple(proc.get("image_mean", defaults.mean)),
        std=tuple(proc.get("image_std", defaults.std)),
        resize="shortest_edge" if proc.get("do_center_crop") else "squash",
        interpolation=resample,
    )


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
