"""Cityscapes for semantic segmentation: the official layout and label table, GluonCV's
augmentation, and a data order that depends only on (seed, epoch).

    ROOT/leftImg8bit/{split}/{city}/{city}_{seq}_{frame}_leftImg8bit.png
    ROOT/gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_labelIds.png
"""
import contextlib
import glob
import os
import random

import mxnet as mx
import numpy as np
from cityscapesscripts.helpers.labels import labels as CITYSCAPES_LABELS
from gluoncv.data.segbase import SegmentationDataset
from mxnet.gluon.data.vision import transforms
from PIL import Image, ImageFile

from ..errors import ConfigError, DataError, DataNotFoundError

__all__ = ['IGNORE_LABEL', 'CityscapesSegmentation', 'to_train_ids', 'to_label_ids',
           'input_transform', 'epoch_batches', 'read_image']

#: target value of pixels that count neither in the loss nor in the metric (as in GluonCV)
IGNORE_LABEL = -1

_EVALUATED = sorted((l for l in CITYSCAPES_LABELS if not l.ignoreInEval), key=lambda l: l.trainId)
_TRAIN_ID = np.full(256, IGNORE_LABEL, dtype=np.int32)   # labelId -> trainId
for _label in _EVALUATED:
    _TRAIN_ID[_label.id] = _label.trainId
_LABEL_ID = np.array([l.id for l in _EVALUATED], dtype=np.uint8)   # trainId -> labelId


def to_train_ids(label_ids):
    """Cityscapes labelIds -> trainIds 0..18; void, ignored-in-evaluation and unknown ids (any
    value outside the official table) -> IGNORE_LABEL."""
    label_ids = np.asarray(label_ids)
    known = (label_ids >= 0) & (label_ids < len(_TRAIN_ID))
    return np.where(known, _TRAIN_ID[np.where(known, label_ids, 0)], IGNORE_LABEL).astype(np.int32)


def to_label_ids(train_ids):
    """trainIds 0..18 -> Cityscapes labelIds (uint8), as the official evaluation expects."""
    return _LABEL_ID[np.asarray(train_ids)]


def read_image(path, mode=None):
    """A decoded PIL image (converted to `mode` if given); a file that does not decode raises
    an OSError that names it."""
    # importing GluonCV lets PIL fill truncated files with gray (gluoncv.data.mhp): not here
    accept_truncated, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert(mode) if mode else img.copy()
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError('cannot read image %s: %s' % (path, err)) from err
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = accept_truncated


def input_transform():
    """GluonCV's input normalization: CHW float in [0, 1], ImageNet mean and std."""
    return transforms.Compose([transforms.ToTensor(),
                               transforms.Normalize([.485, .456, .406], [.229, .224, .225])])


def find_pairs(root, split):
    """Sorted (image, labelIds) path pairs of a split; a clear error for anything missing."""
    layout = ('expected ROOT/leftImg8bit/{s}/<city>/*_leftImg8bit.png and '
              'ROOT/gtFine/{s}/<city>/*_gtFine_labelIds.png').format(s=split)
    image_dir = os.path.join(root, 'leftImg8bit', split)
    label_dir = os.path.join(root, 'gtFine', split)
    for directory in (root, image_dir, label_dir):
        if not os.path.isdir(directory):
            raise DataNotFoundError('Cityscapes: missing directory %s (%s)' % (directory, layout))
    images = sorted(glob.glob(os.path.join(image_dir, '*', '*_leftImg8bit.png')))
    if not images:
        raise DataNotFoundError('Cityscapes: no image in %s (%s)' % (image_dir, layout))
    labels = [os.path.join(label_dir, os.path.basename(os.path.dirname(p)),
                           os.path.basename(p)[:-len('leftImg8bit.png')] + 'gtFine_labelIds.png')
              for p in images]
    lacking = [(i, l) for i, l in zip(images, labels) if not os.path.isfile(l)]
    if lacking:
        raise DataNotFoundError('Cityscapes: %d of %d images of %s have no label file: %s'
                                % (len(lacking), len(images), image_dir, '; '.join(
                                    '%s (no %s)' % pair for pair in lacking[:5])))
    return images, labels


@contextlib.contextmanager
def _seeded(key):
    """Python's `random` (used by GluonCV's transforms) seeded by `key`, restored afterwards."""
    state = random.getstate()
    random.seed(key)
    try:
        yield
    finally:
        random.setstate(state)


class CityscapesSegmentation(SegmentationDataset):
    """Cityscapes fine annotations, 19 classes, targets as trainIds (IGNORE_LABEL elsewhere).

    mode 'train': GluonCV's random flip, scale (long side in [base_size/2, 2 base_size]), pad,
    crop_size crop and blur, drawn from (seed, epoch, index): call set_epoch() each epoch.
    mode 'val': short side resized to crop_size and center crop. mode 'testval': full images.
    """
    NUM_CLASS = 19
    CLASSES = tuple(l.name for l in _EVALUATED)

    def __init__(self, root, split='train', mode=None, transform=None, base_size=2048,
                 crop_size=768, seed=0):
        self.images, self.labels = find_pairs(root, split)    # before GluonCV's root check
        super().__init__(root, split, mode, transform, base_size=base_size, crop_size=crop_size)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        img = read_image(self.images[index], 'RGB')
        mask = read_image(self.labels[index])
        if img.size != mask.size:
            raise ValueError('%s is %dx%d but its labels %s are %dx%d' % (
                self.images[index], *img.size, self.labels[index], *mask.size))
        if self.mode == 'train':
            with _seeded('%d/%d/%d' % (self.seed, self.epoch, index)):
                img, mask = self._sync_transform(img, mask)
        elif self.mode == 'val':
            img, mask = self._val_sync_transform(img, mask)
        elif self.mode == 'testval':
            img, mask = self._img_transform(img), self._mask_transform(mask)
        else:
            raise ValueError("mode must be 'train', 'val' or 'testval', got %r" % self.mode)
        if self.transform is not None:
            img = self.transform(img)
        return img, mask

    def _mask_transform(self, mask):
        return mx.nd.array(to_train_ids(np.array(mask)), dtype='int32')


def epoch_batches(num_images, batch_size, seed, epoch, shuffle=True):
    """The global batches of an epoch: image indices permuted from (seed, epoch) and cut into
    batches of batch_size (an incomplete last batch is dropped). The same on every process."""
    if num_images < batch_size:
        raise ConfigError('%d images cannot fill one batch of %d (batch_size x devices): add '
                          'images or lower batch_size or devices' % (num_images, batch_size))
    order = (np.random.RandomState([seed, epoch]).permutation(num_images) if shuffle
             else np.arange(num_images))
    return [order[i:i + batch_size].tolist()
            for i in range(0, num_images - batch_size + 1, batch_size)]
