"""
Datasets, transforms and loaders: FGVC (5 tasks), VTAB-1k (19 tasks) and the offline `digits` set.

- FGVC: VPT's split files (KMnP/vpt src/data/datasets/json_dataset.py): train.json, val.json and test.json in
  each dataset folder, each one JSON object {relative image path: integer label}. VPT remaps labels per split
  with sorted(set(labels)); we build the map once from train.json and apply it to every split, so a val file
  that lacks a class cannot shift the other labels.
- VTAB-1k: the folder layout written by NOAH's data/vtab-source/get_vtab1k.py and read by SA²VP's datasets.py:
  vtab-1k/<task>/{train800,val200,train800val200,test}.txt, one "<relative path> <label>" per line, 0-based;
  or, lossless and preferred when both are there, the TFDS files that VPT read (tfds.py, vtab_source).
- digits: scikit-learn's bundled 8x8 handwritten digits (real data, no download), split 800/200/rest like
  VTAB-1k, upsampled to the model's input size. The offline demo and the CI data.
- Transforms: VPT's for FGVC (Resize 256 -> RandomCrop/CenterCrop 224 -> flip when training), SA²VP's
  datasets.py for VTAB (Resize((224, 224)), no augmentation, or a paper's own: PIPELINES); mean/std are the
  backbone's (models.PRETRAIN).

Nothing is skipped or clamped: a missing folder, a missing or malformed split file, a label out of range or an
unreadable image raises an error that names the path. Check a dataset on disk (datacheck.py):
    python data.py --check cub --data-root /path/to/data [--decode]
"""

import functools
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision import transforms as T
from torchvision.datasets.folder import IMG_EXTENSIONS as IMAGE_SUFFIXES  # ImageFolder's

import tfds

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = INCEPTION_STD = (0.5, 0.5, 0.5)

# FGVC: name -> (folder under the data root, image root inside that folder, number of classes).
# Image path = <root>/<folder>/<image root>/<key of the json file>   (VPT json_dataset.py / SA²VP datasets.py)
FGVC = {
    'cub':      ('CUB_200_2011', 'images', 200),
    'nabirds':  ('nabirds',      'images', 555),
    'flowers':  ('OxfordFlower', '',       102),
    'dogs':     ('dogs',         'Images', 120),
    'cars':     ('cars',         '',       196),
}
FGVC_SPLITS = ('train', 'val', 'test')

# VTAB-1k: task folder under <root>/vtab-1k/ -> number of classes (NOAH / SA²VP folder names; the class
# counts of tommy-xq/SA2VP's Train_nature.sh, Train_special.sh, Train_struct.sh).
VTAB = {
    # natural
    'cifar': 100, 'caltech101': 102, 'dtd': 47, 'oxford_flowers102': 102, 'oxford_iiit_pet': 37,
    'svhn': 10, 'sun397': 397,
    # specialized
    'patch_camelyon': 2, 'eurosat': 10, 'resisc45': 45, 'diabetic_retinopathy': 5,
    # structured
    'clevr_count': 8, 'clevr_dist': 6, 'dmlab': 6, 'kitti': 4, 'dsprites_loc': 16, 'dsprites_ori': 16,
    'smallnorb_azi': 18, 'smallnorb_ele': 9,
}
VTAB_SPLITS = ('train800', 'val200', 'train800val200', 'test')
SPLIT_ALIASES = {'train': 'train800', 'val': 'val200', 'trainval': 'train800val200'}  # VTAB and digits
VTAB_SOURCES = ('tfds', 'folder')  # TFDS's prepared files (tfds.py) or NOAH's JPEG folders
PIPELINES = {'default': None, 'vpt': (IMAGENET_MEAN, IMAGENET_STD), 'sa2vp': (INCEPTION_MEAN, INCEPTION_STD),
             'spt': (IMAGENET_MEAN, IMAGENET_STD)}  # VTAB's input pipelines (build_transform) -> mean/std

