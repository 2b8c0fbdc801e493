"""Projected gradient (PGD) attacks in [0, 1] pixel space, for evaluation and for certified training.

* :func:`pgd` / :func:`robust_accuracy` -- a strong multi-restart attack on an l∞, l2 or l1 ball, used to
  cross-check certificates (certified accuracy must never exceed PGD robust accuracy).
* :func:`sabr_box` -- SABR's small l∞ box around a PGD point (Müller et al., ICLR 2023).
* :func:`l2_defence_box` -- CURE's l2 defence point and box (the CURE paper's l2 loss).
* :func:`box_pgd` -- signed-gradient search inside boxes (patch locations), refuting samples.
* :func:`family_attack` -- an attack inside a box family (patches, geometric transformations), used
  to cross-check their certificates.

Every attack runs the model in eval mode (BatchNorm statistics are never updated), takes gradients with
respect to the input only (parameters' ``.grad`` are left untouched) and restores each module's
training flag afterwards. Returned points are detached.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError
from .threats.base import BoxFamily, NormBall, Threat

LOSSES = ("margin", "ce")
Generators = Union[torch.Generator, Sequence[torch.Generator], None]
"""A generator for the whole batch, one per sample (a sample's random starts then do not depend on
the other samples of its batch), or None (torch's global generator)."""
"""Attack objectives: ``margin`` = max_{j != y} f_j - f_y (> 0 iff misclassified); ``ce`` = cross-entropy."""


# ----------------------------------------------------------------------------------------------
# objectives and helpers


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample ``max_{j != y} logits_j - logits_y`` (B,); positive iff the sample is misclassified."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    mask = F.one_hot(y, logits.shape[1]).bool()
    other = logits.masked_fill(mask, -math.inf).amax(1)
    return other - true


def _ce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


_LOSS_FNS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "margin": margin_loss,
    "ce": _ce_loss,
}


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode, then restore each module's own ``training`` flag."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


def step_schedule(
    base: float,
    steps: int,
    milestones: Sequence[float] = (0.5, 0.8, 0.9),
    factor: float = 0.1,
) -> list[float]:
    """Step sizes for ``steps`` PGD steps: ``base``, multiplied by ``factor`` at each milestone.

    Milestones are fractions of ``steps``; step ``i`` (0-based) uses ``base * factor**n`` with
    ``n = #{m : i >= floor(m * steps)}``. CURE's l2 attack uses base 0.2*eps and (0.5, 0.8, 0.9) x 0.1,
    which for 8 steps gives [b, b, b, b, b/10, b/10, b/100, b/1000].
    """
    marks = [int(math.floor(m * steps)) for m in milestones]
    return [base * factor ** sum(i >= k for k in marks) for i in range(steps)]


def _draw(fn: Callable[..., torch.Tensor], shape, generator, like: torch.Tensor) -> torch.Tensor:
    """Random tensor from ``fn`` drawn on the generator's device, moved to ``like``'s device/dtype."""
    device = generator.device if generator is not None else like.device
    out = fn(shape, generator=generator, device=device, dtype=like.dtype)
    return out.to(like.device)


