import pydantic
import re

import numpy as np
import pytest
import torch

from ichd_ray.training.augment import (
    AugmentConfig,
    IntensityParams,
    RandErase,
    RandIntensity,
    affine_matrices,
    augment_batch,
    warp,
)

ONLY_NONE = AugmentConfig.none()


def _none_with(**changes):
    """The do-nothing config with ``changes`` (validated)."""
    return AugmentConfig(**{**ONLY_NONE.model_dump(), **changes})


def _batch(b=4, s=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (b, 3, s, s), dtype=np.uint8)


# ---------------------------------------------------------------- config


def test_defaults_and_round_trip_through_dict():
    cfg = AugmentConfig()
    assert (cfg.hflip_p, cfg.vflip_p, cfg.rotate_deg, cfg.scale, cfg.shift) == (0.5, 0.0, 30.0, (0.9, 1.1), 0.1)
    assert (cfg.affine_p, cfg.brightness, cfg.contrast, cfg.intensity_p, cfg.erase_p) == (0.8, 0.1, (0.9, 1.1), 0.5, 0.0)
    d = cfg.to_dict()
    assert d["scale"] == [0.9, 1.1]  # JSON/YAML friendly
    assert AugmentConfig.from_dict(d) == cfg
    assert AugmentConfig.from_dict({"rotate_deg": 15}).rotate_deg == 15
    assert AugmentConfig.from_dict({}) == cfg


@pytest.mark.parametrize(
    "field, value",
    [
        ("hflip_p", 1.5),
        ("vflip_p", -0.1),
        ("affine_p", float("nan")),
        ("intensity_p", True),
        ("erase_p", "0.5"),
        ("rotate_deg", -1.0),
        ("rotate_deg", 181.0),
        ("shift", 1.5),
        ("brightness", -0.1),
        ("scale", (0.0, 1.0)),
        ("scale", (1.2, 1.1)),
        ("scale", (1.0,)),
        ("contrast", (-0.1, 1.0)),
        ("contrast", (1.1, 0.9)),
        ("erase_area", (0.0, 0.2)),
        ("erase_area", (0.1, 1.5)),
    ],
)
def test_bad_field_names_itself(field, value):
    with pytest.raises(ValueError, match=rf"augment\.{field}: expected"):
        AugmentConfig.from_dict({field: value})
    with pytest.raises(pydantic.ValidationError, match=field):  # built directly: pydantic's own error
        AugmentConfig(**{field: value})


def test_from_dict_rejects_unknown_and_non_mappings():
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['rotation'\]"):
        AugmentConfig.from_dict({"rotation": 10})
    with pytest.raises(ValueError, match="expected a mapping"):
        AugmentConfig.from_dict([("hflip_p", 1.0)])


def test_config_is_frozen():
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        AugmentConfig().hflip_p = 1.0


# ---------------------------------------------------------------- augment_batch basics


def test_identity_config_returns_exactly_the_input():
    images = _batch()
    out = augment_batch(images, ONLY_NONE, np.random.default_rng(1))
    assert out.dtype == np.uint8 and out.shape == images.shape
    np.testing.assert_array_equal(out, images)
    assert out is not images and not np.shares_memory(out, images)


def test_identity_ranges_with_probability_one_are_exact():
    # every step selected, but every drawn transform is the identity
    cfg = _none_with(affine_p=1.0, intensity_p=1.0)
    images = _batch()
    np.testing.assert_array_equal(augment_batch(images, cfg, np.random.default_rng(2)), images)


def test_hflip_and_vflip_with_probability_one():
    images = _batch()
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(augment_batch(images, _none_with(hflip_p=1.0), rng), images[..., ::-1])
    np.testing.assert_array_equal(augment_batch(images, _none_with(vflip_p=1.0), rng), images[..., ::-1, :])


