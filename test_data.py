"""Tests for data.py on tiny datasets built in tmp_path in each benchmark's real layout, plus sklearn digits.

Run: python -m pytest -q test_data.py
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import datacheck
import decoded_cache
import maps

HERE = Path(__file__).resolve().parent

# The real layouts, written out independently of data.FGVC: folder, image root, relative path of image k.
FGVC_LAYOUT = {
    'cub':     ('CUB_200_2011', 'images', lambda c, s, k: f'{c:03d}.Black_footed_Albatross/{s}_{k:04d}.jpg'),
    'nabirds': ('nabirds',      'images', lambda c, s, k: f'{c + 290:04d}/{s}{k}.jpg'),
    'flowers': ('OxfordFlower', '',       lambda c, s, k: f'jpg/image_{s}{k:05d}.jpg'),
    'dogs':    ('dogs',         'Images', lambda c, s, k: f'n020856{c:02d}-Chihuahua/n020856{c:02d}_{s}{k}.jpg'),
    'cars':    ('cars',         '',       lambda c, s, k: f'car_ims/{s}{k:06d}.jpg'),
}
# 1-based, non-contiguous labels; val lacks class 7 (so a per-split remap would send 12 to 1).
SPLITS = {'train': [3, 7, 12, 3, 7, 12], 'val': [3, 12, 12], 'test': [12, 7, 3]}
SIZES = [(40, 30), (30, 50), (50, 50)]  # (width, height)


def write_jpeg(path, size, seed):
    """A tiny RGB JPEG of random (so non-constant, non-symmetric) content."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def make_fgvc(root, name, splits=SPLITS):
    """<root>/<folder>/{train,val,test}.json + images under the image root; returns the folder."""
    folder, images, rel_path = FGVC_LAYOUT[name]
    folder = root / folder
    for split, labels in splits.items():
        entries = {}
        for k, c in enumerate(labels):
            rel = rel_path(c, split, k)
            write_jpeg(folder / images / rel, SIZES[k % 3], seed=k)
            entries[rel] = c
        (folder / f'{split}.json').write_text(json.dumps(entries))
    return folder


VTAB_COUNTS = {'train800': 4, 'val200': 2, 'train800val200': 6, 'test': 3}


def make_vtab(root, task, counts=VTAB_COUNTS):
    """<root>/vtab-1k/<task>/{split}.txt with 'images/<split>/000000.jpg <label>' lines (NOAH get_vtab1k.py)."""
    folder = root / 'vtab-1k' / task
    for split, n in counts.items():
        lines = []
        for i in range(n):
            rel = f'images/{split}/{i:06d}.jpg'
            write_jpeg(folder / rel, (20 + 13 * i, 20), seed=i)
            lines.append(f'{rel} {(5 * i) % data.VTAB[task]}\n')
        (folder / f'{split}.txt').write_text(''.join(lines))
    return folder


