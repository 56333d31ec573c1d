"""Evaluate a trained DeepLab on the Cityscapes val split: pixel accuracy and mIoU.

    python scripts/eval.py --config configs/X.yaml --checkpoint runs/X
    python scripts/eval.py --config configs/X.yaml --checkpoint runs/X --save-dir results/X \
        --multi-scale

Each full-resolution image is resized so that its long side is base_size and predicted with
sliding crop_size windows (GluonCV's MultiEvalModel); --multi-scale averages the eval_scales
with horizontal flips. Every BatchNorm variant (bn, syncbn, pbn) is evaluated as plain BatchNorm
with its running statistics. --save-dir writes the predictions as labelId PNGs named like the
images, as the official benchmark expects, and the reported mIoU is then the official
evaluation's (cityscapesscripts). Results go to OUT/metrics.json.
"""
import json
import os

import numpy as np
from gluoncv.model_zoo.segbase import MultiEvalModel
from gluoncv.utils.metrics import SegmentationMetric
from tqdm import tqdm

from pbn_gluon.jobs import local_contexts
from pbn_gluon.segmentation import (CityscapesSegmentation, get_segmentation_model,
                                    input_transform)
from pbn_gluon.segmentation.checkpoint import load_params, model_params
from pbn_gluon.segmentation.config import config_parser, run_with_config
from pbn_gluon.segmentation.evaluation import mean_iou, official_evaluation, save_prediction


def parse_args():
    parser = config_parser('Evaluate DeepLab on Cityscapes val')
    parser.add_argument('--checkpoint', required=True,
                        help='model .params file, checkpoint directory or run directory')
    parser.add_argument('--save-dir', help='write the predictions here (official format)')
    parser.add_argument('--multi-scale', action='store_true',
                        help='average the eval_scales of the config, with flips')
    parser.add_argument('--out', help='directory of metrics.json (default: RUN_DIR/eval)')
    return parser.parse_args()


def main():
    run_with_config('eval.py', parse_args(), evaluate)


def evaluate(args, cfg):
    out = args.out or os.path.join(cfg.run_dir, 'eval')
    ctx = local_contexts(cfg.gpus, cfg.devices)

    valset = CityscapesSegmentation(cfg.data_root, cfg.val_split, 'testval', input_transform(),
                                    base_size=cfg.base_size, crop_size=cfg.crop_size)
    net = get_segmentation_model(cfg.model, cfg.backbone, 'gn' if cfg.norm == 'gn' else 'bn', ctx,
                                 aux=cfg.aux, crop_size=cfg.crop_size, base_size=cfg.base_size,
                                 gn_groups=cfg.gn_groups, aspp_rates=cfg.aspp_rates)
    params = model_params(args.checkpoint)
    load_params(net, params, ctx, 'give eval.py another checkpoint (--checkpoint: a .params '
                'file, a checkpoint directory or a run directory)')
    if cfg.hybridize:
        net.hybridize()
    scales = cfg.eval_scales if args.multi_scale else [1.0]
    evaluator = MultiEvalModel(net, valset.num_class, ctx, flip=args.multi_scale, scales=scales)

    metric = SegmentationMetric(valset.num_class)
    for i in tqdm(range(len(valset)), desc='eval'):
        image, target = valset[i]
        scores = evaluator(image.as_in_context(ctx[i % len(ctx)]))
        metric.update(target, scores)
        if args.save_dir:
            save_prediction(scores[0].argmax(axis=0).asnumpy().astype(np.int64),
                            valset.images[i], args.save_dir)

    pix_acc, _ = metric.get()
    iou, miou = mean_iou(metric.total_inter, metric.total_union)
    results = {'checkpoint': params, 'split': cfg.val_split, 'images': len(valset),
               'scales': scales, 'flip': args.multi_scale, 'pixAcc': float(pix_acc),
               'mIoU': miou, 'mIoU_gluoncv': miou,
               'class_IoU': {name: None if np.isnan(v) else float(v)
                             for name, v in zip(valset.CLASSES, iou)}}
    os.makedirs(out, exist_ok=True)
    if args.save_dir:
        official = official_evaluation(args.save_dir, valset.labels,
                                       os.path.join(out, 'cityscapes_official.json'))
        results['mIoU'] = results['mIoU_official'] = official['averageScoreClasses']
    with open(os.path.join(out, 'metrics.json'), 'w') as f:
        json.dump(results, f, indent=1)
    print('pixAcc %.4f  mIoU %.4f%s -> %s' % (pix_acc, results['mIoU'],
                                              ' (official)' if args.save_dir else '',
                                              os.path.join(out, 'metrics.json')))


if __name__ == '__main__':
    main()