def test_flip_probability_selects_samples():
    images = _batch(b=64, s=8)
    out = augment_batch(images, _none_with(hflip_p=0.5), np.random.default_rng(3))
    flipped = [np.array_equal(o, i[..., ::-1]) for o, i in zip(out, images)]
    same = [np.array_equal(o, i) for o, i in zip(out, images)]
    assert all(f != s for f, s in zip(flipped, same))  # each sample is one or the other
    assert 16 < sum(flipped) < 48


def test_affine_probability_zero_leaves_images_alone():
    cfg = _none_with(rotate_deg=30.0, scale=(0.8, 1.2), shift=0.2, affine_p=0.0)
    images = _batch()
    np.testing.assert_array_equal(augment_batch(images, cfg, np.random.default_rng(0)), images)


def test_seeded_rng_is_deterministic():
    images = _batch(b=8, s=48)
    cfg = AugmentConfig(erase_p=0.5, vflip_p=0.5)
    a = augment_batch(images, cfg, np.random.default_rng(123))
    b = augment_batch(images, cfg, np.random.default_rng(123))
    c = augment_batch(images, cfg, np.random.default_rng(124))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_chunking_does_not_change_the_result(monkeypatch):
    from ichd_ray.training import augment

    images = _batch(b=9, s=24)
    cfg = AugmentConfig(vflip_p=0.5, erase_p=0.5)
    whole = augment_batch(images, cfg, np.random.default_rng(7))
    monkeypatch.setattr(augment, "CHUNK_ELEMENTS", 2 * 3 * 24 * 24)  # 2 samples per chunk
    np.testing.assert_array_equal(augment_batch(images, cfg, np.random.default_rng(7)), whole)
    monkeypatch.setattr(augment, "CHUNK_ELEMENTS", 1)  # 1 sample per chunk
    np.testing.assert_array_equal(augment_batch(images, cfg, np.random.default_rng(7)), whole)


def test_input_is_not_modified():
    images = _batch(b=8, s=32)
    before = images.copy()
    cfg = AugmentConfig(hflip_p=1.0, vflip_p=1.0, affine_p=1.0, intensity_p=1.0, erase_p=1.0)
    out = augment_batch(images, cfg, np.random.default_rng(0))
    np.testing.assert_array_equal(images, before)
    assert not np.array_equal(out, images)


def test_empty_batch():
    empty = np.zeros((0, 3, 64, 64), dtype=np.uint8)
    out = augment_batch(empty, AugmentConfig(erase_p=1.0), np.random.default_rng(0))
    assert out.shape == (0, 3, 64, 64) and out.dtype == np.uint8


@pytest.mark.parametrize(
    "bad, text",
    [
        (np.zeros((2, 3, 8, 8), dtype=np.float32), "float32 [2, 3, 8, 8]"),
        (np.zeros((3, 8, 8), dtype=np.uint8), "uint8 [3, 8, 8]"),
        (np.zeros((2, 1, 8, 8), dtype=np.uint8), "uint8 [2, 1, 8, 8]"),
        (np.zeros((2, 8, 8, 3), dtype=np.uint8), "uint8 [2, 8, 8, 3]"),
    ],
)
def test_bad_images_name_dtype_and_shape(bad, text):
    with pytest.raises(ValueError, match=re.escape(f"expected uint8 [B, 3, H, W], got {text}")):
        augment_batch(bad, AugmentConfig(), np.random.default_rng(0))


def test_non_array_and_non_config_rejected():
    with pytest.raises(TypeError, match="numpy array"):
        augment_batch([[1]], AugmentConfig(), np.random.default_rng(0))
    with pytest.raises(TypeError, match="AugmentConfig"):
        augment_batch(_batch(), {"hflip_p": 1.0}, np.random.default_rng(0))


# ---------------------------------------------------------------- geometry


@pytest.mark.parametrize("size", [7, 8, 33])
def test_warp_90_degrees_equals_rot90(size):
    images = _batch(b=2, s=size)
    m = affine_matrices([90.0, -90.0], [1.0, 1.0], [[0.0, 0.0], [0.0, 0.0]])
    out = warp(images, m)
    np.testing.assert_array_equal(out[0], np.rot90(images[0], k=1, axes=(1, 2)))
    np.testing.assert_array_equal(out[1], np.rot90(images[1], k=-1, axes=(1, 2)))


