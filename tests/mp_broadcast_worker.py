"""One process of test_multiprocess.test_broadcast_gives_deferred_parameters_the_roots_values:
six Dense layers of one shape (deferred weights), drawn from another seed in every process and
broadcast by Job.broadcast; saves what this process drew and what it holds after the first
forward."""
import argparse
import os
import types

import mxnet as mx
import numpy as np

from pbn_gluon.jobs import Job


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--backend', required=True)
    parser.add_argument('--out', required=True)
    args = parser.parse_args()
    job = Job(args.backend)
    mx.random.seed(3 + job.rank_offset)
    net = mx.gluon.nn.HybridSequential()
    for _ in range(6):
        net.add(mx.gluon.nn.Dense(16, bias_initializer='uniform'))
    net.initialize(mx.init.Uniform(1.0), ctx=job.contexts)
    drawn = {}
    for name, param in net.collect_params().items():
        if not param._deferred_init:    # the biases
            drawn[name] = param.data().asnumpy()
            continue

        def record(self, *args, _init=param._init_impl, _name=name, **kwargs):
            _init(*args, **kwargs)
            drawn[_name] = self.data().asnumpy()
        param._init_impl = types.MethodType(record, param)
    job.broadcast(net.collect_params())
    net(mx.nd.ones((2, 16), ctx=job.contexts[0]))
    held = {name: p.data().asnumpy() for name, p in net.collect_params().items()}
    os.makedirs(args.out, exist_ok=True)
    np.savez(os.path.join(args.out, 'rank%d.npz' % job.rank_offset),
             **{'drawn.' + k: v for k, v in drawn.items()},
             **{'held.' + k: v for k, v in held.items()})
    job.shutdown()


if __name__ == '__main__':
    main()
