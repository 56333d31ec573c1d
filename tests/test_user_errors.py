"""Every user error of the scripts is ONE line on stderr with exit code 2, naming the key or the
file (and a traceback only under PBN_GLUON_DEBUG=1); no run file is written before a run has
started; damaged checkpoints and failed saves name the file; a damaged cached operator library
is rebuilt; the launcher leaves no process behind; --resume refuses another norm or device
layout and keeps each iteration once in metrics.jsonl."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import mxnet as mx
import pytest
from mxnet import gluon

import pbn_gluon
from pbn_gluon import ops
from pbn_gluon.errors import CheckpointError
from pbn_gluon.segmentation import checkpoint

from common import make_fake_cityscapes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, 'configs', 'cpu_fake_pbn.yaml')


def script(name, *args, env=None, timeout=300):
    """Run scripts/<name> as a user would (MXNet's default environment)."""
    base = {k: v for k, v in os.environ.items()
            if not k.startswith('MXNET_') and k != 'PBN_GLUON_DEBUG'}
    base.update(env or {})
    return subprocess.run([sys.executable, os.path.join(REPO, 'scripts', name)] + list(args),
                          cwd=REPO, capture_output=True, text=True, timeout=timeout, env=base)


def assert_user_error(result, *names):
    """Exit code 2 and exactly one line on stderr, which names each of `names`."""
    lines = result.stderr.splitlines()
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert len(lines) == 1, result.stderr[-3000:]
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    assert 'Traceback' not in result.stderr
    return lines[0]


@pytest.fixture(scope='module')
def fake_root(tmp_path_factory):
    return make_fake_cityscapes(tmp_path_factory.mktemp('fake_cityscapes'), '64x128')


def train(root, run_dir, *settings, resume=False, env=None):
    return script('train.py', '--config', CONFIG, *(['--resume'] if resume else []),
                  '--set', 'data_root=%s' % root, 'run_dir=%s' % run_dir, 'devices=1',
                  'overfit_batches=1', *settings, env=env)


# -- config values and files ------------------------------------------------------------------

@pytest.mark.timeout(120)
@pytest.mark.parametrize('setting', ['devices=two', 'devices=0', 'lr=fast', 'batch_size=0',
                                     'epochs=1.5', 'norm=batchnorm', 'momentum=1.5',
                                     'pbn_group_size=[2]', 'bogus_key=1'])
def test_bad_config_value_is_one_line_naming_key_and_value(setting, fake_root, tmp_path):
    run_dir = tmp_path / 'run'
    result = train(fake_root, run_dir, setting)
    key, value = setting.split('=')
    line = assert_user_error(result, key, value if key != 'bogus_key' else 'valid keys')
    if key != 'bogus_key':
        assert 'must be' in line        # what is allowed
    assert not run_dir.exists()


@pytest.mark.timeout(180)
def test_group_size_that_does_not_divide_the_devices_is_one_line(fake_root, tmp_path):
    """A PBN group size the job's device count is not a multiple of (known only once the job
    is up): one line, exit 2 (was a 19-line traceback, exit 1)."""
    result = train(fake_root, tmp_path / 'run', 'devices=2', 'pbn_group_size=3')
    assert_user_error(result, 'group size 3', 'the 2 devices')


@pytest.mark.timeout(120)
def test_eval_bad_config_value(tmp_path):
    result = script('eval.py', '--config', CONFIG, '--checkpoint', str(tmp_path),
                    '--set', 'devices=two')
    assert_user_error(result, 'devices', 'two')


@pytest.mark.timeout(120)
def test_debug_switch_shows_the_traceback(fake_root, tmp_path):
    result = train(fake_root, tmp_path / 'run', 'devices=0', env={'PBN_GLUON_DEBUG': '1'})
    assert result.returncode != 0 and 'Traceback' in result.stderr
    assert 'ConfigError' in result.stderr and 'devices=0' in result.stderr


@pytest.mark.timeout(120)
@pytest.mark.parametrize('content', ['norm: [pbn\n', '- just\n- a list\n', None])
def test_bad_config_file(content, tmp_path):
    path = tmp_path / 'bad.yaml'
    if content is not None:
        path.write_text(content)
    assert_user_error(script('train.py', '--config', str(path)), path)


@pytest.mark.timeout(120)
@pytest.mark.parametrize('case', ['missing', 'empty', 'too_few'])
def test_bad_data_root(case, fake_root, tmp_path):
    root, settings = tmp_path / 'data', []
    if case == 'empty':
        for top in ('leftImg8bit', 'gtFine'):
            (root / top / 'train').mkdir(parents=True)
    if case == 'too_few':       # 4 images, a global batch of 5
        root, settings = fake_root, ['batch_size=5']
    run_dir = tmp_path / 'run'
    line = assert_user_error(train(root, run_dir, *settings), root)
    assert {'missing': 'missing directory', 'empty': 'no image',
            'too_few': 'fewer than one global batch'}[case] in line
    assert not run_dir.exists()      # no metrics.jsonl, no run directory


@pytest.mark.timeout(200)
@pytest.mark.parametrize('args', [['--size', 'abc'], ['--num-train', '-1'], ['--out', 'FILE/x']])
def test_make_fake_cityscapes_bad_input(args, tmp_path):
    (tmp_path / 'file').write_text('')
    args = [a.replace('FILE', str(tmp_path / 'file')) for a in args]
    if '--out' not in args:
        args += ['--out', str(tmp_path / 'out')]
    assert_user_error(script('make_fake_cityscapes.py', *args), args[0])


@pytest.mark.timeout(200)
@pytest.mark.parametrize('name, args, named', [
    ('demo.py', ['--contexts', '0'], '--contexts'), ('demo.py', ['--steps', 'two'], '--steps'),
    ('bench_norm.py', ['--devices', '1,two'], '--devices'),
    ('bench_norm.py', ['--steps', '0'], '--steps')])
def test_demo_and_bench_bad_arguments(name, args, named):
    assert_user_error(script(name, *args), named)


# -- checkpoints: resume, damaged files, failed saves -----------------------------------------

@pytest.fixture(scope='module')
def pbn_run(fake_root, tmp_path_factory):
    """A finished 1-iteration PBN run (1 device): its run directory."""
    run_dir = tmp_path_factory.mktemp('pbn_run') / 'run'
    result = train(fake_root, run_dir, 'epochs=1')
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def copy_run(pbn_run, tmp_path):
    target = tmp_path / 'run'
    shutil.copytree(str(pbn_run), str(target))
    return target


@pytest.mark.timeout(200)
@pytest.mark.parametrize('setting, saved', [('norm=bn', 'norm=pbn'), ('norm=syncbn', 'norm=pbn'),
                                            ('devices=2', 'devices=1'),
                                            ('backbone=resnet101', 'backbone=resnet50')])
def test_resume_refuses_another_layout(setting, saved, pbn_run, fake_root, tmp_path):
    """Resuming a PBN run with norm=bn trained a corrupted run and exited 0 (issue 15)."""
    run_dir = copy_run(pbn_run, tmp_path)
    before = (run_dir / 'metrics.jsonl').read_text()
    result = train(fake_root, run_dir, 'epochs=2', setting, resume=True)
    line = assert_user_error(result, 'cannot resume', saved, setting)
    assert (run_dir / 'metrics.jsonl').read_text() == before
    assert json.loads((run_dir / 'checkpoint.json').read_text())['epoch'] == 1


@pytest.mark.timeout(200)
def test_resume_refuses_another_norm_from_an_older_checkpoint(pbn_run, fake_root, tmp_path):
    """A checkpoint written before meta.json held the layout: its sync.npz says it was PBN's."""
    run_dir = copy_run(pbn_run, tmp_path)
    meta = run_dir / 'checkpoints' / 'epoch_0001' / 'meta.json'
    meta.write_text(json.dumps({'epoch': 1, 'iteration': 1}))
    line = assert_user_error(train(fake_root, run_dir, 'epochs=2', 'norm=bn', resume=True),
                             'sync.npz', 'norm=bn')


@pytest.mark.timeout(200)
def test_resume_keeps_each_iteration_once_in_the_metrics(pbn_run, fake_root, tmp_path):
    """A run killed after logging iteration 2 (and half of a line) but before its checkpoint of
    iteration 2: the resumed run logs iteration 2 again, and the log holds it once."""
    run_dir = copy_run(pbn_run, tmp_path)
    metrics = run_dir / 'metrics.jsonl'
    with open(str(metrics), 'a') as f:
        f.write(json.dumps({'epoch': 1, 'iter': 2, 'loss': 123.0, 'lr': 0.01}) + '\n')
        f.write('{"epoch": 1, "it')
    result = train(fake_root, run_dir, 'epochs=2', resume=True)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r['iter'] for r in records] == [1, 2]
    assert records[1]['loss'] != 123.0
    first = json.loads((pbn_run / 'metrics.jsonl').read_text().splitlines()[0])
    assert records[0] == first


