"""Disentanglement metrics, computed the way disentanglement_lib computes them.

The representation of the whole factor grid is given once: `codes` is (N, C), row i the code of
dataset index i, N = prod(factor_sizes), rows in row-major factor order (last factor fastest).
Each metric samples factor vectors with its own np.random.RandomState(seed), drawing random numbers
in the same order as disentanglement_lib, and looks the codes up by index instead of running a
model. Defaults are those of disentanglement_lib's unsupervised study (the numbers papers report).

    from encdiff.metrics import compute_all
    scores = compute_all(codes, (10, 10, 10, 8, 4, 15))           # every metric, paper defaults
    scores = compute_all(codes, sizes, metrics="dci,mig", quick=True)

Where disentanglement_lib has a quirk that changes the numbers, it is kept and marked "Quirk".
"""

import math
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import joblib
import numpy as np
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import mutual_info_score, roc_auc_score
from sklearn.svm import LinearSVC

from encdiff.errors import UserError

# disentanglement_lib's generate_batch_factor_code samples (factors, codes) 16 points at a time;
# the batch size decides how the random stream is cut, so it is part of the numbers.
SAMPLE_BATCH = 16


# ----------------------------------------------------------------------------------------------
# Inputs


def _check_inputs(codes, factor_sizes):
    """Validate (codes, factor_sizes); return codes as an (N, C) array and the sizes as a tuple."""
    try:
        sizes = tuple(int(s) for s in factor_sizes)
    except (TypeError, ValueError):
        raise ValueError(f"factor_sizes must be a list of integers, got {factor_sizes!r}") from None
    if len(sizes) < 2 or min(sizes) < 2:
        raise ValueError(f"factor_sizes must list at least 2 factors of at least 2 values each, got {sizes}")
    codes = np.asarray(codes)
    if codes.ndim != 2 or not np.issubdtype(codes.dtype, np.number):
        raise ValueError(f"codes must be a numeric (N, C) array, got shape {codes.shape} of {codes.dtype}")
    if codes.shape[0] != math.prod(sizes):
        raise ValueError(
            f"codes has {codes.shape[0]} rows but factor_sizes {sizes} describe a grid of {math.prod(sizes)} rows"
        )
    if codes.shape[1] < 2:
        raise ValueError(f"codes must have at least 2 dimensions to be scored, got {codes.shape[1]}")
    if not np.isfinite(codes).all():
        raise ValueError("codes contain NaN or infinite values")
    # float32 codes stay float32 (an encoder's output, as in disentanglement_lib): variances and
    # histograms are then computed at the same precision as there.
    if codes.dtype not in (np.float32, np.float64):
        codes = codes.astype(np.float64)
    return codes, sizes


def _check_count(name, value, minimum=1):
    if not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


# ----------------------------------------------------------------------------------------------
# Sampling: the RandomState calls of disentanglement_lib, in the same order, with a lookup for
# its representation_function.


def factor_index(factors, factor_sizes):
    """Row-major dataset index of each factor vector: factors (..., K) -> (...) int64."""
    strides = np.cumprod((list(factor_sizes) + [1])[:0:-1])[::-1]  # prod(sizes[k+1:]) for each k
    return np.asarray(factors, dtype=np.int64) @ strides.astype(np.int64)


def _sample_factors(rs, sizes, num):
    """(num, K) uniform factor vectors: one randint call per factor, in factor order, as
    disentanglement_lib's SplitDiscreteStateSpace.sample_latent_factors does."""
    factors = np.zeros((num, len(sizes)), dtype=np.int64)
    for k, size in enumerate(sizes):
        factors[:, k] = rs.randint(size, size=num)
    return factors


def _sample_codes_and_factors(rs, codes, sizes, num, batch_size=SAMPLE_BATCH):
    """num (code, factors) pairs drawn batch by batch: codes (num, C), factors (num, K)."""
    factors = np.concatenate(
        [_sample_factors(rs, sizes, min(batch_size, num - start)) for start in range(0, num, batch_size)]
    )
    return codes[factor_index(factors, sizes)], factors


