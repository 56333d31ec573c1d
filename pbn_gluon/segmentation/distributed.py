"""The three ways a training job spans devices, behind one small interface.

- local: one process drives every device (cpu(0..N-1) or gpu(0..N-1)); gradients are summed by
  a 'device' KVStore, statistics exchanged by LocalComm.
- horovod: one device per process (horovodrun); hvd.DistributedTrainer averages gradients,
  HorovodComm exchanges statistics.
- kvstore: MXNet dist_sync workers (python -m pbn_gluon.launch), each with one or more devices;
  the gluon Trainer and KVStoreComm share the kvstore (update_on_kvstore=False).
"""
import mxnet as mx
from mxnet import gluon

from ..comm import HorovodComm, KVStoreComm, LocalComm
from ..errors import ConfigError

__all__ = ['Job']


def _local_contexts(gpus, devices):
    return [mx.gpu(i) for i in range(gpus)] if gpus else [mx.cpu(i) for i in range(devices)]


class Job:
    """This process's part of a training job.

    contexts: its devices; comm: the statistics communicator over every device of the job;
    size: devices in the job; rank_offset: global rank of contexts[0]; is_root: the process
    that writes checkpoints and logs; in_process: every device is in this process."""

    def __init__(self, backend, gpus=0, devices=1):
        self._hvd = self._kvstore = None
        if backend == 'local':
            self.contexts = _local_contexts(gpus, devices)
            self.comm = LocalComm(self.contexts)
        elif backend == 'horovod':
            if gpus > 1 or (not gpus and devices != 1):
                raise ConfigError('backend horovod runs one device per process: set gpus: 1 or '
                                 'gpus: 0 and devices: 1, and start one process per device')
            import horovod.mxnet as hvd
            hvd.init()
            self._hvd = hvd
            self.contexts = [mx.gpu(hvd.local_rank()) if gpus else mx.cpu()]
            self.comm = HorovodComm(self.contexts[0])
        elif backend == 'kvstore':
            self._kvstore = mx.kv.create('dist_sync')
            self.contexts = _local_contexts(gpus, devices)
            self.comm = KVStoreComm(self._kvstore, self.contexts)
        else:
            raise ConfigError('unknown backend %r: local, horovod or kvstore' % backend)
        self.size, self.rank_offset = self.comm.size, self.comm.rank_offset
        self.in_process = backend == 'local'
        self.is_root = self.rank_offset == 0

    def trainer(self, params, optimizer_params):
        """An SGD trainer whose step averages the gradients of every device of the job."""
        if self._hvd is not None:
            return self._hvd.DistributedTrainer(params, 'sgd', optimizer_params)
        if self._kvstore is not None:
            return gluon.Trainer(params, 'sgd', optimizer_params, kvstore=self._kvstore,
                                 update_on_kvstore=False)
        return gluon.Trainer(params, 'sgd', optimizer_params, kvstore='device')

    def step_batch(self, images_per_device):
        """The batch size to give trainer.step() so that it averages over the job's images
        (DistributedTrainer already divides by the number of processes)."""
        if self._hvd is not None:
            return images_per_device * len(self.contexts)
        return images_per_device * self.size

    def broadcast(self, params):
        """Make every process start from the root's parameters (the kvstore trainer already
        does when it initializes its keys)."""
        if self._hvd is not None:
            self._hvd.broadcast_parameters(params, root_rank=0)
