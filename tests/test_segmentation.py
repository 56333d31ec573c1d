"""The segmentation pipeline's parts against independent references: the official Cityscapes
label table and evaluation, numpy GroupNorm, the configs of the paper's experiments."""
import glob
import os
import random
import subprocess

import mxnet as mx
import numpy as np
import pytest
from cityscapesscripts.helpers.labels import labels as CITYSCAPES_LABELS
from gluoncv.model_zoo import get_model
from gluoncv.utils.metrics import SegmentationMetric
from mxnet import autograd, nd
from mxnet.gluon.contrib.nn import SyncBatchNorm as ContribSyncBatchNorm
from PIL import Image

import pbn_gluon
from common import make_fake_cityscapes
from pbn_gluon.segmentation import (CityscapesSegmentation, GroupNorm, epoch_batches,
                                    get_norm_layer, get_segmentation_model, load_config,
                                    model_from_config, to_label_ids, to_train_ids)
from pbn_gluon.segmentation.evaluation import mean_iou, official_evaluation, save_prediction

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_CONFIGS = sorted(glob.glob(os.path.join(REPO, 'configs', 'cityscapes_deeplabv3_r101_*')))


@pytest.fixture(scope='module')
def fake_root(tmp_path_factory):
    return make_fake_cityscapes(tmp_path_factory.mktemp('fake_cityscapes'), '32x64')


def reference_train_id(label_id):
    """trainId of a labelId straight from the official table; -1 for void or unknown ids."""
    for label in CITYSCAPES_LABELS:
        if label.id == label_id:
            return -1 if label.ignoreInEval or label.trainId in (255, -1) else label.trainId
    return -1


def blocks(net):
    yield net
    for child in net._children.values():
        yield from blocks(child)


# -- data ----------------------------------------------------------------------------------

def test_label_ids_map_to_train_ids_as_the_official_table(fake_root, tmp_path):
    ids = np.arange(256, dtype=np.uint8).reshape(16, 16)
    expected = np.vectorize(reference_train_id)(ids)
    assert sorted(set(expected.ravel()) - {-1}) == list(range(19))
    np.testing.assert_array_equal(to_train_ids(ids), expected)
    np.testing.assert_array_equal(to_train_ids(to_label_ids(np.arange(19))), np.arange(19))
    # through the dataset: a label file with ids outside the table (34..255) becomes ignore
    root = tmp_path / 'root'
    for top, suffix, data in (('leftImg8bit', 'leftImg8bit', np.zeros((16, 16, 3), np.uint8)),
                              ('gtFine', 'gtFine_labelIds', ids)):
        (root / top / 'val' / 'ulm').mkdir(parents=True)
        Image.fromarray(data).save(root / top / 'val' / 'ulm' / ('ulm_000000_000001_%s.png'
                                                                 % suffix))
    _, mask = CityscapesSegmentation(str(root), 'val', 'testval')[0]
    np.testing.assert_array_equal(mask.asnumpy(), expected)


def test_missing_or_incomplete_root_says_what_is_missing(fake_root, tmp_path):
    with pytest.raises(FileNotFoundError, match='missing directory .*nowhere'):
        CityscapesSegmentation(str(tmp_path / 'nowhere'))
    partial = tmp_path / 'partial'
    (partial / 'leftImg8bit' / 'val').mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r'missing directory .*gtFine/val'):
        CityscapesSegmentation(str(partial), 'val')
    (partial / 'gtFine' / 'val').mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match='no image in'):
        CityscapesSegmentation(str(partial), 'val')
    image = partial / 'leftImg8bit' / 'val' / 'ulm' / 'ulm_000000_000001_leftImg8bit.png'
    image.parent.mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(image)
    with pytest.raises(FileNotFoundError, match=r'1 of 1 images .*ulm_000000_000001_leftImg8bit'
                                                r'\.png \(no .*ulm_000000_000001_gtFine_labelIds'):
        CityscapesSegmentation(str(partial), 'val')


