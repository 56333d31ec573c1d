"""Training checkpoints that a killed run resumes from exactly.

RUN_DIR/checkpoints/epoch_NNNN/ holds
- model.params: a plain Gluon parameter file (what eval.py reads);
- trainer.states: the optimizer state (momentum, update counts);
- sync.npz: every device's StatsSync exchange state and running statistics (with PBN groups
  smaller than the job, replicas of different groups have different running statistics;
  model.params holds the first device's);
- meta.json: epoch, iteration and the run's layout (model, backbone, norm, backend, devices),
  which a resumed run must share (check_layout).
The directory is written under a temporary name and renamed, then RUN_DIR/checkpoint.json is
pointed at it (temporary file and os.replace), then older checkpoints are removed: a kill at
any moment leaves the previous checkpoint or the new one complete, and a failed save (disk
full, unwritable) removes what it wrote and raises a CheckpointError naming the path.
A file that cannot be read (truncated, empty, not a checkpoint) raises a CheckpointError
naming it and what to do.
"""
import json
import os
import shutil

import numpy as np
from mxnet import nd

from ..errors import CheckpointError, one_line
from ..files import write_json

__all__ = ['save', 'load', 'latest', 'model_params', 'gather_sync_state', 'restore_sync_state',
           'read_meta', 'check_layout', 'load_params', 'LAYOUT_KEYS', 'CheckpointError']

#: what a resumed run must share with the checkpoint it resumes
LAYOUT_KEYS = ('model', 'backbone', 'norm', 'backend', 'devices')

POINTER = 'checkpoint.json'
GATHER_TAG = 'pbn_gluon.segmentation.checkpoint'


def reason(err):
    """The short cause of an exception: its first line, without MXNet's time and source prefix
    and stack trace."""
    lines = [l.strip() for l in str(err).split('Stack trace')[0].splitlines() if l.strip()]
    if lines and lines[0].startswith('Traceback'):     # MXNet: its C++ frames, then the message
        lines = lines[-1:]
    text = one_line('\n'.join(lines)) or type(err).__name__
    if text.startswith(type(err).__name__ + ': '):
        text = text[len(type(err).__name__) + 2:]
    if text.startswith('[') and '] ' in text:          # [20:33:12] ../src/x.cc:123: message
        text = text.split('] ', 1)[1]
        parts = text.split(': ', 1)
        if len(parts) == 2 and ('.cc:' in parts[0] or '.h:' in parts[0]):
            text = parts[1]
    text = text.replace('Check failed: ', '')
    return '%s: %s' % (type(err).__name__, text)


def _damaged(path, err, what_to_do):
    return CheckpointError('cannot read %s (%s): the file is truncated, empty or not written by '
                           'pbn_gluon; %s' % (path, reason(err), what_to_do))


RESUME_ADVICE = ('restore the checkpoint directory from a copy, or start the run again in '
                 'another run_dir')


def _running_stats(sync):
    """The running_mean and running_var parameters of the StatsSync layers."""
    return [p for layer in sync.layers for p in (layer.running_mean, layer.running_var)]


def gather_sync_state(sync, comm):
    """StatsSync state and running statistics of every device of the job: (step, size of the
    exchange state, one row per global rank). Every process of the job must call it."""
    state = sync.state_dict()
    local = [nd.array(np.concatenate([s] + [p.data(c).asnumpy() for p in _running_stats(sync)]),
                      ctx=c, dtype='float64')
             for s, c in zip(state['stats'], comm.contexts)]
    rows = comm.allgather(local, GATHER_TAG)[0].asnumpy()
    return state['step'], len(state['stats'][0]), rows


def restore_sync_state(path, sync, comm):
    """Load what gather_sync_state saved into this process's devices (after the parameters)."""
    try:
        with np.load(path) as saved:
            rows, size, step = saved['rows'], int(saved['stats_size']), int(saved['step'])
    except Exception as err:
        raise _damaged(path, err, RESUME_ADVICE) from err
    if rows.ndim != 2 or rows.shape[0] != comm.size:
        raise CheckpointError('cannot resume from %s: it was saved by a job of %s devices, this '
                              'one has %d; resume with the same number of devices'
                              % (path, rows.shape[0] if rows.ndim == 2 else '?', comm.size))
    expected = size + sum(p.shape[0] for p in _running_stats(sync))
    if rows.shape[1] != expected:
        raise CheckpointError('cannot resume from %s: it holds %d statistics per device, this '
                              'net needs %d (another model or norm layers); resume with the '
                              'config it was trained with' % (path, rows.shape[1], expected))
    try:
        sync.load_state_dict({'step': step, 'stats': [rows[r, :size] for r in comm.ranks]})
    except ValueError as err:
        raise CheckpointError('cannot resume from %s: %s; resume with the config it was trained '
                              'with' % (path, one_line(err))) from err
    for ctx, rank in zip(comm.contexts, comm.ranks):
        offset = size
        for param in _running_stats(sync):
            n = param.shape[0]
            param.data(ctx)[:] = nd.array(rows[rank, offset:offset + n], ctx=ctx)
            offset += n


