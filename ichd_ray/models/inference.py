"""Scoring whole studies with a loaded bundle: CNN per slice, sequence model per study, fold average.

For a batch of studies, every slice of every study goes through each fold's CNN in chunks of
``cnn_chunk`` slices (memory stays bounded for 300+ slice studies; each chunk crosses to the device
once and serves all folds). The embeddings and CNN logits stay on the device and are laid out as a
padded [B, T, ...] batch for each fold's sequence model, which sees every study whole (no chunking:
the recurrence needs the full context). Sigmoid probabilities are averaged over the folds.

On CUDA the CNNs run channels-last under bf16 autocast; the sequence models always run in float32
(they are tiny, and the recurrence accumulates rounding). On CPU everything is float32.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from ichd_ray.models.bundle import LoadedBundle

__all__ = ["StudyInput", "StudyScores", "StudyScorer"]


@dataclass
class StudyInput:
    """One study, slices in z order (along the slice normal).

    Args:
        images: uint8 [T, 3, H, W] windowed slices, H = W = the bundle's input size.
        positions: float [T], each slice's position along the slice normal in mm.
        study_id: Optional name used in error messages.
    """

    images: np.ndarray
    positions: np.ndarray
    study_id: str = ""

    def __post_init__(self) -> None:
        label = f"study {self.study_id!r}" if self.study_id else "study"
        images = np.asarray(self.images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != 3 or images.shape[0] < 1:
            raise ValueError(f"{label}: images must be uint8 [T>=1, 3, H, W], got {images.dtype} {images.shape}")
        positions = np.asarray(self.positions, dtype=np.float64)
        if positions.shape != (images.shape[0],):
            raise ValueError(f"{label}: positions must be [{images.shape[0]}] (one per slice), got {positions.shape}")
        if not np.isfinite(positions).all():
            raise ValueError(f"{label}: positions must be finite")
        self.images, self.positions = images, positions


@dataclass
class StudyScores:
    """Scores of one study.

    Attributes:
        slice_probs: float32 [T, C], per-slice probabilities (fold average).
        study_probs: float32 [C], study-level probabilities (fold average).
        embeddings: float16 [T, D] CNN embeddings of one fold, when requested; else None.
        cnn_logits: float32 [T, C] that fold's CNN logits, alongside ``embeddings`` (the sequence
            model's other input, and the "CNN alone" out-of-fold prediction); else None.
    """

    slice_probs: np.ndarray
    study_probs: np.ndarray
    embeddings: np.ndarray | None = None
    cnn_logits: np.ndarray | None = None


def _chunks(studies: Sequence[StudyInput], size: int) -> Iterator[np.ndarray]:
    """All slices of all studies, in order, as arrays of at most ``size`` slices (chunks span studies)."""
    pieces: list[np.ndarray] = []
    filled = 0
    for study in studies:
        start, total = 0, len(study.images)
        while start < total:
            take = min(size - filled, total - start)
            pieces.append(study.images[start : start + take])
            filled += take
            start += take
            if filled == size:
                yield np.concatenate(pieces)
                pieces, filled = [], 0
    if pieces:
        yield np.concatenate(pieces)


class StudyScorer:
    """Scores studies with every fold of a bundle and averages the probabilities.

    Args:
        bundle: A loaded bundle; its models are moved to ``device`` (in place) and kept in eval mode.
        device: Where to run; None means where the bundle's models are.
        cnn_chunk: Slices per CNN forward pass (bounds activation memory).
        return_embeddings: Also return float16 embeddings per study.
        embedding_fold: Fold whose CNN embeddings are returned.
        mixed_precision: On CUDA, run the CNNs channels-last under bf16 autocast; ignored on CPU.
    """

    def __init__(
        self,
        bundle: LoadedBundle,
        device: str | torch.device | None = None,
        cnn_chunk: int = 64,
        *,
        return_embeddings: bool = False,
        embedding_fold: int = 0,
        mixed_precision: bool = True,
    ) -> None:
        if cnn_chunk < 1:
            raise ValueError(f"cnn_chunk must be >= 1, got {cnn_chunk}")
        folds = len(bundle.models)
        if not 0 <= embedding_fold < folds:
            raise ValueError(f"embedding_fold must be in [0, {folds}), got {embedding_fold}")
        self.bundle = bundle
        self.device = torch.device(device) if device is not None else bundle.device
        self.cnn_chunk = cnn_chunk
        self.return_embeddings = return_embeddings
        self.embedding_fold = embedding_fold
        self._cuda = self.device.type == "cuda"
        self._amp = self._cuda and mixed_precision
        self.models = []
        for cnn, seq in bundle.models:
            cnn = cnn.to(self.device).eval()
            if self._amp:
                cnn = cnn.to(memory_format=torch.channels_last)
            self.models.append((cnn, seq.to(self.device).eval()))

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        """The one host -> device copy of pixels: uint8 crosses (4x less than float), pinned on CUDA."""
        if not array.flags.writeable or not array.flags.c_contiguous:
            array = np.array(array, order="C")  # torch.from_numpy wants writable, contiguous memory
        tensor = torch.from_numpy(array)
        if self._cuda:
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self._amp:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.inference_mode()
    def score(self, studies: Sequence[StudyInput], return_embeddings: bool | None = None) -> list[StudyScores]:
        """Score a batch of studies (all go to the sequence model as one padded batch).

        Args:
            studies: Studies of any lengths; images at the bundle's input size.
            return_embeddings: Override the scorer's ``return_embeddings`` for this call.

        Returns:
            list[StudyScores]: One per study, input order.

        Raises:
            ValueError: An image size differs from the bundle's ``input_size``.
        """
        if not studies:
            return []
        cfg = self.bundle.config
        size = cfg.input_size
        for i, study in enumerate(studies):
            if study.images.shape[2:] != (size, size):
                name = study.study_id or f"#{i}"
                raise ValueError(f"study {name}: images are {study.images.shape[2:]}, the bundle expects {size}x{size}")
        lengths = [len(s.images) for s in studies]
        total, batch, longest = sum(lengths), len(studies), max(lengths)
        folds, classes, dim = len(self.models), len(cfg.classes), cfg.embed_dim

        emb = torch.empty(folds, total, dim, device=self.device)
        logits = torch.empty(folds, total, classes, device=self.device)
        offset = 0
        for chunk in _chunks(studies, self.cnn_chunk):
            x = self._to_device(chunk)
            if self._amp:
                x = x.contiguous(memory_format=torch.channels_last)
            n = x.shape[0]
            with self._autocast():
                for k, (cnn, _) in enumerate(self.models):
                    e, l = cnn(x)
                    emb[k, offset : offset + n] = e.float()
                    logits[k, offset : offset + n] = l.float()
            offset += n

        # Padded [B, T] layout; boolean-mask assignment fills real positions in row-major order,
        # which is exactly the study-then-slice order of the flat CNN outputs.
        dz = np.zeros((batch, longest), dtype=np.float32)
        for b, study in enumerate(studies):
            dz[b, 1 : lengths[b]] = np.diff(study.positions)
        dz_t = torch.from_numpy(dz).to(self.device)
        mask = torch.arange(longest, device=self.device)[None, :] < torch.tensor(lengths, device=self.device)[:, None]

        slice_sum = torch.zeros(batch, longest, classes, device=self.device)
        study_sum = torch.zeros(batch, classes, device=self.device)
        for k, (_, seq) in enumerate(self.models):
            padded_emb = emb.new_zeros(batch, longest, dim)
            padded_emb[mask] = emb[k]
            padded_logits = logits.new_zeros(batch, longest, classes)
            padded_logits[mask] = logits[k]
            slice_logits, study_logits = seq(padded_emb, padded_logits, dz_t, mask)
            slice_sum += torch.sigmoid(slice_logits)
            study_sum += torch.sigmoid(study_logits)
        slice_probs = (slice_sum / folds).cpu().numpy()
        study_probs = (study_sum / folds).cpu().numpy()
        embeddings = cnn_logits = None
        if self.return_embeddings if return_embeddings is None else return_embeddings:
            embeddings = emb[self.embedding_fold].half().cpu().numpy()
            cnn_logits = logits[self.embedding_fold].float().cpu().numpy()

        out, start = [], 0
        for b, t in enumerate(lengths):
            out.append(
                StudyScores(
                    slice_probs=np.ascontiguousarray(slice_probs[b, :t], dtype=np.float32),
                    study_probs=np.ascontiguousarray(study_probs[b], dtype=np.float32),
                    embeddings=None if embeddings is None else embeddings[start : start + t].copy(),
                    cnn_logits=None if cnn_logits is None else cnn_logits[start : start + t].copy(),
                )
            )
            start += t
        return out
