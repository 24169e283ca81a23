"""Hounsfield units -> three CT windows as uint8 channels (the reference path).

The three default windows are the 1st-place RSNA 2019 recipe: brain (L40/W80), subdural (L80/W200),
bone (L600/W2800). Each channel is ``rint(clip((hu - (L - W/2)) / W, 0, 1) * 255)`` with numpy's
round-half-to-even. With ``size`` the HU image is first area-resized (every output pixel is the
mean of the input area it covers), then windowed: averaging before windowing is what makes the
fast path in :mod:`ichd_ray.dicom.preprocess` possible (sum stored values, then one table look-up).

This module is the readable definition; :func:`ichd_ray.dicom.preprocess.preprocess_slice` is the
fast one the pipelines call, and the tests hold the two within +-1.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np

__all__ = [
    "WindowSpec",
    "DEFAULT_WINDOWS",
    "DEFAULT_NORMALIZATION",
    "Normalization",
    "area_resize",
    "apply_windows",
    "window_slice",
    "windows_from_config",
]


@dataclass(frozen=True)
class WindowSpec:
    """One CT display window.

    Args:
        name: channel name, e.g. ``"brain"``.
        level: window centre in HU.
        width: window width in HU (> 0).
    """

    name: str
    level: float
    width: float

    def __post_init__(self) -> None:
        if not self.width > 0:
            raise ValueError(f"window {self.name!r}: width must be > 0, got {self.width}")

    @property
    def low(self) -> float:
        return self.level - self.width / 2.0

    def to_dict(self) -> dict:
        return {"name": self.name, "level": self.level, "width": self.width}


DEFAULT_WINDOWS: tuple[WindowSpec, ...] = (
    WindowSpec("brain", 40.0, 80.0),
    WindowSpec("subdural", 80.0, 200.0),
    WindowSpec("bone", 600.0, 2800.0),
)


@dataclass(frozen=True)
class Normalization:
    """Per-channel normalisation applied on the device: ``(x / 255 - mean) / std``.

    Pixels travel as uint8 and are normalised where the model runs; the values travel in the
    model bundle's config so training and scoring agree. Defaults are ImageNet's, which the
    timm backbones expect.

    Args:
        mean: per-channel mean on the [0, 1] scale.
        std: per-channel standard deviation on the [0, 1] scale.
    """

    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def to_dict(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std)}


DEFAULT_NORMALIZATION = Normalization()


def windows_from_config(items: Sequence[dict] | None) -> tuple[WindowSpec, ...]:
    """Window specs from a config list of ``{name, level, width}``; the defaults when empty."""
    if not items:
        return DEFAULT_WINDOWS
    specs = []
    for i, item in enumerate(items):
        missing = {"name", "level", "width"} - set(item)
        if missing:
            raise ValueError(f"windows[{i}]: missing {sorted(missing)}; each window needs name, level, width")
        specs.append(WindowSpec(str(item["name"]), float(item["level"]), float(item["width"])))
    return tuple(specs)


@lru_cache(maxsize=64)
def _area_weights(n_in: int, n_out: int) -> np.ndarray:
    """Matrix W (n_out x n_in) with W[i, j] = share of input cell j inside output cell i, rows sum to 1."""
    edges_out = np.arange(n_out + 1, dtype=np.float64) * (n_in / n_out)
    lo = np.maximum(edges_out[:-1, None], np.arange(n_in)[None, :])
    hi = np.minimum(edges_out[1:, None], np.arange(1, n_in + 1)[None, :])
    weights = np.clip(hi - lo, 0.0, None)
    weights /= weights.sum(axis=1, keepdims=True)
    weights.setflags(write=False)
    return weights


def area_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Area resize of a 2-D image to ``size x size``: each output pixel is the mean of the
    input area it covers (OpenCV's INTER_AREA when shrinking; piecewise constant when growing).

    Args:
        image: 2-D array (H, W).
        size: output side length in pixels.

    Returns:
        float64 array (size, size).
    """
    if image.ndim != 2:
        raise ValueError(f"area_resize expects a 2-D image, got shape {image.shape}")
    h, w = image.shape
    img = np.asarray(image, dtype=np.float64)
    if (h, w) == (size, size):
        return img.copy()
    if h % size == 0 and w % size == 0:
        fh, fw = h // size, w // size
        return img.reshape(size, fh, size, fw).mean(axis=(1, 3))
    return _area_weights(h, size) @ img @ _area_weights(w, size).T


def apply_windows(hu: np.ndarray, windows: Sequence[WindowSpec] = DEFAULT_WINDOWS) -> np.ndarray:
    """Window an HU image into uint8 channels, no resizing.

    Args:
        hu: (H, W) Hounsfield units, any float or integer dtype.
        windows: the window specs, one per output channel.

    Returns:
        uint8 array (len(windows), H, W).
    """
    hu64 = np.asarray(hu, dtype=np.float64)
    out = np.empty((len(windows),) + hu64.shape, dtype=np.uint8)
    for c, win in enumerate(windows):
        scaled = np.clip((hu64 - win.low) / win.width, 0.0, 1.0) * 255.0
        out[c] = np.rint(scaled)
    return out


def window_slice(
    hu: np.ndarray, size: int | None = None, windows: Sequence[WindowSpec] = DEFAULT_WINDOWS
) -> np.ndarray:
    """HU slice -> uint8 [C, H, W] (C = 3 with the default windows).

    Args:
        hu: (H, W) Hounsfield units.
        size: when given, area-resize HU to ``size x size`` first, then window.
        windows: window specs; default brain 40/80, subdural 80/200, bone 600/2800.

    Returns:
        uint8 array (len(windows), H, W) or (len(windows), size, size).
    """
    if size is not None:
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        hu = area_resize(hu, size)
    return apply_windows(hu, windows)
