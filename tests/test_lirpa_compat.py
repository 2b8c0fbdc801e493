"""The auto_LiRPA compatibility layer (cure_lirpa.bounds.lirpa): one test per fix it applies.

Each test checks the behaviour the fix restores (not only that the patch is installed), so it fails if
the fix is missing or broken: the six torch 2.x / numpy 2 gaps listed in cure_lirpa/bounds/lirpa.py,
alpha-CROWN's frozen slopes on torch >= 2.14, the restored logger and warnings state, and the
silenced noise.
"""

from __future__ import annotations

import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from cure_lirpa.bounds import lirpa


def _wrap(model: nn.Module, x: torch.Tensor, **opts) -> lirpa.BoundedModule:
    return lirpa.BoundedModule(
        model.eval(), torch.zeros_like(x[:1]), bound_opts=lirpa.bound_opts(**opts)
    )


def _mlp(seed: int = 0, d: int = 20, width: int = 32, k: int = 5) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(d, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, k)
    )


def _margins(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """f_y - f_j for j != y, shape (N, K-1) (the rows of the C used below)."""
    k = logits.shape[1]
    others = torch.arange(k).expand(len(y), -1)
    others = others[others != y.unsqueeze(1)].view(len(y), k - 1)
    return logits.gather(1, y.unsqueeze(1)) - logits.gather(1, others)


def _margin_matrix(y: torch.Tensor, k: int) -> torch.Tensor:
    eye = torch.eye(k)
    others = torch.arange(k).expand(len(y), -1)
    others = others[others != y.unsqueeze(1)].view(len(y), k - 1)
    return eye[y].unsqueeze(1) - eye[others]


def _ball_samples(x: torch.Tensor, p: float, eps: float, n: int) -> torch.Tensor:
    """n points per input in the lp ball (half of them on its boundary), shape (n, B, d)."""
    gen = torch.Generator().manual_seed(1)
    if p == math.inf:
        u = (torch.rand(n, *x.shape, generator=gen) * 2 - 1) * eps
        u[: n // 2] = u[: n // 2].sign() * eps
    else:
        u = torch.randn(n, *x.shape, generator=gen)
        u = u / u.norm(p=p, dim=-1, keepdim=True)
        u = u * eps * torch.rand(n, x.shape[0], 1, generator=gen).clamp(min=0.5)
        u[: n // 2] = u[: n // 2] / u[: n // 2].norm(p=p, dim=-1, keepdim=True) * eps
    return x + u


# ----------------------------------------------------------------------------------------------
# Fix 1: the TorchScript exporter's opset is really set to 12 while parsing
# ----------------------------------------------------------------------------------------------
class _SumOfOutputs(nn.Module):
    """Linear, then Unsqueeze -> ReduceSum(keepdim) -> Squeeze: ``sum_j (W x + b)_j`` of shape (B, 1)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x).unsqueeze(1)  # (B, 1, 4)
        h = h.sum(dim=2, keepdim=True)  # (B, 1, 1)
        return h.squeeze(2) + x.sum(dim=1, keepdim=True) * 0.5  # (B, 1)


def test_opset_12_while_parsing_squeeze_unsqueeze_reducesum():
    globals_ = lirpa._torchscript_globals()
    saved = globals_.export_onnx_opset_version
    try:
        # From opset 13 on, Squeeze/Unsqueeze/ReduceSum take their axes as inputs, and 0.3's
        # parser fails with KeyError 'axes' unless the opset really is 12 while it parses.
        globals_.export_onnx_opset_version = 17
        model = _SumOfOutputs()
        x = torch.rand(3, 6)
        bm = _wrap(model, x)
        assert globals_.export_onnx_opset_version == 12
    finally:
        globals_.export_onnx_opset_version = saved
    eps = 0.1
    bx = lirpa.BoundedTensor(x, lirpa.perturbation(math.inf, eps))
    with torch.no_grad():
        lb, ub = bm.compute_bounds(x=(bx,), method="backward")
        # The model is affine, c^T x + d: CROWN is exact, c^T x + d -+ eps * ||c||_1.
        c = model.lin.weight.sum(0) + 0.5
        center = model(x)
    assert torch.allclose(lb, center - eps * c.abs().sum(), atol=1e-5)
    assert torch.allclose(ub, center + eps * c.abs().sum(), atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Fix 2: node attributes (``node[key]``) are readable
# ----------------------------------------------------------------------------------------------
def test_node_attribute_access_reads_conv_attributes():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace is deprecated
        graph = torch.jit.trace(lambda t: t.sum(dim=1, keepdim=True), torch.zeros(2, 3)).graph
    constants = [
        n for n in graph.nodes() if n.kind() == "prim::Constant" and n.hasAttribute("value")
    ]
    assert constants and all(n["value"] is not None for n in constants)

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)
    )
    bm = _wrap(model, torch.zeros(1, 1, 8, 8))
    convs = [m for m in bm.modules() if type(m).__name__ == "BoundConv"]
    assert len(convs) == 1
    assert list(convs[0].stride) == [2, 2] and list(convs[0].padding) == [1, 1]


# ----------------------------------------------------------------------------------------------
# Fix 3: numpy.lib.arraysetops (gone in numpy 2) can be imported
# ----------------------------------------------------------------------------------------------
def test_numpy_arraysetops_isin():
    from numpy.lib.arraysetops import isin

    assert isin(np.array([1, 2, 3]), [2]).tolist() == [False, True, False]


# ----------------------------------------------------------------------------------------------
# Fix 4: BoundedModule.parameters() / named_parameters(remove_duplicate=...)
# ----------------------------------------------------------------------------------------------
def test_parameters_and_optimizer_step():
    model = _mlp()
    x = torch.rand(4, 20)
    bm = _wrap(model, x)
    names = [n for n, _ in bm.named_parameters()]
    names_all = [n for n, _ in bm.named_parameters(remove_duplicate=False)]
    assert len(names) == 6 and sorted(names) == sorted(names_all)
    params = list(bm.parameters())
    assert len(params) == 6
    before = [p.detach().clone() for p in params]

    bm.train()
    opt = torch.optim.SGD(bm.parameters(), lr=0.1)
    bx = lirpa.BoundedTensor(x, lirpa.perturbation(math.inf, 0.05))
    lb, _ = bm.compute_bounds(x=(bx,), method="IBP", bound_upper=False)
    (-lb.sum()).backward()
    opt.step()
    assert any(not torch.equal(b, p.detach()) for b, p in zip(before, params))


def test_crown_in_matrix_mode_runs():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3)
    )
    x = torch.rand(2, 1, 8, 8)
    # In matrix mode, CROWN bounds on the second convolution start from an identity C matrix built
    # with the dtype of list(BoundedModule.parameters())[0], which goes through fix 4.
    bm = _wrap(model, x, conv_mode="matrix", sparse_intermediate_bounds=False)
    bx = lirpa.BoundedTensor(x, lirpa.perturbation(math.inf, 0.02))
    with torch.no_grad():
        lb, ub = bm.compute_bounds(x=(bx,), method="backward")
        out = model(x)
    assert (lb <= out + 1e-5).all() and (out <= ub + 1e-5).all()


# ----------------------------------------------------------------------------------------------
# Fix 5: torch._six.string_classes exists and register_parameter works on a BoundedModule
# ----------------------------------------------------------------------------------------------
def test_torch_six_and_register_parameter():
    import torch._six

    assert isinstance("name", torch._six.string_classes)
    bm = _wrap(_mlp(), torch.zeros(1, 20))
    bm.register_parameter("extra", nn.Parameter(torch.zeros(2)))
    assert "extra" in dict(bm.named_parameters())


# ----------------------------------------------------------------------------------------------
# Fix 6: np.bool exists
# ----------------------------------------------------------------------------------------------
def test_np_bool():
    assert np.zeros(2, dtype=np.bool).dtype == np.bool_


# ----------------------------------------------------------------------------------------------
# Fix 7: alpha-CROWN optimises its slopes (torch >= 2.14 clamp derivative)
# ----------------------------------------------------------------------------------------------
def test_clip_slope_keeps_gradient_on_the_bounds():
    a = torch.tensor([-0.5, 0.0, 0.3, 1.0, 1.5], requires_grad=True)
    out = lirpa.clip_slope(a)
    assert torch.equal(out, a.detach().clamp(0, 1))
    (grad,) = torch.autograd.grad(out.sum(), a)
    assert grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_alpha_fix_applied_exactly_when_needed():
    needed = not lirpa.clamp_passes_boundary_gradient()  # a torch fact, for any auto_LiRPA
    assert ("alpha_clamp_gradient" in lirpa.APPLIED_FIXES) == needed


@pytest.mark.parametrize("p,eps", [(math.inf, 0.05), (2.0, 0.3)])
def test_alpha_crown_tighter_than_crown_and_sound(p, eps):
    model = _mlp(seed=3)
    x = torch.rand(3, 20)
    with torch.no_grad():
        y = model(x).argmax(1)
    C = _margin_matrix(y, 5)
    bm = _wrap(model, x, alpha_iterations=10)
    bx = lirpa.BoundedTensor(x, lirpa.perturbation(p, eps))
    crown = lirpa.compute_bounds(bm, bx, C, "crown").lower
    alpha = lirpa.compute_bounds(bm, bx, C, "alpha-crown").lower
    crown_again = lirpa.compute_bounds(bm, bx, C, "crown").lower
    assert torch.allclose(crown, crown_again, atol=1e-6)  # no optimised slopes leak into CROWN
    assert (alpha >= crown - 1e-6).all()
    assert (alpha - crown).mean() > 1e-3, "alpha-CROWN did not improve on CROWN"
    with torch.no_grad():
        z = _ball_samples(x, p, eps, 300)
        m = _margins(model(z.view(-1, 20)), y.repeat(300)).view(300, 3, 4)
    assert (alpha <= m.min(0).values + 1e-5).all()


def test_alpha_crown_prints_nothing(capsys):
    model = _mlp(seed=4)
    x = torch.rand(2, 20)
    # No learning and a patience of 1 force auto_LiRPA's "Early stop at ...th iter" message.
    bm = _wrap(model, x, alpha_iterations=15, alpha_lr=0.0)
    bm.bound_opts["optimize_bound_args"]["early_stop_patience"] = 1
    lirpa.compute_bounds(
        bm, lirpa.BoundedTensor(x, lirpa.perturbation(math.inf, 0.05)), None, "alpha-crown"
    )
    assert capsys.readouterr().out == ""


# ----------------------------------------------------------------------------------------------
# Noise: norm=1 dual norm, torch.onnx parse warnings
# ----------------------------------------------------------------------------------------------
def test_l1_dual_norm_exact_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ptb = lirpa.perturbation(1.0, 0.2)
        assert ptb.dual_norm == math.inf
        assert lirpa.perturbation(2.0, 0.2).dual_norm == 2.0
        assert lirpa.perturbation(math.inf, 0.2).dual_norm == 1.0
        torch.manual_seed(0)
        lin = nn.Linear(8, 3)
        x = torch.rand(2, 8)
        bm = _wrap(nn.Sequential(lin), x)
        bx = lirpa.BoundedTensor(x, ptb)
        with torch.no_grad():
            lb_ibp, _ = bm.compute_bounds(x=(bx,), method="IBP")
            lb_crown, _ = bm.compute_bounds(x=(bx,), method="backward")
            center = lin(x)
    # l1 ball through an affine layer: exactly W x + b -+ eps * max_i |W_ji|.
    exact = center - 0.2 * lin.weight.abs().max(1).values
    assert torch.allclose(lb_ibp, exact, atol=1e-6) and torch.allclose(lb_crown, exact, atol=1e-6)


def test_parsing_emits_no_onnx_warnings():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(72, 3)
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lirpa.BoundedModule(model.train(), torch.zeros(2, 1, 8, 8), bound_opts=lirpa.bound_opts())
    assert not [w for w in caught if "onnx" in str(w.message).lower() or "onnx" in w.filename]


# ----------------------------------------------------------------------------------------------
# Import side effects: root logger and warnings filters restored, import is quiet
# ----------------------------------------------------------------------------------------------
_IMPORT_PROBE = """
import logging, sys, warnings
import numpy, torch  # their own warnings filters are not auto_LiRPA's doing
warnings.simplefilter("always")
warnings.filterwarnings("error", message="user filter sentinel")
root = logging.getLogger()
root.setLevel(logging.ERROR)
before = (list(root.handlers), root.level, list(warnings.filters))
import cure_lirpa.bounds.lirpa
after = (list(root.handlers), root.level, list(warnings.filters))
assert "auto_LiRPA" in sys.modules
assert before == after, (before, after)
print("RESTORED")
"""


def test_import_restores_logger_and_warnings_and_is_quiet():
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_PROBE], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "RESTORED"
    assert "FutureWarning" not in proc.stderr and "No CUDA runtime" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("threat,index", [("linf:0.1", 150), ("l2:0.5", 200)])
def test_sparse_alpha_failure_gives_the_crown_bound_and_leaves_no_state(monkeypatch, threat, index):
    """auto_LiRPA 0.3's sparse-spec alpha asserts in BoundRelu on some inputs (tests/data/README.md
    says how the stored model was made): alpha-CROWN then returns the CROWN bound, and the next
    alpha-CROWN call on another input optimises as on a fresh module."""
    from pathlib import Path

    from cure_lirpa.bounds.classifier import BoundedClassifier
    from cure_lirpa.data import load_dataset
    from cure_lirpa.io.checkpoint import load_checkpoint, model_from_checkpoint
    from cure_lirpa.threats.base import parse_threat

    model = model_from_checkpoint(
        load_checkpoint(Path(__file__).parent / "data" / "sparse_alpha_case.pt")
    ).eval()
    test = load_dataset("sample", "test")
    x, y = test[index][0].unsqueeze(0), torch.tensor([test[index][1]])
    ball = parse_threat(threat)

    def fresh() -> BoundedClassifier:
        return BoundedClassifier(model, (1, 28, 28), alpha_iterations=5)

    bc = fresh()
    with monkeypatch.context() as m:  # without the fallback: the upstream assertion
        m.setattr(lirpa, "_raised_in_auto_lirpa", lambda exc: False)
        with pytest.raises(AssertionError):
            bc.margin_lower_bounds(x, y, ball, "alpha-crown")
    result = bc.bounds(x, y, ball, "alpha-crown")
    alpha = result.lower
    assert result.fell_back.tolist() == [True]  # the return value says it fell back
    crown = fresh().margin_lower_bounds(x, y, ball, "crown")
    assert torch.allclose(alpha, crown, atol=1e-6)
    with torch.no_grad():
        z = x + _ball_samples(torch.zeros(1, 784), ball.p, ball.eps, 200).view(200, 1, 28, 28)
        sampled = _margins(model(z.clamp(0, 1)), y.repeat(200))
    assert (alpha <= sampled.min(0).values + 1e-5).all()

    other_x, other_y = test[0][0].unsqueeze(0), torch.tensor([test[0][1]])
    again = bc.bounds(other_x, other_y, ball, "alpha-crown")
    after = again.lower
    assert again.fell_back.tolist() == [False]  # a normal input takes the normal path again
    assert torch.allclose(after, fresh().margin_lower_bounds(other_x, other_y, ball, "alpha-crown"))


def test_alpha_crown_fallbacks_are_recorded_per_sample_and_in_the_summary():
    """A sample whose alpha-CROWN call fell back to CROWN is flagged in its record (and counted in
    the summary); a sample certified by a real alpha-CROWN call in another batch is not."""
    from pathlib import Path

    from torch.utils.data import Subset

    from cure_lirpa.data import load_dataset
    from cure_lirpa.io.checkpoint import load_checkpoint, model_from_checkpoint
    from cure_lirpa.threats.base import parse_threat
    from cure_lirpa.verification.results import row_from_json, row_to_json
    from cure_lirpa.verification.runner import certify_dataset

    model = model_from_checkpoint(
        load_checkpoint(Path(__file__).parent / "data" / "sparse_alpha_case.pt")
    ).eval()
    data = Subset(load_dataset("sample", "test"), [0, 150])
    ball = parse_threat("linf:0.1")
    rows, summary = certify_dataset(
        model, data, [ball], ["alpha-crown"], (1, 28, 28), batch_size=1, attack=False
    )
    assert [r.alpha_fallback for r in rows] == [[], ["linf:0.1"]]
    assert summary["alpha_crown_fallbacks"] == {"linf:0.1": 1}
    assert row_from_json(row_to_json(rows[1])).alpha_fallback == ["linf:0.1"]
    _, ibp_only = certify_dataset(model, data, [ball], ["ibp"], (1, 28, 28), attack=False)
    assert "alpha_crown_fallbacks" not in ibp_only
