"""Run the Horovod DeepLab training (2 CPU processes, Gloo) again and again, to catch crashes that
happen once in many runs, and keep the evidence of each.

    python scripts/stress_horovod.py --runs 20 --norms pbn,syncbn --json results/stress.json

Every run is scripts/train.py on configs/cpu_fake_<norm>.yaml (one iteration on a fake
Cityscapes made here) under horovodrun, with PYTHONFAULTHANDLER=1 so that a crash prints every
thread's Python stack next to MXNet's native backtrace. A failed run's whole output is kept
in --logs; the table counts runs, failures and crashes (a signal: segmentation fault, abort).
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

from tqdm import tqdm

from pbn_gluon import jobs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CRASH = re.compile(r'Segmentation fault|Fatal Python error|Aborted|core dumped|'
                   r'terminate called|Exit code: (1[3-9][0-9])')


def parse_args():
    parser = argparse.ArgumentParser(description='Repeat a 2-process Horovod DeepLab run.')
    parser.add_argument('--runs', type=int, default=20, help='runs per norm.')
    parser.add_argument('--norms', default='pbn,syncbn', help='comma-separated: pbn, syncbn, bn.')
    parser.add_argument('--iterations', type=int, default=2, help='training iterations per run.')
    parser.add_argument('--timeout', type=float, default=180., help='seconds a run may take.')
    parser.add_argument('--json', default=None, help='write the per-run records here.')
    parser.add_argument('--logs', default='stress_logs', help='folder for failed runs\' output.')
    parser.add_argument('--data-root', default=None,
                        help='a Cityscapes-like folder; default: a fake one made here.')
    return parser.parse_args()


def make_data(root):
    subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'make_fake_cityscapes.py'),
                    '--out', root, '--num-train', '4', '--num-val', '2'], check=True,
                   stdout=subprocess.DEVNULL)
    return root


def one_run(norm, index, args, data_root, work):
    run_dir = os.path.join(work, '%s_%02d' % (norm, index))
    cmd = jobs.horovodrun(2, [
        sys.executable, os.path.join(ROOT, 'scripts', 'train.py'),
        '--config', os.path.join(ROOT, 'configs', 'cpu_fake_%s.yaml' % norm),
        '--set', 'data_root=%s' % data_root, 'run_dir=%s' % run_dir, 'backend=horovod',
        'devices=1', 'overfit_batches=%d' % args.iterations, 'epochs=1'])
    env = jobs.worker_env('horovod', 1, args.timeout)
    env['PYTHONFAULTHANDLER'] = '1'
    result = jobs.run(cmd, env=env, timeout=args.timeout, cwd=ROOT)
    code = result.returncode if result.status != 'timeout' else 'timeout'
    record = {'norm': norm, 'run': index, 'exit': code, 'seconds': round(result.seconds, 1),
              'crash': bool(CRASH.search(result.output))}
    if code != 0:
        os.makedirs(args.logs, exist_ok=True)
        log = os.path.join(args.logs, '%s_%02d.log' % (norm, index))
        with open(log, 'w') as f:
            f.write(' '.join(cmd) + '\n\n' + result.output)
        record['log'] = log
    return record


def main():
    args = parse_args()
    norms = [n for n in args.norms.split(',') if n]
    records = []
    with tempfile.TemporaryDirectory(prefix='pbn_stress_') as work:
        data_root = args.data_root or make_data(os.path.join(work, 'fake_cityscapes'))
        runs = [(norm, i) for norm in norms for i in range(args.runs)]
        bar = tqdm(runs, desc='stress_horovod', unit='run', dynamic_ncols=True)
        for norm, i in bar:
            records.append(one_run(norm, i, args, data_root, work))
            failed = sum(r['exit'] != 0 for r in records)
            bar.set_postfix_str('%s, %d failed' % (norm, failed))
    print('\n%d runs of %d iterations each, 2 Horovod processes (Gloo) per run'
          % (args.runs, args.iterations))
    print('%-7s %5s %7s %7s %9s' % ('norm', 'runs', 'failed', 'crashed', 'median_s'))
    for norm in norms:
        mine = [r for r in records if r['norm'] == norm]
        seconds = sorted(r['seconds'] for r in mine)
        print('%-7s %5d %7d %7d %9.1f' % (norm, len(mine), sum(r['exit'] != 0 for r in mine),
                                        sum(r['crash'] for r in mine),
                                        seconds[len(seconds) // 2]))
    for r in records:
        if r['exit'] != 0:
            print('%s run %d: exit %s, log %s' % (r['norm'], r['run'], r['exit'], r['log']))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(records, f, indent=1)
    sys.exit(1 if any(r['exit'] != 0 for r in records) else 0)


if __name__ == '__main__':
    main()
