"""Semantic segmentation experiments of the PBN paper: GluonCV DeepLab on Cityscapes with
bn, syncbn, pbn or gn (scripts/train.py, scripts/eval.py, configs/)."""
from .config import load_config
from .data import (IGNORE_LABEL, CityscapesSegmentation, epoch_batches, input_transform,
                   to_label_ids, to_train_ids)
from .models import MODELS, get_segmentation_model, load_backbone, model_from_config
from .norms import NORMS, GroupNorm, get_norm_layer

__all__ = ['load_config', 'IGNORE_LABEL', 'CityscapesSegmentation', 'epoch_batches',
           'input_transform', 'to_label_ids', 'to_train_ids', 'MODELS', 'get_segmentation_model',
           'load_backbone', 'model_from_config', 'NORMS', 'GroupNorm', 'get_norm_layer']
