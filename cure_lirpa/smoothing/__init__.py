"""Randomized smoothing for several norms (Cohen et al. 2019; Nandi et al., the NU paper).

Independent of auto_LiRPA: it works with any ``nn.Module`` classifier on [0, 1] inputs.

- :mod:`.noise`: Gaussian, Uniform and Normal-Uniform noise, sampled on the model's device.
- :mod:`.certifier`: :class:`Smooth` (CERTIFY / PREDICT), the Clopper–Pearson bound.
- :mod:`.hybrid`: the NU paper's Table 1 rule combining a Gaussian and a Uniform certificate.
- :mod:`.sequential`: anytime-valid sequential certification (stop once the radii are decided).
- :mod:`.training`: noise augmentation, Normal-Uniform noise + similarity regulariser, consistency.
- :mod:`.analysis`: certified accuracy, ACR, curves, comparison at fixed clean accuracy.
- :mod:`.runner`: whole datasets into resumable, shardable run folders (``smooth certify``);
  :mod:`.results`: the TSV and summaries such a run writes.

The commands (``cure-lirpa smooth ...``) are in :mod:`cure_lirpa.cli.smooth`.
"""

from .certifier import (
    ABSTAIN,
    Certificate,
    Smooth,
    SmoothingWarning,
    check_sampling,
    clopper_pearson_lower,
    min_certify_n,
    min_predict_n,
    sample_seed,
)
from .hybrid import HybridCertificate, HybridSmooth, combine, split_alpha
from .noise import (
    GaussianNoise,
    Noise,
    NormalUniformNoise,
    UniformNoise,
    make_generator,
    make_noise,
)
from .results import read_tsv
from .runner import certify_dataset, merge_shards, predict_dataset
from .sequential import (
    SequentialCertificate,
    SequentialTest,
    certify_sequential,
    certify_sequential_hybrid,
    estimate_radius,
)

__all__ = [
    "ABSTAIN",
    "Certificate",
    "GaussianNoise",
    "HybridCertificate",
    "HybridSmooth",
    "Noise",
    "NormalUniformNoise",
    "Smooth",
    "SequentialCertificate",
    "SequentialTest",
    "SmoothingWarning",
    "UniformNoise",
    "certify_dataset",
    "certify_sequential",
    "certify_sequential_hybrid",
    "check_sampling",
    "clopper_pearson_lower",
    "combine",
    "estimate_radius",
    "make_generator",
    "make_noise",
    "min_certify_n",
    "merge_shards",
    "min_predict_n",
    "predict_dataset",
    "read_tsv",
    "sample_seed",
    "split_alpha",
]