def damage(path, how):
    data = path.read_bytes()
    path.write_bytes({'truncated': data[:len(data) // 3], 'empty': b'',
                      'garbage': b'not a checkpoint \x00\x01\x02' * 10}[how])


@pytest.mark.timeout(200)
@pytest.mark.parametrize('name, how', [
    ('checkpoints/epoch_0001/model.params', 'truncated'),
    pytest.param('checkpoints/epoch_0001/trainer.states', 'empty', marks=pytest.mark.slow),
    ('checkpoints/epoch_0001/trainer.states', 'truncated'),
    ('checkpoints/epoch_0001/sync.npz', 'garbage'),
    pytest.param('checkpoints/epoch_0001/meta.json', 'truncated', marks=pytest.mark.slow),
    pytest.param('checkpoint.json', 'garbage', marks=pytest.mark.slow)])
def test_resume_from_a_damaged_file_names_it(name, how, pbn_run, fake_root, tmp_path):
    run_dir = copy_run(pbn_run, tmp_path)
    damage(run_dir / name, how)
    assert_user_error(train(fake_root, run_dir, 'epochs=2', resume=True), run_dir / name)


@pytest.mark.timeout(200)
@pytest.mark.parametrize('how', ['truncated', 'garbage'])
def test_eval_of_a_damaged_model_names_it(how, pbn_run, fake_root, tmp_path):
    run_dir = copy_run(pbn_run, tmp_path)
    params = run_dir / 'checkpoints' / 'epoch_0001' / 'model.params'
    damage(params, how)
    result = script('eval.py', '--config', CONFIG, '--checkpoint', str(run_dir),
                    '--out', str(tmp_path / 'eval'), '--set', 'data_root=%s' % fake_root,
                    'devices=1')
    assert_user_error(result, params, 'another checkpoint')
    assert not (tmp_path / 'eval').exists()


def small_run(ctx):
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Conv2D(4, 3, in_channels=3), pbn_gluon.ProgressiveBatchNorm(in_channels=4))
    net.initialize(ctx=ctx)
    trainer = gluon.Trainer(net.collect_params(), 'sgd', {'learning_rate': 0.1})
    return net, trainer


