"""One process of the call-order test: PBN (first layer, on this rank's slice of a fixed batch)
+ conv + dense, trained 4 steps by a Trainer that shares the job's engine, with ``sync.step()``
before or after ``trainer.step()`` (the backend's own Trainer), or pbn_gluon's Trainer
(``job.trainer``: the exchange inside its step). Each process draws its own initial weights (seed 3 + rank);
``job.broadcast`` must make them the root's before the first gradient.

    horovodrun -np 2 -H localhost:2 --gloo python tests/mp_order_worker.py --backend horovod ...
    python -m pbn_gluon.launch -n 2 -- python tests/mp_order_worker.py --backend kvstore ...

Horovod: DistributedTrainer and broadcast_parameters(net.collect_params()); KVStore dist_sync:
gluon.Trainer on the same kvstore with update_on_kvstore=False; pbn-trainer: the same with the
exchange mixed in (pbn_gluon.jobs.Job.trainer). Writes OUT/rank{r}.npz: the
conv weight drawn, every trainable parameter in the first forward, the layer's group sums
after the first step and every trainable parameter at the end."""
import argparse
import os

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon, nd

import pbn_gluon
from common import make_batch
from pbn_gluon.jobs import Job

parser = argparse.ArgumentParser()
parser.add_argument('--backend', choices=['horovod', 'kvstore'], required=True)
parser.add_argument('--order', choices=['trainer-first', 'sync-first', 'pbn-trainer'],
                    required=True)
parser.add_argument('--out', required=True)
args = parser.parse_args()

job = Job(args.backend)      # one CPU device per process
rank, size = job.rank_offset, job.size
net = gluon.nn.HybridSequential()
net.add(pbn_gluon.ProgressiveBatchNorm(in_channels=3, local_weight=0.25, global_momentum=0.8,
                                       backward='progressive'),
        gluon.nn.Conv2D(4, 3, in_channels=3), gluon.nn.Flatten(), gluon.nn.Dense(2))
mx.random.seed(3 + rank)    # each process its own weights (the Dense layer's: deferred)
net.initialize(mx.init.Xavier(), ctx=mx.cpu())
net.hybridize(static_alloc=True)
records = {'drawn': net[1].weight.data().asnumpy()}
job.broadcast(net.collect_params())
options = {'learning_rate': 0.1, 'momentum': 0.9}
if args.order == 'pbn-trainer':
    trainer, sync = job.trainer(net.collect_params(), options), None
elif args.backend == 'horovod':     # the explicit API: the backend's own Trainer + StatsSync
    import horovod.mxnet as hvd
    trainer = hvd.DistributedTrainer(net.collect_params(), 'sgd', options)
    sync = pbn_gluon.StatsSync(net, job.comm)
else:
    trainer = gluon.Trainer(net.collect_params(), 'sgd', options, kvstore=job.comm.kvstore,
                            update_on_kvstore=False)
    sync = pbn_gluon.StatsSync(net, job.comm)
for step in range(4):
    x, sizes = make_batch(step, size)
    start = sum(sizes[:rank])
    with autograd.record():
        loss = (net(nd.array(x[start:start + sizes[rank]])) ** 2).sum()
    if step == 0:   # the first forward: every weight is the root's, the deferred one too
        records.update(('start%d' % i, p.data().asnumpy()) for i, p in enumerate(
            v for v in net.collect_params().values() if v.grad_req != 'null'))
    loss.backward()
    if args.order == 'trainer-first':
        trainer.step(sum(sizes))
        sync.step()
    elif args.order == 'sync-first':
        sync.step()
        trainer.step(sum(sizes))
    else:
        trainer.step(sum(sizes))
    if step == 0:
        records['group_sums'] = net[0].global_sums.data().asnumpy()[:3]
    records['global%d' % step] = net[0].global_sums.data().asnumpy()
for i, p in enumerate(v for v in net.collect_params().values() if v.grad_req != 'null'):
    records['param%d' % i] = p.data().asnumpy()
os.makedirs(args.out, exist_ok=True)
np.savez(os.path.join(args.out, 'rank%d.npz' % rank), **records)
print('rank %d of %d done' % (rank, size))