@pytest.mark.parametrize('damage', ['garbage', 'truncated'])
def test_corrupt_image_error_names_the_file(fake_root, tmp_path, damage):
    root = tmp_path / 'root'
    subprocess.run(['cp', '-r', str(fake_root), str(root)], check=True)
    dataset = CityscapesSegmentation(str(root), 'val', 'testval')
    victim = dataset.images[1]
    with open(victim, 'rb') as f:
        data = f.read()
    with open(victim, 'wb') as f:
        f.write(b'not a png at all' if damage == 'garbage' else data[:len(data) // 2])
    dataset[0]
    with pytest.raises(OSError, match='cannot read image %s' % victim):
        dataset[1]


def test_augmentation_and_order_follow_seed_and_epoch(fake_root):
    def sample(epoch, index, seed=0):
        dataset = CityscapesSegmentation(str(fake_root), 'train', 'train', base_size=64,
                                         crop_size=24, seed=seed)
        dataset.set_epoch(epoch)
        img, mask = dataset[index]
        return np.concatenate([img.asnumpy().ravel(), mask.asnumpy().ravel()])

    state = random.getstate()
    np.testing.assert_array_equal(sample(3, 1), sample(3, 1))
    assert random.getstate() == state        # GluonCV's transforms ran on a private seed
    assert not np.array_equal(sample(3, 1), sample(4, 1))
    assert not np.array_equal(sample(3, 1), sample(3, 1, seed=1))

    first = epoch_batches(10, 3, seed=0, epoch=5)
    assert first == epoch_batches(10, 3, seed=0, epoch=5)
    assert first != epoch_batches(10, 3, seed=0, epoch=6)
    assert [len(b) for b in first] == [3, 3, 3] and len(set(sum(first, []))) == 9


# -- configs --------------------------------------------------------------------------------

def test_unknown_config_key_lists_the_valid_keys(tmp_path):
    path = tmp_path / 'x.yaml'
    path.write_text('data_root: somewhere\nnorm: pbn\nlearning_rate: 0.1\n')
    with pytest.raises(ValueError, match=r"(?s)unknown config key 'learning_rate'.*valid keys"
                                         r".*data_root.*pbn_steps.*overfit_batches"):
        load_config(str(path))
    path.write_text('data_root: somewhere\n')
    with pytest.raises(ValueError, match=r"(?s)'bogus' in --set.*valid keys.*weight_decay"):
        load_config(str(path), ['epochs=2', 'bogus=1'])
    with pytest.raises(ValueError, match='norm must be one of bn, syncbn, pbn, gn'):
        load_config(str(path), ['norm=batchnorm'])
    cfg = load_config(str(path), ['epochs=2', 'pbn_group_size={0: 1, 100: 2}'])
    assert (cfg.epochs, cfg.pbn_group_size, cfg.lr, cfg.run_dir) == (
        2, {0: 1, 100: 2}, 0.01, os.path.join('runs', 'x'))


def test_paper_configs_build_their_model():
    """Six configs: DeepLabV3-ResNet101, 8 GPUs x 1 or 2 images, bn / syncbn / pbn."""
    assert len(PAPER_CONFIGS) == 6
    expected = {'bn': mx.gluon.nn.BatchNorm, 'syncbn': ContribSyncBatchNorm,
                'pbn': pbn_gluon.ProgressiveBatchNorm}
    for path in PAPER_CONFIGS:
        cfg = load_config(path)
        assert (cfg.model, cfg.backbone, cfg.gpus, cfg.backend) == (
            'deeplab', 'resnet101', 8, 'local')
        assert '_%dimg' % cfg.batch_size in path and '_%s_' % cfg.norm in path
        gpus = [mx.gpu(i) for i in range(cfg.gpus)]     # only named: nothing runs on them
        net = model_from_config(cfg, gpus, initialize=False)
        norms = [b for b in blocks(net) if isinstance(b, mx.gluon.nn.BatchNorm)]
        assert len(norms) == 114 and {type(b) for b in norms} == {expected[cfg.norm]}, path
        if cfg.norm == 'syncbn':
            assert {b._kwargs['ndev'] for b in norms} == {8}
        if cfg.norm == 'pbn':
            assert norms[0].local_weight_at(0, 8) == 1.0
            assert norms[0].local_weight_at(cfg.pbn_steps, 8) == pytest.approx(1 / 8)
        assert net.crop_size == 768 and net.base_size == 2048


# -- models and norms -----------------------------------------------------------------------

def test_syncbn_is_contrib_only_for_gpus_of_one_process():
    gpus = [mx.gpu(0), mx.gpu(1)]
    assert get_norm_layer('syncbn', gpus).func is ContribSyncBatchNorm
    assert get_norm_layer('syncbn', gpus).keywords == {'num_devices': 2}
    assert get_norm_layer('syncbn', gpus, in_process=False) is pbn_gluon.SyncBatchNorm
    assert get_norm_layer('syncbn', [mx.cpu(0), mx.cpu(1)]) is pbn_gluon.SyncBatchNorm
    with pytest.raises(ValueError, match='unknown norm'):
        get_norm_layer('ln', gpus)


def test_every_norm_layer_is_replaced_with_its_settings():
    """Also GluonCV Xception's layer built without norm_kwargs (DeepLabV3+)."""
    schedule = pbn_gluon.schedules.Constant(0.25)
    for model, backbone in (('deeplab', 'resnet50'), ('deeplabplus', 'xception')):
        bn = get_segmentation_model(model, backbone, 'bn', crop_size=64, initialize=False)
        pbn = get_segmentation_model(model, backbone, 'pbn', crop_size=64, initialize=False,
                                     pbn_kwargs={'local_weight': schedule})
        count = len([b for b in blocks(bn) if isinstance(b, mx.gluon.nn.BatchNorm)])
        layers = pbn_gluon.find_norm_layers(pbn)
        assert count > 50 and len(layers) == count
        assert all(l.local_weight_schedule is schedule for l in layers)
    with pytest.raises(ValueError, match='deeplabplus takes backbone xception'):
        get_segmentation_model('deeplabplus', 'resnet101', initialize=False)


def test_group_norm_matches_numpy():
    rng = np.random.RandomState(0)
    x = rng.normal(2, 3, (2, 64, 5, 6)).astype(np.float32)
    gamma, beta = rng.normal(size=64), rng.normal(size=64)
    layer = GroupNorm(in_channels=64, num_groups=32)
    layer.initialize()
    layer.gamma.set_data(nd.array(gamma))
    layer.beta.set_data(nd.array(beta))
    groups = x.reshape(2, 32, -1)
    normed = ((groups - groups.mean(-1, keepdims=True))
              / np.sqrt(groups.var(-1, keepdims=True) + 1e-5))
    expected = normed.reshape(x.shape) * gamma.reshape(1, -1, 1, 1) + beta.reshape(1, -1, 1, 1)
    np.testing.assert_allclose(layer(nd.array(x)).asnumpy(), expected, rtol=1e-4, atol=1e-4)
    layer.hybridize()
    np.testing.assert_allclose(layer(nd.array(x)).asnumpy(), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match='728 channels do not split into 32 groups'):
        GroupNorm(in_channels=728)


def test_gn_deeplab_trains_a_step():
    mx.random.seed(0)
    net = get_segmentation_model('deeplab', 'resnet50', 'gn', [mx.cpu()], crop_size=32)
    bn = get_segmentation_model('deeplab', 'resnet50', 'bn', crop_size=32, initialize=False)
    assert not [b for b in blocks(net) if isinstance(b, mx.gluon.nn.BatchNorm)]
    assert len([b for b in blocks(net) if isinstance(b, GroupNorm)]) == len(
        [b for b in blocks(bn) if isinstance(b, mx.gluon.nn.BatchNorm)])
    x = nd.random.uniform(shape=(2, 3, 32, 32))
    with autograd.record():
        out, aux = net(x)
        loss = out.sum() + aux.sum()
    loss.backward()
    assert out.shape == aux.shape == (2, 19, 32, 32)
    assert np.isfinite(net.layer1[0].bn1.gamma.grad().asnumpy()).all()


def test_backbone_loads_from_a_local_file_only(tmp_path):
    mx.random.seed(1)
    backbone = get_model('resnet50_v1s', pretrained=False)
    backbone.initialize(mx.init.Normal(0.5))
    backbone(nd.zeros((1, 3, 32, 32)))
    path = str(tmp_path / 'resnet50_v1s.params')
    backbone.save_parameters(path)
    saved = mx.nd.load(path)
    net = get_segmentation_model('deeplab', 'resnet50', 'pbn', [mx.cpu(0), mx.cpu(1)],
                                 crop_size=32, pretrained_base=path)
    params = net._collect_params_with_prefix()
    for name in ('conv1.0.weight', 'bn1.running_var', 'layer4.2.conv3.weight'):
        for ctx in (mx.cpu(0), mx.cpu(1)):
            np.testing.assert_array_equal(params[name].data(ctx).asnumpy(), saved[name].asnumpy())
    assert not any(name.startswith(('head.', 'auxlayer.')) for name in saved)
    with pytest.raises(FileNotFoundError, match='nothing is downloaded'):
        get_segmentation_model('deeplab', 'resnet50', 'bn', crop_size=32,
                               pretrained_base=str(tmp_path / 'absent.params'))
    mx.nd.save(path, {k: v for k, v in saved.items() if not k.startswith('layer4.')})
    with pytest.raises(ValueError, match=r'missing \(e.g. layer4'):
        get_segmentation_model('deeplab', 'resnet50', 'bn', crop_size=32, pretrained_base=path)


# -- evaluation -----------------------------------------------------------------------------

def test_metric_and_saved_predictions_agree_with_the_official_evaluation(fake_root, tmp_path):
    """Random predictions: GluonCV's confusion counts averaged over the present classes give
    the official script's per-class IoU and mIoU on the saved labelId PNGs."""
    dataset = CityscapesSegmentation(str(fake_root), 'val', 'testval')
    rng = np.random.RandomState(0)
    metric = SegmentationMetric(19)
    for i in range(len(dataset)):
        _, target = dataset[i]
        target = target.asnumpy()
        pred = np.where(rng.rand(*target.shape) < 0.6, np.maximum(target, 0),
                        rng.choice([0, 2, 5, 11, 13], size=target.shape))
        metric.update(nd.array(target), nd.array(np.eye(19)[pred].transpose(2, 0, 1)[None]))
        path = save_prediction(pred, dataset.images[i], str(tmp_path / 'pred'))
        assert os.path.relpath(path, str(tmp_path / 'pred')) == os.path.relpath(
            dataset.images[i], os.path.dirname(os.path.dirname(dataset.images[i])))
    iou, miou = mean_iou(metric.total_inter, metric.total_union)
    result = official_evaluation(str(tmp_path / 'pred'), dataset.labels, str(tmp_path / 'o.json'))
    assert os.path.isfile(tmp_path / 'o.json')
    assert result['averageScoreClasses'] == pytest.approx(miou, abs=1e-12)
    for name, value in zip(dataset.CLASSES, iou):
        official = result['classScores'][name]
        assert (np.isnan(value) and np.isnan(official)) or \
            official == pytest.approx(value, abs=1e-12)
    assert 0.2 < miou < 0.9
    os.remove(save_prediction(np.zeros((32, 64), int), dataset.images[0], str(tmp_path / 'pred')))
    with pytest.raises(RuntimeError, match='Found no prediction for ground truth'):
        official_evaluation(str(tmp_path / 'pred'), dataset.labels, str(tmp_path / 'o.json'))
