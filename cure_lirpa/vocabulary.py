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
AUTO_DEVICE = AUTO
"""``--device auto``: CUDA when available, else the CPU."""
DEFAULT_BOUND_METHODS: tuple[str, ...] = (IBP, CROWN_IBP)
"""What ``cure-lirpa verify`` runs without ``--method``."""
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

# ---------------------------------------------------------------------------------------------
# Datasets and their default radii.

SAMPLE, MNIST, CIFAR10, TINYIMAGENET = "sample", "mnist", "cifar10", "tinyimagenet"
DATASETS: tuple[str, ...] = (SAMPLE, MNIST, CIFAR10, TINYIMAGENET)
DEFAULT_RADII: dict[str, tuple[str, str]] = {
    SAMPLE: ("0.1", "0.5"),
    MNIST: ("0.1", "0.5"),
    CIFAR10: ("2/255", "0.25"),
    TINYIMAGENET: ("1/255", "36/255"),
}
"""The usual (l∞, l2) radii of each dataset in the CURE and SABR papers, as text."""
DEFAULT_THREATS: dict[str, tuple[str, str]] = {
    name: (f"{LINF}:{linf}", f"{L2}:{l2}") for name, (linf, l2) in DEFAULT_RADII.items()
}
"""The threats of :data:`DEFAULT_RADII` (``linf:0.1``, ``l2:0.5``) per dataset."""
SMOOTHING_RADII: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
"""The radii at which smoothing summaries report certified accuracy by default."""
DECIDE_RADII: tuple[float, ...] = SMOOTHING_RADII[:3]
"""The radii a sequential ``decide`` run decides by default."""

# ---------------------------------------------------------------------------------------------
# Certified-training objectives (``cure-lirpa train --method``) and their blocks.

NATURAL = "natural"
IBP_LINF, SABR_LINF, IBP_L2, L2_DEFENCE, MTL_IBP_LINF, MTL_IBP_L2 = (
    "ibp-linf",
    "sabr-linf",
    "ibp-l2",
    "l2-defence",
    "mtl-ibp-linf",
    "mtl-ibp-l2",
)
CURE_JOINT, CURE_MAX, CURE_RANDOM = "cure-joint", "cure-max", "cure-random"
OBJECTIVES: tuple[str, ...] = (
    NATURAL,
    IBP_LINF,
    SABR_LINF,
    IBP_L2,
    L2_DEFENCE,
    MTL_IBP_LINF,
    MTL_IBP_L2,
    CURE_JOINT,
    CURE_MAX,
    CURE_RANDOM,
)
"""Every certified-training objective, in the order the CLI and the docs list them."""
DEFAULT_OBJECTIVE = CURE_JOINT
MULTI_NORM_OBJECTIVES: tuple[str, ...] = (CURE_JOINT, CURE_MAX, CURE_RANDOM)
TRAINING_NORMS: tuple[str, ...] = (LINF, L2)
"""The norms of multi-norm training, in the order used everywhere (metrics, configs)."""
SABR, BALL, DEFENCE, MTL_IBP = "sabr", "ball", "defence", "mtl-ibp"
LINF_VARIANTS: tuple[str, ...] = (IBP, SABR, MTL_IBP)
"""The l∞ blocks: the whole box through IBP, SABR's small box, MTL-IBP's expressive loss."""
L2_VARIANTS: tuple[str, ...] = (BALL, DEFENCE, MTL_IBP)
"""The l2 blocks: the exact l2 ball through IBP, CURE's l2 defence box, MTL-IBP's expressive loss."""
SINGLE_NORM_OBJECTIVES: dict[str, tuple[str, str]] = {
    IBP_LINF: (LINF, IBP),
    SABR_LINF: (LINF, SABR),
    IBP_L2: (L2, BALL),
    L2_DEFENCE: (L2, DEFENCE),
    MTL_IBP_LINF: (LINF, MTL_IBP),
    MTL_IBP_L2: (L2, MTL_IBP),
}
"""Single-norm objectives: the norm they train and the block their name fixes."""
JOINT, MAX, RANDOM = "joint", "max", "random"
COMBINERS: tuple[str, ...] = (JOINT, MAX, RANDOM)
"""How multi-norm objectives combine the per-norm losses (L_Joint, L_Max, L_Random)."""
CURE_SCRATCH, CURE_FINETUNE, CURE_MTL = "cure-scratch", "cure-finetune", "cure-mtl"
PRESETS: tuple[str, ...] = (CURE_SCRATCH, CURE_FINETUNE, CURE_MTL)
"""The named training configurations of ``cure-lirpa train --preset``."""
DEFAULT_INIT = "default"
INITS: tuple[str, ...] = (DEFAULT_INIT, IBP)
"""Weight initialisations: the layers' own (``default``) or Shi et al.'s IBP initialisation."""

# ---------------------------------------------------------------------------------------------
# Randomized smoothing: noises, certification modes, training objectives.

GAUSSIAN, UNIFORM, NORMAL_UNIFORM = "gaussian", "uniform", "normal-uniform"
NOISES: tuple[str, ...] = (GAUSSIAN, UNIFORM, NORMAL_UNIFORM)
NU, NU_RS, CONSISTENCY = "nu", "nu-rs", "consistency"
NOISE_ALIASES: dict[str, tuple[str, ...]] = {
    GAUSSIAN: ("normal", "n"),
    UNIFORM: ("u",),
    NORMAL_UNIFORM: (NU,),
}
"""Other spellings :func:`cure_lirpa.smoothing.noise.make_noise` accepts for each noise."""
HYBRID = "hybrid"
SMOOTHING_MODES: tuple[str, ...] = (GAUSSIAN, UNIFORM, HYBRID)
"""How ``smooth certify`` certifies: with one noise, or with both and the better certificate."""
SMOOTHING_OBJECTIVES: tuple[str, ...] = (GAUSSIAN, UNIFORM, NU, NU_RS, CONSISTENCY)
"""Every smoothing training objective (``cure-lirpa smooth train --method``)."""
SMOOTHING_NORMS: tuple[str, ...] = (L2, L1)
"""The norms of smoothing certificates, in the order results list them."""

# ---------------------------------------------------------------------------------------------
# Result files and their columns.

SAMPLES_JSONL, SAMPLES_CSV = "samples.jsonl", "samples.csv"
SUMMARY_JSON, SUMMARY_MD = "summary.json", "summary.md"
CERTIFIED, MARGIN, DECIDED_BY, SKIPPED = "certified", "margin", "decided_by", "skipped"
PGD_ROBUST, UNION, BEST = "pgd_robust", "union", "best"
"""samples.csv columns ``{threat}/{method}/certified``, ``.../margin``, ``{threat}/auto/decided_by``,
``.../skipped``, ``{threat}/certified``, ``{threat}/pgd_robust``, ``union/certified``; summary.json
keys ``certified``, ``union`` (per method and ``best``)."""
CLEAN_ACCURACY, CERTIFIED_BEST, PGD_ACCURACY = "clean_accuracy", "certified_best", "pgd_accuracy"
"""summary.json keys: accuracies (fractions) without perturbation, by the best method, under PGD."""
