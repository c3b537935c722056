"""
Train a prompt-tuning method (or a baseline) on a frozen ViT: plain argparse, one training loop.

    python train.py --method vpt --pretrain in21k --data cub                  # VPT's recipe, nothing else
    torchrun --nproc_per_node=4 train.py --method sa2vp --data cub            # the same global batch of 64
    python train.py --method linear --data vtab-dtd --lr 12.5,2.5,0.5 --wd 0.01,0   # a grid in one pass

Every knob is a flag, and the defaults are the papers' recipes (each method class's `recipe` in methods.py):
per-step linear warmup then cosine, SGD or AdamW with absolute learning rates, bf16 autocast on CUDA (fp16 +
GradScaler on request, fp32 on CPU), gradient accumulation, torchrun DDP whose global batch does not depend on
the number of processes. Recipes from the official code: KMnP/vpt (VPT, linear, full), WangYZ1608/Self-Prompt-
Tuning (SPT), ryongithub/GatedPromptTuning (GaPT's run.sh, for LSPT, which publishes none), tommy-xq/SA2VP.

The bookkeeping around the loop lives elsewhere: the run directory, resume and records in runs.py (outputs
metrics.jsonl, last.pt, result.json in --out, default runs/<method>-<data>-<pretrain>-<arch>-<split>-seed<s>),
weights files and the hub in weights.py, --decoded-cache in decoded_cache.py, and the linear-probe grid (a comma
list of --lr / --wd) in linear_grid.py, which trains its heads with this file's train_epoch.
"""

import argparse
import itertools
import math
import os
import sys
import time
from contextlib import nullcontext
from types import MappingProxyType

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import methods
import models
import runs
import weights
from runs import RunError

# -----------------------------------------------------------------------------
# configuration: the flags, the methods' recipes, and the defaults of the rest

RECIPES = {m: cls.recipe for m, cls in methods.METHODS.items()}
MOMENTUM = 0.9  # SGD momentum in every SGD recipe
DEFAULTS = dict(arch='vit_base_patch16_224', pretrain='in21k', eval_split='val', img_size=224, momentum=MOMENTUM,
                seed=0, device='auto', amp='auto', accum=1, workers=4, log_interval=20, compile=False,
                grad_checkpointing=False, decoded_cache=False, resume=False, overwrite=False)
# every method's build_model options (its __init__ keywords): the flags of the 'method options' group
MODEL_OPTIONS = tuple(sorted({k for cls in methods.METHODS.values() for k in methods.init_options(cls)}))
# flags that change the result: spelled out in the default --out when given
NAMED_FLAGS = ('img_size', 'mean', 'std', 'epochs', 'batch_size', 'lr', 'wd', 'wd_head', 'optimizer', 'momentum',
               'warmup_epochs', 'min_lr') + MODEL_OPTIONS + ('max_steps_per_epoch',)
# (flag, test, what it must be): checked before anything is built
VALID = [('epochs', 1), ('batch_size', 1), ('img_size', 1), ('accum', 1), ('eval_every', 1),
         ('max_steps_per_epoch', 1), ('stop_after_epoch', 1), ('prompts', 1), ('spt_kmeans_tokens', 1),
         ('sa2vp_dim', 1), ('sa2vp_window', 1), ('wd', 0), ('wd_head', 0), ('warmup_epochs', 0), ('min_lr', 0),
         ('workers', 0), ('log_interval', 0), ('sa2vp_gamma', 0)]  # (flag, smallest value)


def default(key):
    """The help text's default of a recipe value: one value, or one per method."""
    show = lambda v: 'same as --wd' if v is None else v if isinstance(v, str) else format(v, 'g')  # noqa: E731
    values = {show(r[key]) for r in RECIPES.values()}
    return (f"recipe: {values.pop()} for every method" if len(values) == 1 else
            'recipe: ' + ', '.join(f"{m} {show(r[key])}" for m, r in RECIPES.items()))


