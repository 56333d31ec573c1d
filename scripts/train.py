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
import sys
import time

import mxnet as mx
from gluoncv.loss import MixSoftmaxCrossEntropyLoss
from mxnet import gluon
from tqdm import tqdm

import pbn_gluon
from pbn_gluon.errors import ArgumentParser, ConfigError, UserError, user_errors
from pbn_gluon.segmentation import (CityscapesSegmentation, checkpoint, epoch_batches,
                                    input_transform, load_config, model_from_config)
from pbn_gluon.rendezvous import cpu_resource_advice, cpu_resource_env
from pbn_gluon.segmentation.distributed import Job


def parse_args():
    parser = ArgumentParser(description='Train DeepLab on Cityscapes (a user error is one line '
                                        'on stderr, exit code 2; PBN_GLUON_DEBUG=1 or --debug: '
                                        'its traceback)')
    parser.add_argument('--config', required=True, help='YAML experiment config')
    parser.add_argument('--set', nargs='+', default=[], metavar='KEY=VALUE',
                        help='override config keys (values in YAML syntax)')
    parser.add_argument('--resume', action='store_true',
                        help="continue from the run directory's last checkpoint, if any")
    return parser.parse_args()


def seed_epoch(seed, epoch):
    """MXNet's random numbers (dropout) of an epoch follow from (seed, epoch), so a resumed run
    draws what the uninterrupted one would have. (Data order and augmentation already do.)"""
    mx.random.seed(seed * 100003 + epoch, ctx='all')


def ensure_cpu_resources(job, norm):
    """SyncBatchNorm on several CPU contexts of this process needs more of MXNet's CPU resource
    copies than its defaults (pbn_gluon.rendezvous.cpu_resource_advice), and MXNet reads them
    when it is imported: start again once, with them set. Every norm gets the random-generator
    copies, because that setting changes what MXNet's seeded generators draw: bn, syncbn and pbn
    start from the same weights. Only syncbn gets the temp-space copies (which do not change
    the draws): the other norms never wait inside the graph, and with that many copies memory
    grows with every step (DeepLabV3-ResNet18 on 8 contexts: about 1.2 GB a step)."""
    if not job.in_process or cpu_resource_advice(job.contexts) is None:
        return
    settings = cpu_resource_env(len(job.contexts))
    if norm != 'syncbn':
        settings = {k: v for k, v in settings.items() if k == 'MXNET_CPU_PARALLEL_RAND_COPY'
                    and int(os.environ.get(k, 1)) < int(v)}
        if not settings:
            return
    print('%s: %d CPU contexts of one process: restarting with %s'
          % (sys.argv[0], len(job.contexts), ' '.join('%s=%s' % kv for kv in
                                                       sorted(settings.items()))), flush=True)
    env = dict(os.environ, **settings)
    os.execve(sys.executable, [sys.executable] + sys.argv, env)


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
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        f.writelines(keep)
    os.replace(tmp, path)


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
    args = parse_args()
    with user_errors('train.py'):
        train(args)


