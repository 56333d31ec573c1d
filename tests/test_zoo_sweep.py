"""scripts/zoo_sweep.py's logic on 3 small GluonCV models (the full sweep is long and not part
of the test suite; its table is docs/results/zoo_sweep.md)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'scripts', 'zoo_sweep.py')
sys.path.insert(0, os.path.join(ROOT, 'scripts'))

import zoo_sweep  # noqa: E402

MODELS = ['resnet18_v1b', 'mobilenet0.25', 'fastscnn_citys']


def run_sweep(tmp_path, *args, env=None):
    out = tmp_path / 'sweep.json'
    full_env = dict(os.environ, **(env or {}))
    full_env['PYTHONPATH'] = ROOT + os.pathsep + full_env.get('PYTHONPATH', '')
    proc = subprocess.run([sys.executable, SCRIPT, '--json', str(out), *args],
                          capture_output=True, text=True, timeout=1500, env=full_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out) as f:
        return json.load(f)['models'], (tmp_path / 'sweep.md').read_text(), proc


@pytest.mark.slow
@pytest.mark.timeout(1600)
def test_sweep_runs_three_small_models_with_bn_pbn_and_convert_norm(tmp_path):
    results, table, _ = run_sweep(tmp_path, '--models', *MODELS, '--timeout', '600')
    assert sorted(results) == sorted(MODELS)
    for name in MODELS:
        row = results[name]
        for variant in ('bn', 'pbn', 'convert'):
            assert row[variant]['status'] == 'ok', (name, variant, row[variant])
        assert zoo_sweep.classify(row) == 'ok'
        assert '| %s |' % name in table
    assert results['fastscnn_citys']['family'] == 'segmentation'
    assert results['fastscnn_citys']['shape'] == [2, 3, 64, 64]
    assert 'Summary: 3 models run: 3 pass all three.' in table
    # resumable: a second run skips what is there
    again, _, proc = run_sweep(tmp_path, '--models', *MODELS, '--timeout', '600')
    assert again == results


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_crash_is_one_row_and_the_other_variants_still_run(tmp_path):
    results, table, _ = run_sweep(tmp_path, '--models', 'mobilenet0.25', 'no_such_model',
                                  '--timeout', '300', env={'ZOO_SWEEP_ABORT_IN': 'pbn'})
    row = results['mobilenet0.25']
    assert row['bn']['status'] == 'ok' and row['convert']['status'] == 'ok'
    assert row['pbn']['status'] == 'crash' and 'exit' in row['pbn']['reason']
    assert zoo_sweep.classify(row) == 'ours'
    bad = results['no_such_model']
    assert all(bad[v]['status'] == 'fail' for v in ('bn', 'pbn', 'convert'))
    assert zoo_sweep.classify(bad) == 'model'
    assert '| mobilenet0.25 |' in table and '| no_such_model |' in table


def test_classify_names_whose_failure_it_is():
    ok, fail = {'status': 'ok'}, {'status': 'fail'}
    assert zoo_sweep.classify({'bn': ok, 'pbn': ok, 'convert': ok}) == 'ok'
    assert zoo_sweep.classify({'bn': fail, 'pbn': fail, 'convert': fail}) == 'model'
    assert zoo_sweep.classify({'bn': ok, 'pbn': ok, 'convert': fail}) == 'ours'
    assert zoo_sweep.classify({'bn': ok, 'pbn': {'status': 'timeout'},
                               'convert': ok}) == 'timeout'
    # failing in MXNet's oneDNN backend with BatchNorm too, all fine without it
    assert zoo_sweep.classify({'bn': fail, 'pbn': fail, 'convert': ok,
                               'without_mkldnn': {'bn': ok, 'pbn': ok, 'convert': ok}}) == 'mkldnn'
    assert zoo_sweep.classify({'bn': fail, 'pbn': fail, 'convert': fail,
                               'without_mkldnn': {'bn': ok, 'pbn': fail,
                                                  'convert': ok}}) == 'ours'
    no_layer = {'status': 'fail', 'reason': 'ValueError: StatsSync: SSD has no '
                'ProgressiveBatchNorm or SyncBatchNorm layer in training mode'}
    assert zoo_sweep.classify({'bn': ok, 'pbn': no_layer, 'convert': no_layer}) == 'no-layer'


def test_reason_is_the_useful_line_of_an_mxnet_error():
    text = ('MXNetError: Traceback (most recent call last):\n  File "../src/x.h", line 264\n'
            'MXNetError: only implemented in GPU')
    assert zoo_sweep._reason(text) == 'MXNetError: only implemented in GPU'
    assert zoo_sweep._reason(ValueError('bad value\nmore')) == 'ValueError: bad value'


def test_rewriting_the_table_keeps_its_hand_written_section(tmp_path):
    """write_markdown keeps the section from zoo_sweep.NOTES to the table of an existing file
    word for word, and writes every model's row after it."""
    with open(os.path.join(ROOT, 'docs', 'results', 'zoo_sweep.json')) as f:
        models = dict(list(json.load(f)['models'].items())[:2])
    md = tmp_path / 'sweep.md'
    notes = zoo_sweep.NOTES + '\n\nWhy a row fails.\n- SSD: its backbone is a SymbolBlock.'
    md.write_text('# old\n\n' + notes + '\n\n| model | old table |\n')
    zoo_sweep.write_markdown(models, str(md))
    text = md.read_text()
    assert text.count(notes + '\n\n| model | family |') == 1
    assert all('| %s |' % name in text.split(notes)[1] for name in models)
    zoo_sweep.write_markdown(models, str(tmp_path / 'new.md'))      # no file yet: no section
    assert zoo_sweep.NOTES not in (tmp_path / 'new.md').read_text()