def number_or_list(s):
    """A number, or a comma list of numbers: a grid, trained in one pass (--method linear only)."""
    try:
        values = [float(v) for v in s.split(',')]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or a comma list of numbers, got {s!r}") from None
    return values[0] if len(values) == 1 else values


def build_parser():
    """Every flag defaults to None ('not given'); parse_args fills in DEFAULTS and the recipe."""
    p = argparse.ArgumentParser(description="Train a visual prompt-tuning method on a frozen ViT with its paper's "
                                "recipe; every recipe value can be overridden.", allow_abbrev=False)
    g = p.add_argument_group('model and data')
    g.add_argument('--method', choices=list(methods.METHODS), help="(required)")
    g.add_argument('--arch', choices=list(models.ARCHS), help=f"(default: {DEFAULTS['arch']})")
    g.add_argument('--pretrain', choices=list(models.PRETRAIN), help=f"(default: {DEFAULTS['pretrain']})")
    g.add_argument('--weights', help="local weights file (any format of weights.py); default: the hub weights of "
                   "--pretrain from the Hugging Face cache")
    g.add_argument('--data', choices=data.DATASETS, metavar='NAME', help="cub, nabirds, flowers, dogs, cars, "
                   "vtab-<task>, digits (required)")
    g.add_argument('--data-root', help="(default: $VPT_DATA_ROOT or ./data)")
    g.add_argument('--eval-split', choices=['val', 'test'], help="val: train on train, report val; test: train on "
                   "FGVC train / VTAB train800val200, report test (default: val)")
    g.add_argument('--img-size', type=int, help="(default: 224)")
    g.add_argument('--mean', type=float, nargs=3, help="normalisation (default: the backbone's)")
    g.add_argument('--std', type=float, nargs=3, help="normalisation (default: the backbone's)")
    g = p.add_argument_group("recipe (default: the method's paper recipe)")
    g.add_argument('--epochs', type=int, help=default('epochs'))
    g.add_argument('--batch-size', type=int, help="global, whatever the number of processes; " + default('batch_size'))
    g.add_argument('--lr', type=number_or_list, help="peak learning rate, absolute (no batch scaling); "
                   + default('lr') + "; tune the baselines' on val. --method linear takes a comma list (with --wd: a "
                   "grid trained in one pass, one run directory per cell in --out)")
    g.add_argument('--wd', type=number_or_list, help="weight decay (SGD: all tuned tensors but the head bias; AdamW: "
                   "not on biases and 1-D tensors); " + default('wd') + "; a comma list for --method linear")
    g.add_argument('--wd-head', type=float, help="weight decay of the head weight; " + default('wd_head'))
    g.add_argument('--optimizer', choices=['sgd', 'adamw'], help=default('optimizer'))
    g.add_argument('--momentum', type=float, help=f"SGD momentum (default: {MOMENTUM})")
    g.add_argument('--warmup-epochs', type=float, help="linear warmup from 0, per step; " + default('warmup_epochs'))
    g.add_argument('--min-lr', type=float, help="end of the cosine; " + default('min_lr'))
    g = p.add_argument_group("method options (default: the method's own, see methods.py)")
    g.add_argument('--prompts', type=int, help="prompt tokens per set (vpt 50, spt 20 deep / 100 shallow, lspt 100)")
    g.add_argument('--depth', choices=['shallow', 'deep'], help="vpt, spt (default: deep)")
    g.add_argument('--prompt-dropout', type=float, help="vpt (0.1 deep, 0 shallow), lspt (0.1)")
    g.add_argument('--readout', choices=['cls', 'mean', 'mean-ln'], help="default: the backbone's (mae: mean; "
                   "else cls); mean-ln is VPT's fresh LayerNorm for MAE")
    g.add_argument('--spt-init', choices=['random', 'mean', 'max', 'kmeans'], help="spt (kmeans)")
    g.add_argument('--spt-kmeans-tokens', type=int, help="spt k-means subsample per layer (8192)")
    g.add_argument('--lspt-gspc', choices=['mean', 'kmeans', 'none'], help="lspt (mean)")
    g.add_argument('--lspt-lpc', choices=['lstm', 'gru', 'none'], help="lspt (lstm)")
    g.add_argument('--sa2vp-dim', type=int, help="sa2vp t (default: per dataset, methods.SA2VP_SETTINGS, else %d)"
                   % methods.SA2VP_DEFAULT[0])
    g.add_argument('--sa2vp-gamma', type=float, help="sa2vp gamma (default: per dataset, methods.SA2VP_SETTINGS, "
                   "else %g)" % methods.SA2VP_DEFAULT[1])
    g.add_argument('--sa2vp-lambda', type=float, help="sa2vp loss weight of the base logits (0.8)")
    g.add_argument('--sa2vp-window', type=int, help="sa2vp window c (3)")
    g.add_argument('--no-sa2vp-dropout', dest='sa2vp_dropout', action='store_const', const=False,
                   help="sa2vp: turn off the official dropout 0.1 in the frozen backbone and cross blocks")
    add_system_flags(p.add_argument_group('system'))
    return p


