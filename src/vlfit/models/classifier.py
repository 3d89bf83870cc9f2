"""A backbone plus a linear head: the model every run trains and every checkpoint holds."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlfit.models.backbones import Backbone, Preprocess, backbone_from_config


class ImageClassifier(nn.Module):
    """pixels (B, 3, H, W) -> logits (B, num_classes).

    `head_input` says what the linear head reads: "pooled" features (the usual fine-tuning head) or
    the L2-normalised "embedding" in the joint image-text space, where a zero-shot head built from
    class prompts lives (the WiSE-FT setup).
    """

    def __init__(self, backbone: Backbone, num_classes: int, dropout: float = 0.0, head_input: str = "pooled"):
        super().__init__()
        self.backbone = backbone
        self.head_input = head_input
        self.dropout = nn.Dropout(dropout)
        width = backbone.embed_dim if head_input == "embedding" else backbone.feature_dim
        self.head = nn.Linear(width, num_classes)
        # A small head init keeps the first steps from wrecking pretrained features with large gradients.
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)
        self.lora: dict[str, Any] | None = None  # set by `apply_lora`, so a checkpoint can rebuild the adapters

    def embedding(self, pooled: torch.Tensor) -> torch.Tensor:
        """Normalised joint-space embedding of pooled features."""
        return F.normalize(self.backbone.project(pooled), dim=-1)

    def head_features(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.embedding(pooled) if self.head_input == "embedding" else pooled

    def forward(self, pixels: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.dropout(self.head_features(self.backbone(pixels, keep))))

    def set_zero_shot_head(self, class_embeddings: torch.Tensor, logit_scale: float) -> None:
        """Make the head the zero-shot classifier: logits = scale * <image embedding, class embedding>."""
        if self.head_input != "embedding":
            raise ValueError("a zero-shot head reads the joint-space embedding: use head_input='embedding'")
        with torch.no_grad():
            self.head.weight.copy_(class_embeddings * logit_scale)
            self.head.bias.zero_()

    def architecture(self) -> dict[str, Any]:
        """Everything needed to rebuild this model without the hub: see `classifier_from_architecture`."""
        proj = self.backbone.projection
        return {
            "family": self.backbone.family,
            "backbone_config": self.backbone.hf_config.to_dict(),
            "attn_implementation": self.backbone.hf_config._attn_implementation,
            "preprocess": self.backbone.preprocess.to_dict(),
            "projection_dim": proj.out_features if isinstance(proj, nn.Linear) else None,
            "num_classes": self.head.out_features,
            "dropout": self.dropout.p,
            "head_input": self.head_input,
            "lora": self.lora,
        }


def classifier_from_architecture(arch: dict[str, Any]) -> ImageClassifier:
    """An ImageClassifier shaped by `ImageClassifier.architecture()`, weights freshly initialised."""
    backbone = backbone_from_config(
        arch["family"], arch["backbone_config"], arch.get("attn_implementation") or "sdpa",
        Preprocess.from_dict(arch["preprocess"]), arch.get("projection_dim"),
    )
    model = ImageClassifier(backbone, arch["num_classes"], arch.get("dropout", 0.0), arch.get("head_input", "pooled"))
    if arch.get("lora"):
        from vlfit.models.lora import apply_lora

        apply_lora(model, **arch["lora"])
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
