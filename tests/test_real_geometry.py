"""ViT-B/16 at 224 px, as the hub checkpoints are: built, stepped, evaluated, checkpointed and resumed.

The checkpoint folders hold random weights in the architectures of openai/clip-vit-base-patch16 and
google/siglip-base-patch16-224 (their config values below), the processor configs in the form those
repos ship them, and tokenizers of their kinds (byte-level BPE; SentencePiece). Every method of the
comparison runs through `from_pretrained` on them: plain fine-tuning, attentive masking in 2x2 blocks
with the dual loss (A-CLIP), and random masking with LoRA. These are the slowest tests (about half a
minute each on two cores): a B/16 step and a 1 GB checkpoint cost what they cost.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import write_clip_tokenizer, write_siglip_tokenizer
from fidelity import har_like_jpeg_files
from layouts import Item, write_imagefolder
from safetensors.torch import load_file
from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

from vlfit.config import load_config
from vlfit.metrics import MetricsLog
from vlfit.models import load_backbone
from vlfit.train import train

B16 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224,
           patch_size=16)
# openai/clip-vit-base-patch16/config.json
CLIP_TEXT = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                 max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", layer_norm_eps=1e-5)
CLIP_VISION = dict(B16, hidden_act="quick_gelu", layer_norm_eps=1e-5)
CLIP_PROCESSOR = {"crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
                  "feature_extractor_type": "CLIPFeatureExtractor",
                  "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
                  "resample": 3, "size": 224}
# google/siglip-base-patch16-224/config.json
SIGLIP_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   max_position_embeddings=64, vocab_size=32000, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
SIGLIP_VISION = dict(B16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
SIGLIP_PROCESSOR = {"do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
                    "image_processor_type": "SiglipImageProcessor", "image_std": [0.5, 0.5, 0.5],
                    "processor_class": "SiglipProcessor", "resample": 3, "rescale_factor": 0.00392156862745098,
                    "size": {"height": 224, "width": 224}}

METHODS = {
    "plain": [],
    "attentive-dual": ["model.mask.kind=attentive", "model.mask.block=2", "loss.contrastive_weight=0.5"],
    "random-lora": ["model.mask.kind=random", "model.finetune=lora"],
}
TIMING = {"epoch_time_s", "train_images_per_s", "train_images_per_s_per_process", "peak_mem_mb",
          "peak_mem_mb_per_process", "saliency_time_s"}
CLASSES = ["calling", "cycling"]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """family -> a checkpoint folder as the B/16 hub repo has it (random weights)."""
    root = tmp_path_factory.mktemp("b16")
    folders = {}
    for family, write_tokenizer, config_class, model_class, text, vision, processor in [
        ("clip", write_clip_tokenizer, CLIPConfig, CLIPModel, CLIP_TEXT, CLIP_VISION, CLIP_PROCESSOR),
        ("siglip", write_siglip_tokenizer, SiglipConfig, SiglipModel, SIGLIP_TEXT, SIGLIP_VISION, SIGLIP_PROCESSOR),
    ]:
        path = root / family
        path.mkdir()
        text = dict(text, **write_tokenizer(path, 300))  # a small vocabulary inside the real embedding table
        extra = {"projection_dim": 512} if family == "clip" else {}
        torch.manual_seed(0)
        model_class(config_class(text_config=text, vision_config=vision, **extra)).save_pretrained(path)
        (path / "preprocessor_config.json").write_text(json.dumps(processor))
        folders[family] = path
    yield folders
    shutil.rmtree(root, ignore_errors=True)  # 1.4 GB: not left for pytest's kept temporary directories


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """An image folder of HAR-sized JPEGs, both orientations: 4 per class, one of each held out."""
    sizes = [(160, 240), (240, 160), (183, 275), (300, 200)]
    items = [Item(f"{c}_{i}.jpg", c, blob) for k, c in enumerate(CLASSES)
             for i, blob in enumerate(har_like_jpeg_files(sizes, seed=k))]
    return write_imagefolder(tmp_path_factory.mktemp("photos"), items)


@pytest.mark.parametrize("family,tokens,patches", [("clip", 197, 196), ("siglip", 196, 196)])
def test_b16_loads_at_its_real_size_and_preprocessing(family, tokens, patches, hub):
    backbone = load_backbone(str(hub[family])).backbone.eval()
    pre = backbone.preprocess
    assert (pre.image_size, pre.resize, pre.interpolation) == (224, {"clip": "shortest_edge", "siglip": "squash"}[family],
                                                               "bicubic")
    assert pre.mean == tuple({"clip": CLIP_PROCESSOR, "siglip": SIGLIP_PROCESSOR}[family]["image_mean"])
    assert backbone.grid == 14 and backbone.feature_dim == 768 and len(backbone.encoder_layers) == 12
    with torch.no_grad():
        x = torch.randn(1, 3, 224, 224)
        assert backbone.embed(x).shape == (1, tokens, 768)
        assert backbone(x).shape == (1, 768)
    # ViT-B/16 vision towers: 85.8M parameters (CLIP), 92.9M with SigLIP's attention-pooling head.
    n = sum(p.numel() for p in backbone.tower.parameters())
    assert abs(n - {"clip": 85.8e6, "siglip": 92.9e6}[family]) < 0.1e6


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_b16_steps_evaluates_checkpoints_and_resumes_exactly(family, method, hub, photos, tmp_path):
    overrides = [f"model.backbone={hub[family]}", "data.source=imagefolder", f"data.path={photos}",
                 "data.val_fraction=0.25", "data.min_class_images=4", "train.epochs=1", "train.micro_batch=3", "train.eval_batch=4",
                 "train.checkpoint_every=1", "train.precision=fp32", "train.device=cpu",
                 "model.templates=['a photo of a person {}.']", *METHODS[method]]
    cfg = load_config(None, overrides)
    run = tmp_path / "run"
    run.mkdir()
    summary = train(cfg, run, show=False)
    records = MetricsLog.read(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [2] and summary["epochs"] == 1  # 6 training images, 3 per step
    assert json.loads((run / "eval.json").read_text())["images"] == 2
    if "mask.kind=random" in " ".join(METHODS[method]):
        assert records[0]["kept_tokens"] == 98  # half of the 14 x 14 patches
    if "mask.kind=attentive" in " ".join(METHODS[method]):
        assert records[0]["kept_tokens"] == 100  # A-CLIP's 25 of 49 cells of 2 x 2 patches
    if method == "random-lora":
        assert summary["trainable_params"] < 0.02 * summary["total_params"]

    # An exact resume from the checkpoint after the first step: the run as if killed there.
    finished = load_file(run / "checkpoints" / "last" / "model.safetensors")
    assert json.loads((run / "checkpoints" / "previous" / "state.json").read_text())["meta"]["step"] == 1
    for name in ("last", "best"):
        shutil.rmtree(run / "checkpoints" / name)
    (run / "checkpoints" / "previous").rename(run / "checkpoints" / "last")
    for name in ("summary.json", "eval.json"):
        (run / name).unlink()
    train(cfg, run, show=False, resume=True)
    again = load_file(run / "checkpoints" / "last" / "model.safetensors")
    assert again.keys() == finished.keys() and all(torch.equal(again[k], finished[k]) for k in finished)
    strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMING} for r in rs]
    assert strip(MetricsLog.read(run / "metrics.jsonl")) == strip(records)
    shutil.rmtree(run)  # a B/16 run with its checkpoints is 3 GB