def test_warp_180_degrees_equals_double_flip():
    images = _batch(b=1, s=10)
    out = warp(images, affine_matrices([180.0], [1.0], [[0.0, 0.0]]))
    np.testing.assert_array_equal(out, images[..., ::-1, ::-1])


def test_one_pixel_shift_moves_a_dot_by_one_pixel():
    s = 16
    images = np.zeros((2, 3, s, s), dtype=np.uint8)
    images[:, :, 5, 9] = 200
    out = warp(images, affine_matrices([0.0, 0.0], [1.0, 1.0], [[1 / s, 0.0], [0.0, -1 / s]]))
    right = np.zeros((3, s, s), dtype=np.uint8)
    right[:, 5, 10] = 200
    up = np.zeros((3, s, s), dtype=np.uint8)
    up[:, 4, 9] = 200
    np.testing.assert_array_equal(out[0], right)
    np.testing.assert_array_equal(out[1], up)


def test_half_pixel_shift_interpolates_bilinearly():
    images = np.zeros((1, 3, 8, 8), dtype=np.uint8)
    images[:, :, 3, 3] = 200
    out = warp(images, affine_matrices([0.0], [1.0], [[0.5 / 8, 0.0]]))
    assert out[0, 0, 3, 3] == 100 and out[0, 0, 3, 4] == 100 and int(out.sum()) == 3 * 200


def test_rotation_on_a_rectangle_is_isotropic_in_pixels():
    # 8 x 16: centre at pixel (3.5, 7.5); the dot at (row 3, col 9) is 1.5 right, 0.5 up of it;
    # a 90 degree counter-clockwise turn puts it 1.5 up, 0.5 left: (row 2, col 7).
    images = np.zeros((1, 3, 8, 16), dtype=np.uint8)
    images[:, :, 3, 9] = 255
    out = warp(images, affine_matrices([90.0], [1.0], [[0.0, 0.0]], aspect=16 / 8))
    expected = np.zeros_like(images)
    expected[:, :, 2, 7] = 255
    np.testing.assert_array_equal(out, expected)


def test_scale_two_enlarges_about_the_centre():
    s = 16
    images = np.zeros((1, 3, s, s), dtype=np.uint8)
    images[:, :, 6:10, 6:10] = 255  # 4 x 4 centred square
    out = warp(images, affine_matrices([0.0], [2.0], [[0.0, 0.0]]))
    bright = np.argwhere(out[0, 0] == 255)
    assert bright.min(axis=0).tolist() == [5, 5] and bright.max(axis=0).tolist() == [10, 10]


def test_padding_is_zero_outside():
    images = np.full((1, 3, 32, 32), 255, dtype=np.uint8)
    out = warp(images, affine_matrices([45.0], [1.0], [[0.0, 0.0]]))
    assert out[0, :, 0, 0].tolist() == [0, 0, 0] and out[0, :, 16, 16].tolist() == [255, 255, 255]


def test_warp_float_tensor_and_matrix_shape_check():
    x = torch.zeros((1, 3, 4, 4))
    assert warp(x, affine_matrices([0.0], [1.0], [[0.0, 0.0]])).dtype == torch.float32
    with pytest.raises(ValueError, match=r"expected matrices \[1, 2, 3\]"):
        warp(_batch(b=1, s=4), np.zeros((2, 2, 3)))
    with pytest.raises(ValueError, match="scales must be > 0"):
        affine_matrices([0.0], [0.0], [[0.0, 0.0]])


def test_random_affine_keeps_dtype_shape_and_moves_content():
    images = _batch(b=8, s=32)
    cfg = _none_with(rotate_deg=30.0, scale=(0.9, 1.1), shift=0.1, affine_p=1.0)
    out = augment_batch(images, cfg, np.random.default_rng(0))
    assert out.dtype == np.uint8 and out.shape == images.shape
    assert all(not np.array_equal(o, i) for o, i in zip(out, images))


