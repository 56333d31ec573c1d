"""The scripts' plots: one colour per norm, and val-mIoU curves with one panel per number of
images per device (scripts/study.py, scripts/demo.py). matplotlib is imported when a plot is
drawn (headless backend), so importing this module costs nothing."""
__all__ = ['NORM_COLORS', 'pyplot', 'save', 'plot_curves']

NORM_COLORS = {'bn': 'tab:red', 'syncbn': 'tab:blue', 'pbn': 'tab:green', 'pbn+': 'tab:olive',
               'gn': 'tab:gray', 'pbn-avg': 'tab:green', 'pbn-w1/2-rall': 'tab:purple',
               'pbn-w1/4-rall': 'tab:pink', 'pbn-w1/8-rall': 'tab:brown',
               'pbn-w1/2-r50': 'tab:cyan', 'pbn-w1/4-r50': 'tab:orange',
               'pbn-w1/8-r50': 'black', 'pbn-groups': 'gold'}


def pyplot():
    """matplotlib.pyplot on the headless Agg backend."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def save(fig, path):
    """Lay out, write (100 dpi) and close `fig`."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot().close(fig)


def plot_curves(records, norms, ipds, path, curve, title, xlabel, ylabel,
                label=lambda norm, runs: norm):
    """One panel per images-per-device value in `ipds`, in it one curve per norm: the mean and
    standard deviation over the norm's finished runs (status 'ok') of that value.

    curve(runs) -> (x, y): the x values and the array (runs x points) of a norm's runs;
    title(ipd, runs): the panel's title, given the panel's finished runs; label(norm, runs):
    the curve's legend entry."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(ipds), figsize=(5.5 * len(ipds), 4.2), squeeze=False)
    for ax, ipd in zip(axes[0], ipds):
        panel = [r for r in records if r['images_per_device'] == ipd and r['status'] == 'ok']
        for norm in norms:
            runs = [r for r in panel if r['norm'] == norm]
            if not runs:
                continue
            x, y = curve(runs)
            ax.errorbar(x, y.mean(0), yerr=y.std(0), marker='o', capsize=3,
                        color=NORM_COLORS.get(norm), label=label(norm, runs))
        ax.set_title(title(ipd, panel))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    save(fig, path)