DATASETS = list(FGVC) + [f'vtab-{t}' for t in VTAB] + ['digits', 'imagefolder']


def _kind(name):
    """'fgvc', 'vtab', 'digits' or 'imagefolder'; a ValueError listing the valid names otherwise."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    return 'fgvc' if name in FGVC else 'vtab' if name.startswith('vtab-') else name


def augments(name):
    """Whether the training transform is random: FGVC's and a user's image folders'; VTAB and digits have none."""
    return _kind(name) in ('fgvc', 'imagefolder')


def num_classes(name):
    """The benchmark's class count (FGVC: 200/555/102/120/196; VTAB: the table above; digits: 10; imagefolder: None,
    its train/ folders)."""
    kind = _kind(name)
    return FGVC[name][2] if kind == 'fgvc' else VTAB[name[5:]] if kind == 'vtab' else 10 if kind == 'digits' else None


def default_data_root():
    return os.environ.get('VPT_DATA_ROOT') or './data'


def expected_layout(name, folder=None):
    """The folder tree `name` needs (in `folder`, default <root>/<its usual place>), for error messages."""
    if _kind(name) == 'fgvc':
        img = f"{FGVC[name][1]}/" if FGVC[name][1] else ''
        return (f"{folder or Path('<root>', FGVC[name][0])}/\n"
                f"    train.json, val.json, test.json   VPT's split files, each {{\"<relative path>\": <label>, ...}}\n"
                f"    {img}<relative path>{' ' * (19 - len(img))}the images")
    if _kind(name) == 'vtab':
        return (f"{folder or Path('<root>', 'vtab-1k', name[5:])}/\n"
                f"    train800.txt, val200.txt, train800val200.txt, test.txt   lines \"<relative path> <label>\"\n"
                f"    images/<split>/000000.jpg, ...                           the images (NOAH get_vtab1k.py)\n"
                f"or TensorFlow Datasets' files, read first when there:\n{tfds.layout(name[5:])}")
    if _kind(name) == 'imagefolder':
        return (f"{folder or '<root>'}/\n    train/<class>/<image>, ...   the classes are train's folders\n"
                f"    val/<class>/<image>, ...     (for --eval-split val)\n    test/<class>/<image>, ...    (for "
                f"--eval-split test)")
    return "digits is bundled with scikit-learn; it has no folder"


def dataset_dir(name, root=None):
    """The dataset's folder: FGVC <root>/<folder>, VTAB <root>/vtab-1k/<task>, or `root` itself when it holds the
    split files (train.json / train800.txt); None for digits. root=None: default_data_root()."""
    kind = _kind(name)
    if kind == 'digits':
        return None
    root = Path(root if root is not None else default_data_root())
    if kind == 'imagefolder':  # the root is the folder
        if not (root / 'train').is_dir():
            raise FileNotFoundError(f"{root / 'train'} not found: --data imagefolder needs --data-root DIR with one "
                                    f"folder of images per class in DIR/train.\nExpected layout:\n"
                                    f"{expected_layout(name, root)}")
        return root
    marker = 'train.json' if kind == 'fgvc' else 'train800.txt'
    sub = root / FGVC[name][0] if kind == 'fgvc' else root / 'vtab-1k' / name[5:]
    other = {FGVC[n][0]: n for n in FGVC} | {t: f'vtab-{t}' for t in VTAB}  # a benchmark folder -> its dataset
    if (root / marker).is_file() and other.get(root.name, name) != name:
        raise ValueError(f"{root} is the folder of {other[root.name]}, not of {name}: pass --data {other[root.name]}, "
                         f"or --data-root the folder that holds {name}'s")
    if (root / marker).is_file():
        return root
    if sub.is_dir():
        return sub
    raise FileNotFoundError(
        f"dataset folder for {name!r} not found: neither {sub} exists nor does {root} itself contain {marker}; "
        f"pass --data-root DIR (or set VPT_DATA_ROOT) to the folder that holds it.\n"
        f"Expected layout:\n{expected_layout(name, sub)}")


