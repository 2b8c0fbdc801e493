"""The only module that imports auto_LiRPA: compatibility fixes and version differences.

PyPI has only auto-LiRPA 0.3 (2022), written for torch < 1.13 and numpy 1. On torch 2.x / numpy 2 it
needs six fixes (SPEC.md section 5), applied here before or right after its import and only when the
installed version lacks them. Newer auto_LiRPA releases (0.6+) get no patch, only the option renames
that :func:`bound_opts` and :func:`compute_bounds` absorb.

Everything else in cure_lirpa uses :data:`BoundedModule`, :data:`BoundedTensor`,
:data:`PerturbationLpNorm`, :func:`bound_opts` and :func:`compute_bounds` from here.
"""

from __future__ import annotations

import logging
import sys
import types
import warnings
from typing import Any, Optional

import numpy as np
import torch
from packaging.version import Version

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


def _patch_after_import(bounded_module_cls: type) -> None:
    # Fix 4: torch 2 calls Module._named_members(..., remove_duplicate=...); 0.3's override lacks it.
    import inspect

    original = bounded_module_cls._named_members
    if "remove_duplicate" not in inspect.signature(original).parameters:

        def _named_members(self, get_members_fn, prefix="", recurse=True, remove_duplicate=True):
            # 0.3 always de-duplicates, which is what remove_duplicate=True asks for.
            return original(self, get_members_fn, prefix=prefix, recurse=recurse)

        bounded_module_cls._named_members = _named_members
        APPLIED_FIXES.append("named_members_remove_duplicate")


def _import() -> types.ModuleType:
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    saved_filters = list(warnings.filters)
    _patch_before_import()
    try:
        import auto_LiRPA
    except ImportError as exc:
        raise ImportError(
            "auto_LiRPA is not installed. Install it with "
            "'pip install --no-deps auto-LiRPA==0.3 tqdm appdirs pyyaml packaging' "
            "(or run 'make install')."
        ) from exc
    finally:
        # Importing auto_LiRPA configures the root logger and the warnings filters; undo that.
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        warnings.filters[:] = saved_filters
    _patch_after_import(auto_LiRPA.BoundedModule)
    logging.getLogger("auto_LiRPA").setLevel(logging.WARNING)
    return auto_LiRPA


_auto_lirpa = _import()
AUTO_LIRPA_VERSION: str = getattr(_auto_lirpa, "__version__", "0.3")
NEW_API = Version(AUTO_LIRPA_VERSION) >= Version("0.6")

BoundedModule = _auto_lirpa.BoundedModule
BoundedTensor = _auto_lirpa.BoundedTensor
PerturbationLpNorm = _auto_lirpa.PerturbationLpNorm

# Method names of this package -> auto_LiRPA's.
METHODS = {
    "ibp": "IBP",
    "crown-ibp": "CROWN-IBP",
    "crown": "backward",
    "alpha-crown": "CROWN-Optimized",
}


def bound_opts(
    relu: str = "adaptive", alpha_iterations: int = 20, alpha_lr: float = 0.5, **extra: Any
) -> dict[str, Any]:
    """``bound_opts`` for ``BoundedModule`` with the option names of the installed version.

    ``sparse_features_alpha`` is off: 0.3's sparse-alpha code crashes on CNNs with alpha-CROWN.
    """
    opts: dict[str, Any] = {
        "sparse_features_alpha": False,
        "optimize_bound_args": {"iteration": alpha_iterations, "lr_alpha": alpha_lr},
    }
    opts["activation_bound_option" if NEW_API else "relu"] = relu
    opts.update(extra)
    return opts


def compute_bounds(
    module: Any,
    x: torch.Tensor,
    C: Optional[torch.Tensor],
    method: str,
    interm_bounds: Optional[dict] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Call ``module.compute_bounds`` with this package's method name; returns ``(lb, ub)``.

    ``x`` is a ``BoundedTensor``; it is always passed as a 1-tuple (auto_LiRPA reuses stored bounds
    when ``x`` is None, which would silently turn CROWN into CROWN-IBP).
    """
    if method not in METHODS:
        raise ValueError(f"unknown bound method {method!r}; choose one of {', '.join(METHODS)}")
    kwargs: dict[str, Any] = {"x": (x,), "C": C, "method": METHODS[method], "bound_upper": False}
    if interm_bounds is not None:
        kwargs["interm_bounds" if NEW_API else "intermediate_layer_bounds"] = interm_bounds
    if method == "alpha-crown":
        with torch.enable_grad():
            lb, ub = module.compute_bounds(**kwargs)
    else:
        lb, ub = module.compute_bounds(**kwargs)
    return lb, ub


def perturbation(
    p: float, eps: float, x_L: Optional[torch.Tensor] = None, x_U: Optional[torch.Tensor] = None
) -> Any:
    """An auto_LiRPA ``PerturbationLpNorm`` (``p`` is ``math.inf``, 2.0 or 1.0; eps in pixel units)."""
    return PerturbationLpNorm(norm=np.inf if p == float("inf") else p, eps=eps, x_L=x_L, x_U=x_U)