def test_unwritable_run_dir_names_it(tmp_path):
    (tmp_path / 'file').write_text('')
    net, trainer = small_run([mx.cpu()])
    with pytest.raises(CheckpointError, match='cannot write checkpoint file .*file.*writable'):
        checkpoint.save(str(tmp_path / 'file' / 'run'), 1, 1, net, trainer)


@pytest.mark.timeout(120)
def test_disk_full_during_a_save_leaves_the_previous_checkpoint(tmp_path):
    """RLIMIT_FSIZE makes the second save's writes fail as a full disk would (EFBIG): the error
    names the file being written, nothing half-written is left, the first checkpoint is intact
    and checkpoint.json still points to it."""
    code = textwrap.dedent('''
        import resource, signal, sys
        sys.path.insert(0, %r)
        import mxnet as mx
        from test_user_errors import small_run
        from pbn_gluon.segmentation import checkpoint
        net, trainer = small_run([mx.cpu()])
        checkpoint.save(%r, 1, 1, net, trainer)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200))
        try:
            checkpoint.save(%r, 2, 2, net, trainer)
        except checkpoint.CheckpointError as err:
            print('ERROR', err)
        ''') % (os.path.dirname(os.path.abspath(__file__)), str(tmp_path), str(tmp_path))
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                            timeout=100, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    line = [l for l in result.stdout.splitlines() if l.startswith('ERROR')]
    assert line and 'cannot write checkpoint file %s' % (tmp_path / 'checkpoints' / 'epoch_0002.tmp' / 'model.params') in line[0], result.stdout
    assert 'free disk space' in line[0] and 'epoch_0001 is intact' in line[0]
    assert sorted(os.listdir(str(tmp_path / 'checkpoints'))) == ['epoch_0001']
    assert checkpoint.latest(str(tmp_path)) == str(tmp_path / 'checkpoints' / 'epoch_0001')
    net, trainer = small_run([mx.cpu()])
    assert checkpoint.load(str(tmp_path / 'checkpoints' / 'epoch_0001'), net, trainer,
                           [mx.cpu()]) == (1, 1)


