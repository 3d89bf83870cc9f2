"""LoRA adapters on the vision tower's attention, through `peft`; the head stays fully trainable."""

from __future__ import annotations

from vlfit.models.classifier import ImageClassifier


def apply_lora(model: ImageClassifier, r: int = 8, alpha: int = 16, dropout: float = 0.0,
               target_modules: tuple[str, ...] | list[str] = ("q_proj", "k_proj", "v_proj", "out_proj")) -> None:
    """Inject LoRA adapters into the backbone's tower in place; afterwards only adapters and head train."""
    from peft import LoraConfig, inject_adapter_in_model

    # A regex, so that only the encoder's attention matches: SigLIP's pooling head has an `out_proj`
    # inside nn.MultiheadAttention, which reads its weight directly and cannot take an adapter.
    pattern = rf".*encoder\.layers\.\d+\.self_attn\.({'|'.join(target_modules)})"
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=pattern)
    inject_adapter_in_model(config, model.backbone.tower)
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name or name.startswith("head.")
    model.lora = {"r": r, "alpha": alpha, "dropout": dropout, "target_modules": list(target_modules)}
