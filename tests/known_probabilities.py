"""A base classifier with known class probabilities under noise, for the smoothing tests."""

import numpy as np
import torch
from scipy.stats import norm
from torch import nn

from cure_lirpa.smoothing import GaussianNoise


class KnownProbabilities(nn.Module):
    """Input (B, 1) = noise around x = 0; the class is the bucket of the first coordinate, with
    thresholds at the noise's quantiles, so P(class k) = probs[k] exactly."""

    def __init__(self, probs, noise):
        super().__init__()
        cdf = np.cumsum(probs)[:-1]
        if isinstance(noise, GaussianNoise):
            t = noise.sigma * norm.ppf(cdf)
        else:
            t = -noise.half_width + 2 * noise.half_width * cdf
        self.register_buffer("t", torch.tensor(t, dtype=torch.float32))
        self.k = len(probs)

    def forward(self, x):
        cls = torch.bucketize(x[:, 0].contiguous(), self.t)
        return nn.functional.one_hot(cls, self.k).float()