def vtab_source(name, root=None, source=None):
    """('tfds', its version folder) or ('folder', the task folder) of vtab-<task>: source 'tfds' or 'folder' picks
    one; None takes TFDS's files when they are there (lossless), else NOAH's folders (JPEG)."""
    root = Path(root if root is not None else default_data_root())
    if source not in (None, *VTAB_SOURCES):
        raise ValueError(f"VTAB source must be one of {VTAB_SOURCES}, got {source!r}")
    if source != 'folder' and (found := tfds.find(name[5:], root, required=source == 'tfds')):
        return 'tfds', found
    return 'folder', dataset_dir(name, root)


def split_names(name, eval_split):
    """(train split, eval split) for --eval-split val|test. val: FGVC train / val, VTAB and digits train800 / val200;
    test: FGVC train / test (VPT trains FGVC on train.json alone), VTAB and digits train800val200 / test."""
    if eval_split not in ('val', 'test'):
        raise ValueError(f"eval_split must be 'val' or 'test', got {eval_split!r}")
    if _kind(name) in ('fgvc', 'imagefolder'):
        return ('train', eval_split)
    return ('train800', 'val200') if eval_split == 'val' else ('train800val200', 'test')


def build_transform(name, train, img_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, pipeline=None):
    """PIL image -> normalised (3, img_size, img_size) tensor (None for digits: DigitsDataset does it).
    FGVC (VPT): Resize(256) -> RandomCrop(224) + RandomHorizontalFlip when training, else CenterCrop(224); 256 scales
    as round(img_size * 256 / 224). VTAB (SA²VP's datasets.py): Resize((224, 224)) for both. PIL bilinear resizing.
    pipeline, VTAB only: default or sa2vp as VTAB; vpt: tfds.resize_tf1 (KMnP/vpt tf_dataset.py, also GaPT's);
    spt: Resize(224) bicubic, CenterCrop(224) (WangYZ1608/Self-Prompt-Tuning Dataset/VTAB.py)."""
    kind = _kind(name)
    if pipeline not in (None, 'default') and (kind != 'vtab' or pipeline not in PIPELINES):
        raise ValueError(f"--pipeline {pipeline}: one of {', '.join(PIPELINES)}, for VTAB-1k only")
    if kind == 'digits':
        return None
    if kind in ('fgvc', 'imagefolder'):
        crop = [T.RandomCrop(img_size), T.RandomHorizontalFlip()] if train else [T.CenterCrop(img_size)]
        steps = [T.Resize(round(img_size * 256 / 224)), *crop]
    elif pipeline == 'vpt':  # uint8 -> TF1 bilinear resize -> / 255
        return T.Compose([T.PILToTensor(), functools.partial(tfds.resize_tf1, size=img_size), T.Normalize(mean, std)])
    elif pipeline == 'spt':
        steps = [T.Resize(img_size, T.InterpolationMode.BICUBIC), T.CenterCrop(img_size)]
    else:
        steps = [T.Resize((img_size, img_size))]
    return T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)])


# -----------------------------------------------------------------------------
# reading split files

def _read_json(path, name):
    """One VPT split file: a JSON object {relative image path: integer label}."""
    if not path.is_file():
        raise FileNotFoundError(f"missing split file {path}\nExpected layout:\n{expected_layout(name, path.parent)}")
    try:
        entries = json.loads(path.read_text(encoding='utf-8'))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(entries, dict) or not entries:
        raise ValueError(f"{path} must be a non-empty JSON object {{\"<relative path>\": <integer label>}}")
    for key, label in entries.items():
        if type(label) is not int:
            raise ValueError(f"{path}: key {key!r} has label {label!r}, expected an integer")
    return entries