# ---------------------------------------------------------------- intensity


def test_brightness_adds_a_tenth_of_255_and_clips():
    x = torch.tensor([0.0, 100.0, 240.0, 255.0]).view(1, 1, 1, 4).expand(1, 3, 1, 4).contiguous()
    params = IntensityParams(np.array([True]), np.array([0.1 * 255.0]), np.array([1.0]))
    y = RandIntensity().apply(x, params)
    np.testing.assert_allclose(y[0, 0, 0].numpy(), [25.5, 125.5, 265.5, 280.5])
    images = np.full((16, 3, 4, 4), 100, dtype=np.uint8)
    images[:, :, 0, 0] = 250
    cfg = _none_with(brightness=0.1, intensity_p=1.0)
    out = augment_batch(images, cfg, np.random.default_rng(0)).astype(int)
    offset = out[:, :, 1:, 1:] - 100
    assert np.all(offset == offset[:, :1, :1, :1]) and np.abs(offset).max() <= 26  # one offset per image
    assert (offset[:, 0, 0, 0] > 5).any()
    assert out.max() <= 255 and np.all(out[offset[:, 0, 0, 0] > 5, :, 0, 0] == 255)  # clipped, no wrap


def test_contrast_keeps_the_mean_and_shares_the_factor_across_windows():
    rng = np.random.default_rng(0)
    images = rng.integers(80, 176, (8, 3, 32, 32), dtype=np.uint8)
    images[:, 1] = images[:, 1] // 2 + 40  # channels with different means / spreads
    cfg = _none_with(contrast=(0.5, 1.5), intensity_p=1.0)
    out = augment_batch(images, cfg, np.random.default_rng(1))
    mean_in = images.mean(axis=(2, 3))
    mean_out = out.astype(float).mean(axis=(2, 3))
    np.testing.assert_allclose(mean_out, mean_in, atol=0.5)
    ratio = out.astype(float).std(axis=(2, 3)) / images.std(axis=(2, 3))
    np.testing.assert_allclose(ratio, ratio[:, :1].repeat(3, axis=1), atol=0.02)
    assert ratio.min() < 0.9 and ratio.max() > 1.1


def test_intensity_probability_selects_samples():
    images = np.full((64, 3, 4, 4), 100, dtype=np.uint8)
    cfg = _none_with(brightness=0.5, intensity_p=0.25)
    out = augment_batch(images, cfg, np.random.default_rng(5))
    changed = (out != images).any(axis=(1, 2, 3)).sum()
    assert 4 < changed < 32


# ---------------------------------------------------------------- erasing


def test_erase_sets_one_rectangle_to_zero():
    s = 64
    images = np.full((32, 3, s, s), 255, dtype=np.uint8)
    out = augment_batch(images, _none_with(erase_p=1.0), np.random.default_rng(0))
    for sample in out:
        assert np.array_equal(sample[0] == 0, sample[1] == 0) and np.array_equal(sample[0] == 0, sample[2] == 0)
        zeros = np.argwhere(sample[0] == 0)
        (y0, x0), (y1, x1) = zeros.min(axis=0), zeros.max(axis=0) + 1
        assert len(zeros) == (y1 - y0) * (x1 - x0)  # a full rectangle
        assert 0.015 <= len(zeros) / s**2 <= 0.21
        assert np.all(sample[:, :y0] == 255) and np.all(sample[:, y1:] == 255)


def test_erase_boxes_stay_inside_the_image():
    eraser = RandErase(p=1.0, area=(0.2, 1.0))
    params = eraser.randomize(500, np.random.default_rng(0))
    box = RandErase.boxes(params, 12, 40)
    assert (box[:, :2] >= 0).all() and (box[:, 2] <= 12).all() and (box[:, 3] <= 40).all()
    assert (box[:, 2] > box[:, 0]).all() and (box[:, 3] > box[:, 1]).all()