@pytest.fixture(scope='module', autouse=True)
def cli_runs(tmp_path_factory):
    """Start two `python data.py --check` runs before the other tests so that they overlap with them
    (each process spends seconds importing torchvision); test_check_cli reads their output."""
    root = tmp_path_factory.mktemp('cli') / 'data'
    make_fgvc(root, 'dogs')
    env = dict(os.environ, VPT_ALLOW_PARTIAL='1')  # the tiny dogs set holds 3 of 120 classes

    def run(name):
        return subprocess.Popen([sys.executable, 'data.py', '--check', name, '--data-root', str(root)], cwd=HERE,
                                env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    runs = {'ok': run('dogs'), 'missing': run('vtab-sun397')}
    yield root, runs
    for p in runs.values():
        if p.poll() is None:  # test_check_cli did not run
            p.kill()
            p.communicate()


@pytest.fixture
def root(tmp_path):
    """A data root holding all five FGVC datasets and vtab-1k/{dtd,eurosat}."""
    root = tmp_path / 'data'
    for name in data.FGVC:
        make_fgvc(root, name)
    for task in ('dtd', 'eurosat'):
        make_vtab(root, task)
    return root


def build(name, split, root, **kw):
    """build_dataset without the full-class-count check (the tiny FGVC sets hold 3 classes)."""
    return data.build_dataset(name, split, root, strict_classes=False, **kw)


# ----------------------------------------------------------------------------- names and tables

def test_names_classes_and_splits():
    assert len(data.DATASETS) == 26 and len(set(data.DATASETS)) == 26
    assert data.DATASETS[:5] == ['cub', 'nabirds', 'flowers', 'dogs', 'cars'] and data.DATASETS[-2:] == ['digits',
                                                                                                        'imagefolder']
    assert [data.num_classes(n) for n in data.FGVC] == [200, 555, 102, 120, 196]
    vtab = {n[5:]: data.num_classes(n) for n in data.DATASETS if n.startswith('vtab-')}
    assert vtab == {'cifar': 100, 'caltech101': 102, 'dtd': 47, 'oxford_flowers102': 102, 'oxford_iiit_pet': 37,
                    'svhn': 10, 'sun397': 397, 'patch_camelyon': 2, 'eurosat': 10, 'resisc45': 45,
                    'diabetic_retinopathy': 5, 'clevr_count': 8, 'clevr_dist': 6, 'dmlab': 6, 'kitti': 4,
                    'dsprites_loc': 16, 'dsprites_ori': 16, 'smallnorb_azi': 18, 'smallnorb_ele': 9}
    assert data.num_classes('digits') == 10 and data.num_classes('imagefolder') is None  # its train/ folders
    assert data.split_names('cub', 'val') == ('train', 'val')
    assert data.split_names('cub', 'test') == ('train', 'test')
    assert data.split_names('vtab-dtd', 'val') == ('train800', 'val200')
    assert data.split_names('vtab-dtd', 'test') == ('train800val200', 'test')
    assert data.split_names('digits', 'val') == ('train800', 'val200')
    assert data.split_names('digits', 'test') == ('train800val200', 'test')
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'.*vtab-dtd"):
        data.num_classes('imagenet')
    with pytest.raises(ValueError, match="'val' or 'test'"):
        data.split_names('cub', 'trainval')


def test_default_data_root(monkeypatch, root):
    monkeypatch.delenv('VPT_DATA_ROOT', raising=False)
    assert data.default_data_root() == './data'
    monkeypatch.setenv('VPT_DATA_ROOT', str(root))
    assert data.default_data_root() == str(root)
    assert data.dataset_dir('cub') == root / 'CUB_200_2011'
    assert data.dataset_dir('vtab-dtd') == root / 'vtab-1k' / 'dtd'
    assert data.dataset_dir('digits') is None


# ----------------------------------------------------------------------------- FGVC

@pytest.mark.parametrize('name', list(data.FGVC))
def test_fgvc_layout_counts_and_label_remap(root, name):
    folder, images, _ = FGVC_LAYOUT[name]
    assert data.dataset_dir(name, root) == root / folder
    raw = {s: json.loads((root / folder / f'{s}.json').read_text()) for s in SPLITS}
    for split, labels in SPLITS.items():
        ds = build(name, split, root, img_size=32)
        assert (ds.name, ds.split, ds.num_classes, len(ds)) == (name, split, 3, len(labels))
        # every split uses train.json's map {3: 0, 7: 1, 12: 2}; val has no 7 and still maps 12 -> 2
        expected = {str(root / folder / images / rel): {3: 0, 7: 1, 12: 2}[c] for rel, c in raw[split].items()}
        assert dict(ds.samples) == expected
        assert all(Path(p).is_file() for p, _ in ds.samples)
        x, y = ds[0]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == ds.samples[0][1]
    assert sorted({y for _, y in build(name, 'val', root).samples}) == [0, 2]


def test_fgvc_strict_class_count(root, monkeypatch):
    with pytest.raises(ValueError, match=r"train\.json has 3 classes but cub has 200.*VPT_ALLOW_PARTIAL"):
        data.build_dataset('cub', 'train', root)  # strict by default
    monkeypatch.setenv('VPT_ALLOW_PARTIAL', '1')
    assert data.build_dataset('cub', 'train', root).num_classes == 3


def test_fgvc_full_class_count_passes_strict(tmp_path):
    labels = list(range(1, 103))  # Flowers-102, 1-based
    make_fgvc(tmp_path, 'flowers', {'train': labels, 'val': labels[:5]})
    ds = data.build_dataset('flowers', 'val', tmp_path)
    assert ds.num_classes == 102 == data.num_classes('flowers')
    assert [y for _, y in ds.samples] == [0, 1, 2, 3, 4]


# ----------------------------------------------------------------------------- VTAB

@pytest.mark.parametrize('task', ['dtd', 'eurosat'])
def test_vtab_counts_and_labels(root, task):
    name = f'vtab-{task}'
    for split, n in VTAB_COUNTS.items():
        ds = data.build_dataset(name, split, root, img_size=32)
        assert (ds.name, ds.split, ds.num_classes, len(ds)) == (name, split, data.VTAB[task], n)
        assert ds.samples[1] == (str(root / 'vtab-1k' / task / f'images/{split}/000001.jpg'), 5)  # as-is
        x, y = ds[1]
        assert x.shape == (3, 32, 32) and y == 5
    assert data.build_dataset(name, 'trainval', root).split == 'train800val200'  # alias


# ----------------------------------------------------------------------------- transforms

@pytest.mark.parametrize('img_size', [32, 224])
def test_transform_shapes_and_ranges(img_size):
    img = Image.fromarray(np.random.RandomState(0).randint(0, 256, (30, 40, 3), dtype=np.uint8))  # 40x30
    half = dict(mean=data.INCEPTION_MEAN, std=data.INCEPTION_STD)
    for name, train in [('cub', True), ('cub', False), ('vtab-dtd', True), ('vtab-dtd', False)]:
        x = data.build_transform(name, train, img_size, **half)(img)
        assert x.shape == (3, img_size, img_size) and x.dtype == torch.float32
        assert -1 <= x.min() < x.max() <= 1
    fgvc_steps = [type(t).__name__ for t in data.build_transform('cub', True, img_size).transforms]
    assert fgvc_steps == ['Resize', 'RandomCrop', 'RandomHorizontalFlip', 'ToTensor', 'Normalize']
    assert data.build_transform('cub', True, img_size).transforms[0].size == {32: 37, 224: 256}[img_size]
    eval_steps = [type(t).__name__ for t in data.build_transform('cub', False, img_size).transforms]
    assert eval_steps == ['Resize', 'CenterCrop', 'ToTensor', 'Normalize']
    vtab = data.build_transform('vtab-dtd', True, img_size).transforms
    assert [type(t).__name__ for t in vtab] == ['Resize', 'ToTensor', 'Normalize']
    assert tuple(vtab[0].size) == (img_size, img_size)
    assert data.build_transform('digits', True, img_size) is None


def test_fgvc_train_transform_augments_and_eval_does_not():
    img = Image.fromarray(np.random.RandomState(0).randint(0, 256, (30, 40, 3), dtype=np.uint8))
    torch.manual_seed(0)
    train = [data.build_transform('cub', True, 32)(img) for _ in range(8)]
    evals = [data.build_transform('cub', False, 32)(img) for _ in range(2)]
    assert any(not torch.equal(train[0], t) for t in train[1:])
    assert torch.equal(evals[0], evals[1])
    x = data.build_transform('cub', False, 32, data.INCEPTION_MEAN, data.INCEPTION_STD)(img)
    y = data.build_transform('cub', False, 32)(img)
    assert not torch.allclose(x, y)  # mean/std are applied


def test_train_flag_selects_augmenting_transform(root):
    assert 'RandomCrop' in repr(build('cub', 'train', root, train=True).transform)
    assert 'CenterCrop' in repr(build('cub', 'train', root, train=False).transform)


# ----------------------------------------------------------------------------- split hygiene and roots

def test_val_mode_never_reads_test_files(root):
    (root / 'CUB_200_2011' / 'test.json').unlink()
    (root / 'vtab-1k' / 'dtd' / 'test.txt').unlink()
    for name in ('cub', 'vtab-dtd'):
        train_split, eval_split = data.split_names(name, 'val')
        for split, train in [(train_split, True), (eval_split, False)]:
            ds = build(name, split, root, img_size=16, train=train)
            batches = list(data.build_loader(ds, 4, train=train, workers=0))
            assert sum(len(y) for _, y in batches) == len(ds)
        with pytest.raises(FileNotFoundError, match='test'):  # the files really are gone
            build(name, data.split_names(name, 'test')[1], root)


def test_root_may_be_the_dataset_folder(root):
    for name, split, folder in [('dogs', 'val', root / 'dogs'),
                                ('vtab-eurosat', 'val200', root / 'vtab-1k' / 'eurosat')]:
        assert data.dataset_dir(name, folder) == folder
        direct = build(name, split, folder)
        assert direct.samples == build(name, split, root).samples
        assert direct[0][0].shape == (3, 224, 224)
    # a benchmark folder of another dataset is an error naming it, not a silent substitute
    for name, folder, other in [('vtab-cifar', root / 'vtab-1k' / 'eurosat', 'vtab-eurosat'), ('cub', root / 'dogs',
                                                                                               'dogs')]:
        with pytest.raises(ValueError, match=f"{folder} is the folder of {other}, not of {name}: pass --data {other}"):
            data.dataset_dir(name, folder)


# ----------------------------------------------------------------------------- errors

def test_error_missing_dataset_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)CUB_200_2011.*contain train\.json.*Expected layout.*images/"):
        data.build_dataset('cub', 'train', tmp_path)
    with pytest.raises(FileNotFoundError, match=r"(?s)vtab-1k/dtd.*train800\.txt.*train800val200\.txt"):
        data.build_dataset('vtab-dtd', 'train800', tmp_path)


