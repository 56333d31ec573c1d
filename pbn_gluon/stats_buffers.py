"""Where the exchanged state of a net's norm layers lives: flat buffers, one set per device.

StatsSync owns the buffers; each layer's state parameters are VIEWS into them (the layer's
``Parameter._data`` replaced by a slice), so that a layer's graph reads and writes the buffers
directly and one operation on a buffer serves every layer at once. Per device, with layers in
the order PBN layers, then SyncBN layers, and c a layer's channels:

    buffer        dtype    layer state (view)                              rows x c  written by
    local         float64  PBN batch_sums: [sum x, sum x^2, n]             3         forward
                           (+ [sum dy, sum dy xhat], backward='progressive')  +2      backward
    stats         float64  PBN global_sums (same rows as local)            3 or 5    StatsSync
    fresh         float64  PBN: this step's accepted global sums           3 or 5    StatsSync
                           SyncBN batch_sums: this step's group sums       3         exchange
    running_mean  float32  running_mean                                    1         StatsSync
    running_var   float32  running_var                                     1         StatsSync
    weights       float32  PBN local_weight (one number per layer)         -         StatsSync

A PBN layer's block starts at the same offset in `local`, `stats` and `fresh`. StatsSync takes
`local` (leaving zeros: a layer that does not run sends count 0) and consumes `fresh` (the
running statistics move once per accepted sum). Views stay valid while the layer keeps its
arrays; ``stale()`` tells when a layer was re-initialised or moved, and StatsSync binds again.
"""
import numpy as np
from mxnet import ndarray as nd

from .progressive_norm import ProgressiveBatchNorm

__all__ = ['StatsBuffers']


class StatsBuffers:
    """The flat buffers of `layers` (PBN layers first, then SyncBN) on `contexts`, with every
    layer's state bound to its views (copied in first: the values survive binding)."""

    def __init__(self, pbn, syncbn, contexts):
        self.contexts = list(contexts)
        self.order = list(pbn) + list(syncbn)
        self.channels = [layer.gamma.shape[0] for layer in self.order]
        sizes = [layer.exchange_rows * c for layer, c in zip(self.order, self.channels)]
        self.starts = np.cumsum([0] + sizes[:-1]).tolist()
        #: per PBN layer, its length in `local` (and at the head of `stats` and `fresh`)
        self.pbn_sizes = sizes[:len(pbn)]
        self.pbn_size = sum(self.pbn_sizes)

        ctxs, total = self.contexts, sum(self.channels)
        sums = lambda n: [nd.zeros(n, ctx=c, dtype='float64') for c in ctxs]
        self.local = sums(self.pbn_size) if pbn else []
        self.stats = sums(self.pbn_size) if pbn else []
        self.fresh = sums(sum(sizes))
        self.running_mean = [nd.zeros(total, ctx=c) for c in ctxs]
        self.running_var = [nd.zeros(total, ctx=c) for c in ctxs]
        self.weights = [nd.ones(len(pbn), ctx=c) for c in ctxs] if pbn else []
        self._bound = []
        self._bind_layers()

    def _bind_layers(self):
        offset = 0
        for index, (layer, c, start) in enumerate(zip(self.order, self.channels, self.starts)):
            self._bind(layer.running_mean, self.running_mean, offset, offset + c)
            self._bind(layer.running_var, self.running_var, offset, offset + c)
            stop = start + layer.exchange_rows * c
            if isinstance(layer, ProgressiveBatchNorm):
                self._bind(layer.batch_sums, self.local, start, stop)
                self._bind(layer.global_sums, self.stats, start, stop)
                self._bind(layer.local_weight, self.weights, index, index + 1)
            else:
                self._bind(layer.batch_sums, self.fresh, start, stop)
            offset += c

    def _bind(self, param, flats, start, stop):
        """Replace `param`'s arrays by views of flats[start:stop]."""
        arrays = param._data
        if arrays is None:
            param.list_ctx()    # a state parameter is created on first use
            arrays = param._data
        for i, ctx in enumerate(self.contexts):
            j = param.list_ctx().index(ctx)
            view = flats[i][start:stop].reshape(param.shape)
            if flats[i].dtype == np.float64:    # sums a backward may still be writing:
                nd.pbn_take_sums(arrays[j], out=view)   # an operator that waits for it
            else:
                view[:] = arrays[j]
            arrays[j] = view
        self._bound.append((param, arrays, arrays[0]))

    def stale(self):
        """True when a bound parameter no longer holds its views (re-initialised, moved)."""
        return any(param._data is not arrays or arrays[0] is not first
                   for param, arrays, first in self._bound)

    def gather_index(self):
        """(3, T) positions in `fresh` of [S_1, S_2, S_n] for each of the T channels of all
        layers, for pbn_running_update (float64: exact for any buffer size)."""
        first = np.repeat(self.starts, self.channels) + np.concatenate(
            [np.arange(c) for c in self.channels])
        row = np.repeat(self.channels, self.channels)
        return np.stack([first + k * row for k in range(3)]).astype(np.float64)

    def per_channel(self, values):
        """One value per layer, repeated over its channels (length T)."""
        return np.repeat(values, self.channels).astype(np.float32)

    def per_pbn_entry(self, values):
        """One value per PBN layer, repeated over its block of `local` (length pbn_size)."""
        return np.repeat(values, self.pbn_sizes).astype(np.float64)
