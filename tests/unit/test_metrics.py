"""FID and KID against closed forms and hand computations."""
import itertools

import numpy as np
import pytest
import scipy.linalg
import torch

from trainer.metrics import fid_from_features, frechet_distance, kid_from_features


def _random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def _scipy_fid(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)  # tiny imaginary parts from rounding
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean))


def test_frechet_diagonal_equals_hand_formula():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)  # 1 + 6.25 + 4 + 1 = 12.25
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, abs=1e-10)
    assert expected == pytest.approx(12.25)


def test_frechet_commuting_covariances():
    # Same eigenvectors, different spectra: Tr sqrt(S1 S2) = sum sqrt(a_i b_i).
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    a, b = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    mu = rng.normal(size=5)
    assert frechet_distance(mu, s1, mu, s2) == pytest.approx(np.sum((np.sqrt(a) - np.sqrt(b)) ** 2), abs=1e-9)


def test_frechet_non_commuting_matches_scipy():
    rng = np.random.default_rng(1)
    for d in (2, 7, 32):
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
        assert not np.allclose(s1 @ s2, s2 @ s1)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_scipy_fid(mu1, s1, mu2, s2), rel=1e-7, abs=1e-9)


def test_frechet_singular_covariance_is_finite_and_nonnegative():
    rng = np.random.default_rng(2)
    f1, f2 = rng.normal(size=(10, 64)), rng.normal(size=(10, 64)) + 0.5  # rank 9 < 64
    fid = fid_from_features(f1, f2)
    assert np.isfinite(fid) and fid > 0


def test_fid_of_sampled_gaussians_close_to_closed_form():
    rng = np.random.default_rng(3)
    d, n = 4, 200_000
    mu1, mu2 = np.zeros(d), np.array([1.0, 0.0, -0.5, 0.0])
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    f1 = rng.multivariate_normal(mu1, s1, size=n)
    f2 = rng.multivariate_normal(mu2, s2, size=n)
    exact = frechet_distance(mu1, s1, mu2, s2)
    assert fid_from_features(torch.from_numpy(f1).float(), f2) == pytest.approx(exact, rel=0.02, abs=0.01)


def test_fid_self_is_zero():
    f = np.random.default_rng(4).normal(size=(500, 16))
    assert abs(fid_from_features(f, f)) < 1e-8


def _hand_mmd2(x, y):
    d = x.shape[1]
    k = lambda a, b: (float(np.dot(a, b)) / d + 1.0) ** 3  # noqa: E731
    m, n = len(x), len(y)
    kxx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    kyy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    kxy = sum(k(a, b) for a in x for b in y) / (m * n)
    return kxx + kyy - 2 * kxy


def test_kid_matches_hand_computed_unbiased_mmd():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(6, 3)) + 0.7
    mean, std = kid_from_features(x, y, subsets=1, subset_size=6, seed=0)
    assert mean == pytest.approx(_hand_mmd2(x, y), rel=1e-12)
    assert std == 0.0


def test_kid_identical_distributions_near_zero_shifted_positive():
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=(1000, 32)), rng.normal(size=(1000, 32))
    same_mean, same_std = kid_from_features(a, b, subsets=20, subset_size=200, seed=0)
    shift_mean, _ = kid_from_features(a, b + 0.5, subsets=20, subset_size=200, seed=0)
    assert abs(same_mean) < 3 * same_std + 1e-3
    assert shift_mean > 0.1 and shift_mean > 20 * abs(same_mean)


def test_kid_is_seeded():
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=(300, 8)), rng.normal(size=(300, 8)) + 0.2
    assert kid_from_features(a, b, 10, 50, seed=3) == kid_from_features(a, b, 10, 50, seed=3)


def test_fid_uses_the_unbiased_covariance():
    """As the reference FID (np.cov, ddof 1): features {0, 2} have variance 2, {1, 1} variance 0 and the
    means agree, so FID = 2 + 0 - 2 * sqrt(0) = 2 (the biased covariance would give 1)."""
    assert fid_from_features(np.array([[0.0], [2.0]]), np.array([[1.0], [1.0]])) == pytest.approx(2.0)
