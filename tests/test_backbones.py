import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPVisionModel, SiglipVisionModel

from vlfit.errors import UserError
from vlfit.models import PRESETS, ImageClassifier, build_backbone, classifier_from_architecture


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_forward_backward(name):
    backbone = build_backbone(name)
    model = ImageClassifier(backbone, num_classes=15)
    size = backbone.preprocess.image_size
    logits = model(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 15)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_pooled_output_equals_transformers(name):
    backbone = build_backbone(name).eval()
    size = backbone.preprocess.image_size
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        ours = backbone(x)
        theirs = backbone.tower(pixel_values=x).pooler_output
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_presets_normalise_like_their_families():
    clip, siglip = build_backbone("tiny-clip").preprocess, build_backbone("tiny-siglip").preprocess
    assert clip.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073)) and clip.resize == "shortest_edge"
    assert siglip.mean == (0.5, 0.5, 0.5) and siglip.std == (0.5, 0.5, 0.5) and siglip.resize == "squash"


@pytest.mark.parametrize("fixture,hf_class", [("clip_dir", CLIPVisionModel), ("siglip_dir", SiglipVisionModel)])
def test_from_pretrained_loads_saved_weights(fixture, hf_class, request):
    path = request.getfixturevalue(fixture)
    backbone = build_backbone(str(path)).eval()
    saved = load_file(path / "model.safetensors")
    ours = {f"vision_model.{k}": v for k, v in backbone.tower.state_dict().items()}
    vision_keys = [k for k in saved if k.startswith("vision_model.")]
    assert vision_keys and all(torch.equal(ours[k], saved[k]) for k in vision_keys)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = hf_class.from_pretrained(path).eval()(pixel_values=x).pooler_output
        torch.testing.assert_close(backbone(x), reference)


def test_preprocessing_is_read_from_processor_config(clip_dir, siglip_dir):
    clip = build_backbone(str(clip_dir)).preprocess
    assert clip.mean == pytest.approx((0.1, 0.2, 0.3)) and clip.std == pytest.approx((0.4, 0.5, 0.6))
    assert clip.image_size == 32 and clip.resize == "shortest_edge"
    siglip = build_backbone(str(siglip_dir)).preprocess
    assert siglip.resize == "squash" and siglip.image_size == 32


def test_architecture_round_trip_rebuilds_same_function(clip_dir):
    model = ImageClassifier(build_backbone(str(clip_dir)), num_classes=4).eval()
    rebuilt = classifier_from_architecture(model.architecture()).eval()
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))
    assert rebuilt.backbone.preprocess == model.backbone.preprocess


def test_unusable_backbone_names_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not a preset"):
        build_backbone(str(tmp_path / "does-not-exist"))
    with pytest.raises(UserError, match="cannot load"):
        build_backbone(str(tmp_path))  # a directory with no config.json
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(UserError, match="not supported"):
        build_backbone(str(tmp_path))