def _histogram_discretize(x, num_bins):
    """Each column of x (N, C) into num_bins equal-width bins between its min and max.

    Quirk: disentanglement_lib digitizes against the left bin edges (histogram edges[:-1]), so the
    bins are numbered 1..num_bins and a column's maximum falls in the last bin; the result keeps
    the dtype of x (np.zeros_like), which mutual_info_score treats as labels all the same.
    """
    out = np.zeros_like(x)
    for c in range(x.shape[1]):
        out[:, c] = np.digitize(x[:, c], np.histogram(x[:, c], num_bins)[1][:-1])
    return out


def _mutual_info(discrete_codes, factors):
    """(C, K) mutual information in nats between each discretised code and each factor."""
    return np.array(
        [
            [mutual_info_score(factors[:, k], discrete_codes[:, c]) for k in range(factors.shape[1])]
            for c in range(discrete_codes.shape[1])
        ]
    )


def _as_python(scores):
    """numpy scalars -> float/int, so the dicts go straight into json."""
    return {k: int(v) if isinstance(v, (int, np.integer)) else float(v) for k, v in scores.items()}


# ----------------------------------------------------------------------------------------------
# FactorVAE score (Kim & Mnih 2018; disentanglement_lib factor_vae.py)


def _factor_vae_votes(rs, codes, sizes, num_votes, batch_size, global_var, active):
    """(K, C) vote counts: each vote fixes one factor over a batch and names the active code with
    the smallest normalised variance."""
    # The draws happen vote by vote in disentanglement_lib's order (randint(K), then a batch of
    # factors); the variances are then computed for all votes at once.
    fixed = np.zeros(num_votes, dtype=np.int64)
    index = np.zeros((num_votes, batch_size), dtype=np.int64)
    for v in range(num_votes):
        fixed[v] = rs.randint(len(sizes))
        factors = _sample_factors(rs, sizes, batch_size)
        factors[:, fixed[v]] = factors[0, fixed[v]]
        index[v] = factor_index(factors, sizes)
    argmin = np.zeros(num_votes, dtype=np.int64)
    for start in range(0, num_votes, 1024):  # chunks keep the gathered codes small
        batch = codes[index[start : start + 1024]][:, :, active]  # (votes, batch_size, active dims)
        local_var = np.var(batch, axis=1, ddof=1)
        # argmin indexes the active dims only, as in disentanglement_lib: votes land in the first
        # num_active columns, which is harmless since columns are only compared with themselves.
        argmin[start : start + 1024] = np.argmin(local_var / global_var[active], axis=1)
    votes = np.zeros((len(sizes), codes.shape[1]), dtype=np.int64)
    np.add.at(votes, (fixed, argmin), 1)
    return votes


def factor_vae_score(
    codes,
    factor_sizes,
    *,
    seed=0,
    num_variance_estimate=10000,
    num_train=10000,
    num_eval=5000,
    batch_size=64,
    prune_threshold=0.05,
):
    """FactorVAE score: accuracy of a majority vote from lowest-variance code to fixed factor.

    Returns {"train_accuracy", "eval_accuracy", "num_active_dims"}.
    """
    codes, sizes = _check_inputs(codes, factor_sizes)
    for name, value in [
        ("num_variance_estimate", num_variance_estimate),
        ("num_train", num_train),
        ("num_eval", num_eval),
    ]:
        _check_count(name, value)
    _check_count("batch_size", batch_size, 2)
    rs = np.random.RandomState(seed)
    # One sample_observations(num_variance_estimate) call: a single randint per factor.
    factors = _sample_factors(rs, sizes, num_variance_estimate)
    global_var = np.var(codes[factor_index(factors, sizes)], axis=0, ddof=1)
    active = np.sqrt(global_var) >= prune_threshold
    if not active.any():
        return {"train_accuracy": 0.0, "eval_accuracy": 0.0, "num_active_dims": 0}
    train_votes = _factor_vae_votes(rs, codes, sizes, num_train, batch_size, global_var, active)
    classifier = np.argmax(train_votes, axis=0)  # (C,) the factor each code votes for most
    columns = np.arange(train_votes.shape[1])
    train_accuracy = train_votes[classifier, columns].sum() / train_votes.sum()
    eval_votes = _factor_vae_votes(rs, codes, sizes, num_eval, batch_size, global_var, active)
    eval_accuracy = eval_votes[classifier, columns].sum() / eval_votes.sum()
    # disentanglement_lib reports len(active) here, which is the number of all dims (active is a
    # mask); we report the active ones. The scores do not depend on it.
    return _as_python(
        {"train_accuracy": train_accuracy, "eval_accuracy": eval_accuracy, "num_active_dims": int(active.sum())}
    )