def random_delta(
    p: float, eps: float, like: torch.Tensor, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """A random perturbation inside the lp ball of radius ``eps`` with the shape of ``like`` (B, ...).

    l∞: uniform in the cube. l2: uniform direction (normalised Gaussian) with radius ``eps * u**(1/d)``,
    i.e. uniform in the ball. l1: Laplace direction (random signs times exponentials) normalised to
    unit l1 norm, radius ``eps * u**(1/d)``. Not clipped to [0, 1]: project it with the threat.
    """
    shape = like.shape
    b = shape[0]
    d = like[0].numel()
    view = (b,) + (1,) * (like.dim() - 1)
    if p == math.inf:
        return (2 * _draw(torch.rand, shape, generator, like) - 1) * eps
    radius = eps * _draw(torch.rand, (b,), generator, like).pow(1.0 / d)
    if p == 2.0:
        g = _draw(torch.randn, shape, generator, like)
        g = g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(view)
    else:
        mag = -torch.log1p(-_draw(torch.rand, shape, generator, like).clamp(max=1 - 1e-7))
        sign = torch.where(_draw(torch.rand, shape, generator, like) < 0.5, -1.0, 1.0).to(
            like.dtype
        )
        g = sign * mag
        g = g / g.flatten(1).abs().sum(1).clamp_min(1e-12).view(view)
    return g * radius.view(view)


def _random_start(p: float, eps: float, x: torch.Tensor, generator: Generators) -> torch.Tensor:
    """:func:`random_delta` for the batch ``x``, from one generator or one per sample."""
    if generator is None or isinstance(generator, torch.Generator):
        return random_delta(p, eps, x, generator)
    if len(generator) != len(x):
        raise UserError(
            f"got {len(generator)} generators for {len(x)} samples; give one per sample"
        )
    return torch.cat([random_delta(p, eps, x[i : i + 1], g) for i, g in enumerate(generator)])


def _ascent_direction(p: float, g: torch.Tensor, x_adv: torch.Tensor, l1_k: int) -> torch.Tensor:
    """Steepest-ascent direction of unit lp norm for the gradient ``g`` (B, ...).

    l∞: ``sign(g)``. l2: ``g / ||g||_2``. l1: a sparse step (SLIDE-style): the ``l1_k`` coordinates of
    largest |g| among those not blocked by the [0, 1] box (a coordinate at 0 with g < 0 or at 1 with
    g > 0 cannot move), each moved by ``sign(g) / l1_k``.
    """
    if p == math.inf:
        return g.sign()
    view = (g.shape[0],) + (1,) * (g.dim() - 1)
    if p == 2.0:
        return g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(view)
    blocked = ((x_adv <= 0) & (g < 0)) | ((x_adv >= 1) & (g > 0))
    score = g.abs().masked_fill(blocked, 0.0).flatten(1)
    vals, idx = score.topk(min(l1_k, score.shape[1]), dim=1)
    sgn = g.flatten(1).sign().gather(1, idx) * (vals > 0).to(g.dtype)
    out = torch.zeros_like(score).scatter_(1, idx, sgn / idx.shape[1])
    return out.view_as(g)


def _check_inputs(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    if not isinstance(model, nn.Module):
        raise UserError(f"the attack needs a torch.nn.Module, got {type(model).__name__}")
    if not torch.is_tensor(x) or not x.is_floating_point() or x.dim() < 2:
        raise UserError("x must be a floating tensor of shape (B, C, H, W) (or (B, D)) in [0, 1]")
    if not torch.is_tensor(y) or y.shape != (x.shape[0],):
        raise UserError(
            f"y must be a tensor of {x.shape[0]} integer labels, got shape "
            f"{tuple(y.shape) if torch.is_tensor(y) else type(y).__name__}"
        )
    if x.numel() and (x.min() < -1e-6 or x.max() > 1 + 1e-6):
        raise UserError(
            f"x must be in [0, 1] pixel space (got values in [{float(x.min()):.9g}, {float(x.max()):.9g}]); "
            "attacks and threats work on unnormalised images: put normalisation inside the model"
        )


def _as_ball(threat: Threat) -> NormBall:
    if not isinstance(threat, NormBall):
        raise UserError(
            f"PGD supports the lp-ball threats linf/l2/l1, not {threat}; "
            "patch and geometric threats are only certified"
        )
    return threat


def _run_pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    ball: NormBall,
    *,
    step_sizes: Sequence[float],
    restarts: int,
    random_start: bool,
    loss: str,
    keep: str,
    include_clean: bool,
    generator: Generators,
    l1_k: int = 1,
    callback: Optional[Callable[[int, torch.Tensor], None]] = None,
) -> torch.Tensor:
    """Shared PGD loop; returns the best iterate per sample (detached), inside ``ball`` around x.

    ``keep='loss'`` keeps the highest-loss iterate; ``keep='adversarial'`` prefers misclassified
    iterates and, among equals, the highest loss. ``callback(i, x_adv)`` sees every iterate.
    """
    if loss not in _LOSS_FNS:
        raise UserError(f"unknown attack loss {loss!r}; choose one of {', '.join(LOSSES)}")
    if restarts < 1:
        raise UserError(f"restarts must be >= 1, got {restarts}")
    loss_fn = _LOSS_FNS[loss]
    x = x.detach()
    y = y.detach()
    view = (x.shape[0],) + (1,) * (x.dim() - 1)
    best = x.clone()
    best_loss = torch.full((x.shape[0],), -math.inf, device=x.device, dtype=x.dtype)
    best_mis = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)

    def consider(cand: torch.Tensor, logits: torch.Tensor) -> None:
        nonlocal best, best_loss, best_mis
        if logits.dim() != 2 or logits.shape[0] != x.shape[0] or logits.shape[1] < 2:
            raise UserError(
                f"the model must return logits of shape (B, K) with K >= 2, got {tuple(logits.shape)}"
            )
        value = loss_fn(logits, y).detach()
        mis = logits.argmax(1) != y
        if keep == "loss":
            better = value > best_loss
        else:
            better = (mis & ~best_mis) | ((mis == best_mis) & (value > best_loss))
        best = torch.where(better.view(view), cand, best)
        best_loss = torch.where(better, value, best_loss)
        best_mis = torch.where(better, mis, best_mis)

    with eval_mode(model):
        if include_clean:
            with torch.no_grad():
                consider(x, model(x))
        for _ in range(restarts):
            if random_start and ball.eps > 0:
                x_adv = ball.project(x + _random_start(ball.p, ball.eps, x, generator), x)
            else:
                x_adv = x.clone()
            for i in range(len(step_sizes) + 1):
                last = i == len(step_sizes)
                x_adv = x_adv.detach().requires_grad_(not last)
                with torch.set_grad_enabled(not last):
                    logits = model(x_adv)
                    consider(x_adv.detach(), logits.detach())
                    if callback is not None:
                        callback(i, x_adv.detach())
                    if last:
                        break
                    (g,) = torch.autograd.grad(loss_fn(logits, y).sum(), x_adv)
                d = _ascent_direction(ball.p, g, x_adv.detach(), l1_k)
                x_adv = ball.project(x_adv.detach() + step_sizes[i] * d, x)
    return best.detach()


