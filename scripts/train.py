"""Train a DeepLab on Cityscapes with bn, syncbn, pbn or gn (GluonCV's Cityscapes recipe:
SGD with momentum, poly learning rate, auxiliary loss).

    python scripts/train.py --config configs/cityscapes_deeplabv3_r101_pbn_1img.yaml
    python scripts/train.py --config configs/cpu_fake_pbn.yaml --set data_root=data/fake --resume
    horovodrun -np 8 -H localhost:8 python scripts/train.py --config X.yaml \
        --set backend=horovod gpus=1
    python -m pbn_gluon.launch -n 2 -- python scripts/train.py --config X.yaml \
        --set backend=kvstore

Writes to the config's run_dir: metrics.jsonl (epoch, iter, loss, lr, step_s, and with PBN
nonfinite_stats_steps: steps whose statistics had a NaN or Inf, left out), and a checkpoint
after every epoch; --resume continues from the last one exactly as if never stopped. With
horovod or kvstore, the root process writes, and run_dir must be shared by every process.
"""
import json
import os
import time
import types

import mxnet as mx
from gluoncv.loss import MixSoftmaxCrossEntropyLoss
from mxnet import autograd, gluon
from tqdm import tqdm

from pbn_gluon.errors import ConfigError, UserError
from pbn_gluon.files import write_text
from pbn_gluon.jobs import Job
from pbn_gluon.segmentation import (CityscapesSegmentation, checkpoint, epoch_batches,
                                    input_transform, model_from_config)
from pbn_gluon.segmentation.config import config_parser, run_with_config


def parse_args():
    parser = config_parser('Train DeepLab on Cityscapes')
    parser.add_argument('--resume', action='store_true',
                        help="continue from the run directory's last checkpoint, if any")
    return parser.parse_args()


def seed_epoch(seed, epoch):
    """MXNet's random numbers (dropout) of an epoch follow from (seed, epoch), so a resumed run
    draws what the uninterrupted one would have. (Data order and augmentation already do.)"""
    mx.random.seed(seed * 100003 + epoch, ctx='all')