# ----------------------------------------------------------------------------------------------
# DCI (Eastwood & Williams 2018; disentanglement_lib dci.py)


def _entropy(p, base, axis):
    """Shannon entropy of p normalised along axis, in the given base (scipy.stats.entropy)."""
    p = p / p.sum(axis=axis, keepdims=True)
    return -(p * np.log(p)).sum(axis=axis) / np.log(base)


def disentanglement(importance):
    """DCI disentanglement of importance (codes x factors): sum_i rho_i (1 - H_K(R_i.))."""
    # Quirk: 1e-11 is added before normalising, so an all-zero row has entropy 1 (score 0).
    per_code = 1.0 - _entropy(importance + 1e-11, base=importance.shape[1], axis=1)
    if importance.sum() == 0.0:
        importance = np.ones_like(importance)
    return float(np.sum(per_code * importance.sum(axis=1) / importance.sum()))


def completeness(importance):
    """DCI completeness of an importance matrix (codes x factors): sum_j rho_j (1 - H_C(R_.j))."""
    per_factor = 1.0 - _entropy(importance + 1e-11, base=importance.shape[0], axis=0)
    if importance.sum() == 0.0:
        importance = np.ones_like(importance)
    return float(np.sum(per_factor * importance.sum(axis=0) / importance.sum()))


def _fit_gbt(x_train, y_train, x_test, y_test, random_state):
    """A GradientBoostingClassifier, sklearn defaults: |importances| (C,), train/test accuracy."""
    model = GradientBoostingClassifier(random_state=random_state).fit(x_train, y_train)
    return (
        np.abs(model.feature_importances_),
        np.mean(model.predict(x_train) == y_train),
        np.mean(model.predict(x_test) == y_test),
    )


def _n_workers(n_jobs, n_tasks):
    n = joblib.cpu_count() if n_jobs is None else int(n_jobs)
    if n == 0 or n < -1:
        raise ValueError(f"n_jobs must be a positive number of processes, -1 or None, got {n_jobs!r}")
    return min(joblib.cpu_count() if n == -1 else n, n_tasks)


def dci(codes, factor_sizes, *, seed=0, num_train=10000, num_test=5000, n_jobs=None):
    """DCI disentanglement, completeness and informativeness from gradient-boosted trees.

    One sklearn GradientBoostingClassifier (defaults) per factor, fitted in parallel processes
    (n_jobs None: all cores). Returns {"disentanglement", "completeness", "informativeness_train",
    "informativeness_test"}; informativeness is the mean accuracy over factors, as there.
    """
    codes, sizes = _check_inputs(codes, factor_sizes)
    _check_count("num_train", num_train)
    _check_count("num_test", num_test)
    rs = np.random.RandomState(seed)
    x_train, y_train = _sample_codes_and_factors(rs, codes, sizes, num_train)
    x_test, y_test = _sample_codes_and_factors(rs, codes, sizes, num_test)
    # disentanglement_lib leaves the trees' random_state at None (numpy's global RNG); it only
    # breaks ties between equally good splits, e.g. between duplicated codes. Seeds drawn after
    # the samples make the result reproducible without changing them.
    tree_seeds = rs.randint(2**31 - 1, size=len(sizes))
    # Trees see float32 (sklearn converts); a column-major copy makes the per-feature split scans
    # contiguous (a few percent faster here) and gives the same trees.
    x_train = np.asfortranarray(x_train, dtype=np.float32)
    x_test = np.asfortranarray(x_test, dtype=np.float32)
    # The cost of a fit grows with the number of classes (one tree per class and stage), so the
    # largest factors go first: the slowest fit starts at once and the rest fill the other cores.
    order = sorted(range(len(sizes)), key=lambda k: -sizes[k])
    fits = joblib.Parallel(n_jobs=_n_workers(n_jobs, len(sizes)), batch_size=1)(
        joblib.delayed(_fit_gbt)(x_train, y_train[:, k], x_test, y_test[:, k], tree_seeds[k]) for k in order
    )
    importance = np.zeros((codes.shape[1], len(sizes)))  # (C, K) as in disentanglement_lib
    train_acc, test_acc = np.zeros(len(sizes)), np.zeros(len(sizes))
    for k, (imp, acc_train, acc_test) in zip(order, fits):
        importance[:, k], train_acc[k], test_acc[k] = imp, acc_train, acc_test
    return _as_python(
        {
            "disentanglement": disentanglement(importance),
            "completeness": completeness(importance),
            "informativeness_train": train_acc.mean(),
            "informativeness_test": test_acc.mean(),
        }
    )


