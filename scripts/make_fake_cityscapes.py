"""Write a small dataset in the Cityscapes layout, for trying the pipeline without the real data.

    python scripts/make_fake_cityscapes.py --out data/fake_cityscapes --num-train 4 --size 64x128
    python scripts/make_fake_cityscapes.py --kind digits --out data/study_digits \
        --num-train 400 --num-val 60 --size 64x64

--kind street (default): each image is a street-like scene (sky, building, vegetation, road,
sidewalk, with cars, people, poles and signs) painted in the class colors of the official label
table plus noise, so the class of a pixel is learnable from its color. The labels are real
Cityscapes labelIds, including void ones (ego vehicle, out of roi, static), next to
*_gtFine_instanceIds.png.

--kind digits: the scenes of `make demo` (scripts/pbn_demo/data.py: scikit-learn's digits 0 and
1 on a noisy background, train and val scenes from disjoint digit images), drawn at the image
size (digits zoomed with it), with each image's own brightness offset and contrast gain, so
that one image's statistics are a poor estimate of the data's: the data on which per-device
batch statistics matter. Gray RGB images; labels road (background), car (a "0"), person (a
"1") as Cityscapes labelIds.
"""
import os
import sys

import numpy as np
from cityscapesscripts.helpers.labels import name2label
from PIL import Image

from pbn_gluon.errors import ArgumentParser, UserError, non_negative_int, user_errors
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pbn_demo.data import CANVAS, DIGITS, _zoom, make_scenes  # noqa: E402

TRAIN_CITIES = ('aachen', 'bochum')
VAL_CITIES = ('frankfurt', 'lindau')
OBJECTS = ('car', 'person', 'pole', 'traffic sign')     # painted as boxes over the scene


def parse_args():
    parser = ArgumentParser(description='Write a fake Cityscapes dataset.')
    parser.add_argument('--out', required=True, help='dataset root to create')
    parser.add_argument('--num-train', type=non_negative_int, default=4, help='training images')
    parser.add_argument('--num-val', type=non_negative_int, default=2, help='validation images')
    parser.add_argument('--size', default='64x128', help='HxW of every image')
    parser.add_argument('--seed', type=non_negative_int, default=0)
    parser.add_argument('--kind', choices=('street', 'digits'), default='street',
                        help='street scenes, or the demo\'s digits scenes (square sizes)')
    args = parser.parse_args()
    try:
        args.height, args.width = (int(v) for v in args.size.lower().split('x'))
    except ValueError:
        parser.error('argument --size: expected HxW (e.g. 64x128), got %r' % args.size)
    if args.height < 16 or args.width < 16:
        parser.error('argument --size: %s is too small, each side must be >= 16' % args.size)
    return args


