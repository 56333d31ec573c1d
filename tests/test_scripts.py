"""The benchmark and the demo in their quick modes, as a user runs them: exit code, files,
table rows and numbers in range (timings are never asserted)."""
import json
import math
import os
import subprocess
import sys

import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(name, *args):
    """With MXNet's default environment, as a user runs them (the scripts give SyncBatchNorm
    on CPU contexts of one process the resource settings it needs themselves)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith('MXNET_')}
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', name)] + list(args),
                            cwd=ROOT, capture_output=True, text=True, timeout=540, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bench_norm_quick(tmp_path):
    out = tmp_path / 'bench.json'
    stdout = run_script('bench_norm.py', '--quick', '--no-progress', '--json', str(out))
    records = json.loads(out.read_text())
    expected = {(n, 'local', d) for n in ('bn', 'pbn', 'syncbn') for d in (1, 2)}
    expected |= {(n, 'horovod', 2) for n in ('bn', 'pbn', 'syncbn')}
    assert {(r['norm'], r['backend'], r['devices']) for r in records} == expected
    blocks = 3      # the benchmark net's norm layers (its --blocks default)
    for r in records:
        assert r['status'] == 'ok', r
        assert math.isfinite(r['step_s']) and r['step_s'] > 0
        # counted by pbn_gluon.CountingComm over the timed steps. SyncBN: a forward and a
        # backward exchange per layer; PBN: one non-blocking exchange per step for all layers
        assert r['blocking_exchanges_per_step'] == {'bn': 0, 'pbn': 0, 'syncbn': 2 * blocks}[r['norm']]
        assert r['nonblocking_exchanges_per_step'] == (1 if r['norm'] == 'pbn' else 0)
        row = [line for line in stdout.splitlines()
               if line.split()[:3] == [r['norm'], r['backend'], str(r['devices'])]]
        assert len(row) == 1 and row[0].split()[-1] == 'ok'
        # interleaved: every norm timed in the same rounds, the ratio with its interval
        assert r['interleaved'] and len(r['step_s_rounds']) == r['steps'] == 5
        low, high = r['ratio_90']
        assert low <= r['ratio_to_bn'] <= high
        if r['norm'] == 'bn':
            assert r['ratio_to_bn'] == low == high == 1.0


def test_bench_ratio_interval_is_paired_by_round():
    """bench_norm's ratio is the median of per-round ratios (a slow round slows both norms
    and cancels), with a bootstrap interval around it."""
    sys.path.insert(0, os.path.join(ROOT, 'scripts'))
    from bench_norm import ratio_interval
    base = [1.0, 1.0, 5.0, 1.0, 1.0]          # round 3 ran on a loaded machine
    ratio, (low, high) = ratio_interval([[2.0, 2.0, 10.0, 2.0, 2.0]], [base])
    assert ratio == low == high == 2.0
    ratio, (low, high) = ratio_interval([[1.0, 3.0, 5.0, 2.0, 1.5]], [base])
    assert ratio == 1.5 and low < 1.5 < high


def test_bench_ratio_interval_spans_the_repeats():
    """Three repeats whose rounds agree within each repeat but not across them (another job,
    another memory placement): the interval covers the repeats' ratios, where a bootstrap of
    the pooled rounds would be about as narrow as one repeat."""
    sys.path.insert(0, os.path.join(ROOT, 'scripts'))
    from bench_norm import ratio_interval
    base = [[1.0] * 20] * 3
    rounds = [[0.64 + 0.001 * (i % 3) for i in range(20)],
              [0.70 + 0.001 * (i % 3) for i in range(20)],
              [0.77 + 0.001 * (i % 3) for i in range(20)]]
    ratio, (low, high) = ratio_interval(rounds, base)
    assert 0.70 <= ratio <= 0.71
    assert low <= 0.642 and high >= 0.77


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_demo_quick(tmp_path):
    stdout = run_script('demo.py', '--quick', '--out', str(tmp_path))
    records = json.loads((tmp_path / 'demo.json').read_text())
    norms = ('bn', 'syncbn', 'pbn', 'pbn+', 'gn')
    assert sorted((r['norm'], r['images_per_device']) for r in records) == sorted(
        (n, i) for n in norms for i in (1, 2))
    layers = 5      # norm layers of the demo's segmentation net
    for r in records:
        assert r['status'] == 'ok', r
        assert r['seed'] == 0 and r['contexts'] == 2
        assert 0.0 <= r['miou'] <= 1.0 and 0.0 <= r['pix_acc'] <= 1.0
        assert math.isfinite(r['step_s']) and r['step_s'] > 0
        assert math.isfinite(r['final_loss'])
        # counted by pbn_gluon.CountingComm around the run's communicator
        assert r['blocking_exchanges_per_step'] == (2 * layers if r['norm'] == 'syncbn' else 0)
        assert r['non_blocking_exchanges_per_step'] == (1 if r['norm'].startswith('pbn') else 0)
        assert r['curve'] and r['curve'][-1]['miou'] == r['miou']
        assert r['backend'] == 'local'      # every norm on CPU contexts of one process
        assert r['pbn_final_weight'] == (0.5 if r['norm'].startswith('pbn') else None)
        assert r['pbn_backward'] == {'pbn': 'local', 'pbn+': 'progressive'}.get(r['norm'])
        assert [p['train_s'] for p in r['curve']] == sorted(p['train_s'] for p in r['curve'])
    table = [cells for cells in map(str.split, stdout.splitlines())
             if len(cells) > 2 and cells[0] in norms and cells[1].isdigit()]
    assert sorted((row[0], row[1]) for row in table) == sorted(
        (n, str(i)) for n in norms for i in (1, 2))
    with Image.open(tmp_path / 'demo.png') as image:
        assert image.format == 'PNG' and image.size[0] > 200 and image.size[1] > 200


@pytest.mark.timeout(300)
def test_comm_model_counts_the_real_batchnorm_layers(tmp_path):
    """The model's layer list equals DeepLabV3-ResNet101's BatchNorm blocks after a real forward
    pass, and its SyncBN/PBN byte counts follow from those channels."""
    import mxnet as mx
    from gluoncv.model_zoo import DeepLabV3
    from mxnet.gluon import nn
    out = tmp_path / 'comm.json'
    run_script('comm_model.py', '--json', str(out))
    report = json.loads(out.read_text())
    net = DeepLabV3(19, backbone='resnet101', aux=True, pretrained_base=False, crop_size=64,
                    base_size=64)
    net.initialize()
    net(mx.nd.zeros((1, 3, 64, 64)))
    layers = []

    def visit(block):
        if isinstance(block, nn.BatchNorm):
            layers.append(block.gamma.shape[0])
        for child in block._children.values():
            visit(child)
    visit(net)
    assert sorted(report['bn_channels']) == sorted(layers)
    for row in report['rows']:
        assert row['syncbn_collectives'] == 2 * len(layers)
        assert row['syncbn_bytes'] == 4 * (4 * sum(layers) + len(layers))
        assert row['pbn_bytes'] == 4 * 3 * sum(layers)
        assert row['syncbn_added_s'] > 100 * row['pbn_exchange_s'] > 0
