"""Schedules for the two progressive axes of PBN: the local weight w_t and the group size G_t.

A schedule is called as ``schedule(step, group_size)`` and returns the value for that training
step. ``group_size`` is the current G, so that a local-weight schedule can end at 1/G.

    w_t = 1                                   for t <  start
    w_t = 1 + (w_end - 1) * ramp((t - start) / steps)   for start <= t < start + steps
    w_t = w_end                               afterwards,   w_end = final or 1/G

with ramp(u) = u (Linear) or (1 - cos(pi u)) / 2 (Cosine).
"""
import math

__all__ = ['Schedule', 'Constant', 'Linear', 'Cosine', 'Piecewise', 'RAMPS',
           'local_weight_schedule', 'group_size_schedule']


class Schedule:
    """Base class: a value as a function of the training step (and of the group size G)."""

    def __call__(self, step, group_size=1):
        raise NotImplementedError

    def values(self):
        """Every value this schedule can take, when that set is finite and known (else None)."""
        return None


class Constant(Schedule):
    """The same value at every step."""

    def __init__(self, value):
        self.value = value

    def __call__(self, step, group_size=1):
        return self.value

    def values(self):
        return [self.value]

    def __repr__(self):
        return 'Constant(%r)' % (self.value,)


class Linear(Schedule):
    """1 until `start`, then a linear ramp to `final` (default 1/G) over `steps` steps."""

    def __init__(self, start=0, steps=1000, initial=1.0, final=None):
        if steps < 0 or start < 0:
            raise ValueError('start and steps must be >= 0, got start=%r steps=%r' % (start, steps))
        if final is not None and not 0.0 <= final <= 1.0:
            raise ValueError('final local weight must lie in [0, 1], got %r' % (final,))
        self.start, self.steps, self.initial, self.final = start, steps, initial, final

    def _ramp(self, u):
        return u

    def __call__(self, step, group_size=1):
        final = self.final if self.final is not None else 1.0 / group_size
        if step < self.start:
            return self.initial
        if self.steps == 0 or step >= self.start + self.steps:
            return final
        u = (step - self.start) / float(self.steps)
        return self.initial + (final - self.initial) * self._ramp(u)

    def __repr__(self):
        return '%s(start=%r, steps=%r, initial=%r, final=%r)' % (
            type(self).__name__, self.start, self.steps, self.initial, self.final)


class Cosine(Linear):
    """Like Linear, with a half-cosine ramp (slow at both ends)."""

    def _ramp(self, u):
        return (1.0 - math.cos(math.pi * u)) / 2.0


class Piecewise(Schedule):
    """A step function: ``Piecewise({0: 1, 1000: 2, 2000: 4})`` is 1, then 2 from step 1000, ..."""

    def __init__(self, milestones):
        if not milestones:
            raise ValueError('Piecewise needs at least one milestone')
        self.milestones = sorted((int(k), v) for k, v in dict(milestones).items())
        if self.milestones[0][0] != 0:
            raise ValueError('Piecewise milestones must start at step 0, got %r' % (milestones,))

    def __call__(self, step, group_size=1):
        value = self.milestones[0][1]
        for at, v in self.milestones:
            if step >= at:
                value = v
        return value

    def values(self):
        return [v for _, v in self.milestones]

    def __repr__(self):
        return 'Piecewise(%r)' % (dict(self.milestones),)


#: the local-weight ramps by name (layer arguments and config files)
RAMPS = {'linear': Linear, 'cosine': Cosine}


def local_weight_schedule(spec, **ramp_args):
    """A float in [0, 1], a ramp's name ('linear', 'cosine'; made with `ramp_args`: start,
    steps, final), a Schedule, or None (the default Linear())."""
    if spec is None:
        return Linear(**ramp_args)
    if isinstance(spec, Schedule):
        return spec
    if isinstance(spec, str):
        if spec not in RAMPS:
            raise ValueError("unknown local_weight schedule %r: use a float in [0, 1], one of %s, "
                             "or a pbn_gluon.schedules.Schedule" % (spec, sorted(RAMPS)))
        return RAMPS[spec](**ramp_args)
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        if not 0.0 <= spec <= 1.0:
            raise ValueError('local_weight must lie in [0, 1], got %r' % (spec,))
        return Constant(float(spec))
    raise ValueError('local_weight must be a float, %s or a Schedule, got %r'
                     % (' or '.join(repr(k) for k in sorted(RAMPS)), spec))


def group_size_schedule(spec):
    """None (every device of the job), an int, a {step: size} dict, or a Schedule."""
    if spec is None or isinstance(spec, Schedule):
        return spec
    if isinstance(spec, dict):
        return Piecewise(spec)
    if isinstance(spec, int) and not isinstance(spec, bool):
        if spec < 1:
            raise ValueError('group_size must be >= 1, got %r' % (spec,))
        return Constant(spec)
    raise ValueError('group_size must be None, an int, a {step: size} dict or a Schedule, '
                     'got %r' % (spec,))
