import numpy as np
import pytest

from ichd_ray.dicom.windowing import (
    DEFAULT_WINDOWS,
    WindowSpec,
    apply_windows,
    area_resize,
    window_slice,
    windows_from_config,
)


def test_default_windows_are_the_first_place_recipe():
    assert [(w.name, w.level, w.width) for w in DEFAULT_WINDOWS] == [
        ("brain", 40, 80),
        ("subdural", 80, 200),
        ("bone", 600, 2800),
    ]


def test_known_hu_give_known_bytes():
    hu = np.array([[-1000.0, 0.0, 2.0, 40.0, 80.0, 600.0, 2000.0, 5000.0]], dtype=np.float32)
    out = window_slice(hu)
    assert out.dtype == np.uint8 and out.shape == (3, 1, 8)
    # brain: (hu - 0) / 80 * 255; 40 -> 127.5 -> 128 (half to even), 2 -> 6.375 -> 6
    assert out[0, 0].tolist() == [0, 0, 6, 128, 255, 255, 255, 255]
    # subdural: (hu + 20) / 200 * 255; 80 -> 127.5 -> 128; 40 -> 76.5 -> 76; 0 -> 25.5 -> 26
    assert out[1, 0].tolist() == [0, 26, 28, 76, 128, 255, 255, 255]
    # bone: (hu + 800) / 2800 * 255; 600 -> 127.5 -> 128; 2000 -> 255; -1000 clips to 0
    assert out[2, 0].tolist() == [0, 73, 73, 76, 80, 128, 255, 255]


def test_round_half_to_even():
    # hu such that the scaled value is exactly k + 0.5
    spec = WindowSpec("unit", level=127.5, width=255.0)  # value = hu exactly
    out = apply_windows(np.array([[0.5, 1.5, 2.5, 3.5]]), [spec])
    assert out[0, 0].tolist() == [0, 2, 2, 4]


def test_area_resize_integer_factor_is_block_mean():
    img = np.arange(16, dtype=np.float32).reshape(4, 4)
    out = area_resize(img, 2)
    assert out.tolist() == [[2.5, 4.5], [10.5, 12.5]]


def test_area_resize_fractional_factor_weights_overlap():
    img = np.tile(np.array([0.0, 3.0, 6.0]), (3, 1))  # columns 0, 3, 6
    out = area_resize(img, 2)
    # cell 0 covers [0, 1.5): (0 * 1 + 3 * 0.5) / 1.5 = 1; cell 1 covers [1.5, 3): (3 * .5 + 6) / 1.5 = 5
    np.testing.assert_allclose(out, [[1.0, 5.0], [1.0, 5.0]])


def test_area_resize_preserves_mean_when_upsampling():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(5, 5))
    out = area_resize(img, 7)
    assert out.shape == (7, 7)
    np.testing.assert_allclose(out.mean(), img.mean(), rtol=1e-9, atol=1e-12)


def test_window_slice_resizes_hu_before_windowing():
    hu = np.zeros((4, 4), dtype=np.float32)
    hu[:2, :2] = [[0, 80], [0, 80]]  # block mean 40 -> brain 128; windowing first would give 127.5 too
    hu[2:, 2:] = [[-1000, 80], [80, 80]]  # mean -150 -> brain 0 (windowing first: 191)
    out = window_slice(hu, 2)
    assert out.shape == (3, 2, 2)
    assert out[0].tolist() == [[128, 0], [0, 0]]


def test_bad_window_and_size_rejected():
    with pytest.raises(ValueError, match="width"):
        WindowSpec("x", 0, 0)
    with pytest.raises(ValueError, match="size"):
        window_slice(np.zeros((4, 4)), 0)
    with pytest.raises(ValueError, match="missing"):
        windows_from_config([{"name": "brain", "level": 40}])
    assert windows_from_config(None) == DEFAULT_WINDOWS
    assert windows_from_config([{"name": "soft", "level": 40, "width": 380}])[0].low == -150
