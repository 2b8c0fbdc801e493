"""Certified-training losses: pure functions of tensors (margin lower bounds, per-sample losses, weights).

Conventions (auto_LiRPA's and the CURE paper's): ``lb`` has shape (B, K-1) and holds lower bounds
of the margins
``f_y - f_j`` for the K-1 classes ``j != y`` over a threat set. The *worst-case logits* are
``[0, -lb_1, ..., -lb_{K-1}]`` (the true class at index 0); a sample is certified iff all ``lb > 0``.

Equations of the CURE paper (Jiang, Cheung, Singh; TMLR 2026 / arXiv 2410.03000) are named by the
symbols the paper uses, since the numbering differs between versions of the paper.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn.functional as F

from ..errors import UserError


def _check_lb(lb: torch.Tensor, name: str = "lb") -> None:
    if not torch.is_tensor(lb) or lb.dim() != 2:
        raise UserError(
            f"{name} must be margin lower bounds of shape (B, K-1), got "
            f"{tuple(lb.shape) if torch.is_tensor(lb) else type(lb).__name__}"
        )


def _check_same(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.shape != b.shape or a.dim() != 1:
        raise UserError(
            f"{what}: expected two per-sample loss vectors of the same shape (B,), got "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )


def worst_case_logits(lb: torch.Tensor) -> torch.Tensor:
    """(B, K-1) margin lower bounds -> (B, K) worst-case logits ``[0, -lb]`` (true class at index 0)."""
    _check_lb(lb)
    return torch.cat([lb.new_zeros(lb.shape[0], 1), -lb], dim=1)


def certified_ce(lb: torch.Tensor, reduction: str = "none") -> torch.Tensor:
    """Certified (robust) cross-entropy ``CE([0, -lb], 0) = log(1 + sum_j exp(-lb_j))``.

    The auto_LiRPA / IBP convention ``CE(-[0, lb], 0)`` (Gowal et al. 2018); the per-norm certified
    loss
    L_p of the CURE paper's training objectives. ``reduction``: ``'none'`` -> (B,), ``'mean'`` -> scalar.
    """
    if reduction not in ("none", "mean"):
        raise UserError(f"reduction must be 'none' or 'mean', got {reduction!r}")
    logits = worst_case_logits(lb)
    target = torch.zeros(lb.shape[0], dtype=torch.long, device=lb.device)
    return F.cross_entropy(logits, target, reduction=reduction)


def expressive_loss(adv_ce: torch.Tensor, cert_ce: torch.Tensor, alpha: float) -> torch.Tensor:
    """MTL-IBP's expressive loss ``(1 - alpha) * CE(f(x_adv), y) + alpha * CE([0, -lb], 0)`` per sample.

    De Palma et al., *Expressive Losses for Verified Robustness via Convex Combinations* (ICLR 2024),
    the MTL-IBP loss: a convex combination of the adversarial cross-entropy ``adv_ce`` (B,) and the
    certified cross-entropy ``cert_ce`` (B,) of the IBP worst-case logits. ``alpha`` in [0, 1]
    (0: adversarial training, 1: IBP training). Returns (B,).
    """
    _check_same(adv_ce, cert_ce, "expressive_loss")
    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"the MTL-IBP alpha must be in [0, 1], got {alpha}")
    return (1.0 - alpha) * adv_ce + alpha * cert_ce


def ibp_regulariser(
    input_radius: torch.Tensor,
    pre_activation: list[tuple[torch.Tensor, torch.Tensor]],
    tolerance: float = 0.5,
) -> torch.Tensor:
    """Shi et al. (NeurIPS 2021)'s IBP warm-up regulariser ``L_tightness + L_relu`` (a scalar).

    ``input_radius``: the mean half-width of the input box (a scalar tensor, bound space);
    ``pre_activation``: the IBP bounds ``(lower, upper)`` of the input of every ReLU layer.
    Per layer, with ``c = (u + l) / 2``, ``r = (u - l) / 2``:
    ``L_tightness = relu(tau - r0 / mean(r)) / tau`` (bounds must not grow much faster than the
    input box: ``r0 = input_radius``) and ``L_relu = (relu(tau - rho_mean) + relu(tau - rho_var)) / tau``
    with ``rho_mean`` the smaller of ``m_act / -m_inact`` and its inverse (``m_act``: mean of ``c``
    over the entries that are surely active, ``l > 0``, ``m_inact`` over the surely inactive ones,
    ``u < 0``; means over all entries of the layer) and ``rho_var`` the same for the summed squared
    deviations of ``c`` from its mean (balanced active and inactive neurons). Both are averaged over
    the layers; ``tau = tolerance``. A layer whose balance term is not finite (no active or no
    inactive neuron) contributes no ``L_relu``.
    """
    if not pre_activation:
        raise UserError("the IBP regulariser needs the bounds of at least one ReLU layer")
    tight = input_radius.new_zeros(())
    relu = input_radius.new_zeros(())
    for lower, upper in pre_activation:
        c = (upper + lower) / 2
        r = ((upper - lower) / 2).mean()
        tight = tight + F.relu(tolerance - input_radius / r.clamp(min=1e-12)) / tolerance
        act, inact = (lower > 0).to(c.dtype), (upper < 0).to(c.dtype)
        m_ratio = (c * act).mean() / -(c * inact).mean()
        dev = (c - c.mean()) ** 2
        v_ratio = (dev * act).sum() / (dev * inact).sum()
        m_ratio = torch.minimum(m_ratio, 1 / m_ratio.clamp(min=1e-12))
        v_ratio = torch.minimum(v_ratio, 1 / v_ratio.clamp(min=1e-12))
        term = (F.relu(tolerance - m_ratio) + F.relu(tolerance - v_ratio)) / tolerance
        if bool(torch.isfinite(term)):
            relu = relu + term
    n = len(pre_activation)
    return tight / n + relu / n


def joint(l_inf: torch.Tensor, l_2: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """CURE-Joint: ``alpha * mean(L_inf) + (1 - alpha) * mean(L_2)`` (paper: L_Joint, alpha = 0.5).

    ``l_inf``, ``l_2``: per-sample certified losses (B,); returns a scalar.
    """
    _check_same(l_inf, l_2, "joint")
    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"alpha must be in [0, 1], got {alpha}")
    return alpha * l_inf.mean() + (1.0 - alpha) * l_2.mean()


def max_loss(l_inf: torch.Tensor, l_2: torch.Tensor) -> torch.Tensor:
    """CURE-Max: ``mean_i max(L_inf(i), L_2(i))``, the max taken per sample (paper: L_Max)."""
    _check_same(l_inf, l_2, "max_loss")
    return torch.maximum(l_inf, l_2).mean()


def random_halves(
    batch_size: int, generator: Optional[torch.Generator] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``range(batch_size)`` into two disjoint random halves ``(idx_a, idx_b)`` covering the batch.

    ``idx_a`` has ``batch_size // 2`` indices, ``idx_b`` the rest; both sorted, on the generator's device
    (CPU by default). The public CURE code draws the halves independently (they may overlap); here
    they are a random partition, as the paper's CURE-Random describes.
    """
    if batch_size < 0:
        raise UserError(f"batch_size must be >= 0, got {batch_size}")
    device = generator.device if generator is not None else None
    perm = torch.randperm(batch_size, generator=generator, device=device)
    half = batch_size // 2
    return perm[:half].sort().values, perm[half:].sort().values


