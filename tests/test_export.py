"""pbn_gluon.export: a PBN-trained GluonCV model written as a plain BatchNorm graph, checked
against the PBN model's own inference in a process that never imports pbn_gluon; and
convert_norm back to BatchNorm."""
import json
import os
import subprocess
import sys

import mxnet as mx
import numpy as np
import pytest
from gluoncv.model_zoo import get_model
from mxnet import autograd, gluon, nd
from mxnet.gluon import nn

import pbn_gluon

CTXS = [mx.cpu(0), mx.cpu(1)]
SHAPE = (2, 3, 32, 32)
STATE_NAMES = ('batch_sums', 'global_sums', 'local_weight', 'flag_stats')   # exchange state


def blocks(net):
    yield net
    for child in net._children.values():
        yield from blocks(child)


def train_pbn_resnet18(steps=2, stem_means=None):
    """The README's training loop: GluonCV resnet18_v1b with PBN, 2 CPU contexts, StatsSync.
    `stem_means` (a list) gets each step's per-channel mean of the stem convolution's output
    over both devices, computed before the step: what the stem norm layer's running mean
    follows."""
    mx.random.seed(3)
    net = get_model('resnet18_v1b', classes=10, norm_layer=pbn_gluon.ProgressiveBatchNorm,
                    norm_kwargs={'local_weight': 0.5})
    net.initialize(mx.init.Xavier(), ctx=CTXS)
    net.hybridize(static_alloc=True)
    sync = pbn_gluon.StatsSync(net, pbn_gluon.LocalComm(CTXS))
    trainer = gluon.Trainer(net.collect_params(), 'sgd', {'learning_rate': 0.01})
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    rng = np.random.RandomState(0)
    for _ in range(steps):
        xs = [nd.array(rng.normal(size=SHAPE), ctx=c) for c in CTXS]
        ys = [nd.array([1, 2], ctx=c) for c in CTXS]
        if stem_means is not None:
            stem = np.concatenate([net.conv1(x).asnumpy() for x in xs]).astype(np.float64)
            stem_means.append(stem.mean(axis=(0, 2, 3)))
        with autograd.record():
            losses = [loss_fn(net(x), y) for x, y in zip(xs, ys)]
        autograd.backward(losses)
        sync.step()
        trainer.step(SHAPE[0] * len(CTXS))
    return net


@pytest.fixture(scope='module')
def trained():
    """(net, an input, its inference output, the stem convolution's mean of every step)."""
    stem_means = []
    net = train_pbn_resnet18(stem_means=stem_means)
    x = nd.array(np.random.RandomState(1).normal(size=SHAPE))
    return net, x, net(x).asnumpy(), stem_means


@pytest.fixture(scope='module')
def exported(trained, tmp_path_factory):
    net, x, _, _ = trained
    path = str(tmp_path_factory.mktemp('export') / 'r18')
    files = pbn_gluon.export(net, path, x)
    return path, files


IMPORT_SCRIPT = r'''
import sys
import mxnet as mx, numpy as np
sym_file, params_file, x_file, out_file = sys.argv[1:]
net = mx.gluon.SymbolBlock.imports(sym_file, ['data'], params_file)
out = net(mx.nd.array(np.load(x_file))).asnumpy()
assert 'pbn_gluon' not in sys.modules, 'pbn_gluon was imported'
np.save(out_file, out)
'''


