"""One process of a multi-process test: a conv + norm net on this rank's slice of a fixed batch.

    horovodrun -np 2 -H localhost:2 --gloo python tests/mp_worker.py --backend horovod ...
    python -m pbn_gluon.launch -n 2 -- python tests/mp_worker.py --backend kvstore ...

With --trainer, pbn_gluon.Trainer picks the communicator itself (comm=None) and exchanges in
its step. Writes OUT/rank{r}.npz with, per step, the outputs and input gradients of this rank's slice,
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
parser.add_argument('--trainer', action='store_true',
                    help='pbn_gluon.Trainer with comm=None (lr 0) instead of StatsSync')
args = parser.parse_args()

net = make_net(args.norm, channels=args.channels, local_weight=args.local_weight)
net.initialize(ctx=mx.cpu())
records = {}
if args.trainer:    # the backend as a user sets it up; the Trainer picks the communicator
    if args.backend == 'horovod':
        import horovod.mxnet as hvd
        hvd.init()
        trainer = pbn_gluon.Trainer(net.collect_params(), 'sgd', {'learning_rate': 0.0})
    else:
        trainer = pbn_gluon.Trainer(net.collect_params(), 'sgd', {'learning_rate': 0.0},
                                    kvstore='dist_sync')
    sync, comm = None, trainer.stats.comm
    records['comm'] = np.array(type(comm).__name__)
else:
    comm = Job(args.backend).comm      # one CPU device per process
    sync = pbn_gluon.StatsSync(net, comm)
rank, size = comm.rank_offset, comm.size

for step in range(args.steps):
    x, sizes = make_batch(step, size)
    start = sum(sizes[:rank])
    xs = nd.array(x[start:start + sizes[rank]])
    xs.attach_grad()
    with autograd.record():
        y = net(xs)
        loss = (y * nd.array(np.linspace(-1, 1, y.size).reshape(y.shape))).sum()
    loss.backward()
    norm = net[1]
    records['y%d' % step] = y.asnumpy()
    records['dx%d' % step] = xs.grad.asnumpy()
    records['dgamma%d' % step] = norm.gamma.grad().asnumpy()   # before a Trainer sums them
    records['dbeta%d' % step] = norm.beta.grad().asnumpy()
    if sync is not None:
        sync.step()
    else:
        trainer.step(1)
    records['rm%d' % step] = norm.running_mean.data().asnumpy()
    records['rv%d' % step] = norm.running_var.data().asnumpy()
os.makedirs(args.out, exist_ok=True)
np.savez(os.path.join(args.out, 'rank%d.npz' % rank), **records)
print('rank %d of %d done' % (rank, size))
