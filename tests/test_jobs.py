"""pbn_gluon.jobs.launch_command: the one place that turns a worker command into a job of a
backend (horovodrun, the KVStore launcher, or the command itself)."""
import os
import sys

import pytest

from pbn_gluon import jobs
from pbn_gluon.errors import ConfigError

WORKER = [sys.executable, 'worker.py', '--flag']


def test_each_backend_gets_its_launcher():
    horovod = jobs.launch_command('horovod', 3, WORKER)
    assert horovod == [os.path.join(os.path.dirname(sys.executable), 'horovodrun'), '-np', '3',
                       '-H', 'localhost:3', '--gloo'] + WORKER
    assert jobs.launch_command('kvstore', 4, WORKER) == [
        sys.executable, '-m', 'pbn_gluon.launch', '-n', '4', '--'] + WORKER
    assert jobs.launch_command('kvstore', 2, WORKER, timeout=60) == [
        sys.executable, '-m', 'pbn_gluon.launch', '-n', '2', '--timeout', '60', '--'] + WORKER
    local = jobs.launch_command('local', 8, WORKER)
    assert local == WORKER and local is not WORKER


def test_an_unknown_backend_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown backend 'mpi'"):
        jobs.launch_command('mpi', 2, WORKER)
