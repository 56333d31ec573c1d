import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

# Tests that run SyncBatchNorm on up to 8 CPU contexts of THIS process need MXNet's CPU resource
# copies that pbn_gluon.rendezvous.cpu_resource_env(8) names; MXNet reads them before any test runs.
# Tests of scripts and of the README example run in subprocesses with MXNet's defaults.
os.environ.setdefault('MXNET_CPU_TEMP_COPY', '16384')
os.environ.setdefault('MXNET_CPU_PARALLEL_RAND_COPY', '64')
