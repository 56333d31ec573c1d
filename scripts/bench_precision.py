"""Precision of the norms when |mean| >> std: relative error of y and dx against float64 numpy,
and of running_var after two steps, for nn.BatchNorm (one device, the yardstick), SyncBatchNorm
and ProgressiveBatchNorm (w = 0.3, step 1 with step 0's group moments) on several CPU contexts.

    python scripts/bench_precision.py --devices 2 --json results/precision.json
"""
import argparse
import json
import os
import sys

import mxnet as mx
import numpy as np
from mxnet import autograd, nd
from mxnet.gluon import nn

import pbn_gluon
from pbn_gluon.rendezvous import cpu_resource_advice, cpu_resource_env

CASES = [(1e2, 1.0), (1e3, 1.0), (1e4, 1.0), (1e2, 1e-2), (1e4, 1e-2)]
C, EPS, W = 8, 1e-5, 0.3


def batches(sizes, seed, mean, std):
    rng = np.random.RandomState(seed)
    xs = [(mean + std * rng.normal(size=(n, C, 6, 6))).astype(np.float32) for n in sizes]
    return xs, [rng.normal(size=x.shape).astype(np.float32) for x in xs]


def moments(x):
    """Per-channel mean and variance in float64, without cancellation."""
    x = np.moveaxis(x.astype(np.float64), 1, 0).reshape(C, -1)
    m = x.mean(axis=1)
    return m, ((x - m[:, None]) ** 2).mean(axis=1)


def normalize(x, mean, var, dy, w):
    """y and dx of y = (x - mean) / sqrt(var + eps) for the loss sum(dy y), where mean and var
    hold w times this batch's moments (float64)."""
    shape = (1, -1, 1, 1)
    x, dy = x.astype(np.float64), dy.astype(np.float64)
    n = x.size // C
    r = (1 / np.sqrt(var + EPS)).reshape(shape)
    xc = x - mean.reshape(shape)
    sum_dy = dy.sum(axis=(0, 2, 3)).reshape(shape)
    sum_dy_xc = (dy * xc).sum(axis=(0, 2, 3)).reshape(shape)
    return xc * r, r * dy - r * (w / n) * sum_dy - r ** 3 * (w / n) * xc * sum_dy_xc


def reference(norm, xs0, xs1, dys1):
    """Per device (y, dx) at step 1, and running_var after steps 0 and 1 (momentum 0.9)."""
    out = []
    for k, (x, dy) in enumerate(zip(xs1, dys1)):
        if norm == 'syncbn':
            y, dx = normalize(np.concatenate(xs1), *moments(np.concatenate(xs1)),
                              np.concatenate(dys1), 1.0)
            start = sum(len(a) for a in xs1[:k])
            out.append((y[start:start + len(x)], dx[start:start + len(x)]))
        else:
            (m, v), (M, V) = moments(x), moments(np.concatenate(xs0))
            mu = W * m + (1 - W) * M
            var = W * v + (1 - W) * V + W * (1 - W) * (m - M) ** 2
            out.append(normalize(x, mu, var, dy, W))
    running = np.ones(C)
    for xs in (xs0, xs1):
        running = 0.9 * running + 0.1 * moments(np.concatenate(xs))[1]
    return out, running


def rel(got, want):
    return float(np.abs(got - want).max() / np.abs(want).max())


def measure(norm, devices, mean, std):
    ctxs = [mx.cpu(i) for i in range(devices)]
    sizes = [2, 3, 1, 2][:devices] if norm != 'bn' else [sum([2, 3, 1, 2][:devices])]
    ctxs = ctxs if norm != 'bn' else ctxs[:1]
    layer = {'bn': lambda: nn.BatchNorm(in_channels=C),
             'syncbn': lambda: pbn_gluon.SyncBatchNorm(in_channels=C),
             'pbn': lambda: pbn_gluon.ProgressiveBatchNorm(variant='paper-minimal', in_channels=C, local_weight=W)}[norm]()
    layer.initialize(ctx=ctxs)
    layer.hybridize()
    sync = pbn_gluon.StatsSync(layer, pbn_gluon.LocalComm(ctxs)) if norm != 'bn' else None
    steps = [batches(sizes, seed, mean, std) for seed in (0, 1)]
    for xs, dys in steps:
        inputs = [nd.array(x, ctx=c) for x, c in zip(xs, ctxs)]
        for a in inputs:
            a.attach_grad()
        with autograd.record():
            ys = [layer(a) for a in inputs]
        autograd.backward(ys, head_grads=[nd.array(d, ctx=c) for d, c in zip(dys, ctxs)])
        if sync is not None:
            sync.step()
    want, running = reference('syncbn' if norm == 'bn' else norm, steps[0][0], steps[1][0],
                              steps[1][1])
    errors = {'y': max(rel(y.asnumpy(), w[0]) for y, w in zip(ys, want)),
              'dx': max(rel(a.grad.asnumpy(), w[1]) for a, w in zip(inputs, want)),
              'running_var': rel(layer.running_var.data(ctxs[0]).asnumpy(), running)}
    return errors


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--devices', type=int, default=2, help='CPU contexts for SyncBN / PBN')
    parser.add_argument('--json', help='write the results here')
    args = parser.parse_args()
    if cpu_resource_advice([mx.cpu(i) for i in range(args.devices)]):
        # in-process SyncBN needs MXNet's CPU resource copies, read at import: start again
        os.execve(sys.executable, [sys.executable] + sys.argv,
                  dict(os.environ, **cpu_resource_env(args.devices)))
    rows = []
    print('%-12s %-8s %-10s %-10s %-12s' % ('mean / std', 'norm', 'y', 'dx', 'running_var'))
    for mean, std in CASES:
        for norm in ('bn', 'syncbn', 'pbn'):
            e = measure(norm, args.devices, mean, std)
            rows.append(dict(mean=mean, std=std, norm=norm, devices=args.devices, **e))
            print('%-12s %-8s %-10.2e %-10.2e %-12.2e' % ('%g / %g' % (mean, std), norm, e['y'],
                                                         e['dx'], e['running_var']))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, 'w') as f:
            json.dump(rows, f, indent=1)
        print('wrote', args.json)


if __name__ == '__main__':
    main()