# ----------------------------------------------------------------------------------------------
# evaluation attack


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    threat: Threat,
    steps: int = 50,
    restarts: int = 3,
    step_size: Optional[float] = None,
    random_start: bool = True,
    loss: str = "margin",
    generator: Generators = None,
    l1_sparsity: float = 0.01,
) -> torch.Tensor:
    """Most adversarial point found by PGD in the threat set around each sample; shape of ``x``.

    ``x`` (B, C, H, W) in [0, 1], ``y`` (B,) labels, ``threat`` a :class:`NormBall` (l∞, l2 or l1).
    Steps: l∞ sign steps, l2 normalised-gradient steps, l1 sparse steps (``l1_sparsity`` of the
    coordinates, at least one, see :func:`_ascent_direction`); each iterate is projected onto the ball
    and clipped to [0, 1] (:meth:`NormBall.project`), so every iterate -- and the result -- satisfies
    ``threat.contains(x_adv, x)``. Default ``step_size = 2.5 * eps / steps`` (Madry et al.) for every
    norm. ``restarts`` runs, each from a random start inside the ball (``random_start``) or from x.
    Per sample the clean input and all iterates of all restarts compete: a misclassified point beats
    a correctly classified one, ties are broken by the attack ``loss`` (``'margin'`` or ``'ce'``).
    ``generator``: one for the batch, or one per sample so that each sample's random starts (the
    attack's only randomness) do not depend on the samples it is batched with.
    """
    ball = _as_ball(threat)
    _check_inputs(model, x, y)
    if steps < 0:
        raise UserError(f"steps must be >= 0, got {steps}")
    if not 0 < l1_sparsity <= 1:
        raise UserError(f"l1_sparsity must be in (0, 1], got {l1_sparsity}")
    if ball.eps == 0:
        return x.detach().clone()
    size = 2.5 * ball.eps / max(steps, 1) if step_size is None else float(step_size)
    l1_k = max(1, int(round(l1_sparsity * x[0].numel())))
    return _run_pgd(
        model,
        x,
        y,
        ball,
        step_sizes=[size] * steps,
        restarts=restarts,
        random_start=random_start,
        loss=loss,
        keep="adversarial",
        include_clean=True,
        generator=generator,
        l1_k=l1_k,
    )


