"""synthetic-har generator: shapes, determinism, class balance, argument checks, learnability."""

from __future__ import annotations

import numpy as np
import pytest

from vlfit.data.synthetic import HAR_CLASSES, make_synthetic_har


def test_har_classes_are_the_fifteen_actions_in_order():
    assert HAR_CLASSES == (
        "calling", "clapping", "cycling", "dancing", "drinking", "eating", "fighting", "hugging",
        "laughing", "listening_to_music", "running", "sitting", "sleeping", "texting",
        "using_laptop",
    )


@pytest.mark.parametrize("num_images, image_size", [(1, 16), (7, 32), (20, 96), (3, 131)])
def test_shapes_dtypes_and_range(num_images, image_size):
    images, labels = make_synthetic_har(num_images, image_size, seed=3)
    assert images.shape == (num_images, image_size, image_size, 3)
    assert images.dtype == np.uint8
    assert labels.shape == (num_images,)
    assert labels.dtype == np.int64
    assert labels.min() >= 0 and labels.max() < len(HAR_CLASSES)


def test_images_are_not_blank():
    images, _ = make_synthetic_har(30, 64, seed=0)
    # Every image has a drawn scene plus noise, so it spans a real range of values.
    spread = images.reshape(len(images), -1).astype(int)
    assert ((spread.max(axis=1) - spread.min(axis=1)) > 60).all()
    assert not np.array_equal(images[0], images[1])


def test_same_seed_gives_identical_arrays():
    a_images, a_labels = make_synthetic_har(45, 48, seed=11)
    b_images, b_labels = make_synthetic_har(45, 48, seed=11)
    np.testing.assert_array_equal(a_images, b_images)
    np.testing.assert_array_equal(a_labels, b_labels)


def test_different_seeds_give_different_arrays():
    a_images, a_labels = make_synthetic_har(45, 48, seed=0)
    b_images, b_labels = make_synthetic_har(45, 48, seed=1)
    assert not np.array_equal(a_images, b_images)
    assert not np.array_equal(a_labels, b_labels)


def test_generation_leaves_global_random_state_alone():
    np.random.seed(123)
    expected = np.random.random(3)
    np.random.seed(123)
    make_synthetic_har(5, 32, seed=0)
    np.testing.assert_array_equal(np.random.random(3), expected)


@pytest.mark.parametrize("num_images", [1, 14, 15, 31, 2000])
def test_classes_are_balanced(num_images):
    _, labels = make_synthetic_har(num_images, 16, seed=5)
    counts = np.bincount(labels, minlength=len(HAR_CLASSES))
    assert counts.sum() == num_images
    assert counts.max() - counts.min() <= 1
    if num_images >= len(HAR_CLASSES):
        assert (counts > 0).all()


def test_label_order_is_shuffled():
    _, labels = make_synthetic_har(60, 16, seed=0)
    assert not np.array_equal(labels, np.arange(60) % len(HAR_CLASSES))


@pytest.mark.parametrize("kwargs, name", [
    (dict(num_images=0), "num_images"),
    (dict(num_images=-3), "num_images"),
    (dict(num_images=4, image_size=15), "image_size"),
    (dict(num_images=4, image_size=0), "image_size"),
    (dict(num_images=4, seed=-1), "seed"),
])
def test_invalid_arguments_raise_value_error_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        make_synthetic_har(**kwargs)


@pytest.mark.parametrize("kwargs", [dict(num_images=2.5), dict(num_images=4, image_size="96"),
                                    dict(num_images=True)])
def test_non_integer_arguments_raise_type_error(kwargs):
    with pytest.raises(TypeError):
        make_synthetic_har(**kwargs)


def test_numpy_integers_are_accepted():
    images, _ = make_synthetic_har(np.int64(2), np.int32(20), seed=np.uint8(1))
    assert images.shape == (2, 20, 20, 3)


def _edge_features(images: np.ndarray, side: int = 24) -> np.ndarray:
    """Gradient magnitudes of box-downsampled grayscale images, standardised per image.

    Edges rather than raw pixels because figure and backdrop colours are random per image: a
    class shows up as where its strokes are, not as which colours they have.
    """
    n, size = len(images), images.shape[1]
    k = size // side
    gray = images[:, : side * k, : side * k].astype(np.float32).mean(axis=3)
    small = gray.reshape(n, side, k, side, k).mean(axis=(2, 4))
    gx = np.abs(np.diff(small, axis=2))[:, :-1, :]
    gy = np.abs(np.diff(small, axis=1))[:, :, :-1]
    features = np.concatenate([gx.reshape(n, -1), gy.reshape(n, -1)], axis=1)
    features -= features.mean(axis=1, keepdims=True)
    features /= features.std(axis=1, keepdims=True) + 1e-6
    return features


def test_classes_are_learnable_but_not_trivial():
    images, labels = make_synthetic_har(750, 48, seed=7)
    features = _edge_features(images)
    train, test = slice(0, 600), slice(600, None)
    means = np.stack([features[train][labels[train] == c].mean(axis=0)
                      for c in range(len(HAR_CLASSES))])
    distances = ((features[test, None, :] - means[None]) ** 2).sum(axis=2)
    accuracy = (distances.argmin(axis=1) == labels[test]).mean()
    chance = 1 / len(HAR_CLASSES)
    # A nearest-class-mean on edges is a weak learner: it should beat chance clearly (shapes
    # carry the class) without coming close to perfect (the nuisance variation is real).
    assert 2.5 * chance < accuracy < 0.8, accuracy
