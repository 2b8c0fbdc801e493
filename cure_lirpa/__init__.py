"""cure-lirpa: certified robustness against several perturbation types at once.

Deterministic certification and certified training on auto_LiRPA (l∞, l2, l1, patch and geometric
threats, union accuracy, the CURE methods) and randomized smoothing for several norms (the NU paper).
"""

__version__ = "0.1.0"