# -- the operator cache ------------------------------------------------------------------------

def cached_copy(cache):
    """A copy of this process's checked operator library (and its checksum) in `cache`, where
    the library for these sources belongs; returns its path."""
    source = ops.load()
    assert ops.library_ok(source)
    target = ops.library_path(None, str(cache))
    os.makedirs(os.path.dirname(target))
    shutil.copy2(source, target)
    shutil.copy2(source + '.sha256', target + '.sha256')
    return target


@pytest.mark.timeout(300)
def test_truncated_cached_library_is_rebuilt(tmp_path):
    """A library cut to 4 KB (a full disk, a killed copy) died with SIGBUS when loaded; the
    checksum sends it to the compiler again. A killed build's temporary is removed."""
    library = cached_copy(tmp_path / 'cache')
    size = os.path.getsize(library)
    os.truncate(library, 4096)
    stale = os.path.join(os.path.dirname(library), 'tmpkilledbuild.so')
    open(stale, 'wb').close()
    code = ('import mxnet as mx, pbn_gluon\n'
            'layer = pbn_gluon.ProgressiveBatchNorm(in_channels=2)\n'
            'layer.initialize()\n'
            'print("OUT", layer(mx.nd.ones((2, 2, 3, 3))).shape, pbn_gluon.ops.load())\n')
    env = dict(os.environ, PBN_GLUON_CACHE=str(tmp_path / 'cache'))
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                            timeout=280, env=env, cwd=REPO)
    assert result.returncode == 0, (result.returncode, result.stderr[-3000:])
    assert 'OUT (2, 2, 3, 3) %s' % library in result.stdout
    assert os.path.getsize(library) == size and ops.library_ok(library)
    assert not os.path.exists(stale)
    assert not [n for n in os.listdir(os.path.dirname(library)) if n.startswith('tmp')]


def _descendants(pid):
    """The processes below `pid` (from /proc)."""
    children = {}
    for entry in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open('/proc/%s/stat' % entry) as f:
                parent = int(f.read().rsplit(')', 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize('sig', [signal.SIGKILL, signal.SIGTERM])
def test_a_build_killed_mid_compile_leaves_nothing(tmp_path, sig):
    """A process killed while it compiles the operators: its compiler runs on as an orphan and
    used to write its library (~300 KB, tmp*.so) beside the cache's after the next process had
    built there, where it stayed. Now the next load works and, once the orphan is done, the
    cache holds the library, its checksum and the lock, nothing else."""
    env = dict(os.environ, PBN_GLUON_CACHE=str(tmp_path / 'cache'))
    code = 'import pbn_gluon.ops as o; print("LIB", o.load())'
    build = subprocess.Popen([sys.executable, '-c', code], env=env, cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not _descendants(build.pid):      # the compiler has started
        assert build.poll() is None and time.time() < deadline, 'no compiler started'
        time.sleep(0.1)
    time.sleep(2)                           # mid-compile
    compilers = _descendants(build.pid)
    build.send_signal(sig)
    build.wait()
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                            timeout=600, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    library = result.stdout.split('LIB ')[1].strip()
    while any(os.path.exists('/proc/%d' % pid) for pid in compilers):
        assert time.time() < deadline + 600, 'the orphaned compiler still runs'
        time.sleep(0.5)
    assert ops.library_ok(library)
    assert sorted(os.listdir(os.path.dirname(library))) == [
        '.lock', 'libpbn_ops.so', 'libpbn_ops.so.sha256']


def test_library_check_rejects_a_changed_library(tmp_path):
    library = cached_copy(tmp_path / 'cache')
    assert ops.library_ok(library)
    with open(library, 'r+b') as f:      # same size, one byte changed
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xff]))
    assert not ops.library_ok(library)
    os.unlink(library + '.sha256')       # a library without its checksum is not trusted either
    assert not ops.library_ok(library)


