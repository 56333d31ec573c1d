"""One process of a multi-process test: a conv + norm net on this rank's slice of a fixed batch.

    horovodrun -np 2 -H localhost:2 --gloo python tests/mp_worker.py --backend horovod ...
    python -m pbn_gluon.launch -n 2 -- python tests/mp_worker.py --backend kvstore ...

Writes OUT/rank{r}.npz with, per step, the outputs and input gradients of this rank's slice,
and the norm layer's gamma/beta gradients and running statistics."""
import argparse
import os

import mxnet as mx
import numpy as np
from mxnet import autograd, nd

import pbn_gluon
from common import make_batch, make_net
from pbn_gluon.jobs import Job

parser = argparse.ArgumentParser()
parser.add_argument('--backend', choices=['horovod', 'kvstore'], required=True)
parser.add_argument('--norm', choices=['pbn', 'syncbn'], required=True)
parser.add_argument('--out', required=True)
parser.add_argument('--steps', type=int, default=2)
parser.add_argument('--channels', type=int, default=4)
parser.add_argument('--local-weight', type=float, default=0.5)
args = parser.parse_args()

comm = Job(args.backend).comm      # one CPU device per process
rank, size = comm.rank_offset, comm.size

net = make_net(args.norm, channels=args.channels, local_weight=args.local_weight)
net.initialize(ctx=mx.cpu())
sync = pbn_gluon.StatsSync(net, comm)
records = {}
for step in range(args.steps):
    x, sizes = make_batch(step, size)
    start = sum(sizes[:rank])
    xs = nd.array(x[start:start + sizes[rank]])
    xs.attach_grad()
    with autograd.record():
        y = net(xs)
        loss = (y * nd.array(np.linspace(-1, 1, y.size).reshape(y.shape))).sum()
    loss.backward()
    sync.step()
    norm = net[1]
    records['y%d' % step] = y.asnumpy()
    records['dx%d' % step] = xs.grad.asnumpy()
    records['dgamma%d' % step] = norm.gamma.grad().asnumpy()
    records['dbeta%d' % step] = norm.beta.grad().asnumpy()
    records['rm%d' % step] = norm.running_mean.data().asnumpy()
    records['rv%d' % step] = norm.running_var.data().asnumpy()
os.makedirs(args.out, exist_ok=True)
np.savez(os.path.join(args.out, 'rank%d.npz' % rank), **records)
print('rank %d of %d done' % (rank, size))
