"""
python data.py --check NAME [--data-root DIR] [--decode] [--vtab-source tfds|folder]: a dataset on disk checked
split by split, one line each: '<split> <images> <classes> <sha256[:16] of the sorted "path label" lines>'. Every
listed image must exist; --decode also decodes every image. Every problem found is listed in one run; success ends
with an `ok:` line. VTAB-1k read from TFDS's files (tfds.py): a first line names them, and every record's CRC is
checked as the split is read.
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


def check(name, root=None, decode=False, workers=None, source=None, splits=None):
    """Per split: (split, images, distinct labels, fingerprint). Every listed image must exist (TFDS: every record's
    CRC is checked as the split is read). decode=True also decodes every image in full (`workers` threads, default
    the CPU count; PIL releases the GIL while decoding). source: VTAB-1k's (data.vtab_source). splits: default every
    split of the dataset (an imagefolder's that are there). A missing dataset folder raises at once; every other
    problem of every split (a split file missing or malformed, missing images, undecodable ones) is collected into
    one ValueError."""
    kind = _kind(name)
    folder = vtab_source(name, root, source)[1] if kind == 'vtab' else dataset_dir(name, root)  # missing: at once
    if splits is None:
        splits = FGVC_SPLITS if kind == 'fgvc' else VTAB_SPLITS
        if kind == 'imagefolder':  # the splits that are there (train must be)
            splits = [s for s in FGVC_SPLITS if (folder / s).is_dir()]
    rows, problems, bad, seen, layout = [], [], [], set(), ''
    for split in splits:
        try:
            ds = build_dataset(name, split, root, source=source)
        except (FileNotFoundError, ValueError) as e:  # one split's file; the other splits are still checked
            message, _, found = str(e).partition('\nExpected layout:\n')
            problems.append(message)
            layout = layout or found
            continue
        missing = [p for p, _ in ds.samples if not os.path.isfile(p)] if ds.source == 'folder' else []
        if missing:
            problems.append(f"{split}: {len(missing)} of {len(ds.samples)} image files are missing, e.g.\n    "
                            + '\n    '.join(missing[:10]))
        if decode and kind != 'digits':
            gone = set(missing)
            todo = {p: i for i, (p, _) in enumerate(ds.samples) if p not in seen and p not in gone}  # once each
            seen.update(todo)
            read = unreadable if ds.source == 'folder' else lambda key, ds=ds: unreadable_record(ds, todo[key])
            with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
                bad += [(split, msg) for msg in pool.map(read, sorted(todo)) if msg is not None]
        rows.append((split, len(ds.samples), len({label for _, label in ds.samples}), fingerprint(ds)))
    if bad:
        listed = '\n    '.join(f"{split}: {msg}" for split, msg in bad)
        problems.append(f"{len(bad)} of {len(seen)} images cannot be decoded; replace or re-extract them:\n    "
                        + listed)
    problems = list(dict.fromkeys(problems))  # FGVC's splits all read train.json: a bad one fails each alike
    if problems:
        text = problems[0] if len(problems) == 1 else f"{len(problems)} problems:\n  " + '\n  '.join(problems)
        raise ValueError(f"{name}: {text}" + (f"\nExpected layout:\n{layout}" if layout else ''))
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
        rows = check(args.check, args.data_root, args.decode, args.workers, args.vtab_source)
        print(*(' '.join(map(str, row)) for row in rows), sep='\n')
        print(f"ok: {args.check}: {len(rows)} splits, {sum(r[1] for r in rows)} listed images, every one "
              f"{'decoded' if args.decode else 'found'}")
    except (FileNotFoundError, ValueError, ImageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
