"""
Evaluate a saved run (a train.py --out directory) on a split; optionally draw attention maps.

    python eval.py --run runs/vpt-cub-in21k-base_patch16-val-seed0                 # the run's eval split
    python eval.py --run runs/vpt-cub-in21k-base_patch16-val-seed0 --split test --weights ViT-B_16.npz --maps 8

The backbone and the model are rebuilt from the configuration recorded in last.pt (the same seed, so a
random --pretrain none backbone comes back identical), the tuned tensors are loaded strictly (exactly the
tuned parameter names), and a backbone whose identity (a digest of its tensors, models.tensor_digest)
differs from the recorded one is refused: any file or hub copy holding the same weights is accepted.
The data is checked before the weights are resolved. The result is printed and written to
RUN/eval-<split>.json (accuracy, eval_split, images, the device and versions).

--maps N draws, for each of the first N images of the split, one figure RUN/maps/<split>_<index>.png: the
input (de-normalised), the map overlaid on it with a colour bar, and a title with the split, the image's
index in it and its true and predicted class (names where the dataset has them, data.class_names). The
attention map is the last block's cls-to-patch attention averaged over heads: the block's input is captured
with a forward hook on blocks[-1].norm1 (its first call in a forward is the image stream for every method,
SA²VP included) and softmax(q k^T / sqrt(d)) is recomputed with attn.split_qkv; the cls row over the last
N keys (the patches) is reshaped to the patch grid. For SA²VP a second panel shows the cosine similarity
between the prompt map entering block 0 (prompt_map()[0, 1:] + pos_embed[0, 1:]) and the image's patch
embeddings entering block 0 (patch embedding + pos_embed). All maps of one kind share one colour scale,
the minimum to the maximum over the N images (printed), so figures of one run compare directly. A patch
grid below 7x7 gets a warning: a map of so few cells says little.
"""

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