def test_error_missing_split_file(root):
    (root / 'nabirds' / 'val.json').unlink()
    with pytest.raises(FileNotFoundError, match=r"(?s)missing split file .*nabirds/val\.json.*Expected layout"):
        build('nabirds', 'val', root)
    (root / 'nabirds' / 'train.json').unlink()
    with pytest.raises(FileNotFoundError, match=r"missing split file .*nabirds/train\.json"):
        build('nabirds', 'test', root)  # the label map needs train.json
    (root / 'vtab-1k' / 'eurosat' / 'val200.txt').unlink()
    with pytest.raises(FileNotFoundError, match=r"missing split file .*eurosat/val200\.txt"):
        data.build_dataset('vtab-eurosat', 'val200', root)


def test_error_val_label_not_in_train(tmp_path):
    make_fgvc(tmp_path, 'cars', {'train': [3, 7, 12], 'val': [3, 5]})
    with pytest.raises(ValueError, match=r"val\.json: key 'car_ims/val000001\.jpg' has label 5.*train\.json"):
        build('cars', 'val', tmp_path)


def test_error_bad_json(root):
    (root / 'cars' / 'val.json').write_text('{"car_ims/a.jpg": "3"}')
    with pytest.raises(ValueError, match=r"val\.json: key 'car_ims/a\.jpg' has label '3', expected an integer"):
        build('cars', 'val', root)
    (root / 'cars' / 'val.json').write_text('{"car_ims/a.jpg": 3')
    with pytest.raises(ValueError, match=r"val\.json is not valid JSON"):
        build('cars', 'val', root)


