"""The model sees the pixels its own image processor and torchvision would give it, at the real 224-px size.

Every number here is measured against an independent reference (transformers' image processors,
torchvision's resize and crop), on HAR-like JPEGs of both orientations and on 1/f noise.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fidelity import har_like_jpegs, high_frequency_ratio, pink_noise, processors, psnr, to_pixels
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from vlfit.config import load_config
from vlfit.data import ImageSet
from vlfit.data.cache import open_cache
from vlfit.data.gpu_transforms import CROP_DRAWS, CachedImages, DecodedImages, EvalResize, TrainAugment, sample_crop_boxes
from vlfit.data.loaders import stored_limit
from vlfit.data.resample import Axis, axis_weights, image_products, padded_products, reach, resample
from vlfit.models.backbones import ClipBackbone, Preprocess, SiglipBackbone
from vlfit.resume import sample_uniforms

CFG = load_config(None)  # default data settings: crop scale (0.5, 1)
FAMILIES = {"clip": ClipBackbone, "siglip": SiglipBackbone}
KINDS = {"har": har_like_jpegs, "noise": pink_noise,
         "large": lambda: pink_noise([(900, 1400), (1400, 900)])}  # larger than the cache keeps: shrunk once


@pytest.fixture(scope="module")
def images():
    return {kind: make() for kind, make in KINDS.items()}


def pre_of(family: str) -> Preprocess:
    return Preprocess(image_size=224, **FAMILIES[family].default_preprocess)


def cache_of(images, pre, root):
    ids = [f"{i}/{im.shape}/{int(im.sum())}" for i, im in enumerate(images)]
    return open_cache(ImageSet(images, np.zeros(len(images), int), ["a"], ids), stored_limit(CFG, pre),
                      pre.interpolation, root, show=False)


def through(dataset, transform):
    batch, _ = dataset.__getitems__(list(range(len(dataset))))
    return transform(batch)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_evaluation_inputs_match_the_backbones_own_processor(family, kind, images, tmp_path):
    pre, ims = pre_of(family), images[kind]
    transform = EvalResize(pre)
    from_cache = through(CachedImages(cache_of(ims, pre, tmp_path), np.arange(len(ims)), np.zeros(len(ims)),
                                      transform), transform)
    decoded = through(DecodedImages(ims, np.zeros(len(ims)), transform, stored_limit(CFG, pre)), transform)
    assert from_cache.shape == (len(ims), 3, 224, 224)
    torch.testing.assert_close(decoded, from_cache)  # predict's path is validation's path
    found = processors(family)
    assert found, "transformers has no image processor for " + family
    for name, processor in found.items():
        reference = processor(images=ims, return_tensors="pt")["pixel_values"]
        for i, (ours, theirs) in enumerate(zip(from_cache, reference)):
            a, b = to_pixels(ours, pre.mean, pre.std), to_pixels(theirs, pre.mean, pre.std)
            assert psnr(a, b) >= 40, (name, ims[i].shape)
            assert high_frequency_ratio(a, b) >= 0.9, (name, ims[i].shape)


@pytest.mark.parametrize("kind", list(KINDS))
def test_training_crops_match_torchvisions_random_resized_crop(kind, images, tmp_path):
    pre, ims = pre_of("clip"), images[kind]
    n = len(ims)
    cache = cache_of(ims, pre, tmp_path)
    augment = TrainAugment(pre, CFG.data.crop_scale, CFG.data.crop_ratio, 0.5)
    dataset = CachedImages(cache, np.arange(n), np.zeros(n), augment, seed=3)
    ours = through(dataset, augment)
    # The boxes and flips this batch drew, redrawn from the same uniforms, applied by torchvision to the originals.
    u = torch.from_numpy(sample_uniforms(3, dataset.epoch.get(), list(range(n)), augment.draws))
    boxes = sample_crop_boxes(torch.tensor(cache.sizes), CFG.data.crop_scale, CFG.data.crop_ratio,
                              u[:, :CROP_DRAWS]).long().tolist()
    flips = (u[:, CROP_DRAWS] < 0.5).tolist()
    assert any(flips) and not all(flips)
    for i, ((x0, y0, x1, y1), flip) in enumerate(zip(boxes, flips)):
        crop = TF.resized_crop(torch.from_numpy(ims[i]).permute(2, 0, 1), y0, x0, y1 - y0, x1 - x0, [224, 224],
                               InterpolationMode.BICUBIC, antialias=True)
        theirs = TF.normalize(TF.to_dtype(crop.flip(-1) if flip else crop, torch.float32, scale=True),
                              list(pre.mean), list(pre.std))
        a, b = to_pixels(ours[i], pre.mean, pre.std), to_pixels(theirs, pre.mean, pre.std)
        assert psnr(a, b) >= 40, (i, ims[i].shape, (x0, y0, x1, y1))
        assert high_frequency_ratio(a, b) >= 0.9, (i, ims[i].shape)


@pytest.mark.parametrize("kernel,mode", [("bicubic", "bicubic"), ("bilinear", "bilinear")])
def test_resampling_is_torchvisions_antialiased_resize(kernel, mode):
    rng = np.random.default_rng(0)
    sizes = [(50, 37), (160, 240), (480, 300)]  # up, up and down, down
    ims = [torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8)) for h, w in sizes]
    h, w = (torch.tensor([s[k] for s in sizes], dtype=torch.float64) for k in (0, 1))
    zero = torch.zeros(3, dtype=torch.float64)
    ours = resample(ims, Axis(zero, h / 96, zero, h), Axis(zero, w / 96, zero, w), 96, kernel)
    for x, im in zip(ours, ims):
        theirs = F.interpolate(im[None].double(), size=(96, 96), mode=mode, antialias=True)[0]
        assert (x - theirs.clamp(0, 255).round()).abs().max() <= 1  # the same sums, rounded


def test_batched_and_per_image_products_agree():
    """The GPU schedule (padded, batched) computes what the CPU schedule (image by image, over the pixels
    each crop uses) computes, and the weights are those of every source pixel, not just the taps near each."""
    rng = np.random.default_rng(1)
    ims = [torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8)) for h, w in [(30, 70), (64, 20), (45, 45)]]
    h, w = (torch.tensor([float(im.shape[k]) for im in ims], dtype=torch.float64) for k in (1, 2))
    rows = Axis(h * 0.1, h * 0.7 / 32, h * 0.1, h * 0.8)
    cols = Axis(w * 0.2, w * 0.5 / 32, w * 0.2, w * 0.7).reversed(torch.tensor([True, False, True]), 32)
    (wy, used_y), (wx, used_x) = axis_weights(rows, 32, 64, reach(rows)), axis_weights(cols, 32, 70, reach(cols))
    assert torch.allclose(wy.sum(-1), torch.ones(3, 32)) and (wy[0, :, 30:] == 0).all()  # no weight on padding
    nonzero = (wy[0] != 0).any(0).nonzero()
    assert used_y[0, 0] > 0 and used_y[0, 0] <= nonzero.min() and nonzero.max() < used_y[0, 1]  # the crop's rows
    dense, _ = axis_weights(rows, 32, 64, taps=64)  # every pixel evaluated: the same weights
    torch.testing.assert_close(dense, wy)
    torch.testing.assert_close(padded_products(ims, wy, wx), image_products(ims, wy, wx, used_y, used_x),
                               atol=1e-3, rtol=1e-5)