def add_system_flags(g):
    g.add_argument('--seed', type=int, help="(default: 0)")
    g.add_argument('--device', help="auto (cuda when available, else cpu), cpu, cuda or cuda:N; under torchrun each "
                   "process takes cuda:LOCAL_RANK (default: auto)")
    g.add_argument('--amp', choices=['auto', 'none', 'bf16', 'fp16'], help="auto: bf16 on CUDA, fp32 on CPU; fp16 "
                   "uses a GradScaler (default: auto)")
    g.add_argument('--compile', action='store_const', const=True, help="torch.compile the training step")
    g.add_argument('--grad-checkpointing', action='store_const', const=True, help="recompute the backbone blocks in "
                   "backward instead of storing their activations (less memory, one more forward of the blocks, the "
                   "same gradients); for ViT-L/H or large batches")
    g.add_argument('--accum', type=int, help="gradient accumulation: each process runs batch-size / (processes x "
                   "accum) images per micro-step, one optimizer step per accum micro-steps (default: 1)")
    g.add_argument('--workers', type=int, help="data loader workers per process (default: 4)")
    g.add_argument('--decoded-cache', action='store_const', const=True, help="FGVC / VTAB: decode and resize every "
                   "image once into memory (uint8); crops and flips drawn as torchvision does, flip and normalisation "
                   "on the device (for GPUs that outrun JPEG decoding)")
    g.add_argument('--eval-every', type=int, help="evaluate every N epochs and after the last (default: 1 with "
                   "--eval-split val; with test only after the last epoch, so the test set is evaluated once)")
    g.add_argument('--log-interval', type=int, help="steps between progress lines, 0 = none (default: 20)")
    g.add_argument('--out', help="run directory (default: runs/<method>-<data>-<pretrain>-<arch>-<eval split>-"
                   "seed<seed>, then -<flag><value> for each recipe, method or size flag given)")
    g.add_argument('--resume', action='store_const', const=True, help="continue --out/last.pt with its recorded "
                   "configuration")
    g.add_argument('--overwrite', action='store_const', const=True, help="start afresh in a directory holding a run")
    g.add_argument('--max-steps-per-epoch', type=int, help="testing aid: cap the optimizer steps per epoch (the "
                   "schedule uses the capped count)")
    g.add_argument('--stop-after-epoch', type=int, help="testing aid: stop as if killed after this epoch's "
                   "checkpoint; continue with --resume")


