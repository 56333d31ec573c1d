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
"""
import numpy as np
from mxnet import ndarray as nd
from mxnet import symbol
from mxnet.gluon import Parameter, nn

from . import op_contract, ops

__all__ = ['BatchStatsNorm']

ops.load()


class StateParameter(Parameter):
    """Exchange state of a norm layer: an input of its graph, never saved with the model.

    A model loaded from a checkpoint (which holds no state) creates it on first use, on the
    contexts of `owner` (the layer's running_mean). A gluon Trainer takes every Parameter of
    ``collect_params()`` and at its first step broadcasts them all from the first context; it
    (and a kvstore, and ``list_data()``) asks for all arrays at once, and gets copies here:
    the state a graph reads and writes, one array per device, is reached only through
    ``data(ctx)``, by the layer's graph, and through the buffers StatsSync binds."""

    #: skipped by comm.broadcast_parameters: StatsSync's, never the root's to hand out
    exchange_state = True

    def __init__(self, name, owner, per_channel, **kwargs):
        super().__init__(name, **kwargs)
        self._owner, self._per_channel = owner, per_channel

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
        return [a.copy() for a in arrays] if ctx is list else arrays

    def list_ctx(self):
        self._created()
        return super().list_ctx()

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
                                            dtype='float64')

    def _state_param(self, name, shape, init='zeros', dtype='float32', per_channel=True):
        param = StateParameter(self.params.prefix + name, owner=self.running_mean,
                               per_channel=per_channel, grad_req='null', shape=shape, init=init,
                               dtype=dtype, allow_deferred_init=True, differentiable=False)
        self.params._params[param.name] = param     # ParameterDict.get only makes Parameters
        return param

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
