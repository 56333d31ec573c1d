"""The paper's experiment in miniature (issue 16): GluonCV DeepLabV3 on a dilated ResNet-18,
8 CPU devices, trained by scripts/train.py and evaluated by scripts/eval.py (official
cityscapesscripts mIoU) for every (norm, images per device, seed), on the digits scenes in the
Cityscapes layout (scripts/make_fake_cityscapes.py --kind digits).

    python scripts/study.py --quick       # 1 seed, 1 image per device, bn / pbn+ / syncbn
    python scripts/study.py --preset sensitivity  # the paper's algorithm read 8 ways, 1 seed,
                                          # 1 image per device, with bn and syncbn
    python scripts/study.py               # 2 seeds, 1 and 2 images per device, bn / syncbn /
                                          # the paper's best reading / pbn+
    python scripts/study.py --preset long # 3 seeds, 1 and 2 images per device, bn / syncbn /
                                          # the paper's two best readings / pbn+
    python scripts/study.py --report      # table and plot of the finished runs only

Every norm of a seed starts from the same weights and sees the same batches; every norm gets the
same schedule (configs/study_*.yaml differ only in their norm lines; 2 images per device run
twice the epochs, i.e. the same number of steps). bn, the pbn variants and gn run on 8 CPU
contexts of one process; syncbn runs one process per device (8 KVStore dist_sync workers over ps-lite on
127.0.0.1): on 8 contexts of one process it needs MXNet's 16384 temp-space copies, with which
DeepLab's memory grows by about 1.2 GB a step (docs/limitations.md), and with fewer it
deadlocks. KVStore, not Horovod: on 2 cores its 2 exchanges per layer and step cost less
(DeepLab, 1 image per device: 1.35 s a step against Horovod over Gloo's 3.3, bn 0.88).

Resumable: each run lives in RUNS/<norm>_ipd<i>_seed<s>/; a killed study started again skips
finished trainings and evaluations and continues an unfinished training with train.py --resume.
Results: OUT/study.json (every run: train loss curve, val mIoU at every epoch that ends at the
same step for every batch size, wall times, the git commit), OUT/study.png and the table. Runs
made by different commits are not put in one table unless --allow-mixed-commits.
"""
import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _whole_run(steps):
    return 'pbn_steps=%d' % steps


