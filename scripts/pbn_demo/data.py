"""The demo's data, made here, no download: scikit-learn's 8x8 digits 0 and 1 composited into
32x32 scenes with per-image brightness and contrast, and per-pixel labels (0 background, 1 a
"0", 2 a "1"). Deterministic from the seed."""
import functools

import numpy as np

DIGITS = (0, 1)         # two distinct shapes: a 5-layer net learns them in 300 CPU steps
NUM_CLASSES = len(DIGITS) + 1
CANVAS = 32


def _zoom(img, scale):
    """Nearest-neighbour-free bilinear zoom of an 8x8 digit (scipy.ndimage.zoom, order 1)."""
    from scipy.ndimage import zoom
    return np.clip(zoom(img, scale, order=1), 0.0, 1.0)


def make_scenes(n, seed, digits_pool, canvas=CANVAS):
    """n scenes (n, 1, canvas, canvas) float32 and labels (n, canvas, canvas) float32."""
    images, targets = digits_pool
    rng = np.random.RandomState(seed)
    xs = np.zeros((n, 1, canvas, canvas), np.float32)
    ys = np.zeros((n, canvas, canvas), np.float32)
    for i in range(n):
        ink = np.zeros((canvas, canvas), np.float32)
        label = np.zeros((canvas, canvas), np.float32)
        occupied = np.zeros((canvas, canvas), bool)
        for _ in range(rng.randint(2, 4)):
            k = rng.randint(len(images))
            digit = _zoom(images[k] / 16.0, rng.choice([1.0, 1.5, 2.0]))
            h, w = digit.shape
            for _attempt in range(20):
                r, c = rng.randint(0, canvas - h + 1), rng.randint(0, canvas - w + 1)
                if not occupied[r:r + h, c:c + w].any():
                    break
            else:
                continue
            occupied[r:r + h, c:c + w] = True
            ink[r:r + h, c:c + w] = digit
            label[r:r + h, c:c + w] = np.where(digit > 0.25, targets[k] + 1, 0)
        # per-image contrast and brightness, plus background and pixel noise
        gain = np.exp(rng.uniform(np.log(0.4), np.log(2.5)))
        offset = rng.uniform(-2.0, 2.0)
        noise_level = rng.uniform(0.05, 0.3)
        background = rng.normal(0, 0.15, (canvas // 4, canvas // 4)).repeat(4, 0).repeat(4, 1)
        xs[i, 0] = gain * (ink + background + rng.normal(0, noise_level, ink.shape)) + offset
        ys[i] = label
    return xs, ys


@functools.lru_cache(maxsize=2)
def load_data(n_train, n_val, seed):
    from sklearn.datasets import load_digits
    digits = load_digits()
    keep = np.isin(digits.target, DIGITS)
    images, targets = digits.images[keep], np.searchsorted(DIGITS, digits.target[keep])
    rng = np.random.RandomState(seed)
    order = rng.permutation(len(images))
    cut = int(0.7 * len(order))        # train scenes and val scenes use disjoint digit images
    pool = lambda idx: (images[idx].astype(np.float32), targets[idx])
    train = make_scenes(n_train, seed + 1, pool(order[:cut]))
    val = make_scenes(n_val, seed + 2, pool(order[cut:]))
    return train, val