def save(run_dir, epoch, iteration, net, trainer, sync_state=None, layout=None, keep_old=False):
    """Write the checkpoint taken after `epoch` epochs (`iteration` iterations); returns its
    directory. sync_state: what gather_sync_state returned, if the net has a StatsSync;
    layout: the LAYOUT_KEYS of the run (a resumed run must have the same); keep_old: keep the
    earlier checkpoints (default: removed)."""
    root = os.path.join(run_dir, 'checkpoints')
    name = 'epoch_%04d' % epoch
    final, tmp = os.path.join(root, name), os.path.join(root, name + '.tmp')
    meta = dict(layout or {}, epoch=epoch, iteration=iteration)
    current = None
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        current = os.path.join(tmp, 'model.params')
        net.save_parameters(current)
        try:    # MXNet's writer does not check its last flush: a full disk can cut it silently
            nd.load(current)
        except Exception as err:
            raise OSError('written incompletely, disk full? %s' % reason(err)) from err
        current = os.path.join(tmp, 'trainer.states')
        trainer.save_states(current)
        if sync_state is not None:
            step, stats_size, rows = sync_state
            current = os.path.join(tmp, 'sync.npz')
            with open(current, 'wb') as f:
                np.savez(f, step=step, stats_size=stats_size, rows=rows)
        current = os.path.join(tmp, 'meta.json')
        write_json(current, meta, sync=True)
        current = final
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        current = os.path.join(run_dir, POINTER)
        write_json(current, {'epoch': epoch, 'iteration': iteration,
                             'path': os.path.join('checkpoints', name)}, sync=True)
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if current == os.path.join(run_dir, POINTER):
            shutil.rmtree(final, ignore_errors=True)
        previous = latest(run_dir, missing_ok=True)
        raise CheckpointError(
            'cannot write checkpoint file %s (%s): free disk space or make %s writable, then '
            'resume with --resume; %s' % (
                current or root, reason(err), run_dir,
                'the previous checkpoint %s is intact' % previous if previous
                else 'no checkpoint was written')) from err
    for old in os.listdir(root):
        if old != name and not (keep_old and not old.endswith('.tmp')):
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return final


def _read_json(path, keys, what_to_do):
    try:
        with open(path) as f:
            value = json.load(f)
        if not isinstance(value, dict) or any(k not in value for k in keys):
            raise ValueError('no %s' % ' and '.join(keys))
        return value
    except (OSError, ValueError) as err:
        raise _damaged(path, err, what_to_do) from err


def latest(run_dir, missing_ok=False):
    """Directory of the run's last complete checkpoint, or None. A checkpoint.json that cannot
    be read, or that points nowhere, raises a CheckpointError naming it (missing_ok: None)."""
    pointer = os.path.join(run_dir, POINTER)
    if not os.path.isfile(pointer):
        return None
    try:
        path = os.path.join(run_dir, _read_json(
            pointer, ['path'], 'restore it, or write {"path": "checkpoints/epoch_NNNN"} into it '
            'for a complete checkpoint directory of %s, or remove it to start the run again'
            % os.path.join(run_dir, 'checkpoints'))['path'])
        if not os.path.isdir(path):
            raise CheckpointError('%s points to %s, which does not exist: restore that checkpoint, '
                                  'or remove %s to start the run again' % (pointer, path, pointer))
    except CheckpointError:
        if missing_ok:
            return None
        raise
    return path


def read_meta(path):
    """meta.json of a checkpoint directory (epoch, iteration and, since this version, the
    LAYOUT_KEYS)."""
    return _read_json(os.path.join(path, 'meta.json'), ['epoch', 'iteration'], RESUME_ADVICE)


def check_layout(path, layout, has_sync):
    """Raise a CheckpointError (one line, both values) when the checkpoint directory `path` was
    saved by a run whose LAYOUT_KEYS differ from `layout` (this run's), or, for checkpoints
    older than those keys, whose statistics exchange state (sync.npz) does not fit has_sync
    (this run has PBN or SyncBN layers)."""
    meta = read_meta(path)
    for key in LAYOUT_KEYS:
        if key in meta and key in layout and meta[key] != layout[key]:
            raise CheckpointError(
                'cannot resume %s: it was saved with %s=%s, the config has %s=%s; resume with '
                '--set %s=%s, or start a new run in another run_dir'
                % (path, key, meta[key], key, layout[key], key, meta[key]))
    saved_sync = os.path.isfile(os.path.join(path, 'sync.npz'))
    if saved_sync != bool(has_sync):
        raise CheckpointError(
            'cannot resume %s: it was saved %s statistics exchange state (sync.npz), the config '
            'has norm=%s %s; resume with the norm it was trained with, or start a new run in '
            'another run_dir' % (path, 'with' if saved_sync else 'without',
                                 layout.get('norm'), 'which has none' if saved_sync
                                 else 'which needs it'))
    return meta


def load_params(net, path, ctx, what_to_do):
    """net.load_parameters(path) with a CheckpointError naming the file when it cannot be read
    or does not fit the net."""
    try:
        nd.load(path)
    except Exception as err:
        raise _damaged(path, err, what_to_do) from err
    try:
        net.load_parameters(path, ctx=ctx)
    except Exception as err:
        raise CheckpointError('%s does not fit this model (%s): give the parameters of a run '
                              'with the same model and backbone' % (path, reason(err))) from err


def load(path, net, trainer, ctx, sync=None, comm=None):
    """Restore a checkpoint directory into net, trainer and sync; returns (epoch, iteration).
    A file that cannot be read raises a CheckpointError that names it."""
    meta = read_meta(path)
    load_params(net, os.path.join(path, 'model.params'), ctx, RESUME_ADVICE)
    states = os.path.join(path, 'trainer.states')
    try:
        trainer.load_states(states)
    except Exception as err:
        raise _damaged(states, err, RESUME_ADVICE) from err
    if sync is not None:
        restore_sync_state(os.path.join(path, 'sync.npz'), sync, comm)
    return meta['epoch'], meta['iteration']


def model_params(path):
    """The model.params of `path`: that file, a checkpoint directory, or a run directory (its
    last checkpoint)."""
    if os.path.isfile(path):
        return path
    found = os.path.join(latest(path) or path, 'model.params')
    if not os.path.isfile(found):
        raise CheckpointError('no model parameters at %s (give a .params file, a checkpoint '
                                'directory or a run directory)' % path)
    return found
