"""The README's and docs/'s examples run as written (in a fresh process with MXNet's default
environment, as a user would), their relative links reach existing files and headings, and
they state what is true rather than when it changed."""
import glob
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ['README.md'] + sorted(os.path.relpath(p, ROOT) for p in
                               glob.glob(os.path.join(ROOT, 'docs', '**', '*.md'), recursive=True))
EXAMPLE = r'```python\n(# (?:README|docs) example.*?)```'     # a block marked as an example

# Wraps the example's loss: every (logits, labels) it is given, for a numpy reference.
RECORD_LOSS = '''
import mxnet.gluon.loss as _loss
_seen, _forward = [], _loss.SoftmaxCrossEntropyLoss.forward
def _recording(self, pred, label, *args):
    _seen.append((pred.asnumpy(), label.asnumpy()))
    return _forward(self, pred, label, *args)
_loss.SoftmaxCrossEntropyLoss.forward = _recording
'''
NUMPY_LOSS = '''
import numpy as _np
def _cross_entropy(logits, labels):
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - _np.log(_np.exp(shifted).sum(axis=1, keepdims=True))
    return -log_p[_np.arange(len(labels)), labels.astype(int)].mean()
print('calls:', len(_seen))
print('numpy loss of the last step:', _np.mean([_cross_entropy(*s) for s in _seen[-4:]]))
'''


def read(page):
    with open(os.path.join(ROOT, page)) as f:
        return f.read()


def run(script, tmp_path):
    path = tmp_path / 'example.py'
    path.write_text(script)
    env = {k: v for k, v in os.environ.items() if not k.startswith('MXNET_')}
    env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
    result = subprocess.run([sys.executable, str(path)], capture_output=True, text=True,
                            timeout=280, env=env, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.timeout(300)
def test_readme_example_trains(tmp_path):
    """Its printed loss is the mean cross-entropy of the last step's logits on 4 contexts, as
    numpy computes it from the logits the loss was given."""
    blocks = re.findall(r'```python\n(# README example.*?)```', read('README.md'), re.S)
    assert len(blocks) == 1
    out = run(RECORD_LOSS + blocks[0] + NUMPY_LOSS, tmp_path)
    assert 'calls: 12' in out                       # 3 steps x 4 contexts
    loss = float(re.search(r'loss after 3 steps: (\S+)', out).group(1))
    reference = float(re.search(r'numpy loss of the last step: (\S+)', out).group(1))
    assert abs(loss - reference) <= 1e-5 * max(1.0, reference), (loss, reference)


DOCS_EXAMPLES = [(page, block) for page in PAGES if page != 'README.md'
                 for block in re.findall(EXAMPLE, read(page), re.S)]


@pytest.mark.timeout(300)
@pytest.mark.parametrize('page, block', DOCS_EXAMPLES,
                         ids=['%s:%d' % (p, i) for i, (p, _) in enumerate(DOCS_EXAMPLES)])
def test_docs_examples_run(page, block, tmp_path):
    """A ```python block of docs/ that starts with '# docs example' runs as written (run()
    asserts its exit status 0)."""
    assert run(block, tmp_path) is not None


def test_every_python_block_of_docs_is_a_tested_example():
    """docs/ holds no Python a reader would copy that the tests do not run."""
    for page in PAGES[1:]:
        for block in re.findall(r'```python\n(.*?)```', read(page), re.S):
            assert re.match(r'# (?:README|docs) example', block), (page, block[:80])


def github_anchor(heading):
    """The id GitHub gives a markdown heading: lower case, punctuation dropped, spaces -> '-'."""
    return re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')


def anchors(page):
    text = re.sub(r'```.*?```', '', read(page), flags=re.S)
    return {github_anchor(h) for h in re.findall(r'^#+ (.*)$', text, re.M)}


def test_relative_links_reach_existing_files_and_headings():
    """Every relative link or image of README.md and docs/ names a file of the repository,
    and a #fragment names one of that page's headings."""
    checked = 0
    for page in PAGES:
        text = re.sub(r'```.*?```', '', read(page), flags=re.S)
        for target in re.findall(r'\]\(([^)\s]+)\)', text):
            if re.match(r'[a-z]+:', target):             # http:, https:, mailto:
                continue
            path, _, fragment = target.partition('#')
            linked = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path \
                else page
            assert os.path.exists(os.path.join(ROOT, linked)), '%s: %s' % (page, target)
            if fragment:
                assert fragment in anchors(linked), '%s: no heading #%s in %s' % (
                    page, fragment, linked)
            checked += 1
    assert checked >= 20


HISTORY = r'this session|last session|previous session|earlier session|sessions ago|' \
          r'was changed|used to fail|no longer|since this'


def test_pages_say_what_is_true_not_when_it_changed():
    """Dates and commits say when a number was measured; no sentence tells the history."""
    for page in PAGES:
        found = re.findall(r'.*(?:%s).*' % HISTORY, read(page), re.I)
        assert not found, '%s: %s' % (page, found)
