"""The task: what the training loop calls. Model, token masking and loss behind one `forward`.

`FineTuner(pixels, labels)` returns a dict with `loss` and `logits`; the loop never needs to know
which method it runs. Methods are parts chosen at build time (`build_task`), not branches in the loop.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlfit.config import Config
from vlfit.errors import UserError
from vlfit.losses import class_contrastive_loss
from vlfit.metrics import DeviceTimer
from vlfit.models import ImageClassifier, count_parameters, load_backbone
from vlfit.models.masking import AttentiveMasking, RandomMasking
from vlfit.models.text import DEFAULT_TEMPLATES, TextTower

log = logging.getLogger(__name__)


class FineTuner(nn.Module):
    """Classifier + optional token masking + optional contrastive term against class prompts.

    In eval mode it is the plain classifier on every token, with plain cross-entropy. The masker
    works in epochs 1..`masked_epochs` (None: every epoch); after them the task trains on every token
    (FLIP's unmasked phase), as `start_epoch` says.
    With `cached_features`, inputs are the head's features (linear probe on a frozen backbone).
    """

    def __init__(self, classifier: ImageClassifier, classes: list[str], masker: nn.Module | None = None,
                 text: TextTower | None = None, templates: tuple[str, ...] = DEFAULT_TEMPLATES,
                 contrastive_weight: float = 0.0, train_text: bool = False, label_smoothing: float = 0.0,
                 cached_features: bool = False, masked_epochs: int | None = None):
        super().__init__()
        self.classifier = classifier
        self.classes = classes
        self.masker = masker
        self.masked_epochs = masked_epochs
        self.masking = masker is not None  # whether the masker works in the epoch under way
        self.text = text
        self.templates = templates
        self.contrastive_weight = contrastive_weight
        self.train_text = train_text
        self.label_smoothing = label_smoothing
        self.cached_features = cached_features
        if text is not None and contrastive_weight > 0 and not train_text:
            with torch.no_grad():
                self.register_buffer("class_emb", text.class_embeddings(classes, templates), persistent=False)
        self.saliency_timer = DeviceTimer()
        self.kept_tokens = 0
        self.masked_images = 0

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        clf = self.classifier
        if self.cached_features:
            logits = clf.head(clf.dropout(inputs))
            return {"loss": self._cross_entropy(logits, labels), "logits": logits}
        keep = None
        if self.masking and self.training:
            with self.saliency_timer(inputs.device):
                keep = self.masker(inputs, clf.backbone)
            if keep is not None:
                self.kept_tokens += keep.numel()
                self.masked_images += keep.shape[0]
        pooled = clf.backbone(inputs, keep)
        logits = clf.head(clf.dropout(clf.head_features(pooled)))
        loss = self._cross_entropy(logits, labels)
        if self.training and self.contrastive_weight > 0:
            class_emb = self.text.class_embeddings(self.classes, self.templates) if self.train_text else self.class_emb
            loss = loss + self.contrastive_weight * class_contrastive_loss(
                clf.embedding(pooled), class_emb, labels, self.text.logit_scale, self.text.logit_bias)
        return {"loss": loss, "logits": logits}

    def _cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        smoothing = self.label_smoothing if self.training else 0.0
        return F.cross_entropy(logits.float(), labels, label_smoothing=smoothing)

    @torch.no_grad()
    def keep_grid(self, pixels: torch.Tensor) -> torch.Tensor | None:
        """(B, grid, grid) bool: the patches this task's masking keeps of `pixels` when training
        (None without masking). Random masking draws from the global stream, as in training."""
        if self.masker is None:
            return None
        backbone = self.classifier.backbone
        was_training = self.masker.training
        try:
            keep = self.masker.train()(pixels, backbone)
        finally:
            self.masker.train(was_training)
        grid = torch.ones(len(pixels), backbone.grid ** 2, dtype=torch.bool, device=pixels.device)
        if keep is not None:
            grid = torch.zeros_like(grid).scatter_(1, keep, True)
        return grid.view(-1, backbone.grid, backbone.grid)

    def start_epoch(self, epoch: int) -> None:
        """Called as epoch `epoch` (1-based) starts, a resumed one included: chooses its phase, so the
        phase is a function of the epoch alone and a resume replays it exactly."""
        masking = self.masker is not None and (self.masked_epochs is None or epoch <= self.masked_epochs)
        if self.masking and not masking:
            log.info("epoch %d: the unmasked phase begins: the remaining epochs train on every token", epoch)
        self.masking = masking

    def after_optimizer_step(self, progress: float) -> None:
        """Called after each optimizer step; `progress` in [0, 1] is the share of training done."""
        # Unmasked epochs need no teacher: its EMA stops with the masking, keeping the teacher that
        # chose the last masked tokens (the one the report's mask examples show).
        if isinstance(self.masker, AttentiveMasking) and self.masking:
            self.masker.update_teacher(self.classifier.backbone, progress)

    def extra_state(self) -> dict[str, nn.Module]:
        """Stateful parts beyond the classifier that a checkpoint must hold for an exact resume."""
        parts: dict[str, nn.Module] = {}
        if isinstance(self.masker, AttentiveMasking):
            parts["teacher"] = self.masker.teacher
        if self.text is not None and self.train_text:
            parts["text"] = self.text
        return parts

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) parameters of what the run trains: classifier and, if used, text tower
        (a masking teacher is a copy, not counted)."""
        parts = [self.classifier] + ([self.text] if self.text is not None else [])
        counts = [count_parameters(p) for p in parts]
        return sum(c[0] for c in counts), sum(c[1] for c in counts)

    def epoch_stats(self) -> dict[str, Any]:
        """Masking statistics since the last call (empty without masking); resets them. In an
        unmasked epoch every token is kept and no saliency is computed."""
        if self.masker is None:
            return {}
        n_patches = self.classifier.backbone.grid ** 2
        kept = self.kept_tokens / self.masked_images if self.masked_images else float(n_patches)
        stats = {"masked": self.masking, "kept_tokens": kept, "kept_token_fraction": kept / n_patches,
                 "saliency_time_s": self.saliency_timer.total()}
        self.kept_tokens = self.masked_images = 0
        self.saliency_timer.reset()
        return stats


def build_classifier(cfg: Config, classes: list[str]) -> tuple[ImageClassifier, TextTower | None]:
    """The classifier the config describes, with a zero-shot head and LoRA adapters when asked for."""
    m = cfg.model
    loaded = load_backbone(m.backbone, m.attn_implementation, m.trust_remote_code, with_text=cfg.needs_text)
    head_input = "embedding" if m.head == "zeroshot" else "pooled"
    classifier = ImageClassifier(loaded.backbone, len(classes), m.head_dropout, head_input)
    if head_input == "pooled" and cfg.loss.contrastive_weight == 0:
        # Nothing reads the joint-space projection: it never trains, so it is frozen and not counted
        # (and DDP needs every trainable parameter to receive a gradient).
        classifier.backbone.projection.requires_grad_(False)
    if m.head == "zeroshot":
        with torch.no_grad():
            class_emb = loaded.text.class_embeddings(classes, templates(cfg))
        classifier.set_zero_shot_head(class_emb, loaded.text.logit_scale.exp().item())
    if m.finetune == "lora":
        from vlfit.models.lora import apply_lora

        apply_lora(classifier, **m.lora.model_dump())
    elif m.finetune == "linear_probe":
        classifier.backbone.requires_grad_(False)
    return classifier, loaded.text


def build_task(cfg: Config, classifier: ImageClassifier, text: TextTower | None, classes: list[str],
               cached_features: bool = False) -> FineTuner:
    """Wrap the classifier with the configured masking and loss."""
    mask = cfg.model.mask
    masker = None
    if mask.kind == "random":
        masker = RandomMasking(mask.keep_ratio)
    elif mask.kind == "attentive":
        try:
            masker = AttentiveMasking(classifier.backbone, mask.keep_ratio, mask.teacher, mask.momentum,
                                      mask.saliency_layers, mask.block)
        except ValueError as err:
            raise UserError(f"model.mask.block: {err}") from None
    contrastive = cfg.loss.contrastive_weight > 0
    if text is not None:
        text.requires_grad_(cfg.loss.train_text)  # tower, projection and logit scale/bias train together
    return FineTuner(classifier, classes, masker, text if contrastive else None, templates(cfg),
                     cfg.loss.contrastive_weight, cfg.loss.train_text, cfg.train.label_smoothing, cached_features,
                     masked_epochs=cfg.train.epochs - unmasked_epochs(cfg))


def unmasked_epochs(cfg: Config) -> int:
    """The final epochs that train on every token: model.mask.unmasked_epochs, but at least one epoch
    stays masked. A short run (`--set train.epochs=1` on a masked recipe, say) trains masked throughout,
    with a warning, rather than refusing to start; metrics.jsonl says which epochs were masked."""
    wanted, epochs = cfg.model.mask.unmasked_epochs, cfg.train.epochs
    if wanted < epochs:
        return wanted
    log.warning("model.mask.unmasked_epochs: %d of %d epochs would leave none masked; the last %d train unmasked",
                wanted, epochs, epochs - 1)
    return epochs - 1


def templates(cfg: Config) -> tuple[str, ...]:
    return tuple(cfg.model.templates) if cfg.model.templates else DEFAULT_TEMPLATES