def run_without_pbn_gluon(sym_file, params_file, x, tmp_path):
    """The exported graph's output on `x`, computed by SymbolBlock.imports in a fresh process
    that never imports pbn_gluon."""
    np.save(tmp_path / 'x.npy', x.asnumpy())
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    env['PYTHONNOUSERSITE'] = '1'
    proc = subprocess.run([sys.executable, '-c', IMPORT_SCRIPT, sym_file, params_file,
                           str(tmp_path / 'x.npy'), str(tmp_path / 'out.npy')],
                          env=env, cwd=str(tmp_path), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return np.load(tmp_path / 'out.npy')


def test_export_loads_without_pbn_gluon_and_equals_pbn_inference(trained, exported, tmp_path):
    net, x, reference, _ = trained
    _, (sym_file, params_file) = exported
    # the PBN model's inference is BatchNorm's: GluonCV's nn.BatchNorm model on its parameters
    net.save_parameters(str(tmp_path / 'pbn.params'))
    bn_net = get_model('resnet18_v1b', classes=10)
    bn_net.load_parameters(str(tmp_path / 'pbn.params'))
    np.testing.assert_allclose(reference, bn_net(x).asnumpy(), rtol=1e-5, atol=1e-5)
    out = run_without_pbn_gluon(sym_file, params_file, x, tmp_path)
    np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5)
    # the user's net is unchanged: still PBN, same output
    assert sum(isinstance(b, pbn_gluon.ProgressiveBatchNorm) for b in blocks(net)) == 20
    np.testing.assert_array_equal(net(x).asnumpy(), reference)


def test_exported_graph_is_plain_batchnorm_with_running_stats_as_aux(exported):
    path, (sym_file, params_file) = exported
    with open(sym_file) as f:
        graph = json.load(f)
    ops = [n['op'] for n in graph['nodes']]
    assert not [op for op in ops if op.startswith('pbn_') or op.startswith('_pbn')]
    assert 'Dropout' not in ops and 'ones_like' not in ops
    assert ops.count('BatchNorm') == 20
    sym = mx.sym.load(sym_file)
    aux = set(sym.list_auxiliary_states())
    for node in graph['nodes']:
        if node['op'] == 'BatchNorm':
            inputs = [graph['nodes'][i[0]]['name'] for i in node['inputs']]
            assert inputs[3].endswith('running_mean') and inputs[4].endswith('running_var')
            assert inputs[3] in aux and inputs[4] in aux
    assert len(aux) == 40
    saved = nd.load(params_file)
    assert {k[4:] for k in saved if k.startswith('aux:')} == aux
    assert not [k for k in saved if k.endswith(STATE_NAMES)]
    assert set(k[4:] for k in saved) == set(sym.list_inputs()) - {'data'}


