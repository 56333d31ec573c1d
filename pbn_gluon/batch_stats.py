"""The part ProgressiveBatchNorm and SyncBatchNorm share: a BatchNorm whose batch moments are
chosen by a subclass, with BatchNorm's saved parameters and inference path.

Per channel, with x seen as (A, C, B) (channel axis in the middle):

    train:  y = gamma * (x - mu) / sqrt(var + eps) + beta,  (mu, var) from ``_train_moments``
    infer:  y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta

Both run through MXNet's fused inference BatchNorm operator: training rewrites (gamma, beta) so
that it computes the train formula, picked at run time by the engine's training flag, so a
single traced graph serves ``autograd.record()`` and inference alike, like BatchNorm does.

The layer also writes a (3, C) array of per-channel sums [sum x, sum x^2, count] into its
``batch_sums`` state during the backward pass (through the aux state of a tiny BatchNorm operator
with momentum 0). StatsSync reads them after the step: this is how the moments leave a
hybridized graph without an extra device synchronisation.
"""
from mxnet import ndarray as nd
from mxnet.gluon import Parameter, nn

__all__ = ['BatchStatsNorm']


def channel_major(F, x, axis):
    """x as a 3-d (A, C, B) array with the channel axis in the middle (a view, no copy)."""
    if axis == 1:
        return F.reshape(x, (0, 0, -1))
    if axis == -1:
        return F.reshape(F.reshape(x, (-1, 0), reverse=True), (0, 0, 1))
    return F.reshape(F.swapaxes(x, 1, axis), (0, 0, -1))


def batch_moments(F, x3):
    """Per-channel mean, biased variance and element count n (shape (1,)) of x3 = (A, C, B).

    The sums over B are matrix products with a ones vector (BLAS): on CPU several times faster
    than MXNet's reduction kernels, forward and backward."""
    shape = F.shape_array(x3)
    count = F.slice_axis(shape, axis=0, begin=0, end=1) * F.slice_axis(shape, axis=0, begin=2, end=3)
    count = F.BlockGrad(F.cast(count, 'float32'))
    ones = F.reshape(F.ones_like(F.slice_axis(x3, axis=1, begin=0, end=1)), (0, -1, 1))
    total = lambda v: F.reshape(F.sum(F.batch_dot(v, ones), axis=0), (-1,))    # (C,)
    mean = F.broadcast_div(total(x3), count)
    var = F.relu(F.broadcast_div(total(F.square(x3)), count) - F.square(mean))
    return mean, var, count


def moments_to_sums(F, mean, var, count):
    """(3, C) array [n mean, n (var + mean^2), n]: sums that add up across devices."""
    return F.stack(F.broadcast_mul(mean, count),
                   F.broadcast_mul(var + F.square(mean), count),
                   F.broadcast_mul(F.ones_like(mean), count), axis=0)


def sums_to_moments(F, sums):
    """Mean and biased variance from (3, C) sums; zero sums (no data yet) give mean 0, var 0."""
    count = F.maximum(F.slice_axis(sums, axis=0, begin=2, end=3), 1.0)
    mean = F.reshape(F.slice_axis(sums, axis=0, begin=0, end=1) / count, (-1,))
    square = F.reshape(F.slice_axis(sums, axis=0, begin=1, end=2) / count, (-1,))
    return mean, F.relu(square - F.square(mean))


def stash(F, sums, buffer, scratch):
    """Make the backward pass write `sums` into the aux state `buffer`; returns an exact 0 of
    shape (1,) to add into the graph so the stash is kept.

    BatchNorm over the two identical rows [s; s] with momentum 0 sets its moving mean to s
    exactly and normalises to 0; MXNet updates aux states in the backward pass."""
    row = F.reshape(sums, (1, -1))
    ones = F.ones_like(F.reshape(sums, (-1,)))
    out = F.BatchNorm(F.concat(row, row, dim=0), ones, F.zeros_like(ones), buffer, scratch,
                      momentum=0.0, eps=1e-5, fix_gamma=True, use_global_stats=False, axis=1,
                      cudnn_off=True)
    return F.sum(out)


def training_flag(F, like):
    """1 where the engine is in training mode (autograd.record()), 0 in inference; shape of `like`.

    Dropout(p=0.5) of ones is 0 or 2 when training and exactly 1 otherwise."""
    ones = F.ones_like(like)
    return F.broadcast_not_equal(F.Dropout(ones, p=0.5, cudnn_off=True), ones)


