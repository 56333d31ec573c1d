"""The part ProgressiveBatchNorm and SyncBatchNorm share: a BatchNorm that runs on the fused
``pbn_batch_norm`` operator (pbn_gluon/csrc, loaded by pbn_gluon.ops), with BatchNorm's saved
parameters and inference path.

Per channel, with x seen as (A, C, B) around the channel axis:

    train:  y = gamma (x - mu) / sqrt(var + eps) + beta,  (mu, var) from this batch's moments
            and the group sums that the subclass hands in (docs/pbn-spec.md)
    infer:  y = gamma (x - running_mean) / sqrt(running_var + eps) + beta

One operator does it in two passes over x (sums, then y) and, in training, writes this batch's
[sum x, sum x^2, count] (double) into the layer's ``batch_sums`` state, an auxiliary input it
mutates the way BatchNorm updates its moving statistics. StatsSync reads them from there after
the step: the moments leave a hybridized graph without a device synchronisation, with or
without a backward pass. The mode comes in as data (``is_inference``, op_contract.TRAINING or
INFERENCE), since extension operators do not see MXNet's training flag; the operator's inputs
are built by name (op_contract.inputs), in the order pbn_gluon.ops checked at load.

The exchange state (``batch_sums`` and the subclasses' state) is StatsSync's and the layer's
alone: never saved, and whoever asks a state parameter for all its arrays (a Trainer's or
kvstore's broadcast, ``list_data()``) gets copies, so nothing outside writes it.

What the training loop did is watched from the Python side, where every forward of a layer
(hybridized or not) fetches its ``batch_sums`` for its graph: training forwards since the last
exchange (StatsSync.step, or pbn_gluon.Trainer.step), per device. A second training forward on
a device with no exchange in between, and an inference forward of a layer that trained but never
had its running statistics updated, each warn once per process (``WARNED``).
"""
import sys
import warnings
import weakref

import numpy as np
from mxnet import autograd
from mxnet import ndarray as nd
from mxnet import symbol
from mxnet.gluon import HybridBlock, Parameter, nn

from . import op_contract, ops

__all__ = ['BatchStatsNorm', 'owner_layer']

ops.load()

#: where a graph fetches its parameters for a forward (HybridBlock.forward: not hybridized)
_GRAPH_CALLS = (HybridBlock.forward.__code__, HybridBlock._call_cached_op.__code__)
#: kinds of misuse already warned about in this process
WARNED = set()

FIX = ('train with pbn_gluon.Trainer (its step() exchanges), or call sync.step() of a '
       'pbn_gluon.StatsSync once per iteration after backward()')


def owner_layer(param):
    """The ProgressiveBatchNorm or SyncBatchNorm layer that `param` belongs to, or None.

    Each parameter of a layer holds it (``_pbn_layer``): a net that keeps the parameters and
    not the layer, as GluonCV's SymbolBlocks (the SSD FeatureExpander) do with the backbone
    they traced, keeps the layers that pbn_gluon.Trainer finds and StatsSync drives."""
    return getattr(param, '_pbn_layer', None)


def _warn_once(kind, message):
    if kind not in WARNED:
        WARNED.add(kind)
        warnings.warn(message, UserWarning, stacklevel=4)


def _graph_caller():
    """The block whose forward (or cached graph) calls Parameter.data(), or None when user
    code does."""
    frame = sys._getframe(3)    # _graph_caller <- _check_and_get <- data <- caller
    if frame.f_code.co_name.startswith('<'):    # a comprehension inside the caller
        frame = frame.f_back
    if frame is None or frame.f_code not in _GRAPH_CALLS:
        return None
    return frame.f_locals.get('self')