def parse_args(argv=None):
    """The command line -> (configuration dict, the set of flags given). Fills in DEFAULTS, the method's recipe and
    dataset defaults (SA²VP's t and gamma), the backbone's normalisation, the run directory and --eval-every; reads
    no file. A method option given to a method that does not take it is an error."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    explicit = {k for k, v in args.items() if v is not None}
    if args['resume'] and args['overwrite']:
        parser.error("--resume and --overwrite exclude each other")
    if not args['resume'] and (args['method'] is None or args['data'] is None):
        parser.error("--method and --data are required")
    if args['resume'] and args['out'] is None and (args['method'] is None or args['data'] is None):
        parser.error("--resume needs --out, or --method and --data to find the default run directory")
    cfg = {**args, **DEFAULTS, **{k: v for k, v in args.items() if v is not None}}
    if cfg['weights'] is not None:
        cfg['weights'] = os.path.abspath(cfg['weights'])
    if cfg['method'] is None:  # --resume --out DIR: everything comes from the checkpoint
        return cfg, explicit
    cls = methods.METHODS[cfg['method']]
    flag = {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings}  # in --help's order
    foreign = [k for k in flag if k in MODEL_OPTIONS and k in explicit and k not in methods.init_options(cls)]
    if foreign:
        raise RunError(f"{', '.join(flag[k] for k in foreign)}: not an option of --method {cfg['method']}; its "
                       f"options are {', '.join(flag[k] for k in methods.init_options(cls) if k in flag) or 'none'}")
    for k, v in {**cls.recipe, **cls.data_defaults(cfg['data'])}.items():
        cfg[k] = v if cfg[k] is None else cfg[k]
    grid = [k for k in ('lr', 'wd') if isinstance(cfg[k], list)]
    if grid and cfg['method'] != 'linear':
        parser.error(f"--{grid[0]}: a comma list (a grid trained in one pass) needs --method linear; sweep.py runs "
                     f"the grids of the other methods")
    mean, std = models.PRETRAIN[cfg['pretrain']][1]
    cfg['mean'], cfg['std'] = list(cfg['mean'] or mean), list(cfg['std'] or std)
    cfg['train_split'], cfg['eval_split_name'] = data.split_names(cfg['data'], cfg['eval_split'])
    if cfg['eval_every'] is None:  # a final run on test evaluates it once, after the last epoch
        cfg['eval_every'] = 1 if cfg['eval_split'] == 'val' else cfg['epochs']
    cfg['out'] = cfg['out'] or runs.run_name(cfg, explicit, NAMED_FLAGS)
    check_values(cfg)
    return cfg, explicit


def check_values(cfg):
    """A RunError naming the first flag whose value cannot work (a negative lr, an indivisible --img-size, ...)."""
    checks = [(k, lambda v, lo=lo: v >= lo, f"at least {lo}" if lo else '0 or more') for k, lo in VALID]
    checks += [('lr', lambda v: v > 0, 'positive'), ('momentum', lambda v: 0 <= v < 1, 'in [0, 1)'),
               ('prompt_dropout', lambda v: 0 <= v < 1, 'in [0, 1)'), ('sa2vp_lambda', lambda v: 0 <= v <= 1,
                                                                       'in [0, 1]')]
    for k, ok, what in checks:
        for v in cfg[k] if isinstance(cfg[k], list) else [cfg[k]]:  # --lr / --wd may be a grid's list
            if v is not None and not ok(v):
                raise RunError(f"--{k.replace('_', '-')} {v:g} must be {what}")
    lrs = cfg['lr'] if isinstance(cfg['lr'], list) else [cfg['lr']]
    if cfg['min_lr'] > min(lrs):
        raise RunError(f"--min-lr {cfg['min_lr']:g} is above --lr {min(lrs):g}: the cosine would rise")
    patch = models.ARCHS[cfg['arch']]['patch_size']
    if cfg['img_size'] % patch:
        raise RunError(f"--img-size {cfg['img_size']} is not a multiple of {cfg['arch']}'s patch size {patch}; "
                       f"pass e.g. --img-size {max(patch, cfg['img_size'] // patch * patch)}")


def datasets(cfg, train_transform=True):
    """(train dataset, eval dataset) of a configuration: read before the weights (split files take a moment, the
    weights may take minutes). A missing folder or split file, a bad label: a RunError."""
    kw = dict(root=cfg['data_root'], img_size=cfg['img_size'], mean=cfg['mean'], std=cfg['std'])
    try:
        return (data.build_dataset(cfg['data'], cfg['train_split'], train=train_transform, **kw),
                data.build_dataset(cfg['data'], cfg['eval_split_name'], **kw))
    except (FileNotFoundError, ValueError) as e:
        raise RunError(f"--data {cfg['data']}: {e}") from None


# -----------------------------------------------------------------------------
# model, optimizer, schedule, evaluation


def build(cfg, device, weights_file=None):
    """The backbone (weights_file, else cfg's --weights, else the hub) and the method's model on `device`; seeded, so
    a random (--pretrain none) backbone and a method's initial tensors are rebuilt identically by eval.py."""
    runs.seed_everything(cfg['seed'])
    try:
        backbone = weights.load_backbone(cfg['arch'], cfg['pretrain'], weights_file or cfg['weights'], cfg['img_size'])
    except weights.CheckpointError as e:
        raise RunError(str(e)) from None
    options = {k: cfg[k] for k in MODEL_OPTIONS if cfg.get(k) is not None}
    try:
        model = methods.build_model(cfg['method'], backbone, cfg['num_classes'], **options)
    except (TypeError, ValueError) as e:
        raise RunError(f"--method {cfg['method']}: {e}") from None
    return model.set_grad_checkpointing(cfg['grad_checkpointing']).to(device)


def make_optimizer(model, cfg):
    """SGD (VPT's optimizer.py: weight decay on every tuned tensor but the head bias) or AdamW (no decay on biases
    and 1-D tensors); the head weight takes --wd-head when it is set. Each group keeps its peak lr as 'peak_lr'."""
    groups = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if n == 'head.weight' and cfg['wd_head'] is not None:
            wd = cfg['wd_head']
        elif cfg['optimizer'] == 'sgd':
            wd = 0.0 if n == 'head.bias' else cfg['wd']
        else:
            wd = 0.0 if (p.ndim <= 1 or n.endswith('.bias')) else cfg['wd']
        groups.setdefault(wd, []).append(p)
    params = [{'params': ps, 'weight_decay': wd, 'peak_lr': cfg['lr']} for wd, ps in groups.items()]
    if cfg['optimizer'] == 'sgd':
        return torch.optim.SGD(params, lr=cfg['lr'], momentum=cfg['momentum'])
    return torch.optim.AdamW(params, lr=cfg['lr'])


def schedule(cfg, train_loader):
    """(optimizer steps per epoch, total steps, warmup steps); --max-steps-per-epoch caps the first."""
    steps = math.ceil(len(train_loader) / cfg['accum'])
    steps = min(steps, cfg['max_steps_per_epoch'] or steps)
    return steps, cfg['epochs'] * steps, round(cfg['warmup_epochs'] * steps)


def lr_at(step, total, warmup, lr, min_lr):
    """Linear warmup from 0 over `warmup` steps, then cosine from lr to min_lr at `total` steps."""
    if step < warmup:
        return lr * step / warmup
    if total <= warmup:
        return lr
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def amp_dtype(amp, device):
    """The autocast dtype, or None for fp32."""
    if amp == 'auto':
        return torch.bfloat16 if device.type == 'cuda' else None
    return {'none': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}[amp]


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


@torch.no_grad()
def evaluate(model, loader, device, dtype):
    """Top-1 accuracy in percent (a list, one per head, for linear_grid's heads); counts summed over DDP ranks."""
    model.eval()
    correct, total = torch.zeros((), dtype=torch.float64, device=device), 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, dtype):
            pred = model(x).argmax(-1)                               # (B,), or (B, heads)
        correct = correct + (pred == (y[:, None] if pred.ndim == 2 else y)).sum(0)
        total += y.numel()
    counts = torch.cat([correct.reshape(-1), correct.new_tensor([total])])
    if dist.is_initialized():
        dist.all_reduce(counts)
    acc = 100.0 * counts[:-1] / counts[-1].clamp_min(1)
    return acc.tolist() if correct.ndim else acc.item()