def random_loss(
    l_inf: torch.Tensor, l_2: torch.Tensor, idx_a: torch.Tensor, idx_b: torch.Tensor
) -> torch.Tensor:
    """CURE-Random: samples ``idx_a`` get ``L_inf``, samples ``idx_b`` get ``L_2`` (paper: L_Random).

    Normalisation: ``(sum_{i in a} L_inf(i) + sum_{i in b} L_2(i)) / B``, i.e. the mean over the whole
    batch of the one selected loss per sample. ``idx_a``, ``idx_b`` must partition ``range(B)``
    (see :func:`random_halves`). Only the selected entries need to be finite.
    """
    _check_same(l_inf, l_2, "random_loss")
    b = l_inf.shape[0]
    idx_a = torch.as_tensor(idx_a, dtype=torch.long, device=l_inf.device).flatten()
    idx_b = torch.as_tensor(idx_b, dtype=torch.long, device=l_inf.device).flatten()
    both = torch.cat([idx_a, idx_b])
    if both.numel() != b or (
        b and not torch.equal(both.sort().values, torch.arange(b, device=both.device))
    ):
        raise UserError(
            f"random_loss: idx_a and idx_b must be disjoint and together cover all {b} samples "
            "(use random_halves(batch_size))"
        )
    if b == 0:
        return l_inf.sum() * 0.0
    return (l_inf[idx_a].sum() + l_2[idx_b].sum()) / b