def test_running_stats_exported_are_the_pbn_layers(trained, exported):
    net, _, _, stem_means = trained
    _, (_, params_file) = exported
    saved = nd.load(params_file)
    for layer in (net.bn1, net.layer1[0].bn1):
        for name in ('running_mean', 'running_var', 'gamma', 'beta'):
            param = getattr(layer, name)
            kind = 'aux' if name.startswith('running') else 'arg'
            np.testing.assert_allclose(saved['%s:%s' % (kind, param.name)].asnumpy(),
                                       param.data(CTXS[0]).asnumpy(), rtol=1e-6, atol=1e-7)
    # really trained: the stem's running mean is BatchNorm's momentum-0.9 average, from 0, of
    # the global means, which pbn+ averages over steps (global_momentum 0.8; the first one as is)
    m0, m1 = stem_means
    want = 0.1 * (0.9 * m0 + (0.8 * m0 + 0.2 * m1))
    np.testing.assert_allclose(saved['aux:' + net.bn1.running_mean.name].asnumpy(), want,
                               rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_onnx_export_of_the_exported_model(trained, exported, tmp_path):
    onnx = pytest.importorskip('onnx')
    from onnx.reference import ReferenceEvaluator
    _, x, reference, _ = trained
    _, (sym_file, params_file) = exported
    onnx_file = mx.onnx.export_model(sym_file, params_file, [SHAPE], [np.float32],
                                     str(tmp_path / 'r18.onnx'))
    model = onnx.load(onnx_file)
    onnx.checker.check_model(model)
    ops = {n.op_type for n in model.graph.node}
    assert 'BatchNormalization' in ops and not [op for op in ops if 'pbn' in op.lower()]
    out = ReferenceEvaluator(model).run(None, {'data': x.asnumpy()})[0]
    np.testing.assert_allclose(out, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())


def test_convert_norm_round_trip_keeps_values(trained):
    net, x, reference, _ = trained
    # a fresh copy of the trained weights (convert_norm changes the net in place)
    copy = get_model('resnet18_v1b', classes=10, norm_layer=pbn_gluon.ProgressiveBatchNorm)
    copy.initialize(ctx=CTXS)
    copy(nd.zeros(SHAPE, ctx=CTXS[0]))
    for name, param in copy._collect_params_with_prefix().items():
        source = net._collect_params_with_prefix()[name]
        for src, dst in zip(source.list_data(), param.list_data()):
            src.copyto(dst)
    names = sorted(copy.collect_params().keys())
    values = {n: [a.asnumpy() for a in p.list_data()]
              for n, p in copy.collect_params().items() if not n.endswith(STATE_NAMES)}

    pbn_gluon.convert_norm(copy, nn.BatchNorm)
    assert not any(isinstance(b, pbn_gluon.ProgressiveBatchNorm) for b in blocks(copy))
    assert sum(type(b) is nn.BatchNorm for b in blocks(copy)) == 20
    bn_params = copy.collect_params()
    assert sorted(bn_params.keys()) == sorted(values)
    for n, arrays in values.items():
        for a, b in zip(arrays, bn_params[n].list_data()):
            np.testing.assert_array_equal(a, b.asnumpy())
    np.testing.assert_allclose(copy(x).asnumpy(), reference, rtol=1e-5, atol=1e-5)

    pbn_gluon.convert_norm(copy, pbn_gluon.ProgressiveBatchNorm, local_weight=0.5)
    assert sum(isinstance(b, pbn_gluon.ProgressiveBatchNorm) for b in blocks(copy)) == 20
    back = copy.collect_params()
    for n, arrays in values.items():
        for a, b in zip(arrays, back[n].list_data()):
            np.testing.assert_array_equal(a, b.asnumpy())
    np.testing.assert_allclose(copy(x).asnumpy(), reference, rtol=1e-5, atol=1e-5)
    assert set(back.keys()) >= set(values)
    assert sorted(back.keys()) == names


def test_convert_norm_replaces_a_shared_layer_once():
    """A norm layer held by two blocks (GluonCV does this) becomes ONE new layer: no
    'different Parameters with the same name'."""
    shared = nn.BatchNorm(in_channels=4)
    net = nn.HybridSequential()
    inner = nn.HybridSequential()
    inner.add(shared)
    net.add(nn.Conv2D(4, 3, in_channels=3), inner)
    net.register_child(shared, 'again')
    net.initialize(ctx=CTXS)
    pbn_gluon.convert_norm(net, pbn_gluon.ProgressiveBatchNorm)
    assert net._children['again'] is inner._children['0']
    assert isinstance(inner._children['0'], pbn_gluon.ProgressiveBatchNorm)
    net.collect_params()            # raises on two Parameters of one name


def test_gluoncv_export_block_after_convert_norm_to_batchnorm(trained, tmp_path):
    """The README's alternative for export_block: the PBN checkpoint loaded into the BatchNorm
    model (or convert_norm(net, nn.BatchNorm)), then GluonCV's export_block."""
    from gluoncv.utils import export_block
    net, x, reference, _ = trained
    net.save_parameters(str(tmp_path / 'pbn.params'))
    bn_net = get_model('resnet18_v1b', classes=10)
    bn_net.load_parameters(str(tmp_path / 'pbn.params'))
    export_block(str(tmp_path / 'bn'), bn_net, data_shape=SHAPE[1:], preprocess=False,
                 layout='CHW')
    with open(tmp_path / 'bn-symbol.json') as f:
        ops = [n['op'] for n in json.load(f)['nodes']]
    assert 'BatchNorm' in ops and not [op for op in ops if op.startswith('pbn_')]
    loaded = gluon.SymbolBlock.imports(str(tmp_path / 'bn-symbol.json'), ['data'],
                                       str(tmp_path / 'bn-0000.params'))
    np.testing.assert_allclose(loaded(x).asnumpy(), reference, rtol=1e-5, atol=1e-5)


def test_readme_deploy_example_runs(tmp_path):
    """The README's deploy block, run after its training example in a fresh process."""
    import re
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, 'README.md')) as f:
        text = f.read()
    train = re.findall(r'```python\n(# README example.*?)```', text, re.S)
    deploy = re.findall(r'```python\n(# README deploy example.*?)```', text, re.S)
    assert len(train) == 1 and len(deploy) == 1
    script = tmp_path / 'deploy.py'
    script.write_text(train[0] + '\n' + deploy[0])
    env = {k: v for k, v in os.environ.items() if not k.startswith('MXNET_')}
    env['PYTHONPATH'] = root + os.pathsep + env.get('PYTHONPATH', '')
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            timeout=400, env=env, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert '(1, 10)' in result.stdout
    # outputs of ~1e12 agree to float32 rounding at that scale: no false alarm
    assert 'differs' not in result.stderr, result.stderr[-3000:]
    # both graphs hold resnet18_v1b's 20 norm layers as plain BatchNorm
    with open(tmp_path / 'model-symbol.json') as f:
        assert [n['op'] for n in json.load(f)['nodes']].count('BatchNorm') == 20
    onnx = pytest.importorskip('onnx')
    nodes = onnx.load(str(tmp_path / 'model.onnx')).graph.node
    assert [n.op_type for n in nodes].count('BatchNormalization') == 20


