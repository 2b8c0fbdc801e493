"""Smoothing statistics: Clopper–Pearson bound, radii, Table 1, noise, and soundness on a synthetic
classifier with known class probabilities."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from known_probabilities import KnownProbabilities
from scipy.stats import beta, binomtest, norm
from torch import nn

from cure_lirpa.errors import UserError
from cure_lirpa.smoothing import (
    ABSTAIN,
    Certificate,
    GaussianNoise,
    HybridCertificate,
    NormalUniformNoise,
    Smooth,
    SmoothingWarning,
    UniformNoise,
    check_sampling,
    clopper_pearson_lower,
    combine,
    make_noise,
    min_certify_n,
    min_predict_n,
    split_alpha,
)

# --------------------------------------------------------------------------- Clopper–Pearson


@pytest.mark.parametrize("n", [1, 7, 100, 10_000])
@pytest.mark.parametrize("alpha", [0.001, 0.05])
def test_clopper_pearson_matches_beta_ppf(n, alpha):
    for count in sorted({1, n // 3, n // 2, n - 1, n} - {0}):
        assert clopper_pearson_lower(count, n, alpha) == pytest.approx(
            beta.ppf(alpha, count, n - count + 1), rel=1e-10, abs=1e-14
        )
    # edge cases: count = 0 gives 0 (the Beta(0, n+1) limit), count = n gives alpha ** (1 / n)
    assert clopper_pearson_lower(0, n, alpha) == 0.0
    assert clopper_pearson_lower(n, n, alpha) == pytest.approx(alpha ** (1 / n), rel=1e-10)
    assert clopper_pearson_lower(n, n, alpha) == pytest.approx(beta.ppf(alpha, n, 1), rel=1e-10)


def test_clopper_pearson_rejects_bad_counts():
    with pytest.raises(UserError):
        clopper_pearson_lower(5, 4, 0.01)
    with pytest.raises(UserError):
        clopper_pearson_lower(0, 0, 0.01)


@pytest.mark.parametrize("alpha", [0.5, 0.1, 0.01, 0.001, 1e-4, 2.0**-10, 1e-9])
def test_min_n(alpha):
    n = min_certify_n(alpha)
    assert clopper_pearson_lower(n, n, alpha) >= 0.5
    assert n == 1 or clopper_pearson_lower(n - 1, n - 1, alpha) < 0.5
    assert n == math.ceil(math.log2(1 / alpha) - 1e-12)
    m = min_predict_n(alpha)
    assert binomtest(m, m, 0.5).pvalue <= alpha
    assert m == 1 or binomtest(m - 1, m - 1, 0.5).pvalue > alpha
    assert min_certify_n(0.001) == 10


def test_check_sampling_messages():
    with pytest.warns(SmoothingWarning, match="smallest useful n is 10"):
        msg = check_sampling(9, 0.001, 100, n0=10)
    assert "n=9" in msg
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_sampling(10, 0.001, 100, n0=10) is None
    for kwargs in ({"n0": 0}, {"n0": 1, "batch_size": 0}):
        with pytest.raises(UserError):
            check_sampling(100, 0.001, kwargs.pop("batch_size", 10), **kwargs)
    with pytest.raises(UserError, match="alpha"):
        check_sampling(100, 1.5, 10)
    with pytest.raises(UserError, match="n \\(the estimation"):
        check_sampling(0, 0.01, 10)


# --------------------------------------------------------------------------- noise


def test_noise_parameters_and_errors():
    for bad in (0, -0.5, float("nan"), "x"):
        with pytest.raises(UserError):
            GaussianNoise(bad)
        with pytest.raises(UserError):
            UniformNoise(bad)
    with pytest.raises(UserError, match="unknown noise"):
        make_noise("laplace", 0.5)
    nu = NormalUniformNoise(0.5)
    assert nu.sigma_u == pytest.approx(math.sqrt(3) / 2 * 0.5)
    assert nu.kurtosis == pytest.approx(-0.2204, abs=1e-3)
    assert UniformNoise(0.5).half_width == pytest.approx(math.sqrt(3) * 0.5)


def test_noise_statistics_and_seed():
    shape = (200_000,)
    for noise, std in (
        (GaussianNoise(0.3), 0.3),
        (UniformNoise(0.3), 0.3),
        (NormalUniformNoise(0.4, 0.2), math.hypot(0.4, 0.2)),
    ):
        g = torch.Generator().manual_seed(3)
        z = noise.sample(shape, g)
        assert z.shape == shape
        assert float(z.mean()) == pytest.approx(0.0, abs=0.005)
        assert float(z.std()) == pytest.approx(std, rel=0.01)
        again = noise.sample(shape, torch.Generator().manual_seed(3))
        assert torch.equal(z, again)
        buf = torch.empty(shape)
        noise.sample_into(buf, torch.Generator().manual_seed(4))
        assert float(buf.std()) == pytest.approx(std, rel=0.01)
    u = UniformNoise(0.3).sample(shape, torch.Generator().manual_seed(0))
    assert float(u.abs().max()) <= math.sqrt(3) * 0.3


# --------------------------------------------------------------------------- radii


def test_radii_closed_forms():
    for p in (0.5, 0.6, 0.9, 0.999):
        r1, r2 = GaussianNoise(0.5).radii(p, 784)
        assert r2 == pytest.approx(0.5 * norm.ppf(p)) and r1 == r2
        r1, r2 = UniformNoise(0.5).radii(p, 784)
        assert r1 == pytest.approx(2 * math.sqrt(3) * 0.5 * (p - 0.5))
        assert r2 == pytest.approx(r1 / 28.0)
    assert GaussianNoise(1.0).radii(0.4, 10) == (0.0, 0.0)
    # the radius caps at alpha = 0.001, n = 100,000 (Cohen et al.: 3.81 sigma for Gaussian noise)
    p = clopper_pearson_lower(100_000, 100_000, 0.001)
    assert GaussianNoise(1.0).radii(p, 1)[1] == pytest.approx(3.81, abs=0.01)
    assert UniformNoise(1.0).radii(p, 1)[0] == pytest.approx(1.732, abs=0.001)


class Constant(nn.Module):
    """Always predicts ``cls`` out of ``k`` classes."""

    def __init__(self, cls: int = 0, k: int = 3):
        super().__init__()
        self.cls, self.k = cls, k

    def forward(self, x):
        out = torch.zeros(x.shape[0], self.k)
        out[:, self.cls] = 1.0
        return out


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_certify_radius_uses_real_dimension(shape):
    x = torch.rand(shape)
    d = int(np.prod(shape))
    p = 0.001 ** (1 / 500)
    cert = Smooth(Constant(2), 3, UniformNoise(0.25), seed=0).certify(x, 10, 500, 0.001, 128)
    assert cert.label == 2 and cert.count == 500 and cert.p_lower == pytest.approx(p)
    assert cert.radius_l1 == pytest.approx(2 * math.sqrt(3) * 0.25 * (p - 0.5))
    assert cert.radius_l2 == pytest.approx(cert.radius_l1 / math.sqrt(d))
    cert = Smooth(Constant(1), 3, GaussianNoise(0.25), seed=0).certify(x, 10, 500, 0.001, 128)
    assert cert.radius_l2 == pytest.approx(0.25 * norm.ppf(p)) and cert.radius_l1 == cert.radius_l2


def test_smooth_refuses_training_noise():
    with pytest.raises(UserError, match="training only"):
        Smooth(Constant(), 3, NormalUniformNoise(0.5))


# --------------------------------------------------------------------------- Table 1


def _c(label, r1, r2):
    return Certificate(label, 0.9 if label != ABSTAIN else 0.1, r1, r2, 1, 1)


def test_hybrid_reproduces_table_1():
    g, u = _c(3, 0.7, 0.7), _c(3, 1.1, 0.04)
    # y_U = y_G: max per norm, common label
    assert combine(g, u) == HybridCertificate(3, 1.1, 0.7, "agree")
    # only y_U abstained: Gaussian's label and radii
    assert combine(g, _c(ABSTAIN, 0, 0)) == HybridCertificate(3, 0.7, 0.7, "uniform-abstained")
    # only y_G abstained: Uniform's label and radii
    assert combine(_c(ABSTAIN, 0, 0), u) == HybridCertificate(3, 1.1, 0.04, "gaussian-abstained")
    # both abstained
    assert combine(_c(ABSTAIN, 0, 0), _c(ABSTAIN, 0, 0)) == HybridCertificate(
        ABSTAIN, 0, 0, "both-abstained"
    )
    # labels differ
    h = combine(g, _c(5, 2.0, 0.1))
    assert h == HybridCertificate(ABSTAIN, 0.0, 0.0, "disagree") and h.abstained
    # max taken per norm independently
    assert combine(_c(1, 0.2, 0.9), _c(1, 0.5, 0.1)) == HybridCertificate(1, 0.5, 0.9, "agree")


def test_split_alpha():
    assert split_alpha(0.001) == 0.0005
    assert split_alpha(0.001, joint=False) == 0.001


# --------------------------------------------------------------------------- soundness


@pytest.mark.parametrize("noise", [GaussianNoise(1.0), UniformNoise(0.5)])
@pytest.mark.parametrize("probs", [(0.7, 0.2, 0.1), (0.45, 0.35, 0.2), (0.52, 0.48, 0.0)])
def test_wrong_certificates_rarer_than_alpha(noise, probs):
    alpha, trials, n = 0.05, 1500, 100
    smooth = Smooth(KnownProbabilities(probs, noise), len(probs), noise, seed=1)
    x = torch.zeros(1)
    wrong = certified = 0
    for _ in range(trials):
        c = smooth.certify(x, 10, n, alpha, n)
        if c.label != ABSTAIN:
            certified += 1
            # wrong: the bound overstates the true probability (this includes any label with p < 1/2)
            wrong += c.p_lower > probs[c.label]
    rate = wrong / trials
    assert rate <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / trials), (rate, certified)
    if probs[0] >= 0.7:
        assert certified > trials * 0.9  # and it is not vacuous


def test_wrong_predictions_rarer_than_alpha():
    alpha, trials = 0.05, 1500
    probs = (0.56, 0.44, 0.0)
    noise = GaussianNoise(1.0)
    smooth = Smooth(KnownProbabilities(probs, noise), 3, noise, seed=2)
    labels = [smooth.predict(torch.zeros(1), 100, alpha, 100) for _ in range(trials)]
    wrong = sum(lab not in (0, ABSTAIN) for lab in labels) / trials
    assert wrong <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / trials)
    assert ABSTAIN in labels and 0 in labels


def test_certify_reproducible_under_seed():
    noise = GaussianNoise(1.0)
    model = KnownProbabilities((0.6, 0.4), noise)
    a = Smooth(model, 2, noise, seed=5).certify(torch.zeros(1), 10, 300, 0.01, 64)
    b = Smooth(model, 2, noise, seed=5).certify(torch.zeros(1), 10, 300, 0.01, 64)
    assert a == b


def test_acr_and_certified_accuracy_count_only_correct_predictions():
    from cure_lirpa.smoothing.metrics import average_certified_radius, certified_accuracy

    radius = np.array([0.5, 1.0, 0.0, 2.0])  # 0 = abstained or radius 0
    correct = np.array([True, True, False, False])
    assert average_certified_radius(radius, correct) == pytest.approx(1.5 / 4)
    assert certified_accuracy(radius, correct, 0.0) == pytest.approx(0.5)
    assert certified_accuracy(radius, correct, 0.75) == pytest.approx(0.25)
    assert certified_accuracy(radius, correct, 1.5) == 0.0  # the radius-2 sample is wrong


def test_acr_at_fixed_clean_accuracy_interpolates_within_each_method():
    from cure_lirpa.smoothing.metrics import compare_at_clean_accuracy, interpolate_at

    assert interpolate_at([(0.6, 1.0), (0.8, 0.0)], 0.7) == pytest.approx(0.5)
    assert interpolate_at([(0.8, 0.0), (0.6, 1.0)], 0.65) == pytest.approx(0.75)  # any order
    assert interpolate_at([(0.6, 1.0), (0.8, 0.0)], 0.9) is None  # no extrapolation
    assert interpolate_at([(0.7, 0.2), (0.7, 0.4)], 0.7) == pytest.approx(0.4)  # best of ties

    def run(name, method, clean, l2, l1):
        return {
            "name": name,
            "method": method,
            "clean_accuracy": clean,
            "acr": {"l2": l2, "l1": l1},
        }

    runs = [
        run("g.25", "gaussian", 0.80, 0.4, 0.4),
        run("g.50", "gaussian", 0.60, 0.8, 0.8),
        run("h.25", "hybrid", 0.78, 0.4, 0.6),
        run("h.50", "hybrid", 0.58, 0.8, 1.2),
    ]
    out = compare_at_clean_accuracy(runs, [0.7, 0.79])
    g, h = out["methods"]["gaussian"]["at_level"], out["methods"]["hybrid"]["at_level"]
    assert g["0.7"] == {"l2": pytest.approx(0.6), "l1": pytest.approx(0.6)}
    assert h["0.7"]["l1"] == pytest.approx(0.6 + 0.6 * 0.08 / 0.2)
    assert g["0.79"]["l2"] == pytest.approx(0.42) and h["0.79"] == {"l2": None, "l1": None}
