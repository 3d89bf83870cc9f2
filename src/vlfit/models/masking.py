"""Token masking for training: the online encoder sees only a subset of patch tokens.

Position embeddings are added before any token is dropped (`Backbone.embed`), and dropped tokens
never reach the encoder, so the saving in compute is real. Masking is a training-time module only:
in eval mode it returns None and the model sees every token.

- `RandomMasking`: FLIP / open_clip patch dropout: a random subset per image.
- `AttentiveMasking`: A-CLIP: a teacher (EMA of the online tower, or the frozen initial tower) sees
  the whole image without gradients; its attention says which patches matter; the online tower
  encodes the most salient ones, optionally chosen as 2x2 blocks.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from vlfit.models.backbones import Backbone


def num_kept(num_patches: int, keep_ratio: float) -> int:
    return max(1, min(num_patches, round(num_patches * keep_ratio)))


def kept_cells(num_cells: int, keep_ratio: float) -> int:
    """Blocks attentive masking keeps: A-CLIP's own count, int(cells * ratio) + 1 (25 of a B/16's 49 cells
    at 0.5, 100 of 196 patches), so that a run of its recipe sees the tokens the paper's did."""
    return min(num_cells, int(num_cells * keep_ratio) + 1)


class RandomMasking(nn.Module):
    """Keep `keep_ratio` of the patches, chosen uniformly at random per image (prefix tokens always kept)."""

    def __init__(self, keep_ratio: float):
        super().__init__()
        self.keep_ratio = keep_ratio

    def forward(self, pixels: torch.Tensor, backbone: Backbone) -> torch.Tensor | None:
        """(B, K) sorted indices of the patches to keep, or None (keep all) in eval mode or at ratio 1."""
        if not self.training or self.keep_ratio >= 1.0:
            return None
        n = backbone.grid ** 2
        noise = torch.rand(pixels.shape[0], n, device=pixels.device)
        return noise.argsort(dim=1)[:, : num_kept(n, self.keep_ratio)].sort(dim=1).values


class AttentiveMasking(nn.Module):
    """Keep the patches a teacher finds most salient (A-CLIP).

    Saliency: CLIP: the CLS token's attention to each patch, averaged over heads, over the last layer
    or all layers; SigLIP (no CLS): the attention of the pooling head's learned probe.
    """

    def __init__(self, online: Backbone, keep_ratio: float, teacher: str = "ema",
                 momentum: tuple[float, float] = (0.996, 1.0), layers: str = "all", block: int = 1):
        super().__init__()
        if block > 1 and online.grid % block:
            raise ValueError(f"a {online.grid}x{online.grid} patch grid cannot be split into {block}x{block} blocks")
        self.keep_ratio = keep_ratio
        self.teacher_kind = teacher  # "ema": follows the online tower; "frozen": the initial tower
        self.momentum = momentum  # EMA momentum goes from momentum[0] to momentum[1] on a cosine schedule
        self.layers = layers
        self.block = block
        self.teacher = copy.deepcopy(online).requires_grad_(False).eval()

    def train(self, mode: bool = True) -> AttentiveMasking:
        super().train(mode)
        self.teacher.eval()  # the teacher never uses dropout
        return self

    def forward(self, pixels: torch.Tensor, backbone: Backbone) -> torch.Tensor | None:
        if not self.training or self.keep_ratio >= 1.0:
            return None
        with torch.no_grad():
            return self.select(self.saliency(pixels))

    @torch.no_grad()
    def saliency(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, N) saliency of each patch under the teacher, N = grid**2."""
        t = self.teacher
        if t.num_prefix_tokens:
            return cls_attention(t, pixels, last_only=self.layers == "last")
        return probe_attention(t, pixels)

    def select(self, saliency: torch.Tensor) -> torch.Tensor:
        """(B, N) saliency -> (B, K) sorted indices of the kept patches."""
        b, n = saliency.shape
        if self.block == 1:
            return saliency.topk(num_kept(n, self.keep_ratio), dim=1).indices.sort(dim=1).values
        g, s = int(math.isqrt(n)), self.block
        cells = F.avg_pool2d(saliency.view(b, 1, g, g), s).flatten(1)  # (B, (g/s)**2)
        top = cells.topk(kept_cells(cells.shape[1], self.keep_ratio), dim=1).indices
        # Expand each chosen cell to the s*s patches it covers.
        cell_row, cell_col = top // (g // s), top % (g // s)
        dr, dc = torch.meshgrid(torch.arange(s, device=top.device), torch.arange(s, device=top.device), indexing="ij")
        rows = cell_row[..., None] * s + dr.flatten()
        cols = cell_col[..., None] * s + dc.flatten()
        return (rows * g + cols).flatten(1).sort(dim=1).values

    @torch.no_grad()
    def update_teacher(self, online: Backbone, progress: float) -> None:
        """EMA step after an optimizer step; `progress` in [0, 1] is the share of training done."""
        if self.teacher_kind != "ema":
            return
        m = self.momentum_at(progress)
        for t, o in zip(self.teacher.parameters(), online.parameters()):
            t.lerp_(o.detach(), 1.0 - m)

    def momentum_at(self, progress: float) -> float:
        lo, hi = self.momentum
        return hi - (hi - lo) * (math.cos(math.pi * min(max(progress, 0.0), 1.0)) + 1) / 2


@torch.no_grad()
def cls_attention(backbone: Backbone, pixels: torch.Tensor, last_only: bool = False) -> torch.Tensor:
    """(B, N): softmax attention of the CLS query over the patch keys, averaged over heads (and layers).

    Computed from each layer's own query/key projections, captured by hooks during one ordinary
    forward pass, so the encoder keeps its fast attention kernel.
    """
    rows: list[torch.Tensor] = []

    def capture(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]  # (B, N+1, D), after the layer's first LayerNorm
        b, n, _ = h.shape
        heads = module.num_heads
        q = module.q_proj(h[:, :1]).view(b, 1, heads, -1).transpose(1, 2)
        k = module.k_proj(h).view(b, n, heads, -1).transpose(1, 2)
        attn = (q @ k.transpose(-1, -2) * module.scale).softmax(dim=-1)  # (B, heads, 1, N+1)
        rows.append(attn[:, :, 0, 1:].mean(dim=1))

    layers = backbone.encoder_layers
    chosen = [layers[-1]] if last_only else list(layers)
    handles = [layer.self_attn.register_forward_pre_hook(capture, with_kwargs=True) for layer in chosen]
    try:
        backbone.encode(backbone.embed(pixels))
    finally:
        for h in handles:
            h.remove()
    return torch.stack(rows).mean(dim=0)


@torch.no_grad()
def probe_attention(backbone: Backbone, pixels: torch.Tensor) -> torch.Tensor:
    """(B, N): attention weights of SigLIP's pooling-head probe over the final tokens, averaged over heads."""
    tower = backbone.tower
    hidden = tower.post_layernorm(backbone.encode(backbone.embed(pixels)))
    head = tower.head
    probe = head.probe.expand(hidden.shape[0], -1, -1)
    _, weights = head.attention(probe, hidden, hidden, need_weights=True, average_attn_weights=True)
    return weights[:, 0]


MASKS = {"random": RandomMasking, "attentive": AttentiveMasking}
