"""
eval.py --maps N: for each of the first N images of a split, one figure RUN/maps/<split>_<index>.png: the input
(de-normalised), the map overlaid on it with a colour bar, and a title with the split, the image's index in it
and its true and predicted class (names where the dataset has them, class_names).

The attention map is the last block's cls-to-patch attention averaged over heads, as the model's own forward
computed it (a method's change of the attention logits included): models.Attention records the probabilities it
uses; the cls row over the last N keys (the patches) is reshaped to the patch grid. A method with a 2-D prompt map
(SA²VP) gets a second panel: the cosine similarity between the prompt map entering block 0 (prompt_map()[0, 1:] +
pos_embed[0, 1:]) and the image's patch embeddings entering block 0. All maps of one kind share one colour scale,
the minimum to the maximum over the N images, so figures of one run compare directly. A patch grid below 7x7 gets a
warning: a map of so few cells says little.
"""

import os
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F


@torch.no_grad()
def attention_map(model, x):
    """The last block's cls-to-patch attention in the forward the model runs, mean over heads: (B, 3, H, W) ->
    (B, h, w). The block's Attention records every call's probabilities (models.Attention.record); the first call is
    the image stream's own attention for every method (SA²VP runs it before its cross-attention)."""
    bb = model.backbone
    attn = bb.blocks[-1].attn
    attn.record = []
    try:
        model(x)
        probs = attn.record[0]                                                # (B, H, T, T)
    finally:
        attn.record = None
    return probs[:, :, 0, -bb.num_patches:].mean(1).reshape(-1, *bb.grid)    # the cls row over the patch keys


@torch.no_grad()
def similarity_map(model, x):
    """A method with a 2-D prompt map (SA²VP's prompt_map): its cosine similarity with the patch embeddings entering
    block 0, (B, h, w)."""
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
    if hasattr(model, 'prompt_map'):
        kinds['similarity'] = similarity_map
    names = class_names(ds)
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


def class_names(ds):
    """Readable class names by label where the dataset has them, else None. digits: '0'..'9'. FGVC sets that keep
    one folder per class use the folder name without its id (CUB '001.Black_footed_Albatross' -> 'Black footed
    Albatross', Dogs 'n02085620-Chihuahua' -> 'Chihuahua'); when folders are numbers (NABirds) or do not follow
    the classes (Flowers, Cars, VTAB), None."""
    if ds.name == 'digits':
        return [str(c) for c in range(10)]
    folders = {}
    for path, label in ds.samples:
        folders.setdefault(label, set()).add(Path(path).parent.name)
    if any(len(f) != 1 for f in folders.values()):
        return None
    names = {label: re.sub(r'^(\d+\.|n\d+-)', '', f.pop()).replace('_', ' ') for label, f in folders.items()}
    if len(set(names.values())) != len(names) or any(n.isdigit() or not n for n in names.values()):
        return None
    return [names.get(c, str(c)) for c in range(ds.num_classes)]


def draw(model, ds, n, batch_size, device, cfg, run):
    """write_maps into RUN/maps with the run's normalisation; prints the shared colour scales. Returns the record
    eval.py stores (images, folder, scales)."""
    h, w = model.backbone.grid
    if h < 7 or w < 7:
        print(f"warning: the patch grid is {h}x{w} (--img-size {cfg['img_size']} / patch "
              f"{model.backbone.patch_size}); a map of fewer than 7x7 cells shows little: train at --img-size "
              f"{7 * model.backbone.patch_size} or more for maps", file=sys.stderr)
    folder = os.path.join(run, 'maps')
    figures, scales = write_maps(model, ds, n, batch_size, device, cfg['mean'], cfg['std'], folder, ds.split)
    ranges = '; '.join(f"{kind} {lo:.4g} .. {hi:.4g}" for kind, (lo, hi) in scales.items())
    print(f"drew maps of {len(figures)} images into {folder} (one figure each); colour scale shared by all "
          f"{len(figures)}, min to max: {ranges}")
    return dict(images=len(figures), folder=folder, scales=scales)