def cut_metrics(path, iteration):
    """Keep the records of iterations up to `iteration` (the checkpoint's) in the metrics log: a
    killed run logged iterations after its last checkpoint, which the resumed run logs again.
    A line cut short by the kill is dropped. Rewritten atomically."""
    if not os.path.isfile(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get('iter', 0) <= iteration:
                keep.append(line.rstrip('\n') + '\n')
    write_text(path, ''.join(keep))


class MetricsLog:
    """metrics.jsonl, created at the first record: a run that fails before its first
    iteration leaves no file behind."""

    def __init__(self, path):
        self.path, self._file = path, None

    def write(self, record):
        if self._file is None:
            os.makedirs(os.path.dirname(self.path) or '.', exist_ok=True)
            self._file = open(self.path, 'a')
        self._file.write(json.dumps(record) + '\n')
        self._file.flush()


def main():
    run_with_config('train.py', parse_args(), train)


def checkpoint_to_resume(cfg, resume, layout):
    """The run directory's last checkpoint (None if it has none), checked against the config
    before anything is built; one without --resume is an error."""
    last = checkpoint.latest(cfg.run_dir)
    if last and not resume:
        raise UserError('%s already holds a checkpoint (%s): add --resume to continue it, or '
                        'choose another run_dir' % (cfg.run_dir, last))
    if last:
        checkpoint.check_layout(last, layout, has_sync=cfg.norm in ('pbn', 'syncbn'))
    return last


def training_data(cfg, job):
    """The training set, and its plan: each global batch holds batch_size images per device of
    the job, in rank order; `local` is this process's slice of it."""
    trainset = CityscapesSegmentation(cfg.data_root, cfg.train_split, 'train', input_transform(),
                                      base_size=cfg.base_size, crop_size=cfg.crop_size,
                                      seed=cfg.seed)
    global_batch = cfg.batch_size * job.size
    if len(trainset) < global_batch:
        raise ConfigError('%s has %d training images (split %s), fewer than one global batch of '
                          '%d (batch_size %d x %d devices): add images or lower batch_size or '
                          'devices' % (cfg.data_root, len(trainset), cfg.train_split,
                                       global_batch, cfg.batch_size, job.size))
    iters_per_epoch = cfg.overfit_batches or len(trainset) // global_batch
    plan = types.SimpleNamespace(
        global_batch=global_batch, iters_per_epoch=iters_per_epoch,
        total_iters=cfg.epochs * iters_per_epoch,
        local=slice(job.rank_offset * cfg.batch_size,
                    (job.rank_offset + len(job.contexts)) * cfg.batch_size))
    return trainset, plan


def build_model(cfg, job):
    """The net (the root's weights on every process), loss, and pbn_gluon.Trainer (whose
    ``stats``, the StatsSync of pbn and syncbn, is ``sync``)."""
    ctx = job.contexts
    mx.random.seed(cfg.seed, ctx='all')
    net = model_from_config(cfg, ctx, in_process=job.in_process)
    job.prepare(net, mx.nd.zeros((1, 3, cfg.crop_size, cfg.crop_size), ctx=ctx[0]))
    job.broadcast(net.collect_params())
    criterion = MixSoftmaxCrossEntropyLoss(aux=cfg.aux, aux_weight=cfg.aux_weight)
    trainer = job.trainer(net.collect_params(), {'learning_rate': cfg.lr, 'momentum': cfg.momentum,
                                                 'wd': cfg.weight_decay})
    return types.SimpleNamespace(net=net, criterion=criterion, trainer=trainer,
                                 sync=trainer.stats)


def resume_from(last, job, model, log):
    """(epoch, iteration) to start from: (0, 0), or the checkpoint's, loaded into the model;
    the metrics log loses what the killed run logged after it."""
    if not last:
        return 0, 0
    start_epoch, iteration = checkpoint.load(last, model.net, model.trainer, job.contexts,
                                             model.sync, job.comm)
    if job.is_root:     # each iteration once in the log
        cut_metrics(log.path, iteration)
    return start_epoch, iteration


def epoch_loader(cfg, trainset, plan, epoch):
    """The epoch's batches of this process (overfit_batches: the very same every epoch)."""
    seed_epoch(cfg.seed, epoch)
    data_epoch = 0 if cfg.overfit_batches else epoch
    trainset.set_epoch(data_epoch)
    batches = epoch_batches(len(trainset), plan.global_batch, cfg.seed, data_epoch)
    return gluon.data.DataLoader(trainset, num_workers=cfg.workers, batch_sampler=[
        batches[i % len(batches)][plan.local] for i in range(plan.iters_per_epoch)])


def train_epoch(cfg, job, model, plan, progress, epoch, iteration, log):
    """One epoch's steps (poly learning rate); the root logs every log_interval-th. Returns the
    iteration reached."""
    ctx, sync = job.contexts, model.sync
    for data, target in progress:
        tic = time.time()
        lr = cfg.lr * (1 - iteration / plan.total_iters) ** cfg.lr_power
        model.trainer.set_learning_rate(lr)
        xs = gluon.utils.split_and_load(data, ctx)
        ys = gluon.utils.split_and_load(target, ctx)
        with autograd.record():     # every forward before any value is read
            losses = [model.criterion(*model.net(x), y) for x, y in zip(xs, ys)]
        autograd.backward(losses)
        model.trainer.step(job.step_batch(cfg.batch_size))     # exchanges the statistics too
        loss = sum(l.sum().asscalar() for l in losses) / len(data)
        iteration += 1
        progress.set_postfix(loss='%.4f' % loss, lr='%.2e' % lr)
        if job.is_root and (iteration % cfg.log_interval == 0 or iteration == plan.total_iters):
            record = {'epoch': epoch, 'iter': iteration, 'loss': loss, 'lr': lr,
                      'step_s': round(time.time() - tic, 4)}
            if sync is not None and sync.pbn:   # steps whose global moments were left out
                record['nonfinite_stats_steps'] = sync.nonfinite_steps
            log.write(record)
    return iteration


def save_epoch(cfg, job, model, layout, epoch, iteration, progress):
    """The checkpoint after `epoch` (every process gives its exchange state, the root writes)."""
    sync = model.sync
    sync_state = checkpoint.gather_sync_state(sync, job.comm) if sync is not None else None
    if job.is_root:
        path = checkpoint.save(cfg.run_dir, epoch + 1, iteration, model.net, model.trainer,
                               sync_state, layout, keep_old=cfg.keep_checkpoints)
        progress.write('epoch %d done, checkpoint %s' % (epoch, path))


def train(args, cfg):
    job = Job(cfg.backend, cfg.gpus, cfg.devices)
    job.ensure_cpu_resources(cfg.norm)
    layout = {'model': cfg.model, 'backbone': cfg.backbone, 'norm': cfg.norm,
              'backend': cfg.backend, 'devices': job.size}
    last = checkpoint_to_resume(cfg, args.resume, layout)
    trainset, plan = training_data(cfg, job)
    model = build_model(cfg, job)
    log = MetricsLog(os.path.join(cfg.run_dir, 'metrics.jsonl'))
    start_epoch, iteration = resume_from(last, job, model, log)
    if cfg.hybridize:
        model.net.hybridize(static_alloc=True)
    if job.is_root:
        print('%s: %s-%s, norm %s, %d device(s) x %d image(s), %d iterations per epoch, '
              'epochs %d..%d' % (cfg.name, cfg.model, cfg.backbone, cfg.norm, job.size,
                                 cfg.batch_size, plan.iters_per_epoch, start_epoch,
                                 cfg.epochs - 1))
    for epoch in range(start_epoch, cfg.epochs):
        progress = tqdm(epoch_loader(cfg, trainset, plan, epoch), desc='epoch %d' % epoch,
                        disable=not job.is_root, dynamic_ncols=True)
        iteration = train_epoch(cfg, job, model, plan, progress, epoch, iteration, log)
        save_epoch(cfg, job, model, layout, epoch, iteration, progress)
    mx.nd.waitall()


if __name__ == '__main__':
    main()
