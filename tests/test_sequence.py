"""ichd_ray.models.sequence: shapes, the registry, padding invariance, the weighted loss, learning context."""

from __future__ import annotations

import math

import pytest
import torch

from ichd_ray import CLASSES
from ichd_ray.models import (
    CLASS_WEIGHTS,
    RNN_TYPES,
    SequenceConfig,
    SequenceModel,
    masked_bce,
)

pytestmark = pytest.mark.timeout(120)



def _seq_inputs(lengths: list[int], total: int, dim: int, seed: int = 0, pad_value: float = 0.0):
    """Random padded sequence inputs; padding filled with ``pad_value`` (NaN tests robustness)."""
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)
    emb = torch.randn(b, total, dim, generator=g)
    logits = torch.randn(b, total, len(CLASSES), generator=g)
    dz = 5.0 + 0.1 * torch.randn(b, total, generator=g)
    dz[:, 0] = 0.0
    mask = torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]
    pad = ~mask
    emb[pad] = pad_value
    logits[pad] = pad_value
    dz[pad] = pad_value
    return emb, logits, dz, mask


# ---------------------------------------------------------------------------------------------
# SequenceModel
# ---------------------------------------------------------------------------------------------


def _seq(rnn: str = "gru", dim: int = 24, dropout: float = 0.3, seed: int = 0) -> SequenceModel:
    torch.manual_seed(seed)
    return SequenceModel(dim, proj_dims=(32, 16), hidden=12, num_layers=2, rnn=rnn, dropout=dropout)


@pytest.mark.parametrize("rnn", ["gru", "lstm"])
def test_sequence_model_shapes(rnn):
    model = _seq(rnn).eval()
    emb, logits, dz, mask = _seq_inputs([7, 4], 7, 24)
    slice_logits, study_logits = model(emb, logits, dz, mask)
    assert slice_logits.shape == (2, 7, 6) and study_logits.shape == (2, 6)
    assert torch.all(slice_logits[1, 4:] == 0)  # padding positions are zeroed
    assert isinstance(model.rnn, torch.nn.GRU if rnn == "gru" else torch.nn.LSTM)


def test_sequence_registry_and_config():
    assert RNN_TYPES == {"gru": torch.nn.GRU, "lstm": torch.nn.LSTM}
    model = SequenceModel(24, proj_dims=(16,), hidden=4, rnn="lstm")
    assert model.config == SequenceConfig(proj_dims=(16,), hidden=4, rnn="lstm")
    assert SequenceModel.from_config(24, model.config).config == model.config
    assert SequenceConfig.from_dict({"proj_dims": [16], "hidden": 4, "rnn": "lstm"}) == model.config
    with pytest.raises(ValueError, match=r"^rnn: expected one of \['gru', 'lstm'\], got 'transformer'$"):
        SequenceConfig.from_dict({"rnn": "transformer"})
    with pytest.raises(ValueError, match=r"^dropout: expected a number < 1.0, got 1.0$"):
        SequenceConfig.from_dict({"dropout": 1.0})
    with pytest.raises(ValueError, match=r"^proj_dims: expected a list of integers with at least 1 item"):
        SequenceConfig.from_dict({"proj_dims": []})
    with pytest.raises(ValueError, match=r"^hidden: expected an integer, got True$"):
        SequenceConfig.from_dict({"hidden": True})
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['layers'\]"):
        SequenceConfig.from_dict({"layers": 3})


