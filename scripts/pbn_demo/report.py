"""The demo's table and plot."""
import numpy as np

from pbn_gluon.plots import plot_curves


def summarize(records, norms, ipds):
    rows = []
    for ipd in ipds:
        ok = [r for r in records if r['images_per_device'] == ipd and r['status'] == 'ok']
        bn_step = np.median([r['step_s'] for r in ok if r['norm'] == 'bn']) if any(
            r['norm'] == 'bn' for r in ok) else float('nan')
        for norm in norms:
            rs = [r for r in ok if r['norm'] == norm]
            failed = sum(1 for r in records if r['images_per_device'] == ipd
                         and r['norm'] == norm and r['status'] != 'ok')
            if not rs:
                rows.append((norm, '-', ipd, float('nan'), float('nan'), float('nan'),
                             float('nan'), '-', 0, failed))
                continue
            miou = np.array([r['miou'] for r in rs])
            step = float(np.median([r['step_s'] for r in rs]))
            rows.append((norm, rs[0]['backend'], ipd, miou.mean(), miou.std(), step,
                         step / bn_step, rs[0]['blocking_exchanges_per_step'], len(rs), failed))
    return rows


def print_table(rows):
    head = '%-7s %4s %8s %8s  %-17s %10s %8s %9s %6s' % (
        'norm', 'ipd', 'batch', 'backend', 'val mIoU', 'step [ms]', 'vs bn', 'blocking', 'runs')
    print(head)
    print('-' * len(head))
    for norm, backend, ipd, mean, std, step, ratio, blocking, n, failed in rows:
        runs = '%d' % n + (' (+%d failed)' % failed if failed else '')
        print('%-7s %4d %8s %8s  %-17s %10s %8s %9s %6s' % (
            norm, ipd, '%d/dev' % ipd, backend, '%.4f +- %.4f' % (mean, std) if n else 'n/a',
            '%.1f' % (1000 * step) if n else 'n/a',
            '%.2fx' % ratio if n and np.isfinite(ratio) else 'n/a',
            blocking, runs))


def _wall_time_curve(runs):
    """Training wall time (mean over the runs) and val mIoU at each checkpoint of the runs."""
    n = min(len(r['curve']) for r in runs)
    t = np.mean([[p['train_s'] for p in r['curve'][:n]] for r in runs], axis=0)
    return t, np.array([[p['miou'] for p in r['curve'][:n]] for r in runs])


def plot(records, norms, ipds, path):
    plot_curves(records, norms, ipds, path, _wall_time_curve,
                title=lambda ipd, runs: '%d image(s) per device x %d devices' % (
                    ipd, runs[0]['contexts'] if runs else 0),
                xlabel='training wall time [s] (eval excluded)',
                ylabel='val mIoU (inference, running stats)')
