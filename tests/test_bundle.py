"""Model bundles (local and S3); the study scorer: test_inference.py."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import timm
import torch
from safetensors.torch import save_file

from ichd_ray import CLASSES

from ichd_ray.io import storage
from ichd_ray.models import (
    BundleConfig,
    BundleError,
    SequenceConfig,
    SequenceModel,
    SliceCNN,
    init_bundle,
    load_bundle,
    load_bundle_config,
    save_bundle,
)
from ichd_ray.dicom.windowing import DEFAULT_NORMALIZATION, DEFAULT_WINDOWS, Normalization

pytestmark = pytest.mark.timeout(120)

BACKBONE = "test_resnet"
SIZE = 32
SEQ = SequenceConfig(proj_dims=(16, 8), hidden=8, num_layers=2, rnn="gru", dropout=0.1)


def _config(**overrides) -> BundleConfig:
    values = dict(backbone=BACKBONE, embed_dim=96, input_size=SIZE, folds=2, sequence=SEQ)
    values.update(overrides)
    return BundleConfig(**values)


def _models(config: BundleConfig, seed: int = 0) -> tuple[list[SliceCNN], list[SequenceModel]]:
    torch.manual_seed(seed)
    return [config.build_cnn() for _ in range(config.folds)], [config.build_sequence() for _ in range(config.folds)]


def _outputs(cnn: SliceCNN, seq: SequenceModel) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(7)
    x = torch.randint(0, 256, (4, 3, SIZE, SIZE), dtype=torch.uint8, generator=g)
    with torch.no_grad():
        emb, logits = cnn.eval()(x)
        mask = torch.tensor([[True] * 4, [True, True, False, False]])
        dz = torch.full((2, 4), 5.0)
        s, st = seq.eval()(torch.stack([emb, emb]), torch.stack([logits, logits]), dz, mask)
    return emb, logits, s, st


def _assert_same_models(saved, loaded) -> None:
    for (cnn_a, seq_a), (cnn_b, seq_b) in zip(saved, loaded):
        for a, b in zip(_outputs(cnn_a, seq_a), _outputs(cnn_b, seq_b)):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def test_config_json_round_trip():
    config = _config(thresholds={c: 0.3 for c in CLASSES}, training={"epochs": 3, "folds_by": "study"})
    again = BundleConfig.from_json(config.to_json())
    assert again == config
    data = json.loads(config.to_json())
    assert data["windows"] == [w.to_dict() for w in DEFAULT_WINDOWS]
    assert data["normalization"] == DEFAULT_NORMALIZATION.to_dict()
    assert data["sequence"] == {"proj_dims": [16, 8], "hidden": 8, "num_layers": 2, "rnn": "gru", "dropout": 0.1}
    assert data["classes"] == list(CLASSES) and data["thresholds"]["any"] == 0.3
    assert config.version_id.startswith("test_resnet-") and config.created_at.endswith("Z")
    plain = _config(windows=[w.to_dict() for w in DEFAULT_WINDOWS], normalization=DEFAULT_NORMALIZATION.to_dict())
    assert plain.windows == DEFAULT_WINDOWS and plain.normalization == DEFAULT_NORMALIZATION


@pytest.mark.parametrize(
    "change, message",
    [
        ({"sequence": {"proj_dims": [16, 8], "hidden": 8, "num_layers": 2, "rnn": "transformer", "dropout": 0.1}},
         r"sequence.rnn: expected one of \['gru', 'lstm'\], got 'transformer'"),
        ({"thresholds": {**{c: 0.5 for c in CLASSES}, "any": 1.0}}, r"thresholds: each must be in \(0, 1\), not so for \['any'\]"),
        ({"thresholds": {c: 0.5 for c in CLASSES if c != "subdural"}}, r"thresholds: need one per class of .*: missing \['subdural'\]"),
        ({"classes": list(CLASSES[:-1])}, r"classes: expected .* in this order .*: missing \['any'\]"),
        ({"backbone": "no_such_net"}, r"backbone: not a timm model .*, got 'no_such_net'"),
        ({"folds": 0}, "folds: expected an integer >= 1, got 0"),
        ({"input_size": "256"}, "input_size: expected an integer, got '256'"),
        ({"windows": [{"name": "brain", "level": 40, "width": 0}] * 3}, r"windows.0.width: expected a number > 0.0, got 0"),
        ({"normalization": {"mean": [0.5] * 3, "std": [0.2, 0.0, 0.2]}}, r"normalization.std: expected a list of numbers > 0.0, got 0.0"),
        ({"weights": {"cnn_fold5.safetensors": "0" * 64}}, "weights: unexpected file 'cnn_fold5.safetensors'; with folds=2 allowed"),
        ({"weights": {"cnn_fold0.safetensors": "xyz"}}, "weights: cnn_fold0.safetensors: expected a lowercase hex sha256"),
        ({"format_version": 2}, r"format_version: expected one of \[1\], got 2"),
        ({"colour": "red"}, r"unknown field\(s\) \['colour'\]; allowed: \['backbone',"),
    ],
)
def test_config_validation_names_the_field(change, message):
    data = _config().to_dict()
    data.update(change)
    with pytest.raises(BundleError, match=message):
        BundleConfig.from_dict(data)


def test_config_missing_key_is_named():
    data = _config().to_dict()
    del data["embed_dim"]
    with pytest.raises(BundleError, match=r"missing key\(s\) \['embed_dim'\]"):
        BundleConfig.from_dict(data)


# ---------------------------------------------------------------------------------------------
# Save / load
# ---------------------------------------------------------------------------------------------


def _round_trip(uri: str, storage_config=None) -> None:
    config = _config()
    cnns, seqs = _models(config)
    written = save_bundle(uri, config, cnns, seqs, storage_config)
    assert set(written.weights) == {f"{k}_fold{i}.safetensors" for k in ("cnn", "seq") for i in range(2)}

    loaded = load_bundle(uri, storage_config)
    raw = storage.read_bytes(storage.join(uri, "config.json"), storage_config)
    assert loaded.bundle_sha256 == hashlib.sha256(raw).hexdigest()
    assert load_bundle_config(uri, storage_config) == (written, loaded.bundle_sha256)
    assert loaded.config == written and loaded.config.version_id == config.version_id
    for name, digest in written.weights.items():
        assert hashlib.sha256(storage.read_bytes(storage.join(uri, name), storage_config)).hexdigest() == digest
    assert len(loaded.models) == 2
    assert not any(m.training for pair in loaded.models for m in pair)
    _assert_same_models(list(zip(cnns, seqs)), loaded.models)


def test_save_load_round_trip_local(tmp_path):
    _round_trip(str(tmp_path / "bundle"))


def test_save_load_round_trip_s3(s3_bucket):
    bucket, config = s3_bucket
    _round_trip(f"s3://{bucket}/bundles/v1", config)


def test_save_refuses_to_overwrite_and_mismatched_models(tmp_path):
    uri = str(tmp_path / "b")
    config = _config()
    cnns, seqs = _models(config)
    save_bundle(uri, config, cnns, seqs)
    with pytest.raises(BundleError, match="already exists"):
        save_bundle(uri, config, cnns, seqs)
    save_bundle(uri, config, cnns, seqs, overwrite=True)

    with pytest.raises(BundleError, match="needs 2 CNNs"):
        save_bundle(str(tmp_path / "c"), config, cnns[:1], seqs[:1])
    other = config.replace(sequence=SEQ.model_copy(update={"rnn": "lstm"}))
    with pytest.raises(BundleError, match="fold 0: model sequence"):
        save_bundle(str(tmp_path / "d"), other, cnns, seqs)
    with pytest.raises(BundleError, match="fold 0: model normalization"):
        save_bundle(str(tmp_path / "e"), config.replace(normalization=Normalization((0.5,) * 3, (0.5,) * 3)), cnns, seqs)


def test_load_detects_tampering_and_missing_files(tmp_path):
    uri = str(tmp_path / "b")
    config = _config()
    save_bundle(uri, config, *_models(config))
    load_bundle(uri)

    path = tmp_path / "b" / "seq_fold1.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"seq_fold1\.safetensors has sha256 [0-9a-f]{64}, but config\.json says"):
        load_bundle(uri)

    os.remove(tmp_path / "b" / "cnn_fold0.safetensors")
    with pytest.raises(BundleError, match=r"weights file cnn_fold0\.safetensors is missing"):
        load_bundle(uri)

    with pytest.raises(BundleError, match="no bundle at .*config.json not found"):
        load_bundle(str(tmp_path / "nothing"))

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(str(tmp_path / "bad"))


def test_preprocessing_this_code_cannot_do_is_refused():
    """Scoring applies the bundle's preprocessing exactly (test_score), so anything else is refused."""
    config = _config(folds=1)
    assert config.preprocessing["rsna_fix"] is True and config.preprocessing["resize"] == "area"
    assert config.replace(preprocessing={**config.preprocessing, "rsna_fix": False}).preprocessing["rsna_fix"] is False
    for change, message in (
        ({"resize": "bilinear"}, r"preprocessing.resize: 'bilinear' is not supported; this code does \['area'\]"),
        ({"rsna_fix": 1}, "preprocessing.rsna_fix: 1 is not supported"),
        ({"pixel_dtype": "float16"}, "preprocessing.pixel_dtype"),
        ({"crop": "head"}, "preprocessing.crop: unknown setting"),
    ):
        with pytest.raises(BundleError, match=message):
            config.replace(preprocessing={**config.preprocessing, **change})
    partial = {k: v for k, v in config.preprocessing.items() if k != "rsna_fix"}
    with pytest.raises(BundleError, match=r"preprocessing is missing \['rsna_fix'\]"):
        config.replace(preprocessing=partial)


