"""The package's names and defaults in one place: every norm, bound method, cascade stage, training
objective, smoothing noise, default radius and result column is spelled here and nowhere else in
the library. Click choices, docs tables, result files and benchmarks read them from here.

No torch import: the command line reads this module at start-up.
"""

from __future__ import annotations

import math

# ---------------------------------------------------------------------------------------------
# Norms of lp-ball threats (``linf:0.1``, ``l2:0.5``, ``l1:1``) and their p.

LINF, L2, L1 = "linf", "l2", "l1"
NORMS: dict[str, float] = {LINF: math.inf, L2: 2.0, L1: 1.0}
"""Norm name -> p, in the order results list them."""
NORM_OF_P: dict[float, str] = {p: name for name, p in NORMS.items()}
NORM_SYMBOLS: dict[str, str] = {LINF: "l∞", L2: "l2", L1: "l1"}
"""How human-readable tables and messages write each norm."""

# ---------------------------------------------------------------------------------------------
# Bound methods (cheapest first) and the cascade.

IBP, CROWN_IBP, CROWN, ALPHA_CROWN, SDP_CROWN = (
    "ibp",
    "crown-ibp",
    "crown",
    "alpha-crown",
    "sdp-crown",
)
BOUND_METHODS: tuple[str, ...] = (IBP, CROWN_IBP, CROWN, ALPHA_CROWN, SDP_CROWN)
AUTO = "auto"
"""The cheapest-first cascade over the stages of :data:`CASCADE_STAGES`."""
BOX = "box"
"""Key of :data:`CASCADE_STAGES` for box threats (patches, geometric transformations)."""
CASCADE_STAGES: dict[str, tuple[str, ...]] = {
    LINF: (IBP, CROWN_IBP, CROWN, ALPHA_CROWN),
    L2: (IBP, CROWN_IBP, CROWN, SDP_CROWN, ALPHA_CROWN),
    L1: (IBP, CROWN_IBP, CROWN, SDP_CROWN, ALPHA_CROWN),
    BOX: (IBP, CROWN_IBP, CROWN, ALPHA_CROWN),
}
"""The cascade's stages per threat kind, cheapest first: SDP-CROWN helps l2 balls (and l1 balls
through the enclosing l2 ball), and is CROWN on boxes."""
CASCADE_BUDGET = 30.0
"""Default seconds of bound computation per sample and threat for the cascade (``auto``); a sample
still open when its time is spent is recorded as ``timeout`` and counts as not certified."""
TIMEOUT = "timeout"
"""What the cascade records as the deciding stage of a sample whose budget ran out."""
