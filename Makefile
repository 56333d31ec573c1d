# One-command set-up: every target creates .venv (mxnet, gluoncv, Horovod with Gloo) when missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
HOROVOD_ENV := HOROVOD_WITH_MXNET=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 \
               HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_PYTORCH=1 MAKEFLAGS=-j2

.PHONY: venv openssh test test-slow demo bench study study-quick study-sensitivity study-long clean
venv: $(VENV)/.ready openssh

# sshd for tests/test_launch_multihost.py (launcher -H over ssh on 127.0.0.1 and 127.0.0.2);
# where it cannot be installed (no apt-get, not root) those tests skip and say why
openssh:
	@command -v sshd >/dev/null 2>&1 || test -x /usr/sbin/sshd || \
	  { command -v apt-get >/dev/null 2>&1 && test "$$(id -u)" = 0 && \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq openssh-server openssh-client >/dev/null; } || \
	  echo "openssh-server not installed: the multi-host launcher tests will be skipped"

$(VENV)/.ready: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip wheel setuptools
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -c "import horovod.mxnet" 2>/dev/null || \
	  PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(HOROVOD_ENV) \
	  $(PY) -m pip install --quiet --no-build-isolation --no-cache-dir horovod==0.28.1
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -c "import mxnet, gluoncv, horovod.mxnet, pbn_gluon.ops as ops; \
	  print('venv ready: mxnet', mxnet.__version__, '| pbn_gluon operators:', ops.load(), \
	        '(CUDA)' if ops.cuda_enabled() else '(CPU only)')"
	touch $@

test: venv
	$(PY) -m pytest -q tests

test-slow: venv
	$(PY) -m pytest -q -m slow tests

demo: venv
	$(PY) scripts/demo.py

study: venv
	$(PY) scripts/study.py $(ARGS)

study-quick: venv
	$(PY) scripts/study.py --quick $(ARGS)

study-sensitivity: venv
	$(PY) scripts/study.py --preset sensitivity $(ARGS)

study-long: venv
	$(PY) scripts/study.py --preset long $(ARGS)

bench: venv
	$(PY) scripts/bench_norm.py --repeats 3 --json results/bench_norm.json --plot results/bench_norm.png

clean:
	rm -rf $(VENV) .pytest_cache
