"""Cityscapes evaluation: mIoU from confusion counts, predictions saved for the official
benchmark, and the official evaluation (cityscapesscripts) run in-process."""
import contextlib
import copy
import io
import os

import numpy as np
from PIL import Image

from .data import to_label_ids

__all__ = ['mean_iou', 'save_prediction', 'official_evaluation']


def mean_iou(intersection, union):
    """Per-class IoU (nan for a class absent from both labels and predictions) and their mean
    over the present classes: the Cityscapes convention (GluonCV's SegmentationMetric averages
    over every class; both agree when every class occurs)."""
    intersection, union = np.asarray(intersection, float), np.asarray(union, float)
    iou = np.full(len(union), np.nan)
    present = union > 0
    iou[present] = intersection[present] / union[present]
    return iou, float(iou[present].mean()) if present.any() else float('nan')


def save_prediction(train_ids, image_path, save_dir):
    """Write trainIds as a labelId PNG named like the image (<city>_<seq>_<frame>_leftImg8bit.png)
    in save_dir/<city>/, where the official evaluation finds it; returns its path."""
    city = os.path.basename(os.path.dirname(image_path))
    os.makedirs(os.path.join(save_dir, city), exist_ok=True)
    path = os.path.join(save_dir, city, os.path.basename(image_path))
    Image.fromarray(to_label_ids(train_ids)).save(path)
    return path


def official_evaluation(save_dir, label_files, export_file):
    """cityscapesscripts' evalPixelLevelSemanticLabeling of the predictions in save_dir (found by
    its own file-name matching) against label_files (*_gtFine_labelIds.png); its JSON result goes
    to export_file and is returned. Quiet; its errors (it would exit) raise RuntimeError."""
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official
    args = copy.copy(official.args)
    args.predictionPath, args.predictionWalk = save_dir, None
    args.evalInstLevelScore = all(os.path.isfile(f.replace('_labelIds', '_instanceIds'))
                                  for f in label_files)
    args.exportFile, args.JSONOutput = export_file, True
    args.quiet, args.colorized, args.bold, args.nocol = True, False, '', ''
    output = io.StringIO()
    try:
        with contextlib.redirect_stdout(output):
            predictions = [official.getPrediction(args, f) for f in label_files]
            return official.evaluateImgLists(predictions, list(label_files), args)
    except SystemExit:
        raise RuntimeError('official Cityscapes evaluation failed: %s'
                           % output.getvalue().strip()) from None
