"""The demo's net: a small fully-convolutional segmentation net built with a norm_layer, and the
norm layers it is compared with."""
from .data import NUM_CLASSES

PBN_RAMP = 0.25        # fraction of the run over which PBN's local weight goes from 1 to w_end

#: the row "pbn+": PBN with this project's two extensions (docs/pbn-spec.md) at the library's
#: final weight 1/G, the best variant of the ablation study (docs/results.md)
PBN_PLUS = {'pbn_final': None, 'pbn_global_momentum': 0.8, 'pbn_backward': 'progressive'}


def group_schedule(sizes, steps):
    """Group sizes growing through `sizes` at equal fractions of the run ({step: size}), or
    None (all devices)."""
    if not sizes:
        return None
    return {int(k * steps / len(sizes)): size for k, size in enumerate(sizes)}


def norm_factory(norm, steps, ctxs, pbn_final=None, pbn_global_momentum=0.0,
                 pbn_backward='local', pbn_group_sizes=None):
    """The demo's norm layer for c channels: pbn_gluon's norm factory (GluonCV's norm_layer),
    PBN's local weight going from 1 to pbn_final (default 1/G) over the first PBN_RAMP of the
    run, GN with 4 groups. "pbn+" is PBN with PBN_PLUS."""
    from pbn_gluon.segmentation.norms import get_norm_layer, pbn_local_weight
    if norm == 'pbn+':
        norm, pbn_final = 'pbn', PBN_PLUS['pbn_final']
        pbn_global_momentum = PBN_PLUS['pbn_global_momentum']
        pbn_backward = PBN_PLUS['pbn_backward']
    ramp = pbn_local_weight('linear', start=0, steps=max(1, int(PBN_RAMP * steps)),
                            final=pbn_final)
    layer = get_norm_layer(norm, ctxs, in_process=len(ctxs) > 1, gn_groups=4, pbn_kwargs={
        'local_weight': ramp, 'global_momentum': pbn_global_momentum,
        'backward': pbn_backward, 'group_size': group_schedule(pbn_group_sizes, steps)})
    return lambda c: layer(in_channels=c)


def build_net(norm_layer, width=16):
    """conv(1->w) | conv s2 (w->2w) | conv 2w | conv 2w (dilation 2) | up x2 | conv (3w->w)
    with a skip from the first block | 1x1 classifier; every conv but the last: norm + ReLU."""
    from mxnet.gluon import nn

    class SegNet(nn.HybridBlock):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            with self.name_scope():
                def block(cin, cout, stride=1, dilation=1):
                    seq = nn.HybridSequential()
                    seq.add(nn.Conv2D(cout, 3, strides=stride, padding=dilation,
                                      dilation=dilation, use_bias=False, in_channels=cin),
                            norm_layer(cout), nn.Activation('relu'))
                    return seq
                self.stem = block(1, width)
                self.down = block(width, 2 * width, stride=2)
                self.mid1 = block(2 * width, 2 * width)
                self.mid2 = block(2 * width, 2 * width, dilation=2)
                self.fuse = block(3 * width, width)
                self.head = nn.Conv2D(NUM_CLASSES, 1, in_channels=width)

        def hybrid_forward(self, F, x):
            s = self.stem(x)
            h = self.mid2(self.mid1(self.down(s)))
            h = F.UpSampling(h, scale=2, sample_type='nearest')
            return self.head(self.fuse(F.concat(h, s, dim=1)))

    return SegNet()
