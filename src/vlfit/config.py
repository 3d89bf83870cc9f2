"""Typed, validated run configuration: YAML in, `Config` out, `key.sub=value` overrides on top.

Every knob a run uses lives here with a one-line comment, and the fully resolved config is written
into each run directory, so a run directory says everything its run did.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from vlfit.errors import ConfigError


class _Section(BaseModel):
    # Unknown keys are errors: a typo must not silently fall back to a default. NaN and infinity are
    # never a meaningful setting (lr: .inf would pass `gt=0`).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class LoraConfig(_Section):
    r: int = Field(8, ge=1)  # adapter rank
    alpha: int = Field(16, ge=1)  # adapter scale numerator (scale = alpha / r)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # dropout on the adapter input
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "out_proj"]  # encoder attention projections


class MaskConfig(_Section):
    kind: Literal["none", "random", "attentive"] = "none"  # token masking during training (never at eval)
    keep_ratio: float = Field(0.5, gt=0.0, le=1.0)  # share of patch tokens the online encoder sees
    teacher: Literal["ema", "frozen"] = "ema"  # attentive: EMA of the online tower, or the initial tower
    momentum: tuple[float, float] = (0.996, 1.0)  # attentive + ema: momentum from -> to, cosine schedule
    saliency_layers: Literal["all", "last"] = "all"  # attentive CLIP: CLS attention of all layers or the last
    block: Literal[1, 2] = 1  # attentive: choose patches singly or as 2x2 blocks (A-CLIP)
    # the last N epochs train on every token (FLIP's unmasked tuning): the CLS token and SigLIP's
    # pooling head then also learn the statistics of the unmasked inputs they see at evaluation;
    # at least one epoch stays masked (a shorter run trains fewer unmasked, with a warning)
    unmasked_epochs: int = Field(0, ge=0)

    @field_validator("momentum")
    @classmethod
    def _momentum_in_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 <= v[0] <= v[1] <= 1.0:
            raise ValueError(f"must be [start, end] with 0 <= start <= end <= 1, got {list(v)}")
        return v


class ModelConfig(_Section):
    backbone: str = "tiny-clip"  # preset (tiny-clip, tiny-siglip), hub id or local directory
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"  # attention kernel of the transformers model
    head: Literal["linear", "zeroshot"] = "linear"  # zeroshot: head initialised from class prompts (text tower)
    templates: list[str] | None = None  # prompt templates with "{}" for the class name; null: built-in set
    head_dropout: float = Field(0.0, ge=0.0, lt=1.0)  # dropout on pooled features before the head
    finetune: Literal["full", "linear_probe", "lora"] = "full"  # what trains: everything, the head, or adapters
    lora: LoraConfig = LoraConfig()  # finetune: lora
    mask: MaskConfig = MaskConfig()  # token masking during training
    trust_remote_code: bool = False  # never run code from the hub unless asked

    @field_validator("templates")
    @classmethod
    def _templates_have_slot(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (not v or any("{}" not in t for t in v)):
            raise ValueError("must be a non-empty list of strings, each with a {} where the class name goes")
        return v


class LossConfig(_Section):
    contrastive_weight: float = Field(0.0, ge=0.0)  # weight of the image-to-class-prompt contrastive term
    train_text: bool = False  # with the contrastive term: also fine-tune the text tower


class WiseFtConfig(_Section):
    alphas: list[float] = []  # after training, evaluate (1-a)*zero-shot + a*fine-tuned for each a in [0, 1]

    @field_validator("alphas")
    @classmethod
    def _alphas_in_unit_interval(cls, v: list[float]) -> list[float]:
        if any(not 0.0 <= a <= 1.0 for a in v):
            raise ValueError(f"every mixing weight must be in [0, 1], got {v}")
        return v


HAR_HUB_ID = "Bingsu/Human_Action_Recognition"
# Pillow's own decompression-bomb thresholds: it warns above the first and refuses above the second.
PIL_MAX_PIXELS, PIL_HARD_MAX_PIXELS = 89_478_485, 178_956_970


class DataConfig(_Section):
    # where images come from: synthetic-har, hub, parquet, disk (save_to_disk), kaggle, imagefolder, csv
    source: Literal["synthetic-har", "hub", "parquet", "disk", "kaggle", "imagefolder", "csv"] = "synthetic-har"
    path: str | None = None  # hub id (default: HAR), parquet file/glob/folder, or the folder/CSV of the layout
    revision: str | None = None  # hub: branch, tag or commit
    train_split: str = "train"  # split to train on, and to hold validation out of unless val_split is set
    val_split: str | None = None  # labelled split to validate on instead of a hold-out; refused if labels unusable
    image_column: str | None = None  # hub/parquet/disk: image column (null: the one Image column)
    label_column: str | None = None  # hub/parquet/disk: label column (null: the ClassLabel column, else label(s))
    classes: list[str] | None = None  # class names in label order (null: ClassLabel names, else sorted label names)
    # a class read off the labels with fewer images, or none to validate on, stops the run (a mistyped label?)
    min_class_images: int = Field(5, ge=1)
    allow_small_classes: bool = False  # train on such classes anyway (a warning instead of the stop)
    num_images: int = Field(2000, ge=30)  # synthetic-har: how many images to generate
    image_size: int = Field(96, ge=16, le=1024)  # synthetic-har: side of the generated images
    seed: int = Field(0, ge=0)  # synthetic-har: generator seed
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)  # stratified share held out for validation
    split_seed: int = 42  # seed of the stratified split
    split_file: str | None = None  # a split.json (image ids or names) to use instead of making one
    exact_duplicates: Literal["group", "drop"] = "group"  # identical images: all on one side of the split, or one kept
    # near duplicates (pHash and dHash both within this many of their 64 bits) stay on one side; null: off
    near_duplicate_distance: int | None = Field(5, ge=0, le=32)
    strict: bool = False  # any unusable image or row stops the run instead of being skipped
    max_bad_fraction: float = Field(0.05, ge=0.0, le=1.0)  # stop when a larger share of the images is unusable
    min_image_size: int = Field(16, ge=1)  # images with a shorter side are skipped
    # larger images are skipped before decoding (decompression bombs); Pillow refuses above its hard limit anyway
    max_image_pixels: int = Field(PIL_MAX_PIXELS, ge=1, le=PIL_HARD_MAX_PIXELS)
    crop_scale: tuple[float, float] = (0.5, 1.0)  # RandomResizedCrop area range
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # RandomResizedCrop aspect range
    hflip: float = Field(0.5, ge=0.0, le=1.0)  # horizontal-flip probability
    num_workers: int = Field(0, ge=0)  # worker processes that decode images: the load-time check and the DataLoader
    # "cached" is the default: it decodes each image once into an on-disk cache and crops, flips,
    # resizes and normalises whole batches on the training device, so JPEG decoding stops bounding a
    # GPU's speed; its crops and resizes are torchvision's RandomResizedCrop and the backbone's own
    # processor, computed from the stored pixels (tests/test_fidelity.py). "torchvision" decodes and
    # augments every training image on the CPU each epoch: the reference path. Evaluation is the
    # same on both.
    pipeline: Literal["cached", "torchvision"] = "cached"  # input pipeline (see above)
    cache_dir: str | None = None  # cached: where decoded images are kept; null: $XDG_CACHE_HOME/vlfit or ~/.cache/vlfit
    # images with a longer shorter side are stored shrunk to it (aspect kept); null: twice what the smallest
    # crop needs, 2 x input / sqrt(crop_scale[0]) (634 px at 224 px and crop_scale 0.5); smaller images are kept exactly
    cache_size: int | None = Field(None, ge=16, le=4096)

    @field_validator("crop_scale", "crop_ratio")
    @classmethod
    def _range_ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError(f"must be [low, high] with 0 < low <= high, got {list(v)}")
        return v

    @field_validator("crop_scale")
    @classmethod
    def _scale_at_most_one(cls, v: tuple[float, float]) -> tuple[float, float]:
        if v[1] > 1:
            raise ValueError(f"a crop cannot cover more than the whole image: high must be <= 1, got {v[1]}")
        return v

    @field_validator("classes")
    @classmethod
    def _classes_distinct(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (len(v) < 2 or len(set(v)) != len(v)):
            raise ValueError("must name at least two classes, each once")
        return v

    @model_validator(mode="after")
    def _source_needs(self) -> DataConfig:
        if self.source == "synthetic-har":
            for key in ("path", "val_split", "split_file"):
                if getattr(self, key) is not None:
                    raise ValueError(f"data.{key}: not used by source synthetic-har")
        elif self.source != "hub" and self.path is None:
            raise ValueError(f"data.path: source {self.source} needs a path")
        if self.val_split is not None and self.val_split == self.train_split:
            raise ValueError("data.val_split: must differ from data.train_split")
        if self.val_split is not None and self.split_file is not None:
            raise ValueError("data.split_file: cannot be combined with data.val_split")
        return self

    @property
    def location(self) -> str:
        """What `path` means once defaults apply: the hub source defaults to the HAR dataset."""
        return self.path or (HAR_HUB_ID if self.source == "hub" else self.source)


class TrainConfig(_Section):
    epochs: int = Field(10, ge=1)  # passes over the training split
    micro_batch: int | Literal["auto"] = 64  # images per forward/backward per process; auto: the largest that fits the GPU
    accum_steps: int = Field(1, ge=1)  # micro-batches per optimizer step: effective batch = micro_batch x accum_steps x processes
    # images per optimizer step over all processes: fixes it on any process count (accum_steps is then
    # derived as effective_batch / (micro_batch x processes)); needed by micro_batch: auto
    effective_batch: int | None = Field(None, ge=1, validate_default=True)
    eval_batch: int = Field(256, ge=1)  # images per evaluation forward (no gradients, so larger)
    lr: float = Field(1e-3, gt=0.0)  # peak learning rate after warmup
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)  # cosine floor as a fraction of lr
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0)  # share of optimizer steps spent warming up linearly
    weight_decay: float = Field(0.05, ge=0.0)  # AdamW decay; never applied to biases and norm weights
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    grad_clip: float | None = Field(1.0, gt=0.0)  # max global gradient norm; null turns clipping off
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)  # cross-entropy label smoothing
    layer_decay: float = Field(1.0, gt=0.0, le=1.0)  # layer-wise lr decay: layer i of L gets lr * decay**(L+1-i)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on GPUs that have it, else fp32
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when available
    seed: int = 0  # seeds weights, data order and augmentation
    compile: bool = False  # torch.compile the backbone (slow first steps, faster after)
    grad_checkpointing: bool = False  # recompute encoder activations in the backward pass: less memory, ~30% slower
    checkpoint_every: int | None = Field(None, ge=1)  # also checkpoint every N optimizer steps (null: epoch ends only)
    nonfinite_patience: int = Field(10, ge=1)  # fp16: consecutive non-finite-loss steps tolerated before stopping
    distributed: Literal["ddp", "fsdp"] = "ddp"  # several processes: replicate the model (ddp) or shard it (fsdp, GPUs)

    @field_validator("micro_batch", mode="before")
    @classmethod
    def _positive_or_auto(cls, v: Any) -> Any:
        # One message instead of pydantic's one-per-union-member.
        if isinstance(v, str) and v.strip().isdigit():
            v = int(v)
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            return v
        raise ValueError(f"must be a positive integer or 'auto' (got {v!r})")

    @field_validator("effective_batch")
    @classmethod
    def _batch_sizes_agree(cls, v: int | None, info: ValidationInfo) -> int | None:
        micro, accum = info.data.get("micro_batch"), info.data.get("accum_steps")
        if micro is None or accum is None:  # already reported as invalid
            return v
        if micro == "auto" and v is None:
            raise ValueError("micro_batch: auto needs effective_batch, the images per optimizer step to keep")
        if v is not None and accum != 1:
            raise ValueError(f"with effective_batch set, accum_steps is derived from it (effective_batch / "
                             f"(micro_batch x processes)); remove accum_steps (got {accum})")
        if v is not None and micro != "auto" and v % micro:
            raise ValueError(f"must be a multiple of micro_batch ({micro}), got {v}")
        return v

    @field_validator("device")
    @classmethod
    def _device_fits_precision(cls, v: str, info: ValidationInfo) -> str:
        if v == "cpu" and info.data.get("precision") == "fp16":
            raise ValueError("fp16 (with its gradient scaler) needs a CUDA device; on the CPU use fp32 or bf16")
        return v

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"each beta must be in [0, 1), got {list(v)}")
        return v


class Config(_Section):
    name: str | None = None  # run name; defaults to the config file's stem
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    loss: LossConfig = LossConfig()
    wise_ft: WiseFtConfig = WiseFtConfig()

    def conflicts(self) -> list[str]:
        """Combinations of valid values that cannot work together, one line each."""
        m = self.model
        problems = []
        if m.finetune == "linear_probe" and m.mask.kind != "none":
            problems.append("model.mask.kind: token masking needs a backbone that trains; a linear probe "
                            "reads cached features")
        if m.mask.unmasked_epochs and m.mask.kind == "none":
            problems.append("model.mask.unmasked_epochs: an unmasked final phase needs masked training before "
                            "it; set model.mask.kind: random or attentive, or unmasked_epochs: 0")
        if m.finetune == "linear_probe" and self.loss.contrastive_weight > 0:
            problems.append("loss.contrastive_weight: a linear probe trains only the head; the contrastive "
                            "term needs a backbone that trains")
        if self.wise_ft.alphas and m.head != "zeroshot":
            problems.append("wise_ft.alphas: WiSE-FT interpolates from the zero-shot model; set model.head: zeroshot")
        if self.loss.train_text and self.loss.contrastive_weight == 0:
            problems.append("loss.train_text: the text tower only trains through the contrastive term; "
                            "set loss.contrastive_weight > 0")
        return problems

    @property
    def needs_text(self) -> bool:
        """Whether the run uses the text tower (zero-shot head or contrastive loss)."""
        return self.model.head == "zeroshot" or self.loss.contrastive_weight > 0

    def to_yaml(self) -> str:
        """The resolved config as YAML that `load_config` reads back to an equal Config."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# Settings a resumed run may change: they alter how it runs, not what it computes (augmentation is