def scene(rng, height, width):
    """(labelIds, instanceIds) of one street scene."""
    labels = np.full((height, width), name2label['sky'].id, dtype=np.uint8)
    horizon = int(height * rng.uniform(0.35, 0.5))
    labels[int(height * rng.uniform(0.1, 0.25)):horizon] = name2label['building'].id
    for _ in range(2):
        x = rng.randint(0, width)
        labels[horizon // 2:horizon, x:x + width // 6] = name2label['vegetation'].id
    labels[horizon:] = name2label['road'].id
    edge = horizon + (height - horizon) // 3
    labels[horizon:edge, :width // 5] = name2label['sidewalk'].id
    labels[height - height // 10:] = name2label['ego vehicle'].id
    labels[:, :2] = name2label['out of roi'].id
    instances = labels.astype(np.uint16)
    for k in range(rng.randint(2, 5)):
        label = name2label[OBJECTS[rng.randint(len(OBJECTS))]]
        h = rng.randint(height // 8, height // 3)
        w = max(2, h // 3) if label.name in ('person', 'pole') else rng.randint(h, 2 * h)
        y = rng.randint(horizon - h // 2, max(horizon - h // 2 + 1, height - height // 10 - h))
        x = rng.randint(0, width - w)
        labels[y:y + h, x:x + w] = label.id
        instances[y:y + h, x:x + w] = label.id * 1000 + k if label.hasInstances else label.id
    y, x = rng.randint(horizon, height - 4), rng.randint(0, width - 4)
    labels[y:y + 3, x:x + 3] = instances[y:y + 3, x:x + 3] = name2label['static'].id
    return labels, instances


def paint(rng, labels):
    """RGB image: each pixel the color of its class in the label table, plus noise."""
    palette = np.zeros((256, 3), dtype=np.float32)
    for label in name2label.values():
        if label.id >= 0:
            palette[label.id] = label.color
    image = palette[labels] + rng.normal(0, 12, labels.shape + (3,))
    return np.clip(image, 0, 255).astype(np.uint8)


def write(out, split, cities, count, rng, height, width):
    for i in range(count):
        city = cities[i % len(cities)]
        stem = '%s_%06d_%06d' % (city, i // len(cities), 19 + i)
        for top in ('leftImg8bit', 'gtFine'):
            os.makedirs(os.path.join(out, top, split, city), exist_ok=True)
        labels, instances = scene(rng, height, width)
        gt = os.path.join(out, 'gtFine', split, city, stem)
        Image.fromarray(paint(rng, labels)).save(
            os.path.join(out, 'leftImg8bit', split, city, stem + '_leftImg8bit.png'))
        Image.fromarray(labels).save(gt + '_gtFine_labelIds.png')
        Image.fromarray(instances).save(gt + '_gtFine_instanceIds.png')


#: labelIds of the digits scenes' classes: background, a "0", a "1" (scripts/pbn_demo/data.py)
DIGIT_LABELS = tuple(name2label[n].id for n in ('road', 'car', 'person'))
#: gray levels: value v of a demo scene (offset +-2, gain 0.4..2.5) -> 255 (v - LOW) / SPAN
#: (clipped: under 0.1% of the pixels)
LOW, SPAN = -3.0, 7.0


def digits_scenes(n_train, n_val, seed, size):
    """(train, val) of the demo's digits scenes at size x size: (images uint8 (n, size, size),
    labelIds uint8 (n, size, size)) each. The 8x8 digits are zoomed by size / 32 first, so a
    scene is the demo's 32x32 one drawn at this size (its noise at the full resolution)."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    keep = np.isin(digits.target, DIGITS)
    scale = size / float(CANVAS)
    images = np.stack([16.0 * _zoom(img / 16.0, scale) for img in digits.images[keep]])
    targets = np.searchsorted(DIGITS, digits.target[keep])
    order = np.random.RandomState(seed).permutation(len(images))
    cut = int(0.7 * len(order))        # train scenes and val scenes use disjoint digit images
    out = []
    for count, idx, scene_seed in ((n_train, order[:cut], seed + 1), (n_val, order[cut:], seed + 2)):
        xs, ys = make_scenes(count, scene_seed, (images[idx].astype(np.float32), targets[idx]),
                             canvas=size)
        gray = np.clip(np.round(255 * (xs[:, 0] - LOW) / SPAN), 0, 255).astype(np.uint8)
        out.append((gray, np.array(DIGIT_LABELS, np.uint8)[ys.astype(int)]))
    return out


def write_digits(out, split, cities, scenes):
    for i, (gray, labels) in enumerate(zip(*scenes)):
        city = cities[i % len(cities)]
        stem = '%s_%06d_%06d' % (city, i // len(cities), 19 + i)
        for top in ('leftImg8bit', 'gtFine'):
            os.makedirs(os.path.join(out, top, split, city), exist_ok=True)
        gt = os.path.join(out, 'gtFine', split, city, stem)
        Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2)).save(
            os.path.join(out, 'leftImg8bit', split, city, stem + '_leftImg8bit.png'))
        Image.fromarray(labels).save(gt + '_gtFine_labelIds.png')
        Image.fromarray(labels.astype(np.uint16)).save(gt + '_gtFine_instanceIds.png')


def main():
    args = parse_args()
    with user_errors('make_fake_cityscapes.py'):
        if args.kind == 'digits' and args.height != args.width:
            raise UserError('--kind digits makes square images, got --size %s' % args.size)
        rng = np.random.RandomState(args.seed)
        try:
            if args.kind == 'digits':
                train, val = digits_scenes(args.num_train, args.num_val, args.seed, args.height)
                write_digits(args.out, 'train', TRAIN_CITIES, train)
                write_digits(args.out, 'val', VAL_CITIES, val)
            else:
                write(args.out, 'train', TRAIN_CITIES, args.num_train, rng, args.height,
                      args.width)
                write(args.out, 'val', VAL_CITIES, args.num_val, rng, args.height, args.width)
        except OSError as err:
            raise UserError('cannot write the dataset under --out %s: %s%s' % (
                args.out, err.strerror or err,
                ' (%s)' % err.filename if err.filename else '')) from err
    print('wrote %d train and %d val images of %dx%d to %s'
          % (args.num_train, args.num_val, args.height, args.width, args.out))


if __name__ == '__main__':
    main()
