"""Small nets and data shared by the tests and the multi-process worker."""
import os
import subprocess
import sys

import mxnet as mx
import numpy as np
from mxnet import gluon

import pbn_gluon


def make_net(norm, channels=4, local_weight=0.5, seed=7):
    """Conv(3->channels) + a norm layer with fixed, non-trivial gamma and beta."""
    net = gluon.nn.HybridSequential()
    affine = dict(in_channels=channels,
                  gamma_initializer=mx.init.Constant(mx.nd.array(np.linspace(0.5, 2.0, channels))),
                  beta_initializer=mx.init.Constant(mx.nd.array(np.linspace(-1.0, 1.0, channels))))
    layer = {'bn': lambda: gluon.nn.BatchNorm(**affine),
             'pbn': lambda: pbn_gluon.ProgressiveBatchNorm(
                 variant='paper-minimal', local_weight=local_weight, **affine),
             'syncbn': lambda: pbn_gluon.SyncBatchNorm(**affine)}[norm]()
    net.add(gluon.nn.Conv2D(channels, 3, padding=1, in_channels=3,
                            weight_initializer=mx.init.Constant(_conv_weight(channels, seed))),
            layer)
    return net


def _conv_weight(channels, seed):
    return mx.nd.array(np.random.RandomState(seed).normal(0, 0.3, (channels, 3, 3, 3)))


def make_batch(step, devices, uneven=True):
    """A fixed batch for `step` split over `devices`: returns (x, per-device sizes). With
    uneven, the last device gets one image more than the others (count weighting)."""
    sizes = [2] * devices
    if uneven:
        sizes[-1] += 1
    rng = np.random.RandomState(100 + step)
    x = rng.normal(1.0, 2.0, (sum(sizes), 3, 6, 5)).astype(np.float32)
    return x, sizes


def make_fake_cityscapes(root, size):
    """A small Cityscapes-format tree (4 train, 2 val images of `size` 'HxW') at `root`, written
    by scripts/make_fake_cityscapes.py as a user would run it."""
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          'scripts', 'make_fake_cityscapes.py')
    subprocess.run([sys.executable, script, '--out', str(root), '--num-train', '4',
                    '--num-val', '2', '--size', size], check=True, capture_output=True)
    return root