@pytest.mark.parametrize('line, message', [
    ('images/test/000000.jpg 10', r"test\.txt:2: label 10 out of range 0\.\.9"),
    ('images/test/000000.jpg -1', r"test\.txt:2: label -1 out of range"),
    ('images/test/000000.jpg', r"test\.txt:2: expected '<relative path> <integer label>'"),
    ('images/test/000000.jpg three', r"test\.txt:2: expected"),
    ('', r"test\.txt:2: expected .* got ''"),
])
def test_error_bad_vtab_line(root, line, message):
    path = root / 'vtab-1k' / 'eurosat' / 'test.txt'
    lines = path.read_text().splitlines()
    path.write_text('\n'.join([lines[0], line] + lines[1:]) + '\n')
    with pytest.raises(ValueError, match=message):
        data.build_dataset('vtab-eurosat', 'test', root)


def test_error_unreadable_and_missing_image(root, monkeypatch):
    ds = build('flowers', 'train', root)
    Path(ds.samples[0][0]).write_bytes(b'this is not a jpeg')
    with pytest.raises(RuntimeError, match=r"cannot read image .*OxfordFlower/jpg/image_train00000\.jpg"):
        ds[0]
    Path(ds.samples[1][0]).unlink()
    with pytest.raises(data.ImageError, match=r"image file not found: .*OxfordFlower/jpg/image_train00001\.jpg"):
        ds[1]
    monkeypatch.setenv('VPT_ALLOW_PARTIAL', '1')  # check() builds with the default strict_classes
    with pytest.raises(ValueError, match=r"(?s)flowers: train: 1 of 6 image files are missing.*train00001\.jpg"):
        datacheck.check('flowers', root / 'OxfordFlower')  # --check finds it up front
    # the loader propagates the error with the path
    with pytest.raises(data.ImageError, match='image_train00001'):
        list(data.build_loader(torch.utils.data.Subset(ds, [1]), 2, train=False, workers=0))


def test_image_error_from_a_worker_is_one_line(root):
    """torch re-raises a worker's exception as type(e)('Caught ... in DataLoader worker process N' + traceback);
    ImageError keeps only the original message."""
    ds = build('cub', 'val', root, img_size=16)
    bad = ds.samples[2][0]
    Path(bad).write_bytes(b'not an image')
    with pytest.raises(data.ImageError) as info:
        list(data.build_loader(ds, 1, train=False, workers=2))
    message = str(info.value)
    assert message.startswith(f"cannot read image {bad}: UnidentifiedImageError") and '\n' not in message
    assert 'Traceback' not in message and 'worker process' not in message and '--decode' in message


