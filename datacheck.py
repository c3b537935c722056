"""
python data.py --check NAME [--data-root DIR] [--decode] [--vtab-source tfds|folder]: a dataset on disk checked
split by split, one line each: '<split> <images> <classes> <sha256[:16] of the sorted "path label" lines>'. Every
listed image must exist; --decode also decodes every image and lists each one that cannot be read. VTAB-1k read
from TFDS's files (tfds.py): a first line names them; the lines are '<TFDS split>[<position>] <CRC> <label>' and
every record's CRC is checked as the split is read.
"""

import argparse
import hashlib
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from data import (DATASETS, FGVC_SPLITS, VTAB_SOURCES, VTAB_SPLITS, ImageError, _kind, build_dataset, dataset_dir,
                  vtab_source)


def unreadable(path):
    """None if the image at `path` decodes in full, else '<path>: <why>'."""
    try:
        with Image.open(path) as im:
            im.convert('RGB')
    except Exception as e:
        return f"{path}: {type(e).__name__}: {e}"
    return None


def unreadable_record(ds, i):
    """None if item i of a TFDS split decodes, else why."""
    try:
        ds.image(i)
    except ImageError as e:
        return str(e)
    return None


def fingerprint(ds):
    """sha256[:16] of the sorted "path label" lines of a dataset, paths relative to its folder (digits: the
    load_digits index; TFDS: its .digest), so that it does not depend on where the data lives."""
    if ds.source == 'tfds':
        return ds.digest
    rel = (lambda p: p) if ds.root is None else (lambda p: Path(os.path.relpath(p, ds.root)).as_posix())
    lines = [f"{rel(p)} {label}" for p, label in ds.samples]
    return hashlib.sha256('\n'.join(sorted(lines)).encode()).hexdigest()[:16]


def check(name, root=None, decode=False, workers=None, source=None):
    """Per split: (split, images, distinct labels, fingerprint). Every listed image must exist (TFDS: every record's
    CRC is checked as the split is read). decode=True also decodes every image in full (`workers` threads, default
    the CPU count; PIL releases the GIL while decoding) and raises one ImageError that lists every unreadable image
    with its path. source: VTAB-1k's (data.vtab_source)."""
    kind = _kind(name)
    splits = FGVC_SPLITS if kind == 'fgvc' else VTAB_SPLITS
    if kind == 'imagefolder':  # the splits that are there (train must be)
        splits = [s for s in FGVC_SPLITS if (dataset_dir(name, root) / s).is_dir()]
    rows, bad, seen = [], [], set()
    for split in splits:
        ds = build_dataset(name, split, root, source=source)
        if ds.source == 'folder':
            missing = [p for p, _ in ds.samples if not os.path.isfile(p)]
            if missing:
                shown = '\n  '.join(missing[:10])
                raise FileNotFoundError(f"{name} {split}: {len(missing)} of {len(ds.samples)} image files are missing, "
                                        f"e.g.\n  {shown}")
        if decode and kind != 'digits':
            todo = {p: i for i, (p, _) in enumerate(ds.samples) if p not in seen}  # an image in two splits: once
            seen.update(todo)
            read = unreadable if ds.source == 'folder' else lambda key, ds=ds: unreadable_record(ds, todo[key])
            with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
                bad += [(split, msg) for msg in pool.map(read, sorted(todo)) if msg is not None]
        rows.append((split, len(ds.samples), len({label for _, label in ds.samples}), fingerprint(ds)))
    if bad:
        listed = '\n  '.join(f"{split}: {msg}" for split, msg in bad)
        raise ImageError(f"{name}: {len(bad)} of {len(seen)} images cannot be decoded; replace or re-extract "
                         f"them:\n  {listed}")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description="Check a dataset on disk: one line per split "
                                     "'<split> <images> <classes> <sha256[:16] of sorted path-label lines>'.")
    parser.add_argument('--check', required=True, metavar='NAME', help=f"one of: {', '.join(DATASETS)}")
    parser.add_argument('--data-root', default=None, help="data root (default: $VPT_DATA_ROOT or ./data), "
                        "or the dataset folder itself")
    parser.add_argument('--decode', action='store_true', help="also decode every image and list each unreadable "
                        "one (minutes on NABirds)")
    parser.add_argument('--workers', type=int, default=None, help="decoding threads (default: the CPU count)")
    parser.add_argument('--vtab-source', choices=VTAB_SOURCES, help="VTAB-1k: TFDS's files or NOAH's folders "
                        "(default: tfds when it is there)")
    args = parser.parse_args(argv)
    try:
        if _kind(args.check) == 'vtab':
            print(f"{args.check}:", *vtab_source(args.check, args.data_root, args.vtab_source))
        for row in check(args.check, args.data_root, args.decode, args.workers, args.vtab_source):
            print(*row)
    except (FileNotFoundError, ValueError, ImageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
