"""GluonCV model-zoo sweep: every zoo model whose constructor takes ``norm_layer``, built with
``nn.BatchNorm`` ('bn'), with ``ProgressiveBatchNorm`` ('pbn') and with BatchNorm then
``convert_norm(net, ProgressiveBatchNorm)`` ('convert'); each on 2 CPU contexts, hybridized,
2 training steps (StatsSync for the PBN variants + a Trainer) and 1 inference.

    python scripts/zoo_sweep.py                          # all models (hours on 2 cores)
    python scripts/zoo_sweep.py --models resnet18_v1b mobilenet0.25 --timeout 300

Every model runs in a subprocess with a time limit, so a crash or an abort is one row; a
variant that kills its process is recorded as 'crash' and the others run in a new process.
Results go to a JSON file as each model finishes (a rerun skips the models already there:
resumable) and to a markdown table beside it.
"""
import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ('bn', 'pbn', 'convert')
DEFAULT_JSON = os.path.join(REPO, 'docs', 'results', 'zoo_sweep.json')
NUM_CONTEXTS = 2
PER_DEVICE = 2

# -- model families and their smallest inputs ---------------------------------------------

SEGMENTATION = ('fcn_', 'psp_', 'deeplab', 'danet_', 'icnet_', 'fastscnn')
DETECTION = ('ssd_', 'yolo3_', 'faster_rcnn', 'mask_rcnn', 'custom_faster', 'custom_mask',
             'center_net', 'custom_rcnn')
VIDEO = ('i3d_', 'r2plus1d', 'p3d_', 'slowfast', 'c3d_', 'tsn_', 'r2plus1d_')
POSE = ('simple_pose', 'alpha_pose', 'mobile_pose')


def family(name):
    if name.startswith(SEGMENTATION):
        return 'segmentation'
    if name.startswith(DETECTION):
        return 'detection'
    if name.startswith(VIDEO) or '_kinetics400' in name or '_sthsthv2' in name \
            or '_ucf101' in name or '_hmdb51' in name:
        return 'video'
    if name.startswith(POSE):
        return 'pose'
    return 'classification'