def test_more_classes_than_the_dataset_is_always_an_error(tmp_path, monkeypatch):
    make_fgvc(tmp_path, 'dogs', {'train': list(range(1, 122)), 'val': [1]})  # 121 classes; Stanford Dogs has 120
    monkeypatch.setenv('VPT_ALLOW_PARTIAL', '1')
    with pytest.raises(ValueError, match=r"train\.json has 121 classes but dogs has 120: the split files of another"):
        data.build_dataset('dogs', 'val', tmp_path)
    monkeypatch.delenv('VPT_ALLOW_PARTIAL')
    make_fgvc(tmp_path, 'cub', {'train': [1, 2], 'val': [1]})
    with pytest.raises(ValueError, match=r"has 2 classes but cub has 200.*set VPT_ALLOW_PARTIAL=1") as info:
        data.build_dataset('cub', 'val', tmp_path)
    assert 'strict_classes' not in str(info.value)


def write_truncated_jpeg(path):
    write_jpeg(path, (64, 64), seed=1)
    path.write_bytes(path.read_bytes()[:300])  # header intact, scan data cut: opens, fails to decode


def test_check_decode_lists_every_unreadable_image(root, monkeypatch, capsys):
    monkeypatch.setenv('VPT_ALLOW_PARTIAL', '1')
    folder = root / 'dogs'
    val = json.loads((folder / 'val.json').read_text())
    truncated = folder / 'Images' / sorted(val)[0]
    write_truncated_jpeg(truncated)
    garbage = folder / 'Images' / sorted(json.loads((folder / 'test.json').read_text()))[1]
    garbage.write_bytes(b'GIF89a but not really')
    assert len(datacheck.check('dogs', root)) == 3  # without --decode the files only have to exist
    with pytest.raises(ValueError) as info:
        datacheck.check('dogs', root, decode=True, workers=2)
    message = str(info.value)
    assert message.startswith('dogs: 2 of 12 images cannot be decoded')
    assert f"val: {truncated}: OSError" in message and f"test: {garbage}: " in message
    with pytest.raises(data.ImageError, match=str(truncated)):
        data.load_image(str(truncated))  # the same file fails at load time
    assert datacheck.main(['--check', 'dogs', '--data-root', str(root), '--decode']) == 1
    err = capsys.readouterr().err
    assert err.startswith('error: dogs: 2 of 12 images') and str(garbage) in err and 'Traceback' not in err
    # every kind of problem in one run: a missing split file, a missing image, the images that cannot be decoded
    (folder / 'val.json').rename(folder / 'val.json.away')
    missing = folder / 'Images' / sorted(json.loads((folder / 'train.json').read_text()))[0]
    missing.rename(missing.with_suffix('.away'))
    assert datacheck.main(['--check', 'dogs', '--data-root', str(root), '--decode']) == 1
    err = capsys.readouterr().err
    assert err.startswith('error: dogs: 3 problems:\n') and f"missing split file {folder / 'val.json'}" in err
    assert f"train: 1 of 6 image files are missing, e.g.\n    {missing}" in err and "1 of 8 images cannot be " in err
    assert str(garbage) in err and err.count('Expected layout:') == 1 and 'Traceback' not in err
    (folder / 'val.json.away').rename(folder / 'val.json')
    missing.with_suffix('.away').rename(missing)
    for p in (truncated, garbage):
        write_jpeg(p, (20, 20), seed=3)
    assert datacheck.main(['--check', 'dogs', '--data-root', str(root), '--decode']) == 0
    assert capsys.readouterr().out.splitlines()[-1] == 'ok: dogs: 3 splits, 12 listed images, every one decoded'


def test_error_unknown_split(root):
    with pytest.raises(ValueError, match=r"FGVC split must be one of .*'train800'"):
        build('cub', 'train800', root)
    with pytest.raises(ValueError, match=r"VTAB split must be one of .*'val1k'"):
        data.build_dataset('vtab-dtd', 'val1k', root)
    with pytest.raises(ValueError, match=r"digits split must be one of"):
        data.build_dataset('digits', 'minival')


# ----------------------------------------------------------------------------- digits

