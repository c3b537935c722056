"""
VTAB-1k straight from the data directory TensorFlow Datasets' `tfds build` writes, without TensorFlow: lossless
(the stored PNG / JPEG bytes), google-research/task_adaptation's split slices and label rules (TASKS, from its
task_adaptation/data/<dataset>.py). The newest <name>[/<config>]/<version>/ under --data-root (or its
tensorflow_datasets/) holds dataset_info.json (splits[].shardLengths) and <name>-<split>.tfrecord-00000-of-00004, ...

- TFRecord (tensorflow/tensorflow core/lib/io/record_writer.cc): per record a uint64 length, the masked CRC32C of
  those 8 bytes, the data, its masked CRC32C; every CRC is checked (with the C package google-crc32c).
- tf.train.Example (tensorflow/tensorflow core/example/feature.proto): Example.features = 1, Features.feature = 1
  (map entries key = 1, value = 2), Feature bytes_list = 1 / float_list = 2 / int64_list = 3, each with value = 1.
  TFDS flattens nested features with '/' (`objects/size`), a Sequence into one list of all its values.
- TFDS writes a split to consecutive shards: `train[a:b]` is positions a..b-1 of the shards concatenated. A split's
  shards are indexed when it is built, and opened lazily in each process (DataLoader workers included).

    python tfds.py --export vtab-cifar --data-root ~/tensorflow_datasets --out ./data   # NOAH's folders, PNG
"""

import argparse
import bisect
import hashlib
import io
import itertools
import json
import mmap
import os
import re
import struct
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

import data

try:
    import google_crc32c
except ImportError:  # only reading TFDS needs it
    google_crc32c = None

# task -> (TFDS name[/config], val200, test, label rule). train800 = train[:800], train800val200 = it + val200.
# val200: 'validation' / 'test' = that split[:200]; p = train[k:k+200], k = p * n_train // 100 (its train split).
# test: a whole TFDS split; (p, q) = train[p * n // 100 + q * n // 100:]; 'test[50%:]' = smallNORB's.
TASKS = {
    'cifar': ('cifar100', 90, 'test', 'label'),
    'caltech101': ('caltech101', 90, 'test', 'label'),
    'dtd': ('dtd', 'validation', 'test', 'label'),
    'oxford_flowers102': ('oxford_flowers102', 'validation', 'test', 'label'),
    'oxford_iiit_pet': ('oxford_iiit_pet', 80, 'test', 'label'),
    'svhn': ('svhn_cropped', 90, 'test', 'label'),
    'sun397': ('sun397/tfds', 'validation', 'test', 'label'),
    'patch_camelyon': ('patch_camelyon', 'validation', 'test', 'label'),
    'eurosat': ('eurosat/rgb', 60, (60, 20), 'label'),
    'resisc45': ('resisc45', 60, (60, 20), 'label'),
    'diabetic_retinopathy': ('diabetic_retinopathy_detection/btgraham-300', 'validation', 'test', 'label'),
    'clevr_count': ('clevr', 90, 'validation', 'count'),
    'clevr_dist': ('clevr', 90, 'validation', 'closest'),
    'dmlab': ('dmlab', 'validation', 'test', 'label'),
    'kitti': ('kitti', 'validation', 'test', 'vehicle'),
    'dsprites_loc': ('dsprites', 80, (80, 10), 'label_x_position'),
    'dsprites_ori': ('dsprites', 80, (80, 10), 'label_orientation'),
    'smallnorb_azi': ('smallnorb', 'test', 'test[50%:]', 'label_azimuth'),
    'smallnorb_ele': ('smallnorb', 'test', 'test[50%:]', 'label_elevation'),
}
FEATURES = {'count': ('objects/size',), 'closest': ('objects/pixel_coords',),
            'vehicle': ('objects/type', 'objects/location')}  # what each derived rule reads; else the rule's key
TEMPLATE = '{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}'  # TFDS's default file name template