# ----------------------------------------------------------------------------------------------
# MIG (Chen et al. 2018; disentanglement_lib mig.py)


def mig(codes, factor_sizes, *, seed=0, num_train=10000, num_bins=20):
    """Mutual information gap: per factor (top MI - second MI) / H(factor), averaged.

    Codes are discretised into num_bins equal-width histogram bins; MI in nats. Returns
    {"discrete_mig"}.
    """
    codes, sizes = _check_inputs(codes, factor_sizes)
    _check_count("num_train", num_train, 2)
    _check_count("num_bins", num_bins)
    rs = np.random.RandomState(seed)
    x, y = _sample_codes_and_factors(rs, codes, sizes, num_train)
    mi = _mutual_info(_histogram_discretize(x, num_bins), y)  # (C, K)
    entropy = np.array([mutual_info_score(y[:, k], y[:, k]) for k in range(len(sizes))])
    top = np.sort(mi, axis=0)[::-1]  # (C, K) descending per factor
    return _as_python({"discrete_mig": np.mean((top[0] - top[1]) / entropy)})


# ----------------------------------------------------------------------------------------------
# SAP (Kumar et al. 2018; disentanglement_lib sap_score.py, discrete factors as in the study)


def _sap_score_matrix(x_train, y_train, x_test, y_test, seeds):
    """(C, K) test accuracy of a linear SVM predicting factor k from code c alone."""
    scores = np.zeros((x_train.shape[1], y_train.shape[1]))
    for c in range(x_train.shape[1]):
        for k in range(y_train.shape[1]):
            # dual=True was LinearSVC's default when disentanglement_lib was written (sklearn now
            # picks "auto"); liblinear shuffles with random_state, None there, seeded here.
            svm = LinearSVC(C=0.01, class_weight="balanced", dual=True, random_state=seeds[c, k])
            svm.fit(x_train[:, c : c + 1], y_train[:, k])
            scores[c, k] = np.mean(svm.predict(x_test[:, c : c + 1]) == y_test[:, k])
    return scores


def _sap_score_matrix_continuous(x, y):
    """(C, K) squared correlation of code c with factor k (0 for a constant code)."""
    scores = np.zeros((x.shape[1], y.shape[1]))
    for c in range(x.shape[1]):
        for k in range(y.shape[1]):
            cov = np.cov(x[:, c], y[:, k], ddof=1)  # (2, 2)
            if cov[0, 0] > 1e-12:
                scores[c, k] = cov[0, 1] ** 2 / (cov[0, 0] * cov[1, 1])
    return scores


def sap(codes, factor_sizes, *, seed=0, num_train=10000, num_test=5000, continuous_factors=False):
    """SAP score: per factor, the gap between the two codes that predict it best on their own.

    Discrete factors (the default, as in disentanglement_lib's study): the score matrix holds test
    accuracies of one-feature LinearSVC(C=0.01, balanced). Continuous factors: squared correlations
    on the training set. Returns {"sap_score"}.
    """
    codes, sizes = _check_inputs(codes, factor_sizes)
    _check_count("num_train", num_train, 2)
    _check_count("num_test", num_test)
    rs = np.random.RandomState(seed)
    x_train, y_train = _sample_codes_and_factors(rs, codes, sizes, num_train)
    # The test set is drawn in both cases, as there, although only the SVMs use it.
    x_test, y_test = _sample_codes_and_factors(rs, codes, sizes, num_test)
    if continuous_factors:
        scores = _sap_score_matrix_continuous(x_train, y_train)
    else:
        seeds = rs.randint(2**31 - 1, size=(codes.shape[1], len(sizes)))
        with warnings.catch_warnings():
            # liblinear hits its iteration cap on codes that do not separate the classes;
            # disentanglement_lib keeps such fits too.
            warnings.simplefilter("ignore", ConvergenceWarning)
            scores = _sap_score_matrix(x_train, y_train, x_test, y_test, seeds)
    top = np.sort(scores, axis=0)  # (C, K) ascending per factor
    return _as_python({"sap_score": np.mean(top[-1] - top[-2])})


