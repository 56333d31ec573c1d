"""A small dist_sync worker for the launcher tests (python -m pbn_gluon.launch -- python this).

    --kvstore: rank r draws x_r = uniform(0, 1, 5) from mx.random.seed(100 + r), pushes it and
               pulls sum_r x_r (the allreduce); prints one JSON line: rank, its draw, the sum,
               and what the launcher forwarded (environment, interpreter, working directory).
    --sleep S: then sleeps S seconds (the fault tests' victim).
Other arguments (the tests' unique marker) are ignored. Prints "ready" once started.
"""
import argparse
import json
import os
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument('--kvstore', action='store_true')
parser.add_argument('--sleep', type=float, default=0)
args, _ = parser.parse_known_args()
record = {'host': os.environ.get('DMLC_NODE_HOST'), 'executable': sys.executable,
          'cwd': os.getcwd(),
          'env': {k: v for k, v in os.environ.items()
                  if k.startswith(('PBN_GLUON_TEST', 'MXNET_', 'OMP_', 'LAUNCH_TEST')) or
                  k in ('PYTHONPATH', 'PYTHONUNBUFFERED', 'PATH', 'VIRTUAL_ENV')}}
if args.kvstore:
    import mxnet as mx
    kv = mx.kv.create('dist_sync')
    mx.random.seed(100 + kv.rank)
    x = mx.nd.random.uniform(0, 1, shape=(5,))
    draw = x.asnumpy().tolist()     # before the push (which may reuse x's memory)
    kv.init(0, mx.nd.zeros(5))
    kv.push(0, x)
    total = mx.nd.zeros(5)
    kv.pull(0, out=total)
    record.update(rank=kv.rank, draw=draw, sum=total.asnumpy().tolist())
sys.stdout.write('ready %s\n' % json.dumps(record))     # one write: lines of 4 workers share a pipe
sys.stdout.flush()
time.sleep(args.sleep)
