"""Deferred writes: engine operations that Python completes later, so that no thread waits.

MXNet 1.9 runs every custom operator on ONE thread: a custom op that waited for another device
would stall all of them (and MXNet's own SyncBatchNorm blocks an engine worker, see
docs/limitations.md). Instead, a device that reaches a synchronous layer before the others reserves its
output with ``reserve(out)``: an asynchronous engine operation (MXEnginePushAsyncND) that holds
the write lock of `out` and returns at once. Readers of `out` queue behind it in the engine.
When the last device arrives, ``fulfil(reservation, value)`` pushes an operation that runs
once `value` is computed, copies it into `out` and releases the lock.

The copy is a host memcpy, so deferred writes exist for CPU contexts only; for several GPUs in
one process use mxnet.gluon.contrib.nn.SyncBatchNorm (or one process per GPU with Horovod).
"""
import ctypes
import threading

import mxnet as mx
import numpy as np
from mxnet.base import _LIB, check_call

__all__ = ['reserve', 'fulfil', 'release']

#: MXNet versions whose engine has MXEnginePushAsyncND and the CallbackOnComplete layout below
#: (include/mxnet/engine.h); the layout is private, so another version must be checked first
LAYOUT_VERSIONS = ('1.7', '1.8', '1.9')
if '.'.join(mx.__version__.split('.')[:2]) not in LAYOUT_VERSIONS:
    raise ImportError('pbn_gluon.engine relies on the private engine callback layout of MXNet %s; '
                      'found MXNet %s' % (', '.join(LAYOUT_VERSIONS), mx.__version__))

_ASYNC_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)
_ON_COMPLETE_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)


class _Context(ctypes.Structure):
    _fields_ = [('dev_type', ctypes.c_int32), ('dev_id', ctypes.c_int32)]


class _OnComplete(ctypes.Structure):
    """mxnet::engine::CallbackOnComplete: function pointer, engine, parameter."""
    _fields_ = [('callback', ctypes.c_void_p), ('engine', ctypes.c_void_p),
                ('param', ctypes.c_void_p)]


_alive = {}          # ctypes callbacks must outlive the engine's call into them
_alive_lock = threading.Lock()


def _push_async(run, ctx, const=(), mutable=()):
    """Push run(complete) as an async engine op; it must call complete() exactly once."""
    key = object()

    def entry(_run_ctx, on_complete, _param):
        raw = _OnComplete.from_address(on_complete)
        callback, engine, param = raw.callback, raw.engine, raw.param

        def complete():
            _ON_COMPLETE_FN(callback)(engine, param, None)
            with _alive_lock:
                _alive.pop(key, None)
        run(complete)

    fn = _ASYNC_FN(entry)
    with _alive_lock:
        _alive[key] = fn
    handles = lambda arrays: (ctypes.c_void_p * max(1, len(arrays)))(
        *[a.handle.value for a in arrays])
    check_call(_LIB.MXEnginePushAsyncND(
        fn, None, None, ctypes.byref(_Context(ctx.device_typeid, ctx.device_id)),
        handles(const), len(const), handles(mutable), len(mutable), None, 0,
        ctypes.c_char_p(b'pbn_gluon_deferred_write'), ctypes.c_bool(False)))


def _data_pointer(array):
    ptr = ctypes.c_void_p()
    check_call(_LIB.MXNDArrayGetData(array.handle, ctypes.byref(ptr)))
    return ptr


class Reservation:
    """The write lock on `out` until fulfil() or release()."""

    def __init__(self, out):
        if out.context.device_type != 'cpu':
            raise NotImplementedError(
                'several devices of one process meet in a synchronous layer through host '
                'memory, so only CPU contexts are supported; for several GPUs in one process '
                'use mxnet.gluon.contrib.nn.SyncBatchNorm, or one process per GPU (Horovod)')
        self.out = out
        self._lock = threading.Lock()
        self._complete = None   # the engine's completion callback, once the lock is held
        self._done = False      # fulfil/release came first: complete as soon as it is held
        _push_async(self._hold, out.context, mutable=[out])

    def _hold(self, complete):
        with self._lock:
            if not self._done:
                self._complete = complete
                return
        complete()

    def _finish(self):
        with self._lock:
            self._done = True
            complete, self._complete = self._complete, None
        if complete is not None:
            complete()


def reserve(out):
    """Hold the write lock of `out` (CPU NDArray) until fulfil() or release()."""
    return Reservation(out)


def fulfil(reservation, value):
    """Once `value` (same shape, dtype and context type) is computed, copy it into the
    reserved output and release it."""
    out = reservation.out
    nbytes = out.size * np.dtype(out.dtype).itemsize

    def copy(complete):
        ctypes.memmove(_data_pointer(out), _data_pointer(value), nbytes)
        reservation._finish()
        complete()
    _push_async(copy, value.context, const=[value])


def release(reservation):
    """Release a reservation without writing (its output keeps whatever it held)."""
    reservation._finish()