def robust_accuracy(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat, **kw
) -> torch.Tensor:
    """Bool (B,): True where :func:`pgd` (same keyword arguments) fails, i.e. the model stays correct.

    An upper bound on certified accuracy: a sample certified under ``threat`` must come out True.
    """
    x_adv = pgd(model, x, y, threat, **kw)
    with eval_mode(model), torch.no_grad():
        return model(x_adv).argmax(1) == y


# ----------------------------------------------------------------------------------------------
# training attacks (cheap: few steps, one restart)


def _check_eps_tau(eps: float, tau: float) -> None:
    if not (eps >= 0 and 0 <= tau <= eps) or math.isinf(eps):
        raise UserError(
            f"need 0 <= tau <= eps (finite), got eps={eps:g}, tau={tau:g}; tau = lambda * eps with "
            "lambda in [0, 1]"
        )


def sabr_box(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    tau: float,
    steps: int = 8,
    step_size: Optional[float] = None,
    loss: str = "ce",
    random_start: bool = True,
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SABR's propagation box ``(x_L, x_U)`` for l∞ radius ``eps`` and box radius ``tau`` (Müller et al.).

    An l∞ PGD point inside ``clip(x ± (eps - tau), 0, 1)`` (``steps`` sign steps of ``step_size`` --
    default ``0.25 * (eps - tau)`` -- decayed x0.1 at 50/80/90% of the steps, random start,
    best-``loss`` iterate kept), moved into ``[lo + tau, hi - tau]`` with ``[lo, hi] = clip(x ± eps,
    0, 1)`` (the midpoint where that interval is empty), then ``[x' - tau, x' + tau]`` intersected
    with ``[lo, hi]``. The box always lies inside the threat set and has the full width ``2 tau``
    wherever ``hi - lo >= 2 tau`` (also at pixels at 0 or 1); at ``tau = eps`` it is the threat set.
    Runs the model in eval mode; shapes as ``x``.
    """
    _check_inputs(model, x, y)
    _check_eps_tau(eps, tau)
    x = x.detach()
    r = eps - tau
    if r > 0 and steps > 0:
        base = 0.25 * r if step_size is None else float(step_size)
        center = _run_pgd(
            model,
            x,
            y,
            NormBall(math.inf, r),
            step_sizes=step_schedule(base, steps),
            restarts=1,
            random_start=random_start,
            loss=loss,
            keep="loss",
            include_clean=False,
            generator=generator,
        )
    else:
        center = x
    # The box of radius tau must lie in the clipped threat set [lo, hi]: centre in [lo + tau,
    # hi - tau] (SABR's propagation region). Near the pixel range's ends (MNIST's black
    # background) this keeps the box's full width 2 tau instead of losing the part outside [0, 1].
    lo, hi = (x - eps).clamp(0.0, 1.0), (x + eps).clamp(0.0, 1.0)
    c_lo, c_hi = lo + tau, hi - tau
    center = torch.where(
        c_lo <= c_hi, torch.minimum(torch.maximum(center, c_lo), c_hi), (lo + hi) / 2
    )
    x_l = torch.maximum(center - tau, lo)
    x_u = torch.minimum(center + tau, hi)
    return x_l, x_u


def expressive_attack_point(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    p: float,
    eps: float,
    steps: int = 1,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """MTL-IBP's adversarial point: a short cross-entropy PGD in the lp ball of radius ``eps``.

    De Palma et al. (ICLR 2024) train with single-step attacks: a random start in the ball, then
    one step of ``10 * eps`` (sign step for l∞, normalised-gradient step for l2) projected back onto
    the ball and [0, 1], which lands on the boundary. With ``steps > 1`` the step is ``2.5 * eps /
    steps`` (Madry et al.). Every iterate lies in the threat set; the highest-loss one is returned.
    """
    _check_inputs(model, x, y)
    if not (eps >= 0 and math.isfinite(eps)):
        raise UserError(f"the attack radius must be finite and >= 0, got {eps}")
    if steps < 1:
        raise UserError(f"the MTL-IBP attack needs at least one step, got {steps}")
    if eps == 0:
        return x.detach().clone()
    size = 10.0 * eps if steps == 1 else 2.5 * eps / steps
    return _run_pgd(
        model,
        x,
        y,
        NormBall(p, eps),
        step_sizes=[size] * steps,
        restarts=1,
        random_start=True,
        loss="ce",
        keep="loss",
        include_clean=False,
        generator=generator,
    )


def l2_defence_point(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    tau: float,
    steps: int = 8,
    step_size: Optional[float] = None,
    loss: str = "ce",
    random_start: bool = True,
    generator: Optional[torch.Generator] = None,
    callback: Optional[Callable[[int, torch.Tensor], None]] = None,
) -> torch.Tensor:
    """CURE's l2 attack point: l2 PGD inside ``{||x' - x||_2 <= eps - tau} ∩ [0, 1]^d`` (CURE).

    ``steps`` normalised-gradient steps of ``step_size`` (default ``0.2 * eps``) decayed x0.1 at
    50/80/90% of the steps, random start uniform in the ball of radius ``eps - tau``, best-``loss``
    iterate kept. Each iterate is projected onto the l2 ball around **x** and then clipped to [0, 1],
    so it never leaves the set (the public CURE code adds projected steps to the iterate and the
    random start twice, which can leave the ball; not reproduced). ``callback(i, x_adv)`` sees every
    iterate (for tests and diagnostics).
    """
    _check_inputs(model, x, y)
    _check_eps_tau(eps, tau)
    x = x.detach()
    r = eps - tau
    if r <= 0 or steps <= 0:
        return x.clone()
    base = 0.2 * eps if step_size is None else float(step_size)
    return _run_pgd(
        model,
        x,
        y,
        NormBall(2.0, r),
        step_sizes=step_schedule(base, steps),
        restarts=1,
        random_start=random_start,
        loss=loss,
        keep="loss",
        include_clean=False,
        generator=generator,
        callback=callback,
    )


def l2_defence_box(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    tau: float,
    **point_options: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CURE's l2 defence box ``(x_L, x_U)``: the l∞ box of radius ``tau`` around :func:`l2_defence_point`
    (``point_options``: its ``steps``, ``step_size``, ``loss``, ``random_start``, ``generator``).

    ``tau = lambda2 * eps`` (the public scripts use lambda2 = 1e-5, close to adversarial training);
    the box is clipped to [0, 1]. **Training heuristic only**: the box is not contained in the l2 ball of
    radius ``eps`` (its corners are up to ``tau * sqrt(d)`` away from x' in l2) and it does not cover the
    ball either, so bounds over it certify nothing about the l2 threat. Use l2-ball bounds to certify.
    """
    center = l2_defence_point(model, x, y, eps, tau, **point_options)
    return (center - tau).clamp(0.0, 1.0), (center + tau).clamp(0.0, 1.0)