class StateParameter(Parameter):
    """Exchange state of a norm layer: an input of its graph, never saved with the model.

    A model loaded from a checkpoint (which holds no state) creates it on first use, on the
    contexts of `owner` (the layer's running_mean). A gluon Trainer takes every Parameter of
    ``collect_params()`` and at its first step broadcasts them all from the first context; it
    (and a kvstore, and ``list_data()``) asks for all arrays at once, and gets copies here:
    the state a graph reads and writes, one array per device, is reached only through
    ``data(ctx)``, by the layer's graph, and through the buffers StatsSync binds.

    Its arrays are `storage` (float64 for the sums); to Gluon's typing (``dtype``, its graph
    variable, ``cast``, a SymbolBlock that types every parameter float32, as GluonCV's SSD
    FeatureExpander does) it is float32, so that no typing of a model asks for another dtype.
    The fused operator reads either (a float32 state, such as a test harness casts it to, is
    widened to double for the call: pbn_ops.h, 'w')."""

    #: skipped by comm.broadcast_parameters: StatsSync's, never the root's to hand out
    exchange_state = True

    def __init__(self, name, owner, per_channel, layer=None, storage='float32', **kwargs):
        super().__init__(name, dtype='float32', **kwargs)
        self._storage = storage
        self._owner, self._per_channel = owner, per_channel
        #: the layer told of each forward that fetches this state (one state per layer does)
        self._layer = weakref.ref(layer) if layer is not None else None

    def _created(self):
        if self._data is None and not self._deferred_init and self._owner._data is not None:
            self.initialize(ctx=self._owner.list_ctx())

    def _follow_owner(self):
        """When the owner's shape is inferred again (its shape reset and re-initialised, as
        GluonCV's prune_gluon_block does), so is a per-channel state's: it waits, deferred, for
        the same shape inference."""
        deferred = self._owner._deferred_init
        if self._per_channel and deferred and self._data is not None:
            self._data = self._grad = None
            self._shape = self._shape[:-1] + (0,)
            self._deferred_init = (self.init, deferred[1], deferred[2], None)

    @property
    def shape(self):    # a graph variable takes it: follow a re-inferred owner first
        self._follow_owner()
        return Parameter.shape.fget(self)

    @shape.setter
    def shape(self, new_shape):     # shape inference sets it
        self._follow_owner()
        Parameter.shape.fset(self, new_shape)

    def _check_and_get(self, arr_list, ctx):
        if arr_list is self._data:
            self._follow_owner()
            arr_list = self._data
        if arr_list is None:
            self._created()
            arr_list = self._data
        arrays = super()._check_and_get(arr_list, ctx)
        if ctx is list:
            return [a.copy() for a in arrays]
        layer = self._layer() if self._layer is not None else None
        caller = _graph_caller() if layer is not None and arr_list is self._data else None
        if caller is not None:
            layer._saw_forward(arrays.context, caller)
        return arrays

    def list_ctx(self):
        self._created()
        return super().list_ctx()

    def _init_impl(self, data, ctx_list):
        super()._init_impl(data.astype(self._storage, copy=False), ctx_list)

    def cast(self, dtype):
        """Keeps its arrays: ``model.cast('float32')`` (every GluonCV training script calls it)
        casts the model's parameters, never the float64 sums or float32 weights the fused
        operators read."""

    def reset_ctx(self, ctx):
        self._follow_owner()
        if self._data is None and not self._deferred_init:
            return          # not created yet: it follows its owner on first use
        super().reset_ctx(ctx)