class LossModule(nn.Module):
    """forward(x, y) = model.loss(x, y), so that DDP (which hooks forward) sees the training loss."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, y):
        return self.model.loss(x, y)


# -----------------------------------------------------------------------------
# the loop


def train_epoch(model, step_fn, loader, opt, scaler, step, epoch, cfg, sched, device, dtype, log):
    """One epoch of optimizer steps, each over --accum micro-batches; returns (global step, mean loss, images/s).
    step_fn(x, y) is the training loss (DDP-wrapped under torchrun)."""
    steps, total_steps, warmup_steps = sched
    world = dist.get_world_size() if dist.is_initialized() else 1
    model.train()
    loader.sampler.set_epoch(epoch)  # the order is a function of (seed, epoch) only
    batches = iter(loader)
    loss_sum, images, t0 = 0.0, 0, time.time()
    for s in range(steps):
        for group in opt.param_groups:
            group['lr'] = lr_at(step, total_steps, warmup_steps, group['peak_lr'], cfg['min_lr'])
        micro_batches = list(itertools.islice(batches, cfg['accum']))
        step_loss = torch.zeros((), device=device)
        for j, (x, y) in enumerate(micro_batches):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            sync = not isinstance(step_fn, DDP) or j == len(micro_batches) - 1  # all-reduce grads once per step
            with nullcontext() if sync else step_fn.no_sync():
                with autocast(device, dtype):
                    loss = step_fn(x, y)
                scaler.scale(loss / len(micro_batches)).backward()
            step_loss += loss.detach().float() / len(micro_batches)
            images += x.shape[0] * world
        if world > 1:
            dist.all_reduce(step_loss)
            step_loss /= world
        step_loss = step_loss.item()
        if not math.isfinite(step_loss):
            raise RunError(f"non-finite loss {step_loss} at epoch {epoch + 1}, step {s + 1} of {steps} (global step "
                           f"{step}); stopping")
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        step, loss_sum = step + 1, loss_sum + step_loss
        if cfg['log_interval'] and (s == 0 or step % cfg['log_interval'] == 0 or s == steps - 1):
            per_step = (time.time() - t0) / (s + 1)
            log(f"epoch {epoch + 1}/{cfg['epochs']} step {s + 1}/{steps} | loss {step_loss:.4f} | lr "
                f"{opt.param_groups[0]['lr']:.3e} | {per_step:.3f} s/step, {images / (time.time() - t0):.0f} img/s | "
                f"peak {runs.peak_memory_mb(device):.0f} MB | eta {runs.duration(per_step * (total_steps - step))}",
                flush=True)
    return step, loss_sum / steps, images / (time.time() - t0)


def run(cfg, explicit, rank, world, device):
    """One training run: the run directory, data, model, optimizer, then the epochs; returns result.json's dict
    (None when stopped by --stop-after-epoch)."""
    t_run = time.time()
    log = print if rank == 0 else (lambda *a, **k: None)
    cfg, ckpt = runs.open_run_dir(cfg, explicit, rank)  # a fresh start, an overwrite or a resume
    out = cfg['out']
    if ckpt is not None and ckpt['epoch'] >= cfg['epochs'] and os.path.exists(os.path.join(out, 'result.json')):
        log(f"{out} finished all {cfg['epochs']} epochs already; its result.json stands")
        return runs.read_json(os.path.join(out, 'result.json'))
    if cfg['batch_size'] % (world * cfg['accum']):
        raise RunError(f"--batch-size {cfg['batch_size']} must be divisible by processes x --accum = {world} x "
                       f"{cfg['accum']}")
    micro = cfg['batch_size'] // (world * cfg['accum'])  # per-process micro-batch
    train_ds, eval_ds = datasets(cfg)  # the data before the weights
    if cfg.get('num_classes', train_ds.num_classes) != train_ds.num_classes:
        raise RunError(f"cannot resume: {cfg['train_split']} of {cfg['data']} now holds {train_ds.num_classes} "
                       f"classes, the checkpoint's head has {cfg['num_classes']} ({out})")
    cfg = MappingProxyType(dict(cfg, num_classes=train_ds.num_classes))  # resolved: read-only from here on

    model = build(cfg, device)  # every rank seeded alike, so parameters start equal (DDP broadcasts them anyway)
    if ckpt is not None and ckpt['identity'] != model.backbone.identity:
        raise RunError(f"cannot resume: the backbone is {model.backbone.identity}, but the checkpoint was trained on "
                       f"{ckpt['identity']} ({out})")
    if cfg['decoded_cache']:
        try:
            import decoded_cache
            train_loader, eval_loader = decoded_cache.loaders(train_ds, eval_ds, cfg, micro, device, world > 1, log)
        except (ValueError, data.ImageError) as e:
            raise RunError(f"--decoded-cache: {e}") from None
    else:
        train_loader = data.build_loader(train_ds, micro, True, cfg['workers'], world > 1, cfg['seed'])
        eval_loader = data.build_loader(eval_ds, micro, False, cfg['workers'], world > 1)
    sched = schedule(cfg, train_loader)
    opt, dtype = make_optimizer(model, cfg), amp_dtype(cfg['amp'], device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    if sched[2] >= sched[1] and rank == 0:
        print(f"warning: --warmup-epochs {cfg['warmup_epochs']:g} is not shorter than --epochs {cfg['epochs']}: the "
              f"lr rises linearly for the whole run to {lr_at(sched[1] - 1, *sched[1:], cfg['lr'], 0):.3g} and never "
              f"reaches the peak {cfg['lr']:g} or the cosine; pass --warmup-epochs below {cfg['epochs']}",
              file=sys.stderr, flush=True)
    start_epoch, step, wall_before = 0, 0, 0.0
    if ckpt is not None:
        runs.load_tuned(model, ckpt['model'], out)
        opt.load_state_dict(ckpt['optimizer'])
        scaler.load_state_dict(ckpt['scaler'])
        start_epoch, step, wall_before = ckpt['epoch'], ckpt['step'], ckpt['wall_time_s']
        runs.restore_rng(ckpt['rng'], rank, world, log)  # dropout, augmentation, loader seeds: as if never stopped
        log(f"resuming {out} after epoch {start_epoch} (step {step})")
    else:
        if hasattr(model, 'init_prompts'):  # SPT: prompts from the training images (eval transform, every rank alike)
            t0 = time.time()
            init_loader = data.build_loader(datasets(cfg, train_transform=False)[0], micro, False, cfg['workers'])
            model.init_prompts(init_loader, generator=torch.Generator().manual_seed(cfg['seed']))
            log(f"{cfg['method']} prompt init on {len(train_ds)} {cfg['train_split']} images: {time.time() - t0:.1f}s")
        runs.seed_everything(cfg['seed'] + rank)
    record = dict(cfg, backbone_identity=model.backbone.identity, world_size=world, micro_batch=micro,
                  steps_per_epoch=sched[0], amp_dtype=str(dtype or torch.float32).replace('torch.', ''),
                  model_options=methods.built_options(model))
    if rank == 0:
        runs.trim_metrics(out, start_epoch)
    tuned = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log(f"{cfg['method']} on {cfg['data']} ({cfg['train_split']} -> {cfg['eval_split_name']}), backbone "
        f"{model.backbone.identity}: {tuned:,} tuned of {total:,} parameters; {cfg['optimizer']} lr {cfg['lr']:g} wd "
        f"{cfg['wd']:g}, batch {cfg['batch_size']} = {world} x {cfg['accum']} x {micro}, {cfg['epochs']} epochs x "
        f"{sched[0]} steps, {record['amp_dtype']} on {device}; out {out}")

    step_fn = LossModule(model)
    if world > 1:  # forward_sync_buffers off: buffers (SA²VP's mask) are constants
        step_fn = DDP(step_fn, device_ids=[device.index] if device.type == 'cuda' else None, forward_sync_buffers=False)
    if cfg['compile']:
        step_fn = torch.compile(step_fn)
    acc = None
    for epoch in range(start_epoch, cfg['epochs']):
        t0 = time.time()
        step, loss, rate = train_epoch(model, step_fn, train_loader, opt, scaler, step, epoch, cfg, sched, device,
                                       dtype, log)
        final = epoch + 1 == cfg['epochs']
        acc = evaluate(model, eval_loader, device, dtype) if final or (epoch + 1) % cfg['eval_every'] == 0 else None
        row = dict(epoch=epoch + 1, train_loss=loss, accuracy=acc, eval_split=cfg['eval_split'],
                   lr=opt.param_groups[0]['lr'], images_per_s=rate, peak_mem_mb=runs.peak_memory_mb(device),
                   time=time.time() - t0)
        log(f"epoch {epoch + 1}: train loss {loss:.4f}, {cfg['eval_split_name']} accuracy "
            f"{'-' if acc is None else format(acc, '.2f')}%, {row['time']:.1f}s", flush=True)
        rng = runs.rng_states()  # a collective under DDP
        if rank == 0:
            runs.save_epoch(out, row, dict(model=methods.tuned_state_dict(model), optimizer=opt.state_dict(),
                                           scaler=scaler.state_dict(), step=step, epoch=epoch + 1, rng=rng,
                                           args=record, identity=model.backbone.identity, method=cfg['method'],
                                           wall_time_s=wall_before + time.time() - t_run))
        if cfg['stop_after_epoch'] == epoch + 1 and not final:
            log(f"stopping after epoch {epoch + 1} (--stop-after-epoch); continue with --resume")
            return None
    if acc is None:  # resumed after the last epoch's checkpoint, but result.json was never written
        acc = evaluate(model, eval_loader, device, dtype)
    result = runs.result_record(record, acc, tuned, total, wall_before + time.time() - t_run, device)
    if rank == 0:
        runs.atomic_json(result, os.path.join(out, 'result.json'))
    log(f"final {cfg['eval_split_name']} accuracy {acc:.2f}% ({cfg['method']}, {cfg['data']}); wrote {out}")
    return result


def setup_distributed(name):
    """(rank, world size, device) for --device `name`; torchrun sets RANK / WORLD_SIZE / LOCAL_RANK: nccl on GPU
    (each process on cuda:LOCAL_RANK), gloo on CPU."""
    device = runs.resolve_device(name)
    if 'RANK' not in os.environ or 'WORLD_SIZE' not in os.environ:
        return 0, 1, device
    if device.type == 'cuda':
        if device.index is not None:
            raise RunError(f"--device {name} under torchrun: each process takes cuda:LOCAL_RANK; pass --device cuda")
        torch.cuda.set_device(int(os.environ.get('LOCAL_RANK', 0)))
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
    dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return dist.get_rank(), dist.get_world_size(), device


def main(argv=None):
    """Train; returns result.json's dict (a list of them for a linear grid; None when stopped by
    --stop-after-epoch)."""
    cfg, explicit = parse_args(argv)
    try:
        if isinstance(cfg['lr'], list) or isinstance(cfg['wd'], list):
            import linear_grid
            return linear_grid.run(cfg, runs.resolve_device(cfg['device']))
        rank, world, device = setup_distributed(cfg['device'])
        return run(cfg, explicit, rank, world, device)
    except KeyboardInterrupt:
        raise runs.Interrupted(runs.interrupted(cfg['out'])) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == '__main__':
    runs.cli(main)