# ----------------------------------------------------------------------------------------------
# beta-VAE score (Higgins et al. 2017; disentanglement_lib beta_vae.py, the sklearn version)


def _beta_vae_points(rs, codes, sizes, num_points, batch_size):
    """(num_points, C) mean |code1 - code2| over pairs sharing one factor; that factor's index."""
    labels = np.zeros(num_points, dtype=np.int64)
    index = np.zeros((num_points, 2, batch_size), dtype=np.int64)
    for p in range(num_points):
        labels[p] = rs.randint(len(sizes))
        factors1 = _sample_factors(rs, sizes, batch_size)
        factors2 = _sample_factors(rs, sizes, batch_size)
        factors2[:, labels[p]] = factors1[:, labels[p]]
        index[p] = factor_index(factors1, sizes), factor_index(factors2, sizes)
    points = np.zeros((num_points, codes.shape[1]))
    for start in range(0, num_points, 1024):  # chunks keep the gathered codes small
        pairs = codes[index[start : start + 1024]]  # (points, 2, batch_size, C)
        points[start : start + 1024] = np.abs(pairs[:, 0] - pairs[:, 1]).mean(axis=1)
    return points, labels


def beta_vae_score(codes, factor_sizes, *, seed=0, num_train=10000, num_eval=5000, batch_size=64):
    """beta-VAE score: accuracy of a logistic regression predicting the fixed factor of a pair batch
    from the mean absolute code difference. Returns {"train_accuracy", "eval_accuracy"}."""
    codes, sizes = _check_inputs(codes, factor_sizes)
    _check_count("num_train", num_train)
    _check_count("num_eval", num_eval)
    _check_count("batch_size", batch_size)
    rs = np.random.RandomState(seed)
    train_x, train_y = _beta_vae_points(rs, codes, sizes, num_train, batch_size)
    if len(np.unique(train_y)) < 2:
        raise ValueError(f"beta_vae_score: num_train={num_train} is too small to see 2 factors")
    # disentanglement_lib passes its RandomState to LogisticRegression; today's default solver
    # (lbfgs, multinomial) does not use it, so the eval set draws from the same stream as there.
    # Its 2018 study ran sklearn < 0.22, whose default was liblinear one-vs-rest; papers since
    # (EncDiff's evaluation included) ran it with a recent sklearn, as here.
    model = LogisticRegression(random_state=rs)
    with warnings.catch_warnings():
        # sklearn's default of 100 iterations is kept, as there.
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(train_x, train_y)
    train_accuracy = np.mean(model.predict(train_x) == train_y)
    eval_x, eval_y = _beta_vae_points(rs, codes, sizes, num_eval, batch_size)
    return _as_python({"train_accuracy": train_accuracy, "eval_accuracy": model.score(eval_x, eval_y)})


# ----------------------------------------------------------------------------------------------
# Modularity and explicitness (Ridgeway & Mozer 2018; disentanglement_lib
# modularity_explicitness.py)


