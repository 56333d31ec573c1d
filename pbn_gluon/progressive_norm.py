"""Progressive Batch Normalization (see docs/pbn-spec in the README).

On device k at step t, per channel, with local moments (m, v) of the current batch and global
moments (M, V) of the PREVIOUS step over the device's group (count-weighted, exchanged
asynchronously by StatsSync):

    mu  = w m + (1 - w) M
    var = w v + (1 - w) V + w (1 - w) (m - M)^2      (= w E[x^2] + (1-w) Q - mu^2, never < 0)
    y   = gamma (x - mu) / sqrt(var + eps) + beta

Gradients flow through m and v only; M, V and w are inputs of the graph. w = 1 gives plain
BatchNorm, forward and backward; so does a step with no group sums yet (the first one).
A layer is ``pbn_batch_norm`` (two passes over memory forward, two backward), its mode flag
(batch_stats.training_flag: three one-element operators, a BatchNorm of a constant that tells
it the engine's mode without drawing random numbers), and native identities in front of the
inputs whose gradients may be accumulated.
"""
from .batch_stats import BatchStatsNorm, training_flag
from .errors import ConfigError
from .schedules import local_weight_schedule, group_size_schedule

__all__ = ['ProgressiveBatchNorm']


class ProgressiveBatchNorm(BatchStatsNorm):
    """Progressive Batch Normalization: a drop-in replacement for mxnet.gluon.nn.BatchNorm.

    Parameters
    ----------
    local_weight : float, 'linear', 'cosine' or pbn_gluon.schedules.Schedule, default None
        Weight w_t of the current device's own moments. None is ``Linear()``: 1 at step 0, then
        linearly to 1/G over 1000 steps. 1.0 is plain per-device BatchNorm.
    group_size : int, {step: int} or Schedule, default None
        Number of consecutive devices (by rank) whose moments are pooled. None: all devices.
        Must divide the device count.
    variant : 'plus' (default), 'paper' or 'paper-minimal'
        The defaults of the next two arguments: 'plus' averages the exchanged moments
        (global_momentum 0.8) and mixes the backward (backward='progressive'), which recovered
        SyncBN's accuracy gain on the demo and on GluonCV DeepLab (docs/results.md); 'paper' is
        the paper's algorithm in the reading its references support and the DeepLab sensitivity
        study ranked first of eight (docs/pbn-spec.md): averaged moments, local backward
        (0.8, 'local'); 'paper-minimal' is the literal reading, the previous step's moments
        alone (0, 'local'). Arguments given explicitly win.
    global_momentum : float in [0, 1), default by `variant`
        The group sums the layer mixes in are an exponential average over the exchanges,
        G <- a G + (1 - a) G_t (count-weighted, since G holds sums); 0 is the specification's
        previous step alone. An extension of the paper (docs/pbn-spec.md). The running
        statistics follow the moments of G too: BatchNorm's own (w = 1) only when a = 0.
    backward : 'local' or 'progressive', default by `variant`
        'local' is the specification: the group moments are constants, so the backward's
        centring terms are scaled by w. 'progressive' mixes them like the forward,
        dx = gamma r (dy - [w mean(dy) + (1-w) Bbar] - xhat [w mean(dy xhat) + (1-w) Gbar]),
        with Bbar, Gbar the group means of dy and dy*xhat of earlier steps, carried in the same
        exchange (5 rows a channel). The operator's backward writes this device's
        [sum dy, sum dy xhat] beside the forward's sums: no gradient of gamma or beta is
        needed, and ``sync.step()`` may come before or after ``trainer.step()``.
    **kwargs
        Every argument of mxnet.gluon.nn.BatchNorm (axis, momentum, epsilon, center, scale,
        use_global_stats, the four initializers, in_channels, prefix, params).

    Use it with ``pbn_gluon.StatsSync(net, comm)`` and call ``sync.step()`` once per training
    iteration: that exchanges the moments (one fused non-blocking exchange for all layers) and
    updates the running statistics from the global moments. Without any StatsSync the layer is
    plain per-device BatchNorm in training, whose running statistics are never updated.
    """

    #: the defaults of (global_momentum, backward) per variant
    VARIANTS = {'plus': (0.8, 'progressive'), 'paper': (0.8, 'local'),
                'paper-minimal': (0.0, 'local')}

    def __init__(self, local_weight=None, group_size=None, global_momentum=None,
                 backward=None, variant='plus', **kwargs):
        if variant not in self.VARIANTS:
            raise ValueError('variant must be one of %s, got %r'
                             % (', '.join(map(repr, self.VARIANTS)), variant))
        default_momentum, default_backward = self.VARIANTS[variant]
        global_momentum = default_momentum if global_momentum is None else global_momentum
        backward = default_backward if backward is None else backward
        if not 0.0 <= global_momentum < 1.0:
            raise ValueError('global_momentum must lie in [0, 1), got %r' % (global_momentum,))
        if backward not in ('local', 'progressive'):
            raise ValueError("backward must be 'local' or 'progressive', got %r" % (backward,))
        super().__init__(exchange_rows=5 if backward == 'progressive' else 3, **kwargs)
        self.backward_mode, self.variant = backward, variant
        self.local_weight_schedule = local_weight_schedule(local_weight)
        self.group_size_schedule = group_size_schedule(group_size)
        self.global_momentum = float(global_momentum)
        in_channels = kwargs.get('in_channels', 0)
        self.global_sums = self._state_param('global_sums', (self.exchange_rows, in_channels),
                                             dtype='float64')
        self.local_weight = self._state_param('local_weight', (1,), init='ones',
                                              per_channel=False)
        #: the zero moving statistics of the training-mode flag (batch_stats.training_flag)
        self.flag_stats = self._state_param('flag_stats', (1,), per_channel=False)

    def group_size_at(self, step, num_devices):
        """G_t: the group size at `step` for a job of `num_devices` devices."""
        if self.group_size_schedule is None:
            return num_devices
        size = int(self.group_size_schedule(step))
        if size < 1 or num_devices % size:
            raise ConfigError('%s: group size %d at step %d does not divide the %d devices'
                              % (self.name, size, step, num_devices))
        return size

    def local_weight_at(self, step, group_size):
        """w_t for `step` with the group size G at that step."""
        w = float(self.local_weight_schedule(step, group_size))
        if not 0.0 <= w <= 1.0:
            raise ValueError('%s: local weight %r at step %d is outside [0, 1]'
                             % (self.name, w, step))
        return w

    def check_devices(self, num_devices):
        """Fail early when a known group size does not divide the device count."""
        schedule = self.group_size_schedule
        for size in (schedule.values() or []) if schedule is not None else []:
            if int(size) < 1 or num_devices % int(size):
                raise ConfigError('%s: group size %r does not divide the %d devices of the '
                                  'job' % (self.name, size, num_devices))

    def _group_inputs(self, F, x, batch_sums, global_sums, local_weight, flag_stats):
        return global_sums, local_weight, training_flag(F, flag_stats)

    def __repr__(self):
        return '%s, local_weight=%r, group_size=%r, global_momentum=%r, backward=%r)' % (
            super().__repr__()[:-1], self.local_weight_schedule, self.group_size_schedule,
            self.global_momentum, self.backward_mode)