def test_digits():
    sets = {s: data.build_dataset('digits', s, img_size=16, mean=data.INCEPTION_MEAN, std=data.INCEPTION_STD)
            for s in data.VTAB_SPLITS}
    sizes = {s: len(d) for s, d in sets.items()}
    assert sizes == {'train800': 800, 'val200': 200, 'train800val200': 1000, 'test': 797}
    idx = {s: [i for i, _ in d.samples] for s, d in sets.items()}
    assert len(set(idx['train800']) | set(idx['val200']) | set(idx['test'])) == 1797  # disjoint, covering
    assert idx['train800val200'] == idx['train800'] + idx['val200']
    assert all(d.num_classes == 10 and {y for _, y in d.samples} == set(range(10)) for d in sets.values())
    x = torch.stack([sets['test'][i][0] for i in range(50)])  # (50, 3, 16, 16)
    assert x.shape == (50, 3, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and torch.equal(x[:, 0], x[:, 1])  # grey, Normalize(0.5, 0.5)
    assert (x.flatten(1).std(1) > 0.1).all()  # real strokes, not constant images
    assert (torch.cdist(x.flatten(1), x.flatten(1)) + torch.eye(50) > 0).all()  # all different
    again = data.build_dataset('digits', 'test', img_size=16, mean=data.INCEPTION_MEAN, std=data.INCEPTION_STD)
    assert again.samples == sets['test'].samples and torch.equal(again[7][0], x[7])
    assert data.build_dataset('digits', 'val').split == 'val200'  # aliases
    assert data.build_dataset('digits', 'trainval', img_size=224)[0][0].shape == (3, 224, 224)
    # at img_size 8 the resampling is the identity: item k is load_digits().images[samples[k][0]] / 16
    from sklearn.datasets import load_digits
    ds8 = data.build_dataset('digits', 'test', img_size=8, mean=(0, 0, 0), std=(1, 1, 1))
    i, label = ds8.samples[3]
    assert torch.equal(ds8[3][0], torch.tensor(load_digits().images[i] / 16, dtype=torch.float32).expand(3, 8, 8))
    assert ds8[3][1] == label == load_digits().target[i]


# ----------------------------------------------------------------------------- loaders and samplers

def test_build_loader_batches(root):
    ds = build('cub', 'train', root, img_size=32, train=True)
    loader = data.build_loader(ds, 4, train=True, workers=0, seed=1)
    batches = list(loader)
    assert [tuple(x.shape) for x, _ in batches] == [(4, 3, 32, 32), (2, 3, 32, 32)]  # drop_last=False
    assert all(y.dtype == torch.int64 for _, y in batches)
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == [0, 0, 1, 1, 2, 2]
    ev = list(data.build_loader(build('cub', 'test', root, img_size=32), 2, train=False, workers=0))
    assert [len(y) for _, y in ev] == [2, 1]


def test_train_order_is_seeded_per_epoch():
    ds = data.build_dataset('digits', 'val200', img_size=8)

    def order(loader):
        return list(loader.sampler)  # one pass = one epoch's order
    a, b, c = [data.build_loader(ds, 8, train=True, workers=0, seed=seed) for seed in (3, 3, 4)]
    a0, a1 = order(a), order(a)  # the epoch advances by itself
    assert a0 == order(b) and a0 != a1 and a0 != order(c) and sorted(a0) == sorted(a1)
    a.sampler.set_epoch(0)
    assert order(a) == a0  # resume: set_epoch(e) reproduces epoch e
    assert sorted(order(a)) == list(range(200))  # a permutation, no padding with one process
    assert list(data.build_loader(ds, 8, train=False, workers=0).sampler) == list(range(200))  # eval in order


@pytest.mark.parametrize('n', [0, 1, 7, 10])
def test_shard_sampler_no_padding(n):
    shards = [list(data.ShardSampler(range(n), num_replicas=2, rank=r)) for r in (0, 1)]
    assert sorted(shards[0] + shards[1]) == list(range(n))  # every index exactly once
    assert shards[0] == list(range(0, n, 2)) and shards[1] == list(range(1, n, 2))
    assert [len(data.ShardSampler(range(n), num_replicas=2, rank=r)) for r in (0, 1)] == [len(s) for s in shards]
    with pytest.raises(ValueError, match='rank 2'):
        data.ShardSampler(range(n), num_replicas=2, rank=2)


def test_build_loader_distributed(tmp_path):
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "store"}', rank=0, world_size=1)
    try:
        ds = data.build_dataset('digits', 'val200', img_size=8)
        train = data.build_loader(ds, 16, train=True, workers=0, distributed=True, seed=5)
        ev = data.build_loader(ds, 16, train=False, workers=0, distributed=True)
        assert isinstance(train.sampler, torch.utils.data.DistributedSampler) and train.sampler.seed == 5
        assert isinstance(ev.sampler, data.ShardSampler) and list(ev.sampler) == list(range(200))
        assert sum(len(y) for _, y in ev) == 200
        assert next(iter(train))[0].shape == (16, 3, 8, 8)
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- python data.py --check

def test_check_function(root):
    rows = datacheck.check('vtab-dtd', root)
    assert [r[:3] for r in rows] == [('train800', 4, 4), ('val200', 2, 2), ('train800val200', 6, 6), ('test', 3, 3)]
    assert all(len(r[3]) == 16 for r in rows)
    # the fingerprint uses folder-relative paths, so it does not depend on how the folder was reached
    assert datacheck.check('vtab-dtd', root / 'vtab-1k' / 'dtd') == rows
    assert rows[0][3] != datacheck.check('vtab-eurosat', root)[0][3]


