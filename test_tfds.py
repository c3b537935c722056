"""VTAB-1k from TFDS's prepared files (tfds.py). The TFDS directories are written here by an encoder of this file's
own, not tfds.py's: CRC32C from its polynomial, TFRecord framing, tf.train.Example as raw protobuf bytes, features in
TFDS's flattened layout, dataset_info.json as TFDS's protobuf JSON writes it (int64 as strings). Each task's splits
are small (TFDS's slice arithmetic at the real counts is checked on the numbers alone), images a few pixels."""

import io
import json
import shutil
import struct
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import datacheck
import runs
import tfds
import train


# -----------------------------------------------------------------------------
# the independent writer

def _table():
    table = []
    for n in range(256):
        for _ in range(8):
            n = (n >> 1) ^ 0x82F63B78 if n & 1 else n >> 1  # CRC-32C (Castagnoli), reflected
        table.append(n)
    return table


TABLE = _table()


def crc32c(b):
    c = 0xFFFFFFFF
    for x in b:
        c = TABLE[(c ^ x) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def masked(b):
    c = crc32c(b)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def varint(v):
    v &= (1 << 64) - 1  # a negative int64 as its 10-byte two's complement
    out = bytearray()
    while v >= 0x80:
        out.append(v & 0x7F | 0x80)
        v >>= 7
    return bytes(out + bytes([v]))


def ld(num, payload):  # a length-delimited protobuf field
    return varint(num << 3 | 2) + varint(len(payload)) + payload


def example(features):
    """tf.train.Example bytes; features: {key: (kind, values)}, kind 'bytes' | 'float' | 'int' (packed)."""
    entries = b''
    for key, (kind, values) in features.items():
        if kind == 'bytes':
            feature = ld(1, b''.join(ld(1, v) for v in values))
        elif kind == 'float':
            feature = ld(2, ld(1, struct.pack(f'<{len(values)}f', *values)))
        else:
            feature = ld(3, ld(1, b''.join(varint(v) for v in values)))
        entries += ld(1, ld(1, key.encode()) + ld(2, feature))
    return ld(1, entries)


def frame(record):
    n = struct.pack('<Q', len(record))
    return n + struct.pack('<I', masked(n)) + record + struct.pack('<I', masked(record))


def write_tfds(root, name, version, splits, template=True):
    """root/<name>/<version>/: dataset_info.json and shards; splits = {split: [Example bytes]}, each split cut into
    shards at positions 799, n - 199 and n // 2 (so the slices straddle shard boundaries)."""
    folder = root / name / version
    folder.mkdir(parents=True)
    base, info = name.split('/')[0], []
    for split, records in splits.items():
        n = len(records)
        cuts = [0, *sorted({c for c in (799, n - 199, n // 2) if 0 < c < n}), n]
        for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
            (folder / f'{base}-{split}.tfrecord-{i:05d}-of-{len(cuts) - 1:05d}').write_bytes(
                b''.join(frame(r) for r in records[a:b]))
        info.append(dict(name=split, numBytes=str(sum(map(len, records))),
                         shardLengths=[str(b - a) for a, b in zip(cuts, cuts[1:])]))
        if template:
            info[-1]['filepathTemplate'] = '{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}'
    (folder / 'dataset_info.json').write_text(json.dumps(dict(
        citation='', description='synthetic', fileFormat='tfrecord', moduleName=f'tensorflow_datasets.{base}',
        name=base, splits=info, version=version), indent=2))
    return folder


# -----------------------------------------------------------------------------
# synthetic datasets: features per position p, and what task_adaptation makes of them

RNG = np.random.RandomState(0)
POOL = {mode: [RNG.randint(0, 256, (3, 4, c), dtype=np.uint8) for _ in range(16)]
        for mode, c in (('RGB', 3), ('RGBA', 4), ('L', 1))}
POOL['01'] = [RNG.randint(0, 2, (3, 4, 1), dtype=np.uint8) for _ in range(16)]  # dSprites: {0, 1}
ENCODED = {}


def encoded(mode, k, fmt):
    if (mode, k, fmt) not in ENCODED:
        a = POOL[mode][k]
        buf = io.BytesIO()
        Image.fromarray(a[..., 0] if a.shape[2] == 1 else a).save(buf, fmt, quality=90)
        ENCODED[mode, k, fmt] = buf.getvalue()
    return ENCODED[mode, k, fmt]


def expected_pixels(mode, k, fmt):
    if fmt == 'JPEG':
        return np.asarray(Image.open(io.BytesIO(encoded(mode, k, fmt))).convert('RGB'))
    a = POOL[mode][k]
    return {'RGB': a, 'RGBA': a[..., :3], 'L': a.repeat(3, 2), '01': (a * 255).repeat(3, 2)}[mode]


CLEVR_DEPTHS = [0.5, 8.0, 8.25, 8.5, 8.75, 9.0, 9.25, 9.5, 9.75, 10.0, 10.5, 99.0]
KITTI = [([], []), ([3, 4, 7], [2.0, 5.0, 30.0]), ([0], [5.0]), ([1], [8.0]), ([2], [8.5]), ([0, 0], [30.0, 20.0]),
         ([1], [20.1]), ([2], [998.0]), ([0], [999.5]), ([3, 0, 2], [2.0, 30.0, 15.0]), ([5, 1], [1.0, -3.0])]


CLASSES = {tfds.TASKS[t][0].split('/')[0]: data.VTAB[t] for t in tfds.TASKS}


def features(tfds_name, p):
    """(features of position p, (pool mode, format)) for one of the synthetic TFDS datasets."""
    f = {'pos': ('int', [p]), 'id': ('bytes', [f'ex{p}'.encode()])}  # pos: the test's own; id: one to skip
    mode, fmt = 'RGB', 'JPEG'
    if tfds_name in ('cifar100', 'svhn_cropped', 'patch_camelyon'):
        fmt = 'PNG'
    if tfds_name == 'clevr':
        mode, fmt, n, d = 'RGBA', 'PNG', 3 + p % 8, CLEVR_DEPTHS[p % len(CLEVR_DEPTHS)]
        depths = [d + 1 + i for i in range(n - 1)] + [d]  # the nearest one last
        f['objects/size'] = ('int', [p % 2] * n)
        f['objects/pixel_coords'] = ('float', [v for z in depths for v in (10.0, 20.0, z)])
        f['objects/color'] = ('int', [1] * n)
    elif tfds_name == 'kitti':
        fmt, (types, zs) = 'PNG', KITTI[p % len(KITTI)]
        f['objects/type'] = ('int', types)
        f['objects/location'] = ('float', [v for z in zs for v in (-1.5, 1.0, z)])
    elif tfds_name == 'dsprites':
        mode, fmt = '01', 'PNG'
        f.update({'label_x_position': ('int', [p % 32]), 'label_orientation': ('int', [p % 40]),
                  'label_shape': ('int', [p % 3])})
    elif tfds_name == 'smallnorb':
        mode, fmt = 'L', 'PNG'
        f.update({'label_azimuth': ('int', [p % 18]), 'label_elevation': ('int', [p % 9]),
                  'image2': ('bytes', [encoded('L', (p + 1) % 16, 'PNG')])})  # the other camera: not read
    else:
        f['label'] = ('int', [p % CLASSES[tfds_name]])
    f['image'] = ('bytes', [encoded(mode, p % 16, fmt)])
    return f, (mode, fmt)


def expected_label(task, p):
    """The label rules, written out here as intervals (task_adaptation's data/<dataset>.py)."""
    if task == 'clevr_count':
        return p % 8
    if task == 'clevr_dist':
        d = CLEVR_DEPTHS[p % len(CLEVR_DEPTHS)]
        return 0 if d <= 8 else 1 if d <= 8.5 else 2 if d <= 9 else 3 if d <= 9.5 else 4 if d <= 10 else 5
    if task == 'kitti':
        types, zs = KITTI[p % len(KITTI)]
        z = [z for t, z in zip(types, zs) if t in (0, 1, 2)]  # Car, Van, Truck
        return 3 if not z else 0 if min(z) <= 8 else 1 if min(z) <= 20 else 2 if min(z) <= 999 else 3
    if task == 'dsprites_loc':
        return p % 32 // 2
    if task == 'dsprites_ori':
        return (p % 40) * 2 // 5  # floor(orientation / 2.5)
    if task.startswith('smallnorb'):
        return p % 18 if task == 'smallnorb_azi' else p % 9
    return p % data.VTAB[task]


# task -> {TFDS split: examples} written, and the val200 and test slices they give under task_adaptation's rules
SYNTHETIC = {
    'cifar': ({'train': 2000, 'test': 7}, ('train', 1800, 2000), ('test', 0, 7)),
    'caltech101': ({'train': 2000, 'test': 7}, ('train', 1800, 2000), ('test', 0, 7)),
    'dtd': ({'train': 800, 'validation': 200, 'test': 5}, ('validation', 0, 200), ('test', 0, 5)),
    'oxford_flowers102': ({'train': 800, 'validation': 200, 'test': 5}, ('validation', 0, 200), ('test', 0, 5)),
    'oxford_iiit_pet': ({'train': 1000, 'test': 5}, ('train', 800, 1000), ('test', 0, 5)),
    'svhn': ({'train': 2000, 'test': 7}, ('train', 1800, 2000), ('test', 0, 7)),
    'sun397': ({'train': 800, 'validation': 200, 'test': 5}, ('validation', 0, 200), ('test', 0, 5)),
    'patch_camelyon': ({'train': 800, 'validation': 200, 'test': 5}, ('validation', 0, 200), ('test', 0, 5)),
    'eurosat': ({'train': 1400}, ('train', 840, 1040), ('train', 1120, 1400)),
    'resisc45': ({'train': 1400}, ('train', 840, 1040), ('train', 1120, 1400)),
    'diabetic_retinopathy': ({'train': 800, 'validation': 200, 'test': 5}, ('validation', 0, 200), ('test', 0, 5)),
    'clevr_count': ({'train': 2000, 'validation': 7}, ('train', 1800, 2000), ('validation', 0, 7)),
    'clevr_dist': ({'train': 2000, 'validation': 7}, ('train', 1800, 2000), ('validation', 0, 7)),
    'dmlab': ({'train': 800, 'validation': 200, 'test': 5}, ('validation', 0, 200), ('test', 0, 5)),
    'kitti': ({'train': 800, 'validation': 200, 'test': 5}, ('validation', 0, 200), ('test', 0, 5)),
    'dsprites_loc': ({'train': 2000}, ('train', 1600, 1800), ('train', 1800, 2000)),
    'dsprites_ori': ({'train': 2000}, ('train', 1600, 1800), ('train', 1800, 2000)),
    'smallnorb_azi': ({'train': 800, 'test': 402}, ('test', 0, 200), ('test', 201, 402)),
    'smallnorb_ele': ({'train': 800, 'test': 402}, ('test', 0, 200), ('test', 201, 402)),
}
VERSIONS = {'cifar100': '3.0.2', 'kitti': '3.3.0', 'oxford_iiit_pet': '4.0.0'}


def write_task(root, task, template=True):
    name = tfds.TASKS[task][0]
    splits = {s: [example(features(name.split('/')[0], p)[0]) for p in range(n)]
              for s, n in SYNTHETIC[task][0].items()}
    return write_tfds(root, name, VERSIONS.get(name, '2.0.0'), splits, template)


@pytest.fixture(scope='module')
def tree(tmp_path_factory):
    """One data root holding all 16 TFDS datasets of the 19 tasks (and an older kitti version, not read)."""
    root = tmp_path_factory.mktemp('tfds')
    for task in SYNTHETIC:
        if not (root / tfds.TASKS[task][0]).exists():
            write_task(root, task, template=task != 'dtd')
    (root / 'kitti' / '3.2.0').mkdir()
    (root / 'kitti' / '3.2.0' / 'dataset_info.json').write_text('{}')
    return root


def positions(task, split):
    _, val200, test = SYNTHETIC[task]
    segments = {'train800': [('train', 0, 800)], 'val200': [val200], 'train800val200': [('train', 0, 800), val200],
                'test': [test]}[split]
    return [(s, p) for s, a, b in segments for p in range(a, b)]


# -----------------------------------------------------------------------------
# the tests

def test_crc32c_and_the_example_parser():
    assert crc32c(b'123456789') == 0xE3069283  # CRC-32C's check value
    b = RNG.bytes(1000)
    assert tfds.masked_crc(b) == masked(b)
    rec = example({'a': ('int', [5, -3, 1 << 40]), 'b': ('float', [0.5, -2.25]), 'c': ('bytes', [b'x', b'']),
                   'skip': ('bytes', [b'y' * 300])})
    assert tfds.parse_example(rec, ('a', 'b', 'c')) == {'a': [5, -3, 1 << 40], 'b': [0.5, -2.25], 'c': [b'x', b'']}
    # an int64_list written unpacked (one varint field per value) parses alike
    unpacked = ld(1, ld(1, ld(1, b'a') + ld(2, ld(3, b''.join(varint(1 << 3) + varint(v) for v in (7, -1))))))
    assert tfds.parse_example(unpacked, ('a',)) == {'a': [7, -1]}


def test_slices_at_the_real_counts():
    """task_adaptation's slices at the counts of the TFDS versions it names (val200 and test)."""
    n = {'cifar': {'train': 50000, 'test': 10000}, 'caltech101': {'train': 3060, 'test': 6084},
         'oxford_iiit_pet': {'train': 3680, 'test': 3669}, 'svhn': {'train': 73257, 'test': 26032},
         'eurosat': {'train': 27000}, 'resisc45': {'train': 31500},
         'clevr_count': {'train': 70000, 'validation': 15000},
         'dsprites_loc': {'train': 737280}, 'smallnorb_ele': {'train': 24300, 'test': 24300}}
    want = {'cifar': (('train', 45000, 45200), ('test', 0, 10000)),
            'caltech101': (('train', 2754, 2954), ('test', 0, 6084)),
            'oxford_iiit_pet': (('train', 2944, 3144), ('test', 0, 3669)),
            'svhn': (('train', 65931, 66131), ('test', 0, 26032)),
            'eurosat': (('train', 16200, 16400), ('train', 21600, 27000)),
            'resisc45': (('train', 18900, 19100), ('train', 25200, 31500)),
            'clevr_count': (('train', 63000, 63200), ('validation', 0, 15000)),
            'dsprites_loc': (('train', 589824, 590024), ('train', 663552, 737280)),
            'smallnorb_ele': (('test', 0, 200), ('test', 12150, 24300))}
    for task, (val200, test) in want.items():
        s = tfds.slices(task, n[task])
        assert s == {'train800': [('train', 0, 800)], 'val200': [val200],
                     'train800val200': [('train', 0, 800), val200], 'test': [test]}, task
    for task in ('dtd', 'oxford_flowers102', 'sun397', 'patch_camelyon', 'diabetic_retinopathy', 'dmlab', 'kitti'):
        s = tfds.slices(task, {'train': 5000, 'validation': 1000, 'test': 711})
        assert s['val200'] == [('validation', 0, 200)] and s['test'] == [('test', 0, 711)], task
    assert set(tfds.TASKS) == set(data.VTAB)


@pytest.mark.parametrize('task', list(SYNTHETIC))
def test_every_task(tree, task):
    """The four splits by position across shards, every label rule, the images pixel-exact, as RGB."""
    name = tfds.TASKS[task][0]
    for split in data.VTAB_SPLITS:
        ds = data.build_dataset(f'vtab-{task}', split, tree, img_size=8)
        assert isinstance(ds, tfds.TFDSDataset) and ds.num_classes == data.VTAB[task]
        assert ds.version == f"{name}:{VERSIONS.get(name, '2.0.0')}"
        want = positions(task, split)
        assert [key for key, _ in ds.samples] == [f'{s}[{p}]' for s, p in want]
        assert [label for _, label in ds.samples] == [expected_label(task, p) for _, p in want]
        for i in range(0, len(ds), 7 if split == 'train800val200' else 1):  # the records at those positions
            s, p = want[i]
            assert tfds.parse_example(ds.record(i), ('pos',)) == {'pos': [p]}
            f, (mode, fmt) = features(name.split('/')[0], p)
            img = ds.image(i)
            assert img.mode == 'RGB' and np.array_equal(np.asarray(img), expected_pixels(mode, p % 16, fmt))
    x, y = ds[0]
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and y == expected_label(task, want[0][1])


def test_label_histograms_cover_every_class(tree):
    """Over the synthetic train splits the derived rules reach every class (edges included)."""
    for task in ('clevr_count', 'clevr_dist', 'kitti', 'dsprites_loc', 'dsprites_ori', 'smallnorb_azi',
                 'smallnorb_ele'):
        labels = {label for _, label in data.build_dataset(f'vtab-{task}', 'train800', tree).samples}
        assert labels == set(range(data.VTAB[task])), task


def test_loader_workers_read_the_same(tree):
    ds = data.build_dataset('vtab-kitti', 'val200', tree, img_size=8)
    loader = torch.utils.data.DataLoader(ds, batch_size=50, num_workers=2)
    xs, ys = zip(*loader)
    assert torch.equal(torch.cat(xs), torch.stack([ds[i][0] for i in range(len(ds))]))
    assert torch.cat(ys).tolist() == [label for _, label in ds.samples]


def test_source_choice(tree, tmp_path):
    root = tmp_path / 'data'
    shutil.copytree(tree / 'dtd', root / 'tensorflow_datasets' / 'dtd')  # TFDS's own default place also works
    (root / 'vtab-1k' / 'dtd').mkdir(parents=True)
    assert data.vtab_source('vtab-dtd', root) == ('tfds', root / 'tensorflow_datasets' / 'dtd' / '2.0.0')
    assert data.vtab_source('vtab-dtd', root, 'folder') == ('folder', root / 'vtab-1k' / 'dtd')
    assert data.vtab_source('vtab-kitti', tree)[1].name == '3.3.0'  # the newest version
    with pytest.raises(FileNotFoundError, match=r"(?s)vtab-1k/cifar.*TensorFlow Datasets' files.*cifar100/<version>"):
        data.vtab_source('vtab-cifar', root)
    with pytest.raises(FileNotFoundError, match=r"no TFDS dataset for vtab-cifar"):
        data.vtab_source('vtab-cifar', root, 'tfds')


def test_tf1_resize_matches_its_definition():
    """tfds.resize_tf1 against TF's ResizeBilinear with half_pixel_centers=False (LegacyScaler: in = out * scale,
    scale = in_size / out_size in float32; lerp between floor(in) and min(ceil(in), in_size - 1)), written out
    pixel by pixel; it is not F.interpolate's half-pixel-centre bilinear."""
    def reference(a, size):  # a: (H, W, C) uint8
        h, w, _ = a.shape
        out = np.zeros((size, size, a.shape[2]), np.float32)
        sy, sx = np.float32(h) / np.float32(size), np.float32(w) / np.float32(size)
        for y in range(size):
            fy = np.float32(y) * sy
            y0, y1, ly = int(np.floor(fy)), min(int(np.ceil(fy)), h - 1), fy - np.floor(fy)
            for x in range(size):
                fx = np.float32(x) * sx
                x0, x1, lx = int(np.floor(fx)), min(int(np.ceil(fx)), w - 1), fx - np.floor(fx)
                top = a[y0, x0].astype(np.float32) + (a[y0, x1].astype(np.float32) - a[y0, x0]) * lx
                bottom = a[y1, x0].astype(np.float32) + (a[y1, x1].astype(np.float32) - a[y1, x0]) * lx
                out[y, x] = top + (bottom - top) * ly
        return out
    for h, w, size in ((5, 7, 16), (37, 23, 16), (3, 3, 3)):  # up, down, the same size
        a = RNG.randint(0, 256, (h, w, 3), dtype=np.uint8)
        got = tfds.resize_tf1(torch.from_numpy(a).permute(2, 0, 1), size).permute(1, 2, 0).numpy()
        assert np.allclose(got * 255, reference(a, size), atol=1e-3), (h, w, size)
    a = torch.from_numpy(RNG.randint(0, 256, (3, 4, 4), dtype=np.uint8))
    half_pixel = F.interpolate(a[None].float(), size=(16, 16), mode='bilinear', align_corners=False)[0] / 255
    assert (tfds.resize_tf1(a, 16) - half_pixel).abs().max() > 0.05
    assert torch.equal(tfds.resize_tf1(a, 4), a.float() / 255)


def test_pipelines(tree):
    img = Image.fromarray(RNG.randint(0, 256, (30, 40, 3), dtype=np.uint8))
    for pipeline, names in [(None, ['Resize', 'ToTensor', 'Normalize']), ('sa2vp', ['Resize', 'ToTensor', 'Normalize']),
                            ('spt', ['Resize', 'CenterCrop', 'ToTensor', 'Normalize']),
                            ('vpt', ['PILToTensor', 'partial', 'Normalize'])]:
        t = data.build_transform('vtab-dtd', False, 16, *(data.PIPELINES.get(pipeline) or ((0.1,) * 3, (0.2,) * 3)),
                                 pipeline=pipeline)
        assert [type(s).__name__ for s in t.transforms] == names and t(img).shape == (3, 16, 16)
    spt = data.build_transform('vtab-dtd', False, 16, pipeline='spt').transforms
    assert spt[0].interpolation.value == 'bicubic' and spt[0].size == 16  # the short side, then the centre
    vpt = data.build_transform('vtab-dtd', False, 16, *data.PIPELINES['vpt'], pipeline='vpt')
    want = (tfds.resize_tf1(torch.from_numpy(np.array(img)).permute(2, 0, 1), 16)
            - torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(data.IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(vpt(img), want)
    cfg = train.parse_args(['--method', 'linear', '--data', 'vtab-dtd', '--pipeline', 'sa2vp', '--pretrain', 'mae'])[0]
    assert (cfg['mean'], cfg['std']) == ([0.5] * 3, [0.5] * 3) and cfg['out'].endswith('-pipeline_sa2vp')
    cfg = train.parse_args(['--method', 'linear', '--data', 'vtab-dtd', '--pipeline', 'vpt'])[0]
    assert (cfg['mean'], cfg['std']) == (list(data.IMAGENET_MEAN), list(data.IMAGENET_STD))
    with pytest.raises(ValueError, match='--pipeline vpt: .*for VTAB-1k only'):
        data.build_transform('cub', False, 16, pipeline='vpt')


def cli(monkeypatch, capsys, main, args):
    """(exit status, stdout, stderr) of a command line as a user meets it: train.py through runs.cli, `python
    data.py --check` and `python tfds.py --export` as sys.exit(main())."""
    monkeypatch.setattr(sys, 'argv', ['x', *map(str, args)])
    try:
        code = runs.cli(main) if main is train.main else main(sys.argv[1:])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code or 0, out, err


def test_check_prints_task_adaptations_counts(tree, monkeypatch, capsys):
    code, out, err = cli(monkeypatch, capsys, datacheck.main, ['--check', 'vtab-smallnorb_azi', '--data-root', tree])
    lines = out.splitlines()
    assert code == 0 and err == '' and lines[0] == f"vtab-smallnorb_azi: tfds {tree / 'smallnorb' / '2.0.0'}"
    assert [line.split()[:3] for line in lines[1:-1]] == [['train800', '800', '18'], ['val200', '200', '18'],
                                                          ['train800val200', '1000', '18'], ['test', '201', '18']]
    assert lines[-1].startswith('ok: vtab-smallnorb_azi: 4 splits, 2201 listed images')
    rows = datacheck.check('vtab-smallnorb_azi', tree, decode=True, workers=2)
    assert [r[3] for r in rows] == [line.split()[3] for line in lines[1:-1]]
    assert rows[0][3] != datacheck.check('vtab-smallnorb_ele', tree)[0][3]


def test_errors_are_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    """A corrupt record, a truncated or missing shard, shardLengths that do not match: one `error:` line from
    `python data.py --check` and from train.py, naming the file."""
    run = ['--method', 'linear', '--arch', 'vit_nano_patch8', '--pretrain', 'none', '--img-size', '16', '--epochs', '1',
           '--data', 'vtab-dtd', '--workers', '0', '--out', tmp_path / 'run', '--log-interval', '0']

    def both(root, *names):
        for main, args in ((datacheck.main, ['--check', 'vtab-dtd', '--data-root', root]),
                           (train.main, run + ['--data-root', root])):
            code, _, err = cli(monkeypatch, capsys, main, args)
            assert code == 1 and err.startswith('error: ') and err.count('\n') == 1 and 'Traceback' not in err, err
            assert all(str(n) in err for n in names), (names, err)
        return err

    def fresh(name):
        folder = write_task(tmp_path / name, 'dtd')
        return tmp_path / name, folder, sorted(folder.glob('dtd-train.tfrecord-*'))[0]  # train[:400]

    root, folder, shard = fresh('crc')
    raw = bytearray(shard.read_bytes())
    raw[-30] ^= 0xFF  # inside the last record's data
    shard.write_bytes(bytes(raw))
    assert 'record 399 (train[399]) is corrupt' in both(root, shard)
    root, folder, shard = fresh('length')
    raw = bytearray(shard.read_bytes())
    raw[0] ^= 1
    shard.write_bytes(bytes(raw))
    assert 'record 0 at byte 0 has a corrupt length' in both(root, shard)
    root, folder, shard = fresh('truncated')
    shard.write_bytes(shard.read_bytes()[:-5])
    assert 'is truncated' in both(root, shard)
    root, folder, shard = fresh('missing')
    shard.unlink()
    assert 'missing TFDS shard' in both(root, shard)
    root, folder, shard = fresh('lengths')
    info = json.loads((folder / 'dataset_info.json').read_text())
    info['splits'][0]['shardLengths'] = ['399', '202', '198', '1']
    (folder / 'dataset_info.json').write_text(json.dumps(info))
    assert 'holds 400 records, but' in both(root, shard, folder / 'dataset_info.json')
    (folder / 'dataset_info.json').write_text('{"name": "dtd"}')
    both(root, folder / 'dataset_info.json')


def test_corrupt_record_in_a_loader_worker(tmp_path):
    """A record that goes bad after the split was read: the worker's error arrives as one line naming the file."""
    folder = write_task(tmp_path, 'dtd')
    ds = data.build_dataset('vtab-dtd', 'val200', tmp_path, img_size=8)
    shard = folder / 'dtd-validation.tfrecord-00000-of-00003'
    with open(shard, 'r+b') as f:  # in place: the same file, as a disk error would leave it
        f.seek(40)
        f.write(b'\x00\x01\x02')
    with pytest.raises(data.ImageError) as info:
        list(data.build_loader(ds, 8, train=False, workers=2))
    assert str(info.value).startswith(f"{shard}: record 0 (validation[0]) is corrupt") and '\n' not in str(info.value)


def test_train_records_the_source(tree, tmp_path):
    root = tmp_path / 'data'
    shutil.copytree(tree / 'patch_camelyon', root / 'patch_camelyon')
    result = train.main(['--method', 'linear', '--arch', 'vit_nano_patch8', '--pretrain', 'none', '--img-size', '16',
                         '--epochs', '1', '--batch-size', '100', '--max-steps-per-epoch', '1', '--workers', '0',
                         '--data', 'vtab-patch_camelyon', '--data-root', str(root), '--out', str(tmp_path / 'run'),
                         '--log-interval', '0', '--pipeline', 'vpt', '--warmup-epochs', '0'])
    record = json.loads((tmp_path / 'run' / 'result.json').read_text())['config']['data_source']
    rows = {r[0]: r[3] for r in datacheck.check('vtab-patch_camelyon', root)}
    assert record == dict(source='tfds', dir=str(root / 'patch_camelyon' / '2.0.0'),
                          tfds_version='patch_camelyon:2.0.0',
                          fingerprint={'train800': rows['train800'], 'val200': rows['val200']})
    assert result['config']['pipeline'] == 'vpt'


def test_export_writes_folders_that_read_back_identically(tree, tmp_path, monkeypatch, capsys):
    for task in ('clevr_count', 'dsprites_ori', 'dtd'):  # RGBA, {0, 1} grayscale, JPEG
        code, out, err = cli(monkeypatch, capsys, tfds.main, ['--export', f'vtab-{task}', '--data-root', tree,
                                                              '--out', tmp_path])
        assert code == 0 and err == '' and str(tmp_path / 'vtab-1k' / task) in out
        for split in data.VTAB_SPLITS:
            a = data.build_dataset(f'vtab-{task}', split, tree, img_size=8)
            b = data.build_dataset(f'vtab-{task}', split, tmp_path, img_size=8)
            assert b.source == 'folder' and [s[1] for s in a.samples] == [s[1] for s in b.samples]
            for i in range(len(a)):
                assert np.array_equal(np.asarray(a.image(i)), np.asarray(b.image(i))), (task, split, i)
            assert torch.equal(a[0][0], b[0][0])
    code, _, err = cli(monkeypatch, capsys, tfds.main, ['--export', 'vtab-cifar', '--data-root', tmp_path / 'none',
                                                         '--out', tmp_path])
    assert code == 1 and err.startswith('error: no TFDS dataset for vtab-cifar') and 'Traceback' not in err


def test_resume_reads_the_same_examples(tree, tmp_path, monkeypatch, capsys):
    """A run on NOAH's folders resumes on them, not on TFDS's files that appeared since (they win by default)."""
    root, out = tmp_path / 'data', tmp_path / 'run'
    code, _, _ = cli(monkeypatch, capsys, tfds.main, ['--export', 'vtab-dtd', '--data-root', tree, '--out', root])
    run = ['--method', 'linear', '--arch', 'vit_nano_patch8', '--pretrain', 'none', '--img-size', '16', '--epochs',
           '2', '--batch-size', '100', '--max-steps-per-epoch', '1', '--workers', '0', '--warmup-epochs', '0',
           '--data', 'vtab-dtd', '--data-root', str(root), '--out', str(out), '--log-interval', '0']
    assert code == 0 and train.main(run + ['--stop-after-epoch', '1']) is None
    shutil.copytree(tree / 'dtd', root / 'dtd')
    code, _, err = cli(monkeypatch, capsys, train.main, ['--resume', '--out', out])
    assert code == 1 and err.startswith('error: cannot resume: the data read now (tfds, ') and '(folder, ' in err
    result = train.main(['--resume', '--out', str(out), '--vtab-source', 'folder'])
    assert result['config']['data_source']['source'] == 'folder' and result['epochs'] == 2


def test_sweep_reads_either_source(tree, tmp_path, monkeypatch, capsys):
    """sweep.py --data vtab-<task> runs on TFDS's files by default and on NOAH's folders with `-- --vtab-source
    folder`; its check before any cell reads the source the cells will read."""
    import sweep
    root = tmp_path / 'data'
    code, _, _ = cli(monkeypatch, capsys, tfds.main, ['--export', 'vtab-dtd', '--data-root', tree, '--out', root])
    assert code == 0
    tiny = ['--method', 'linear', '--arch', 'vit_nano_patch8', '--pretrain', 'none', '--img-size', '16', '--data',
            'vtab-dtd', '--lr', '0.1', '--wd', '0', '--seeds', '0']
    fixed = ['--epochs', '1', '--max-steps-per-epoch', '1', '--batch-size', '100', '--workers', '0', '--log-interval',
             '0', '--warmup-epochs', '0']
    with pytest.raises(sweep.SweepError, match=f"{root}.*dtd"):  # TFDS asked for where there are only folders
        sweep.main(tiny + ['--data-root', str(root), '--out', str(tmp_path / 'none'), '--', '--vtab-source', 'tfds']
                   + fixed)
    assert not (tmp_path / 'none').exists()
    shutil.copytree(tree / 'dtd', root / 'dtd')  # now both sources
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    for source, flags in (('tfds', []), ('folder', ['--vtab-source', 'folder'])):
        out = tmp_path / source
        assert sweep.main(tiny + ['--data-root', str(root), '--out', str(out), '--'] + flags + fixed) == 0
        for phase in ('val', 'test'):
            cell = next((out / 'vtab-dtd' / phase).glob('*/result.json'))
            assert json.loads(cell.read_text())['config']['data_source']['source'] == source, (source, phase)
        assert json.loads((out / 'results.json').read_text())['rows'][0]['n'] == 1