class BatchStatsNorm(nn.BatchNorm):
    """Base class of the exchanged batch norms. Takes every argument of
    mxnet.gluon.nn.BatchNorm; its saved parameters are exactly BatchNorm's (gamma, beta,
    running_mean, running_var), so checkpoints move freely between the two.

    Subclasses define ``_group_inputs(F, x, batch_sums, **state)`` returning the operator's
    (group_sums, local_weight, is_inference) inputs, and set ``local_stats`` (True: PBN mixes
    this batch's moments in with weight local_weight; False: SyncBN normalises with the group
    sums alone, which is local weight 0)."""

    local_stats = True

    def __init__(self, axis=1, momentum=0.9, epsilon=1e-5, center=True, scale=True,
                 use_global_stats=False, beta_initializer='zeros', gamma_initializer='ones',
                 running_mean_initializer='zeros', running_variance_initializer='ones',
                 in_channels=0, exchange_rows=3, **kwargs):
        super().__init__(axis=axis, momentum=momentum, epsilon=epsilon, center=center,
                         scale=scale, use_global_stats=use_global_stats,
                         beta_initializer=beta_initializer, gamma_initializer=gamma_initializer,
                         running_mean_initializer=running_mean_initializer,
                         running_variance_initializer=running_variance_initializer,
                         in_channels=in_channels, **kwargs)
        self._axis, self._epsilon, self._momentum = axis, epsilon, momentum
        self._scale, self._use_global_stats = scale, use_global_stats
        #: rows per channel of the exchanged sums: [sum x, sum x^2, n] (+ [sum dy, sum dy xhat])
        self.exchange_rows = exchange_rows
        self.batch_sums = self._state_param('batch_sums', (exchange_rows * in_channels,),
                                            dtype='float64', watch=True)
        for param in (self.gamma, self.beta, self.running_mean, self.running_var):
            param._pbn_layer = self
        #: training forwards per device since the last exchange; whether the layer ever
        #: trained, and ever had its running statistics updated (the exchange does it)
        self.forwards_since_exchange = {}
        self._trained = self._running_updated = False
        #: blocks whose cached graph traced this layer (cleared when the graph must change)
        self._tracers = weakref.WeakSet()

    def _state_param(self, name, shape, init='zeros', dtype='float32', per_channel=True,
                     watch=False):
        param = StateParameter(self.params.prefix + name, owner=self.running_mean,
                               per_channel=per_channel, layer=self if watch else None,
                               grad_req='null', shape=shape, init=init, storage=dtype,
                               allow_deferred_init=True, differentiable=False)
        self.params._params[param.name] = param     # ParameterDict.get only makes Parameters
        param._pbn_layer = self
        return param

    # -- what the training loop does (pbn_gluon.StatsSync checks it) ------------------------

    def _saw_forward(self, ctx, block):
        """A forward of this layer's graph on `ctx`, run by `block`, is about to run. A block
        other than the layer holds a cached graph with it (one whose graph was traced
        elsewhere, as GluonCV's SymbolBlocks are, included): clear_graphs drops it too."""
        if block is not self:
            self._tracers.add(block)
        if self._use_global_stats:
            return
        if autograd.is_training():
            ran = self.forwards_since_exchange.get(ctx, 0)
            self.forwards_since_exchange[ctx] = ran + 1
            self._trained = True
            if ran:
                _warn_once('no exchange', '%s: a second training forward on %s with no '
                           'statistics exchange since the first: its running statistics are '
                           'not updated and no group statistics are used; %s'
                           % (self.name, ctx, FIX))
        elif self._trained and not self._running_updated:
            _warn_once('never updated', '%s: inference with running statistics that were never '
                       'updated (it trained with no statistics exchange); %s' % (self.name, FIX))

    def exchanged(self):
        """Called by StatsSync.step(): the step's exchange, and running update, are pushed."""
        self.forwards_since_exchange.clear()
        self._running_updated = True

    def clear_graphs(self):
        """Drop the cached graphs that contain this layer (its own, and those of the blocks
        that traced it), so that they are rebuilt from the current state and exchange."""
        self._clear_cached_op()
        for block in list(self._tracers):
            block._clear_cached_op()

    def _note_tracers(self):
        """Remember the blocks on the stack that trace a graph containing this layer."""
        frame = sys._getframe(1)
        while frame is not None:
            if frame.f_code is HybridBlock._get_graph.__code__:
                block = frame.f_locals.get('self')
                if isinstance(block, HybridBlock) and block is not self:
                    self._tracers.add(block)
            frame = frame.f_back

    @property
    def momentum(self):
        return self._momentum

    @property
    def use_global_stats(self):
        return self._use_global_stats

    def _collect_params_with_prefix(self, prefix=''):
        # save_parameters / load_parameters see exactly BatchNorm's parameters
        return {k: v for k, v in super()._collect_params_with_prefix(prefix).items()
                if not isinstance(v, StateParameter)}

    def forward(self, x, *args):
        if isinstance(x, nd.NDArray):
            self._check_input(x)
        self._one_dim_vectors()
        return super().forward(x, *args)

    def _one_dim_vectors(self):
        """gamma, beta and the running statistics are vectors. A shape reset to None (as
        GluonCV's prune_gluon_block does) would make their graph variables of unknown ndim,
        which MXNet 1.9's shape inference of extension operators cannot take (it corrupts the
        heap): (0,) is the same unknown length with its one dimension."""
        for param in (self.gamma, self.beta, self.running_mean, self.running_var):
            if param._shape is None:
                param._shape, param._var = (0,), None

    def _check_input(self, x):
        axis = self._axis if self._axis >= 0 else x.ndim + self._axis
        if x.ndim < 2 or not 0 <= axis < x.ndim:
            raise ValueError('%s normalises axis %d but got an input of shape %s'
                             % (self.name, self._axis, x.shape))
        channels = self.gamma.shape[0] if self.gamma.shape else 0
        if channels and x.shape[axis] != channels:
            raise ValueError('%s has %d channels but its input of shape %s has %d on axis %d'
                             % (self.name, channels, x.shape, x.shape[axis], self._axis))
        if np.dtype(x.dtype) != np.float32:
            raise TypeError('%s runs on float32 inputs, got %s' % (self.name, x.dtype))
        if x.context.device_type == 'gpu' and not ops.cuda_enabled():
            raise RuntimeError('%s got an input on %s, but pbn_gluon\'s operators were built '
                               'for CPU only (a CUDA build of MXNet and nvcc are needed; see '
                               'pbn_gluon.ops)' % (self.name, x.context))

    def hybrid_forward(self, F, x, gamma, beta, running_mean, running_var, batch_sums, **state):
        if F is symbol:
            self._note_tracers()
        if self._use_global_stats:
            return F.BatchNorm(x, gamma, beta, running_mean, running_var, eps=self._epsilon,
                               fix_gamma=not self._scale, use_global_stats=True, axis=self._axis)
        x, gamma, beta = self._accumulating_inputs(F, x, gamma, beta)
        group_sums, local_weight, is_inference = self._group_inputs(F, x, batch_sums, **state)
        inputs = op_contract.inputs(
            'pbn_batch_norm', data=x, gamma=gamma, beta=beta, running_mean=running_mean,
            running_var=running_var, group_sums=group_sums, local_weight=local_weight,
            is_inference=is_inference, batch_sums=batch_sums)
        return F.pbn_batch_norm(*inputs, axis=self._axis, eps=self._epsilon,
                                fix_gamma=not self._scale, local_stats=self.local_stats)[0]

    def _accumulating_inputs(self, F, x, gamma, beta):
        """Extension operators write their gradients (lib_api.h hands them no OpReqType), so an
        input whose gradient may be accumulated (grad_req 'add') goes through a native identity,
        whose backward honours it: gamma and beta (C numbers) always, since their grad_req can
        change after a graph was traced; x when it is a leaf: a graph input, or an NDArray with
        an attached gradient (inside a graph it is an intermediate, written once)."""
        leaf = x.get_children() is None if F is symbol else x.grad is not None
        return (F.identity(x) if leaf else x), F.identity(gamma), F.identity(beta)

    def _group_inputs(self, F, x, batch_sums, **state):
        raise NotImplementedError


def training_flag(F, zero_stats):
    """pbn_batch_norm's ``is_inference`` input made in the graph: op_contract.TRAINING (0) while
    MXNet trains, INFERENCE (1) otherwise. Cost: three one-element operators (ones_like,
    BatchNorm, BlockGrad) per layer and forward, no random numbers, no backward.

    BatchNorm (eps 1) of a one-element constant 1 with gamma 1, and beta and moving statistics
    `zero_stats` (a one-element state variable holding 0; BatchNorm's moving statistics must be
    graph variables): batch statistics give beta = 0, the moving ones 1 (1 - 0) / sqrt(0 + 1).
    (Not fix_gamma: BatchNorm then writes 1 into its gamma.) Unlike a Dropout it draws no random
    numbers, so a net's later Dropouts draw what they would without it. BlockGrad: no backward,
    so the moving statistics are never updated. (SyncBatchNorm's exchange operator sees
    is_train and outputs the same encoding, op_contract.mode_value(is_train).)"""
    one = F.ones_like(zero_stats)
    return F.BlockGrad(F.BatchNorm(one, one, zero_stats, zero_stats, zero_stats, eps=1.0,
                                   fix_gamma=False, use_global_stats=False, axis=0,
                                   cudnn_off=True))
