"""scripts/study.py (issue 16): the runner refuses to put runs of different commits in one
table; the study's config trains DeepLabV3-ResNet18 on the digits scenes (2 devices, a few
iterations) and evaluates it with the official Cityscapes evaluation."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDY = os.path.join(REPO, 'scripts', 'study.py')


def load_study():
    spec = importlib.util.spec_from_file_location('study', STUDY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_finished_run(study, runs_dir, norm, commit, miou):
    """A run directory as study.py leaves a finished run (no training: files only)."""
    run = study.Run(norm, 1, 0, str(runs_dir), ['epochs=1', 'overfit_batches=2'])
    run.save_state({'commit': commit, 'train_wall_s': 1.0, 'eval_wall_s': 1.0})
    with open(os.path.join(run.dir, 'metrics.jsonl'), 'w') as f:
        for it in (1, 2):
            f.write(json.dumps({'epoch': 0, 'iter': it, 'loss': 1.0 / it, 'lr': 0.01,
                                'step_s': 0.5}) + '\n')
    os.makedirs(run.eval_dir(1))
    with open(os.path.join(run.eval_dir(1), 'metrics.json'), 'w') as f:
        json.dump({'mIoU': miou, 'mIoU_official': miou, 'mIoU_gluoncv': miou,
                   'pixAcc': 0.9}, f)
    return run


def report(runs_dir, out, *extra):
    return subprocess.run([sys.executable, STUDY, '--report', '--quick', '--norms', 'bn',
                           'syncbn', '--runs', str(runs_dir), '--out', str(out),
                           '--set', 'epochs=1', 'overfit_batches=2'] + list(extra),
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def test_runner_refuses_to_mix_commits(tmp_path):
    study = load_study()
    runs_dir, out = tmp_path / 'runs', tmp_path / 'out'
    fake_finished_run(study, runs_dir, 'bn', 'a' * 40, 0.3)
    fake_finished_run(study, runs_dir, 'syncbn', 'b' * 40, 0.6)
    with pytest.raises(study.MixedCommits, match='different commits'):
        study.check_commits([{'commit': 'a', 'norm': 'bn', 'images_per_device': 1, 'seed': 0},
                             {'commit': 'b', 'norm': 'bn', 'images_per_device': 1, 'seed': 1}])

    refused = report(runs_dir, out)
    assert refused.returncode != 0
    assert 'different commits' in refused.stderr and 'allow-mixed-commits' in refused.stderr
    assert not (out / 'study.json').exists()

    allowed = report(runs_dir, out, '--allow-mixed-commits')
    assert allowed.returncode == 0, allowed.stderr
    assert 'syncbn' in allowed.stdout and '100%' in allowed.stdout    # syncbn's own gain
    with open(out / 'study.json') as f:
        saved = json.load(f)
    assert {r['commit'] for r in saved['runs']} == {'a' * 40, 'b' * 40}


def test_a_started_run_of_another_commit_is_not_continued(tmp_path):
    study = load_study()
    run = fake_finished_run(study, tmp_path / 'runs', 'bn', 'c' * 40, 0.3)
    args = study.parse_args(['--quick', '--runs', str(tmp_path / 'runs')])
    with pytest.raises(study.MixedCommits, match='was started by commit'):
        study.run_one(run, None, args, 'd' * 40)


def test_table_gain_share_and_step_ratio():
    study = load_study()
    records = [{'norm': n, 'images_per_device': 1, 'seed': s, 'status': 'ok', 'miou': m,
                'step_s': t, 'backend': 'local', 'commit': 'x'}
               for n, s, m, t in [('bn', 0, 0.30, 1.0), ('bn', 1, 0.40, 1.0),
                                  ('syncbn', 0, 0.65, 3.0), ('syncbn', 1, 0.75, 3.0),
                                  ('pbn+', 0, 0.60, 1.1), ('pbn+', 1, 0.60, 1.1)]]
    rows = {r.norm: r for r in study.summarize(records, ['bn', 'syncbn', 'pbn+'], [1])}
    assert rows['pbn+'].mean == pytest.approx(0.60) and rows['bn'].std == pytest.approx(0.05)
    assert rows['pbn+'].gain == pytest.approx((0.60 - 0.35) / (0.70 - 0.35))
    # the paper's measure: the improvement over BN, absolute and relative to BN's mIoU
    assert rows['pbn+'].delta == pytest.approx(0.25)
    assert rows['pbn+'].relative == pytest.approx(0.25 / 0.35)
    assert rows['bn'].delta == 0 and rows['bn'].relative == 0
    assert rows['syncbn'].step_vs_bn == pytest.approx(3.0)
    assert rows['pbn+'].step_vs_bn == pytest.approx(1.1)
    table = study.format_table(list(rows.values()))
    assert '+0.250' in table and '+71.4%' in table and '+0.350' in table and '+100.0%' in table



def test_no_gain_share_where_syncbn_does_not_beat_bn():
    """SyncBN 0.01 above BN (under MIN_SYNC_GAIN): shares of that gain are n/a, not +-1000%."""
    study = load_study()
    records = [{'norm': n, 'images_per_device': 2, 'seed': 0, 'status': 'ok', 'miou': m,
                'step_s': 1.0, 'backend': 'local', 'commit': 'x'}
               for n, m in [('bn', 0.37), ('syncbn', 0.38), ('pbn+', 0.40)]]
    rows = study.summarize(records, ['bn', 'syncbn', 'pbn+'], [2])
    assert all(np.isnan(r.gain) for r in rows)
    table = study.format_table(rows)
    gain_column = [line.split()[8] for line in table.splitlines()[2:]]
    assert gain_column == ['n/a'] * 3, table

def test_paper_settings_are_the_configs_they_name(tmp_path):
    """Each pbn-* norm of the sensitivity study loads (train.py's own config check) as the
    setting its name says: w_end, ramp length (50 steps or the whole run), growing groups,
    averaged moments; everything else is configs/study_pbn.yaml's paper algorithm."""
    from pbn_gluon.segmentation.config import load_config
    study = load_study()
    expected = {  # name: (w_end, ramp steps, group size, global momentum); None: 1/G, all
        'pbn-w1/8-r50': (None, 50, None, 0.0), 'pbn-w1/4-r50': (0.25, 50, None, 0.0),
        'pbn-w1/2-r50': (0.5, 50, None, 0.0), 'pbn-w1/8-rall': (None, 160, None, 0.0),
        'pbn-w1/4-rall': (0.25, 160, None, 0.0), 'pbn-w1/2-rall': (0.5, 160, None, 0.0),
        'pbn-groups': (None, 50, {0: 2, 53: 4, 106: 8}, 0.0),
        'pbn-avg': (None, 50, None, 0.8)}
    assert sorted(study.PAPER_SETTINGS) == sorted(expected)
    assert set(study.PAPER_BEST) <= set(study.PAPER_SETTINGS)
    for ipd in (1, 2):
        for norm, (final, steps, groups, momentum) in expected.items():
            run = study.Run(norm, ipd, 0, str(tmp_path), ['lr=0.02'])
            assert run.steps == 160
            cfg = load_config(os.path.join(REPO, run.config), run.train_set)
            got = (cfg.pbn_final, cfg.pbn_steps, cfg.pbn_group_size, cfg.pbn_global_momentum)
            assert got == (final, steps, groups, momentum), norm
            assert (cfg.norm, cfg.pbn_local_weight, cfg.pbn_backward) == ('pbn', 'linear', 'local')
            assert cfg.lr == 0.02 and cfg.batch_size == ipd and cfg.epochs == 4 * ipd
            assert '/' not in os.path.basename(run.dir)


def test_an_unknown_norm_is_refused():
    study = load_study()
    with pytest.raises(SystemExit):
        study.parse_args(['--norms', 'pbn-w1/3-r50'])
    args = study.parse_args(['--preset', 'sensitivity'])
    assert args.ipds == [1] and args.seeds == [0] and 'pbn-avg' in args.norms
    assert study.parse_args(['--quick']).out == 'docs/results/study/quick'


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_study_config_learns_on_two_devices_and_evaluates_officially(tmp_path):
    """configs/study_pbnplus.yaml (DeepLabV3-ResNet18, pbn+) on 2 devices of one process,
    a repeated pair of batches: the loss goes down, and eval.py reports the official mIoU."""
    root, run_dir = tmp_path / 'digits', tmp_path / 'run'
    subprocess.run([sys.executable, os.path.join(REPO, 'scripts', 'make_fake_cityscapes.py'),
                    '--kind', 'digits', '--out', str(root), '--num-train', '8',
                    '--num-val', '4', '--size', '64x64'], check=True, cwd=REPO)
    config = os.path.join(REPO, 'configs', 'study_pbnplus.yaml')
    settings = ['data_root=%s' % root, 'run_dir=%s' % run_dir, 'devices=2',
                'overfit_batches=2', 'epochs=4', 'pbn_steps=4', 'log_interval=1']
    env = dict(os.environ, PYTHONPATH=REPO)
    train = subprocess.run([sys.executable, os.path.join(REPO, 'scripts', 'train.py'),
                            '--config', config, '--set'] + settings,
                           cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    with open(run_dir / 'metrics.jsonl') as f:
        losses = [json.loads(line)['loss'] for line in f]
    assert len(losses) == 8 and np.all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < 0.8 * np.mean(losses[:2]), losses
    # keep_checkpoints: every epoch's checkpoint is there for the study's val curve
    assert sorted(os.listdir(run_dir / 'checkpoints')) == ['epoch_%04d' % e for e in (1, 2, 3, 4)]

    evaluate = subprocess.run([sys.executable, os.path.join(REPO, 'scripts', 'eval.py'),
                               '--config', config, '--set'] + settings + [
                                   '--checkpoint', str(run_dir / 'checkpoints' / 'epoch_0004'),
                                   '--save-dir', str(tmp_path / 'pred'),
                                   '--out', str(tmp_path / 'eval')],
                              cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert evaluate.returncode == 0, evaluate.stdout[-3000:] + evaluate.stderr[-3000:]
    with open(tmp_path / 'eval' / 'metrics.json') as f:
        metrics = json.load(f)
    assert metrics['images'] == 4
    assert 0 <= metrics['mIoU_official'] <= 1 and metrics['mIoU'] == metrics['mIoU_official']
    assert os.path.isfile(tmp_path / 'eval' / 'cityscapes_official.json')


def test_the_studys_own_results_leave_the_checkout_clean(tmp_path):
    """make study-quick rewrites docs/results/study/quick, then make study must continue its
    runs: a changed result file is not '+dirty'; a changed tracked code file is."""
    study = load_study()
    repo = tmp_path / 'repo'
    (repo / 'docs' / 'results').mkdir(parents=True)
    (repo / 'scripts').mkdir()
    (repo / 'docs' / 'results' / 'study.json').write_text('{}')
    (repo / 'scripts' / 'train.py').write_text('x = 1\n')
    git = lambda *a: subprocess.run(('git', '-c', 'user.name=t', '-c', 'user.email=t@t') + a,
                                    cwd=str(repo), check=True, capture_output=True)
    git('init', '-q')
    git('add', '-A')
    git('commit', '-qm', 'c')
    head = study.git_commit(str(repo))
    assert len(head) == 40
    (repo / 'docs' / 'results' / 'study.json').write_text('{"wall_s": 1}')
    (repo / 'notes.txt').write_text('untracked')
    assert study.git_commit(str(repo)) == head
    (repo / 'scripts' / 'train.py').write_text('x = 2\n')
    assert study.git_commit(str(repo)) == head + '+dirty'
