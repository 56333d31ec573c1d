"""Checkpoints: a PBN checkpoint is a BatchNorm checkpoint and back (strict); convert_norm
keeps pretrained weights; StatsSync state makes a resumed run continue exactly."""
import json
import os
import sys

import mxnet as mx
import numpy as np
import pytest
from gluoncv.model_zoo import get_model
from mxnet import autograd, gluon, nd

import pbn_gluon


def trained(norm_layer, steps=2, ctxs=(mx.cpu(0), mx.cpu(1))):
    net = get_model('resnet18_v1b', classes=5, norm_layer=norm_layer)
    net.initialize(mx.init.Xavier(), ctx=list(ctxs))
    sync = pbn_gluon.StatsSync(net, pbn_gluon.LocalComm(list(ctxs)))
    for t in range(steps):
        xs = [nd.random.normal(shape=(2, 3, 32, 32), ctx=c) for c in ctxs]
        with autograd.record():
            outs = [net(x) for x in xs]
        autograd.backward(outs)
        sync.step()
    return net


def params(net):
    return {k: v.data(v.list_ctx()[0]).asnumpy() for k, v in net._collect_params_with_prefix().items()}


def test_pbn_batchnorm_pbn_round_trip_is_strict(tmp_path):
    pbn_net = trained(pbn_gluon.ProgressiveBatchNorm)
    pbn_net.save_parameters(str(tmp_path / 'pbn.params'))
    bn_net = get_model('resnet18_v1b', classes=5)                        # gluon BatchNorm
    bn_net.load_parameters(str(tmp_path / 'pbn.params'))                 # strict by default
    assert set(params(bn_net)) == set(params(pbn_net))
    for k, v in params(pbn_net).items():
        np.testing.assert_array_equal(params(bn_net)[k], v)
    bn_net.save_parameters(str(tmp_path / 'bn.params'))
    back = get_model('resnet18_v1b', classes=5, norm_layer=pbn_gluon.ProgressiveBatchNorm)
    back.load_parameters(str(tmp_path / 'bn.params'))
    x = nd.random.normal(shape=(1, 3, 32, 32))
    np.testing.assert_allclose(back(x).asnumpy(), bn_net(x).asnumpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('norm_layer', [pbn_gluon.ProgressiveBatchNorm, pbn_gluon.SyncBatchNorm])
def test_convert_norm_keeps_weights(norm_layer):
    net = get_model('resnet18_v1b', classes=5)
    net.initialize(mx.init.Xavier())
    for p in net.collect_params('.*running_(mean|var)').values():
        p.set_data(nd.random.uniform(0.5, 1.5, shape=p.shape))
    x = nd.random.normal(shape=(2, 3, 32, 32))
    before = net(x).asnumpy()
    pbn_gluon.convert_norm(net, norm_layer)
    layers = pbn_gluon.find_norm_layers(net)
    assert len(layers) == 20 and all(type(l) is norm_layer for l in layers)
    assert not [b for b in _blocks(net) if type(b) is gluon.nn.BatchNorm]
    np.testing.assert_allclose(net(x).asnumpy(), before, rtol=1e-4, atol=1e-5)   # inference


def _blocks(block):
    yield block
    for child in block._children.values():
        yield from _blocks(child)


def test_resumed_run_continues_exactly(tmp_path):
    """3 steps in one go == 2 steps, checkpoint (params + StatsSync state), new net, 1 step."""
    ctxs = [mx.cpu(0), mx.cpu(1)]
    data = [[nd.array(np.random.RandomState(t * 10 + k).normal(size=(2, 3, 8, 8)), ctx=c)
             for k, c in enumerate(ctxs)] for t in range(3)]

    def build():
        net = gluon.nn.HybridSequential()
        net.add(gluon.nn.Conv2D(4, 3, in_channels=3, weight_initializer=mx.init.Constant(0.1)),
                pbn_gluon.ProgressiveBatchNorm(variant='paper-minimal', local_weight=0.5))
        net.initialize(ctx=ctxs)
        net.hybridize()
        return net, pbn_gluon.StatsSync(net, pbn_gluon.LocalComm(ctxs))

    def run(net, sync, steps):
        for xs in steps:
            with autograd.record():
                outs = [net(x) for x in xs]
            autograd.backward(outs)
            sync.step()
        return [o.asnumpy() for o in outs]

    net, sync = build()
    straight = run(net, sync, data)
    net, sync = build()
    run(net, sync, data[:2])
    net.save_parameters(str(tmp_path / 'ckpt.params'))
    state = sync.state_dict()
    net, sync = build()
    net.load_parameters(str(tmp_path / 'ckpt.params'), ctx=ctxs)
    with autograd.pause():
        net(data[0][0]), net(data[0][1])     # materialise deferred shapes before loading state
    sync.load_state_dict(state)
    resumed = run(net, sync, data[2:])
    for a, b in zip(straight, resumed):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_result_files_are_written_whole_and_without_machine_paths(tmp_path):
    """pbn_gluon.files: a value JSON cannot encode leaves the old file; a rename that fails
    leaves no temporary file; portable() turns the venv and the repository into placeholders."""
    from pbn_gluon import files
    path = str(tmp_path / 'state.json')
    files.write_json(path, {'step': 1})
    with pytest.raises(TypeError):
        files.write_json(path, {'step': object()}, sync=True)
    with open(path) as f:
        assert json.load(f) == {'step': 1}
    blocked = tmp_path / 'taken'
    (blocked / 'inside').mkdir(parents=True)      # a directory where the file should go
    with pytest.raises(OSError):
        files.write_text(str(blocked), 'x', sync=True)
    assert sorted(os.listdir(str(tmp_path))) == ['state.json', 'taken']
    text = files.portable('File "%s/lib/x.py", in %s/pbn_gluon/ops.py'
                          % (sys.prefix, files.REPOSITORY))
    assert text == 'File "<venv>/lib/x.py", in ./pbn_gluon/ops.py'