import data
import models
import train
from train import RunError


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a train.py run on a split; optional attention maps.",
                                allow_abbrev=False)
    p.add_argument('--run', required=True, help="the run directory (holds last.pt)")
    p.add_argument('--split', choices=['val', 'test'], default=None, help="default: the run's --eval-split")
    p.add_argument('--weights', default=None, help="backbone weights file (default: the recorded one); it must "
                   "hold the recorded backbone's tensors, in any format")
    p.add_argument('--data-root', default=None, help="default: the recorded one, else $VPT_DATA_ROOT or ./data")
    p.add_argument('--batch-size', type=int, default=None, help="default: the run's per-process micro-batch")
    p.add_argument('--workers', type=int, default=4, help="(default: %(default)s)")
    p.add_argument('--device', default='auto', help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument('--maps', type=int, default=0, metavar='N', help="draw maps of the first N images into RUN/maps/")
    return p.parse_args(argv)


def read_run(run):
    """(checkpoint dict, recorded configuration) of run/last.pt."""
    path = os.path.join(run, 'last.pt')
    if not os.path.isfile(path):
        raise RunError(f"{run} holds no last.pt: not a train.py run directory (pass --run DIR)")
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise RunError(f"{path} is not a readable train.py checkpoint ({type(e).__name__}); train the run "
                       f"again") from None
    return ckpt, dict(ckpt['args'])


def load_run(run, device, weights=None, data_root=None, ckpt=None):
    """(model with the run's tuned tensors, recorded configuration) from run/last.pt (or `ckpt`, read already)."""
    ckpt, cfg = read_run(run) if ckpt is None else (ckpt, dict(ckpt['args']))
    path = os.path.join(run, 'last.pt')
    if data_root is not None:
        cfg['data_root'] = data_root
    try:
        model, _ = train.build(cfg, device, weights=weights)
    except RunError as e:
        raise RunError(f"{e}\n(rebuilding the backbone of {run}; pass --weights PATH if the recorded file "
                       f"{cfg['weights']!r} is elsewhere on this machine)") from None
    if not models.same_backbone(model.backbone, ckpt['identity']):
        raise RunError(f"backbone mismatch: {run} was trained on {ckpt['identity']}, but the backbone built here "
                       f"is {model.backbone.identity}; pass --weights with the weights it was trained on")
    train.load_tuned(model, ckpt['model'], path)
    return model.eval(), cfg


# -----------------------------------------------------------------------------
# maps


@torch.no_grad()
def attention_map(model, x):
    """Last block's cls-to-patch attention, mean over heads: (B, 3, H, W) -> (B, h, w)."""
    bb = model.backbone
    blk = bb.blocks[-1]
    seen = []
    hook = blk.norm1.register_forward_hook(lambda m, i, o: seen.append(o) if not seen else None)  # first call only
    try:
        model(x)
    finally:
        hook.remove()
    q, k, _ = blk.attn.split_qkv(seen[0])                                     # each (B, H, T, d)
    attn = (q[:, :, :1] @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1)  # (B, H, 1, T)
    return attn[:, :, 0, -bb.num_patches:].mean(1).reshape(-1, *bb.grid)      # (B, h, w)


@torch.no_grad()
def similarity_map(model, x):
    """SA²VP: cosine similarity of the prompt map and the patch embeddings entering block 0: (B, h, w)."""
    bb = model.backbone
    prompt = model.prompt_map()[0, 1:] + bb.pos_embed[0, 1:]                 # (N, D)
    patches = bb.embed(x)[:, 1:]                                              # (B, N, D)
    return F.cosine_similarity(patches, prompt[None], dim=-1).reshape(-1, *bb.grid)


MAP_TITLES = {'attention': 'last block: cls -> patches\n(mean over heads)',
              'similarity': 'prompt map vs patch embeddings\n(cosine, entering block 0)'}


@torch.no_grad()
def write_maps(model, ds, n, batch_size, device, mean, std, folder, split_name):
    """One figure per image for the first n images of ds (see the module docstring).
    Returns (figures [dict(index, path, true, pred, title)], scales {kind: (lo, hi)})."""
    from matplotlib.figure import Figure
    os.makedirs(folder, exist_ok=True)
    mean, std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    kinds = {'attention': attention_map}
    if model.method == 'sa2vp':
        kinds['similarity'] = similarity_map
    names = data.class_names(ds)
    name = (lambda c: names[c]) if names else str
    images, labels, preds, maps = [], [], [], {kind: [] for kind in kinds}
    n = min(n, len(ds))
    for start in range(0, n, batch_size):
        items = [ds[i] for i in range(start, min(n, start + batch_size))]
        x = torch.stack([img for img, _ in items]).to(device)                 # (B, 3, S, S)
        labels += [int(label) for _, label in items]
        preds += model(x).argmax(-1).tolist()
        images.append((x.cpu() * std + mean).clamp(0, 1))
        for kind, fn in kinds.items():
            maps[kind].append(fn(model, x).float().cpu())                     # (B, h, w)
    images = torch.cat(images)
    maps = {kind: torch.cat(m) for kind, m in maps.items()}
    scales = {kind: (m.min().item(), m.max().item()) for kind, m in maps.items()}  # one scale per kind and run
    figures = []
    for i in range(n):
        img = images[i].permute(1, 2, 0).numpy()                              # (S, S, 3)
        S = img.shape[0]
        title = f"{split_name} image {i}: true {name(labels[i])}, predicted {name(preds[i])}"
        fig = Figure(figsize=(3.3 * (1 + len(kinds)), 3.6))
        axes = fig.subplots(1, 1 + len(kinds), squeeze=False)[0]
        axes[0].imshow(img, interpolation='nearest')
        axes[0].set_title('input', fontsize=9)
        for ax, kind in zip(axes[1:], kinds):
            ax.imshow(img, interpolation='nearest')
            lo, hi = scales[kind]
            im = ax.imshow(maps[kind][i].numpy(), cmap='jet', alpha=0.5, vmin=lo, vmax=hi, interpolation='nearest',
                           extent=(-0.5, S - 0.5, S - 0.5, -0.5))                 # one cell per patch
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
            ax.set_title(MAP_TITLES[kind], fontsize=9)
        for ax in axes:
            ax.set_axis_off()
        fig.suptitle(title, fontsize=10)
        path = os.path.join(folder, f'{split_name}_{i:05d}.png')
        fig.savefig(path, dpi=100)
        figures.append(dict(index=i, path=path, true=labels[i], pred=preds[i], title=title))
    return figures, scales


# -----------------------------------------------------------------------------


def main(argv=None):
    """Evaluate; returns the accuracy in percent."""
    args = parse_args(argv)
    t0 = time.time()
    device = train.resolve_device(args.device)
    ckpt, cfg = read_run(args.run)
    split = args.split or cfg['eval_split']
    split_name = data.split_names(cfg['data'], split)[1]
    data_root = args.data_root if args.data_root is not None else cfg['data_root']
    try:  # the data before the weights: the split file is read in a moment
        ds = data.build_dataset(cfg['data'], split_name, root=data_root, img_size=cfg['img_size'],
                                mean=cfg['mean'], std=cfg['std'], train=False)
    except (FileNotFoundError, ValueError) as e:
        raise RunError(f"{args.run} ({cfg['data']}): {e}") from None
    model, cfg = load_run(args.run, device, args.weights, args.data_root, ckpt=ckpt)
    batch = args.batch_size or cfg['micro_batch']
    loader = data.build_loader(ds, batch, train=False, workers=args.workers)
    acc = train.evaluate(model, loader, device, train.amp_dtype(cfg['amp'], device))
    reported, trained_acc = '', None
    result_path = os.path.join(args.run, 'result.json')
    if os.path.isfile(result_path):
        with open(result_path) as f:
            result = json.load(f)
        if result['eval_split'] == split:
            trained_acc = result['accuracy']
            reported = f" (train.py reported {trained_acc:.2f}%)"
    print(f"{args.run}: {cfg['method']} on {cfg['data']} {split_name}: accuracy {acc:.2f}% of {len(ds)} "
          f"images{reported}")
    record = dict(accuracy=acc, eval_split=split, split_name=split_name, images=len(ds), train_accuracy=trained_acc,
                  method=cfg['method'], data=cfg['data'], weights=args.weights or cfg['weights'],
                  backbone_identity=model.backbone.identity, **train.environment(device))
    if args.maps:
        h, w = model.backbone.grid
        if h < 7 or w < 7:
            print(f"warning: the patch grid is {h}x{w} (--img-size {cfg['img_size']} / patch "
                  f"{model.backbone.patch_size}); a map of fewer than 7x7 cells shows little: train at --img-size "
                  f"{7 * model.backbone.patch_size} or more for maps", file=sys.stderr)
        folder = os.path.join(args.run, 'maps')
        figures, scales = write_maps(model, ds, args.maps, batch, device, cfg['mean'], cfg['std'], folder, split_name)
        ranges = '; '.join(f"{kind} {lo:.4g} .. {hi:.4g}" for kind, (lo, hi) in scales.items())
        print(f"drew maps of {len(figures)} images into {folder} (one figure each); colour scale shared by all "
              f"{len(figures)}, min to max: {ranges}")
        record['maps'] = dict(images=len(figures), folder=folder, scales=scales)
    record['wall_time_s'] = time.time() - t0
    train.atomic_json(record, os.path.join(args.run, f'eval-{split}.json'))
    return acc


if __name__ == '__main__':
    train.cli(main)
