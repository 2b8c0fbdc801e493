"""The only module that imports auto_LiRPA: compatibility fixes and version differences.

PyPI has only auto-LiRPA 0.3 (2022), written for torch < 1.13 and numpy 1. On torch 2.x / numpy 2 it
needs six fixes (each tested in tests/test_lirpa_compat.py), applied here before or right after
its import and only when the installed version lacks them. A seventh is needed from torch 2.14
on, whose ``torch.clamp`` has a zero derivative at its bounds: without it alpha-CROWN returns
exactly the CROWN bound (:func:`clip_slope`).
Newer auto_LiRPA releases (0.6+) get none of the six, only the option renames that :func:`bound_opts`
and :func:`compute_bounds` absorb; the seventh depends on torch, not on auto_LiRPA (upstream 0.7.1 has
the same ``torch.clamp``), so it is applied to any version when torch needs it. :data:`APPLIED_FIXES` lists what was applied.

Noise, silenced without touching the user's warnings filters: importing auto_LiRPA 0.3 changes the
root logger and the warnings filters (undone), triggers torch's ``torch.jit.script`` deprecation
FutureWarning and a "No CUDA runtime" log line (dropped for the import only); parsing a model emits
torch.onnx export warnings (ignored while parsing); lp bounds with ``norm=1`` divide by zero in numpy
(the dual norm is set exactly); alpha-CROWN prints "Early stop ..." on stdout (sent to the
``auto_LiRPA`` logger at DEBUG level instead).

Everything else in cure_lirpa uses :data:`BoundedModule`, :data:`BoundedTensor`,
:data:`PerturbationLpNorm`, :func:`bound_opts` and :func:`compute_bounds` from here.
"""

from __future__ import annotations

import logging
import re
import sys
import types
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Optional

import numpy as np
import torch
from packaging.version import Version

from ..vocabulary import ALPHA_CROWN, CROWN, CROWN_IBP, IBP

APPLIED_FIXES: list[str] = []


def _torchscript_globals() -> Any:
    """The TorchScript ONNX exporter's GLOBALS (moved in torch 2.9)."""
    try:
        from torch.onnx._internal.torchscript_exporter import _globals
    except ImportError:
        from torch.onnx import _globals  # type: ignore[no-redef]
    return _globals.GLOBALS


def _node_get() -> Any:
    try:
        from torch.onnx._internal.torchscript_exporter.symbolic_helper import _node_get as get
    except ImportError:
        from torch.onnx.symbolic_helper import _node_get as get  # type: ignore[no-redef]
    return get


def set_opset_version(version: int) -> None:
    """Fix 1: set the TorchScript exporter's opset (what 0.3's ``_set_opset_version`` did)."""
    _torchscript_globals().export_onnx_opset_version = version


def _patch_before_import() -> None:
    import torch.onnx.symbolic_helper as symbolic_helper

    # Fix 1: `from torch.onnx.symbolic_helper import _set_opset_version` must exist and really work.
    if not hasattr(symbolic_helper, "_set_opset_version"):
        symbolic_helper._set_opset_version = set_opset_version
        APPLIED_FIXES.append("set_opset_version")
    # Fix 2: 0.3 reads node attributes as `node[key]`.
    if not hasattr(torch._C.Node, "__getitem__"):
        getter = _node_get()
        torch._C.Node.__getitem__ = lambda node, key: getter(node, key)
        APPLIED_FIXES.append("node_getitem")
    # Fix 3: numpy 2 removed numpy.lib.arraysetops (0.3 imports `isin` from it).
    try:
        import numpy.lib.arraysetops  # noqa: F401
    except ImportError:
        shim = types.ModuleType("numpy.lib.arraysetops")
        shim.isin = np.isin
        sys.modules["numpy.lib.arraysetops"] = shim
        APPLIED_FIXES.append("numpy_arraysetops")
    # Fix 5: torch._six is gone (0.3 uses torch._six.string_classes in register_parameter).
    if not hasattr(torch, "_six"):
        six = types.ModuleType("torch._six")
        six.string_classes = (str, bytes)
        sys.modules["torch._six"] = six
        torch._six = six
        APPLIED_FIXES.append("torch_six")
    # Fix 6: np.bool is missing on numpy 1.24-1.26 (0.3's language perturbation uses it).
    if "bool" not in np.__dict__:
        np.bool = np.bool_  # type: ignore[attr-defined]
        APPLIED_FIXES.append("np_bool")