def test_unwritable_cache_falls_back_with_a_warning(tmp_path, monkeypatch):
    """PBN_GLUON_CACHE under a regular file: the per-user fallback is used, and said."""
    (tmp_path / 'file').write_text('')
    fallback = tmp_path / 'fallback'
    cached_copy(fallback)
    monkeypatch.setenv('PBN_GLUON_CACHE', str(tmp_path / 'file' / 'cache'))
    monkeypatch.setattr(ops, '_fallback_cache_dir', lambda: str(fallback))
    with pytest.warns(RuntimeWarning, match='PBN_GLUON_CACHE=.*file/cache is not writable'):
        path = ops._library(None)
    assert path == ops.library_path(None, str(fallback))
    monkeypatch.setattr(ops, '_fallback_cache_dir', lambda: str(tmp_path / 'file' / 'fallback'))
    with pytest.raises(ops.BuildError, match='PBN_GLUON_CACHE=.*not writable.*nor is the '
                                             'fallback'):
        ops._library(None)


# -- the launcher ------------------------------------------------------------------------------

def processes_with(marker):
    found = []
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open('/proc/%s/environ' % pid, 'rb') as f:
                if marker.encode() in f.read().split(b'\0'):
                    found.append(int(pid))
        except OSError:
            continue
    return found


@pytest.mark.timeout(120)
def test_launcher_with_a_missing_program_leaves_no_process():
    """The scheduler and server used to stay up, orphaned, after the worker failed to start."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    result = subprocess.run([sys.executable, '-m', 'pbn_gluon.launch', '-n', '2', '--port',
                             str(port), '--', '/no/such/program'], capture_output=True,
                            text=True, timeout=100, cwd=REPO)
    assert result.returncode == 127
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and 'cannot start worker 0' in lines[0] and \
        '/no/such/program' in lines[0], result.stderr
    assert processes_with('DMLC_PS_ROOT_PORT=%d' % port) == []


def test_every_config_key_is_checked():
    """A key added to the config without a check would fail at load with a KeyError."""
    from pbn_gluon.segmentation import config
    assert set(config.KEYS) == set(config.CHECKS) | set(config.CHOICES)
    from pbn_gluon.segmentation.models import MODELS
    assert config.BACKBONES == {m: b for m, (_, b) in MODELS.items()}


def test_amp_bfloat16_names_the_dtype_and_the_way_out():
    """MXNet's AMP (bfloat16 on CPU) makes a PBN layer's input bfloat16: the error names the
    dtype (was "dtype code 12") and says to keep the model in float32."""
    import mxnet as mx
    from mxnet import gluon
    from mxnet.contrib import amp
    import pbn_gluon
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Conv2D(4, 3, in_channels=3), pbn_gluon.ProgressiveBatchNorm(in_channels=4))
    net.initialize()
    net.hybridize()
    x = mx.nd.ones((2, 3, 6, 6))
    net(x)
    with pytest.raises(mx.base.MXNetError, match='must be float32, got bfloat16.*keep models '
                       'with them in float32'):
        amp.convert_hybrid_block(net, target_dtype='bfloat16', ctx=mx.cpu())(x).wait_to_read()
