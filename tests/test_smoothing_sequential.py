"""Sequential certification: the e-processes, the false-certification rate on streams with known pA
(Gaussian, Uniform, hybrid; pA on the decision boundary), a naive repeated test that the same harness
catches, and the wiring through Smooth, the TSV writer and the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from known_probabilities import KnownProbabilities
from scipy import integrate
from scipy.stats import beta, norm

from cure_lirpa.errors import UserError
from cure_lirpa.smoothing import ABSTAIN, GaussianNoise, Smooth, UniformNoise, combine
from cure_lirpa.smoothing.sequential import (
    CERTIFIED,
    SequentialTest,
    certify_sequential,
    certify_sequential_hybrid,
    estimate_radius,
    log_e_above,
    log_e_below,
    target_probability,
)

B = 0.1

# --------------------------------------------------------------------------- the e-processes


def _mixture(s, f, q, above, b=B):
    """E_n(q) by numerical integration of the mixture (the definition, not the closed form)."""
    lo, hi = (q, 1.0) if above else (0.0, q)

    def lr(p1):
        return (
            math.exp(
                s * math.log(p1 / q) + f * (math.log1p(-p1) - math.log1p(-q))
                if p1 < 1
                else -math.inf
            )
            * (1 - p1) ** (b - 1)
            if p1 < 1
            else 0.0
        )

    def weight(p1):
        return (1 - p1) ** (b - 1)

    num = integrate.quad(lr, lo, hi, limit=200, points=[min(max(s / max(s + f, 1), lo), hi)])[0]
    den = integrate.quad(weight, lo, hi, limit=200)[0]
    return num / den


@pytest.mark.parametrize("q", [0.5, 0.8, 0.97])
@pytest.mark.parametrize("s,f", [(0, 0), (5, 0), (30, 2), (12, 6), (3, 9)])
def test_closed_forms_match_the_mixture_integrals(q, s, f):
    assert math.exp(log_e_above(s, f, q, B)) == pytest.approx(_mixture(s, f, q, True), rel=1e-5)
    assert math.exp(log_e_below(s, f, q, B)) == pytest.approx(_mixture(s, f, q, False), rel=1e-5)


@pytest.mark.parametrize("q", [0.5, 0.9, 0.9987])
def test_e_processes_are_martingales_at_the_boundary_and_supermartingales_under_the_null(q):
    """E[E_{n+1} | past] = E_n when p = q, and <= E_n for every p in the null (Ville applies)."""
    for s, f in [(0, 0), (10, 1), (200, 3), (40, 30)]:
        for fn, nulls in ((log_e_above, (q, q - 0.3 * (1 - q), 0.2)), (log_e_below, (q, 1.0))):
            now = math.exp(fn(s, f, q))
            for p in nulls:
                nxt = p * math.exp(fn(s + 1, f, q)) + (1 - p) * math.exp(fn(s, f + 1, q))
                if p == q:
                    assert nxt == pytest.approx(now, rel=1e-9)
                else:
                    assert nxt <= now * (1 + 1e-9)


def test_all_hits_certify_almost_as_early_as_the_fixed_n_best_case():
    """With every draw a hit, the fixed-n Clopper-Pearson bound alpha**(1/n) reaches q at
    n* = log(alpha)/log(q); the e-process needs only a few percent more."""
    alpha, q = 0.001, norm.cdf(3.0)
    best = math.log(alpha) / math.log(q)
    test = SequentialTest([q], alpha, 100_000)
    test.update(np.ones(20_000, dtype=bool))
    assert test.status[0] == CERTIFIED
    assert best < test.n < 1.06 * best


def test_target_probabilities_invert_the_radii():
    g, u = GaussianNoise(0.5), UniformNoise(0.5)
    for r in (0.0, 0.25, 1.0):
        assert target_probability(g, r, "l2", 784) == pytest.approx(norm.cdf(r / 0.5))
        assert target_probability(g, r, "l1", 784) == pytest.approx(norm.cdf(r / 0.5))
        p = target_probability(u, r, "l1", 784)
        assert u.radii(p, 784)[0] == pytest.approx(r)
    assert target_probability(u, 0.25, "l2", 784) > 1  # the Uniform l2 radius is tiny
    with pytest.raises(UserError, match="radii"):
        target_probability(g, -1.0, "l2", 784)
    with pytest.raises(UserError, match="norm"):
        target_probability(g, 1.0, "linf", 784)


def test_bad_settings_are_user_errors():
    with pytest.raises(UserError, match="sorted"):
        SequentialTest([0.9, 0.8], 0.01, 100)
    with pytest.raises(UserError, match="alpha"):
        SequentialTest([0.9], 1.5, 100)
    with pytest.raises(UserError, match="max_n"):
        SequentialTest([0.9], 0.01, 0)


# --------------------------------------------------------------------------- soundness harness

ALPHA, TRIALS, MAX_N = 0.1, 1000, 600


def _sequential(p_hit, thresholds, alpha, rng):
    """Certified count of one simulated run (the stopping rule of the package)."""
    test = SequentialTest(thresholds, alpha, MAX_N)
    while not test.done:
        test.update(rng.random(test.next_batch(1000, 50)) < p_hit)
    return test.certified_count(), test.n


def _naive(p_hit, thresholds, alpha, rng, look=10):
    """The naive rule: a fixed-n Clopper-Pearson bound at full alpha, recomputed every ``look``
    samples, certifying as soon as it exceeds a threshold."""
    hits = rng.random(MAX_N) < p_hit
    s = np.cumsum(hits)[look - 1 :: look]
    n = np.arange(look, MAX_N + 1, look)
    lower = np.where(s > 0, beta.ppf(alpha, np.maximum(s, 1), n - s + 1), 0.0)
    return int(np.searchsorted(thresholds, lower.max(), side="right")), MAX_N


def _false_rate(rule, p_hit, thresholds, alpha, seed):
    """Fraction of trials certifying a threshold >= p_hit (a wrong certificate)."""
    rng = np.random.default_rng(seed)
    first_false = int(np.searchsorted(thresholds, p_hit, side="left"))  # q_j >= p_hit
    wrong = sum(rule(p_hit, thresholds, alpha, rng)[0] > first_false for _ in range(TRIALS))
    return wrong / TRIALS


def _limit(alpha):
    return alpha + 3 * math.sqrt(alpha * (1 - alpha) / TRIALS)


def _thresholds(noise, radii, norm_name):
    return [0.5] + [target_probability(noise, r, norm_name, 784) for r in radii]


CASES = {
    # pA exactly at the threshold of the middle radius, and a little below it
    "gaussian": (GaussianNoise(0.5), (0.125, 0.25, 0.375), "l2"),
    "uniform": (UniformNoise(0.5), (0.25, 0.5, 0.75), "l1"),
}


@pytest.mark.parametrize("noise_name", sorted(CASES))
@pytest.mark.parametrize("below", [0.0, 0.01])
def test_false_certification_rate_at_most_alpha(noise_name, below):
    noise, radii, norm_name = CASES[noise_name]
    thresholds = _thresholds(noise, radii, norm_name)
    p_hit = thresholds[2] - below
    rate = _false_rate(_sequential, p_hit, thresholds, ALPHA, seed=1)
    assert rate <= _limit(ALPHA), rate


def test_naive_repeated_test_fails_the_same_harness():
    noise, radii, norm_name = CASES["gaussian"]
    thresholds = _thresholds(noise, radii, norm_name)
    rate = _false_rate(_naive, thresholds[2], thresholds, ALPHA, seed=1)
    assert rate > _limit(ALPHA), rate


def test_sequential_test_has_power_and_stops_early():
    """pA well above the largest threshold: certified at every radius, far below the cap."""
    noise, radii, norm_name = CASES["gaussian"]
    thresholds = _thresholds(noise, radii, norm_name)
    rng = np.random.default_rng(3)
    runs = [_sequential(0.95, thresholds, 0.001, rng) for _ in range(50)]
    assert all(k == len(thresholds) for k, _ in runs)
    assert np.mean([n for _, n in runs]) < MAX_N / 5
    # pA below the smallest positive radius' threshold: label only, decided before the cap
    runs = [_sequential(0.51, [0.5, 0.99], 0.001, rng) for _ in range(20)]
    assert all(k <= 1 for k, _ in runs) and np.mean([n for _, n in runs]) < MAX_N


def test_hybrid_false_certification_rate_at_most_alpha():
    """Two independent streams at alpha/2 each, pA of both on their l1 boundary; a hybrid l1 radius
    is wrong when the certificate it comes from overstates its own pA (Table 1 takes the max)."""
    g, u = GaussianNoise(0.5), UniformNoise(0.5)
    radii = (0.25, 0.5, 0.75)
    tg, tu = _thresholds(g, radii, "l1"), _thresholds(u, radii, "l1")
    pg, pu = tg[2], tu[2]
    rng = np.random.default_rng(4)
    wrong = 0

    class C:  # the fields Table 1 reads
        def __init__(self, k, grid):
            self.label = 0 if k else ABSTAIN
            self.radius_l1 = self.radius_l2 = grid[k - 1] if k else 0.0

    grid = (0.0, *radii)
    for _ in range(TRIALS):
        kg, _ = _sequential(pg, tg, ALPHA / 2, rng)
        ku, _ = _sequential(pu, tu, ALPHA / 2, rng)
        h = combine(C(kg, grid), C(ku, grid))
        # radius 0.5 (index 2) or more is wrong for a component whose pA sits at its threshold
        wrong += h.radius_l1 >= radii[1] and (kg >= 3 or ku >= 3)
    assert wrong / TRIALS <= _limit(ALPHA)


# --------------------------------------------------------------------------- wiring


def test_certify_sequential_on_a_classifier_with_known_probabilities():
    noise = GaussianNoise(1.0)
    probs = (0.9, 0.07, 0.03)  # true l2 radius sigma * PhiInv(0.9) = 1.28
    smooth = Smooth(KnownProbabilities(probs, noise), 3, noise, seed=0)
    x = torch.zeros(1)
    c = certify_sequential(smooth, x, [1.0, 0.5, 2.0], n0=50, alpha=0.001, max_n=50_000)
    assert c.label == 0 and c.radius_l2 == c.radius_l1 == 1.0 and c.radius == 1.0
    assert c.decisions == {0.5: "certified", 1.0: "certified", 2.0: "not certified"}
    assert c.p_lower == pytest.approx(norm.cdf(1.0)) and c.stop == "decided"
    assert 0 < c.count <= c.n < 50_000 and c.samples == 50 + c.n <= c.n_drawn
    again = certify_sequential(
        Smooth(KnownProbabilities(probs, noise), 3, noise, seed=0), x, [0.5, 1.0, 2.0], 50, 0.001
    )
    assert again == c  # reproducible under a seed


def test_certify_sequential_abstains_and_respects_the_cap():
    noise = GaussianNoise(1.0)
    smooth = Smooth(KnownProbabilities((0.5, 0.5), noise), 2, noise, seed=0)
    c = certify_sequential(smooth, torch.zeros(1), [0.5], n0=20, alpha=0.001, max_n=300)
    assert c.label == ABSTAIN and c.radius_l2 == 0 and c.n <= 300
    assert c.stop in ("cap", "decided")
    with pytest.raises(UserError, match="max_n"):
        certify_sequential(smooth, torch.zeros(1), [0.5], n0=20, alpha=0.001, max_n=5)


def test_estimate_radius_brackets_the_true_radius():
    noise = GaussianNoise(1.0)
    probs = (0.9, 0.1)
    true_radius = norm.ppf(0.9)
    smooth = Smooth(KnownProbabilities(probs, noise), 2, noise, seed=0)
    # grid step 0.15: 1.2 and 1.35 bracket the true radius 1.28 with room for both tests
    c = estimate_radius(smooth, torch.zeros(1), precision=0.3, n0=50, alpha=0.001)
    assert c.label == 0 and c.radius <= true_radius <= c.radius_upper
    assert c.stop in ("precision", "decided") and c.radius_upper - c.radius <= 0.3 + 1e-9
    assert c.n < 50_000
    capped = estimate_radius(smooth, torch.zeros(1), precision=0.3, max_radius=0.5, n0=50)
    assert capped.radius == 0.5 and capped.stop == "decided" and capped.n < c.n


def test_hybrid_on_known_probabilities_uses_half_alpha_each():
    g, u = GaussianNoise(0.5), UniformNoise(0.5)
    probs = (0.95, 0.05)
    sg = Smooth(KnownProbabilities(probs, g), 2, g, seed=0)
    su = Smooth(KnownProbabilities(probs, u), 2, u, seed=1)
    h, cg, cu = certify_sequential_hybrid(sg, su, torch.zeros(1), [0.25, 0.5, 0.75], 20, 0.002)
    # Uniform l1 radius at p = 0.95: 2 * sqrt(3) * 0.5 * 0.45 = 0.78; Gaussian: 0.5 * 1.64 = 0.82
    assert cg.label == cu.label == h.label == 0 and h.rule == "agree"
    assert h.radius_l1 == max(cg.radius_l1, cu.radius_l1) == 0.75


# --------------------------------------------------------------------------- CLI and TSV


def test_cli_sequential_decide_hybrid_estimate_and_resume(tmp_path):
    from click.testing import CliRunner

    from cure_lirpa.cli import main
    from cure_lirpa.smoothing.analysis import load_run
    from cure_lirpa.smoothing.results import read_tsv

    def invoke(*args, ok=True):
        res = CliRunner().invoke(main, ["smooth", *(str(a) for a in args)])
        if ok:
            assert res.exit_code == 0, res.output + repr(res.exception)
        return res

    ckpt = tmp_path / "g"
    invoke(
        "train", "--sigma", "0.5", "--epochs", "1", "--train-count", "512", "--eval-count", "0",
        "--width", "4", "--batch-size", "64", "--device", "cpu", "--out", ckpt, "--quiet",
    )  # fmt: skip
    common = ["-c", ckpt, "--sigma", "0.5", "--n0", "20", "--alpha", "0.01", "--batch-size",
              "200", "--count", "4", "--skip", "200", "--device", "cpu", "--quiet"]  # fmt: skip
    seq = tmp_path / "seq"
    res = invoke("certify", *common, "--sequential", "decide", "--radii", "0.1,0.3",
                 "--max-n", "2000", "--out", seq)  # fmt: skip
    assert "mean draws per sample" in res.output and "certified accuracy (l2)" in res.output
    header, columns, rows = read_tsv(seq / "samples.tsv")
    assert header["run"]["sequential"] == "decide" and header["run"]["radii"] == [0.1, 0.3]
    assert len(rows) == 4
    for r in rows:
        assert float(r["radius_l2"]) in (0.0, 0.1, 0.3)
        assert int(r["samples"]) == 20 + int(r["gaussian_n"]) <= int(r["drawn"])
        assert int(r["gaussian_n"]) <= 2000 and r["gaussian_stop"] in ("decided", "cap")
    summary = json.loads((seq / "summary.json").read_text())
    assert set(summary["certified_accuracy"]["l2"]) == {"0.1", "0.3"}
    assert summary["mean_samples_per_image"] == sum(int(r["samples"]) for r in rows) / 4
    run = load_run(seq)  # smooth analyze reads it like a fixed-n run
    assert run.size == 4
    # resuming a finished run recomputes nothing; other options are refused
    invoke("certify", *common, "--sequential", "decide", "--radii", "0.1,0.3", "--max-n", "2000",
           "--out", seq, "--resume")  # fmt: skip
    assert read_tsv(seq / "samples.tsv")[2] == rows
    bad = invoke("certify", *common, "--sequential", "decide", "--radii", "0.2", "--max-n",
                 "2000", "--out", seq, "--resume", ok=False)  # fmt: skip
    assert bad.exit_code != 0 and "radii: run [0.1, 0.3], now [0.2]" in bad.output

    hyb = tmp_path / "hyb"
    invoke("certify", *common, "--noise", "hybrid", "--sequential", "decide", "--radius-norm",
           "l1", "--radii", "0.5", "--max-n", "2000", "--out", hyb)  # fmt: skip
    header, columns, rows = read_tsv(hyb / "samples.tsv")
    assert header["run"]["alpha_each"] == 0.005 and "rule" in columns
    assert all(int(r["samples"]) == 40 + int(r["gaussian_n"]) + int(r["uniform_n"]) for r in rows)

    est = tmp_path / "est"
    invoke("certify", *common, "--sequential", "estimate", "--precision", "0.2", "--max-n",
           "2000", "--out", est)  # fmt: skip
    _, columns, rows = read_tsv(est / "samples.tsv")
    assert "gaussian_radius_upper" in columns
    for r in rows:
        assert float(r["radius_l2"]) <= float(r["gaussian_radius_upper"])

    few = invoke("certify", *common, "--sequential", "decide", "--max-n", "3", "--out",
                 tmp_path / "few", ok=False)  # fmt: skip
    assert few.exit_code == 1 and "max_n" in few.output and "Traceback" not in few.output
    assert not (tmp_path / "few").exists()


def test_benchmark_report_compares_paired_runs(tmp_path, monkeypatch):
    """The benchmark's comparison on two tiny TSVs of a classifier with known probabilities."""
    import benchmarks.smoothing_sequential as bench
    from cure_lirpa.smoothing.runner import certify_dataset

    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    noise = GaussianNoise(0.25)
    model = KnownProbabilities((0.999, 0.001), noise)
    data = torch.utils.data.TensorDataset(torch.zeros(6, 1), torch.tensor([0, 0, 0, 1, 1, 0]))
    kw = dict(sigma_gaussian=0.25, n0=20, alpha=0.001, batch_size=500, count=6)
    fixed, seq = tmp_path / "f", tmp_path / "s"
    certify_dataset(model, 2, data, fixed, n=5000, **kw)
    certify_dataset(model, 2, data, seq, sequential="decide", max_n=5000, radii=bench.RADII, **kw)
    row = bench.compare("mnist-0.25", fixed / "samples.tsv", seq / "samples.tsv", {})
    assert row["images"] == 6 and row["fixed_samples_per_image"] == 5020
    acc = row["certified_accuracy"]
    assert acc["0"]["fixed"] == pytest.approx(100 * 4 / 6)  # two images carry another label
    for v in acc.values():
        assert v["difference_points"] == pytest.approx(v["sequential"] - v["fixed"])
    assert row["samples_ratio"] == pytest.approx(5020 / row["sequential_samples"]["mean"])
    assert row["sequential_samples"]["mean"] < 5020
    lo, hi = row["samples_ratio_interval"]
    assert lo <= row["samples_ratio"] <= hi
    # agreement of the radii: the listed disagreements are exactly the images whose certificates
    # reach different radii, and none at a radius where both runs certify the same images
    d = row["disagreements"]
    assert row["radius_agreement"] == pytest.approx(1 - len(d) / 6)
    level = lambda r: sum(r >= x for x in (0.0, *bench.RADII))  # noqa: E731
    assert all(level(x["fixed_radius"]) != level(x["sequential_radius"]) for x in d)
    if all(v["only_fixed"] == v["only_sequential"] == 0 for v in acc.values()):
        assert d == []
    text = bench.markdown([row], {"command": "test", "generated": "now"})
    assert f"{100 * row['radius_agreement']:.0f}%" in text
    assert "| mnist-0.25 (sigma 0.25) | 6 / 6 |" in text
    bench.plot_samples([row], tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0
