"""Independent numpy references: the PBN spec and BatchNorm, forward and analytic backward."""
import numpy as np


def channel_moments(x):
    """Per-channel count, mean and E[x^2] of an (N, C, ...) array, in float64."""
    axes = (0,) + tuple(range(2, x.ndim))
    x = x.astype(np.float64)
    n = x.size // x.shape[1]
    return n, x.mean(axis=axes), (x * x).mean(axis=axes)


def group_moments(xs):
    """Count-weighted global mean and E[x^2] over a list of per-device arrays."""
    stats = [channel_moments(x) for x in xs]
    total = sum(n for n, _, _ in stats)
    mean = sum(n * m for n, m, _ in stats) / total
    square = sum(n * q for n, _, q in stats) / total
    return mean, square


def normalize(x, mean, var, gamma, beta, eps, dy, w):
    """y = gamma (x - mean) / sqrt(var + eps) + beta, where mean and var are
    w * (this batch's moments) + constants; returns y, dx, dgamma, dbeta for the loss sum(dy*y).

    d mean / dx_i = w / n,  d var / dx_i = 2 w (x_i - mean) / n (the constants do not move)."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    axes = (0,) + tuple(range(2, x.ndim))
    x, dy = x.astype(np.float64), dy.astype(np.float64)
    n = x.size // x.shape[1]
    r = 1.0 / np.sqrt(var + eps)
    xc = x - mean.reshape(shape)
    y = gamma.reshape(shape) * xc * r.reshape(shape) + beta.reshape(shape)
    sum_dy = dy.sum(axis=axes)
    sum_dy_xc = (dy * xc).sum(axis=axes)
    g, rr = gamma.reshape(shape), r.reshape(shape)
    dx = g * rr * dy - g * rr * (w / n) * sum_dy.reshape(shape) \
        - g * rr ** 3 * (w / n) * xc * sum_dy_xc.reshape(shape)
    return y, dx, sum_dy_xc * r, sum_dy


def pbn_device(x, global_mean, global_square, w, gamma, beta, eps, dy):
    """The spec on one device: local moments mixed with the previous step's global ones."""
    _, m, q = channel_moments(x)
    mu = w * m + (1 - w) * global_mean
    var = np.maximum(w * q + (1 - w) * global_square - mu ** 2, 0)
    return normalize(x, mu, var, gamma, beta, eps, dy, w)


def batchnorm(x, gamma, beta, eps, dy):
    """Plain BatchNorm on one (concatenated) batch."""
    _, m, q = channel_moments(x)
    return normalize(x, m, q - m ** 2, gamma, beta, eps, dy, 1.0)


def pbn_from_group_sums(x, group, w, gamma, beta, eps, dy, axis=1):
    """The fused operator's contract on one device, from group sums G (3 or 5 rows, C columns)
    of an earlier step: returns y, dx, dgamma, dbeta in float64.

    No group data yet (G[2] == 0) means w = 1. With 5 rows the backward is progressive:
    dx = gamma r (dy - [w mean(dy) + (1-w) G3/G2] - xhat [w mean(dy xhat) + (1-w) G4/G2])."""
    x = np.moveaxis(x.astype(np.float64), axis, 1)
    dy = np.moveaxis(dy.astype(np.float64), axis, 1)
    group = np.asarray(group, dtype=np.float64)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    axes = (0,) + tuple(range(2, x.ndim))
    n, m, q = channel_moments(x)
    count = group[2]
    w = np.where(count > 0, w, 1.0)
    safe = np.maximum(count, 1.0)
    M, Q = group[0] / safe, group[1] / safe
    mu = w * m + (1 - w) * M
    var = np.maximum(w * q + (1 - w) * Q - mu ** 2, 0)
    r = 1.0 / np.sqrt(var + eps)
    xhat = (x - mu.reshape(shape)) * r.reshape(shape)
    y = gamma.reshape(shape) * xhat + beta.reshape(shape)
    dbeta = dy.sum(axis=axes)
    dgamma = (dy * xhat).sum(axis=axes)
    k1, k2 = w * dbeta / n, w * dgamma / n
    if group.shape[0] == 5:
        k1 = k1 + np.where(count > 0, (1 - w) * group[3] / safe, 0.0)
        k2 = k2 + np.where(count > 0, (1 - w) * group[4] / safe, 0.0)
    dx = (gamma * r).reshape(shape) * (dy - k1.reshape(shape) - xhat * k2.reshape(shape))
    return (np.moveaxis(y, 1, axis), np.moveaxis(dx, 1, axis), dgamma, dbeta)
