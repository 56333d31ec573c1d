"""scripts/train.py and scripts/eval.py end to end on a fake Cityscapes: DeepLabV3-ResNet50 at
crop 64 learns a repeated batch with bn, syncbn and pbn, on 2 CPU contexts of one process or 2
Horovod processes; eval agrees with the official Cityscapes evaluation; a run killed with
SIGKILL resumes to the same weights; a dead Horovod worker ends the job."""
import json
import os
import signal
import subprocess
import sys
import time

import mxnet as mx
import numpy as np
import pytest

from common import make_fake_cityscapes
from pbn_gluon import jobs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def fake_root(tmp_path_factory):
    return make_fake_cityscapes(tmp_path_factory.mktemp('fake_cityscapes'), '64x128')


def train_command(config, root, run_dir, *settings):
    return [sys.executable, os.path.join(REPO, 'scripts', 'train.py'),
            '--config', os.path.join(REPO, 'configs', config),
            '--set', 'data_root=%s' % root, 'run_dir=%s' % run_dir] + list(settings)


def run(command, timeout=240, env=None):
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                            env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def losses(run_dir):
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        return {r['iter']: r['loss'] for r in map(json.loads, f)}


def evaluate_like_the_benchmark(config, root, run_dir, tmp_path, *options):
    """eval.py's own mIoU (GluonCV's confusion counts) against the official script run on its
    saved predictions as a benchmark user would: no arguments, environment variables only."""
    pred = tmp_path / 'pred'
    run([sys.executable, os.path.join(REPO, 'scripts', 'eval.py'),
         '--config', os.path.join(REPO, 'configs', config), '--checkpoint', str(run_dir),
         '--set', 'data_root=%s' % root, 'run_dir=%s' % run_dir, '--save-dir', str(pred)] +
        list(options))
    with open(os.path.join(run_dir, 'eval', 'metrics.json')) as f:
        metrics = json.load(f)
    env = dict(os.environ, CITYSCAPES_DATASET=str(root), CITYSCAPES_RESULTS=str(pred),
               CITYSCAPES_EXPORT_DIR=str(tmp_path))
    subprocess.run([sys.executable, '-m', 'cityscapesscripts.evaluation.'
                    'evalPixelLevelSemanticLabeling'], env=env, check=True, capture_output=True)
    with open(tmp_path / 'resultPixelLevelSemanticLabeling.json') as f:
        official = json.load(f)
    assert metrics['images'] == 2 and 0 < metrics['pixAcc'] <= 1
    assert metrics['mIoU_gluoncv'] == pytest.approx(official['averageScoreClasses'], abs=1e-9)
    assert metrics['mIoU'] == pytest.approx(official['averageScoreClasses'], abs=1e-9)


def assert_learns(run_dir, iterations):
    history = losses(run_dir)
    assert sorted(history) == list(range(1, iterations + 1))
    assert all(np.isfinite(list(history.values())))
    assert history[iterations] < 0.8 * history[1], history


@pytest.mark.timeout(400)
@pytest.mark.parametrize('norm', ['bn', 'pbn', 'syncbn'])
def test_two_contexts_learn_a_repeated_batch_and_evaluate(norm, fake_root, tmp_path):
    """train.py restarts itself with MXNet's CPU resource settings, whatever the norm (MXNet's
    defaults, as a user has them, stall SyncBN on DeepLab, and the settings change the initial
    weights: docs/limitations.md)."""
    run_dir = tmp_path / 'run'
    env = {k: v for k, v in os.environ.items() if not k.startswith('MXNET_CPU_')}
    result = run(train_command('cpu_fake_%s.yaml' % norm, fake_root, run_dir,
                               'overfit_batches=1', 'epochs=3'), env=env)
    assert 'restarting with MXNET_CPU_PARALLEL_RAND_COPY=16' in result.stdout
    assert_learns(run_dir, 3)
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        logged = [json.loads(line).get('nonfinite_stats_steps') for line in f]
    assert logged == [0, 0, 0] if norm == 'pbn' else logged == [None] * 3
    evaluate_like_the_benchmark('cpu_fake_%s.yaml' % norm, fake_root, run_dir, tmp_path)