def read_fgvc(name, split, folder, strict_classes=True):
    """([(image path, label)], classes) of one FGVC split, labels remapped by train.json's sorted label set (val and
    test read train.json too, never the reverse; a label absent from it is an error). With strict_classes (off when
    the environment sets VPT_ALLOW_PARTIAL=1) train.json must hold exactly the benchmark's class count."""
    if split not in FGVC_SPLITS:
        raise ValueError(f"FGVC split must be one of {FGVC_SPLITS}, got {split!r}")
    _, images, expected = FGVC[name]
    train_file = folder / 'train.json'
    train = _read_json(train_file, name)
    label_map = {c: i for i, c in enumerate(sorted(set(train.values())))}
    if len(label_map) > expected:  # never allowed: these are another dataset's split files
        raise ValueError(f"{train_file} has {len(label_map)} classes but {name} has {expected}: the split files of "
                         f"another dataset? Check --data / --data-root")
    if strict_classes and os.environ.get('VPT_ALLOW_PARTIAL') != '1' and len(label_map) < expected:
        raise ValueError(f"{train_file} has {len(label_map)} classes but {name} has {expected}: wrong or partial "
                         f"split files (set VPT_ALLOW_PARTIAL=1 to train on the {len(label_map)} it holds)")
    split_file = folder / f'{split}.json'
    entries = train if split == 'train' else _read_json(split_file, name)
    samples = []
    for rel, label in entries.items():
        if label not in label_map:
            raise ValueError(f"{split_file}: key {rel!r} has label {label}, which does not occur in {train_file}")
        samples.append((str(folder / images / rel), label_map[label]))
    return samples, len(label_map)


def read_vtab(name, split, folder):
    """[(image path, label)] of one VTAB-1k split file; lines "<path relative to the task folder> <label>"."""
    if split not in VTAB_SPLITS:
        raise ValueError(f"VTAB split must be one of {VTAB_SPLITS} (or {tuple(SPLIT_ALIASES)}), got {split!r}")
    classes = VTAB[name[5:]]
    path = folder / f'{split}.txt'
    if not path.is_file():
        raise FileNotFoundError(f"missing split file {path}\nExpected layout:\n{expected_layout(name, folder)}")
    samples = []
    for i, line in enumerate(path.read_text(encoding='utf-8').splitlines(), 1):
        try:
            rel, label = line.split()
            label = int(label)
        except ValueError:  # not exactly two fields, or a label that is not an integer
            raise ValueError(f"{path}:{i}: expected '<relative path> <integer label>', got {line!r}") from None
        if not 0 <= label < classes:
            raise ValueError(f"{path}:{i}: label {label} out of range 0..{classes - 1} ({name} has {classes} classes)")
        samples.append((str(folder / rel), label))
    if not samples:
        raise ValueError(f"{path} lists no images")
    return samples


def read_imagefolder(split, folder):
    """([(image path, label)], classes) of DIR/<split>/<class>/<image> (torchvision's ImageFolder layout): the classes
    are train/'s folders in sorted order, the same label map for every split; a class folder of val/ or test/ that
    train/ lacks is an error."""
    classes = sorted(d.name for d in (folder / 'train').iterdir() if d.is_dir())
    path = folder / split
    if not path.is_dir():
        raise FileNotFoundError(f"{path} not found: --data imagefolder has no {split} split there (without val/, "
                                f"use --eval-split test)\nExpected layout:\n{expected_layout('imagefolder', folder)}")
    unknown = sorted(d.name for d in path.iterdir() if d.is_dir() and d.name not in classes)
    if unknown:
        raise ValueError(f"{path}: class folder(s) {', '.join(unknown[:5])} are not in {folder / 'train'}")
    samples = [(str(f), label) for label, c in enumerate(classes) if (path / c).is_dir()
               for f in sorted((path / c).iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not samples:
        raise ValueError(f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)}) in class folders")
    return samples, len(classes)


