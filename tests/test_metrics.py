import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import f1_score, matthews_corrcoef

from rsoft_nlp.metrics import compute_metrics


def test_hand_worked_binary_metrics():
    # tp=2, tn=1, fp=1, fn=1: accuracy 3/5, precision 2/3, recall 2/3, F1 2/3, MCC (2-1)/sqrt(3*3*2*2) = 1/6.
    preds, labels = [1, 1, 0, 1, 0], [1, 1, 0, 0, 1]
    metrics = compute_metrics("mrpc", preds, labels)
    assert metrics == pytest.approx({"accuracy": 0.6, "f1": 2 / 3})
    assert compute_metrics("cola", preds, labels) == pytest.approx({"matthews_correlation": 1 / 6})
    assert compute_metrics("rte", preds, labels) == {"accuracy": 0.6}


def test_degenerate_cases_are_zero_not_nan():
    assert compute_metrics("cola", [1, 1, 1], [0, 1, 1])["matthews_correlation"] == 0.0
    assert compute_metrics("qqp", [0, 0], [1, 0])["f1"] == 0.0


def test_stsb_correlations():
    preds, labels = [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 5.0]
    metrics = compute_metrics("stsb", preds, labels)
    # Ranks 1,2,3,4 vs 1,3,2,4: d^2 = 0+1+1+0, rho = 1 - 6*2/(4*15) = 0.8.
    assert metrics["spearmanr"] == pytest.approx(0.8)
    assert metrics["pearson"] == pytest.approx(np.corrcoef(preds, labels)[0, 1])


def test_agree_with_reference_libraries():
    rng = np.random.default_rng(0)
    preds, labels = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    assert compute_metrics("qqp", preds, labels)["f1"] == pytest.approx(f1_score(labels, preds))
    assert compute_metrics("cola", preds, labels)["matthews_correlation"] == pytest.approx(
        matthews_corrcoef(labels, preds)
    )
    scores, gold = rng.normal(size=50), rng.normal(size=50)
    assert compute_metrics("stsb", scores, gold)["spearmanr"] == pytest.approx(stats.spearmanr(scores, gold)[0])


def test_length_mismatch_is_rejected():
    with pytest.raises(ValueError, match="same non-zero length"):
        compute_metrics("sst2", [1, 0], [1])