# seeded per image, so the number of loader workers does not change a single pixel; a moved image
# cache holds the same pixels).
RESUME_MAY_CHANGE = frozenset({"name", "data.num_workers", "data.cache_dir"})


def resume_differences(saved: Config, new: Config) -> list[str]:
    """One line 'key: saved -> new' per setting that differs and would change a resumed run's results."""
    old, now = flat_keys(saved.model_dump(mode="json")), flat_keys(new.model_dump(mode="json"))
    return [f"{k}: {old.get(k)!r} in the run, {now.get(k)!r} now" for k in sorted(old.keys() | now.keys())
            if old.get(k) != now.get(k) and k not in RESUME_MAY_CHANGE]


def flat_keys(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as {"section.key": value}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_keys(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


# ----------------------------------------------------------------------------- loading


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read YAML at `path` (None: all defaults), apply `key.sub=value` overrides, validate.

    Raises ConfigError listing every problem, one line each, naming its key.
    """
    raw: dict[str, Any] = {}
    source = "config"
    if path is not None:
        path = Path(path)
        source = str(path)
        raw = _read_yaml(path)
    for item in overrides:
        _apply_override(raw, item)
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_describe(err), source) from None
    if conflicts := cfg.conflicts():
        raise ConfigError(conflicts, source)
    if cfg.name is None and path is not None:
        cfg.name = path.stem
    return cfg


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError([f"file not found: {path}"], str(path))
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError([f"not valid YAML: {err}".replace("\n", " ")], str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"top level must be a mapping of sections, got {type(data).__name__}"], str(path))
    return data


def _apply_override(raw: dict[str, Any], item: str) -> None:
    """Set raw[a][b] = value for 'a.b=value'; the value is parsed as YAML (numbers, lists, null)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError([f"override {item!r} must look like key.sub=value"], "--set")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise ConfigError([f"{key}: cannot set a sub-key, {where} is a value, not a section"], "--set")
        node = child
    node[parts[-1]] = value


def _describe(err: ValidationError) -> list[str]:
    """Turn pydantic's errors into one line each: 'section.key: what is wrong (got X)'."""
    problems = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        key = ".".join(loc) or "config"
        if e["type"] == "extra_forbidden":
            problems.append(f"{key}: unknown key{_suggest(loc)}")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "value_error" and msg.startswith(key + "."):  # a cross-key check that names its own key
            problems.append(msg)
            continue
        got = e.get("input")
        shown = "" if isinstance(got, dict) or e["type"] == "value_error" else f" (got {got!r})"
        problems.append(f"{key}: {msg}{shown}")
    return problems


def _suggest(loc: list[str]) -> str:
    section: type[BaseModel] = Config
    for part in loc[:-1]:
        field = section.model_fields.get(part)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return ""
        section = field.annotation
    close = difflib.get_close_matches(loc[-1], list(section.model_fields), n=1)
    known = ", ".join(section.model_fields)
    return f" (did you mean '{close[0]}'?)" if close else f" (known keys: {known})"