def test_check_cli(cli_runs, monkeypatch):
    root, runs = cli_runs
    out, err = runs['ok'].communicate(timeout=120)
    assert runs['ok'].returncode == 0, err
    lines = [line.split() for line in out.splitlines()]
    assert [line[:3] for line in lines[:-1]] == [['train', '6', '3'], ['val', '3', '2'], ['test', '3', '3']]
    assert out.splitlines()[-1] == 'ok: dogs: 3 splits, 12 listed images, every one found'
    monkeypatch.setenv('VPT_ALLOW_PARTIAL', '1')
    assert [line[3] for line in lines[:-1]] == [r[3] for r in datacheck.check('dogs', root)]
    out, err = runs['missing'].communicate(timeout=120)
    assert runs['missing'].returncode == 1 and out == ''
    assert err.startswith('error: ') and 'vtab-1k/sun397' in err and 'train800.txt' in err and 'Traceback' not in err


def test_class_names():
    assert maps.class_names(data.build_dataset('digits', 'val200', img_size=8)) == [str(c) for c in range(10)]
    ds = data.ImageListDataset('cub', 'val', Path('/r'), [('/r/images/001.Black_footed_Albatross/a.jpg', 0),
                                                          ('/r/images/003.Sooty_Albatross/b.jpg', 2)], 3, None)
    assert maps.class_names(ds) == ['Black footed Albatross', '1', 'Sooty Albatross']  # '1': absent from the split
    dogs = data.ImageListDataset('dogs', 'val', Path('/r'), [('/r/Images/n02085620-Chihuahua/a.jpg', 0),
                                                             ('/r/Images/n02085782-Japanese_spaniel/b.jpg', 1)],
                                 2, None)
    assert maps.class_names(dogs) == ['Chihuahua', 'Japanese spaniel']
    for samples in ([('/r/images/0817/a.jpg', 0), ('/r/images/0818/b.jpg', 1)],          # NABirds: folders are ids
                    [('/r/images/train800/0.jpg', 0), ('/r/images/train800/1.jpg', 1)],  # VTAB: one folder
                    [('/r/A/0.jpg', 0), ('/r/B/1.jpg', 0)]):                             # a class in two folders
        assert maps.class_names(data.ImageListDataset('x', 'val', Path('/r'), samples, 2, None)) is None


# ----------------------------------------------------------------------------- the decoded cache

def cached_vs_torchvision(ds, cache, seed, rounds=3):
    """Items of the torchvision dataset and of the cache (finished on the CPU) from the same RNG state."""
    torch.manual_seed(seed)
    ref = [ds[i][0] for _ in range(rounds) for i in range(len(ds))]
    torch.manual_seed(seed)
    got = []
    for _ in range(rounds):
        for i in range(len(cache)):
            (crop, flip), label = cache[i]
            assert crop.dtype == torch.uint8 and label == ds.samples[i][1]
            got.append(cache.finish(crop[None], flip[None])[0])
    return ref, got


@pytest.mark.parametrize('name, train', [('cub', True), ('cub', False), ('vtab-dtd', True), ('vtab-dtd', False)])
@pytest.mark.parametrize('img_size', [16, 24])
def test_decoded_cache_equals_torchvision_transform(root, name, train, img_size):
    # FGVC images of three aspect ratios (40x30, 30x50, 50x50): the cached Resize output keeps each shape
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.3, 0.25)
    split = 'train' if name == 'cub' else 'train800'
    ds = build(name, split, root, img_size=img_size, mean=mean, std=std, train=train)
    cache = decoded_cache.DecodedCache(ds, train=train, img_size=img_size, mean=mean, std=std)
    short = round(img_size * 256 / 224) if name == 'cub' else img_size
    assert all(min(a.shape[:2]) == short for a in cache.images)
    ref, got = cached_vs_torchvision(ds, cache, seed=3)
    for a, b in zip(ref, got):
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)   # bit-identical, every draw
    if train and name == 'cub':   # and it does augment: the same image differs between rounds
        assert not all(torch.equal(got[i], got[i + len(ds)]) for i in range(len(ds)))