__all__ = [
    "LOSSES",
    "eval_mode",
    "expressive_attack_point",
    "l2_defence_box",
    "l2_defence_point",
    "margin_loss",
    "pgd",
    "random_delta",
    "robust_accuracy",
    "sabr_box",
    "step_schedule",
]


def box_pgd(
    model: nn.Module,
    x_L: torch.Tensor,
    x_U: torch.Tensor,
    y: torch.Tensor,
    steps: int = 20,
    restarts: int = 1,
    step_size: float = 0.25,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The point of each box ``[x_L, x_U]`` (P, ...) with the smallest margin found, and that
    margin ``min_{j != y} f_y - f_j`` (P,) (measured on the point, not a bound).

    Tries the corners ``x_L`` and ``x_U``, then ``restarts`` random starts with ``steps``
    signed-gradient steps of ``step_size`` times the box width each, projected onto the box.
    Returns ``(margins (P,), points (P, ...))``; a negative margin is a misclassified point.
    """
    gen = torch.Generator(device=x_L.device).manual_seed(seed)
    width = x_U - x_L
    with eval_mode(model):

        def margins(points: torch.Tensor) -> torch.Tensor:
            return -margin_loss(model(points), y)

        def keep(m: torch.Tensor, z: torch.Tensor) -> None:
            better = m < best
            best[better] = m[better]
            points[better] = z[better]

        with torch.no_grad():
            best, points = margins(x_L), x_L.clone()
            keep(margins(x_U), x_U)
        for _ in range(restarts):
            z = x_L + width * torch.rand(x_L.shape, generator=gen, device=x_L.device)
            for step in range(steps + 1):
                z = z.detach().requires_grad_(step < steps)
                with torch.set_grad_enabled(step < steps):
                    m = margins(z)
                keep(m.detach(), z.detach())
                if step < steps:
                    (grad,) = torch.autograd.grad(m.sum(), z)
                    z = torch.minimum(torch.maximum(z - step_size * width * grad.sign(), x_L), x_U)
    return best, points


def family_attack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    threat: BoxFamily,
    in_shape: Sequence[int],
    steps: int = 20,
    keep: int = 16,
    per_box: int = 2,
    generators: Sequence[Optional[torch.Generator]] = (),
) -> Optional[torch.Tensor]:
    """Whether each sample of ``x`` (B, C, H, W) keeps its label ``y`` (B,) under an attack inside
    the box family ``threat``: bool (B,), or None when the family has no attack.

    Exact boxes (patches): both corners of every box (the patch all 0, all 1), then :func:`box_pgd`
    with ``steps`` steps in the ``keep`` boxes whose corners came closest to a misclassification.
    Otherwise (geometric transformations) the model on :meth:`BoxFamily.points`: the centre and
    ``per_box`` random parameter vectors of every sub-interval. ``generators``: one per sample
    (its random points do not depend on its batch), or empty.
    """
    gens = list(generators) or [None] * len(y)
    robust = torch.ones(len(y), dtype=torch.bool)
    with eval_mode(model), torch.no_grad():
        for i in range(len(y)):
            xi, yi = x[i : i + 1], y[i : i + 1]
            if threat.exact_boxes:
                index = torch.arange(threat.num_boxes(tuple(in_shape)))
                lo, hi = (b[0] for b in threat.boxes_at(xi, index))
                corners = torch.minimum(_margins(model, lo, yi), _margins(model, hi, yi))
                worst = corners.argsort()[:keep]
                seed = int(torch.randint(2**31, (1,), generator=gens[i]))
                with torch.enable_grad():
                    found, _ = box_pgd(model, lo[worst], hi[worst], yi.expand(len(worst)),
                                       steps=steps, seed=seed)  # fmt: skip
                robust[i] = bool((corners > 0).all() and (found > 0).all())
            else:
                points = threat.points(xi[0], per_box, gens[i])
                if points is None:
                    return None
                robust[i] = bool((_margins(model, points, yi) > 0).all())
    return robust


def _margins(model: nn.Module, points: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``f_y - max_{j != y} f_j`` (M,) of the images ``points`` (M, C, H, W), all of label y (1,)."""
    return -margin_loss(model(points), y.expand(len(points)))
