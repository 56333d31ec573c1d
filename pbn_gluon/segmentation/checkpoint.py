"""Training checkpoints that a killed run resumes from exactly.

RUN_DIR/checkpoints/epoch_NNNN/ holds
- model.params: a plain Gluon parameter file (what eval.py reads);
- trainer.states: the optimizer state (momentum, update counts);
- sync.npz: every device's StatsSync exchange state and running statistics (with PBN groups
  smaller than the job, replicas of different groups have different running statistics;
  model.params holds the first device's);
- meta.json: epoch and iteration.
The directory is written under a temporary name and renamed, then RUN_DIR/checkpoint.json is
pointed at it (temporary file and os.replace), then older checkpoints are removed: a kill at
any moment leaves the previous checkpoint or the new one complete.
"""
import json
import os
import shutil

import numpy as np
from mxnet import nd

__all__ = ['save', 'load', 'latest', 'model_params', 'gather_sync_state', 'restore_sync_state']

POINTER = 'checkpoint.json'
GATHER_TAG = 'pbn_gluon.segmentation.checkpoint'


def write_json(path, obj):
    """Atomically replace `path` by the JSON of `obj`."""
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _running_stats(sync):
    """The running_mean and running_var parameters of the StatsSync layers."""
    return [p for layer in sync.layers for p in (layer.running_mean, layer.running_var)]


def gather_sync_state(sync, comm):
    """StatsSync state and running statistics of every device of the job: (step, size of the
    exchange state, one row per global rank). Every process of the job must call it."""
    state = sync.state_dict()
    local = [nd.concat(nd.array(s, ctx=c), *[p.data(c) for p in _running_stats(sync)], dim=0)
             for s, c in zip(state['stats'], comm.contexts)]
    rows = comm.allgather(local, GATHER_TAG)[0].asnumpy()
    return state['step'], len(state['stats'][0]), rows


def restore_sync_state(path, sync, comm):
    """Load what gather_sync_state saved into this process's devices (after the parameters)."""
    saved = np.load(path)
    rows, size = saved['rows'], int(saved['stats_size'])
    if rows.shape[0] != comm.size:
        raise ValueError('%s was saved by a job of %d devices; this one has %d'
                         % (path, rows.shape[0], comm.size))
    sync.load_state_dict({'step': int(saved['step']),
                          'stats': [rows[r, :size] for r in comm.ranks]})
    for ctx, rank in zip(comm.contexts, comm.ranks):
        offset = size
        for param in _running_stats(sync):
            n = param.shape[0]
            param.data(ctx)[:] = nd.array(rows[rank, offset:offset + n], ctx=ctx)
            offset += n


def save(run_dir, epoch, iteration, net, trainer, sync_state=None, keep_old=False):
    """Write the checkpoint taken after `epoch` epochs (`iteration` iterations); returns its
    directory. sync_state: what gather_sync_state returned, if the net has a StatsSync.
    keep_old: keep the earlier checkpoints (default: removed)."""
    root = os.path.join(run_dir, 'checkpoints')
    name = 'epoch_%04d' % epoch
    final, tmp = os.path.join(root, name), os.path.join(root, name + '.tmp')
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    net.save_parameters(os.path.join(tmp, 'model.params'))
    trainer.save_states(os.path.join(tmp, 'trainer.states'))
    if sync_state is not None:
        step, stats_size, rows = sync_state
        np.savez(os.path.join(tmp, 'sync.npz'), step=step, stats_size=stats_size, rows=rows)
    write_json(os.path.join(tmp, 'meta.json'), {'epoch': epoch, 'iteration': iteration})
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    write_json(os.path.join(run_dir, POINTER), {'epoch': epoch, 'iteration': iteration,
                                                'path': os.path.join('checkpoints', name)})
    for old in os.listdir(root):
        if old != name and not (keep_old and not old.endswith('.tmp')):
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return final


def latest(run_dir):
    """Directory of the run's last complete checkpoint, or None."""
    pointer = os.path.join(run_dir, POINTER)
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        return os.path.join(run_dir, json.load(f)['path'])


def load(path, net, trainer, ctx, sync=None, comm=None):
    """Restore a checkpoint directory into net, trainer and sync; returns (epoch, iteration)."""
    with open(os.path.join(path, 'meta.json')) as f:
        meta = json.load(f)
    net.load_parameters(os.path.join(path, 'model.params'), ctx=ctx)
    trainer.load_states(os.path.join(path, 'trainer.states'))
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
        raise FileNotFoundError('no model parameters at %s (give a .params file, a checkpoint '
                                'directory or a run directory)' % path)
    return found