def modularity(mutual_info):
    """Mean over codes of 1 - (sum of squared MI but the largest) / (largest * (K - 1)).

    mutual_info is (codes x factors). Quirk: a code with no information scores 0 and still counts
    in the mean.
    """
    squared = np.square(mutual_info)
    top = squared.max(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        score = 1.0 - (squared.sum(axis=1) - top) / (top * (squared.shape[1] - 1.0))
    score[top == 0.0] = 0.0
    return float(np.mean(score))


def _explicitness(x_train, y_train, x_test, y_test, num_values):
    """Train and test ROC-AUC (macro over factor values) of a logistic regression on all codes."""
    with warnings.catch_warnings():
        # sklearn's default of 100 iterations is kept, as there.
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = LogisticRegression().fit(x_train, y_train)

    def auc(x, y):
        # (N, num_values) probabilities; values never seen in training get probability 0.
        proba = np.zeros((len(x), num_values))
        proba[:, model.classes_] = model.predict_proba(x)
        onehot = np.eye(num_values, dtype=np.int64)[y]  # (N, num_values)
        # disentanglement_lib one-hot encodes only the values present in y and fails when a value
        # is missing; scoring the columns with both positives and negatives gives its number
        # whenever it has one, and a number for small samples too.
        scored = (onehot.sum(axis=0) > 0) & (onehot.sum(axis=0) < len(y))
        return roc_auc_score(onehot[:, scored], proba[:, scored])

    return auc(x_train, y_train), auc(x_test, y_test)


def modularity_explicitness(codes, factor_sizes, *, seed=0, num_train=10000, num_test=5000, num_bins=20):
    """Modularity (from histogram MI) and explicitness (ROC-AUC of logistic regression per factor).

    Returns {"modularity_score", "explicitness_score_train", "explicitness_score_test"}.
    """
    codes, sizes = _check_inputs(codes, factor_sizes)
    _check_count("num_train", num_train, 2)
    _check_count("num_test", num_test, 2)
    _check_count("num_bins", num_bins)
    rs = np.random.RandomState(seed)
    x_train, y_train = _sample_codes_and_factors(rs, codes, sizes, num_train)
    x_test, y_test = _sample_codes_and_factors(rs, codes, sizes, num_test)
    modularity_score = modularity(_mutual_info(_histogram_discretize(x_train, num_bins), y_train))
    # Standardised with the training statistics (np.std, ddof 0). disentanglement_lib divides by a
    # zero std for a constant code and fails; such a code is left at 0 here.
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    auc = np.array(
        [_explicitness(x_train, y_train[:, k], x_test, y_test[:, k], size) for k, size in enumerate(sizes)]
    )  # (K, 2) train, test
    return _as_python(
        {
            "modularity_score": modularity_score,
            "explicitness_score_train": auc[:, 0].mean(),
            "explicitness_score_test": auc[:, 1].mean(),
        }
    )


# ----------------------------------------------------------------------------------------------
# TAD, Total AUROC Difference (Yeats et al. 2022, "NashAE"), the CelebA score of DisDiff and EncDiff.
# It needs attribute labels instead of a factor grid, so it is not in METRICS: call it directly.


def _check_attributes(codes, attributes):
    """Validate (codes (N, C), attributes (N, K) in {0, 1}); return them as float64 and int32."""
    codes, attributes = np.asarray(codes), np.asarray(attributes)
    if codes.ndim != 2 or not np.issubdtype(codes.dtype, np.number) or codes.shape[1] < 2:
        raise ValueError(f"codes must be a numeric (N, C) array with C >= 2, got shape {codes.shape} of {codes.dtype}")
    if not np.isfinite(codes).all():
        raise ValueError("codes contain NaN or infinite values")
    if attributes.ndim != 2 or len(attributes) != len(codes):
        raise ValueError(
            f"attributes must be an (N, K) array with N = {len(codes)} (one row per code), got shape {attributes.shape}"
        )
    if not np.isin(attributes, (0, 1)).all():
        raise ValueError("attributes must hold 0 or 1 (convert CelebA's -1/1 labels first)")
    return codes.astype(np.float64), attributes.astype(np.int32)


def _roc_area(fpr, tpr):
    """Area under (T, K) ROC points, NashAE's way: each column sorted on its own, then the sum of
    tpr[i] * (fpr[i] - fpr[i - 1]) (the upper Riemann sum between the thresholds)."""
    fpr, tpr = np.sort(fpr, axis=0), np.sort(tpr, axis=0)
    return (tpr[1:] * np.diff(fpr, axis=0)).sum(axis=0)  # (K,)


def _auroc_grid(codes, attributes, min_range, num_thresholds=101):
    """(K, C) AUROC of code c as a detector of attribute k, in the better of the two directions.

    Quirk (NashAE's calculate_auroc, kept by DisDiff and EncDiff): the ROC curve is sampled at 101
    thresholds evenly spaced between the code's min and max, and a code whose range is at most
    min_range scores 0.5 (a random guess) for every attribute. The upper sum overestimates: the
    rank-based exact AUROC (auroc="exact") is about 0.01 lower on smooth codes, 0.1 and more on
    heavy-tailed or discrete ones."""
    n, (C, K) = len(codes), (codes.shape[1], attributes.shape[1])
    pos = attributes.sum(0)  # (K,)
    neg = n - pos
    steps = np.arange(num_thresholds) / (num_thresholds - 1)
    out = np.full((K, C), 0.5)
    with np.errstate(divide="ignore", invalid="ignore"):
        for c in range(C):
            col = codes[:, c]
            lo, hi = col.min(), col.max()
            if hi - lo <= min_range:
                continue
            order = np.argsort(col, kind="stable")
            below_pos = np.zeros((n + 1, K), np.int64)
            np.cumsum(attributes[order], axis=0, out=below_pos[1:])  # positives among the i smallest codes
            below = np.searchsorted(col[order], lo + steps * (hi - lo), side="left")  # (T,) codes < threshold
            tp_below = below_pos[below]  # (T, K)
            fp_below = below[:, None] - tp_below
            at_least = _roc_area((neg - fp_below) / neg, (pos - tp_below) / pos)  # "code >= threshold" detects
            less = _roc_area(fp_below / neg, tp_below / pos)  # "code < threshold" detects
            out[:, c] = np.maximum(at_least, less)
    out[(pos == 0) | (neg == 0)] = 0.5  # an attribute that never (or always) holds cannot be detected
    return out


def _auroc_exact(codes, attributes, min_range):
    """(K, C) exact AUROC (Mann-Whitney, ties counted half) in the better direction; the same
    min_range rule as _auroc_grid."""
    n, C = codes.shape
    pos = attributes.sum(0).astype(np.float64)  # (K,)
    neg = n - pos
    out = np.full((attributes.shape[1], C), 0.5)
    with np.errstate(divide="ignore", invalid="ignore"):
        for c in range(C):
            col = codes[:, c]
            if col.max() - col.min() <= min_range:
                continue
            order = np.argsort(col, kind="stable")
            s = col[order]
            first = np.r_[True, s[1:] != s[:-1]]  # the first of each run of equal values
            starts = np.flatnonzero(first)
            ends = np.r_[starts[1:], n]
            ranks = np.empty(n)
            ranks[order] = ((starts + 1 + ends) / 2)[np.cumsum(first) - 1]  # 1-based, ties averaged
            auc = (attributes.T @ ranks - pos * (pos + 1) / 2) / (pos * neg)
            out[:, c] = np.maximum(auc, 1 - auc)
    out[(pos == 0) | (neg == 0)] = 0.5
    return out


def attribute_entropy_reduction(attributes):
    """(K,) for each attribute, the largest share of its entropy that one other attribute explains:
    max_j I(a_k; a_j) / H(a_k) (nats; NaN for an attribute that never or always holds)."""
    y = attributes.astype(np.float64)
    n = len(y)
    p1 = y.mean(0)
    cells = [
        ((1 - y).T @ (1 - y) / n, 1 - p1, 1 - p1),
        ((1 - y).T @ y / n, 1 - p1, p1),
        (y.T @ (1 - y) / n, p1, 1 - p1),
        (y.T @ y / n, p1, p1),
    ]  # (joint (K, K), p_k, p_j) of each cell
    mi = np.zeros((y.shape[1],) * 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        for joint, pk, pj in cells:
            mi += np.where(joint > 0, joint * np.log(joint / (pk[:, None] * pj[None, :])), 0.0)
        entropy = np.diag(mi).copy()  # I(a; a) = H(a)
        np.fill_diagonal(mi, 0.0)
        return mi.max(1) / entropy


def tad(
    codes,
    attributes,
    *,
    threshold=0.75,
    max_entropy_reduction=0.2,
    min_range=0.2,
    auroc="grid",
    num_samples=None,
    seed=0,
):
    """TAD: for each attribute, the AUROC of every code dimension as its detector; an attribute is
    captured when its best AUROC is at least `threshold` (0.75) and no other attribute explains
    more than `max_entropy_reduction` (0.2) of its entropy (NashAE leaves out attributes that mostly
    restate another one); TAD sums, over the captured attributes, best minus second-best AUROC.

    codes (N, C), attributes (N, K) in {0, 1} (CelebA: 40). auroc = "grid" (NashAE's 101-threshold
    curve, the published numbers) or "exact". num_samples: score a random subset of that many rows
    (np.random.RandomState(seed)); None: all rows. -> {"tad": float, "num_captured": int}."""
    codes, attributes = _check_attributes(codes, attributes)
    if auroc not in ("grid", "exact"):
        raise ValueError(f"tad: auroc must be 'grid' or 'exact', got {auroc!r}")
    if num_samples is not None:
        _check_count("num_samples", num_samples, minimum=2)
        if num_samples < len(codes):
            rows = np.random.RandomState(seed).choice(len(codes), num_samples, replace=False)
            codes, attributes = codes[rows], attributes[rows]
    aurocs = (_auroc_grid if auroc == "grid" else _auroc_exact)(codes, attributes, min_range)  # (K, C)
    top_two = np.sort(aurocs, axis=1)[:, -2:]  # (K, 2): second best, best
    with np.errstate(invalid="ignore"):
        captured = (top_two[:, 1] >= threshold) & (attribute_entropy_reduction(attributes) <= max_entropy_reduction)
    gap = top_two[:, 1] - top_two[:, 0]
    return _as_python({"tad": gap[captured].sum(), "num_captured": int(captured.sum())})


# ----------------------------------------------------------------------------------------------
# All of them

METRICS = {
    "factor_vae": factor_vae_score,
    "dci": dci,
    "mig": mig,
    "sap": sap,
    "beta_vae": beta_vae_score,
    "modularity_explicitness": modularity_explicitness,
}

# Small sample counts for tests and smoke runs (--quick): seconds, not minutes, and noisy numbers.
QUICK = {
    "factor_vae": dict(num_variance_estimate=1000, num_train=500, num_eval=250),
    "dci": dict(num_train=1000, num_test=500),
    "mig": dict(num_train=1000),
    "sap": dict(num_train=1000, num_test=500),
    "beta_vae": dict(num_train=500, num_eval=250),
    "modularity_explicitness": dict(num_train=1000, num_test=500),
}


def metric_names(metrics=None):
    """The requested metric names (None: all; a list or a comma-separated string), validated."""
    if metrics is None:
        return list(METRICS)
    names = [m.strip() for m in metrics.split(",")] if isinstance(metrics, str) else list(metrics)
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise UserError(
            f"unknown metric {', '.join(map(repr, unknown)) or '(none given)'}; choose from {', '.join(METRICS)}"
        )
    return names


def compute_all(codes, factor_sizes, metrics=None, seed=0, quick=False, n_jobs=None, report=None):
    """Compute the named metrics (default: all) -> {name: scores dict}, in the order asked;
    report(name, seconds), when given, as each one finishes.

    DCI's tree fits run in worker processes while the other metrics run here, so on a machine
    with more cores than factors the whole suite takes about as long as the slowest tree fit.
    """
    names = metric_names(metrics)
    codes, sizes = _check_inputs(codes, factor_sizes)
    t0 = time.perf_counter()

    def run(name):
        kwargs = dict(QUICK[name]) if quick else {}
        if name == "dci":
            kwargs["n_jobs"] = n_jobs
        start = time.perf_counter()
        result = METRICS[name](codes, sizes, seed=seed, **kwargs)
        if report is not None and name != "dci":
            report(name, time.perf_counter() - start)
        return result

    results = {}
    with ThreadPoolExecutor(max_workers=1) as background:
        pending = background.submit(run, "dci") if "dci" in names else None
        for name in names:
            if name != "dci":
                results[name] = run(name)
        if pending is not None:
            results["dci"] = pending.result()
            if report is not None:
                report("dci", time.perf_counter() - t0)
    return {name: results[name] for name in names}


# ---------------------------------------------------------------------------------------------
# which factor each code carries (a diagnostic, not a disentanglement score)


def code_factor_nmi(codes, factors, factor_sizes, bins=20):
    """codes (N, C) float, factors (N, F) int in [0, size) -> (C, F): I(code_i binned; factor_j) /
    H(factor_j), codes in `bins` equal-width bins. 1: the code determines the factor; 0: it says
    nothing about it. A factor whose best value stays low is not encoded at all, which FactorVAE and
    DCI (how disentangled) cannot say."""
    codes, factors = np.asarray(codes), np.asarray(factors)
    if codes.ndim != 2 or factors.shape != (len(codes), len(factor_sizes)):
        raise ValueError(
            f"code_factor_nmi: codes {codes.shape} and factors {factors.shape} do not match {len(factor_sizes)} factors"
        )
    nmi = np.zeros((codes.shape[1], len(factor_sizes)))
    for i in range(codes.shape[1]):
        edges = np.histogram_bin_edges(codes[:, i], bins)
        binned = np.digitize(codes[:, i], edges[1:-1])  # (N,) in [0, bins)
        for j, size in enumerate(factor_sizes):
            if size > 1:
                nmi[i, j] = mutual_info_score(factors[:, j], binned) / np.log(size)
    return nmi
