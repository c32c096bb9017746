"""TAD (NashAE's Total AUROC Difference) on codes whose answer is known in closed form, its AUROC
against sklearn and against a direct port of NashAE's threshold loop, and its input checks."""

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from encdiff.metrics import _auroc_exact, _auroc_grid, attribute_entropy_reduction, tad


def independent_attributes(n=4000, k=4, seed=0):
    return np.random.RandomState(seed).randint(0, 2, size=(n, k))


def noise_codes(n, c, seed=1):
    return np.random.RandomState(seed).randn(n, c)


def nashae_auroc(code, target, steps=101):
    """NashAE's calculate_auroc, written out as a loop: 101 thresholds from the code's min to max,
    both directions, each ROC's columns sorted, area = sum tpr[i] * (fpr[i] - fpr[i - 1])."""
    lo, hi = code.min(), code.max()
    pos, neg = target.sum(), len(target) - target.sum()
    areas = []
    for direction in (1, -1):
        points = []
        for t in np.linspace(0, 1, steps):
            thr = lo + t * (hi - lo)
            pred = code >= thr if direction == 1 else code < thr
            points.append(((pred & (target == 0)).sum() / neg, (pred & (target == 1)).sum() / pos))
        fpr, tpr = np.sort(np.array(points), axis=0).T
        areas.append(sum(tpr[i] * (fpr[i] - fpr[i - 1]) for i in range(1, steps)))
    return max(areas)


def test_exact_auroc_is_sklearns_in_the_better_direction():
    y = independent_attributes(500, 3)
    x = noise_codes(500, 3) - y * 0.7  # code 0 ~ attribute 0, reversed in sign
    x[:, 2] = np.round(x[:, 2])  # ties
    ours = _auroc_exact(x, y, min_range=0.2)
    for k in range(3):
        for c in range(3):
            auc = roc_auc_score(y[:, k], x[:, c])
            assert ours[k, c] == pytest.approx(max(auc, 1 - auc), abs=1e-12)


def test_grid_auroc_is_nashaes_threshold_loop():
    y = independent_attributes(600, 2)
    x = noise_codes(600, 3) + y[:, [0, 1, 0]] * 0.9
    x[:, 2] = np.exp(x[:, 2])  # heavy-tailed: the grid is coarse where the data are
    ours = _auroc_grid(x, y, min_range=0.2)
    for k in range(2):
        for c in range(3):
            assert ours[k, c] == pytest.approx(nashae_auroc(x[:, c], y[:, k]), abs=1e-9)
    # the grid's upper sum overestimates the exact area (NashAE's numbers, kept)
    assert (ours >= _auroc_exact(x, y, 0.2) - 1e-12).all()


def test_one_code_per_attribute_captures_every_attribute():
    """Code k = 4 x attribute k + unit Gaussian noise: its AUROC is Phi(4 / sqrt 2) = (1 + erf 2) / 2
    and every other code's 0.5 (up to sampling noise, and the grid's small overestimate), so TAD is
    about K x ((1 + erf 2) / 2 - 0.5) with every attribute captured."""
    y = independent_attributes(20000, 4)
    x = np.concatenate([4 * y + noise_codes(20000, 4), noise_codes(20000, 2, seed=2)], axis=1)
    expected = 4 * ((1 + math.erf(2)) / 2 - 0.5)
    for auroc in ("grid", "exact"):
        scores = tad(x, y, auroc=auroc)
        assert scores["num_captured"] == 4
        # the second best is a little above 0.5 (the better of two directions of noise): TAD a little below
        assert expected - 0.15 < scores["tad"] < expected + 0.02
    assert set(scores) == {"tad", "num_captured"} and isinstance(scores["num_captured"], int)
    # a binary code is a coarse ROC curve: NashAE's upper sum credits an unrelated one with ~0.58
    binary = y + 0.01 * noise_codes(20000, 4)
    assert tad(binary, y)["tad"] < tad(binary, y, auroc="exact")["tad"] - 0.2


def test_an_attribute_held_by_two_codes_adds_nothing():
    y = independent_attributes(4000, 3)
    x = np.concatenate([y + 0.01 * noise_codes(4000, 3), y[:, :1] + 0.01 * noise_codes(4000, 1, seed=3)], axis=1)
    separate = tad(x[:, :3], y, auroc="exact")
    duplicated = tad(x, y, auroc="exact")
    assert duplicated["num_captured"] == separate["num_captured"] == 3  # captured, yet
    assert separate["tad"] - duplicated["tad"] == pytest.approx(0.5, abs=0.05)  # attribute 0's gap is gone