def slices(task, n):
    """{VTAB-1k split: [(TFDS split, start, stop)]} for n = {TFDS split: examples}, task_adaptation's arithmetic."""
    _, val, test, _ = TASKS[task]
    val200 = [(val, 0, 200)] if isinstance(val, str) else [('train', val * n['train'] // 100,
                                                            val * n['train'] // 100 + 200)]
    if isinstance(test, tuple):
        test = ('train', test[0] * n['train'] // 100 + test[1] * n['train'] // 100, n['train'])
    else:  # TFDS rounds a percent boundary to the closest example
        test = ('test', round(50 * n['test'] / 100), n['test']) if test == 'test[50%:]' else (test, 0, n[test])
    return {'train800': [('train', 0, 800)], 'val200': val200, 'train800val200': [('train', 0, 800), *val200],
            'test': [test]}


def _bin(value, thresholds):
    """task_adaptation's tf.reduce_max(tf.where(thresholds - value < 0)): the last threshold below value."""
    return max((i for i, t in enumerate(thresholds) if t < value), default=-1)


def label_of(task, f):
    """The label of one example from its features f = {key: [values]}, as google-research/task_adaptation's clevr.py
    _count_preprocess_fn and _closest_object_preprocess_fn, kitti.py _closest_vehicle_distance_pp, dsprites.py."""
    rule = TASKS[task][3]
    if rule == 'count':  # the number of objects - 3
        return len(f.get('objects/size', [])) - 3
    if rule == 'closest':  # the nearest object's depth, binned
        return _bin(min(f['objects/pixel_coords'][2::3]), (0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0))
    if rule == 'vehicle':  # the nearest car, van or truck (type < 3), binned; none: 1000
        z = [z for t, z in zip(f.get('objects/type', []), f.get('objects/location', [])[2::3]) if t < 3]
        return _bin(min(z + [1000.0]), (-100.0, 8.0, 20.0, 999.0))
    if rule in ('label_x_position', 'label_orientation'):  # dSprites' 32 / 40 values floor-divided into 16
        return int(f[rule][0] // ((32 if rule == 'label_x_position' else 40) / 16))
    return f[rule][0]


# -----------------------------------------------------------------------------
# TFRecord framing and tf.train.Example

def masked_crc(b):
    """TFRecord's masked CRC32C of bytes b."""
    if google_crc32c is None:
        raise data.ImageError("reading TFDS files needs the google-crc32c package: pip install -r requirements.txt")
    c = google_crc32c.value(b)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(b, i):
    """(value, next position) of the protobuf varint at b[i]."""
    value = shift = 0
    while b[i] & 0x80:
        value, i, shift = value | (b[i] & 0x7F) << shift, i + 1, shift + 7
    return value | b[i] << shift, i + 1


def _fields(b, i, end):
    """(field number, wire type, varint value or (start, stop) of the payload) of each field of b[i:end]."""
    while i < end:
        key, i = _varint(b, i)
        if key & 7 not in (0, 1, 2, 5):
            raise ValueError(f"protobuf wire type {key & 7}")
        n, i = _varint(b, i) if key & 7 in (0, 2) else ({1: 8, 5: 4}[key & 7], i)  # a varint's value, or a length
        value, i = (n, i) if key & 7 == 0 else ((i, i + n), i + n)
        if i > end:
            raise ValueError("a field runs past the end of its message")
        yield key >> 3, key & 7, value


def parse_example(b, wanted, spans=False):
    """{key: [values]} of the features named in `wanted` of a serialized tf.train.Example: bytes_list -> bytes
    (spans: their (start, stop) in b), float_list -> float, int64_list -> int (packed or not); the other features
    are skipped undecoded."""
    out = {}
    for _, _, (s, e) in (f for f in _fields(b, 0, len(b)) if f[:2] == (1, 2)):  # Example.features
        for _, _, (s1, e1) in (f for f in _fields(b, s, e) if f[:2] == (1, 2)):  # Features.feature entries
            entry = {num: v for num, wire, v in _fields(b, s1, e1) if wire == 2}  # key = 1, value = 2
            key = bytes(b[entry[1][0]:entry[1][1]]).decode() if 1 in entry else ''
            if key not in wanted or 2 not in entry:
                continue
            out[key] = values = []
            for kind, _, (s2, e2) in _fields(b, *entry[2]):  # Feature: bytes 1, float 2, int64 3
                for _, wire, v in _fields(b, s2, e2):  # the list's `value` = 1, packed (wire 2) or not
                    if kind == 1:
                        values.append(v if spans else bytes(b[v[0]:v[1]]))
                    elif kind == 2:
                        values += struct.unpack_from(f'<{(v[1] - v[0]) // 4}f', b, v[0])
                    else:
                        ints, j = [v] if wire == 0 else [], v[0] if wire == 2 else 0
                        while wire == 2 and j < v[1]:
                            x, j = _varint(b, j)
                            ints.append(x)
                        values += [x - (x >> 63 << 64) for x in ints]  # int64 in two's complement
    return out


def index_shard(path, buf, expected, info):
    """[(offset, length, stored data CRC)] of the records of one shard, walking the length headers; each length's
    CRC, the end of the file and the record count (dataset_info.json's shardLengths) are checked."""
    records, pos, again = [], 0, "copy the shard again, or rebuild it with `tfds build`"
    while pos < len(buf):
        n, crc = struct.unpack_from('<QI', buf, pos) if pos + 12 <= len(buf) else (len(buf), None)
        if crc is not None and masked_crc(buf[pos:pos + 8]) != crc:
            raise ValueError(f"{path}: record {len(records)} at byte {pos} has a corrupt length (its CRC does not "
                             f"match); {again}")
        if pos + 16 + n > len(buf):
            raise ValueError(f"{path} is truncated: record {len(records)} runs past its end; {again}")
        records.append((pos + 12, n, struct.unpack_from('<I', buf, pos + 12 + n)[0]))
        pos += 16 + n
    if len(records) != expected:
        raise ValueError(f"{path} holds {len(records)} records, but {info} says {expected} (shardLengths): the shards "
                         f"and dataset_info.json are not from one build")
    return records


# -----------------------------------------------------------------------------
# a task's folder, its shards, one split

def find(task, root, required=False):
    """The newest version folder with a dataset_info.json of task's TFDS dataset in root or root/tensorflow_datasets;
    None when there is none, or with `required` a FileNotFoundError."""
    name = TASKS[task][0]
    for base in (Path(root), Path(root) / 'tensorflow_datasets'):
        versions = [tuple(map(int, v.name.split('.'))) for v in (base / name).glob('*')
                    if re.fullmatch(r'\d+\.\d+\.\d+', v.name) and (v / 'dataset_info.json').is_file()]
        if versions:
            return base / name / '.'.join(map(str, max(versions)))
    if required:
        raise FileNotFoundError(f"no TFDS dataset for vtab-{task} in {root} or {Path(root) / 'tensorflow_datasets'}"
                                f".\nExpected layout:\n{layout(task, root)}")
    return None


def layout(task, root='<root>'):
    name = TASKS[task][0]
    return (f"{root}/{name}/<version>/   (what `tfds build {name}` writes; DATA.md)\n"
            f"    dataset_info.json, {name.split('/')[0]}-<split>.tfrecord-00000-of-<n>, ...")


def shards(folder):
    """{split: [(shard path, records)]} from folder/dataset_info.json (shardLengths; TFDS's file name template)."""
    path, out = Path(folder) / 'dataset_info.json', {}
    try:
        info = json.loads(path.read_text(encoding='utf-8'))
        if info.get('fileFormat', 'tfrecord').lower() != 'tfrecord':
            raise ValueError(f"{info['fileFormat']} files; this reader reads TFRecord, `tfds build`'s default")
        for s in info['splits']:
            k = len(s['shardLengths'])
            names = {'DATASET': info['name'], 'SPLIT': s['name'], 'FILEFORMAT': 'tfrecord', 'NUM_SHARDS': f'{k:05d}'}
            out[s['name']] = [(Path(folder) / re.sub(r'{(\w+)}', lambda m: {
                **names, 'SHARD_INDEX': f'{i:05d}', 'SHARD_X_OF_Y': f'{i:05d}-of-{k:05d}'}[m[1]], s.get(
                'filepathTemplate', TEMPLATE)), int(n)) for i, n in enumerate(s['shardLengths'])]
        return out
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not a TFDS dataset_info.json with splits[].shardLengths ({type(e).__name__}: "
                         f"{e})") from None


class TFDSDataset(Dataset):
    """One VTAB-1k split of `task` from a TFDS version folder, read and checked (every record's CRC, every label)
    once; items (transform(PIL RGB image), label) as data.ImageListDataset's. .samples [('<TFDS split>[<position>]',
    label)], .version ('cifar100:3.0.2'), .digest: sha256[:16] of the sorted '<key> <stored CRC> <label>' lines."""
    source = 'tfds'

    def __init__(self, task, split, folder, transform):
        self.name, self.split, self.root, self.transform = f'vtab-{task}', split, Path(folder), transform
        self.task, self.num_classes, self.version = task, data.VTAB[task], f"{TASKS[task][0]}:{Path(folder).name}"
        info, splits = self.root / 'dataset_info.json', shards(folder)
        try:
            segments = slices(task, {s: sum(n for _, n in files) for s, files in splits.items()})
        except KeyError as e:
            raise ValueError(f"{info} has no {e.args[0]!r} split (it has {', '.join(splits)})") from None
        if split not in segments:
            raise ValueError(f"VTAB split must be one of {tuple(segments)}, got {split!r}")
        self.paths, self.where, self.samples, self._maps, self._pid, records = [], [], [], {}, None, {}
        for tfds_split, a, b in segments[split]:
            files = splits[tfds_split]
            starts = [0, *itertools.accumulate(n for _, n in files)]
            if b > starts[-1]:
                raise ValueError(f"{info}: {tfds_split} has {starts[-1]} examples, but task_adaptation's {split} of "
                                 f"{task} reads {tfds_split}[{a}:{b}]")
            for path in (p for p, _ in files if not p.is_file()):
                raise FileNotFoundError(f"missing TFDS shard {path} ({info} lists {len(files)} shards of "
                                        f"{tfds_split}); copy it again, or rebuild with `tfds build`")
            for pos in range(a, b):
                path, n = files[s := bisect.bisect_right(starts, pos) - 1]  # the shard that holds this position
                if path not in records:  # indexed once: (its number here, [(offset, length, CRC)] per record)
                    self.paths.append(path)
                    records[path] = len(self.paths) - 1, index_shard(path, self._map(len(self.paths) - 1), n, info)
                k, index = records[path]
                self.where.append((k, pos - starts[s], *index[pos - starts[s]]))  # shard, record, offset, length, CRC
                self.samples.append((f'{tfds_split}[{pos}]', None))
        wanted = ('image', *FEATURES.get(TASKS[task][3], (TASKS[task][3],)))
        for i, (key, _) in enumerate(self.samples):
            try:
                f = parse_example(self.record(i), wanted, spans=True)
                label, self.where[i] = int(label_of(task, f)), (*self.where[i], f['image'][0])  # + the image's span
            except (KeyError, IndexError, ValueError, struct.error) as e:
                raise ValueError(f"{self._at(i)}: cannot read its image or {task}'s label ({type(e).__name__}: "
                                 f"{e})") from None
            if not 0 <= label < self.num_classes:
                raise ValueError(f"{self._at(i)}: {task}'s label rule gives {label}, outside 0..{self.num_classes - 1}")
            self.samples[i] = (key, label)
        lines = sorted(f"{key} {w[4]:08x} {label}" for (key, label), w in zip(self.samples, self.where))
        self.digest = hashlib.sha256('\n'.join(lines).encode()).hexdigest()[:16]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.transform(self.image(i)), self.samples[i][1]

    def __getstate__(self):  # open files stay in their process
        return {**self.__dict__, '_maps': {}, '_pid': None}

    def _at(self, i):
        return f"{self.paths[self.where[i][0]]}: record {self.where[i][1]} ({self.samples[i][0]})"

    def _map(self, s):
        """Shard s, memory-mapped once per process (b'' when empty)."""
        if self._pid != os.getpid():
            self._maps, self._pid = {}, os.getpid()
        if s not in self._maps:
            with open(self.paths[s], 'rb') as f:
                empty = os.fstat(f.fileno()).st_size == 0
                self._maps[s] = b'' if empty else mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._maps[s]

    def record(self, i):
        """The serialized Example of item i, its CRC checked."""
        s, _, offset, length, crc = self.where[i][:5]
        b = self._map(s)[offset:offset + length]
        if masked_crc(b) != crc:
            raise data.ImageError(f"{self._at(i)} is corrupt (its CRC does not match); copy the shard again, or "
                                  f"rebuild it with `tfds build`")
        return b

    def image(self, i):
        """Item i's image as task_adaptation feeds it, as a PIL RGB image."""
        start, stop = self.where[i][5]
        b = self.record(i)
        try:
            with Image.open(io.BytesIO(b[start:stop])) as im:
                if self.task.startswith('dsprites'):  # {0, 1} x 255, tiled to 3 channels (task_adaptation's)
                    return Image.fromarray(np.asarray(im.convert('L')) * np.uint8(255)).convert('RGB')
                return im.convert('RGB')  # grayscale tiled, RGBA's alpha dropped
        except Exception as e:
            raise data.ImageError(f"{self._at(i)}: cannot decode its image: {type(e).__name__}: {e}") from None


# -----------------------------------------------------------------------------
# VPT's resize; the folder export

def resize_tf1(img, size):
    """uint8 (3, H, W) -> float32 (3, size, size) in [0, 1], VPT's and GaPT's resize (KMnP/vpt tf_dataset.py
    preprocess_fn: tensorflow.compat.v1's tf.image.resize = TF1 resize_images, bilinear, align_corners=False,
    half_pixel_centers=False, no antialiasing; then / 255): output pixel x reads the input at x * in / out (TF's
    LegacyScaler, not F.interpolate's half-pixel centres), between floor and min(ceil, in - 1), width first."""
    x = img.float()
    for dim in (2, 1):
        n = x.shape[dim]
        src = torch.arange(size, dtype=torch.float32) * (torch.tensor(n, dtype=torch.float32) / size)
        lo, hi = src.floor(), src.ceil().clamp(max=n - 1)
        a, b = x.index_select(dim, lo.long()), x.index_select(dim, hi.long())
        x = a + (b - a) * (src - lo).view([-1 if d == dim else 1 for d in range(3)])
    return x / 255


def write_shard(folder, paths):
    """A TFDS version folder (dtd's file names) whose test split is the image files at `paths` (label 0) as
    tf.train.Example records in one shard, for bench.py's loader rows: the same files as a folder, read as TFDS's."""
    def ld(num, b):  # a length-delimited protobuf field
        n, head = len(b), bytes([num << 3 | 2])
        while n >= 0x80:
            head, n = head + bytes([n & 0x7F | 0x80]), n >> 7
        return head + bytes([n]) + b
    folder.mkdir()
    with open(folder / 'dtd-test.tfrecord-00000-of-00001', 'wb') as f:
        for p in paths:  # {'image': bytes_list, 'label': int64_list}, framed as a TFRecord
            rec = ld(1, ld(1, ld(1, b'image') + ld(2, ld(1, ld(1, Path(p).read_bytes()))))
                     + ld(1, ld(1, b'label') + ld(2, ld(3, ld(1, b'\0')))))
            n = struct.pack('<Q', len(rec))
            f.write(n + struct.pack('<I', masked_crc(n)) + rec + struct.pack('<I', masked_crc(rec)))
    splits = [dict(name=s, shardLengths=[str(len(paths))] * (s == 'test')) for s in ('train', 'validation', 'test')]
    (folder / 'dataset_info.json').write_text(json.dumps(dict(name='dtd', splits=splits)))
    return folder


def export(name, root, out, log=print):
    """NOAH's folder layout from vtab-<task>'s TFDS folder under root: out/vtab-1k/<task>/images/{train800,val200,
    test}/<i>.png (lossless) and the four list files, written last (train800val200 lists train800's and val200's
    images); TFDS's order."""
    folder, lists = Path(out) / 'vtab-1k' / name[5:], {}
    for split in ('train800', 'val200', 'test'):
        ds = data.build_dataset(name, split, root, source='tfds')
        (folder / 'images' / split).mkdir(parents=True, exist_ok=True)
        lists[split] = [f'images/{split}/{i:06d}.png {label}\n' for i, (_, label) in enumerate(ds.samples)]
        for i in range(len(ds)):
            ds.image(i).save(folder / 'images' / split / f'{i:06d}.png')
    lists['train800val200'] = lists['train800'] + lists['val200']
    for split, lines in lists.items():
        (folder / f'{split}.txt').write_text(''.join(lines))
    log(f"{name}: {ds.version} from {ds.root} -> {folder} ({', '.join(f'{s} {len(v)}' for s, v in lists.items())})")


def main(argv=None):
    p = argparse.ArgumentParser(description="Write VTAB-1k's folder layout (NOAH's, PNG images) from TFDS's files.")
    p.add_argument('--export', required=True, choices=['vtab', *(f'vtab-{t}' for t in TASKS)], metavar='vtab-<task>',
                   help="one task, or vtab for all 19")
    p.add_argument('--data-root', default=data.default_data_root(), help="TFDS's data directory (default: "
                   "$VPT_DATA_ROOT or ./data)")
    p.add_argument('--out', required=True, help="the data root to write vtab-1k/<task>/ into")
    args = p.parse_args(argv)
    try:
        for task in TASKS if args.export == 'vtab' else [args.export[5:]]:
            export(f'vtab-{task}', args.data_root, args.out)
    except (FileNotFoundError, ValueError, data.ImageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
