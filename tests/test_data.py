import numpy as np
import pytest
import torch

from vlfit.config import DataConfig
from vlfit.data import ImageSet, load_split, stratified_split, train_transform
from vlfit.data.gpu_transforms import DecodedImages, EvalResize
from vlfit.data.sources import TransformedImages
from vlfit.errors import UserError
from vlfit.models import Preprocess

CLIP_PRE = Preprocess(image_size=32, mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711))
SIGLIP_PRE = Preprocess(image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, resize="squash")


def test_split_is_stratified_disjoint_and_complete():
    labels = np.repeat(np.arange(5), [40, 40, 20, 60, 40])
    split = stratified_split(labels, 0.25, seed=42)
    assert set(split.train).isdisjoint(split.val)
    assert sorted([*split.train, *split.val]) == list(range(len(labels)))
    assert np.bincount(labels[split.val]).tolist() == [10, 10, 5, 15, 10]


def test_split_depends_only_on_seed():
    labels = np.repeat(np.arange(3), 50)
    a, b, c = (stratified_split(labels, 0.2, s) for s in (1, 1, 2))
    assert np.array_equal(a.val, b.val) and not np.array_equal(a.val, c.val)


def test_split_round_trips_through_ids(tmp_path):
    labels = np.repeat(np.arange(3), 10)
    images = ImageSet([np.zeros((4, 4, 3), np.uint8)] * 30, labels, ["a", "b", "c"], [f"img{i}" for i in range(30)])
    split = stratified_split(labels, 0.3, seed=0)
    split.save(tmp_path / "split.json", images)
    again = load_split(tmp_path / "split.json", images)
    assert np.array_equal(again.train, split.train) and np.array_equal(again.val, split.val)
    renamed = ImageSet(images.images, labels, images.classes, [f"other{i}" for i in range(30)])
    with pytest.raises(UserError, match="not in the dataset"):
        load_split(tmp_path / "split.json", renamed)


@pytest.mark.parametrize("pre", [CLIP_PRE, SIGLIP_PRE], ids=["clip", "siglip"])
def test_eval_transform_gives_normalised_square(pre):
    image = np.full((48, 80, 3), 255, dtype=np.uint8)  # white, not square
    transform = EvalResize(pre)
    batch, _ = DecodedImages([image], np.zeros(1), transform, limit=64).__getitems__([0])
    out = transform(batch)
    assert out.shape == (1, 3, 32, 32) and out.dtype == torch.float32
    expected = (1 - torch.tensor(pre.mean)) / torch.tensor(pre.std)
    torch.testing.assert_close(out[0].mean(dim=(1, 2)), expected, rtol=1e-4, atol=1e-4)


def test_train_transform_is_random_but_seedable():
    image = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
    t = train_transform(CLIP_PRE, DataConfig())
    torch.manual_seed(0)
    a = t(image)
    torch.manual_seed(0)
    b = t(image)
    c = t(image)
    assert a.shape == (3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)


def test_transformed_images_yields_tensor_and_label():
    images = ImageSet([np.full((40, 30, 3), 7, np.uint8)], np.array([3]), list("abcd"), ["x"])
    pixels, label = TransformedImages(images, train_transform(CLIP_PRE, DataConfig()))[0]
    assert pixels.shape == (3, 32, 32) and label == 3