class StateParameter(Parameter):
    """Exchange state of a norm layer: an input of its graph, never saved with the model.

    A model loaded from a checkpoint (which holds no state) creates it on first use, on the
    contexts of `owner` (the layer's running_mean)."""

    def __init__(self, name, owner, **kwargs):
        super().__init__(name, **kwargs)
        self._owner = owner

    def _check_and_get(self, arr_list, ctx):
        if arr_list is None and not self._deferred_init and self._owner._data is not None:
            self.initialize(ctx=self._owner.list_ctx())
            arr_list = self._data
        return super()._check_and_get(arr_list, ctx)

    def reset_ctx(self, ctx):
        if self._data is None and not self._deferred_init:
            return          # not created yet: it follows its owner on first use
        super().reset_ctx(ctx)


class BatchStatsNorm(nn.BatchNorm):
    """Base class of the exchanged batch norms. Takes every argument of
    mxnet.gluon.nn.BatchNorm; its saved parameters are exactly BatchNorm's (gamma, beta,
    running_mean, running_var), so checkpoints move freely between the two.

    Subclasses define ``_train_moments(F, mean, var, count, **state)`` returning the moments to
    normalise with, the (3, C) sums from which StatsSync updates the running statistics and a
    (C,) training flag (see ``training_flag``)."""

    def __init__(self, axis=1, momentum=0.9, epsilon=1e-5, center=True, scale=True,
                 use_global_stats=False, beta_initializer='zeros', gamma_initializer='ones',
                 running_mean_initializer='zeros', running_variance_initializer='ones',
                 in_channels=0, **kwargs):
        super().__init__(axis=axis, momentum=momentum, epsilon=epsilon, center=center,
                         scale=scale, use_global_stats=use_global_stats,
                         beta_initializer=beta_initializer, gamma_initializer=gamma_initializer,
                         running_mean_initializer=running_mean_initializer,
                         running_variance_initializer=running_variance_initializer,
                         in_channels=in_channels, **kwargs)
        self._axis, self._epsilon, self._momentum = axis, epsilon, momentum
        self._scale, self._use_global_stats = scale, use_global_stats
        self.batch_sums = self._state_param('batch_sums', (3 * in_channels,))
        self.batch_sums_scratch = self._state_param('batch_sums_scratch', (3 * in_channels,))

    def _state_param(self, name, shape, init='zeros'):
        param = StateParameter(self.params.prefix + name, owner=self.running_mean,
                               grad_req='null', shape=shape, init=init,
                               allow_deferred_init=True, differentiable=False)
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
        return super().forward(x, *args)

    def _check_input(self, x):
        axis = self._axis if self._axis >= 0 else x.ndim + self._axis
        if x.ndim < 2 or not 0 <= axis < x.ndim:
            raise ValueError('%s normalises axis %d but got an input of shape %s'
                             % (self.name, self._axis, x.shape))
        channels = self.gamma.shape[0] if self.gamma.shape else 0
        if channels and x.shape[axis] != channels:
            raise ValueError('%s has %d channels but its input of shape %s has %d on axis %d'
                             % (self.name, channels, x.shape, x.shape[axis], self._axis))

    def hybrid_forward(self, F, x, gamma, beta, running_mean, running_var,
                       batch_sums, batch_sums_scratch, **state):
        if not self._scale:
            gamma = F.ones_like(gamma)
        if not self._use_global_stats:
            mean, var, count = batch_moments(F, channel_major(F, x, self._axis))
            mu, sigma2, sums, training = self._train_moments(F, mean, var, count, **state)
            scale = gamma * F.rsqrt(sigma2 + self._epsilon)
            shift = F.broadcast_add(beta - mu * scale,
                                    stash(F, sums, batch_sums, batch_sums_scratch))
            # y = scale x + shift, written for the inference operator below
            gamma_train = scale * F.sqrt(running_var + self._epsilon)
            beta_train = shift + scale * running_mean
            gamma = F.where(training, gamma_train, gamma)
            beta = F.where(training, beta_train, beta)
        # MXNet's fused inference BatchNorm: gamma (x - running_mean) / sqrt(running_var + eps)
        # + beta in one pass, and its backward gives the gamma and beta gradients in the same
        # pass (several times faster on CPU than broadcast_mul and broadcast_add)
        return F.BatchNorm(x, gamma, beta, running_mean, running_var, eps=self._epsilon,
                           fix_gamma=False, use_global_stats=True, axis=self._axis,
                           cudnn_off=True)

    def _train_moments(self, F, mean, var, count, **state):
        raise NotImplementedError
