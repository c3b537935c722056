"""
python data.py --check NAME [--data-root DIR] [--decode]: a dataset on disk checked split by split, one line
each: '<split> <images> <classes> <sha256[:16] of the sorted "path label" lines>'. Every listed image must
exist; --decode also decodes every image. Every problem found is listed in one run; success ends with an `ok:`
line.
"""

import argparse
import hashlib
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from data import DATASETS, FGVC_SPLITS, VTAB_SPLITS, ImageError, _kind, build_dataset, dataset_dir


def unreadable(path):
    """None if the image at `path` decodes in full, else '<path>: <why>'."""
    try:
        with Image.open(path) as im:
            im.convert('RGB')
    except Exception as e:
        return f"{path}: {type(e).__name__}: {e}"
    return None


def check(name, root=None, decode=False, workers=None, splits=None):
    """Per split: (split, images, distinct labels, sha256[:16] of the sorted "path label" lines).

    Paths are relative to the dataset folder (digits: the load_digits index) and labels are the remapped
    ones, so the fingerprint does not depend on where the data lives. Every listed image must exist.
    decode=True also decodes every image in full (`workers` threads, default the CPU count; PIL releases
    the GIL while decoding). splits: default every split of the dataset (an imagefolder's that are there).
    A missing dataset folder raises at once; every other problem of every split (a split file that is missing
    or malformed, missing images, images that cannot be decoded) is collected into one ValueError.
    """
    kind, folder = _kind(name), dataset_dir(name, root)
    if splits is None:
        splits = FGVC_SPLITS if kind == 'fgvc' else VTAB_SPLITS
        if kind == 'imagefolder':  # the splits that are there (train must be)
            splits = [s for s in FGVC_SPLITS if (folder / s).is_dir()]
    rows, problems, bad, seen, layout = [], [], [], set(), ''
    for split in splits:
        try:
            ds = build_dataset(name, split, root)
        except (FileNotFoundError, ValueError) as e:  # one split's file; the other splits are still checked
            message, _, found = str(e).partition('\nExpected layout:\n')
            problems.append(message)
            layout = layout or found
            continue
        if kind == 'digits':
            lines = [f"{i} {label}" for i, label in ds.samples]
        else:
            missing = [p for p, _ in ds.samples if not os.path.isfile(p)]
            if missing:
                problems.append(f"{split}: {len(missing)} of {len(ds.samples)} image files are missing, e.g.\n    "
                                + '\n    '.join(missing[:10]))
            lines = [f"{Path(os.path.relpath(p, ds.root)).as_posix()} {label}" for p, label in ds.samples]
            if decode:
                paths = sorted({p for p, _ in ds.samples} - seen - set(missing))  # an image listed in two splits: once
                seen.update(paths)
                with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
                    bad += [(split, msg) for msg in pool.map(unreadable, paths) if msg is not None]
        digest = hashlib.sha256('\n'.join(sorted(lines)).encode()).hexdigest()[:16]
        rows.append((split, len(ds.samples), len({label for _, label in ds.samples}), digest))
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
    args = parser.parse_args(argv)
    try:
        rows = check(args.check, args.data_root, args.decode, args.workers)
        print(*(' '.join(map(str, row)) for row in rows), sep='\n')
        print(f"ok: {args.check}: {len(rows)} splits, {sum(r[1] for r in rows)} listed images, every one "
              f"{'decoded' if args.decode else 'found'}")
    except (FileNotFoundError, ValueError, ImageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
