"""The metric library against closed forms and disentanglement_lib's own behavioural cases.

Grids are small and sample counts reduced (QUICK), so the file runs in seconds.
"""

import math

import numpy as np
import pytest

from encdiff import metrics
from encdiff.errors import UserError

MIXED = (3, 2, 5, 4, 2)  # unequal sizes, so a wrong index order would show
EQUAL = (3, 3, 3, 3, 3)  # 5 factors: duplicated codes give 10 codes, hence log base 10
# Fewer samples than QUICK where the tests allow it: gradient-boosted trees dominate the time.
SMALL = {**metrics.QUICK, "dci": dict(num_train=500, num_test=250)}
LN2_LN10 = math.log(2) / math.log(10)


def grid(sizes):
    """(N, K) float64 factor values of every index, row-major."""
    return np.indices(sizes).reshape(len(sizes), -1).T.astype(np.float64)  # (K, ...) -> (N, K)


def small(name, codes, sizes, **kwargs):
    return metrics.METRICS[name](codes, sizes, **{**SMALL[name], **kwargs})


def permuted(sizes, seed=0):
    """Every row's factor values in a random order: codes carry no factor identity."""
    rs = np.random.RandomState(seed)
    return np.array([rs.permutation(row) for row in grid(sizes)])


# ---------------------------------------------------------------------------------------------
# Closed forms


@pytest.mark.parametrize(
    "importance, d, c",
    [
        (np.eye(5), 1.0, 1.0),
        (np.vstack([np.eye(5), np.eye(5)]), 1.0, 1.0 - LN2_LN10),
        (np.hstack([np.eye(5), np.eye(5)]), 1.0 - LN2_LN10, 1.0),
        (np.zeros((10, 10)), 0.0, 0.0),
        (np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]), 1.0, 1.0),  # an unused code changes nothing
    ],
)
def test_dci_closed_forms(importance, d, c):
    assert metrics.disentanglement(5.0 * importance) == pytest.approx(d, abs=1e-7)
    assert metrics.completeness(5.0 * importance) == pytest.approx(c, abs=1e-7)


@pytest.mark.parametrize(
    "mutual_info, expected",
    [
        (np.eye(5), 1.0),
        (np.hstack([np.eye(5), np.eye(5)]), 1.0 - 1.0 / 9.0),
        (np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]), 2.0 / 3.0),  # an empty code scores 0
        (np.zeros((10, 10)), 0.0),
    ],
)
def test_modularity_closed_forms(mutual_info, expected):
    assert metrics.modularity(mutual_info) == pytest.approx(expected)


def test_factor_index_is_row_major():
    factors = grid(MIXED).astype(np.int64)
    expected = np.ravel_multi_index(factors.T, MIXED)
    assert np.array_equal(metrics.factor_index(factors, MIXED), expected)
    assert np.array_equal(metrics.factor_index(factors, MIXED), np.arange(math.prod(MIXED)))


def test_sampling_follows_disentanglement_lib_call_order():
    """Batches of 16; per batch one randint(size_k, size=batch) per factor, in factor order."""
    rs = np.random.RandomState(3)
    expected = []
    for start in range(0, 50, 16):
        n = min(16, 50 - start)
        expected.append(np.stack([rs.randint(s, size=n) for s in MIXED], axis=1))  # (n, K)
    expected = np.concatenate(expected)
    rs = np.random.RandomState(3)
    codes, factors = metrics._sample_codes_and_factors(rs, grid(MIXED), MIXED, 50)
    assert np.array_equal(factors, expected)
    assert np.array_equal(codes, expected)  # identity codes: the lookup returns the factors


# ---------------------------------------------------------------------------------------------
# Behavioural cases


