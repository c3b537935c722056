"""
Evaluate a saved run (a train.py --out directory) on a split; optionally write attention maps as PNG.

    python eval.py --run runs/vpt-cub-in21k-seed0                  # the run's eval split
    python eval.py --run runs/vpt-cub-in21k-seed0 --split test --weights ViT-B_16.npz --maps 8

The backbone and the model are rebuilt from the configuration recorded in last.pt (the same seed, so a
random --pretrain none backbone comes back identical), the tuned tensors are loaded strictly (exactly the
tuned parameter names), and a backbone whose identity differs from the recorded one is refused.

--maps N writes, for the first N images of the split, DIR/maps/<i>_attention.png: the input image
(de-normalised) next to the cls-to-patch attention of the last block, averaged over heads. The block's
input is captured with a forward hook on blocks[-1].norm1 (its first call in a forward is the image
stream for every method, SA²VP included) and softmax(q k^T / sqrt(d)) is recomputed with attn.split_qkv;
the cls row over the last N keys (the patches) is reshaped to the patch grid. For SA²VP also
DIR/maps/<i>_similarity.png: the cosine similarity between the prompt map entering block 0
(prompt_map()[0, 1:] + pos_embed[0, 1:]) and the image's patch embeddings entering block 0
(patch embedding + pos_embed). Maps are min-max scaled per image, coloured blue (low) to red (high),
and upsampled (nearest, one cell per patch) to the image size.
"""

import argparse
import json
import math
import os

import torch
import torch.nn.functional as F
from torchvision.utils import save_image

import data
import train
from train import RunError


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a train.py run on a split; optional attention maps.",
                                allow_abbrev=False)
    p.add_argument('--run', required=True, help="the run directory (holds last.pt)")
    p.add_argument('--split', choices=['val', 'test'], default=None, help="default: the run's --eval-split")
    p.add_argument('--weights', default=None, help="backbone weights file (default: the recorded one); its "
                   "identity must equal the recorded backbone identity")
    p.add_argument('--data-root', default=None, help="default: the recorded one, else $VPT_DATA_ROOT or ./data")
    p.add_argument('--batch-size', type=int, default=None, help="default: the run's per-process micro-batch")
    p.add_argument('--workers', type=int, default=4, help="(default: %(default)s)")
    p.add_argument('--maps', type=int, default=0, metavar='N', help="write PNG maps for N images into RUN/maps/")
    return p.parse_args(argv)


def load_run(run, device, weights=None, data_root=None):
    """(model with the run's tuned tensors, recorded configuration) from run/last.pt."""
    path = os.path.join(run, 'last.pt')
    if not os.path.isfile(path):
        raise RunError(f"{run} holds no last.pt: not a train.py run directory")
    ckpt = torch.load(path, map_location='cpu', weights_only=True)
    cfg = dict(ckpt['args'])
    if data_root is not None:
        cfg['data_root'] = data_root
    try:
        model, _ = train.build(cfg, device, weights=weights)
    except RunError as e:
        raise RunError(f"{e}\n(rebuilding the backbone of {run}; pass --weights PATH if the recorded file "
                       f"{cfg['weights']!r} is elsewhere on this machine)") from None
    if model.backbone.identity != ckpt['identity']:
        raise RunError(f"backbone mismatch: {run} was trained on {ckpt['identity']}, but the backbone built here "
                       f"is {model.backbone.identity}")
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


def colorize(m, size):
    """(h, w) map -> (3, size, size) in [0, 1]: min-max scaled, blue-cyan-yellow-red, nearest upsampling."""
    m = (m - m.min()) / (m.max() - m.min()).clamp_min(1e-12)
    m = F.interpolate(m[None, None].float(), size=(size, size), mode='nearest')[0, 0]
    return torch.stack([(1.5 - (4 * m - c).abs()).clamp(0, 1) for c in (3, 2, 1)])  # (3, size, size)


def write_maps(model, ds, n, batch_size, device, mean, std, folder):
    """PNG maps for the first n images of ds; returns the written paths."""
    os.makedirs(folder, exist_ok=True)
    mean, std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    kinds = {'attention': attention_map}
    if model.method == 'sa2vp':
        kinds['similarity'] = similarity_map
    paths = []
    for start in range(0, min(n, len(ds)), batch_size):
        idx = range(start, min(n, len(ds), start + batch_size))
        x = torch.stack([ds[i][0] for i in idx])                              # (B, 3, S, S)
        size = x.shape[-1]
        scale = max(1, 112 // size)  # small (test / demo) images are enlarged for viewing
        images = (x * std + mean).clamp(0, 1)
        for kind, fn in kinds.items():
            maps = fn(model, x.to(device)).cpu()                              # (B, h, w)
            for i, img, m in zip(idx, images, maps):
                pair = torch.stack([img, colorize(m, size)])                  # (2, 3, S, S)
                if scale > 1:
                    pair = F.interpolate(pair, scale_factor=scale, mode='nearest')
                path = os.path.join(folder, f'{i:03d}_{kind}.png')
                save_image(pair, path, nrow=2, padding=2, pad_value=1.0)
                paths.append(path)
    return paths


# -----------------------------------------------------------------------------


def main(argv=None):
    """Evaluate; returns the accuracy in percent."""
    args = parse_args(argv)
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    model, cfg = load_run(args.run, device, args.weights, args.data_root)
    split = args.split or cfg['eval_split']
    split_name = data.split_names(cfg['data'], split)[1]
    ds = data.build_dataset(cfg['data'], split_name, root=cfg['data_root'], img_size=cfg['img_size'],
                            mean=cfg['mean'], std=cfg['std'], train=False)
    batch = args.batch_size or cfg['micro_batch']
    loader = data.build_loader(ds, batch, train=False, workers=args.workers)
    acc = train.evaluate(model, loader, device, train.amp_dtype(cfg['amp'], device))
    reported = ''
    result_path = os.path.join(args.run, 'result.json')
    if os.path.isfile(result_path):
        with open(result_path) as f:
            result = json.load(f)
        if result['eval_split'] == split:
            reported = f" (train.py reported {result['accuracy']:.2f}%)"
    print(f"{args.run}: {cfg['method']} on {cfg['data']} {split_name}: accuracy {acc:.2f}% of {len(ds)} "
          f"images{reported}")
    if args.maps:
        paths = write_maps(model, ds, args.maps, batch, device, cfg['mean'], cfg['std'],
                           os.path.join(args.run, 'maps'))
        print(f"wrote {len(paths)} maps to {os.path.join(args.run, 'maps')}")
    return acc


if __name__ == '__main__':
    train.cli(main)
