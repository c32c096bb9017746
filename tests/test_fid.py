"""FID: the Frechet distance against closed forms, the Inception network's shape and variants, and
loading user weights files (random ones written here) with every mistake as one UserError."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from encdiff.errors import UserError
from encdiff.fid import FEATURES, InceptionV3, fid_from_features, frechet_distance, load_inception


def random_spd(d, rs, rank=None):
    a = rs.randn(d, rank or d)
    return a @ a.T / (rank or d) + (0 if rank else 0.1 * np.eye(d))


def test_frechet_distance_of_commuting_covariances_is_the_closed_form():
    """S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T: d = |mu1 - mu2|^2 + sum (sqrt a - sqrt b)^2."""
    rs = np.random.RandomState(0)
    q, _ = np.linalg.qr(rs.randn(6, 6))
    a, b = rs.rand(6) + 0.1, rs.rand(6) * 3
    mu1, mu2 = rs.randn(6), rs.randn(6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu1, q @ np.diag(a) @ q.T, mu1, q @ np.diag(a) @ q.T) == pytest.approx(0, abs=1e-10)


def test_frechet_distance_of_general_covariances():
    """tr((S1 S2)^(1/2)) = sum of square roots of the (real, non-negative) eigenvalues of S1 S2,
    computed here the direct way, including a singular covariance (fewer samples than dimensions)."""
    rs = np.random.RandomState(1)
    for s1, s2 in ((random_spd(8, rs), random_spd(8, rs)), (random_spd(8, rs, rank=3), random_spd(8, rs))):
        mu1, mu2 = rs.randn(8), rs.randn(8)
        cross = np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)).sum()
        expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * cross
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8, abs=1e-9)
    with pytest.raises(ValueError, match="shapes differ"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_fid_of_shifted_features_is_the_squared_shift():
    rs = np.random.RandomState(2)
    features = rs.randn(50, 16) @ rs.randn(16, 16)  # correlated features
    shift = rs.randn(16)
    assert fid_from_features(features, features + shift) == pytest.approx(np.sum(shift**2), rel=1e-8)
    assert fid_from_features(features, 2 * features) > 0


def test_few_samples_take_the_small_svd_route_to_the_same_number():
    rs = np.random.RandomState(3)
    for n1, n2 in ((20, 30), (64, 64), (5, 2)):
        a, b = rs.randn(n1, 64) @ rs.randn(64, 64), rs.randn(n2, 64) + 0.5
        full = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
        assert fid_from_features(a, b) == pytest.approx(full, rel=1e-7)  # the full route rounds singular covariances


def test_inception_pool_features_and_the_two_variants():
    """Pool features (B, 2048). The TensorFlow FID graph and torchvision's differ only in pooling,
    so the same weights give other features; the state dict keys are torchvision's."""
    torch.manual_seed(0)
    tf, tv = InceptionV3("tf").eval(), InceptionV3("torchvision").eval()
    tv.load_state_dict(tf.state_dict())
    keys = list(tf.state_dict())
    assert keys[0] == "Conv2d_1a_3x3.conv.weight" and "Mixed_7c.branch_pool.bn.running_var" in keys
    assert "Mixed_6e.branch7x7dbl_5.conv.weight" in keys and "Mixed_7a.branch7x7x3_4.bn.weight" in keys
    x = torch.rand(2, 3, 75, 75) * 2 - 1  # the smallest input the network takes: cheap
    with torch.no_grad():
        f_tf, f_tv = tf(x, resize=False), tv(x, resize=False)
    assert f_tf.shape == f_tv.shape == (2, FEATURES) and torch.isfinite(f_tf).all()
    assert not torch.allclose(f_tf, f_tv)
    assert sum(p.numel() for p in tf.parameters()) == 21_785_568  # torchvision's 27,161,264 less fc and AuxLogits


@pytest.fixture(scope="module")
def full_state():
    torch.manual_seed(0)
    return {k: v.contiguous() for k, v in InceptionV3().state_dict().items()}


def test_loading_picks_the_variant_from_fc_and_keeps_every_weight(tmp_path, full_state):
    pth = tmp_path / "torchvision.pth"
    torch.save({"state_dict": {**full_state, "fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)}}, pth)
    model = load_inception(pth)
    assert model.variant == "torchvision" and not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert torch.equal(model.Mixed_7c.branch_pool.conv.weight, full_state["Mixed_7c.branch_pool.conv.weight"])

    sft = tmp_path / "fid.safetensors"
    save_file({k: v for k, v in full_state.items() if not k.endswith("num_batches_tracked")}, str(sft))
    assert load_inception(sft).variant == "tf"  # no fc (or 1008 rows): the TensorFlow FID graph


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "no such file"),
        ("garbage", "cannot read"),
        ("not a dict", "not a name -> tensor dict"),
        ("missing key", "lacks 'Conv2d_2a_3x3.conv.weight'"),
        ("wrong shape", "'Conv2d_1a_3x3.conv.weight' has shape (32, 1, 3, 3), expected (32, 3, 3, 3)"),
        ("not finite", "'Conv2d_1a_3x3.conv.weight' is not finite"),
    ],
)
def test_bad_weights_files_are_one_clear_error(tmp_path, full_state, case, message):
    path = tmp_path / "weights.pth"
    first = {k: v for k, v in full_state.items() if k.startswith("Conv2d_1a_3x3.")}  # a small, partial file
    if case == "garbage":
        path.write_bytes(b"\x00 certainly not a checkpoint")
    elif case == "not a dict":
        torch.save([torch.zeros(3)], path)
    elif case == "missing key":
        torch.save(first, path)
    elif case == "wrong shape":
        torch.save({**first, "Conv2d_1a_3x3.conv.weight": torch.zeros(32, 1, 3, 3)}, path)
    elif case == "not finite":
        torch.save({**first, "Conv2d_1a_3x3.conv.weight": torch.full((32, 3, 3, 3), float("nan"))}, path)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        load_inception(path)
    assert "\n" not in str(e.value) and "eval.inception_path" in str(e.value)