def test_noise_and_flat_codes_capture_nothing():
    y = independent_attributes(4000, 4)
    assert tad(noise_codes(4000, 6), y) == {"tad": 0.0, "num_captured": 0}
    # Quirk kept from NashAE: a code spanning less than min_range (0.2) counts as a random guess
    flat = 0.04 * (y + 0.01 * noise_codes(4000, 4))
    assert tad(flat, y)["num_captured"] == 0 and tad(flat, y, min_range=0.0)["num_captured"] == 4


def test_attributes_that_restate_another_are_left_out():
    """NashAE counts an attribute only when no other explains more than 20% of its entropy."""
    y = independent_attributes(4000, 3)
    flip = np.random.RandomState(4).rand(4000) < 0.02
    y = np.concatenate([y, (y[:, :1] ^ flip[:, None])], axis=1)  # attribute 3 = attribute 0, 2% flipped
    reduction = attribute_entropy_reduction(y)
    assert reduction[0] > 0.8 and reduction[3] > 0.8 and (reduction[1:3] < 0.01).all()
    x = y + 0.01 * noise_codes(4000, 4)
    assert tad(x, y)["num_captured"] == 2  # 1 and 2; 0 and 3 restate each other
    assert tad(x, y, max_entropy_reduction=1.0)["num_captured"] == 4


def test_entropy_reduction_matches_mutual_information_in_closed_form():
    """Two attributes equal with probability q, each fair: I = ln 2 - H_b(q), H = ln 2."""
    rs = np.random.RandomState(5)
    a = rs.randint(0, 2, 200000)
    q = 0.1
    b = a ^ (rs.rand(200000) < q)
    expected = (np.log(2) + q * np.log(q) + (1 - q) * np.log(1 - q)) / np.log(2)
    assert attribute_entropy_reduction(np.stack([a, b], 1)) == pytest.approx([expected] * 2, abs=0.01)


def test_constant_attributes_never_count_and_subsampling_is_seeded():
    y = independent_attributes(3000, 3)
    y[:, 2] = 1  # always true: no AUROC, no entropy
    x = y + 0.01 * noise_codes(3000, 3)
    assert tad(x, y)["num_captured"] == 2
    a, b = tad(x, y, num_samples=500, seed=1), tad(x, y, num_samples=500, seed=1)
    assert a == b and tad(x, y, num_samples=500, seed=2) != a


@pytest.mark.parametrize(
    "codes, attributes, message",
    [
        (np.zeros((10, 3)), np.zeros((9, 2)), "one row per code"),
        (np.zeros((10, 3)), np.full((10, 2), -1), "0 or 1"),
        (np.zeros((10, 1)), np.zeros((10, 2)), "C >= 2"),
        (np.full((10, 3), np.nan), np.zeros((10, 2)), "NaN"),
    ],
)
def test_bad_inputs_raise_value_error(codes, attributes, message):
    with pytest.raises(ValueError, match=message):
        tad(codes, attributes)
    with pytest.raises(ValueError, match="auroc"):
        tad(np.zeros((10, 3)), np.zeros((10, 2)), auroc="trapezoid")


def test_evaluation_scores_what_the_dataset_is_labelled_with():
    """A factor grid gets the factor metrics, attribute labels (CelebA) TAD, an image folder nothing."""
    from encdiff.evaluation import describe_data, score_codes

    class Labelled:
        def __init__(self, name, factor_sizes=None, attributes=None):
            self.name, self.path, self.factor_sizes, self.attributes = name, "somewhere", factor_sizes, attributes
            self.factor_names = None if factor_sizes is None else tuple(f"f{k}" for k in range(len(factor_sizes)))
            self.attribute_names = None if attributes is None else tuple(f"a{k}" for k in range(attributes.shape[1]))

        def __len__(self):
            return 400

    y = independent_attributes(400, 3)
    codes = 4 * y + noise_codes(400, 3)
    celeba, folder, grid = Labelled("celeba", attributes=y), Labelled("imagefolder"), Labelled("h5", (20, 20))
    scores = score_codes(codes, celeba, seed=0)
    assert scores == {"tad": tad(codes, y)} and scores["tad"]["num_captured"] == 3
    assert score_codes(codes, folder) == {}
    assert set(score_codes(noise_codes(400, 3), grid, metrics=["mig"], quick=True)) == {"mig"}
    assert describe_data(celeba).endswith("400 images, no factor grid, 3 attributes")
    assert describe_data(folder).endswith("no factor grid, no attributes")
    assert describe_data(grid).endswith("factors f0 20, f1 20")
