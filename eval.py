"""
Evaluate a saved run (a train.py --out directory) on a split; optionally draw attention maps (maps.py).

    python eval.py --run runs/vpt-cub-in21k-base_patch16-val-seed0                 # the run's eval split
    python eval.py --run runs/vpt-cub-in21k-base_patch16-val-seed0 --split test --weights ViT-B_16.npz --maps 8

The model is rebuilt from the configuration recorded in last.pt (the same seed, so a random --pretrain none
backbone comes back identical), the tuned tensors are loaded strictly, and a backbone whose identity (a digest of
its tensors) differs from the recorded one is refused: any file or hub copy holding the same weights is accepted.
The data is checked before the weights are resolved. The result is printed and written to RUN/eval-<split>.json.
"""

import argparse
import os
import time

import data
import runs
import train
from runs import RunError


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a train.py run on a split; optional attention maps.",
                                allow_abbrev=False)
    p.add_argument('--run', required=True, help="the run directory (holds last.pt)")
    p.add_argument('--split', choices=['val', 'test'], help="(default: the run's --eval-split)")
    p.add_argument('--weights', help="backbone weights file, any format holding the recorded tensors (default: the "
                   "recorded one)")
    p.add_argument('--data-root', help="(default: the recorded one)")
    p.add_argument('--batch-size', type=int, help="(default: the run's per-process micro-batch)")
    p.add_argument('--workers', type=int, default=runs.DEFAULT_WORKERS, help="(default: min(4, CPUs), here "
                   "%(default)s)")
    p.add_argument('--device', default='auto', help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument('--maps', type=int, default=0, metavar='N', help="draw maps of the first N images into RUN/maps/")
    return p.parse_args(argv)


def load_run(run, device, weights=None, data_root=None, ckpt=None):
    """(model with the run's tuned tensors, recorded configuration) from run/last.pt (or `ckpt`, read already)."""
    ckpt, cfg = runs.read_run(run) if ckpt is None else (ckpt, dict(ckpt['args']))
    if data_root is not None:
        cfg['data_root'] = data_root
    try:
        model = train.build(cfg, device, weights)
    except RunError as e:
        raise RunError(f"{e}\n(rebuilding the backbone of {run}; pass --weights PATH if the recorded file "
                       f"{cfg['weights']!r} is elsewhere on this machine)") from None
    if model.backbone.identity != ckpt['identity']:
        raise RunError(f"backbone mismatch: {run} was trained on {ckpt['identity']}, but the backbone built here "
                       f"is {model.backbone.identity}; pass --weights with the weights it was trained on")
    runs.load_tuned(model, ckpt['model'], os.path.join(run, 'last.pt'))
    return model.eval(), cfg


def main(argv=None):
    """Evaluate; returns the accuracy in percent."""
    args = parse_args(argv)
    t0 = time.time()
    device = runs.resolve_device(args.device)
    ckpt, cfg = runs.read_run(args.run)
    split = args.split or cfg['eval_split']
    split_name = data.split_names(cfg['data'], split)[1]
    data_root = args.data_root if args.data_root is not None else cfg['data_root']
    try:  # the data before the weights: the split file is read in a moment
        ds = data.build_dataset(cfg['data'], split_name, **data.dataset_kwargs(dict(cfg, data_root=data_root)))
    except (FileNotFoundError, ValueError) as e:
        raise RunError(f"{args.run} ({cfg['data']}): {e}") from None
    model, cfg = load_run(args.run, device, args.weights, args.data_root, ckpt=ckpt)
    batch = args.batch_size or cfg['micro_batch']
    loader = data.build_loader(ds, batch, train=False, workers=args.workers)
    acc = train.evaluate(model, loader, device, train.amp_dtype(cfg['amp'], device))
    result_path = os.path.join(args.run, 'result.json')
    trained = runs.read_json(result_path) if os.path.isfile(result_path) else {}
    trained_acc = trained.get('accuracy') if trained.get('eval_split') == split else None
    print(f"{args.run}: {cfg['method']} on {cfg['data']} {split_name}: accuracy {acc:.2f}% of {len(ds)} images"
          + (f" (train.py reported {trained_acc:.2f}%)" if trained_acc is not None else ''))
    record = dict(accuracy=acc, eval_split=split, split_name=split_name, images=len(ds), train_accuracy=trained_acc,
                  method=cfg['method'], data=cfg['data'], weights=args.weights or cfg['weights'],
                  backbone_identity=model.backbone.identity, **runs.environment(device))
    if args.maps:
        import maps
        record['maps'] = maps.draw(model, ds, args.maps, batch, device, cfg, args.run)
    record['wall_time_s'] = time.time() - t0
    runs.atomic_json(record, os.path.join(args.run, f'eval-{split}.json'))
    return acc


if __name__ == '__main__':
    runs.cli(main)