def train(args):
    cfg = load_config(args.config, args.set)
    job = Job(cfg.backend, cfg.gpus, cfg.devices)
    ensure_cpu_resources(job, cfg.norm)
    ctx = job.contexts
    layout = {'model': cfg.model, 'backbone': cfg.backbone, 'norm': cfg.norm,
              'backend': cfg.backend, 'devices': job.size}

    # a checkpoint to resume must fit the config: checked before anything is built
    last = checkpoint.latest(cfg.run_dir)
    if last and not args.resume:
        raise UserError('%s already holds a checkpoint (%s): add --resume to continue it, or '
                        'choose another run_dir' % (cfg.run_dir, last))
    if last:
        checkpoint.check_layout(last, layout, has_sync=cfg.norm in ('pbn', 'syncbn'))

    # data: each global batch holds batch_size images per device of the job, in rank order
    trainset = CityscapesSegmentation(cfg.data_root, cfg.train_split, 'train', input_transform(),
                                      base_size=cfg.base_size, crop_size=cfg.crop_size,
                                      seed=cfg.seed)
    global_batch = cfg.batch_size * job.size
    local = slice(job.rank_offset * cfg.batch_size, (job.rank_offset + len(ctx)) * cfg.batch_size)
    if len(trainset) < global_batch:
        raise ConfigError('%s has %d training images (split %s), fewer than one global batch of '
                          '%d (batch_size %d x %d devices): add images or lower batch_size or '
                          'devices' % (cfg.data_root, len(trainset), cfg.train_split,
                                       global_batch, cfg.batch_size, job.size))
    iters_per_epoch = cfg.overfit_batches or len(trainset) // global_batch
    total_iters = cfg.epochs * iters_per_epoch

    # model, loss, optimizer
    mx.random.seed(cfg.seed, ctx='all')
    net = model_from_config(cfg, ctx, in_process=job.in_process)
    if cfg.norm == 'syncbn' and job.comm.needs_prepare:
        # KVStore dist_sync declares SyncBatchNorm's exchanges up front, by channel count: get
        # every shape from the graph without running it (a forward pass before the Trainer's
        # first step would break MXNet 1.9's dist_sync Trainer: README, known limitations)
        net.infer_shape(mx.nd.zeros((1, 3, cfg.crop_size, cfg.crop_size), ctx=ctx[0]))
    job.broadcast(net.collect_params())
    criterion = MixSoftmaxCrossEntropyLoss(aux=cfg.aux, aux_weight=cfg.aux_weight)
    trainer = job.trainer(net.collect_params(), {'learning_rate': cfg.lr, 'momentum': cfg.momentum,
                                                 'wd': cfg.weight_decay})
    sync = pbn_gluon.StatsSync(net, job.comm) if cfg.norm in ('pbn', 'syncbn') else None

    start_epoch, iteration = 0, 0
    log = MetricsLog(os.path.join(cfg.run_dir, 'metrics.jsonl'))
    if last:
        start_epoch, iteration = checkpoint.load(last, net, trainer, ctx, sync, job.comm)
        if job.is_root:     # each iteration once in the log
            cut_metrics(log.path, iteration)
    if cfg.hybridize:
        net.hybridize(static_alloc=True)
    if job.is_root:
        print('%s: %s-%s, norm %s, %d device(s) x %d image(s), %d iterations per epoch, '
              'epochs %d..%d' % (cfg.name, cfg.model, cfg.backbone, cfg.norm, job.size,
                                 cfg.batch_size, iters_per_epoch, start_epoch, cfg.epochs - 1))

    for epoch in range(start_epoch, cfg.epochs):
        seed_epoch(cfg.seed, epoch)
        data_epoch = 0 if cfg.overfit_batches else epoch     # overfit: the very same batches
        trainset.set_epoch(data_epoch)
        batches = epoch_batches(len(trainset), global_batch, cfg.seed, data_epoch)
        loader = gluon.data.DataLoader(trainset, num_workers=cfg.workers, batch_sampler=[
            batches[i % len(batches)][local] for i in range(iters_per_epoch)])
        progress = tqdm(loader, desc='epoch %d' % epoch, disable=not job.is_root,
                        dynamic_ncols=True)
        for data, target in progress:
            tic = time.time()
            lr = cfg.lr * (1 - iteration / total_iters) ** cfg.lr_power
            trainer.set_learning_rate(lr)
            xs = gluon.utils.split_and_load(data, ctx)
            ys = gluon.utils.split_and_load(target, ctx)
            losses = pbn_gluon.train_step(net, lambda out, y: criterion(*out, y), xs, ys,
                                          trainer, job.step_batch(cfg.batch_size), sync)
            loss = sum(l.sum().asscalar() for l in losses) / len(data)
            iteration += 1
            progress.set_postfix(loss='%.4f' % loss, lr='%.2e' % lr)
            if job.is_root and (iteration % cfg.log_interval == 0 or iteration == total_iters):
                record = {'epoch': epoch, 'iter': iteration, 'loss': loss, 'lr': lr,
                          'step_s': round(time.time() - tic, 4)}
                if sync is not None and sync.pbn:   # steps whose global moments were left out
                    record['nonfinite_stats_steps'] = sync.nonfinite_steps
                log.write(record)
        sync_state = checkpoint.gather_sync_state(sync, job.comm) if sync is not None else None
        if job.is_root:
            path = checkpoint.save(cfg.run_dir, epoch + 1, iteration, net, trainer, sync_state,
                                   layout, keep_old=cfg.keep_checkpoints)
            progress.write('epoch %d done, checkpoint %s' % (epoch, path))
    mx.nd.waitall()


if __name__ == '__main__':
    main()