def _growing_groups(steps):
    return 'pbn_group_size={0: 2, %d: 4, %d: 8}' % (steps // 3, 2 * steps // 3)


#: Every norm of the study: (config under configs/, overrides of that config; a callable
#: override gets the run's number of steps). The pbn-* rows are the paper's algorithm
#: (configs/study_pbn.yaml: linear ramp of the local weight w from 1, no averaging of the
#: exchanged moments, local backward) read the ways docs/pbn-spec.md ("What the paper's
#: references imply") weighs: w_end 1/2, 1/4 or 1/G = 1/8, reached after 50 steps (r50) or at
#: the end of the run (rall); groups growing 2 -> 4 -> 8 over the run's thirds (w -> 1/G);
#: the exchanged moments averaged over steps (global_momentum 0.8, a stochastic-approximation
#: estimate). pbn+ is this project's default (averaged moments and progressive backward).
NORMS = {
    'bn': ('study_bn', ()),
    'syncbn': ('study_syncbn', ()),
    'pbn+': ('study_pbnplus', ()),
    'gn': ('study_gn', ()),
    'pbn-w1/8-r50': ('study_pbn', ()),
    'pbn-w1/4-r50': ('study_pbn', ('pbn_final=0.25',)),
    'pbn-w1/2-r50': ('study_pbn', ('pbn_final=0.5',)),
    'pbn-w1/8-rall': ('study_pbn', (_whole_run,)),
    'pbn-w1/4-rall': ('study_pbn', ('pbn_final=0.25', _whole_run)),
    'pbn-w1/2-rall': ('study_pbn', ('pbn_final=0.5', _whole_run)),
    'pbn-groups': ('study_pbn', (_growing_groups,)),
    'pbn-avg': ('study_pbn', ('pbn_global_momentum=0.8',)),
}
#: the paper's algorithm in the sensitivity study (one seed, 1 image per device)
PAPER_SETTINGS = [n for n in NORMS if n.startswith('pbn-')]
DEVICES = 8
DATA = {'root': 'data/study_digits', 'num_train': 320, 'num_val': 60, 'size': '64x64',
        'seed': 0}
#: the paper's best reading in the sensitivity study, and the runner-up (docs/results/study/
#: sensitivity, 1 image per device, seed 0: 0.391 and 0.318 mIoU, BN 0.285, SyncBN 0.419):
#: both run at 1 and 2 images per device in the long study, the first in the full one
PAPER_BEST = ['pbn-avg', 'pbn-w1/2-rall']
PRESETS = {
    'quick': {'norms': ['bn', 'pbn+', 'syncbn'], 'ipds': [1], 'seeds': [0],
              'out': 'docs/results/study/quick'},
    'sensitivity': {'norms': ['bn', 'syncbn'] + PAPER_SETTINGS, 'ipds': [1], 'seeds': [0],
                    'out': 'docs/results/study/sensitivity'},
    'full': {'norms': ['bn', 'syncbn'] + PAPER_BEST[:1] + ['pbn+'], 'ipds': [1, 2],
             'seeds': [0, 1], 'out': 'docs/results/study'},
    'long': {'norms': ['bn', 'syncbn'] + PAPER_BEST + ['pbn+'], 'ipds': [1, 2],
             'seeds': [0, 1, 2], 'out': 'docs/results/study/long'},
}
#: SyncBN's gain over BN (mIoU) below which the table gives no gain shares
MIN_SYNC_GAIN = 0.02


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--preset', choices=sorted(PRESETS), default='full',
                        help='norms, images per device, seeds and output of a study '
                        '(quick, sensitivity, full, long: see PRESETS)')
    parser.add_argument('--quick', action='store_const', dest='preset', const='quick',
                        help='the same as --preset quick')
    parser.add_argument('--norms', nargs='+', choices=list(NORMS))
    parser.add_argument('--ipds', nargs='+', type=int, help='images per device')
    parser.add_argument('--seeds', nargs='+', type=int)
    parser.add_argument('--runs', default='runs/study', help='run directories')
    parser.add_argument('--out', help="study.json and study.png (default: the preset's)")
    parser.add_argument('--report', action='store_true',
                        help='no training: table, JSON and plot of the finished runs')
    parser.add_argument('--allow-mixed-commits', action='store_true',
                        help='put runs made by different commits in one table')
    parser.add_argument('--stall-timeout', type=float, default=1200,
                        help='stop a training that logs no step for this many seconds')
    parser.add_argument('--set', nargs='+', default=[], metavar='KEY=VALUE',
                        help='config overrides for every run (e.g. epochs=1 for a smoke test)')
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    args.norms = args.norms or preset['norms']
    args.ipds = args.ipds or preset['ipds']
    args.seeds = args.seeds if args.seeds is not None else preset['seeds']
    args.out = args.out or preset['out']
    return args


#: what a study writes in the checkout: no part of the code that makes its runs
RESULTS = 'docs/results'