def test_decoded_cache_crop_and_flip_statistics(root):
    # one cached 20x23 "image" whose pixels encode their own position: a crop's corner gives its offset
    ds = build('cub', 'train', root, img_size=16, train=True)
    cache = decoded_cache.DecodedCache(ds, train=True, img_size=16)
    h, w, n = 20, 23, 6000
    r, c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing='ij')
    cache.images[0] = torch.stack([r, c, torch.zeros_like(r)], -1).to(torch.uint8)
    torch.manual_seed(0)
    counts_r, counts_c, flips = torch.zeros(h - 15, dtype=torch.long), torch.zeros(w - 15, dtype=torch.long), 0
    for _ in range(n):
        (crop, flip), _ = cache[0]
        x = cache.finish(crop[None], flip[None])[0] * torch.tensor(data.IMAGENET_STD).view(3, 1, 1) \
            + torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1)
        rows, cols = (x[0] * 255).round().long(), (x[1] * 255).round().long()   # the pixel positions it shows
        top, left = rows[0, 0].item(), cols[0, :].min().item()
        assert torch.equal(rows, top + torch.arange(16).view(16, 1).expand(16, 16))
        ordered = left + torch.arange(16).expand(16, 16)
        assert torch.equal(cols, ordered.flip(-1) if flip else ordered)      # a flip mirrors the columns
        counts_r[top] += 1
        counts_c[left] += 1
        flips += int(flip)
    # every offset 0..h-16 / 0..w-16 occurs, uniformly: each count within 5 binomial sigmas of n / k
    for counts in (counts_r, counts_c):
        k = len(counts)
        sigma = (n * (1 / k) * (1 - 1 / k)) ** 0.5
        assert (counts - n / k).abs().max() <= 5 * sigma, counts
    assert abs(flips - n / 2) <= 5 * (n / 4) ** 0.5, flips


def test_decoded_cache_device_loader(root):
    ds = build('cub', 'train', root, img_size=16, train=True)
    cache = decoded_cache.DecodedCache(ds, train=True, img_size=16, workers=2)   # built by 2 worker processes
    assert len(cache) == len(ds) and cache.nbytes == sum(a.numel() for a in cache.images)
    loader = decoded_cache.DeviceLoader(data.build_loader(cache, 4, train=True, workers=0), torch.device('cpu'))
    assert len(loader) == len(data.build_loader(cache, 4, train=True, workers=0)) and loader.sampler is not None
    x, y = next(iter(loader))
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32 and y.shape == (4,)
    assert x.is_contiguous()   # as ToTensor's: a channels-last input would change the patch-embedding kernel
    with pytest.raises(ValueError, match='digits'):
        decoded_cache.DecodedCache(data.build_dataset('digits', 'train800', img_size=16), train=True, img_size=16)


# ----------------------------------------------------------------------------- --data imagefolder (your own data)

def make_imagefolder(root, splits=('train', 'val', 'test'), classes=('cat', 'dog', 'emu'), n=3):
    """root/<split>/<class>/<k>.png, n tiny images per class; returns root."""
    g = torch.Generator().manual_seed(0)
    for split in splits:
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for k in range(n):
                img = torch.randint(0, 256, (20, 30, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(img).save(root / split / c / f'{k}.png')
    return root


def test_imagefolder_reads_classes_from_train(tmp_path):
    root = make_imagefolder(tmp_path / 'mine')
    (root / 'val' / 'emu' / '0.png').unlink()
    (root / 'val' / 'emu' / 'labels.csv').write_text('not an image')      # skipped by its suffix, as ImageFolder does
    ds = data.build_dataset('imagefolder', 'val', root, img_size=16)
    assert ds.num_classes == 3 and [label for _, label in ds.samples] == [0, 0, 0, 1, 1, 1, 2, 2]
    assert all(Path(p).parent.name == ('cat', 'dog', 'emu')[label] for p, label in ds.samples)
    assert ds[0][0].shape == (3, 16, 16)
    train = data.build_dataset('imagefolder', 'train', root, img_size=16, train=True)
    assert isinstance(train.transform.transforms[1], type(data.build_transform('cub', True).transforms[1]))  # FGVC's
    assert maps.class_names(ds) == ['cat', 'dog', 'emu']
    assert data.split_names('imagefolder', 'test') == ('train', 'test')
    assert [r[:3] for r in datacheck.check('imagefolder', root)] == [('train', 9, 3), ('val', 8, 3), ('test', 9, 3)]


def test_imagefolder_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"mine/train not found: --data imagefolder needs --data-root DIR"):
        data.build_dataset('imagefolder', 'train', tmp_path / 'mine')
    root = make_imagefolder(tmp_path / 'mine', splits=('train', 'test'))
    with pytest.raises(FileNotFoundError, match=r"mine/val not found: .*no val split there .*--eval-split test"):
        data.build_dataset('imagefolder', 'val', root)
    (root / 'test' / 'yak').mkdir()
    with pytest.raises(ValueError, match=r"mine/test: class folder\(s\) yak are not in .*mine/train"):
        data.build_dataset('imagefolder', 'test', root)
