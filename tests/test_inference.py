"""ichd_ray.models.inference: StudyScorer over a tiny random two-fold bundle, on the CPU.

The bundle is built in memory (bundle files on storage: test_bundle.py): a timm ``test_resnet`` CNN at
32 px and a small GRU sequence model per fold, with heads scaled up so probabilities spread well away
from 0.5 and comparisons are not between constants.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ichd_ray.models import BundleConfig, LoadedBundle, SequenceConfig, StudyInput, StudyScorer
from ichd_ray.models.inference import _chunks

pytestmark = pytest.mark.timeout(120)

BACKBONE = "test_resnet"  # timm's tiny test net: 96-d embeddings, fast on CPU
SIZE = 32
SEQ = SequenceConfig(proj_dims=(16, 8), hidden=8, num_layers=2, rnn="gru", dropout=0.1)


@pytest.fixture(scope="module")
def two_fold_bundle() -> LoadedBundle:
    config = BundleConfig(backbone=BACKBONE, embed_dim=96, input_size=SIZE, folds=2, sequence=SEQ)
    torch.manual_seed(3)
    models = []
    for _ in range(config.folds):
        cnn, seq = config.build_cnn(), config.build_sequence()
        with torch.no_grad():  # wider random heads than the default init: outputs differ visibly from 0.5
            cnn.head.weight.mul_(20)
            seq.rnn_head.weight.mul_(5)
            seq.study_head.weight.mul_(5)
        models.append((cnn.eval(), seq.eval()))
    return LoadedBundle(uri="memory://two-fold", config=config, models=models, bundle_sha256="0" * 64)


def _studies(lengths: list[int], size: int = SIZE, seed: int = 0) -> list[StudyInput]:
    rng = np.random.default_rng(seed)
    out = []
    for i, t in enumerate(lengths):
        images = rng.integers(0, 256, (t, 3, size, size), dtype=np.uint8)
        positions = np.cumsum(rng.uniform(4.5, 5.5, t)) - 80.0
        out.append(StudyInput(images=images, positions=positions, study_id=f"s{i}"))
    return out


def _manual_scores(bundle: LoadedBundle, study: StudyInput) -> tuple[np.ndarray, np.ndarray]:
    """One study through each fold pair by hand, averaging sigmoid probabilities."""
    slice_probs, study_probs = [], []
    dz = torch.zeros(1, len(study.images))
    dz[0, 1:] = torch.from_numpy(np.diff(study.positions)).float()
    mask = torch.ones(1, len(study.images), dtype=torch.bool)
    with torch.no_grad():
        for cnn, seq in bundle.models:
            emb, logits = cnn(torch.from_numpy(study.images))
            s, st = seq(emb[None], logits[None], dz, mask)
            slice_probs.append(torch.sigmoid(s[0]))
            study_probs.append(torch.sigmoid(st[0]))
    return torch.stack(slice_probs).mean(0).numpy(), torch.stack(study_probs).mean(0).numpy()


def test_output_shapes_dtypes_and_probabilities(two_fold_bundle):
    lengths = [5, 8, 1]
    scores = StudyScorer(two_fold_bundle, "cpu").score(_studies(lengths))
    assert len(scores) == 3
    for t, result in zip(lengths, scores):
        assert result.slice_probs.shape == (t, 6) and result.slice_probs.dtype == np.float32
        assert result.study_probs.shape == (6,) and result.study_probs.dtype == np.float32
        assert result.embeddings is None and result.cnn_logits is None
        for probs in (result.slice_probs, result.study_probs):
            assert np.isfinite(probs).all() and probs.min() >= 0.0 and probs.max() <= 1.0
    assert np.ptp(scores[1].slice_probs) > 0.05  # not all 0.5: the tests below compare real outputs


def test_scorer_matches_manual_fold_average(two_fold_bundle):
    studies = _studies([5, 8])
    scores = StudyScorer(two_fold_bundle, "cpu").score(studies)
    for study, result in zip(studies, scores):
        slice_ref, study_ref = _manual_scores(two_fold_bundle, study)
        np.testing.assert_allclose(result.slice_probs, slice_ref, rtol=0, atol=1e-5)
        np.testing.assert_allclose(result.study_probs, study_ref, rtol=0, atol=1e-5)


def test_a_study_scores_the_same_alone_or_in_a_batch(two_fold_bundle):
    """Padding to the batch's longest study never leaks into a shorter one."""
    studies = _studies([5, 8, 1])
    scorer = StudyScorer(two_fold_bundle, "cpu")
    batch = scorer.score(studies)
    for study, together in zip(studies, batch):
        (alone,) = scorer.score([study])
        np.testing.assert_allclose(together.slice_probs, alone.slice_probs, rtol=0, atol=1e-6)
        np.testing.assert_allclose(together.study_probs, alone.study_probs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("chunk", [2, 3])
def test_cnn_chunking_does_not_change_the_outputs(two_fold_bundle, chunk):
    studies = _studies([5, 8, 1])
    whole = StudyScorer(two_fold_bundle, "cpu", cnn_chunk=64, return_embeddings=True).score(studies)
    chunked = StudyScorer(two_fold_bundle, "cpu", cnn_chunk=chunk, return_embeddings=True).score(studies)
    for a, b in zip(whole, chunked):
        np.testing.assert_allclose(a.slice_probs, b.slice_probs, rtol=0, atol=1e-6)
        np.testing.assert_allclose(a.study_probs, b.study_probs, rtol=0, atol=1e-6)
        np.testing.assert_allclose(a.embeddings.astype(np.float32), b.embeddings.astype(np.float32), atol=1e-3)
        np.testing.assert_allclose(a.cnn_logits, b.cnn_logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("fold", [0, 1])
def test_embeddings_are_the_chosen_folds(two_fold_bundle, fold):
    studies = _studies([5, 8, 1])
    scores = StudyScorer(two_fold_bundle, "cpu", cnn_chunk=3, embedding_fold=fold).score(studies, return_embeddings=True)
    cnn = two_fold_bundle.models[fold][0]
    for study, result in zip(studies, scores):
        t = len(study.images)
        assert result.embeddings.dtype == np.float16 and result.embeddings.shape == (t, 96)
        assert result.cnn_logits.dtype == np.float32 and result.cnn_logits.shape == (t, 6)
        with torch.no_grad():
            emb, logits = cnn(torch.from_numpy(study.images))
        np.testing.assert_allclose(result.embeddings.astype(np.float32), emb.half().float().numpy(), atol=1e-3)
        np.testing.assert_allclose(result.cnn_logits, logits.numpy(), rtol=0, atol=1e-5)


def test_chunks_span_studies_and_keep_every_slice_in_order():
    studies = _studies([5, 8, 1], size=4)
    pieces = list(_chunks(studies, 3))
    assert [len(p) for p in pieces] == [3, 3, 3, 3, 2]
    np.testing.assert_array_equal(np.concatenate(pieces), np.concatenate([s.images for s in studies]))
    assert [len(p) for p in _chunks(studies, 64)] == [14]


def test_scorer_input_errors(two_fold_bundle):
    scorer = StudyScorer(two_fold_bundle, "cpu")
    assert scorer.score([]) == []
    with pytest.raises(ValueError, match="study s0: images are .* expects 32x32"):
        scorer.score(_studies([3], size=64))
    with pytest.raises(ValueError, match="uint8"):
        StudyInput(images=np.zeros((2, 3, SIZE, SIZE), dtype=np.float32), positions=np.zeros(2))
    with pytest.raises(ValueError, match=r"positions must be \[2\]"):
        StudyInput(images=np.zeros((2, 3, SIZE, SIZE), dtype=np.uint8), positions=np.zeros(3))
    with pytest.raises(ValueError, match="positions must be finite"):
        StudyInput(images=np.zeros((2, 3, SIZE, SIZE), dtype=np.uint8), positions=np.array([0.0, np.nan]))
    with pytest.raises(ValueError, match="embedding_fold"):
        StudyScorer(two_fold_bundle, "cpu", embedding_fold=2)
    with pytest.raises(ValueError, match="cnn_chunk must be >= 1"):
        StudyScorer(two_fold_bundle, "cpu", cnn_chunk=0)
    assert scorer.score(_studies([2]), return_embeddings=False)[0].embeddings is None
