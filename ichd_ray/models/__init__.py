"""Models: the per-slice CNN, the study sequence model, bundles on storage, and the study scorer.

``SEQUENCE_MODELS`` maps each ``rnn`` value a bundle's ``sequence`` block may name to a constructor
``(embed_dim, num_classes=6, **hyper_parameters) -> SequenceModel``.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

from ichd_ray.models.bundle import (
    CONFIG_NAME,
    DEFAULT_PREPROCESSING,
    FORMAT_VERSION,
    BundleConfig,
    BundleError,
    LoadedBundle,
    cnn_filename,
    init_bundle,
    load_bundle,
    load_bundle_config,
    new_version_id,
    save_bundle,
    seq_filename,
)
from ichd_ray.models.inference import StudyInput, StudyScorer, StudyScores
from ichd_ray.models.sequence import (
    CLASS_WEIGHTS,
    DZ_SCALE_MM,
    RNN_TYPES,
    SequenceConfig,
    SequenceModel,
    masked_bce,
)
from ichd_ray.models.slice_cnn import SliceCNN, load_backbone_weights

#: Sequence model constructors by ``SequenceConfig.rnn`` name.
SEQUENCE_MODELS: dict[str, Callable[..., SequenceModel]] = {
    name: partial(SequenceModel, rnn=name) for name in RNN_TYPES
}

__all__ = [
    "BundleConfig",
    "BundleError",
    "CLASS_WEIGHTS",
    "CONFIG_NAME",
    "DEFAULT_PREPROCESSING",
    "DZ_SCALE_MM",
    "FORMAT_VERSION",
    "LoadedBundle",
    "RNN_TYPES",
    "SEQUENCE_MODELS",
    "SequenceConfig",
    "SequenceModel",
    "SliceCNN",
    "StudyInput",
    "StudyScorer",
    "StudyScores",
    "cnn_filename",
    "init_bundle",
    "load_backbone_weights",
    "load_bundle",
    "load_bundle_config",
    "masked_bce",
    "new_version_id",
    "save_bundle",
    "seq_filename",
]
