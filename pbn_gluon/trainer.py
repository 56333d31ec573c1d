"""pbn_gluon.Trainer: a gluon Trainer whose ``step()`` also exchanges the batch statistics of
the ProgressiveBatchNorm and SyncBatchNorm layers behind its parameters, so that a GluonCV
training loop needs no line of its own (as PyTorch's SyncBatchNorm inside DDP, or Horovod's
DistributedTrainer riding its gradient exchange on ``trainer.step()``).

    trainer = pbn_gluon.Trainer(net.collect_params(), 'sgd', {'learning_rate': 0.01})
    ... forward, backward ...; trainer.step(batch_size)     # exchange, then update

``step()`` and ``update()`` run ``trainer.stats.step()`` (a pbn_gluon.StatsSync over the
layers whose parameters the Trainer got) before the parameter update, so the statistics'
exchange overlaps the gradients'. ``comm=None`` picks the backend as PyTorch's
``process_group=None`` picks the default group:

- Horovod, when ``horovod.mxnet`` is initialised (HorovodComm);
- the Trainer's kvstore, when it is a dist one (KVStoreComm; update_on_kvstore must be False,
  so that no server-side optimizer updates the statistics' keys: None becomes False);
- else LocalComm over the layers' contexts.

``pbn_gluon.trainer.DistributedTrainer`` is Horovod's ``hvd.DistributedTrainer`` with the same
step (imported on first use).
"""
import sys

import mxnet as mx
from mxnet import gluon

from .batch_stats import owner_layer
from .comm import HorovodComm, KVStoreComm, LocalComm
from .stats_sync import StatsSync

__all__ = ['Trainer', 'norm_layers']     # and DistributedTrainer, on first use


def norm_layers(params):
    """The PBN/SyncBN layers (batch statistics in training) behind `params` (a ParameterDict,
    dict or list of Parameters), in the order of their first parameter."""
    if isinstance(params, dict) or hasattr(params, 'values'):
        params = params.values()
    found, seen = [], set()
    for param in params:
        layer = owner_layer(param)
        if layer is not None and id(layer) not in seen and not layer.use_global_stats:
            seen.add(id(layer))
            found.append(layer)
    return found


def _contexts(layers):
    ctxs = layers[0].gamma.list_ctx()
    for layer in layers[1:]:
        if layer.gamma.list_ctx() != ctxs:
            raise ValueError('pbn_gluon.Trainer: %s lives on %s but %s on %s: give comm='
                             % (layers[0].name, ctxs, layer.name, layer.gamma.list_ctx()))
    return ctxs


def _horovod():
    """horovod.mxnet if this process initialised it, else None."""
    hvd = sys.modules.get('horovod.mxnet')
    return hvd if hvd is not None and hvd.is_initialized() else None


def _is_dist(kvstore):
    kind = kvstore if isinstance(kvstore, str) else getattr(kvstore, 'type', '')
    return isinstance(kind, str) and kind.startswith('dist')


def default_comm(layers, kvstore, update_on_kvstore):
    """(comm, kvstore, update_on_kvstore) for a Trainer given `kvstore` and no comm."""
    ctxs = _contexts(layers)
    if _horovod() is not None:
        return HorovodComm(ctxs[0]), kvstore, update_on_kvstore
    if _is_dist(kvstore):
        if update_on_kvstore:
            raise ValueError('pbn_gluon.Trainer on a dist kvstore needs update_on_kvstore=False '
                             '(a server-side optimizer would also update the statistics\' keys)')
        if isinstance(kvstore, str):
            kvstore = mx.kv.create(kvstore)
        return KVStoreComm(kvstore, ctxs), kvstore, False
    return LocalComm(ctxs), kvstore, update_on_kvstore


class StatsExchange:
    """The part mixed into a gluon Trainer class: ``stats`` and the exchange in step/update."""

    def _attach_stats(self, layers, comm):
        #: the pbn_gluon.StatsSync of the layers (None without any): state_dict() for
        #: checkpoints, nonfinite_steps
        self.stats = StatsSync(layers, comm) if layers else None

    def step(self, batch_size, ignore_stale_grad=False):
        """Exchange the batch statistics, then gluon.Trainer.step."""
        if self.stats is not None:
            self.stats.step(check_gradients=not ignore_stale_grad)
        super().step(batch_size, ignore_stale_grad)

    def update(self, batch_size, ignore_stale_grad=False):
        """Exchange the batch statistics, then gluon.Trainer.update."""
        if self.stats is not None:
            self.stats.step(check_gradients=not ignore_stale_grad)
        super().update(batch_size, ignore_stale_grad)


class Trainer(StatsExchange, gluon.Trainer):
    """mxnet.gluon.Trainer that also exchanges the statistics of the PBN/SyncBN layers whose
    parameters it gets. comm: a pbn_gluon.comm.Comm; None picks one (module docstring)."""

    def __init__(self, params, optimizer, optimizer_params=None, kvstore='device',
                 compression_params=None, update_on_kvstore=None, comm=None):
        layers = norm_layers(params)
        if layers and comm is None:
            comm, kvstore, update_on_kvstore = default_comm(layers, kvstore, update_on_kvstore)
        elif layers and isinstance(comm, KVStoreComm) and comm.kvstore is kvstore and \
                _is_dist(kvstore) and update_on_kvstore is None:
            update_on_kvstore = False
        super().__init__(params, optimizer, optimizer_params, kvstore=kvstore,
                         compression_params=compression_params,
                         update_on_kvstore=update_on_kvstore)
        self._attach_stats(layers, comm)


_HOROVOD_TRAINER = []


def _horovod_trainer_class():
    if not _HOROVOD_TRAINER:
        import horovod.mxnet as hvd

        class DistributedTrainer(StatsExchange, hvd.DistributedTrainer):
            """horovod.mxnet.DistributedTrainer that also exchanges the statistics of the
            PBN/SyncBN layers behind its parameters (comm=None: HorovodComm)."""

            def __init__(self, params, optimizer, optimizer_params=None, comm=None, **kwargs):
                layers = norm_layers(params)
                if layers and comm is None:
                    comm = HorovodComm(_contexts(layers)[0])
                super().__init__(params, optimizer, optimizer_params, **kwargs)
                self._attach_stats(layers, comm)

        DistributedTrainer.__module__ = __name__
        _HOROVOD_TRAINER.append(DistributedTrainer)
    return _HOROVOD_TRAINER[0]


def __getattr__(name):
    if name == 'DistributedTrainer':    # imports horovod on first use
        return _horovod_trainer_class()
    raise AttributeError('module %r has no attribute %r' % (__name__, name))
