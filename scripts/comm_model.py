"""Communication model of the paper's setting: DeepLabV3-ResNet101, 8 GPUs, NCCL ring allreduce.

Bytes and collectives per training step for SyncBN and PBN, from the real BatchNorm layer list
of GluonCV's DeepLabV3-ResNet101 (channel counts by symbolic shape inference, no weights, no
forward pass), and the latency they add under a ring-allreduce cost model:

    T(bytes) = 2 (p - 1) alpha + 2 (p - 1) / p * bytes / bandwidth

- SyncBN, per BN layer: a forward allreduce of [sum x, sum x^2] and the count (2C + 1 floats)
  and a backward allreduce of [sum dy, sum dy x_hat] (2C floats), each blocking the layer:
  the step pays the sum of all 2L collective times.
- PBN: ONE allreduce of [n m, n E[x^2], n] for every channel of every layer (3 sum(C) floats,
  pbn_gluon's payload), issued after backward and overlapped with the gradients' allreduce.

Link figures are ASSUMED (typical published NCCL figures, stated in the table); with
``--measure`` the script also MEASURES, on this machine, a Gloo allreduce of the same payloads
between 2 Horovod processes (horovodrun --gloo), the only interconnect we have.

    python scripts/comm_model.py --json results/comm_model.json [--measure]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

from pbn_gluon import jobs

LINKS = {   # name: (alpha per ring step [s], bus bandwidth [bytes/s]); assumed, not measured
    'NVLink (DGX-1 V100), assumed 5 us, 100 GB/s': (5e-6, 100e9),
    'PCIe 3.0 x16, assumed 10 us, 10 GB/s': (10e-6, 10e9),
}


def bn_channels(backbone='resnet101', crop=768):
    """Channel count of every BatchNorm layer of GluonCV DeepLabV3 (with its aux head)."""
    import mxnet as mx
    from gluoncv.model_zoo import DeepLabV3
    net = DeepLabV3(19, backbone=backbone, aux=True, pretrained_base=False, crop_size=crop,
                    base_size=crop)
    outputs = net(mx.sym.var('data'))
    sym = mx.sym.Group(list(outputs)) if isinstance(outputs, (list, tuple)) else outputs
    arg_shapes, _, _ = sym.infer_shape(data=(1, 3, crop, crop))
    shapes = dict(zip(sym.list_arguments(), arg_shapes))
    gammas = [name for name in sym.list_arguments() if name.endswith('_gamma')]
    params = sum(int(_prod(shapes[n])) for n in sym.list_arguments() if n != 'data')
    return [shapes[name][0] for name in gammas], params


def _prod(shape):
    out = 1
    for s in shape:
        out *= s
    return out


def ring_time(nbytes, p, alpha, bandwidth):
    return 2 * (p - 1) * alpha + 2 * (p - 1) / p * nbytes / bandwidth


def model(channels, params, p):
    syncbn = [4 * (2 * c + 1) for c in channels] + [4 * 2 * c for c in channels]
    pbn = [4 * 3 * sum(channels)]
    rows = []
    for link, (alpha, bandwidth) in LINKS.items():
        grad = ring_time(4 * params, p, alpha, bandwidth)
        rows.append({
            'link': link, 'devices': p, 'bn_layers': len(channels),
            'syncbn_collectives': len(syncbn), 'syncbn_bytes': sum(syncbn),
            'syncbn_added_s': sum(ring_time(b, p, alpha, bandwidth) for b in syncbn),
            'pbn_collectives': 1, 'pbn_bytes': pbn[0],
            'pbn_exchange_s': ring_time(pbn[0], p, alpha, bandwidth),
            'pbn_added_s': 0.0,     # overlapped with the gradient allreduce below
            'gradient_allreduce_s': grad, 'gradient_bytes': 4 * params, 'source': 'assumed'})
    return rows


MEASURE = r'''
import json, sys, time
import mxnet as mx, numpy as np, horovod.mxnet as hvd
hvd.init()
sizes = json.loads(sys.argv[1])
out = {}
for name, floats in sizes.items():
    x = mx.nd.ones(floats)
    for _ in range(5):
        hvd.allreduce_(x, name=name); x.wait_to_read()
    times = []
    for _ in range(50):
        tic = time.perf_counter(); hvd.allreduce_(x, name=name); x.wait_to_read()
        times.append(time.perf_counter() - tic)
    out[name] = float(np.median(times))
if hvd.rank() == 0:
    json.dump(out, open(sys.argv[2], 'w'))
'''


def measure(channels):
    """Median Gloo allreduce time between 2 local Horovod processes, for the payloads."""
    median_c = sorted(channels)[len(channels) // 2]
    sizes = {'syncbn_median_layer_fwd': 2 * median_c + 1, 'pbn_fused': 3 * sum(channels)}
    with tempfile.TemporaryDirectory() as tmp:
        script, result = os.path.join(tmp, 'measure.py'), os.path.join(tmp, 'out.json')
        with open(script, 'w') as f:
            f.write(MEASURE)
        subprocess.run(jobs.horovodrun(2, [sys.executable, script, json.dumps(sizes), result]),
                       check=True, capture_output=True, timeout=300)
        with open(result) as f:
            times = json.load(f)
    layer = times['syncbn_median_layer_fwd']
    return {'link': 'Gloo, 2 CPU processes on this machine (measured)', 'devices': 2,
            'bn_layers': len(channels), 'syncbn_collectives': 2 * len(channels),
            'syncbn_added_s': 2 * len(channels) * layer, 'syncbn_layer_allreduce_s': layer,
            'pbn_collectives': 1, 'pbn_exchange_s': times['pbn_fused'],
            'pbn_added_s': times['pbn_fused'], 'source': 'measured (median of 50)'}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--backbone', default='resnet101')
    parser.add_argument('--crop', type=int, default=768)
    parser.add_argument('--devices', type=int, default=8)
    parser.add_argument('--measure', action='store_true',
                        help='also time Gloo allreduces of the payloads (2 Horovod processes)')
    parser.add_argument('--json', default=None, help='write the rows to this file')
    args = parser.parse_args()

    channels, params = bn_channels(args.backbone, args.crop)
    rows = model(channels, params, args.devices)
    if args.measure:
        rows.append(measure(channels))
    print('DeepLabV3-%s: %d BatchNorm layers, %d channels in all, %.1f M parameters'
          % (args.backbone, len(channels), sum(channels), params / 1e6))
    head = '%-50s %4s %14s %14s %14s %14s %14s' % (
        'link', 'dev', 'SyncBN coll.', 'SyncBN bytes', 'SyncBN +ms', 'PBN bytes', 'PBN exch. ms')
    print(head)
    print('-' * len(head))
    for r in rows:
        print('%-50s %4d %14d %14s %14.2f %14s %14.3f' % (
            r['link'], r['devices'], r['syncbn_collectives'],
            '%d' % r['syncbn_bytes'] if 'syncbn_bytes' in r else '-',
            1e3 * r['syncbn_added_s'], '%d' % r['pbn_bytes'] if 'pbn_bytes' in r else '-',
            1e3 * r['pbn_exchange_s']))
    grad = [r for r in rows if 'gradient_allreduce_s' in r]
    for r in grad:
        print('  %s: the gradient allreduce (%.0f MB) takes %.1f ms; PBN\'s exchange rides '
              'along with it' % (r['link'], r['gradient_bytes'] / 1e6, 1e3 * r['gradient_allreduce_s']))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, 'w') as f:
            json.dump({'backbone': args.backbone, 'bn_channels': channels, 'parameters': params,
                       'rows': rows}, f, indent=1)
        print('wrote %s' % args.json)


if __name__ == '__main__':
    main()