# ---------------------------------------------------------------------------------------------
# init_bundle
# ---------------------------------------------------------------------------------------------


def _weight_bytes(uri: str) -> dict[str, bytes]:
    return {name: storage.read_bytes(storage.join(uri, name)) for name in sorted(os.listdir(uri)) if name.endswith(".safetensors")}


def test_init_bundle_is_deterministic(tmp_path):
    rng_before = torch.get_rng_state()
    kwargs = dict(folds=2, input_size=SIZE, sequence=SEQ)
    a = init_bundle(str(tmp_path / "a"), BACKBONE, seed=0, **kwargs)
    b = init_bundle(str(tmp_path / "b"), BACKBONE, seed=0, **kwargs)
    c = init_bundle(str(tmp_path / "c"), BACKBONE, seed=1, **kwargs)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is untouched

    bytes_a, bytes_b, bytes_c = (_weight_bytes(str(tmp_path / n)) for n in "abc")
    assert len(bytes_a) == 4 and bytes_a == bytes_b
    assert a.weights == b.weights and a.version_id != b.version_id
    assert all(bytes_a[n] != bytes_c[n] for n in bytes_a) and c.weights != a.weights
    assert bytes_a["cnn_fold0.safetensors"] != bytes_a["cnn_fold1.safetensors"]  # folds differ
    assert a.training == {"state": "untrained", "seed": 0}

    bundle = load_bundle(str(tmp_path / "a"))
    assert bundle.config == a and bundle.config.embed_dim == 96


def test_init_bundle_from_local_pretrained_weights(tmp_path):
    torch.manual_seed(5)
    source = timm.create_model(BACKBONE, pretrained=False)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    config = init_bundle(str(tmp_path / "b"), BACKBONE, weights_path=str(path), input_size=SIZE, sequence=SEQ)
    assert config.training["state"] == "pretrained_backbone"
    assert config.training["pretrained"] == {"file": "weights.safetensors", "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    cnn = load_bundle(str(tmp_path / "b")).models[0][0]
    for key, value in cnn.backbone.state_dict().items():
        assert torch.equal(value, source.state_dict()[key]), key


def test_init_bundle_rejects_bad_arguments(tmp_path):
    with pytest.raises(BundleError, match="not a timm model"):
        init_bundle(str(tmp_path / "x"), "no_such_net")
    with pytest.raises(BundleError, match="folds: expected an integer >= 1, got 0"):
        init_bundle(str(tmp_path / "x"), BACKBONE, folds=0)
    with pytest.raises(BundleError, match=r"sequence.rnn: expected one of \['gru', 'lstm'\], got 'tcn'"):
        init_bundle(str(tmp_path / "x"), BACKBONE, sequence={"rnn": "tcn"})