# -----------------------------------------------------------------------------
# datasets

class ImageError(RuntimeError):
    """A listed image that is missing or cannot be decoded; the message names the path and the fix. Raised in a
    DataLoader worker, torch re-builds it as ImageError("Caught ImageError in DataLoader worker ...<traceback>...
    ImageError: <msg>"): only <msg> is kept, so the user sees one line wherever the image was read."""

    def __init__(self, message):
        if message.startswith('Caught ImageError'):
            found = re.search(r'ImageError: (.*)$', message.rstrip())
            message = found.group(1) if found else message
        super().__init__(message)


def load_image(path):
    """PIL RGB image, as VPT and SA²VP load it (decoded in full); errors name the path."""
    try:
        with Image.open(path) as im:
            return im.convert('RGB')
    except FileNotFoundError:
        raise ImageError(f"image file not found: {path} (`python data.py --check NAME` lists every missing "
                         f"file)") from None
    except Exception as e:
        raise ImageError(f"cannot read image {path}: {type(e).__name__}: {e} (`python data.py --check NAME "
                         f"--decode` lists every unreadable image)") from None


class ImageListDataset(Dataset):
    """A list of (image path, label) and a transform; FGVC and VTAB. Returns (float32 (3, H, W), int)."""
    source = 'folder'

    def __init__(self, name, split, root, samples, num_classes, transform):
        self.name, self.split, self.root = name, split, root  # root: the dataset folder
        self.samples, self.num_classes, self.transform = samples, num_classes, transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.transform(self.image(i)), self.samples[i][1]

    def image(self, i):  # the PIL image of item i
        return load_image(self.samples[i][0])


