"""
train.py --decoded-cache: an FGVC or VTAB split decoded and resized once, kept in memory as uint8, with the rest
of data.build_transform done per batch (the crop as a slice of the cached array; the flip, the /255 and the
normalisation on the model's device), for GPUs that outrun JPEG decoding. The batches equal the torchvision
pipeline's bit for bit on the CPU, given the same RNG state (see DecodedCache).
"""

import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

import data
from runs import RunError


class _Resized(Dataset):
    """Decode + the deterministic resize of build_transform, as a uint8 (h, w, 3) array (for building the cache)."""

    def __init__(self, dataset, resize):
        self.dataset, self.resize = dataset, resize

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        try:
            return torch.from_numpy(np.asarray(self.resize(self.dataset.image(i)), dtype=np.uint8).copy())
        except (FileNotFoundError, RuntimeError) as e:  # load_image's error, raised in the main process as it is
            return e


class DecodedCache(Dataset):
    """What is cached is the output of the transform's deterministic first step, one array per image: FGVC keeps
    Resize(256)'s output (short side 256, the photo's aspect ratio), so every epoch still draws RandomCrop(224)
    offsets over the whole resized image; VTAB keeps Resize((224, 224)). Items are ((uint8 (224, 224, 3) crop,
    bool flip), label). The crop offsets and the flip are drawn with torch's global RNG in torchvision's order
    (RandomCrop.get_params: row, then column, no draw when the sizes are equal; RandomHorizontalFlip:
    torch.rand(1) < 0.5), the eval crop is CenterCrop's rounding, and `finish` is ToTensor's and Normalize's
    float32 arithmetic. Memory: about 260 KB per FGVC photo (1.6 GB for CUB's train split) per process.
    Build time: one decode of every image, spread over `workers` processes."""

    def __init__(self, dataset, train, img_size=224, mean=data.IMAGENET_MEAN, std=data.IMAGENET_STD, workers=0):
        fgvc = data.augments(dataset.name)   # FGVC's transforms (a user's image folders too)
        if not fgvc and not dataset.name.startswith('vtab-'):
            raise ValueError(f"the decoded cache is for image files; {dataset.name} is held in memory already: drop "
                             f"--decoded-cache")
        self.name, self.split, self.root = dataset.name, dataset.split, dataset.root
        self.samples, self.num_classes = dataset.samples, dataset.num_classes
        self.labels = [label for _, label in self.samples]
        self.size, self.train, self.crop = img_size, train and fgvc, fgvc   # VTAB has no augmentation
        resize = T.Resize(round(img_size * 256 / 224)) if fgvc else T.Resize((img_size, img_size))
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.images = []                                                    # [(h, w, 3) uint8]
        for a in DataLoader(_Resized(dataset, resize), batch_size=None, num_workers=workers):
            if isinstance(a, Exception):
                raise a
            self.images.append(a.clone())                                   # clone: out of worker shared memory
        self.nbytes = sum(a.numel() for a in self.images)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img, th = self.images[i], self.size
        h, w = img.shape[:2]
        if not self.crop:                                                   # VTAB: already (224, 224)
            top, left = 0, 0
        elif not self.train:                                                # CenterCrop
            top, left = int(round((h - th) / 2.0)), int(round((w - th) / 2.0))
        elif h == th and w == th:                                           # RandomCrop.get_params
            top, left = 0, 0
        else:
            top = torch.randint(0, h - th + 1, size=(1,)).item()
            left = torch.randint(0, w - th + 1, size=(1,)).item()
        flip = self.train and bool(torch.rand(1) < 0.5)                    # RandomHorizontalFlip(0.5)
        return (img[top:top + th, left:left + th], torch.tensor(flip)), self.labels[i]

    def finish(self, crops, flips):
        """On the device: (B, H, W, 3) uint8 crops, (B,) flips -> (B, 3, H, W) float32, as ToTensor + Normalize."""
        x = crops.permute(0, 3, 1, 2).contiguous().float().div(255)         # (B, 3, H, W), dense as ToTensor
        x = torch.where(flips.view(-1, 1, 1, 1), x.flip(-1), x)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)


class DeviceLoader:
    """A DecodedCache's DataLoader that yields finished (B, 3, H, W) batches on `device`; the training loop and
    evaluate() see an ordinary loader (len, .sampler, .dataset, iteration)."""

    def __init__(self, loader, device):
        self.loader, self.device = loader, device
        self.sampler, self.dataset = loader.sampler, loader.dataset

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for (crops, flips), y in self.loader:
            yield self.dataset.finish(crops.to(self.device, non_blocking=True),
                                      flips.to(self.device, non_blocking=True)), y


def loaders(train_ds, eval_ds, cfg, micro, device, distributed, log=print):
    """The training and evaluation loaders of a --decoded-cache run: both splits decoded once (with --workers
    processes), then read in the main process (a batch is a few memory copies)."""
    t0 = time.time()
    if cfg.get('pipeline') in ('vpt', 'spt'):
        raise RunError(f"--decoded-cache caches Resize((size, size))'s output; --pipeline {cfg['pipeline']} resizes "
                       f"otherwise: drop one of them")
    kw = dict(img_size=cfg['img_size'], mean=cfg['mean'], std=cfg['std'], workers=cfg['workers'])
    try:
        train_ds, eval_ds = DecodedCache(train_ds, train=True, **kw), DecodedCache(eval_ds, train=False, **kw)
    except (ValueError, data.ImageError) as e:
        raise RunError(f"--decoded-cache: {e}") from None
    log(f"decoded cache: {len(train_ds) + len(eval_ds)} images, {(train_ds.nbytes + eval_ds.nbytes) / 2**30:.2f} "
        f"GiB in memory, {time.time() - t0:.0f}s")
    return (DeviceLoader(data.build_loader(train_ds, micro, True, 0, distributed, cfg['seed']), device),
            DeviceLoader(data.build_loader(eval_ds, micro, False, 0, distributed), device))