@pytest.mark.timeout(400)
@pytest.mark.parametrize('norm', [pytest.param('syncbn', marks=pytest.mark.slow), 'pbn'])
def test_two_horovod_processes_learn_a_repeated_batch_and_evaluate(norm, fake_root, tmp_path):
    run_dir = tmp_path / 'run'
    run(jobs.horovodrun(2, train_command('cpu_fake_%s.yaml' % norm, fake_root, run_dir,
                                         'backend=horovod', 'devices=1', 'overfit_batches=1',
                                         'epochs=3')))
    assert_learns(run_dir, 3)
    evaluate_like_the_benchmark('cpu_fake_%s.yaml' % norm, fake_root, run_dir, tmp_path)


@pytest.mark.timeout(500)
@pytest.mark.parametrize('norm', ['syncbn', pytest.param('pbn', marks=pytest.mark.slow)])
def test_kvstore_workers_learn_a_repeated_batch(norm, fake_root, tmp_path):
    """syncbn: SyncBatchNorm over dist_sync declares its exchanges from shapes that train.py
    infers without running the net (a forward pass before the Trainer's first step breaks
    MXNet's dist_sync server, plain BatchNorm included). pbn: then a multi-scale evaluation."""
    run_dir = tmp_path / 'run'
    config = 'cpu_fake_%s.yaml' % norm
    run(jobs.kvstore_launch(2, train_command(config, fake_root, run_dir, 'backend=kvstore',
                                             'devices=1', 'overfit_batches=1', 'epochs=3'),
                            timeout=300), timeout=360)
    assert_learns(run_dir, 3)
    if norm == 'pbn':
        evaluate_like_the_benchmark(config, fake_root, run_dir, tmp_path, '--multi-scale')
        with open(os.path.join(run_dir, 'eval', 'metrics.json')) as f:
            assert json.load(f)['scales'] == [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]


@pytest.mark.timeout(400)
@pytest.mark.slow
@pytest.mark.parametrize('backend', ['local', 'horovod'])
def test_resume_after_sigkill_ends_with_the_same_weights(backend, fake_root, tmp_path):
    """PBN on 2 devices, 2 epochs of 2 iterations, groups of 1 device until iteration 3 (so
    the replicas' running statistics differ), then of 2. One run is killed right after its
    first checkpoint and resumed: weights, statistics and losses equal the uninterrupted run's."""
    full, killed = tmp_path / 'full', tmp_path / 'killed'
    settings = ['epochs=2', 'pbn_group_size={0: 1, 3: 2}']
    launcher = lambda cmd: jobs.launch_command(backend, 2, cmd)
    if backend == 'horovod':
        settings += ['backend=horovod', 'devices=1']
    run(launcher(train_command('cpu_fake_pbn.yaml', fake_root, full, *settings)))
    command = launcher(train_command('cpu_fake_pbn.yaml', fake_root, killed, *settings))
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    while proc.poll() is None and not os.path.exists(killed / 'checkpoint.json'):
        time.sleep(0.02)
    assert proc.poll() is None, 'the run ended before it could be killed'
    victim = horovod_worker(0, str(killed)) if backend == 'horovod' else proc.pid
    assert victim is not None, 'no Horovod worker of the run found'
    os.kill(victim, signal.SIGKILL)
    assert proc.wait() != 0
    with open(killed / 'checkpoint.json') as f:
        assert json.load(f)['epoch'] == 1
    assert subprocess.run(command, cwd=REPO, capture_output=True).returncode != 0  # no --resume
    run(command + ['--resume'])

    final = [mx.nd.load(str(d / 'checkpoints' / 'epoch_0002' / 'model.params'))
             for d in (full, killed)]
    assert set(final[0]) == set(final[1])
    for name in final[0]:
        np.testing.assert_array_equal(final[1][name].asnumpy(), final[0][name].asnumpy(), name)
    rows = [np.load(str(d / 'checkpoints' / 'epoch_0002' / 'sync.npz'))['rows']
            for d in (full, killed)]
    np.testing.assert_array_equal(rows[1], rows[0])
    assert losses(killed) == losses(full)
    assert final[0]['layer1.0.bn1.running_mean'].abs().sum().asscalar() > 0


def horovod_worker(rank, marker):
    """pid of the Horovod worker of `rank` whose command line contains `marker`, or None."""
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open('/proc/%s/cmdline' % pid, 'rb') as f:
                cmdline = f.read().decode(errors='replace')
            with open('/proc/%s/environ' % pid, 'rb') as f:
                environ = f.read().decode(errors='replace').split('\0')
        except OSError:
            continue
        if marker in cmdline and 'scripts/train.py' in cmdline and \
                'HOROVOD_RANK=%d' % rank in environ and 'python' in cmdline.split('\0')[0]:
            return int(pid)
    return None