class DigitsDataset(Dataset):
    """sklearn's load_digits: 1,797 real 8x8 digits (values 0..16) split by RandomState(0).permutation: train800 =
    the first 800, val200 the next 200, train800val200 the first 1000, test the other 797. An image: /16 -> bilinear
    upsample to img_size (per item: a split at 224 px would take 0.5 GB) -> 3 channels -> Normalize(mean, std)."""

    def __init__(self, split, img_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        from sklearn.datasets import load_digits  # only this dataset needs scikit-learn
        split = SPLIT_ALIASES.get(split, split)
        if split not in VTAB_SPLITS:
            raise ValueError(f"digits split must be one of {VTAB_SPLITS} (or {tuple(SPLIT_ALIASES)}), got {split!r}")
        digits = load_digits()
        perm = np.random.RandomState(0).permutation(len(digits.target))
        idx = {'train800': perm[:800], 'val200': perm[800:1000],
               'train800val200': perm[:1000], 'test': perm[1000:]}[split]
        self.name, self.split, self.root, self.num_classes, self.source = 'digits', split, None, 10, 'scikit-learn'
        self.samples = [(int(i), int(digits.target[i])) for i in idx]  # (index into load_digits, label)
        self.pixels = torch.from_numpy(digits.images[idx]).float().div(16).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
        self.labels = [label for _, label in self.samples]
        self.img_size = img_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        s = self.img_size
        x = F.interpolate(self.pixels[i:i + 1], size=(s, s), mode='bilinear', align_corners=False)[0]  # (1, s, s)
        return (x.expand(3, s, s) - self.mean) / self.std, self.labels[i]  # (3, s, s)


def build_dataset(name, split, root=None, img_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, train=False,
                  strict_classes=True, source=None, pipeline=None):
    """Split `split` of dataset `name` (DATASETS): items (float32 (3, img_size, img_size), int label); .samples
    [(path or digits index, label)], .num_classes (the head's), .name, .split, .root (its folder), .source.
    split: FGVC, imagefolder train/val/test; VTAB, digits train800/val200/train800val200/test (or train/val/trainval).
    train=True: the augmenting transform (FGVC only). Only this split's file is read, plus FGVC's train.json for its
    label map. strict_classes: see read_fgvc. source, pipeline: VTAB's (vtab_source, PIPELINES)."""
    kind = _kind(name)
    transform = build_transform(name, train, img_size, mean, std, pipeline)
    if kind == 'digits':
        return DigitsDataset(split, img_size, mean, std)
    if kind == 'fgvc':
        folder = dataset_dir(name, root)
        samples, classes = read_fgvc(name, split, folder, strict_classes)
        return ImageListDataset(name, split, folder, samples, classes, transform)
    if kind == 'imagefolder':
        folder = dataset_dir(name, root)
        return ImageListDataset(name, split, folder, *read_imagefolder(split, folder), transform)
    split = SPLIT_ALIASES.get(split, split)
    where, folder = vtab_source(name, root, source)
    if where == 'tfds':
        return tfds.TFDSDataset(name[5:], split, folder, transform)
    return ImageListDataset(name, split, folder, read_vtab(name, split, folder), VTAB[name[5:]], transform)


def dataset_kwargs(cfg):
    """build_dataset's keyword arguments from a run's configuration (train.py's flags)."""
    return dict(root=cfg['data_root'], img_size=cfg['img_size'], mean=cfg['mean'], std=cfg['std'],
                source=cfg.get('vtab_source'), pipeline=cfg.get('pipeline'),
                strict_classes=not cfg.get('allow_partial'))  # a VPT_ALLOW_PARTIAL=1 run stays partial


# -----------------------------------------------------------------------------
# loaders

class TrainSampler(DistributedSampler):
    """Training order: a permutation seeded with seed + epoch (DistributedSampler's rule), sharded over the DDP
    ranks (one rank when not distributed, so 1 process and a plain run see the same order); a resumed run only
    needs set_epoch(epoch). Without set_epoch the epoch still advances after each pass."""

    def __iter__(self):
        indices = super().__iter__()  # computed eagerly from seed + epoch
        self.epoch += 1
        return indices


class ShardSampler(Sampler):
    """Evaluation under DDP: rank r gets indices r, r + W, r + 2W, ... in order, without DistributedSampler's
    padding, so correct/total summed over ranks counts every image once (ranks may get one batch fewer: evaluate
    the unwrapped model, then all-reduce the counts)."""

    def __init__(self, dataset, num_replicas=None, rank=None):
        import torch.distributed as dist
        self.n = len(dataset)
        self.num_replicas = num_replicas if num_replicas is not None else dist.get_world_size()
        self.rank = rank if rank is not None else dist.get_rank()
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank {self.rank} is not in 0..{self.num_replicas - 1}")

    def __iter__(self):
        return iter(range(self.rank, self.n, self.num_replicas))

    def __len__(self):
        return len(range(self.rank, self.n, self.num_replicas))


def build_loader(dataset, batch_size, train, workers=4, distributed=False, seed=0):
    """DataLoader for one split; batch_size is per process. train: TrainSampler order (call
    loader.sampler.set_epoch(epoch) each epoch), no drop_last (a ViT has no batch statistics); eval: in order,
    ShardSampler's share under DDP. Augmentation draws from torch's global RNG (train workers get their seeds
    from it each epoch, so they are not persistent), which train.py checkpoints; eval workers start once per process,
    so they take their seed from a generator of their own (else a resumed run's global RNG would differ)."""
    if train:
        if distributed:
            sampler = TrainSampler(dataset, shuffle=True, seed=seed)
        else:
            sampler = TrainSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=seed)
    else:
        sampler = ShardSampler(dataset) if distributed else None  # None: sequential
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, drop_last=False,
                      num_workers=workers, pin_memory=torch.cuda.is_available(),
                      persistent_workers=workers > 0 and not train, generator=None if train else torch.Generator())


if __name__ == '__main__':  # python data.py --check NAME [--data-root DIR] [--decode]
    import datacheck
    sys.exit(datacheck.main())
