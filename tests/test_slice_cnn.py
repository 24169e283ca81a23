"""ichd_ray.models.slice_cnn: shapes, uint8 and float inputs, normalisation, local pretrained weights."""

from __future__ import annotations


import pytest
import timm
import torch
from safetensors.torch import save_file

from ichd_ray import CLASSES
from ichd_ray.models import (
    SliceCNN,
)

pytestmark = pytest.mark.timeout(120)

BACKBONE = "test_resnet"  # timm's tiny test net: 96-d embeddings, fast on CPU


def _pixels(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


# ---------------------------------------------------------------------------------------------
# SliceCNN
# ---------------------------------------------------------------------------------------------


def test_slice_cnn_shapes():
    torch.manual_seed(0)
    model = SliceCNN(BACKBONE).eval()
    assert model.num_features == 96
    with torch.no_grad():
        emb, logits = model(_pixels(3))
    assert emb.shape == (3, 96) and logits.shape == (3, len(CLASSES))
    assert torch.equal(model.forward_head(emb), logits)
    # Normalisation lives in config.json, not the weights.
    assert "mean" not in model.state_dict() and "std" not in model.state_dict()


def test_slice_cnn_uint8_and_float_inputs_agree():
    torch.manual_seed(0)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    model = SliceCNN(BACKBONE, mean=mean, std=std).eval()
    x = _pixels(2)
    with torch.no_grad():
        emb_u8, logits_u8 = model(x)
        emb_f, logits_f = model(x.float())
        manual = model.backbone((x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
    assert torch.equal(emb_u8, emb_f) and torch.equal(logits_u8, logits_f)
    torch.testing.assert_close(emb_u8, manual)


def test_slice_cnn_rejects_bad_normalization():
    with pytest.raises(ValueError, match="3 values"):
        SliceCNN(BACKBONE, mean=(0.5, 0.5), std=(0.2, 0.2))
    with pytest.raises(ValueError, match="std must be > 0"):
        SliceCNN(BACKBONE, std=(0.2, 0.0, 0.2))


def test_slice_cnn_loads_local_pretrained_weights(tmp_path):
    torch.manual_seed(123)
    source = timm.create_model(BACKBONE, pretrained=False)  # with its 1000-way classifier, like a hub file
    path = tmp_path / "test_resnet.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))

    torch.manual_seed(0)
    model = SliceCNN(BACKBONE, pretrained_path=path)
    expected = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    got = model.backbone.state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key

    # A SliceCNN state dict (backbone.* + head.*) warm-starts a new model too.
    warm = tmp_path / "cnn.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(warm))
    again = SliceCNN(BACKBONE, pretrained_path=warm)
    assert all(torch.equal(again.backbone.state_dict()[k], v) for k, v in got.items())


def test_slice_cnn_pretrained_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="pretrained weights not found"):
        SliceCNN(BACKBONE, pretrained_path=tmp_path / "absent.safetensors")

    other = timm.create_model("resnet10t", pretrained=False)
    path = tmp_path / "resnet10t.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    with pytest.raises(ValueError, match="do not fit backbone 'test_resnet'") as info:
        SliceCNN(BACKBONE, pretrained_path=path)
    assert "missing from the file" in str(info.value) or "shape mismatch" in str(info.value)

    source = timm.create_model(BACKBONE, pretrained=False, num_classes=0).state_dict()
    source.pop("conv1.0.weight")
    source["extra.weight"] = torch.zeros(1)
    partial = tmp_path / "partial.safetensors"
    save_file({k: v.contiguous() for k, v in source.items()}, str(partial))
    with pytest.raises(ValueError, match=r"missing from the file: conv1\.0\.weight.*unexpected in the file: extra\.weight"):
        SliceCNN(BACKBONE, pretrained_path=partial)