def test_export_check_is_relative_to_the_output_scale():
    """The README deploy example's outputs reach 4.06e12 and differ from the exported graph's
    by up to 1048576 (measured): float32 rounding at that scale, also on entries near 0, so no
    warning; a difference that is large for the scale still warns."""
    from pbn_gluon.export import output_mismatch
    want = np.array([[4.06e12, -3.1e11, 1.0]], dtype=np.float32)
    rounded = want + np.array([[0, 65536, 1048576]], dtype=np.float32)
    assert output_mismatch(rounded, want, 1e-5, 1e-5) is None
    wrong = want + np.array([[0, 0, 1e8]], dtype=np.float32)
    assert 'max |diff| 1e+08' in output_mismatch(wrong, want, 1e-5, 1e-5)
    assert 'shape' in output_mismatch(want[:, :2], want, 1e-5, 1e-5)


class TwoHeads(nn.HybridBlock):
    """Two outputs, PBN layers with BatchNorm's other settings (scale=False, center=False,
    use_global_stats, epsilon), and one layer used twice."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.conv = nn.Conv2D(4, 3, padding=1, in_channels=3)
            self.bn_a = pbn_gluon.ProgressiveBatchNorm(scale=False, epsilon=1e-3, in_channels=4)
            self.bn_b = pbn_gluon.ProgressiveBatchNorm(center=False, in_channels=4)
            self.bn_c = pbn_gluon.ProgressiveBatchNorm(use_global_stats=True, in_channels=4)

    def hybrid_forward(self, F, x):
        y = self.conv(x)
        return self.bn_a(y), self.bn_c(self.bn_b(F.relu(self.bn_b(y))))


def test_export_of_tuple_outputs_and_other_batchnorm_settings(tmp_path):
    net = TwoHeads()
    net.initialize(mx.init.Xavier(), ctx=CTXS)
    rng = np.random.RandomState(5)
    for name, param in net.collect_params().items():
        if name.endswith(('gamma', 'beta', 'running_mean')):
            param.set_data(nd.array(rng.uniform(-1, 1, 4)))
        elif name.endswith('running_var'):
            param.set_data(nd.array(rng.uniform(0.5, 2, 4)))
    net.hybridize()
    x = nd.array(rng.normal(size=(2, 3, 5, 6)))
    reference = [o.asnumpy() for o in net(x)]
    sym_file, params_file = pbn_gluon.export(net, str(tmp_path / 'two'), x.shape)
    loaded = gluon.SymbolBlock.imports(sym_file, ['data'], params_file)
    got = [o.asnumpy() for o in loaded(x)]
    assert len(got) == 2
    for a, b in zip(got, reference):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    with open(sym_file) as f:
        ops = [n['op'] for n in json.load(f)['nodes']]
    assert ops.count('BatchNorm') == 4 and not [o for o in ops if o.startswith('pbn_')]
    assert type(net.bn_a) is pbn_gluon.ProgressiveBatchNorm    # put back
    assert net._children['bn_b'] is net.bn_b


def test_syncbn_trained_model_exports_to_plain_batchnorm(tmp_path):
    """SyncBatchNorm (in-process exchange on 2 CPU contexts) trained 2 steps, exported: plain
    BatchNorm nodes with its running statistics as auxiliary states, and the graph, loaded where
    pbn_gluon was never imported, equals the SyncBN net's inference."""
    mx.random.seed(5)
    net = nn.HybridSequential()
    net.add(nn.Conv2D(8, 3, padding=1), pbn_gluon.SyncBatchNorm(), nn.Activation('relu'),
            nn.Conv2D(8, 3, strides=2), pbn_gluon.SyncBatchNorm(momentum=0.5),
            nn.GlobalAvgPool2D(), nn.Dense(4))
    net.initialize(mx.init.Xavier(), ctx=CTXS)
    net.hybridize(static_alloc=True)
    sync = pbn_gluon.StatsSync(net, pbn_gluon.LocalComm(CTXS))
    trainer = gluon.Trainer(net.collect_params(), 'sgd', {'learning_rate': 0.05})
    rng = np.random.RandomState(2)
    conv_moments = []       # per step: the first SyncBN's input, mean and variance over devices
    for _ in range(2):
        xs = [nd.array(rng.normal(3.0, 2.0, size=(2, 3, 9, 9)), ctx=c) for c in CTXS]
        conv = np.concatenate([net[0](x).asnumpy() for x in xs]).astype(np.float64)
        conv_moments.append((conv.mean(axis=(0, 2, 3)), conv.var(axis=(0, 2, 3))))
        with autograd.record():
            losses = [net(x).square().mean() for x in xs]
        autograd.backward(losses)
        sync.step()
        trainer.step(4)
    x = nd.array(rng.normal(3.0, 2.0, size=(3, 3, 9, 9)))
    reference = net(x).asnumpy()
    path = str(tmp_path / 'syncbn')
    sym_file, params_file = pbn_gluon.export(net, path, x)

    with open(sym_file) as f:
        ops = [n['op'] for n in json.load(f)['nodes']]
    assert ops.count('BatchNorm') == 2 and not [op for op in ops if 'pbn' in op.lower()]
    saved = nd.load(params_file)
    layers = [b for b in blocks(net) if isinstance(b, pbn_gluon.SyncBatchNorm)]
    # the first layer's running statistics: BatchNorm's momentum-0.9 update, from 0 and 1, by
    # the moments of both devices' batches (the exchange moved them)
    (m0, v0), (m1, v1) = conv_moments
    np.testing.assert_allclose(layers[0].running_mean.data(CTXS[0]).asnumpy(),
                               0.1 * (0.9 * m0 + m1), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(layers[0].running_var.data(CTXS[0]).asnumpy(),
                               0.9 * (0.9 + 0.1 * v0) + 0.1 * v1, rtol=1e-4, atol=1e-6)
    for layer in layers:
        running_mean = layer.running_mean.data(CTXS[0]).asnumpy()
        np.testing.assert_array_equal(saved['aux:' + layer.running_mean.name].asnumpy(),
                                      running_mean)
        np.testing.assert_array_equal(saved['aux:' + layer.running_var.name].asnumpy(),
                                      layer.running_var.data(CTXS[0]).asnumpy())
    out = run_without_pbn_gluon(sym_file, params_file, x, tmp_path)
    np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5)