def bound_alignment(
    lb_q: torch.Tensor,
    lb_r: torch.Tensor,
    certified_q_mask: torch.Tensor,
    detach_q: bool = False,
) -> torch.Tensor:
    """Bound alignment ``L_BA = sum_{i in gamma} KL(P_q(i) || P_r(i)) / |gamma|`` (CURE paper, L_BA).

    ``P_p = softmax([0, -lb_p])`` over the K worst-case logits of norm p; ``lb_q``, ``lb_r`` (B, K-1);
    ``certified_q_mask`` (B,) bool marks gamma, the samples certified under norm q. Returns a scalar;
    exactly 0 (with a zero, NaN-free gradient) when gamma is empty. ``detach_q`` stops the gradient
    through ``P_q`` (the formula as written lets it flow through both). Total loss in CURE:
    ``L_multi + eta * L_BA``.
    """
    _check_lb(lb_q, "lb_q")
    _check_lb(lb_r, "lb_r")
    if lb_q.shape != lb_r.shape:
        raise UserError(
            f"lb_q and lb_r must have the same shape, got {tuple(lb_q.shape)} and {tuple(lb_r.shape)}"
        )
    mask = torch.as_tensor(certified_q_mask, device=lb_q.device)
    if mask.shape != (lb_q.shape[0],):
        raise UserError(
            f"certified_q_mask must have shape ({lb_q.shape[0]},), got {tuple(mask.shape)}"
        )
    mask = mask.bool()
    log_p_q = F.log_softmax(worst_case_logits(lb_q[mask]), dim=1)
    log_p_r = F.log_softmax(worst_case_logits(lb_r[mask]), dim=1)
    if detach_q:
        log_p_q = log_p_q.detach()
    kl = (log_p_q.exp() * (log_p_q - log_p_r)).sum(1)
    return kl.sum() / max(int(mask.sum()), 1)


@torch.no_grad()
def project_gradients(
    theta0: Mapping[str, torch.Tensor],
    theta_c: Mapping[str, torch.Tensor],
    theta_n: Mapping[str, torch.Tensor],
    beta: float,
) -> dict[str, torch.Tensor]:
    """Gradient projection (CURE paper, GP): merge a certified and a natural update of the weights.

    Per floating tensor: ``g_c = theta_c - theta0``, ``g_n = theta_n - theta0``, ``s = cos(g_c, g_n)``
    (0 if either is zero), ``theta = theta0 + (1 - beta) * g_c + beta * max(s, 0) * g_n``.
    Non-floating entries (e.g. BatchNorm's ``num_batches_tracked``) take ``theta_c``'s value. The three
    dicts are state dicts with the same keys; returns a new dict (tensors not shared with the inputs).
    """
    if not 0.0 <= beta <= 1.0:
        raise UserError(f"beta must be in [0, 1], got {beta}")
    if not (set(theta0) == set(theta_c) == set(theta_n)):
        raise UserError("project_gradients: theta0, theta_c and theta_n must have the same keys")
    out: dict[str, torch.Tensor] = {}
    for key, c in theta_c.items():
        if not c.is_floating_point():
            out[key] = c.clone()
            continue
        t0, n = theta0[key], theta_n[key]
        if t0.shape != c.shape or n.shape != c.shape:
            raise UserError(f"project_gradients: shapes differ for {key!r}")
        g_c = c - t0
        g_n = n - t0
        gc64, gn64 = g_c.double(), g_n.double()
        denom = gc64.norm() * gn64.norm()
        s = float((gc64 * gn64).sum() / denom) if denom > 0 else 0.0
        out[key] = t0 + (1.0 - beta) * g_c + (beta * max(s, 0.0)) * g_n
    return out


__all__ = [
    "bound_alignment",
    "certified_ce",
    "expressive_loss",
    "ibp_regulariser",
    "joint",
    "max_loss",
    "project_gradients",
    "random_halves",
    "random_loss",
    "worst_case_logits",
]
