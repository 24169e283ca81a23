"""The per-slice 2D CNN: a timm backbone, a pooled embedding and a 6-way multi-label head.

Pixels arrive as the uint8 windows that preprocessing produced ([N, 3, H, W]); the normalisation
``(x / 255 - mean) / std`` is part of the model (non-persistent buffers), so it runs on the device
and a bundle's ``config.json`` is the one place that records it. The pooled pre-logit features are
the embeddings the sequence model consumes (1st-place RSNA 2019 recipe, see ``RECIPES.md``).

Backbones are always built with ``pretrained=False``: nothing is ever downloaded. Pretrained weights
come from a local ``.safetensors`` file in timm's key layout (``pretrained_path``).
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

import timm
import torch
from safetensors.torch import load_file
from torch import nn

from ichd_ray.dicom.windowing import DEFAULT_NORMALIZATION

__all__ = ["SliceCNN", "load_backbone_weights"]

logger = logging.getLogger(__name__)

_SHOW = 8  # key names listed in an error before "... and N more"


def _listing(keys: Sequence[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_SHOW])
    return shown if len(keys) <= _SHOW else f"{shown}, ... and {len(keys) - _SHOW} more"


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Key prefixes of the classifier that ``num_classes=0`` removed (timm names it in pretrained_cfg)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") or ()
    if isinstance(names, str):
        names = (names,)
    return tuple(f"{name}." for name in names)


def load_backbone_weights(backbone: nn.Module, path: str | os.PathLike[str]) -> list[str]:
    """Load timm weights from a local safetensors file into a headless backbone.

    The file's classifier keys (timm's ``pretrained_cfg["classifier"]``, e.g. ``fc.*``) are ignored,
    since the backbone was built with ``num_classes=0``. A file saved from a :class:`SliceCNN`
    (keys ``backbone.*`` plus ``head.*``) is accepted too, for warm starts from an earlier bundle.
    Any other missing or unexpected key is an error: a silently half-loaded backbone trains badly.

    Args:
        backbone: Model from ``timm.create_model(name, num_classes=0)``.
        path: Local ``.safetensors`` file.

    Returns:
        list[str]: The ignored (classifier) keys of the file.

    Raises:
        FileNotFoundError: No such file.
        ValueError: Keys or shapes do not match the backbone; the message lists them.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained weights not found: {path}")
    state = load_file(path, device="cpu")
    ignore = _classifier_prefixes(backbone)
    if any(k.startswith("backbone.") for k in state):
        # A SliceCNN state dict: keep the backbone part, the 6-way head is re-initialised.
        state = {k[len("backbone."):] if k.startswith("backbone.") else k: v for k, v in state.items()}
        ignore += ("head.",)
    ignored = sorted(k for k in state if k.startswith(ignore))
    state = {k: v for k, v in state.items() if not k.startswith(ignore)}

    expected = backbone.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(
        f"{k} (file {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    problems = []
    if missing:
        problems.append(f"missing from the file: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected in the file: {_listing(unexpected)}")
    if wrong_shape:
        problems.append(f"shape mismatch: {_listing(wrong_shape)}")
    if problems:
        name = (getattr(backbone, "pretrained_cfg", None) or {}).get("architecture", type(backbone).__name__)
        raise ValueError(f"pretrained weights {path} do not fit backbone {name!r}: " + "; ".join(problems))
    backbone.load_state_dict(state, strict=True)
    if ignored:
        logger.info("pretrained weights %s: ignored classifier keys %s", path, _listing(ignored))
    return ignored


class SliceCNN(nn.Module):
    """timm backbone -> pooled embedding [N, D] -> linear head -> logits [N, num_classes].

    Args:
        backbone: timm model name, e.g. ``"densenet121"``, ``"seresnext101_32x4d"``.
        num_classes: Output logits (5 subtypes + ``any``).
        pretrained_path: Local ``.safetensors`` file with timm weights for the backbone; None keeps
            timm's random initialisation. Never downloads.
        drop_rate: Dropout on the embedding before the head (training only).
        mean: Per-channel mean on the [0, 1] scale.
        std: Per-channel standard deviation on the [0, 1] scale.
    """

    def __init__(
        self,
        backbone: str,
        num_classes: int = 6,
        pretrained_path: str | os.PathLike[str] | None = None,
        drop_rate: float = 0.0,
        mean: Sequence[float] = DEFAULT_NORMALIZATION.mean,
        std: Sequence[float] = DEFAULT_NORMALIZATION.std,
    ) -> None:
        super().__init__()
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (one per window channel), got {len(mean)} and {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be > 0, got {tuple(std)}")
        self.backbone_name = backbone
        self.num_classes = num_classes
        self.backbone = timm.create_model(backbone, pretrained=False, num_classes=0)
        # With num_classes=0 some families (MobileNetV3, EfficientNet-lite heads) still apply a pre-logits
        # layer; timm reports its width as head_hidden_size, which then differs from num_features.
        self.num_features: int = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes)
        # Non-persistent: config.json is the single record of the normalisation, not the weights.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        if pretrained_path is not None:
            load_backbone_weights(self.backbone, pretrained_path)

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) as tuples of floats."""
        return tuple(self.mean.flatten().tolist()), tuple(self.std.flatten().tolist())

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels -> pooled embedding.

        Args:
            x: uint8 [N, 3, H, W] windows, or a float tensor already on the [0, 255] scale.

        Returns:
            torch.Tensor: Embedding [N, num_features].
        """
        x = (x.float() / 255.0 - self.mean) / self.std
        return self.backbone(x)

    def forward_head(self, emb: torch.Tensor) -> torch.Tensor:
        """Embedding [N, D] -> logits [N, num_classes]."""
        return self.head(self.head_drop(emb))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels -> (embedding [N, D], logits [N, num_classes])."""
        emb = self.forward_features(x)
        return emb, self.forward_head(emb)