@pytest.mark.parametrize("rnn", ["gru", "lstm"])
def test_sequence_model_padding_invariance(rnn):
    model = _seq(rnn).eval()
    emb, logits, dz, mask = _seq_inputs([5], 5, 24, seed=1)
    ref_slice, ref_study = model(emb, logits, dz, mask)

    def pad(t: torch.Tensor, total: int, value: float) -> torch.Tensor:
        out = torch.full((1, total) + t.shape[2:], value)
        out[:, : t.shape[1]] = t
        return out

    for total, value in ((9, 0.0), (9, float("nan")), (20, 1e6)):
        m = torch.arange(total)[None, :] < 5
        s, st = model(pad(emb, total, value), pad(logits, total, value), pad(dz, total, value), m)
        torch.testing.assert_close(s[:, :5], ref_slice, rtol=0, atol=1e-6)
        torch.testing.assert_close(st, ref_study, rtol=0, atol=1e-6)

    # Batched with a longer study: padding of the short one still changes nothing.
    other_emb, other_logits, other_dz, _ = _seq_inputs([12], 12, 24, seed=2)
    batch_emb = torch.cat([pad(emb, 12, float("nan")), other_emb])
    batch_logits = torch.cat([pad(logits, 12, float("nan")), other_logits])
    batch_dz = torch.cat([pad(dz, 12, float("nan")), other_dz])
    batch_mask = torch.arange(12)[None, :] < torch.tensor([[5], [12]])
    s, st = model(batch_emb, batch_logits, batch_dz, batch_mask)
    torch.testing.assert_close(s[:1, :5], ref_slice, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st[:1], ref_study, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(s).all() and torch.isfinite(st).all()


@pytest.mark.parametrize("rnn", ["gru", "lstm"])
def test_sequence_model_training_ignores_nan_padding(rnn):
    model = _seq(rnn, dropout=0.3).train()
    emb, logits, dz, mask = _seq_inputs([6, 3], 6, 24, pad_value=float("nan"))
    slice_logits, study_logits = model(emb, logits, dz, mask)
    targets = torch.zeros_like(slice_logits)
    loss = masked_bce(slice_logits, targets, mask) + masked_bce(study_logits, torch.zeros_like(study_logits))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_sequence_model_rejects_bad_masks():
    model = _seq().eval()
    emb, logits, dz, mask = _seq_inputs([4, 4], 4, 24)
    with pytest.raises(ValueError, match="prefix"):
        model(emb, logits, dz, torch.tensor([[True, False, True, True], [True] * 4]))
    with pytest.raises(ValueError, match="at least one real slice"):
        model(emb, logits, dz, torch.tensor([[False] * 4, [True] * 4]))
    with pytest.raises(ValueError, match="bool"):
        model(emb, logits, dz, mask.float())
    with pytest.raises(ValueError, match=r"emb must be \[B, T, 24\]"):
        model(emb[..., :10], logits, dz, mask)


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------


def test_masked_bce_weights_any_twice_and_ignores_padding():
    assert CLASS_WEIGHTS == (1, 1, 1, 1, 1, 2)
    # Real position: subtype logits 0 (bce = ln 2 each), "any" logit ln 3 (p = 0.75) with target 0
    # (bce = ln 4). Padding position: NaN everywhere.
    logits = torch.tensor([[[0, 0, 0, 0, 0, math.log(3)], [float("nan")] * 6]], requires_grad=True)
    targets = torch.tensor([[[0, 1, 0, 1, 0, 0], [float("nan")] * 6]], dtype=torch.float32)
    mask = torch.tensor([[True, False]])
    loss = masked_bce(logits, targets, mask)
    ln2 = math.log(2)
    assert loss.item() == pytest.approx((5 * ln2 + 2 * 2 * ln2) / 7, rel=1e-6)  # = 9/7 ln 2
    unweighted = masked_bce(logits, targets, mask, class_weights=[1.0] * 6)
    assert unweighted.item() == pytest.approx((5 * ln2 + 2 * ln2) / 6, rel=1e-6)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and torch.all(logits.grad[0, 1] == 0)

    # No mask: plain mean over positions; an all-padding batch gives 0, not NaN.
    flat = torch.zeros(3, 6)
    assert masked_bce(flat, torch.ones(3, 6)).item() == pytest.approx(ln2)
    assert masked_bce(flat[None], torch.ones(1, 3, 6), torch.zeros(1, 3, dtype=torch.bool)).item() == 0.0
    with pytest.raises(ValueError, match="class_weights"):
        masked_bce(torch.zeros(2, 3), torch.zeros(2, 3))


# ---------------------------------------------------------------------------------------------
# Overfit sanity check: context that a per-slice model cannot see
# ---------------------------------------------------------------------------------------------


def _context_batch(g: torch.Generator, batch: int = 32, total: int = 12, dim: int = 8):
    """Label of slice t = "slice t-1 carries the signal"; slice t's own features say nothing about it."""
    lengths = torch.randint(6, total + 1, (batch,), generator=g)
    mask = torch.arange(total)[None, :] < lengths[:, None]
    signal = (torch.rand(batch, total, generator=g) < 0.5).float()
    emb = torch.randn(batch, total, dim, generator=g)
    emb[..., 0] = 2 * signal - 1
    target = torch.zeros(batch, total, 1)
    target[:, 1:, 0] = signal[:, :-1]
    dz = torch.full((batch, total), 5.0)
    dz[:, 0] = 0.0
    return emb, torch.zeros(batch, total, 1), dz, mask, target


def test_sequence_model_learns_context_a_per_slice_head_cannot():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    seq = SequenceModel(8, num_classes=1, proj_dims=(16,), hidden=16, num_layers=1, dropout=0.0)
    torch.manual_seed(0)
    per_slice = SequenceModel(8, num_classes=1, proj_dims=(16,), hidden=16, num_layers=1, dropout=0.0)
    opt_seq = torch.optim.Adam(seq.parameters(), lr=1e-2)
    opt_slice = torch.optim.Adam(per_slice.parameters(), lr=1e-2)
    weights = [1.0]

    def slice_only(model, emb, logits, dz, mask):
        x, _ = model.forward_features(emb, logits, dz, mask)
        return model.slice_head(x)

    for _ in range(100):
        emb, logits, dz, mask, target = _context_batch(g)
        for model, opt, fn in ((seq, opt_seq, lambda *a: seq(*a)[0]), (per_slice, opt_slice, lambda *a: slice_only(per_slice, *a))):
            opt.zero_grad()
            loss = masked_bce(fn(emb, logits, dz, mask), target, mask, weights)
            loss.backward()
            opt.step()

    emb, logits, dz, mask, target = _context_batch(torch.Generator().manual_seed(99), batch=64)
    with torch.no_grad():
        seq_loss = masked_bce(seq.eval()(emb, logits, dz, mask)[0], target, mask, weights).item()
        slice_loss = masked_bce(slice_only(per_slice.eval(), emb, logits, dz, mask), target, mask, weights).item()
    assert slice_loss > 0.55  # near chance (ln 2 = 0.69, a bit less: slice 0 is always negative)
    assert seq_loss < 0.5 * slice_loss, (seq_loss, slice_loss)
