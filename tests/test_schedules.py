"""Schedules: eps ramp shape, continuity, monotonicity; kappa, CROWN-IBP beta, learning rate."""

from __future__ import annotations

import pytest

from cure_lirpa.errors import UserError
from cure_lirpa.training.schedules import (
    Ramp,
    crown_ibp_beta_at,
    eps_at,
    kappa_at,
    linear_eps_at,
    lr_at,
    smoothed_ramp,
)

EPS = 0.3


@pytest.mark.parametrize("shape", ["smoothed", "linear"])
def test_eps_ramp_endpoints_and_monotone(shape):
    ramp = Ramp(warmup=100, length=400, shape=shape)
    assert all(eps_at(s, EPS, ramp) == 0.0 for s in range(0, 101))
    assert eps_at(500, EPS, ramp) == pytest.approx(EPS)
    assert all(eps_at(s, EPS, ramp) == pytest.approx(EPS) for s in (500, 700, 10_000))
    values = [eps_at(s / 4, EPS, ramp) for s in range(0, 2400)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert 0 < eps_at(101, EPS, ramp) < EPS


def test_smoothed_ramp_is_c1_at_join():
    m, d = 0.25, 4.0
    a = 1.0 / (m ** (d - 1) * (m + d * (1 - m)))
    h = 1e-6
    left, right = smoothed_ramp(m - h), smoothed_ramp(m + h)
    assert left == pytest.approx(right, abs=1e-5)
    slope_left = (smoothed_ramp(m) - smoothed_ramp(m - h)) / h
    slope_right = (smoothed_ramp(m + h) - smoothed_ramp(m)) / h
    assert slope_left == pytest.approx(slope_right, rel=1e-4)
    assert slope_left == pytest.approx(a * d * m ** (d - 1), rel=1e-4)
    # polynomial before the join, linear after it
    assert smoothed_ramp(0.1) == pytest.approx(a * 0.1**4)
    assert smoothed_ramp(0.6) - smoothed_ramp(0.5) == pytest.approx(
        smoothed_ramp(0.9) - smoothed_ramp(0.8)
    )
    assert smoothed_ramp(0.0) == 0.0 and smoothed_ramp(1.0) == pytest.approx(1.0)
    # smooth start: slower than linear at first
    assert smoothed_ramp(0.2) < 0.2


def test_eps_continuity_everywhere():
    ramp = Ramp(warmup=10, length=50)
    grid = [i / 100 for i in range(0, 8000)]
    values = [eps_at(s, EPS, ramp) for s in grid]
    assert max(abs(b - a) for a, b in zip(values, values[1:])) < 5e-3


def test_linear_schedule():
    assert linear_eps_at(5, EPS, 10, 20) == 0.0
    assert linear_eps_at(20, EPS, 10, 20) == pytest.approx(EPS / 2)
    assert linear_eps_at(30, EPS, 10, 20) == pytest.approx(EPS)


def test_ramp_from_epochs_and_zero_length():
    ramp = Ramp.from_epochs(2, 20, steps_per_epoch=10)
    assert ramp.warmup == 20 and ramp.length == 200 and ramp.end == 220
    assert not ramp.ended(219) and ramp.ended(220)
    jump = Ramp(5, 0)
    assert eps_at(5, EPS, jump) == 0.0 and eps_at(5.001, EPS, jump) == EPS


def test_kappa_and_beta():
    ramp = Ramp(10, 20)
    assert kappa_at(0, ramp, 1.0, 0.5) == 1.0 and kappa_at(10, ramp, 1.0, 0.5) == 1.0
    assert kappa_at(20, ramp, 1.0, 0.5) == pytest.approx(0.75)
    assert kappa_at(30, ramp, 1.0, 0.5) == 0.5 and kappa_at(99, ramp, 1.0, 0.5) == 0.5
    assert crown_ibp_beta_at(0, ramp) == 1.0
    assert crown_ibp_beta_at(25, ramp) == pytest.approx(0.25)
    assert crown_ibp_beta_at(31, ramp) == 0.0
    betas = [crown_ibp_beta_at(s, ramp) for s in range(40)]
    assert all(b <= a for a, b in zip(betas, betas[1:]))


def test_lr_decay():
    assert lr_at(0, 5e-4, (50, 60), 0.2) == 5e-4
    assert lr_at(49.9, 5e-4, (50, 60), 0.2) == 5e-4
    assert lr_at(50, 5e-4, (50, 60), 0.2) == pytest.approx(1e-4)
    assert lr_at(65, 5e-4, (50, 60), 0.2) == pytest.approx(2e-5)
    assert lr_at(10, 1e-3) == 1e-3


def test_schedule_errors():
    with pytest.raises(UserError):
        Ramp(-1, 10)
    with pytest.raises(UserError):
        Ramp(0, 10, shape="cosine")
    with pytest.raises(UserError):
        kappa_at(0, Ramp(0, 1), 2.0, 0.0)
    with pytest.raises(UserError):
        eps_at(0, -0.1, Ramp(0, 1))
