"""
`train.py --method linear --lr a,b,... --wd c,d,...`: the linear-probe grid in one pass. Every (lr, wd) head
trains side by side on one stream of backbone features (one backbone forward per image for all heads), in
train.py's own train_epoch, and each cell is written as the ordinary run directory OUT/lr<lr>_wd<wd>/ it would
have been on its own: the same seed gives the same head init, data order and schedule, and the heads' summed loss
gives each head exactly its own gradient. When the training transform has no randomness (VTAB, digits) the
features of both splits are computed once and every epoch reads them from memory; with FGVC's random crop and
flip they are recomputed per batch. One process, no --resume (a killed cell resumes on its own: train.py --resume
--out OUT/<cell>); a head whose loss turns non-finite stops alone and is reported, the others finish.
"""

import copy
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import data
import methods
import runs
import train
from runs import RunError


def cell_name(lr, wd):
    """The run directory of one (lr, wd) cell inside --out (sweep.py names its cells the same way)."""
    return f"lr{lr:g}_wd{wd:g}"


class Heads(nn.Module):
    """K copies of a linear probe's head on its features (x: images, or (B, D) features when `cached`).
    forward: (B, K, C) logits; loss: the sum of the live heads' cross-entropies. A head whose loss is not finite
    leaves the sum for good (its parameters then get no gradient, so the optimizer skips them)."""

    def __init__(self, model, k, cached):
        super().__init__()
        self.model, self.cached = model, cached                   # model: the methods.Linear every cell builds
        self.cells = nn.ModuleList(nn.Module() for _ in range(k))
        for cell in self.cells:
            cell.head = copy.deepcopy(model.head)                 # names as in the model: head.weight, head.bias
        model.head.requires_grad_(False)
        self.register_buffer('live', torch.ones(k, dtype=torch.bool))
        self.register_buffer('loss_sum', torch.zeros(k, dtype=torch.float64))

    def features(self, x):
        return x if self.cached else self.model.features(x)      # (B, D)

    def forward(self, x):
        f = self.features(x)
        return torch.stack([cell.head(f) for cell in self.cells], 1)                    # (B, K, C)

    def loss(self, x, y):
        f = self.features(x)
        losses = torch.stack([F.cross_entropy(cell.head(f), y) for cell in self.cells])  # (K,)
        self.live &= torch.isfinite(losses.detach())
        self.loss_sum += torch.where(self.live, losses.detach().double(), 0.0)
        return losses[self.live].sum() if self.live.any() else losses.sum()


class Optimizers:
    """One optimizer per cell (so each cell's last.pt holds its own), stepped as one."""

    def __init__(self, opts):
        self.opts, self.param_groups = opts, [g for o in opts for g in o.param_groups]

    def step(self):
        for o in self.opts:
            o.step()

    def zero_grad(self, set_to_none=True):
        for o in self.opts:
            o.zero_grad(set_to_none=set_to_none)


@torch.no_grad()
def features(model, ds, cfg, device, dtype):
    """A TensorDataset of the split's (features (N, D), labels (N,)), on the CPU: one backbone forward per image."""
    f, ys = [], []
    for x, y in data.build_loader(ds, cfg['batch_size'], False, cfg['workers']):
        with train.autocast(device, dtype):
            f.append(model.features(x.to(device, non_blocking=True)).float().cpu())
        ys.append(y)
    return TensorDataset(torch.cat(f), torch.cat(ys))


