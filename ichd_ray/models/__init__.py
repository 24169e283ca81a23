"""Models: the per-slice CNN, the study sequence model, bundles on storage, and the study scorer.

The recurrent layers a bundle's ``sequence`` block may name (``rnn``) are registered in one place,
:data:`ichd_ray.models.sequence.RNN_TYPES`; build a model with ``SequenceModel(embed_dim, rnn=name, ...)``
or :meth:`SequenceModel.from_config`.
"""

from __future__ import annotations

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
