"""How reproducible a study run is (issue 23): the first steps of one study run (DeepLabV3-
ResNet18, 8 CPU devices of one process, seed 0) trained again and again, under the study's own
settings twice and under settings a machine of the same kind may have otherwise: OpenMP threads,
oneDNN held to AVX2 or off. The losses of every step are compared with the first run's, to the bit.

    python scripts/study_repro.py                       # bn and pbn+, 5 steps each
    python scripts/study_repro.py --norms pbn+ --steps 10

Writes OUT/reproducibility.json (every run's losses, its environment, the largest difference to
the reference run) and prints the table. Runs go to RUNS/<norm>_<setting>/ (removed first).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'scripts'))

import study  # noqa: E402  (the study's runs, data and environment)

#: the settings compared: name -> environment changes. 'study' twice: the same command on the
#: same machine; oneDNN held to AVX2 stands for a machine of the same kind whose CPU lacks the
#: AVX-512 kernels oneDNN would pick (oneDNN chooses its kernels by the CPU's instruction set).
SETTINGS = [('study', {}), ('study again', {}), ('OMP_NUM_THREADS=1', {'OMP_NUM_THREADS': '1'}),
            ('oneDNN AVX2 only', {'DNNL_MAX_CPU_ISA': 'AVX2'}),
            ('oneDNN off', {'MXNET_MKLDNN_ENABLED': '0'})]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--norms', nargs='+', default=['bn', 'pbn+'], choices=list(study.NORMS))
    parser.add_argument('--steps', type=int, default=5, help='training steps of each run')
    parser.add_argument('--runs', default='runs/study_repro')
    parser.add_argument('--out', default='docs/results/study')
    return parser.parse_args(argv)


def losses_of(norm, name, env_changes, steps, runs_dir):
    """The loss of every step of a fresh `steps`-step run of `norm` under the changed env."""
    run = study.Run(norm, 1, 0, runs_dir, ['epochs=1', 'overfit_batches=%d' % steps,
                                           'log_interval=1', 'keep_checkpoints=false'])
    run.dir = os.path.join(runs_dir, '%s_%s' % (run.name, name.replace(' ', '_')))
    run.train_set = [s if not s.startswith('run_dir=') else 'run_dir=%s' % run.dir
                     for s in run.train_set]
    shutil.rmtree(run.dir, ignore_errors=True)
    os.makedirs(run.dir)
    env = study.environment(run)
    for key, value in env_changes.items():
        env[key] = value
    with open(os.path.join(run.dir, 'train.log'), 'w') as log:
        done = subprocess.run(run.train_command(resume=False), cwd=ROOT, env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    if done.returncode != 0:
        sys.exit('%s (%s): train.py exited with %d, see %s' % (
            norm, name, done.returncode, os.path.join(run.dir, 'train.log')))
    return [m['loss'] for m in study.read_metrics(run)]


def main(argv=None):
    args = parse_args(argv)
    os.chdir(ROOT)
    study.ensure_data()
    results, lines = [], ['%-6s %-18s %-28s %s' % ('norm', 'setting', 'max |loss - study|',
                                                   'loss at the last step')]
    for norm in args.norms:
        reference = None
        for name, changes in SETTINGS:
            losses = losses_of(norm, name, changes, args.steps, args.runs)
            reference = reference or losses
            diff = max(abs(a - b) for a, b in zip(losses, reference))
            results.append({'norm': norm, 'setting': name, 'env': changes, 'losses': losses,
                            'max_abs_diff': diff, 'bit_equal': losses == reference})
            lines.append('%-6s %-18s %-28s %.9f' % (
                norm, name, 'bit-equal' if losses == reference else '%.3g' % diff, losses[-1]))
    from pbn_gluon.files import write_json
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, 'reproducibility.json'),
               {'commit': study.git_commit(), 'steps': args.steps, 'runs': results})
    print('\n'.join(lines))
    print('wrote %s' % os.path.join(args.out, 'reproducibility.json'))


if __name__ == '__main__':
    main()