def test_identity_codes_score_high():
    codes = grid(MIXED)
    assert small("factor_vae", codes, MIXED)["eval_accuracy"] >= 0.9
    scores = small("dci", codes, MIXED)
    assert scores["disentanglement"] >= 0.9 and scores["completeness"] >= 0.9
    assert scores["informativeness_test"] >= 0.9
    assert small("mig", codes, MIXED)["discrete_mig"] >= 0.9
    assert small("sap", codes, MIXED, continuous_factors=True)["sap_score"] >= 0.9
    assert small("beta_vae", codes, MIXED)["eval_accuracy"] >= 0.9
    scores = small("modularity_explicitness", codes, MIXED)
    assert scores["modularity_score"] >= 0.9 and scores["explicitness_score_test"] >= 0.9


def test_zero_codes_score_low():
    codes = np.zeros((math.prod(MIXED), 5))
    assert small("factor_vae", codes, MIXED) == {"train_accuracy": 0.0, "eval_accuracy": 0.0, "num_active_dims": 0}
    assert small("dci", codes, MIXED)["disentanglement"] <= 0.2
    assert small("mig", codes, MIXED)["discrete_mig"] <= 0.2
    assert small("sap", codes, MIXED)["sap_score"] <= 0.2
    assert small("modularity_explicitness", codes, MIXED)["modularity_score"] <= 0.2


def test_duplicated_codes():
    codes = np.hstack([grid(EQUAL), grid(EQUAL)])  # (N, 10)
    assert small("mig", codes, EQUAL)["discrete_mig"] == pytest.approx(0.0, abs=1e-12)
    scores = small("dci", codes, EQUAL)
    assert scores["disentanglement"] >= 0.9
    assert scores["completeness"] == pytest.approx(1.0 - LN2_LN10, abs=0.1)
    assert small("sap", codes, EQUAL, continuous_factors=True)["sap_score"] <= 0.2


def test_permuted_codes_score_low_on_dci():
    scores = small("dci", permuted(EQUAL), EQUAL)
    assert scores["disentanglement"] <= 0.2 and scores["completeness"] <= 0.2


@pytest.mark.parametrize("name", list(metrics.METRICS))
def test_each_metric_is_reproducible_for_a_seed(name):
    rs = np.random.RandomState(0)
    codes = grid(MIXED) + 1.0 * rs.normal(size=grid(MIXED).shape)  # noisy: scores depend on samples
    first = small(name, codes, MIXED, seed=1)
    assert small(name, codes, MIXED, seed=1) == first
    assert small(name, codes, MIXED, seed=2) != first
    assert all(isinstance(v, (int, float)) for v in first.values())


def test_compute_all_runs_the_named_metrics_in_order():
    assert set(metrics.QUICK) == set(metrics.METRICS)
    codes = grid(MIXED)
    scores = metrics.compute_all(codes, MIXED, metrics="mig, dci,factor_vae", quick=True, seed=3)
    assert list(scores) == ["mig", "dci", "factor_vae"]
    assert scores["mig"] == metrics.mig(codes, MIXED, seed=3, **metrics.QUICK["mig"])
    assert set(scores["dci"]) == {"disentanglement", "completeness", "informativeness_train", "informativeness_test"}


# ---------------------------------------------------------------------------------------------
# bad inputs


def test_an_unknown_metric_name_is_a_user_error():
    with pytest.raises(UserError, match="nope"):
        metrics.compute_all(grid(MIXED), MIXED, metrics=["dci", "nope"])


@pytest.mark.parametrize(
    "call",
    [
        lambda: metrics.mig(grid(MIXED)[:-1], MIXED),  # rows do not match the grid
        lambda: metrics.mig(grid(MIXED)[:, :1], MIXED),  # one code has no runner-up
        lambda: metrics.mig(np.full((math.prod(MIXED), 3), np.nan), MIXED),
        lambda: metrics.dci(grid((1, 5)), (1, 5)),  # a factor with one value
        lambda: metrics.factor_vae_score(grid(MIXED), MIXED, num_train=0),
        lambda: metrics.dci(grid(MIXED), MIXED, n_jobs=0),
    ],
)
def test_bad_inputs_raise_value_error(call):
    with pytest.raises(ValueError):
        call()
