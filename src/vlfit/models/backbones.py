"""Vision backbones: one registry, each entry knowing its preprocessing, its pooling and its text tower.

A backbone wraps a `transformers` vision tower behind the steps that token masking hooks into:
`embed` (patches -> tokens, position embeddings added), `encode` (any subset of tokens -> hidden
states) and `pool` (hidden states -> one feature vector: CLS for CLIP, the attention-pooling head
for SigLIP). With every token kept, `forward` equals the transformers model's own `pooler_output`.
`project` maps pooled features into the joint image-text space, where the text tower's class
prompts live.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import (
    AutoConfig,
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    PretrainedConfig,
    SiglipConfig,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from vlfit.errors import UserError, first_line
from vlfit.models.text import TextTower, load_tokenizer, word_tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preprocess:
    """How a backbone wants its pixels: input side, normalisation, and how eval images are resized."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = "shortest_edge"  # shortest_edge + center crop (CLIP) or "squash" to a square (SigLIP)
    interpolation: str = "bicubic"
    shortest_edge: int | None = None  # shortest_edge: the side resized to before the centre crop (None: image_size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        return cls(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})


class Backbone(nn.Module):
    """A vision tower as embed -> encode -> pool (-> project). Subclasses bind one transformers family."""

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]  # transformers `model_type`s of full (vision + text) checkpoints
    vision_model_types: ClassVar[tuple[str, ...]]  # ... and of vision-only checkpoints
    full_class: ClassVar[type]
    vision_class: ClassVar[type]
    config_class: ClassVar[type[PretrainedConfig]]
    vision_config_class: ClassVar[type[PretrainedConfig]]
    default_preprocess: ClassVar[dict[str, Any]]
    num_prefix_tokens: ClassVar[int]  # tokens before the patches (CLIP's CLS) that masking always keeps

    def __init__(self, vision_model: nn.Module, preprocess: Preprocess, projection: nn.Module | None = None):
        super().__init__()
        # transformers 4.x nests the tower as `.vision_model`; 5.x puts its parts on the model itself.
        # Holding the inner tower gives the same parameter names on both.
        self.tower = getattr(vision_model, "vision_model", vision_model)
        self.projection = projection if projection is not None else nn.Identity()
        self.preprocess = preprocess

    @property
    def hf_config(self) -> PretrainedConfig:
        return self.tower.config

    @property
    def feature_dim(self) -> int:
        return self.hf_config.hidden_size

    @property
    def embed_dim(self) -> int:
        """Width of the joint image-text space (= feature_dim where there is no projection)."""
        return self.projection.out_features if isinstance(self.projection, nn.Linear) else self.feature_dim

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.hf_config.image_size // self.hf_config.patch_size

    @property
    def encoder_layers(self) -> nn.ModuleList:
        return self.tower.encoder.layers

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each encoder layer's activations during the backward pass instead of keeping them.

        Uses the transformers layers' own switch (as `gradient_checkpointing_enable` does), which works
        whether the tower is a `PreTrainedModel` or a bare transformer module.
        """
        switches = [m for m in self.tower.modules() if hasattr(m, "gradient_checkpointing")]
        if not switches:
            raise UserError(f"train.grad_checkpointing: {type(self.tower).__name__} does not support it")
        for module in switches:
            module.gradient_checkpointing = enable
            module._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, prefix + patches, D) tokens, position embeddings already added."""
        raise NotImplementedError

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, N, D) hidden states of the last layer, for any N."""
        return self.tower.encoder(inputs_embeds=tokens).last_hidden_state

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, D) image features."""
        raise NotImplementedError

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """(B, D) pooled features -> (B, E) embeddings in the joint image-text space (not normalised)."""
        return self.projection(features)

    def forward(self, pixels: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled features; `keep` (B, K) indexes the patch tokens to encode (prefix tokens always are)."""
        tokens = self.embed(pixels)
        if keep is not None:
            tokens = select_tokens(tokens, keep, self.num_prefix_tokens)
        return self.pool(self.encode(tokens))


def select_tokens(tokens: torch.Tensor, keep: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """tokens (B, P + N, D), keep (B, K) patch indices in [0, N) -> (B, P + K, D), prefix first."""
    patches = tokens[:, num_prefix:]
    kept = torch.gather(patches, 1, keep.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
    return torch.cat([tokens[:, :num_prefix], kept], dim=1)


class ClipBackbone(Backbone):
    family = "clip"
    model_types = ("clip",)
    vision_model_types = ("clip_vision_model",)
    full_class = CLIPModel
    vision_class = CLIPVisionModel
    config_class = CLIPConfig
    vision_config_class = CLIPVisionConfig
    default_preprocess = dict(mean=tuple(OPENAI_CLIP_MEAN), std=tuple(OPENAI_CLIP_STD), resize="shortest_edge")
    num_prefix_tokens = 1

    def embed(self, pixels):
        # CLIP applies a LayerNorm to the embeddings before the encoder; it is per-token, so it can
        # run before any token is dropped.
        return self.tower.pre_layrnorm(self.tower.embeddings(pixels))

    def pool(self, hidden):
        return self.tower.post_layernorm(hidden[:, 0])  # CLS token


class SiglipBackbone(Backbone):
    family = "siglip"
    model_types = ("siglip",)  # SigLIP and the fixed-resolution SigLIP 2 checkpoints
    vision_model_types = ("siglip_vision_model",)
    full_class = SiglipModel
    vision_class = SiglipVisionModel
    config_class = SiglipConfig
    vision_config_class = SiglipVisionConfig
    default_preprocess = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize="squash")
    num_prefix_tokens = 0  # SigLIP has no CLS token

    def embed(self, pixels):
        return self.tower.embeddings(pixels)

    def pool(self, hidden):
        hidden = self.tower.post_layernorm(hidden)
        if getattr(self.tower, "use_head", True) and hasattr(self.tower, "head"):
            return self.tower.head(hidden)  # attention pooling with a learned probe
        return hidden.mean(dim=1)


FAMILIES: dict[str, type[Backbone]] = {cls.family: cls for cls in (ClipBackbone, SiglipBackbone)}


def _family_for(model_type: str) -> tuple[type[Backbone], bool]:
    """(backbone class, whether the checkpoint holds the text tower too)."""
    for cls in FAMILIES.values():
        if model_type in cls.model_types:
            return cls, True
        if model_type in cls.vision_model_types:
            return cls, False
    if model_type == "siglip2":
        raise UserError("model.backbone: SigLIP 2 NaFlex checkpoints (model type 'siglip2') are not supported; "
                        "use a fixed-resolution SigLIP 2 checkpoint such as google/siglip2-base-patch16-224")
    known = ", ".join(t for c in FAMILIES.values() for t in (*c.model_types, *c.vision_model_types))
    raise UserError(f"model.backbone: model type '{model_type}' is not supported (supported: {known})")


# Offline presets: real architectures with random weights, small enough to train in seconds on a CPU.
# Their text towers are tiny too, with a word-level tokenizer built in memory (no vocabulary download).
_TINY_VISION = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                    image_size=64, patch_size=8)
_TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=32)
PRESETS: dict[str, str] = {"tiny-clip": "clip", "tiny-siglip": "siglip"}


@dataclass
class Loaded:
    """What `load_backbone` returns: the vision backbone and, when asked for, the text tower."""

    backbone: Backbone
    text: TextTower | None


def load_backbone(name: str, attn_implementation: str = "sdpa", trust_remote_code: bool = False,
                  with_text: bool = False) -> Loaded:
    """A backbone from a preset name, a hub id or a local directory, pretrained weights loaded.

    With `with_text`, the checkpoint must hold the text tower too (hub CLIP/SigLIP repos do).
    """
    if name in PRESETS:
        return _build_preset(PRESETS[name], attn_implementation, with_text)
    return _load_pretrained(name, attn_implementation, trust_remote_code, with_text)


def build_backbone(name: str, attn_implementation: str = "sdpa", trust_remote_code: bool = False) -> Backbone:
    """The vision backbone alone (see `load_backbone`)."""
    return load_backbone(name, attn_implementation, trust_remote_code).backbone


def backbone_from_config(family: str, config: dict[str, Any], attn_implementation: str = "sdpa",
                         preprocess: Preprocess | None = None, projection_dim: int | None = None) -> Backbone:
    """A backbone with the vision architecture in `config` and freshly initialised weights."""
    cls = FAMILIES[family]
    vision_config = cls.vision_config_class.from_dict(config)
    vision_config._attn_implementation = attn_implementation
    projection = nn.Linear(vision_config.hidden_size, projection_dim, bias=False) if projection_dim else None
    preprocess = preprocess or Preprocess(image_size=vision_config.image_size, **cls.default_preprocess)
    return cls(cls.vision_class(vision_config), preprocess, projection)


def _build_preset(family: str, attn_implementation: str, with_text: bool) -> Loaded:
    cls = FAMILIES[family]
    if not with_text:
        return Loaded(backbone_from_config(family, _TINY_VISION, attn_implementation), None)
    tokenizer = word_tokenizer()
    text = dict(_TINY_TEXT, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if family == "siglip":  # SigLIP's text head projects into the vision tower's width (no image projection)
        text["projection_size"] = _TINY_VISION["hidden_size"]
    extra = {"projection_dim": 64} if family == "clip" else {}
    config = cls.config_class(text_config=text, vision_config=_TINY_VISION, **extra)
    config._attn_implementation = attn_implementation
    full = cls.full_class(config)
    return _split_full(cls, full, Preprocess(image_size=_TINY_VISION["image_size"], **cls.default_preprocess),
                       tokenizer)


def _split_full(cls: type[Backbone], full: nn.Module, preprocess: Preprocess, tokenizer) -> Loaded:
    """Take a full CLIP/SigLIP model apart into the vision backbone and the text tower."""
    backbone = cls(full.vision_model, preprocess, getattr(full, "visual_projection", None))
    text = TextTower(cls.family, full.text_model, getattr(full, "text_projection", None), tokenizer,
                     full.logit_scale, getattr(full, "logit_bias", None))
    return Loaded(backbone, text)


def _load_pretrained(name: str, attn_implementation: str, trust_remote_code: bool, with_text: bool) -> Loaded:
    is_dir = Path(name).is_dir()
    if not is_dir and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise UserError(f"model.backbone: '{name}' is not a preset, not an existing directory, and not a hub id")
    try:
        model_type = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code).model_type
    except (OSError, ValueError) as err:  # no network, no such repo, or no usable config.json
        raise UserError(
            f"model.backbone: cannot load '{name}': {first_line(err)}\n"
            "  If this machine is offline, download the model elsewhere and point model.backbone at its "
            "directory, or use a preset (tiny-clip, tiny-siglip)."
        ) from None
    cls, has_text = _family_for(model_type)
    if with_text and not has_text:
        raise UserError(f"model.backbone: '{name}' is a vision-only checkpoint, but this config needs the text "
                        "tower (zero-shot head or contrastive loss); use the full CLIP/SigLIP checkpoint")
    # Full checkpoints load through the full class, so the projection into the joint space comes along.
    hf_class = cls.full_class if has_text else cls.vision_class
    try:
        # safetensors only: pickle-based weights (pytorch_model.bin) can run code when loaded.
        model, info = hf_class.from_pretrained(
            name, attn_implementation=attn_implementation, dtype=torch.float32,
            output_loading_info=True, trust_remote_code=trust_remote_code, use_safetensors=True,
        )
    except OSError as err:
        raise UserError(
            f"model.backbone: cannot load weights of '{name}': {first_line(err)}\n"
            "  vlfit loads weights only from model.safetensors; pickle files (pytorch_model.bin) can run "
            "code and are refused. Convert them with a tool you trust, or use a revision that has safetensors."
        ) from None
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise UserError(f"model.backbone: '{name}' lacks {len(missing)} weights, e.g. {missing[:3]}")
    vision_config = model.config.vision_config if has_text else model.config
    preprocess = _read_preprocess(name, cls, vision_config.image_size)
    if not has_text:
        return Loaded(cls(model, preprocess), None)
    loaded = _split_full(cls, model, preprocess, load_tokenizer(name, trust_remote_code) if with_text else None)
    return loaded if with_text else Loaded(loaded.backbone, None)


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
    crop = proc.get("do_center_crop")
    size, resized = _side(proc.get("crop_size") if crop else proc.get("size")), _side(proc.get("size"))
    resample = {2: "bilinear", 3: "bicubic"}.get(proc.get("resample"), defaults.interpolation)
    return Preprocess(
        image_size=int(size or image_size),
        mean=tuple(proc.get("image_mean", defaults.mean)),
        std=tuple(proc.get("image_std", defaults.std)),
        resize="shortest_edge" if crop else "squash",
        interpolation=resample,
        shortest_edge=int(resized) if crop and resized and resized != size else None,
    )


def _side(size: int | dict | None) -> int | None:
    """A processor config's size entry ({"height": .., "width": ..}, {"shortest_edge": ..} or an int) as one side."""
    return size.get("height") or size.get("shortest_edge") if isinstance(size, dict) else size
