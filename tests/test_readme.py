"""The README's training example runs as written (in a fresh process with MXNet's default
environment, as a user would)."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(300)
def test_readme_example_trains(tmp_path):
    with open(os.path.join(ROOT, 'README.md')) as f:
        blocks = re.findall(r'```python\n(# README example.*?)```', f.read(), re.S)
    assert len(blocks) == 1
    script = tmp_path / 'example.py'
    script.write_text(blocks[0])
    env = {k: v for k, v in os.environ.items() if not k.startswith('MXNET_')}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            timeout=280, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    loss = float(re.search(r'loss after 3 steps: (\S+)', result.stdout).group(1))
    assert 0 < loss < 10     # finite cross-entropy of 10 classes
