"""One data-parallel training step in the order pbn_gluon needs (the README's loop)."""
from mxnet import autograd

__all__ = ['train_step']


def train_step(net, loss_fn, data, labels, trainer, batch_size, sync=None):
    """Forward and backward on every device, ``sync.step()``, then ``trainer.step(batch_size)``.

    All forwards are recorded before any value is read (SyncBatchNorm's devices meet in the
    engine); ``sync.step()`` comes before ``trainer.step``, so that its exchange overlaps the
    gradients' (either order trains alike). `data` and `labels` hold one batch per device;
    ``loss_fn(net(x), y)``. Returns the per-device losses without waiting for them."""
    with autograd.record():
        losses = [loss_fn(net(x), y) for x, y in zip(data, labels)]
    autograd.backward(losses)
    if sync is not None:
        sync.step()
    trainer.step(batch_size)
    return losses
