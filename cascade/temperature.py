"""Temperature scaling's fit (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017): one temperature
per stage, fitted on calibration logits, applied by `serve.confidence.log_probs` wherever confidences are computed."""
from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature that minimises the negative log-likelihood (Guo et al. 2017), in [0.05, 20]."""
    logits = np.asarray(logits, dtype=np.float64)
    rows = np.arange(len(labels))

    def nll(log_t: float) -> float:
        return float(-log_softmax(logits / np.exp(log_t), axis=-1)[rows, labels].mean())
    res = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(res.x))
