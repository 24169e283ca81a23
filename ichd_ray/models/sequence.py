"""The study-level sequence model: 1st-place RSNA 2019 "model 1" over the slices of one study.

Per slice, the CNN embedding goes through dropout -> Linear(D, 512) + LayerNorm + ReLU -> Linear(512, 128)
(the 1st place's 1x1 convolutions), and is concatenated with the CNN's logits and the slice spacing
features. That vector feeds (a) a per-slice linear head and (b) a 2-layer bidirectional GRU (or LSTM) with
a linear head; the slice logits are a + b (the "skip connection"). A study head max-pools the projected
features, CNN logits and recurrent outputs over the real slices and predicts the study labels (trained on
the max over slice labels).

Padding never reaches a real position: normalisation is per slice (LayerNorm, not BatchNorm), the
recurrence runs on packed sequences, the study pooling is masked, and padded inputs are zeroed first
so that even NaN padding is harmless. The mask must be a prefix (real slices first, then padding).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from pydantic import Field
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ichd_ray import CLASS_WEIGHTS  # loss weighted like the challenge metric: `any` x2
from ichd_ray.config.job import Section, validate_config

__all__ = [
    "CLASS_WEIGHTS",
    "DZ_SCALE_MM",
    "RNN_TYPES",
    "SequenceConfig",
    "SequenceModel",
    "masked_bce",
    "sequence_config",
]

#: Slice spacing is divided by this (a typical head-CT slice thickness) so the feature is O(1).
DZ_SCALE_MM = 5.0
# Scaled spacing is clipped: a gap of a missing slice stays informative, a corrupt position can't explode.
_DZ_CLIP = 10.0

#: Recurrent layers selectable by ``SequenceConfig.rnn``.
RNN_TYPES: dict[str, type[nn.RNNBase]] = {"gru": nn.GRU, "lstm": nn.LSTM}
RnnName = Literal["gru", "lstm"]  # the keys of RNN_TYPES (test_sequence checks they agree)


class SequenceConfig(Section):
    """Hyper-parameters of :class:`SequenceModel` (the ``sequence`` block of a bundle's config).

    Args:
        proj_dims: Widths of the per-slice projection; the 1st place used (512, 128).
        hidden: Hidden size of each direction of the recurrent layers.
        num_layers: Stacked bidirectional recurrent layers.
        rnn: ``"gru"`` or ``"lstm"`` (see :data:`RNN_TYPES`).
        dropout: Dropout on the input embedding and between recurrent layers, in [0, 1).
    """

    proj_dims: Annotated[tuple[Annotated[int, Field(gt=0)], ...], Field(strict=False, min_length=1)] = (512, 128)
    hidden: int = Field(96, ge=1)
    num_layers: int = Field(2, ge=1)
    rnn: RnnName = "gru"
    dropout: float = Field(0.3, ge=0.0, lt=1.0)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SequenceConfig:
        """Build from a JSON mapping; unknown keys are an error (they would be silently ignored).

        Raises:
            ConfigError: A field is unknown or invalid; the message names it, its value and what is allowed.
        """
        return validate_config(cls, dict(data))


def sequence_config(section) -> SequenceConfig:
    """The model hyper-parameters of a training config's ``sequence`` section
    (:class:`ichd_ray.config.train.SequenceSection`; the config layer sits below the models)."""
    return SequenceConfig(
        proj_dims=section.proj_dims, hidden=section.hidden, num_layers=section.num_layers, rnn=section.rnn, dropout=section.dropout
    )


class SequenceModel(nn.Module):
    """Per-slice projection + skip head + bidirectional RNN head, and a masked max-pool study head.

    Args:
        embed_dim: Width D of the CNN embeddings.
        num_classes: Labels per slice and per study.
        proj_dims: Widths of the per-slice projection (last one is the projected feature width).
        hidden: Hidden size per direction of the recurrent layers.
        num_layers: Stacked bidirectional recurrent layers.
        rnn: ``"gru"`` or ``"lstm"``.
        dropout: Dropout on the input embedding and between recurrent layers.
    """

    def __init__(
        self,
        embed_dim: int,
        num_classes: int = 6,
        proj_dims: Sequence[int] = (512, 128),
        hidden: int = 96,
        num_layers: int = 2,
        rnn: str = "gru",
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        self.config = SequenceConfig(proj_dims=tuple(proj_dims), hidden=hidden, num_layers=num_layers, rnn=rnn, dropout=dropout)
        if embed_dim < 1 or num_classes < 1:
            raise ValueError(f"embed_dim and num_classes must be positive, got {embed_dim} and {num_classes}")
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        proj_dims = self.config.proj_dims

        self.drop = nn.Dropout(dropout)
        layers: list[nn.Module] = []
        width = embed_dim
        for i, out in enumerate(proj_dims):
            layers.append(nn.Linear(width, out))
            if i < len(proj_dims) - 1:
                layers += [nn.LayerNorm(out), nn.ReLU(inplace=True)]
            width = out
        self.proj = nn.Sequential(*layers)
        self.pooled_dims = proj_dims[-1] + num_classes  # projected features + CNN logits
        self.num_features = self.pooled_dims + 2  # + spacing to the previous and to the next slice

        self.slice_head = nn.Linear(self.num_features, num_classes)
        self.rnn = RNN_TYPES[rnn](
            self.num_features,
            hidden,
            num_layers=num_layers,
            batch_first=True,
            bidirectional=True,
            dropout=dropout if num_layers > 1 else 0.0,  # torch warns about dropout on a single layer
        )
        self.rnn_head = nn.Linear(2 * hidden, num_classes)
        self.study_head = nn.Linear(self.pooled_dims + 2 * hidden, num_classes)

    @classmethod
    def from_config(cls, embed_dim: int, config: SequenceConfig, num_classes: int = 6) -> SequenceModel:
        """Build from a :class:`SequenceConfig`."""
        return cls(embed_dim, num_classes, **config.model_dump())

    def _lengths(self, emb: torch.Tensor, cnn_logits: torch.Tensor, dz: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Validate shapes and the prefix mask; return the lengths on the CPU (what packing needs)."""
        if emb.ndim != 3 or emb.shape[-1] != self.embed_dim:
            raise ValueError(f"emb must be [B, T, {self.embed_dim}], got {tuple(emb.shape)}")
        b, t = emb.shape[:2]
        if tuple(cnn_logits.shape) != (b, t, self.num_classes):
            raise ValueError(f"cnn_logits must be [{b}, {t}, {self.num_classes}], got {tuple(cnn_logits.shape)}")
        if tuple(dz.shape) != (b, t) or tuple(mask.shape) != (b, t):
            raise ValueError(f"dz and mask must be [{b}, {t}], got {tuple(dz.shape)} and {tuple(mask.shape)}")
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor (True = real slice), got {mask.dtype}")
        lengths = mask.sum(dim=1)
        if bool((lengths == 0).any()):
            raise ValueError("every study needs at least one real slice (a mask row is all False)")
        prefix = torch.arange(t, device=mask.device)[None, :] < lengths[:, None]
        if not torch.equal(prefix, mask):
            raise ValueError("mask must be a prefix per study: real slices first, then padding")
        return lengths.cpu()

    def forward_features(
        self, emb: torch.Tensor, cnn_logits: torch.Tensor, dz: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-slice features and recurrent outputs.

        Args:
            emb: CNN embeddings [B, T, D].
            cnn_logits: CNN logits [B, T, num_classes].
            dz: Signed distance to the previous slice along the slice normal in mm [B, T]; 0 for the first.
            mask: bool [B, T], True for real slices; a prefix per row.

        Returns:
            tuple[torch.Tensor, torch.Tensor]: features [B, T, num_features] (projected embedding, CNN
            logits, scaled spacing to the previous and next slice) and RNN outputs [B, T, 2 * hidden]
            (zeros at padding).
        """
        lengths = self._lengths(emb, cnn_logits, dz, mask)
        keep = mask.unsqueeze(-1)
        emb = emb.float().masked_fill(~keep, 0.0)
        cnn_logits = cnn_logits.float().masked_fill(~keep, 0.0)
        dz_prev = (dz.float().masked_fill(~mask, 0.0) / DZ_SCALE_MM).clamp(-_DZ_CLIP, _DZ_CLIP)
        # Spacing to the next slice; 0 at each study's last slice because padding was zeroed above.
        dz_next = F.pad(dz_prev[:, 1:], (0, 1))
        x = torch.cat([self.proj(self.drop(emb)), cnn_logits, dz_prev.unsqueeze(-1), dz_next.unsqueeze(-1)], dim=-1)
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        h, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return x, h

    def forward_head(self, x: torch.Tensor, h: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features -> (slice logits [B, T, C] (0 at padding), study logits [B, C])."""
        keep = mask.unsqueeze(-1)
        slice_logits = (self.slice_head(x) + self.rnn_head(h)).masked_fill(~keep, 0.0)
        pooled = torch.cat([x[..., : self.pooled_dims], h], dim=-1).masked_fill(~keep, float("-inf")).amax(dim=1)
        return slice_logits, self.study_head(pooled)

    def forward(
        self, emb: torch.Tensor, cnn_logits: torch.Tensor, dz: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(emb [B, T, D], cnn_logits [B, T, C], dz [B, T], mask [B, T]) -> (slice logits [B, T, C], study logits [B, C])."""
        x, h = self.forward_features(emb, cnn_logits, dz, mask)
        return self.forward_head(x, h, mask)


def masked_bce(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor | None = None,
    class_weights: Sequence[float] | torch.Tensor | None = None,
) -> torch.Tensor:
    """Class-weighted binary cross-entropy averaged over the real positions only.

    Each position's loss is ``sum_c w_c * bce_c / sum_c w_c`` (the RSNA metric's per-image weighting),
    then averaged over the positions where ``mask`` is True; padding contributes nothing, not even NaN.

    Args:
        logits: [..., C] (e.g. [B, T, C] slices or [B, C] studies).
        targets: Same shape as ``logits``, values in [0, 1].
        mask: bool of shape ``logits.shape[:-1]``; None means every position is real.
        class_weights: C weights; None means :data:`CLASS_WEIGHTS` (``any`` x2), which needs C = 6.

    Returns:
        torch.Tensor: Scalar loss (0 when there is no real position).
    """
    if targets.shape != logits.shape:
        raise ValueError(f"targets {tuple(targets.shape)} must match logits {tuple(logits.shape)}")
    c = logits.shape[-1]
    if class_weights is None:
        if c != len(CLASS_WEIGHTS):
            raise ValueError(f"default class weights are for {len(CLASS_WEIGHTS)} classes; pass class_weights for {c}")
        class_weights = CLASS_WEIGHTS
    w = torch.as_tensor(class_weights, dtype=torch.float32, device=logits.device)
    if w.shape != (c,):
        raise ValueError(f"class_weights must have {c} values, got shape {tuple(w.shape)}")
    logits, targets = logits.float(), targets.float()
    if mask is not None:
        if tuple(mask.shape) != tuple(logits.shape[:-1]):
            raise ValueError(f"mask must have shape {tuple(logits.shape[:-1])}, got {tuple(mask.shape)}")
        mask = mask.bool()
        # Zero the padding before the loss, not after: NaN there would otherwise leak into the gradients.
        keep = mask.unsqueeze(-1)
        logits = logits.masked_fill(~keep, 0.0)
        targets = targets.masked_fill(~keep, 0.0)
    per_class = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    per_position = (per_class * w).sum(dim=-1) / w.sum()
    if mask is None:
        return per_position.mean()
    return (per_position * mask).sum() / mask.sum().clamp_min(1)