def run(cfg, device, log=runs.say):
    """Train every cell of the grid; returns their result.json dicts."""
    if cfg['resume'] or cfg['accum'] != 1 or cfg['compile'] or cfg['decoded_cache'] or 'WORLD_SIZE' in os.environ:
        raise RunError("a --lr/--wd grid runs on one process without --resume, --accum, --compile or --decoded-cache; "
                       "run it without torchrun, or resume a cell on its own with --resume --out <grid out>/<cell>")
    lrs, wds = ([v] if not isinstance(v, list) else v for v in (cfg['lr'], cfg['wd']))
    t_run = time.time()
    cells = [dict(cfg, lr=lr, wd=wd, out=os.path.join(cfg['out'], cell_name(lr, wd))) for wd in wds for lr in lrs]
    cells = [runs.open_run_dir(c, set())[0] for c in cells]  # held and claimed: refused when in use or holding a run
    train_ds, eval_ds = train.datasets(cfg)  # the data first, as in a single run
    read = runs.data_record(train_ds, eval_ds)
    cells = [dict(c, num_classes=train_ds.num_classes, data_source=read) for c in cells]
    model = train.build(cells[0], device)  # every cell's separate run builds exactly this (same seed)
    tuned, total = sum(p.numel() for p in model.head.parameters()), sum(p.numel() for p in model.parameters())
    cached = not data.augments(cfg['data'])  # VTAB and digits train without augmentation
    heads = Heads(model, len(cells), cached).to(device)
    opts = [train.make_optimizer(cell, c) for cell, c in zip(heads.cells, cells)]
    opt, dtype = Optimizers(opts), train.amp_dtype(cfg['amp'], device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    runs.seed_everything(cfg['seed'])  # as a separate run after its build
    t0 = time.time()
    if cached:
        train_ds, eval_ds = features(model, train_ds, cfg, device, dtype), features(model, eval_ds, cfg, device, dtype)
    workers = 0 if cached else cfg['workers']
    train_loader = data.build_loader(train_ds, cfg['batch_size'], True, workers, seed=cfg['seed'])
    eval_loader = data.build_loader(eval_ds, cfg['batch_size'], False, workers)
    sched = train.schedule(dict(cfg, lr=max(lrs)), train_loader)  # its warning names the largest lr
    how = (f"features cached: {len(train_ds)} {cfg['train_split']} + {len(eval_ds)} {cfg['eval_split_name']} images, "
           f"one backbone forward each ({time.time() - t0:.1f}s)" if cached else
           "features recomputed per batch (random augmentation), one backbone forward per batch for all heads")
    log(f"linear grid on {cfg['data']} ({cfg['train_split']} -> {cfg['eval_split_name']}), backbone "
        f"{model.backbone.identity}: {len(cells)} heads (lr {','.join(f'{v:g}' for v in lrs)} x wd "
        f"{','.join(f'{v:g}' for v in wds)}), {tuned:,} tuned parameters each; {how}; out {cfg['out']}")
    records = [runs.run_record(c, model, 1, cfg['batch_size'], sched[0], dtype,
                               grid_features='cached' if cached else 'per batch') for c in cells]

    step, quiet = 0, dict(cfg, log_interval=0)
    for epoch in range(cfg['epochs']):
        t0 = time.time()
        heads.loss_sum.zero_()
        step, _, rate = train.train_epoch(heads, heads.loss, train_loader, opt, scaler, step, epoch,
                                          quiet, sched, device, dtype, log)
        final = epoch + 1 == cfg['epochs']
        acc = train.evaluate(heads, eval_loader, device, dtype) if final or (epoch + 1) % cfg['eval_every'] == 0 \
            else [None] * len(cells)
        live = heads.live.tolist()
        for k, c in enumerate(cells):
            if not live[k]:
                continue
            row = dict(epoch=epoch + 1, train_loss=heads.loss_sum[k].item() / sched[0], accuracy=acc[k],
                       eval_split=c['eval_split'], lr=opts[k].param_groups[0]['lr'], images_per_s=rate,
                       peak_mem_mb=runs.peak_memory_mb(device), time=time.time() - t0)
            runs.save_epoch(c['out'], row, 0, dict(
                model=methods.tuned_state_dict(heads.cells[k]), optimizer=opts[k].state_dict(),
                scaler=scaler.state_dict(), step=step, epoch=epoch + 1, args=records[k],
                identity=model.backbone.identity, method=cfg['method'], wall_time_s=time.time() - t_run))
        shown = ', '.join('-' if a is None or not ok else f"{a:.1f}" for a, ok in zip(acc, live))
        log(f"epoch {epoch + 1}/{cfg['epochs']}: {cfg['eval_split_name']} accuracy per head {shown}; "
            f"{time.time() - t0:.1f}s")
    results = []
    for k, c in enumerate(cells):
        if live[k]:
            result = dict(runs.result_record(records[k], acc[k], tuned, total, time.time() - t_run, device),
                          features=records[k]['grid_features'])
            runs.atomic_json(result, os.path.join(c['out'], 'result.json'))
            results.append(result)
            log(f"final {cfg['eval_split_name']} accuracy {acc[k]:.2f}% (linear lr {c['lr']:g} wd {c['wd']:g}); "
                f"wrote {c['out']}")
    failed = [c['out'] for c, ok in zip(cells, live) if not ok]
    if failed:
        raise RunError(f"non-finite loss in {', '.join(failed)}; stopped those cells (the other cells finished)")
    return results
