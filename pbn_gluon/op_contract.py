"""The fused operators' input contracts: each operator's inputs by name, in the order the C++
side takes them, and the encoding of pbn_batch_norm's mode flag.

csrc/pbn_ops.h declares the same lists as X-macros (``PBN_NORM_INPUTS`` ...), from which the
C++ input enums, dtypes and messages are made, and the library reports them
(``pbn_operator_inputs``); ``pbn_gluon.ops.load()`` checks that they equal ``INPUTS`` before
anything calls an operator. Callers build the positional inputs by name with ``inputs``:

    F.pbn_batch_norm(*op_contract.inputs('pbn_batch_norm', data=x, gamma=gamma, ...), axis=1)
"""

__all__ = ['INPUTS', 'inputs', 'parse_reported', 'mismatches', 'TRAINING', 'INFERENCE',
           'mode_value']

#: operator -> its inputs in order (mutated auxiliary inputs included, last)
INPUTS = {
    'pbn_batch_norm': ('data', 'gamma', 'beta', 'running_mean', 'running_var', 'group_sums',
                       'local_weight', 'is_inference', 'batch_sums'),
    'pbn_batch_sums': ('data',),
    'pbn_running_update': ('gather', 'momentum', 'stats', 'running_mean', 'running_var'),
    'pbn_take_sums': ('local',),
    'pbn_accept_sums': ('local', 'group', 'rate', 'global_sums', 'fresh', 'health'),
}

#: pbn_batch_norm's ``is_inference`` input: one element, TRAINING while MXNet trains,
#: INFERENCE otherwise (pbn_math.h: pbn_is_training reads anything below 1/2 as training)
TRAINING, INFERENCE = 0.0, 1.0


def mode_value(is_train):
    """The value of the ``is_inference`` input for MXNet's training flag `is_train`."""
    return TRAINING if is_train else INFERENCE


def inputs(op, **named):
    """`op`'s positional inputs, from keyword arguments named as in ``INPUTS[op]``; a missing
    or unknown name is a TypeError that lists the contract."""
    names = INPUTS[op]
    missing = [n for n in names if n not in named]
    unknown = sorted(set(named) - set(names))
    if missing or unknown:
        raise TypeError('%s takes the inputs (%s): %s' % (
            op, ', '.join(names), '; '.join(filter(None, (
                missing and 'missing ' + ', '.join(missing),
                unknown and 'unknown ' + ', '.join(unknown))))))
    return [named[n] for n in names]


def parse_reported(text):
    """{operator: input names} from the library's report, ``op=a,b,c;op2=d;`` (pbn_ops.cc:
    pbn_operator_inputs; empty entries are ignored)."""
    contract = {}
    for entry in filter(None, (e.strip() for e in text.split(';'))):
        op, sep, names = entry.partition('=')
        if not sep:
            raise ValueError('malformed operator contract entry %r' % entry)
        contract[op.strip()] = tuple(n.strip() for n in names.split(',') if n.strip())
    return contract


def mismatches(reported, expected=None):
    """Lines that say where the library's `reported` contract ({op: names}) and `expected`
    (``INPUTS``) differ; empty when they agree."""
    expected = INPUTS if expected is None else expected
    lines = []
    for op in sorted(set(expected) | set(reported)):
        if op not in reported:
            lines.append('%s: not in the library' % op)
        elif op not in expected:
            lines.append('%s: in the library but not in pbn_gluon.op_contract' % op)
        elif tuple(reported[op]) != tuple(expected[op]):
            lines.append('%s: the library takes (%s), pbn_gluon.op_contract says (%s)'
                         % (op, ', '.join(reported[op]), ', '.join(expected[op])))
    return lines
