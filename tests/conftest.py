import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

# SyncBatchNorm on up to 8 CPU contexts of one process (pbn_gluon.comm.cpu_resource_advice);
# MXNet reads it when it first allocates a resource, before any test runs
os.environ.setdefault('MXNET_CPU_TEMP_COPY', '16384')