def git_commit(root=ROOT):
    """HEAD's hash, with '+dirty' when tracked files outside RESULTS differ from it (the
    study's own results, e.g. a quick study's table, do not change what the runs ran)."""
    def git(*cmd):
        return subprocess.run(('git',) + cmd, cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        head = git('rev-parse', 'HEAD')
        dirty = git('status', '--porcelain', '--untracked-files=no', '--', '.',
                    ':(exclude)%s' % RESULTS)
    except (OSError, subprocess.CalledProcessError):
        return 'unknown'
    return head + ('+dirty' if dirty else '')


class MixedCommits(Exception):
    pass


def check_commits(records, allow_mixed=False):
    """The one commit of `records`; MixedCommits when they come from several (unless allowed,
    then the sorted list joined by ', ')."""
    commits = sorted({r['commit'] for r in records})
    if len(commits) > 1 and not allow_mixed:
        raise MixedCommits(
            'runs made by different commits (%s) would go into one table: %s. Rerun them '
            '(remove their run directories) or pass --allow-mixed-commits' % (
                ', '.join(commits), '; '.join('%s_ipd%d_seed%d: %s' % (
                    r['norm'], r['images_per_device'], r['seed'], r['commit'][:12])
                    for r in records)))
    return ', '.join(commits) if commits else None


# ---------------------------------------------------------------------------------- runs

class Run:
    """One (norm, images per device, seed): its config, overrides, commands and files."""

    def __init__(self, norm, ipd, seed, runs_dir, extra_set=()):
        self.norm, self.ipd, self.seed = norm, ipd, seed
        self.name = '%s_ipd%d_seed%d' % (norm.replace('+', 'plus').replace('/', 'of'), ipd,
                                         seed)
        self.dir = os.path.join(runs_dir, self.name)
        config, norm_set = NORMS[norm]
        self.config = os.path.join('configs', config + '.yaml')
        self.backend = 'kvstore' if norm == 'syncbn' else 'local'
        import yaml
        with open(os.path.join(ROOT, self.config)) as f:
            cfg = yaml.safe_load(f)
        for item in extra_set:
            key, _, value = item.partition('=')
            cfg[key] = yaml.safe_load(value)
        self.base_epochs = int(cfg['epochs'])
        self.epochs = self.base_epochs * ipd     # the same number of steps at every ipd
        self.steps_per_epoch = (cfg.get('overfit_batches') or
                                DATA['num_train'] // (DEVICES * ipd))
        self.steps = self.epochs * self.steps_per_epoch
        self.norm_set = [o(self.steps) if callable(o) else o for o in norm_set]
        overrides = self.norm_set + list(extra_set) + [
            'batch_size=%d' % ipd, 'seed=%d' % seed, 'epochs=%d' % self.epochs,
            'run_dir=%s' % self.dir, 'data_root=%s' % DATA['root']]
        self.train_set = overrides + (['backend=kvstore', 'devices=1']
                                      if self.backend == 'kvstore' else
                                      ['backend=local', 'devices=%d' % DEVICES])
        self.eval_set = overrides + ['backend=local', 'devices=1']

    def eval_epochs(self):
        """Checkpoints evaluated: the ends of the base epochs (the same steps for every ipd)."""
        return [k * self.ipd for k in range(1, self.base_epochs + 1)]

    def trained_epochs(self):
        pointer = os.path.join(self.dir, 'checkpoint.json')
        if not os.path.isfile(pointer):
            return 0
        with open(pointer) as f:
            return json.load(f)['epoch']

    def checkpoint_dir(self, epoch):
        return os.path.join(self.dir, 'checkpoints', 'epoch_%04d' % epoch)

    def eval_dir(self, epoch):
        return os.path.join(self.dir, 'eval_epoch_%04d' % epoch)

    def train_command(self, resume):
        cmd = [sys.executable, os.path.join('scripts', 'train.py'), '--config', self.config,
               '--set'] + self.train_set + (['--resume'] if resume else [])
        from pbn_gluon import jobs
        return jobs.launch_command(self.backend, DEVICES, cmd)

    def eval_command(self, epoch):
        return [sys.executable, os.path.join('scripts', 'eval.py'), '--config', self.config,
                '--set'] + self.eval_set + [
            '--checkpoint', self.checkpoint_dir(epoch),
            '--save-dir', os.path.join(self.eval_dir(epoch), 'pred'),
            '--out', self.eval_dir(epoch)]

    def state_path(self):
        return os.path.join(self.dir, 'study_run.json')

    def load_state(self):
        if os.path.isfile(self.state_path()):
            with open(self.state_path()) as f:
                return json.load(f)
        return None

    def save_state(self, state):
        from pbn_gluon.files import write_json
        os.makedirs(self.dir, exist_ok=True)
        write_json(self.state_path(), state)


def environment(run):
    """Every run draws its initial weights with the same MXNet random-generator copies (the 8
    contexts' setting, whatever the backend), so every norm of a seed starts from the same
    weights; syncbn's 8 processes share 2 cores, one thread each."""
    from pbn_gluon.rendezvous import cpu_resource_env
    env = dict(os.environ)
    env['MXNET_CPU_PARALLEL_RAND_COPY'] = cpu_resource_env(DEVICES)['MXNET_CPU_PARALLEL_RAND_COPY']
    env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
    env['PYTHONUNBUFFERED'] = '1'
    if run.backend == 'kvstore':
        env['OMP_NUM_THREADS'] = '1'
    return env


def read_metrics(run):
    path = os.path.join(run.dir, 'metrics.jsonl')
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def last_iteration(run):
    rows = read_metrics(run)
    return rows[-1]['iter'] if rows else 0


def train(run, bar, stall_timeout):
    """train.py for `run` (resumed if it has a checkpoint) with the study bar following its
    metrics.jsonl; returns the wall time. Its output goes to RUN/train.log."""
    resume = run.trained_epochs() > 0
    done = last_iteration(run)
    bar.update(max(0, done - bar.n_run))
    bar.n_run = done
    os.makedirs(run.dir, exist_ok=True)
    tic = time.time()
    with open(os.path.join(run.dir, 'train.log'), 'a') as log:
        log.write('\n$ %s\n' % ' '.join(run.train_command(resume)))
        log.flush()
        proc = subprocess.Popen(run.train_command(resume), cwd=ROOT, env=environment(run),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        last_change = time.time()
        try:
            while proc.poll() is None:
                time.sleep(2)
                it = last_iteration(run)
                if it > bar.n_run:
                    bar.update(it - bar.n_run)
                    bar.n_run, last_change = it, time.time()
                elif time.time() - last_change > stall_timeout:
                    os.killpg(proc.pid, 15)
                    proc.wait()
                    raise RuntimeError('%s: no step for %.0f s; stopped (see %s)' % (
                        run.name, stall_timeout, os.path.join(run.dir, 'train.log')))
        except BaseException:
            if proc.poll() is None:
                os.killpg(proc.pid, 15)
                proc.wait()
            raise
    if proc.returncode != 0:
        raise RuntimeError('%s: train.py exited with %s (see %s)' % (
            run.name, proc.returncode, os.path.join(run.dir, 'train.log')))
    it = last_iteration(run)
    bar.update(max(0, it - bar.n_run))
    bar.n_run = it
    return time.time() - tic


def evaluate(run, epoch):
    """eval.py on the checkpoint of `epoch` (official evaluation); its metrics.json."""
    log_path = os.path.join(run.dir, 'eval.log')
    with open(log_path, 'a') as log:
        log.write('\n$ %s\n' % ' '.join(run.eval_command(epoch)))
        log.flush()
        result = subprocess.run(run.eval_command(epoch), cwd=ROOT, env=environment(run),
                                stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise RuntimeError('%s: eval.py exited with %s (see %s)'
                           % (run.name, result.returncode, log_path))
    with open(os.path.join(run.eval_dir(epoch), 'metrics.json')) as f:
        return json.load(f)


def record(run, state):
    """The run's result record (for study.json) from its files."""
    metrics = read_metrics(run)
    step_s = ([m['step_s'] for m in metrics if m['iter'] > max(5, run.steps // 10)] or
              [m['step_s'] for m in metrics])      # warm steps (all in a very short run)
    curve = []
    for epoch in run.eval_epochs():
        path = os.path.join(run.eval_dir(epoch), 'metrics.json')
        if os.path.isfile(path):
            with open(path) as f:
                m = json.load(f)
            curve.append({'epoch': epoch, 'iter': epoch * run.steps_per_epoch,
                          'miou': m['mIoU'], 'miou_official': m.get('mIoU_official'),
                          'miou_gluoncv': m['mIoU_gluoncv'], 'pix_acc': m['pixAcc']})
    finished = len(curve) == len(run.eval_epochs())
    return {'norm': run.norm, 'images_per_device': run.ipd, 'seed': run.seed,
            'devices': DEVICES, 'backend': run.backend, 'config': run.config,
            'overrides': run.train_set, 'steps': run.steps, 'epochs': run.epochs,
            'status': 'ok' if finished else 'unfinished', 'commit': state['commit'],
            'miou': curve[-1]['miou'] if finished else None,
            'step_s': float(np.median(step_s)) if step_s else None,
            'train_wall_s': state.get('train_wall_s'), 'eval_wall_s': state.get('eval_wall_s'),
            'loss_curve': [[m['iter'], m['loss']] for m in metrics], 'val_curve': curve}


def run_one(run, bar, args, commit):
    """Train (or resume), then evaluate every point not yet evaluated; the run's record."""
    state = run.load_state()
    if state is not None and state['commit'] != commit and not args.allow_mixed_commits:
        raise MixedCommits('%s was started by commit %s, this is %s: remove %s to rerun it, '
                           'or pass --allow-mixed-commits' % (run.name, state['commit'], commit,
                                                              run.dir))
    if state is None:
        state = {'commit': commit, 'train_wall_s': 0.0, 'eval_wall_s': 0.0}
        run.save_state(state)
    bar.set_description(run.name)
    bar.n_run = 0
    if run.trained_epochs() < run.epochs:
        state['train_wall_s'] += train(run, bar, args.stall_timeout)
        run.save_state(state)
    else:
        bar.update(run.steps)
    for epoch in run.eval_epochs():
        if os.path.isfile(os.path.join(run.eval_dir(epoch), 'metrics.json')):
            continue
        tic = time.time()
        evaluate(run, epoch)
        state['eval_wall_s'] += time.time() - tic
        run.save_state(state)
    for epoch in range(1, run.epochs):     # evaluated: only the last checkpoint stays
        if os.path.isdir(run.checkpoint_dir(epoch)):
            import shutil
            shutil.rmtree(run.checkpoint_dir(epoch), ignore_errors=True)
    return record(run, state)


# ---------------------------------------------------------------------------------- report

#: a row of the study's table: mean and std of val mIoU over seeds; its difference to BN's mean
#: (absolute, and relative to BN as the paper reports its +18.4%); its share of SyncBN's gain
#: over BN; the median step time and its ratio to BN's
Row = collections.namedtuple('Row', 'norm backend ipd mean std delta relative gain step '
                                    'step_vs_bn runs')


def summarize(records, norms, ipds):
    """Rows of the table. The gain share, (mIoU - BN) / (SyncBN - BN), is NaN (n/a) where
    SyncBN's mean gain over BN is below MIN_SYNC_GAIN: a share of a gain within the seed spread
    says nothing."""
    rows = []
    for ipd in ipds:
        ok = [r for r in records if r['images_per_device'] == ipd and r['status'] == 'ok']
        mean_of = lambda n: (np.mean([r['miou'] for r in ok if r['norm'] == n])
                             if any(r['norm'] == n for r in ok) else float('nan'))
        bn, sync = mean_of('bn'), mean_of('syncbn')
        bn_steps = [r['step_s'] for r in ok if r['norm'] == 'bn']
        bn_step = float(np.median(bn_steps)) if bn_steps else float('nan')
        for norm in norms:
            rs = [r for r in ok if r['norm'] == norm]
            if not rs:
                continue
            miou = np.array([r['miou'] for r in rs])
            step = float(np.median([r['step_s'] for r in rs]))
            gain = ((miou.mean() - bn) / (sync - bn) if sync - bn >= MIN_SYNC_GAIN
                    else float('nan'))
            rows.append(Row(norm, rs[0]['backend'], ipd, float(miou.mean()), float(miou.std()),
                            float(miou.mean() - bn), float((miou.mean() - bn) / bn),
                            float(gain), step, step / bn_step, len(rs)))
    return rows


def format_table(rows):
    percent = lambda v: '%+.1f%%' % (100 * v) if np.isfinite(v) else 'n/a'
    head = '%-14s %3s %8s  %-17s %7s %7s %6s %9s %7s %4s' % (
        'norm', 'ipd', 'backend', 'val mIoU', 'vs bn', 'vs bn', 'gain', 'step [ms]',
        'step/bn', 'runs')
    lines = [head, '-' * len(head)]
    for r in rows:
        lines.append('%-14s %3d %8s  %-17s %7s %7s %6s %9.1f %7s %4d' % (
            r.norm, r.ipd, r.backend, '%.4f +- %.4f' % (r.mean, r.std),
            '%+.3f' % r.delta if np.isfinite(r.delta) else 'n/a', percent(r.relative),
            '%.0f%%' % (100 * r.gain) if np.isfinite(r.gain) else 'n/a', 1000 * r.step,
            '%.2fx' % r.step_vs_bn if np.isfinite(r.step_vs_bn) else 'n/a', r.runs))
    return '\n'.join(lines)


def _val_curve(runs):
    """The iterations of the val points and the runs' val mIoU at each."""
    return ([p['iter'] for p in runs[0]['val_curve']],
            np.array([[p['miou'] for p in r['val_curve']] for r in runs]))


def plot(records, norms, ipds, path):
    from pbn_gluon.plots import plot_curves
    plot_curves(records, norms, ipds, path, _val_curve,
                title=lambda ipd, runs: 'DeepLabV3-ResNet18, %d device(s) x %d image(s)' % (
                    DEVICES, ipd),
                xlabel='iteration', ylabel='val mIoU (official, running stats)',
                label=lambda norm, runs: '%s (%d seed%s)' % (
                    norm, len(runs), 's' if len(runs) > 1 else ''))


def report(records, args, commit, wall_s):
    """study.json, study.png and the table (returned)."""
    finished = [r for r in records if r['status'] == 'ok']
    commits = check_commits(finished, args.allow_mixed_commits)
    rows = summarize(finished, args.norms, args.ipds)
    table = format_table(rows)
    os.makedirs(args.out, exist_ok=True)
    study = {'commit': commits or commit, 'preset': args.preset,
             'norms': args.norms, 'images_per_device': args.ipds, 'seeds': args.seeds,
             'devices': DEVICES, 'data': DATA, 'overrides': args.set,
             'wall_s': wall_s, 'train_wall_s': sum(r['train_wall_s'] or 0 for r in records),
             'eval_wall_s': sum(r['eval_wall_s'] or 0 for r in records),
             'table': [row._asdict() for row in rows],
             'runs': records}
    from pbn_gluon.files import write_json
    write_json(os.path.join(args.out, 'study.json'), study)
    if finished:
        plot(finished, args.norms, args.ipds, os.path.join(args.out, 'study.png'))
    return table


def previous_wall(out):
    """The wall time recorded by the study that trained the runs (--report keeps it)."""
    try:
        with open(os.path.join(out, 'study.json')) as f:
            return json.load(f).get('wall_s')
    except (OSError, ValueError):
        return None


def ensure_data():
    root = os.path.join(ROOT, DATA['root'])
    if os.path.isdir(root):
        return
    subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'make_fake_cityscapes.py'),
                    '--kind', 'digits', '--out', root, '--num-train', str(DATA['num_train']),
                    '--num-val', str(DATA['num_val']), '--size', DATA['size'],
                    '--seed', str(DATA['seed'])], check=True)


def main(argv=None):
    args = parse_args(argv)
    # killed (SIGTERM) like interrupted: the running training is stopped with the study
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.chdir(ROOT)
    sys.path.insert(0, ROOT)
    commit = git_commit()
    runs = [Run(norm, ipd, seed, args.runs, args.set)
            for seed in args.seeds for ipd in args.ipds for norm in args.norms]
    tic = time.time()
    try:
        if args.report:
            records = [record(r, r.load_state()) for r in runs if r.load_state() is not None]
        else:
            ensure_data()
            from tqdm import tqdm
            bar = tqdm(total=sum(r.steps for r in runs), unit='step', dynamic_ncols=True)
            records = []
            with bar:
                for run in runs:
                    records.append(run_one(run, bar, args, commit))
        wall = previous_wall(args.out) if args.report else round(time.time() - tic, 1)
        table = report(records, args, commit, wall)
    except (MixedCommits, RuntimeError) as err:
        sys.exit('%s: %s' % (os.path.basename(sys.argv[0]), err))
    print(table)
    print('wrote %s and %s' % (os.path.join(args.out, 'study.json'),
                               os.path.join(args.out, 'study.png')))
    print('study wall %.1f s' % (time.time() - tic))


if __name__ == '__main__':
    main()