def candidate_shapes(name, fam):
    """Input shapes (per device) tried in order; the first whose shapes infer is used."""
    b = PER_DEVICE
    if fam == 'video':
        return [(b, 3, t, s, s) for t in (8, 16, 32) for s in (32, 64, 112, 224)]
    if fam == 'pose':
        return [(b, 3, h, h * 3 // 4) for h in (64, 128, 256)]
    if fam == 'segmentation':
        return [(b, 3, s, s) for s in (64, 96, 128, 256, 480)]
    if fam == 'detection':
        return [(b, 3, s, s) for s in (128, 256, 300, 512)]
    if name.startswith('cifar_'):
        return [(b, 3, 32, 32)]
    return [(b, 3, s, s) for s in (32, 64, 128, 224, 299, 331)]


# -- one model in this process (the worker) -------------------------------------------------

def _getter(name):
    from gluoncv.model_zoo.model_zoo import _models
    return _models[name.lower()]


def build(name, norm_layer, shape=None):
    """The zoo model `name` with `norm_layer`, random weights, nothing downloaded."""
    getter = _getter(name)
    kwargs = dict(pretrained=False, norm_layer=norm_layer)
    params = inspect.signature(getter).parameters
    open_kwargs = any(p.kind == p.VAR_KEYWORD for p in params.values())
    if 'pretrained_base' in params or open_kwargs:
        kwargs['pretrained_base'] = False
    if family(name) == 'segmentation' and shape is not None:
        kwargs.update(crop_size=shape[-1], base_size=shape[-1])
    while True:
        try:
            return getter(**kwargs)
        except TypeError as err:        # an optional keyword this constructor does not take
            dropped = [k for k in ('pretrained_base', 'crop_size', 'base_size')
                       if k in kwargs and "'%s'" % k in str(err)]
            if not dropped:
                raise
            for key in dropped:
                del kwargs[key]


def takes_norm_layer(name):
    """Does building `name` with norm_layer=X create X layers? (the sweep's model list)"""
    from mxnet.gluon import nn
    made = []

    class Recorder(nn.BatchNorm):
        def __init__(self, *args, **kwargs):
            made.append(1)
            super().__init__(*args, **kwargs)
    try:
        build(name, Recorder)
    except Exception:                   # noqa: BLE001 - a constructor without norm_layer
        return False
    return bool(made)


def choose_shape(name):
    """The first candidate input shape the BatchNorm model infers shapes for, symbolically
    (nothing runs)."""
    import mxnet as mx
    from mxnet.gluon import nn
    from pbn_gluon.export import flatten_outputs
    fam = family(name)
    last = None
    for shape in candidate_shapes(name, fam):
        try:
            net = build(name, nn.BatchNorm, shape)
            out = net(mx.sym.var('data'))
            if not isinstance(out, mx.sym.Symbol):
                out = mx.sym.Group(list(flatten_outputs(out)))
            out.infer_shape(data=shape)
            return shape
        except Exception as err:        # noqa: BLE001 - too small for this model: try larger
            last = err
    raise RuntimeError('no input shape of %s fits: %s' % (candidate_shapes(name, fam), last))


def _train_args(name, shape, ctx):
    """The extra inputs a detector's training forward needs (ground-truth boxes, labels)."""
    import mxnet as mx
    if family(name) != 'detection' or not ('rcnn' in name):
        return ()
    b, size = shape[0], shape[-1]
    box = mx.nd.array([[[1, 2, size // 2, size // 2 + 3]]] * b, ctx=ctx)
    label = mx.nd.zeros((b, 1, 1), ctx=ctx)
    return (box, label)


def _initializer():
    """Xavier for weights; a vector (a norm layer's gamma, beta or running statistic that
    carries no initializer of its own, as in SSD's symbol-built extra layers) gets BatchNorm's
    values by its name instead of Xavier's error."""
    import mxnet as mx

    class SweepInit(mx.init.Xavier):
        def _init_weight(self, name, arr):
            if len(arr.shape) >= 2:
                return super()._init_weight(name, arr)
            arr[:] = 1.0 if str(name).endswith(('gamma', 'running_var', 'moving_var')) else 0.0
    return SweepInit()


def _build_variant(name, variant, shape, ctxs):
    """The model with BatchNorm, with ProgressiveBatchNorm, or with BatchNorm converted by
    convert_norm, initialized on every context and hybridized."""
    import mxnet as mx
    from mxnet.gluon import nn
    import pbn_gluon

    mx.random.seed(0)
    if variant == 'bn':
        net = build(name, nn.BatchNorm, shape)
    elif variant == 'pbn':
        net = build(name, pbn_gluon.ProgressiveBatchNorm, shape)
    else:
        net = build(name, nn.BatchNorm, shape)
        net.initialize(_initializer(), ctx=ctxs)
        net.collect_params().reset_ctx(ctxs)
        net(mx.nd.zeros(shape, ctx=ctxs[0]))            # materialise deferred shapes
        pbn_gluon.convert_norm(net, pbn_gluon.ProgressiveBatchNorm)
        net.collect_params()                             # raises on duplicated names
    net.initialize(_initializer(), ctx=ctxs)
    net.collect_params().reset_ctx(ctxs)                 # zoo heads init on one context
    net.hybridize()
    return net


def _inference_note(outs):
    """A note for the table when an inference output is not finite (not a failure)."""
    import numpy as np
    from pbn_gluon.export import flatten_outputs

    for out in outs:
        for o in flatten_outputs(out):
            if o.dtype == np.float32 and not np.all(np.isfinite(o.asnumpy())):
                # random weights and running statistics of 2 steps: deep nets can overflow in
                # inference (measured on i3d: activations x10-100 a block, inf by layer 4)
                return 'inference output not finite (random weights, 2-step running stats)'
    return None


def run_variant(name, variant, shape, steps=2):
    """Build, train 2 steps on 2 CPU contexts, infer once; raises on any failure."""
    import mxnet as mx
    import numpy as np
    from mxnet import autograd, gluon
    import pbn_gluon
    from pbn_gluon.export import flatten_outputs

    ctxs = [mx.cpu(i) for i in range(NUM_CONTEXTS)]
    net = _build_variant(name, variant, shape, ctxs)
    sync = None
    if variant != 'bn':
        sync = pbn_gluon.StatsSync(net, pbn_gluon.LocalComm(ctxs))
    trainer = gluon.Trainer(net.collect_params(), 'sgd', {'learning_rate': 1e-4})
    rng = np.random.RandomState(0)
    losses = []
    for _ in range(steps):
        xs = [mx.nd.array(rng.normal(size=shape), ctx=c) for c in ctxs]
        with autograd.record():
            outs = [net(x, *_train_args(name, shape, x.context)) for x in xs]
            step_losses = [sum(o.astype('float32').mean() for o in flatten_outputs(out)
                               if o.dtype == np.float32)
                           for out in outs]
        autograd.backward(step_losses)
        if sync is not None:
            sync.step()
        trainer.step(shape[0] * len(ctxs), ignore_stale_grad=True)
        losses.append(float(sum(l.asscalar() for l in step_losses)))
    if not np.all(np.isfinite(losses)):
        raise FloatingPointError('training loss not finite: %s' % losses)
    outs = [net(mx.nd.array(rng.normal(size=shape), ctx=c)) for c in ctxs]
    info = {'loss': losses[-1]}
    note = _inference_note(outs)
    if note:
        info['note'] = note
    mx.nd.waitall()
    return info


def _reason(err):
    """One line for the table: an MXNet 'Check failed' line, or the error's last message line
    (MXNet errors put the useful line after a C++ stack trace)."""
    text = err if isinstance(err, str) else '%s: %s' % (type(err).__name__, err)
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    useful = [l for l in lines if not l.startswith(('File ', 'Traceback', '[bt]', 'Stack trace',
                                                    '^', '~'))
              and not re.match(r'^\d+: ', l) and not re.match(r'^[A-Za-z]+Error: Traceback', l)]
    checks = [l for l in useful if 'Check failed' in l]
    if checks:
        line = checks[0]
    elif 'Traceback (most recent call last)' in text or '  File "' in text:
        line = (useful or lines or ['unknown error'])[-1]
    else:
        line = (lines or ['unknown error'])[0]
    if not isinstance(err, str) and type(err).__name__ not in line:
        line = '%s: %s' % (type(err).__name__, line)
    return line[:300]


def worker(name, variants, out_path):
    """Run the variants of one model; one JSON line per variant, written as each finishes
    (what the parent reads if this process dies)."""
    def emit(row):
        with open(out_path, 'a') as f:
            f.write(json.dumps(row) + '\n')
    try:
        shape = choose_shape(name)
    except Exception as err:            # noqa: BLE001
        for v in variants:
            emit({'variant': v, 'status': 'fail', 'reason': _reason(err)})
        return
    emit({'shape': list(shape)})
    for v in variants:
        emit({'variant': v, 'status': 'started'})
        if os.environ.get('ZOO_SWEEP_ABORT_IN') == v:     # the tests' stand-in for a crash
            os.abort()
        t0 = time.time()
        try:
            info = run_variant(name, v, shape)
            emit(dict({'variant': v, 'status': 'ok', 'seconds': round(time.time() - t0, 1)},
                      **info))
        except Exception as err:        # noqa: BLE001 - a row of the table
            from pbn_gluon.files import portable
            emit({'variant': v, 'status': 'fail', 'reason': _reason(err),
                  'seconds': round(time.time() - t0, 1),
                  'traceback': portable(traceback.format_exc()[-2000:])})


# -- the sweep (the parent) -----------------------------------------------------------------

def _worker_env(extra=None):
    env = dict(os.environ, **(extra or {}))
    env.setdefault('PYTHONWARNINGS', 'ignore')      # keep a crash's stderr tail readable
    env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
    env.setdefault('OMP_NUM_THREADS', '1')
    env.setdefault('MXNET_SUBGRAPH_VERBOSE', '0')
    return env


# MXNet's oneDNN (MKLDNN) CPU backend rejects views of some 5-D arrays ("Check failed:
# !is_view", ndarray.cc), with plain BatchNorm too: such a model is run again without it
MKLDNN_FAILURES = ('is_view', 'could not construct a sub-memory', 'mkldnn', 'MKLDNN', 'dnnl')


def _mkldnn_failure(row, variants=VARIANTS):
    return any(m in row.get(v, {}).get('reason', '') for v in variants for m in MKLDNN_FAILURES)


def sweep_model(name, timeout, variants=VARIANTS):
    """One row: {'family', 'shape', 'bn': {...}, 'pbn': {...}, 'convert': {...}}, and
    'without_mkldnn' (the same, run with MXNET_MKLDNN_ENABLED=0) when a variant failed in
    MXNet's oneDNN backend."""
    row = _sweep_model(name, timeout, variants)
    if _mkldnn_failure(row, variants):
        again = _sweep_model(name, timeout, variants, {'MXNET_MKLDNN_ENABLED': '0'})
        row['without_mkldnn'] = {v: again[v] for v in variants}
    return row


def _run_worker(name, variants, timeout, env):
    """One worker process for `variants` of `name`: (its JSON lines, exit code or None when it
    timed out, the tail of its stderr, timed out)."""
    fd, path = tempfile.mkstemp(suffix='.jsonl')
    os.close(fd)
    cmd = [sys.executable, os.path.abspath(__file__), '--worker', name,
           '--variants', ','.join(variants), '--worker-out', path]
    try:
        proc = subprocess.run(cmd, env=_worker_env(env), capture_output=True, text=True,
                              timeout=timeout)
        code, tail, timed_out = proc.returncode, (proc.stderr or '')[-3000:], False
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr or b''
        code, timed_out = None, True
        tail = (err.decode(errors='replace') if isinstance(err, bytes) else err)[-3000:]
    with open(path) as f:
        lines = [json.loads(l) for l in f if l.strip()]
    os.unlink(path)
    return lines, code, tail, timed_out


def _read_worker_lines(row, lines):
    """Put a worker's results (and the model's input shape) into `row`; the variant it had
    started and not finished, if any."""
    started = None
    for line in lines:
        if 'shape' in line:
            row['shape'] = line['shape']
        elif line['status'] == 'started':
            started = line['variant']
        else:
            row[line['variant']] = {k: v for k, v in line.items() if k != 'variant'}
            started = None
    return started


def _sweep_model(name, timeout, variants, env=None):
    """A crashed worker is restarted for the variants after the one it died in."""
    row = {'family': family(name)}
    todo = list(variants)
    deadline = time.time() + timeout
    while todo:
        left = deadline - time.time()
        if left <= 0:
            for v in todo:
                row[v] = {'status': 'timeout', 'reason': 'not reached within %d s' % timeout}
            break
        lines, code, tail, timed_out = _run_worker(name, todo, left, env)
        started = _read_worker_lines(row, lines)
        todo = [v for v in todo if v not in row]
        if not todo:
            break
        current = started or todo[0]
        if timed_out:
            row[current] = {'status': 'timeout', 'reason': 'over %d s' % timeout}
            for v in todo:
                row.setdefault(v, {'status': 'timeout', 'reason': 'not reached within %d s'
                                   % timeout})
            break
        last = [l for l in tail.strip().splitlines() if l.strip()][-1:] or ['no output']
        row[current] = {'status': 'crash', 'reason': 'exit %s: %s' % (code, last[0][:250]),
                        'stderr': tail}
        todo = [v for v in todo if v not in row]
    return row


def classify(row):
    """Whose failure: 'ok', 'model' (fails with BatchNorm too), 'ours' (BN passes), 'mkldnn'
    (fails with BatchNorm too in MXNet's oneDNN backend, all pass without it) or 'timeout'."""
    whose = _classify(row)
    if whose == 'model' and 'without_mkldnn' in row:
        alt = _classify(row['without_mkldnn'])
        return {'ok': 'mkldnn', 'ours': 'ours'}.get(alt, whose)
    return whose


NO_LAYER = 'has no ProgressiveBatchNorm or SyncBatchNorm layer'
#: convert_norm's refusal of a SymbolBlock (a fixed graph: GluonCV's SSD backbones)
SYMBOL_BLOCK = 'is a SymbolBlock, a fixed graph'


def _classify(row):
    bn = row.get('bn', {}).get('status')
    if bn == 'ok' and all(NO_LAYER in row.get(v, {}).get('reason', '')
                          for v in ('pbn', 'convert')):
        return 'no-layer'       # the built model holds no norm layer Block to swap or sync
    others = [row.get(v, {}).get('status') for v in ('pbn', 'convert')]
    if bn == 'ok' and all(s == 'ok' for s in others):
        return 'ok'
    if bn == 'ok' and others[0] == 'ok' and SYMBOL_BLOCK in row['convert'].get('reason', ''):
        return 'symbol-block'   # PBN built with norm_layer= trains; convert_norm says to do so
    if bn != 'ok':
        return 'model' if bn in ('fail', 'crash') else 'timeout'
    return 'ours' if any(s in ('fail', 'crash') for s in others) else 'timeout'


WHOSE = {'ok': 'pass all three', 'model': 'fail with BatchNorm too (the model\'s own)',
         'ours': 'fail with PBN only',
         'symbol-block': 'train with PBN built with norm_layer= (convert_norm refuses their '
                         'SymbolBlock backbone and says so)',
         'no-layer': 'keep no norm layer Block (norm_layer does not reach a layer that can be '
                     'swapped or synchronised)',
         'timeout': 'timed out', 'mkldnn': 'fail with BatchNorm too in MXNet\'s oneDNN (MKLDNN) '
                                           'backend and pass all three without it'}


def _table_row(name, row):
    """The markdown table's line of one model."""
    reasons = []
    for v in VARIANTS:
        cell = row.get(v, {})
        if cell.get('traceback'):
            cell['reason'] = _reason(cell['traceback'])
        if cell.get('note'):
            reasons.append('%s: %s' % (v, cell['note']))
        if cell.get('status') not in ('ok', None) and cell.get('reason'):
            r = cell['reason'].replace('|', '/').replace('\n', ' ')
            if r not in reasons:
                reasons.append(r)
    if 'without_mkldnn' in row:
        reasons.append('without MKLDNN (MXNET_MKLDNN_ENABLED=0): ' + ', '.join(
            '%s %s' % (label, row['without_mkldnn'].get(v, {}).get('status', '-'))
            for v, label in zip(VARIANTS, ('BN', 'PBN', 'convert'))))
    shape = 'x'.join(str(s) for s in row.get('shape', [])[1:]) or '-'
    return '| %s | %s | %s | %s | %s | %s | %s | %s |' % (
        name, row.get('family', ''), shape,
        *[row.get(v, {}).get('status', '-') for v in VARIANTS], classify(row),
        '; '.join(reasons)[:400])


NOTES = '## What the rows show'     # a hand-written section of the table's file, kept on rewrite


def kept_notes(path):
    """The hand-written section of the markdown file at `path` (from NOTES to the table), or
    no lines when there is none."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        text = f.read()
    start = text.find(NOTES)
    if start < 0:
        return []
    return ['', text[start:text.index('| model |', start)].rstrip('\n')]


def write_markdown(results, path, pending=()):
    notes = kept_notes(path)
    rows = sorted(results.items())
    counts = {}
    for _, row in rows:
        counts[classify(row)] = counts.get(classify(row), 0) + 1
    out = ['# GluonCV model-zoo sweep', '',
           'Generated by `python scripts/zoo_sweep.py` (%s). Every zoo model whose constructor '
           'takes `norm_layer`, on %d CPU contexts, hybridized, 2 training steps (StatsSync + '
           'Trainer) and 1 inference, with `nn.BatchNorm` (BN), `ProgressiveBatchNorm` (PBN) '
           'and BatchNorm converted by `convert_norm` (convert).' % (
               time.strftime('%Y-%m-%d', time.gmtime()), NUM_CONTEXTS), '',
           'Summary: %d models run: %s.' % (len(rows), ', '.join(
               '%d %s' % (n, WHOSE[k]) for k, n in sorted(counts.items())))]
    if pending:
        out += ['', 'Not reached in this run (%d): %s.' % (len(pending), ', '.join(pending))]
    out += notes
    out += ['', '| model | family | input | BN | PBN | convert_norm | whose | reason |',
            '|---|---|---|---|---|---|---|---|']
    out += [_table_row(name, row) for name, row in rows]
    with open(path, 'w') as f:
        f.write('\n'.join(out) + '\n')


def discover(timeout, chunk=20):
    """The zoo models whose constructor takes norm_layer, checked by building each one in
    subprocesses of `chunk` models (some constructors initialize their heads); a model whose
    check kills its process counts as not taking norm_layer."""
    from gluoncv.model_zoo.model_zoo import _models
    names, found = sorted(_models), []
    while names:
        part, names = names[:chunk], names[chunk:]
        fd, path = tempfile.mkstemp(suffix='.jsonl')
        os.close(fd)
        cmd = [sys.executable, os.path.abspath(__file__), '--discover', '--worker-out', path,
               '--models'] + part
        try:
            subprocess.run(cmd, env=_worker_env(), capture_output=True, text=True,
                           timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        with open(path) as f:
            done = [json.loads(l) for l in f if l.strip()]
        os.unlink(path)
        found += [d['model'] for d in done if d['takes']]
        checked = {d['model'] for d in done}
        rest = [m for m in part if m not in checked]
        if rest:                        # the first unchecked one killed the process: skip it
            names = rest[1:] + names
    return found


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--models', nargs='*', help='zoo model names (default: every zoo model '
                    'whose constructor takes norm_layer)')
    ap.add_argument('--timeout', type=float, default=600, help='seconds per model (default 600)')
    ap.add_argument('--json', default=DEFAULT_JSON, help='results (resumable)')
    ap.add_argument('--md', default=None, help='markdown table (default: beside --json)')
    ap.add_argument('--rerun', action='store_true', help='run models already in --json again')
    ap.add_argument('--limit', type=int, default=None, help='stop after this many models')
    ap.add_argument('--table-only', action='store_true',
                    help='only write the markdown table from --json (runs nothing)')
    ap.add_argument('--worker', help=argparse.SUPPRESS)
    ap.add_argument('--variants', default=','.join(VARIANTS), help=argparse.SUPPRESS)
    ap.add_argument('--worker-out', help=argparse.SUPPRESS)
    ap.add_argument('--discover', action='store_true', help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def discover_worker(models, out):
    """In a subprocess of discover(): a line {model, takes} per model, as soon as it is known."""
    import gc
    for name in models:
        takes = takes_norm_layer(name)
        gc.collect()
        with open(out, 'a') as f:
            f.write(json.dumps({'model': name, 'takes': takes}) + '\n')


def write_table_only(path, md):
    """The markdown table of the results in `path` (nothing is run)."""
    with open(path) as f:
        data = json.load(f)
    listed = data.get('models_listed') or []
    write_markdown(data['models'], md, pending=[m for m in listed if m not in data['models']])


def load_results(path):
    """(results per model, the models listed by the run that wrote them) of a results file; an
    absent file gives ({}, None)."""
    if not os.path.exists(path):
        return {}, None
    with open(path) as f:
        data = json.load(f)
    return data.get('models', {}), data.get('models_listed')


def sweep(args, md):
    """Sweep the models not yet in the results (all with --rerun), saving after each; then run
    without oneDNN the rows of an earlier run that failed in it."""
    from tqdm import tqdm
    results, listed = load_results(args.json)
    models = args.models or listed or discover(args.timeout)
    listed = listed or (None if args.models else models)
    todo = [m for m in models if args.rerun or m not in results]
    if args.limit is not None:
        todo = todo[:args.limit]
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)

    def save():
        from pbn_gluon.files import write_json
        write_json(args.json, {'contexts': NUM_CONTEXTS, 'models_listed': listed,
                               'models': results}, sort_keys=True)
        write_markdown(results, md, pending=[m for m in (listed or models) if m not in results])
    save()
    bar = tqdm(todo, unit='model')
    for name in bar:
        bar.set_postfix_str(name)
        results[name] = sweep_model(name, args.timeout)
        save()
    # rows of an earlier run that failed in oneDNN and were not yet run without it
    for name in [m for m, row in results.items()
                 if _mkldnn_failure(row) and 'without_mkldnn' not in row]:
        again = _sweep_model(name, args.timeout, VARIANTS, {'MXNET_MKLDNN_ENABLED': '0'})
        results[name]['without_mkldnn'] = {v: again[v] for v in VARIANTS}
        save()


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        worker(args.worker, args.variants.split(','), args.worker_out)
    elif args.discover:
        discover_worker(args.models, args.worker_out)
    elif args.table_only:
        write_table_only(args.json, args.md or os.path.splitext(args.json)[0] + '.md')
    else:
        sweep(args, args.md or os.path.splitext(args.json)[0] + '.md')
    return 0

if __name__ == '__main__':
    sys.exit(main())