def clamp_passes_boundary_gradient() -> bool:
    """Whether ``torch.clamp(t, 0, 1)`` has derivative 1 (not 0) at ``t = 0`` and ``t = 1``.

    True up to torch 2.13. torch 2.14 switched scalar-bound clamp to the minimum-norm subgradient, 0 at
    the bounds (pytorch/pytorch#184574), which freezes auto_LiRPA's alpha-CROWN slopes (fix 7).
    """
    t = torch.tensor([0.0, 1.0], requires_grad=True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(torch.clamp(t, min=0.0, max=1.0).sum(), t)
    return bool((grad == 1).all())


def clip_slope(alpha: torch.Tensor, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    """``alpha`` clipped to ``[low, high]`` with derivative 1 on the closed interval, 0 outside.

    Same values as ``torch.clamp``; the derivative is the one torch.clamp had before torch 2.14, so a
    slope sitting exactly on a bound still receives gradient and can move back inside.
    """
    inside = (alpha >= low) & (alpha <= high)
    return torch.where(inside, alpha, alpha.clamp(low, high))


def relu_lower_slopes(
    lower: torch.Tensor,
    upper: torch.Tensor,
    lb_alpha: Optional[torch.Tensor],
    ub_alpha: Optional[torch.Tensor],
    leaky_alpha: float = 0.0,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Any]:
    """Slopes of the ReLU lower relaxations in alpha-CROWN (replaces ``BoundRelu._relu_mask_alpha``).

    For pre-activation bounds ``lower <= z <= upper`` (each (B, *shape)) and optimisable slopes alpha
    (spec, B, *shape; one set for the lower and one for the upper output bound, or None), alpha-CROWN
    (Xu et al., ICLR 2021) bounds ``relu(z) >= d * z`` with ``d = 1`` on active neurons
    (``lower >= 0``), ``d = leaky_alpha`` (0 for ReLU) on inactive ones (``upper <= 0``) and
    ``d = alpha`` clipped to ``[leaky_alpha, 1]`` on unstable ones. Returns ``(d_lb, d_ub,
    all_inactive)``, the values auto_LiRPA's own function returns; only the clip's derivative differs
    (:func:`clip_slope`, fix 7).
    """
    active = (lower >= 0).to(lower.dtype)
    inactive = upper <= 0
    unstable = (1.0 - active) * (~inactive).to(lower.dtype)

    def slopes(alpha: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if alpha is None:
            return None
        d = clip_slope(alpha, leaky_alpha, 1.0) * unstable + active
        return d + inactive.to(lower.dtype) * leaky_alpha if leaky_alpha > 0 else d

    all_inactive = False if leaky_alpha > 0 else inactive.all()
    return slopes(lb_alpha), slopes(ub_alpha), all_inactive


def dual_norm(p: float) -> float:
    """The dual exponent q of an lp norm, 1/p + 1/q = 1 (p = 1 -> inf, p = inf -> 1)."""
    if p == np.inf:
        return 1.0
    if p == 1:
        return np.inf
    return p / (p - 1.0)


def _patch_after_import(auto_lirpa: types.ModuleType) -> None:
    """Apply the fixes and silencers that need the imported module, each where it is needed."""
    for fix in (
        _fix_named_members,
        _fix_alpha_clamp_gradient,
        _fix_lp1_dual_norm,
        _tighten_conv_l1_ibp,
        _quiet_onnx_parse,
        _quiet_alpha_prints,
    ):
        fix(auto_lirpa)


def _fix_named_members(auto_lirpa: types.ModuleType) -> None:
    import inspect

    # Fix 4: torch 2 calls Module._named_members(..., remove_duplicate=...); 0.3's override lacks it.
    bounded_module_cls = auto_lirpa.BoundedModule
    original = bounded_module_cls._named_members
    if "remove_duplicate" not in inspect.signature(original).parameters:

        def _named_members(self, get_members_fn, prefix="", recurse=True, remove_duplicate=True):
            # 0.3 always de-duplicates, which is what remove_duplicate=True asks for.
            return original(self, get_members_fn, prefix=prefix, recurse=recurse)

        bounded_module_cls._named_members = _named_members
        APPLIED_FIXES.append("named_members_remove_duplicate")


def _fix_alpha_clamp_gradient(auto_lirpa: types.ModuleType) -> None:
    # Fix 7 (torch >= 2.14): alpha-CROWN returned exactly the CROWN bound. auto_LiRPA clips each
    # ReLU slope alpha inside the bound computation with torch.clamp(alpha, 0, 1). torch 2.14 gives
    # scalar-bound clamp the derivative 0 at the bounds (it was 1 before). The slopes start at exactly
    # 0 or 1 (CROWN's adaptive slopes) and are clipped back onto [0, 1] after every Adam step, so all
    # of them sat on a bound with zero gradient and never moved. The bound still depends on alpha
    # through autograd; only this derivative was lost. Replace the clip by one with the old derivative.
    # Upstream 0.7.1 has the same torch.clamp, so this fix depends on torch, not on auto_LiRPA's
    # version: it is applied whenever torch's clamp has lost the boundary gradient.
    relu_cls = getattr(getattr(auto_lirpa, "operators", None), "BoundRelu", None)
    if hasattr(relu_cls, "_relu_mask_alpha") and not clamp_passes_boundary_gradient():
        relu_cls._relu_mask_alpha = staticmethod(relu_lower_slopes)
        APPLIED_FIXES.append("alpha_clamp_gradient")


def _fix_lp1_dual_norm(auto_lirpa: types.ModuleType) -> None:
    # Noise: for norm=1, PerturbationLpNorm and BoundLinear's IBP compute the dual norm as
    # np.float64(1) / (1 - 1/1), which is inf (correct) with a numpy "divide by zero" RuntimeWarning
    # on every call. Set PerturbationLpNorm's exactly; scope numpy's divide check out of the other.
    ptb_cls = auto_lirpa.PerturbationLpNorm
    with np.errstate(divide="raise"):
        try:
            ptb_cls(norm=1.0, eps=0.0)
            lp1_divides = False
        except FloatingPointError:
            lp1_divides = True
    if lp1_divides:
        ptb_init = ptb_cls.__init__

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            with np.errstate(divide="ignore"):  # the 1 / 0 of norm=1, replaced right below
                ptb_init(self, *args, **kwargs)
            self.dual_norm = dual_norm(self.norm)

        ptb_cls.__init__ = __init__
        linear_cls = getattr(getattr(auto_lirpa, "operators", None), "BoundLinear", None)
        if linear_cls is not None:
            linear_ibp = linear_cls.interval_propagate

            def interval_propagate(self, *args: Any, **kwargs: Any) -> Any:
                with np.errstate(divide="ignore"):  # only numpy scalars divide here: 1 / 0 = inf
                    return linear_ibp(self, *args, **kwargs)

            linear_cls.interval_propagate = interval_propagate
        APPLIED_FIXES.append("lp1_dual_norm")


def _tighten_conv_l1_ibp(auto_lirpa: types.ModuleType) -> None:
    # Tightness: BoundConv's IBP of an lp ball (p < inf) uses the l2 norm of each filter whatever p
    # is. That is the dual norm for l2; for l1 the dual norm is l∞ (max |w|), up to sqrt(k) times
    # smaller. Give l1 balls their dual norm (a sound and tighter interval).
    conv_cls = getattr(getattr(auto_lirpa, "operators", None), "BoundConv", None)
    if conv_cls is not None and not getattr(conv_cls, "_cure_l1_dual", False):
        conv_ibp = conv_cls.interval_propagate

        def conv_interval_propagate(self: Any, *v: Any, **kwargs: Any) -> Any:
            ptb = getattr(v[0], "ptb", None)
            if (
                ptb is None
                or float(getattr(ptb, "norm", np.inf)) != 1.0
                or self.is_input_perturbed(1)
            ):
                return conv_ibp(self, *v, **kwargs)
            weight = v[1][0]
            bias = v[2][0] if self.has_bias else None
            center = torch.nn.functional.conv2d(
                v[0][1], weight, bias, self.stride, self.padding, self.dilation, self.groups
            )
            radius = weight.abs().amax(dim=(1, 2, 3)).view(1, -1, 1, 1) * ptb.eps
            return center - radius, center + radius

        conv_cls.interval_propagate = conv_interval_propagate
        conv_cls._cure_l1_dual = True
        APPLIED_FIXES.append("conv_l1_dual_norm")


def _quiet_onnx_parse(auto_lirpa: types.ModuleType) -> None:
    # Noise: parsing a model goes through torch's TorchScript ONNX exporter, which warns about ONNX
    # export details (e.g. "ONNX Preprocess - Removing mutation", "ONNX export mode is set to
    # TrainingMode.EVAL") that do not apply here. Ignore torch.onnx's UserWarnings while parsing.
    bound_general = getattr(auto_lirpa, "bound_general", None)
    parse = getattr(bound_general, "parse_module", None)
    if parse is not None:

        def parse_module(*args: Any, **kwargs: Any) -> Any:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx\.")
                return parse(*args, **kwargs)

        bound_general.parse_module = parse_module


def _quiet_alpha_prints(auto_lirpa: types.ModuleType) -> None:
    # Noise: alpha-CROWN prints "Early stop at ...th iter" on stdout on every call. A module-level
    # `print` in auto_LiRPA's optimisation module sends its messages to the auto_LiRPA logger instead.
    optimized_bounds = getattr(auto_lirpa, "optimized_bounds", None)
    if optimized_bounds is not None and "print" not in vars(optimized_bounds):
        log = logging.getLogger("auto_LiRPA")

        def _print(*args: Any, **_: Any) -> None:
            log.debug(" ".join(str(a) for a in args))

        optimized_bounds.print = _print


# torch.jit.script's deprecation message (auto_LiRPA 0.3's decorators trigger it at import).
_JIT_DEPRECATION = r".*torch\.jit\.script` is (deprecated|not supported)"


def _import() -> types.ModuleType:
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    cpp_log = logging.getLogger("torch.utils.cpp_extension")
    saved_cpp_level = cpp_log.level
    _patch_before_import()
    try:
        # catch_warnings restores the filters auto_LiRPA changes (its `warnings.simplefilter('once')`
        # would also override an "ignore" filter set here, hence record=True and a re-issue below).
        with warnings.catch_warnings(record=True) as caught:
            warnings.filterwarnings("ignore", message=_JIT_DEPRECATION, category=FutureWarning)
            # "No CUDA runtime is found" is logged when auto_LiRPA imports torch.utils.cpp_extension.
            cpp_log.setLevel(logging.ERROR)
            import auto_LiRPA
    except ImportError as exc:
        raise ImportError(
            "auto_LiRPA is not installed. Install it with "
            "'pip install --no-deps auto-LiRPA==0.3 tqdm appdirs packaging' "
            "(or run 'make install')."
        ) from exc
    finally:
        # Importing auto_LiRPA configures the root logger (logging.basicConfig); undo that.
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        cpp_log.setLevel(saved_cpp_level)
    for w in caught:  # all but the deprecation of torch.jit.script, which 0.3's decorators trigger
        if not (
            issubclass(w.category, FutureWarning) and re.match(_JIT_DEPRECATION, str(w.message))
        ):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    _patch_after_import(auto_LiRPA)
    logging.getLogger("auto_LiRPA").setLevel(logging.WARNING)
    return auto_LiRPA


_auto_lirpa = _import()
AUTO_LIRPA_VERSION: str = getattr(_auto_lirpa, "__version__", "0.3")
NEW_API = Version(AUTO_LIRPA_VERSION) >= Version("0.6")

BoundedModule = _auto_lirpa.BoundedModule
BoundedTensor = _auto_lirpa.BoundedTensor
PerturbationLpNorm = _auto_lirpa.PerturbationLpNorm

_log = logging.getLogger("cure_lirpa.bounds.lirpa")

# Method names of this package -> auto_LiRPA's.
METHODS = {
    IBP: "IBP",
    CROWN_IBP: "CROWN-IBP",
    CROWN: "backward",
    ALPHA_CROWN: "CROWN-Optimized",
}


def bound_opts(
    relu: str = "adaptive", alpha_iterations: int = 20, alpha_lr: float = 0.5, **extra: Any
) -> dict[str, Any]:
    """``bound_opts`` for ``BoundedModule`` with the option names of the installed version.

    ``sparse_features_alpha`` is off (0.3's sparse-feature alpha crashes alpha-CROWN on CNNs).
    ``sparse_spec_alpha`` stays on, as in auto_LiRPA: without it every ReLU keeps one slope per neuron
    of every later layer and alpha-CROWN on a small CNN takes tens of seconds per image instead of
    about one; on the inputs where 0.3's sparse-spec code fails, :func:`compute_bounds` returns the
    CROWN bound (and says so in its ``fell_back`` field).
    """
    opts: dict[str, Any] = {
        "sparse_features_alpha": False,
        "sparse_spec_alpha": True,
        "optimize_bound_args": {"iteration": alpha_iterations, "lr_alpha": alpha_lr},
    }
    opts["activation_bound_option" if NEW_API else "relu"] = relu
    opts.update(extra)
    return opts


class Bounds(NamedTuple):
    """What :func:`compute_bounds` returns: lower and upper bounds (upper None when not asked) and
    whether alpha-CROWN was answered by the CROWN bound (auto_LiRPA 0.3 failed on the batch)."""

    lower: torch.Tensor
    upper: Optional[torch.Tensor]
    fell_back: bool = False


def compute_bounds(
    module: Any,
    x: torch.Tensor,
    C: Optional[torch.Tensor],
    method: str,
    interm_bounds: Optional[dict] = None,
) -> Bounds:
    """Call ``module.compute_bounds`` with this package's method name; returns :class:`Bounds`.

    ``x`` is a ``BoundedTensor``; it is always passed as a 1-tuple (auto_LiRPA reuses stored bounds
    when ``x`` is None, which would silently turn CROWN into CROWN-IBP).
    """
    if method not in METHODS:
        raise ValueError(f"unknown bound method {method!r}; choose one of {', '.join(METHODS)}")
    kwargs: dict[str, Any] = {"x": (x,), "C": C, "method": METHODS[method], "bound_upper": False}
    if interm_bounds is not None:
        kwargs["interm_bounds" if NEW_API else "intermediate_layer_bounds"] = interm_bounds
    try:
        if interm_bounds is None and method in (CROWN, ALPHA_CROWN):
            kwargs["reference_bounds"] = ibp_reference_bounds(module, x)
        if method != ALPHA_CROWN:
            return Bounds(*module.compute_bounds(**kwargs))
        return _alpha_crown(module, kwargs)
    except Exception as exc:
        if not _raised_in_auto_lirpa(exc):
            raise
        raise BoundFailure(
            f"{type(exc).__name__} in auto_LiRPA's {_innermost_function(exc)}"
            + (f": {str(exc)[:160]}" if str(exc) else "")
        ) from exc


class BoundFailure(RuntimeError):
    """auto_LiRPA raised inside its own code while bounding (an operator or mode it lacks)."""


def _innermost_code(exc: BaseException) -> Optional[types.CodeType]:
    """The code object of the innermost frame of ``exc``'s traceback (None without one)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return None if tb is None else tb.tb_frame.f_code


def _innermost_function(exc: BaseException) -> str:
    code = _innermost_code(exc)
    return "?" if code is None else f"{code.co_name} ({Path(code.co_filename).name})"


def _alpha_crown(module: Any, kwargs: dict[str, Any]) -> Bounds:
    with torch.enable_grad():
        try:
            return Bounds(*module.compute_bounds(**kwargs))
        except (AssertionError, KeyError) as exc:
            if not _raised_in_auto_lirpa(exc):
                raise
            failure = repr(exc)
        # 0.3's sparse-spec slope tables assert on some inputs (and the next call on the same input
        # can miss a table: KeyError). Its dense and shared-slope code paths avoid that but cost
        # tens of seconds per CIFAR-sized image, so these inputs get the CROWN bound: alpha-CROWN
        # with the slopes it starts from (exactly CROWN's bound, sound).
        _log.debug("alpha-CROWN failed inside auto_LiRPA (%r); using the CROWN bound", failure)
        for node in getattr(module, "optimizable_activations", ()):
            node.opt_end()  # leave the failed optimisation: CROWN must not read its slopes
        return Bounds(*module.compute_bounds(**dict(kwargs, method=METHODS[CROWN])), True)


def ibp_reference_bounds(
    module: Any, x: torch.Tensor
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """IBP bounds of every intermediate node, as ``reference_bounds`` for a CROWN-type call.

    auto_LiRPA bounds a pre-activation node by CROWN only on the neurons that IBP finds unstable in
    *some* sample of the batch, and keeps the CROWN bound there even where the sample's own IBP bound
    is tighter; which neurons those are depends on the other samples, so a sample's bound changed
    with its batch companions. Given these IBP bounds as references, auto_LiRPA keeps the tighter of
    the two on every neuron, so every sample gets ``IBP ∩ CROWN`` whatever else is in its batch.
    """
    with torch.no_grad():
        module.compute_bounds(x=(x,), C=None, method="IBP", bound_upper=True)
    return node_bounds(module)


_LP_SAFE_READERS = ("BoundLinear", "BoundConv")
_LP_SHAPE_ONLY = ("BoundReshape", "BoundFlatten")


def lp_ball_droppers(module: Any) -> list[str]:
    """Nodes that read the perturbed input of ``module`` without bounding an lp ball (p < inf).

    auto_LiRPA carries an lp ball as ``x_L = x_U = x`` plus the perturbation object; only Linear and
    Conv apply the dual norm to it. Any other consumer of the input (``x - mean``, ``x * w``, a ReLU,
    a concatenation), reached directly or through reshapes, sees a zero-width box, and every bound
    behind it is unsound for that ball. Returns ``"Type name"`` strings of those nodes (empty: safe).
    """
    nodes = {node.name: node for node in module._modules.values()}
    inputs = [n for n in nodes.values() if type(n).__name__ == "BoundInput"]
    bad: list[str] = []
    stack = list(inputs)
    while stack:
        src = stack.pop()
        for name in src.output_name:
            node = nodes[name]
            kind = type(node).__name__
            reads_data = bool(node.inputs) and node.inputs[0] is src
            if kind in _LP_SAFE_READERS and reads_data:
                continue
            if kind in _LP_SHAPE_ONLY and reads_data:
                stack.append(node)
                continue
            bad.append(f"{kind[5:] if kind.startswith('Bound') else kind} {name}")
    return bad


def _raised_in_auto_lirpa(exc: BaseException) -> bool:
    """True when the innermost frame of ``exc``'s traceback is auto_LiRPA code."""
    code = _innermost_code(exc)
    return code is not None and "auto_LiRPA" in code.co_filename


def perturbation(
    p: float, eps: float, x_L: Optional[torch.Tensor] = None, x_U: Optional[torch.Tensor] = None
) -> Any:
    """An auto_LiRPA ``PerturbationLpNorm`` (``p`` is ``math.inf``, 2.0 or 1.0; eps in pixel units)."""
    return PerturbationLpNorm(norm=np.inf if p == float("inf") else p, eps=eps, x_L=x_L, x_U=x_U)


def buffer_pairs(module: Any, target: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(buffer of the bounded module, buffer of target it was copied from)`` for every buffer
    (e.g. BatchNorm running statistics) that ``module``, traced from ``target``, holds its own copy of."""
    mine = dict(target.named_buffers())
    return [
        (node.buffer, mine[node.ori_name])
        for node in module.modules()
        if type(node).__name__ == "BoundBuffers" and getattr(node, "ori_name", None) in mine
    ]


def relu_input_bounds(module: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(lower, upper)`` pre-activation bounds of the ReLU nodes of ``module`` in graph order, as the
    last bound computation left them (with their gradients; ReLUs it did not reach are left out)."""
    out = []
    for node in module.relus:
        pre = node.inputs[0]
        if getattr(pre, "lower", None) is not None and getattr(pre, "upper", None) is not None:
            out.append((pre.lower, pre.upper))
    return out


# ---------------------------------------------------------------------------------------------
# The traced graph as plain data, and a ReLU rule for the final backward pass (for SDP-CROWN)


@dataclass
class GraphNode:
    """One node of a traced graph, described without auto_LiRPA types.

    ``kind``: ``input``, ``constant`` (does not depend on the input), ``linear`` (``weight`` a matrix
    in either orientation, times ``scale``), ``conv`` (``weight`` a kernel, ``stride``, ``padding``,
    ``dilation``, ``groups``, ``in_shape`` of one sample), ``batchnorm`` (``scale`` the per-channel
    multipliers), ``relu``, ``add`` / ``sub`` (sums), ``mul`` / ``div`` by a constant (``scale`` its
    largest / smallest magnitude), ``concat``, ``shape`` (reshape, flatten, identity-like),
    ``other``. ``inputs``: names of the inputs that depend on the perturbed input.
    """

    name: str
    kind: str
    inputs: list[str]
    weight: Optional[torch.Tensor] = None
    scale: Optional[torch.Tensor] = None
    stride: tuple[int, ...] = (1, 1)
    padding: tuple[int, ...] = (0, 0)
    dilation: tuple[int, ...] = (1, 1)
    groups: int = 1
    in_shape: tuple[int, ...] = ()


_SHAPE_NODES = (
    "BoundFlatten", "BoundReshape", "BoundUnsqueeze", "BoundSqueeze", "BoundDropout",
    "BoundIdentity",
)  # fmt: skip


def _value(node: Any) -> Optional[torch.Tensor]:
    for attr in ("forward_value", "param", "buffer", "value"):
        v = getattr(node, attr, None)
        if isinstance(v, torch.Tensor):
            return v.detach()
    return None


def graph(module: Any) -> list[GraphNode]:
    """The nodes of ``module`` in topological order, after a bound computation (which marks the
    nodes that depend on the perturbed input)."""
    out: list[GraphNode] = []
    for node in module._modules.values():
        kind = type(node).__name__
        live = [i for i in node.inputs if getattr(i, "perturbed", False)]
        names = [i.name for i in live]
        if kind == "BoundInput":
            out.append(GraphNode(node.name, "input", []))
        elif not getattr(node, "perturbed", False):
            out.append(GraphNode(node.name, "constant", []))
        elif kind == "BoundRelu":
            out.append(GraphNode(node.name, "relu", names))
        elif kind in ("BoundAdd", "BoundSub"):
            out.append(GraphNode(node.name, kind[5:].lower(), names))
        elif kind in _SHAPE_NODES and len(live) == 1 and node.inputs[0] is live[0]:
            out.append(GraphNode(node.name, "shape", names))
        elif kind == "BoundConcat":
            out.append(GraphNode(node.name, "concat", names))
        else:
            out.append(_affine_node(node, kind, live, names))
    return out


def _affine_node(node: Any, kind: str, live: list, names: list[str]) -> GraphNode:
    """Linear, Conv, BatchNorm, and Mul/Div by a constant; anything else is ``other``."""
    other = GraphNode(node.name, "other", names)
    if len(live) != 1:
        return other
    consts = [_value(i) for i in node.inputs if i is not live[0]]
    if kind == "BoundLinear" and node.inputs[0] is live[0] and not getattr(node, "transA", 0):
        return GraphNode(
            node.name, "linear", names, weight=consts[0], scale=_abs(getattr(node, "alpha", 1.0))
        )
    if kind == "BoundMatMul" and consts and consts[0] is not None and consts[0].dim() == 2:
        return GraphNode(node.name, "linear", names, weight=consts[0], scale=_abs(1.0))
    if kind == "BoundConv" and node.inputs[0] is live[0]:
        return GraphNode(
            node.name, "conv", names, weight=consts[0],
            stride=tuple(node.stride), padding=tuple(node.padding),
            dilation=tuple(node.dilation), groups=int(node.groups),
            in_shape=tuple(node.inputs[0].output_shape[1:]),
        )  # fmt: skip
    if kind == "BoundBatchNormalization" and node.inputs[0] is live[0] and not node.training:
        weight, _, _, var = consts[:4]
        return GraphNode(node.name, "batchnorm", names, scale=weight / (var + node.eps).sqrt())
    if kind in ("BoundMul", "BoundDiv") and consts and consts[0] is not None:
        if kind == "BoundDiv" and node.inputs[0] is not live[0]:
            return other
        return GraphNode(node.name, kind[5:].lower(), names, scale=consts[0])
    return other


def _abs(v: Any) -> torch.Tensor:
    return torch.tensor(abs(float(v)))


def relu_inputs(module: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per ReLU node name: its pre-activation's ``(lower, upper, value at the centre)``, each
    (B, *shape), as the last bound computation left them (detached)."""
    out = {}
    for n in module.relus:
        x = n.inputs[0]
        center = module.get_forward_value(x)  # the input node holds the ball's centre
        out[n.name] = (x.lower.detach(), x.upper.detach(), center.detach())
    return out


def node_bounds(module: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Bounds of every intermediate node from the last bound computation, in the form
    :func:`compute_bounds` takes as ``interm_bounds`` (so a later call does not recompute them)."""
    out = {}
    for node in module._modules.values():
        lower, upper = getattr(node, "lower", None), getattr(node, "upper", None)
        if (
            getattr(node, "perturbed", False)
            and isinstance(lower, torch.Tensor)
            and isinstance(upper, torch.Tensor)
            and node.name not in module.output_name
        ):
            out[node.name] = (lower.detach(), upper.detach())
    return out


ReluRule = Callable[[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@contextmanager
def relu_backward_rule(module: Any, rule: ReluRule) -> Iterator[None]:
    """Inside the block, the backward pass from ``module``'s output (the final specification) goes
    through each ReLU node by ``rule(relu name, last_lA) -> (lA, bias)`` instead of CROWN's
    relaxation: ``last_lA`` and ``lA`` have auto_LiRPA's layout (S, B, *shape), ``bias`` is (S, B).
    Backward passes from other nodes (intermediate bounds) keep auto_LiRPA's rule."""
    final = module.final_name
    patched = []
    for node in module.relus:
        original = node.bound_backward

        def bound_backward(last_lA, last_uA, x=None, start_node=None, _o=original, _n=node, **kw):
            if (
                start_node is not None
                and start_node.name == final
                and last_uA is None
                and isinstance(last_lA, torch.Tensor)
            ):
                lA, bias = rule(_n.name, last_lA)
                return [(lA, None)], bias, 0
            return _o(last_lA, last_uA, x, start_node=start_node, **kw)

        node.bound_backward = bound_backward
        patched.append(node)
    try:
        yield
    finally:
        for node in patched:
            del node.bound_backward  # the instance attribute; the class method shows again


def relu_preactivations(module: Any, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per ReLU node name: its pre-activation at the points ``x`` (a plain forward pass)."""
    with torch.no_grad():
        module(x)
        return {n.name: n.inputs[0].forward_value.detach().clone() for n in module.relus}
