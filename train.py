"""
Train a prompt-tuning method (or a baseline) on a frozen ViT: one readable loop, plain argparse.

    python train.py --method vpt --pretrain in21k --data cub                  # VPT's recipe, nothing else
    torchrun --nproc_per_node=4 train.py --method sa2vp --data cub            # same global batch of 64
    python train.py --method linear --data vtab-dtd --lr 12.5,2.5,0.5 --wd 0.01,0   # a grid in one pass (run_grid)

Every knob is a flag; the per-method defaults are the papers' recipes (the `recipe` of each method class in
methods.py) and `--help` shows them. The loop: per-step linear warmup then cosine, SGD or AdamW with absolute
learning rates, bf16 autocast on CUDA (fp16 + GradScaler on request, fp32 on CPU), gradient accumulation,
torchrun DDP whose global batch does not depend on the number of processes, atomic checkpoints of the
tuned tensors only, an exact resume, one JSON line per epoch.

Recipes from the official code: KMnP/vpt (VPT, linear, full: src/solver, configs), WangYZ1608/
Self-Prompt-Tuning (SPT), ryongithub/GatedPromptTuning (GaPT: LSPT publishes no recipe, so it takes GaPT's
run.sh), tommy-xq/SA2VP. Style: karpathy/nanoGPT's train.py.

Outputs in --out (default runs/<method>-<data>-<pretrain>-<arch>-<eval split>-seed<seed>[-<flag><value>...],
one -<flag><value> for every recipe, method or size flag given, e.g. runs/vpt-cub-in21k-base_patch16-test-seed0-lr0.1):
    metrics.jsonl  one JSON object per epoch (epoch, train_loss, accuracy, eval_split, lr, images_per_s, peak_mem_mb,
                   time)
    result.json    method, data, eval_split, accuracy (final epoch, %), tuned_params, total_params, epochs, arch,
                   pretrain, seed, wall_time_s, device, torch/timm/python versions, git_commit, config
    last.pt        tuned tensors only, optimizer, scaler, step, epoch, RNG states, args, backbone identity

Every anticipated failure (a missing dataset or weights file, a bad flag value, an unreadable image, Ctrl-C) ends
with one line `error: ...` naming the path or flag and what to do, and exit status 1 (130 for Ctrl-C).

Testing aids: --max-steps-per-epoch N, --stop-after-epoch E (behaves like a kill after epoch E), and the
environment variable VPT_FORCE_NAN_STEP=k, which multiplies the loss of global step k (0-based) by NaN.
"""

import argparse
import copy
import json
import math
import os
import platform
import random
import re
import subprocess
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import methods
import models

# -----------------------------------------------------------------------------
# what train.py knows about the methods comes from methods.py
# Every method warms up linearly from 0 per step, then follows a cosine: SPT's and SA²VP's code do this
# per iteration, VPT's and GaPT's LambdaLR steps once per epoch (their epoch 0 trains at lr 0).

# the papers' recipes, from each method class; lr is absolute at the given batch size, wd_head None = same as wd
RECIPES = {m: cls.recipe for m, cls in methods.METHODS.items()}
MOMENTUM = 0.9  # SGD momentum in every SGD recipe
# every method's build_model options (its __init__ keywords): the flags of the 'method options' group, _ for -
MODEL_OPTIONS = tuple(sorted({k for cls in methods.METHODS.values() for k in methods.init_options(cls)}))
# what --resume may change; every other explicitly given flag must equal the checkpoint's value
RESUME_OVERRIDES = {'resume', 'overwrite', 'out', 'workers', 'data_root', 'weights', 'log_interval',
                    'stop_after_epoch', 'compile', 'device', 'grad_checkpointing', 'decoded_cache'}
# flags that change the result and are spelled out in the default --out when given, in this order
NAMED_FLAGS = ('img_size', 'mean', 'std', 'epochs', 'batch_size', 'lr', 'wd', 'wd_head', 'optimizer', 'momentum',
               'warmup_epochs', 'min_lr') + MODEL_OPTIONS + ('max_steps_per_epoch',)


class RunError(RuntimeError):
    """A run that cannot start or must stop; the CLI prints the message and exits with status 1."""


class Interrupted(RunError):
    """Ctrl-C: the CLI prints the message and exits with status 130, as a shell does for SIGINT."""


def number_or_list(s):
    """A number, or a comma list of numbers: a grid, trained in one pass (--method linear only)."""
    try:
        values = [float(v) for v in s.split(',')]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or a comma list of numbers, got {s!r}") from None
    return values[0] if len(values) == 1 else values


def cell_name(lr, wd):
    """The run directory of one (lr, wd) cell of a grid, inside --out (sweep.py names its cells the same way)."""
    return f"lr{lr:g}_wd{wd:g}"


def recipe(key):
    show = lambda v: 'same as --wd' if v is None else v if isinstance(v, str) else format(v, 'g')  # noqa: E731
    values = {show(r[key]) for r in RECIPES.values()}
    if len(values) == 1:
        return f"recipe: {values.pop()} for every method"
    return 'recipe: ' + ', '.join(f"{m} {show(r[key])}" for m, r in RECIPES.items())


def build_parser():
    p = argparse.ArgumentParser(description="Train a visual prompt-tuning method on a frozen ViT with its paper's "
                                "recipe; every recipe value can be overridden.", allow_abbrev=False)
    g = p.add_argument_group('model and data')
    g.add_argument('--method', choices=list(methods.METHODS), help="(required)")
    g.add_argument('--arch', default='vit_base_patch16_224', choices=list(models.ARCHS), help="(default: %(default)s)")
    g.add_argument('--pretrain', default='in21k', choices=list(models.PRETRAIN), help="(default: %(default)s)")
    g.add_argument('--weights', default=None, help="local weights file (any format of models.py); default: the "
                   "hub weights of --pretrain from the Hugging Face cache")
    g.add_argument('--data', choices=data.DATASETS, metavar='NAME', help="cub, nabirds, flowers, dogs, cars, "
                   "vtab-<task>, digits (required)")
    g.add_argument('--data-root', default=None, help="(default: $VPT_DATA_ROOT or ./data)")
    g.add_argument('--eval-split', default='val', choices=['val', 'test'], help="val: train on train, report val; "
                   "test: train on FGVC train / VTAB train800val200, report test (default: %(default)s)")
    g.add_argument('--img-size', type=int, default=224, help="(default: %(default)s)")
    g.add_argument('--mean', type=float, nargs=3, default=None, help="normalisation (default: the backbone's)")
    g.add_argument('--std', type=float, nargs=3, default=None, help="normalisation (default: the backbone's)")
    g = p.add_argument_group('recipe (default: the method\'s paper recipe)')
    g.add_argument('--epochs', type=int, default=None, help=recipe('epochs'))
    g.add_argument('--batch-size', type=int, default=None, help="global batch, whatever the number of processes; "
                   + recipe('batch_size'))
    g.add_argument('--lr', type=number_or_list, default=None, help="peak learning rate, absolute (no batch "
                   "scaling); " + recipe('lr') + "; the baselines' lr should be tuned on val. --method linear takes a "
                   "comma list (with --wd: a grid trained in one pass, one run directory per cell in --out)")
    g.add_argument('--wd', type=number_or_list, default=None, help="weight decay (SGD: all tuned tensors but the "
                   "head bias; AdamW: not on biases and 1-D tensors); " + recipe('wd') + "; a comma list for "
                   "--method linear")
    g.add_argument('--wd-head', type=float, default=None, help="weight decay of the head weight; " + recipe('wd_head'))
    g.add_argument('--optimizer', choices=['sgd', 'adamw'], default=None, help=recipe('optimizer'))
    g.add_argument('--momentum', type=float, default=MOMENTUM, help="SGD momentum (default: %(default)s)")
    g.add_argument('--warmup-epochs', type=float, default=None, help="linear warmup from 0, per step; "
                   + recipe('warmup_epochs'))
    g.add_argument('--min-lr', type=float, default=None, help="end of the cosine; " + recipe('min_lr'))
    g = p.add_argument_group('method options (default: the method\'s own, see methods.py)')
    g.add_argument('--prompts', type=int, default=None, help="prompt tokens per set (vpt 50, spt 20 deep / 100 "
                   "shallow, lspt 100)")
    g.add_argument('--depth', choices=['shallow', 'deep'], default=None, help="vpt, spt (default: deep)")
    g.add_argument('--prompt-dropout', type=float, default=None, help="vpt (0.1 deep, 0 shallow), lspt (0.1)")
    g.add_argument('--readout', choices=['cls', 'mean', 'mean-ln'], default=None, help="default: the backbone's "
                   "(mae: mean; else cls); mean-ln is VPT's fresh LayerNorm for MAE")
    g.add_argument('--spt-init', choices=['random', 'mean', 'max', 'kmeans'], default=None, help="spt (kmeans)")
    g.add_argument('--spt-kmeans-tokens', type=int, default=None, help="spt k-means subsample per layer (8192)")
    g.add_argument('--lspt-gspc', choices=['mean', 'kmeans', 'none'], default=None, help="lspt (mean)")
    g.add_argument('--lspt-lpc', choices=['lstm', 'gru', 'none'], default=None, help="lspt (lstm)")
    g.add_argument('--sa2vp-dim', type=int, default=None, help="sa2vp t (default: per dataset, "
                   "methods.SA2VP_SETTINGS, else %d)" % methods.SA2VP_DEFAULT[0])
    g.add_argument('--sa2vp-gamma', type=float, default=None, help="sa2vp gamma (default: per dataset, "
                   "methods.SA2VP_SETTINGS, else %g)" % methods.SA2VP_DEFAULT[1])
    g.add_argument('--sa2vp-lambda', type=float, default=None, help="sa2vp loss weight of the base logits (0.8)")
    g.add_argument('--sa2vp-window', type=int, default=None, help="sa2vp window c (3)")
    g.add_argument('--no-sa2vp-dropout', dest='sa2vp_dropout', action='store_false', default=None,
                   help="sa2vp: turn off the official dropout 0.1 in the frozen backbone and cross blocks")
    g = p.add_argument_group('system')
    g.add_argument('--seed', type=int, default=0, help="(default: %(default)s)")
    g.add_argument('--device', default='auto', help="auto (cuda when available, else cpu), cpu, cuda or cuda:N; "
                   "under torchrun each process takes cuda:LOCAL_RANK (default: %(default)s)")
    g.add_argument('--amp', choices=['auto', 'none', 'bf16', 'fp16'], default='auto', help="auto: bf16 on CUDA, "
                   "fp32 on CPU; fp16 uses a GradScaler (default: %(default)s)")
    g.add_argument('--compile', action='store_true', help="torch.compile the training step")
    g.add_argument('--grad-checkpointing', action='store_true', help="recompute the backbone blocks in backward "
                   "instead of storing their activations (less memory, one more forward of the blocks; the same "
                   "gradients); for ViT-L/H or large batches")
    g.add_argument('--accum', type=int, default=1, help="gradient accumulation: each process runs batch-size / "
                   "(processes x accum) images per micro-step, one optimizer step per accum micro-steps "
                   "(default: %(default)s)")
    g.add_argument('--workers', type=int, default=4, help="data loader workers per process (default: %(default)s)")
    g.add_argument('--decoded-cache', action='store_true', help="FGVC / VTAB: decode and resize every image once "
                   "(with --workers processes) and keep it in memory as uint8; crop offsets and flips are drawn as "
                   "torchvision does, flip and normalisation run on the device (for GPUs that outrun JPEG decoding)")
    g.add_argument('--eval-every', type=int, default=None, help="evaluate every N epochs; the last epoch always "
                   "(default: 1 with --eval-split val; with --eval-split test only the last epoch, so the test set "
                   "is evaluated once)")
    g.add_argument('--log-interval', type=int, default=20, help="steps between progress lines (default: %(default)s)")
    g.add_argument('--out', default=None, help="run directory (default: runs/<method>-<data>-<pretrain>-<arch>-"
                   "<eval split>-seed<seed>, then -<flag><value> for each recipe, method or size flag given)")
    g.add_argument('--resume', action='store_true', help="continue from --out/last.pt with its recorded configuration")
    g.add_argument('--overwrite', action='store_true', help="start afresh in a directory that holds a run")
    g = p.add_argument_group('testing aids')
    g.add_argument('--max-steps-per-epoch', type=int, default=None, help="cap the optimizer steps per epoch "
                   "(the schedule uses the capped count)")
    g.add_argument('--stop-after-epoch', type=int, default=None, help="stop (as if killed) after this epoch's "
                   "checkpoint; continue with --resume")
    return p


def default_out(cfg, explicit):
    """runs/<method>-<data>-<pretrain>-<arch>-<eval split>-seed<seed>, then one -<flag><value> per explicitly given
    flag of NAMED_FLAGS (numbers as lr0.1, words as depth_shallow, --no-sa2vp-dropout as no_sa2vp_dropout), so
    that runs that differ in anything that changes their result never share a directory."""
    arch = cfg['arch'].removeprefix('vit_').removesuffix('_224')
    parts = [cfg['method'], cfg['data'], cfg['pretrain'], arch, cfg['eval_split'], f"seed{cfg['seed']}"]
    for k in NAMED_FLAGS:
        v = cfg[k]
        if k not in explicit or v is None:
            continue
        if isinstance(v, bool):
            parts.append(k if v else f'no_{k}')
        elif isinstance(v, str):
            parts.append(f'{k}_{v}')
        else:
            parts.append(k + ','.join(format(x, 'g') for x in (v if isinstance(v, list) else [v])))
    return os.path.join('runs', '-'.join(parts))


# (flag, test, what it must be): checked before anything is built
VALID = [
    ('epochs', lambda v: v >= 1, 'at least 1'), ('batch_size', lambda v: v >= 1, 'at least 1'),
    ('lr', lambda v: v > 0, 'positive'), ('wd', lambda v: v >= 0, '0 or more'), ('wd_head', lambda v: v >= 0, '0 or more'),
    ('momentum', lambda v: 0 <= v < 1, 'in [0, 1)'), ('warmup_epochs', lambda v: v >= 0, '0 or more'),
    ('min_lr', lambda v: v >= 0, '0 or more'), ('img_size', lambda v: v >= 1, 'at least 1'),
    ('accum', lambda v: v >= 1, 'at least 1'), ('workers', lambda v: v >= 0, '0 or more'),
    ('eval_every', lambda v: v >= 1, 'at least 1'), ('log_interval', lambda v: v >= 0, '0 (off) or more'),
    ('max_steps_per_epoch', lambda v: v >= 1, 'at least 1'), ('stop_after_epoch', lambda v: v >= 1, 'at least 1'),
    ('prompts', lambda v: v >= 1, 'at least 1'), ('prompt_dropout', lambda v: 0 <= v < 1, 'in [0, 1)'),
    ('spt_kmeans_tokens', lambda v: v >= 1, 'at least 1'), ('sa2vp_dim', lambda v: v >= 1, 'at least 1'),
    ('sa2vp_gamma', lambda v: v >= 0, '0 or more'), ('sa2vp_lambda', lambda v: 0 <= v <= 1, 'in [0, 1]'),
    ('sa2vp_window', lambda v: v >= 1, 'at least 1'),
]


def check_values(cfg):
    """A RunError naming the first flag whose value cannot work (a negative lr, a patch size that does not
    divide --img-size, ...)."""
    for k, ok, what in VALID:
        for v in cfg[k] if isinstance(cfg.get(k), list) else [cfg.get(k)]:  # --lr / --wd may be a grid's list
            if v is not None and not ok(v):
                raise RunError(f"--{k.replace('_', '-')} {v:g} must be {what}")
    lrs = cfg['lr'] if isinstance(cfg['lr'], list) else [cfg['lr']]
    if cfg['min_lr'] is not None and None not in lrs and cfg['min_lr'] > min(lrs):
        raise RunError(f"--min-lr {cfg['min_lr']:g} is above --lr {min(lrs):g}: the cosine would rise")
    patch = models.ARCHS[cfg['arch']]['patch_size']
    if cfg['img_size'] % patch:
        raise RunError(f"--img-size {cfg['img_size']} is not a multiple of {cfg['arch']}'s patch size {patch}; "
                       f"pass e.g. --img-size {max(patch, cfg['img_size'] // patch * patch)}")


def parse_args(argv=None):
    """The command line -> (resolved configuration dict, set of explicitly given keys).
    Recipe values left at None are filled in from RECIPES[method], dataset-dependent options (SA²VP's t and
    gamma) from the method's data_defaults. A method option given for a method that does not take it is an error."""
    parser = build_parser()
    unset = object()
    ns = argparse.Namespace(**{a.dest: unset for a in parser._actions if a.dest != 'help'})
    parser.parse_args(argv, namespace=ns)  # argparse only fills in defaults for missing attributes
    explicit = {k for k, v in vars(ns).items() if v is not unset}
    args = parser.parse_args(argv)
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite exclude each other")
    if not args.resume and (args.method is None or args.data is None):
        parser.error("--method and --data are required")
    if args.resume and args.out is None and (args.method is None or args.data is None):
        parser.error("--resume needs --out, or --method and --data to find the default run directory")
    cfg = vars(args)
    if args.method is not None:
        cls = methods.METHODS[args.method]
        takes = methods.init_options(cls)
        flag = {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings}  # in --help's order
        foreign = [k for k in flag if k in MODEL_OPTIONS and k in explicit and k not in takes]
        if foreign:
            raise RunError(f"{', '.join(flag[k] for k in foreign)}: not an option of --method {args.method}; its "
                           f"options are {', '.join(flag.get(k, k) for k in takes) or 'none'}")
        for k, v in {**cls.recipe, **cls.data_defaults(args.data)}.items():
            if cfg[k] is None:
                cfg[k] = v
        grid = [k for k in ('lr', 'wd') if isinstance(cfg[k], list)]
        if grid and args.method != 'linear':
            parser.error(f"--{grid[0]}: a comma list (a grid trained in one pass) needs --method linear; "
                         f"sweep.py runs the grids of the other methods")
        if cfg['eval_every'] is None:  # a final run on test evaluates it once, after the last epoch
            cfg['eval_every'] = 1 if cfg['eval_split'] == 'val' else cfg['epochs']
        cfg['out'] = cfg['out'] or default_out(cfg, explicit)
        check_values(cfg)
    if cfg['weights'] is not None:
        cfg['weights'] = os.path.abspath(cfg['weights'])
    return cfg, explicit


# -----------------------------------------------------------------------------
# building blocks shared with eval.py


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def build(cfg, device, weights=None):
    """The backbone and the method's model from a resolved configuration; fills in cfg['mean'] / cfg['std']
    with the backbone's when unset. Seeded, so a random (--pretrain none) backbone is rebuilt identically by
    eval.py. `weights` overrides cfg['weights']. Returns (model on device, num_classes)."""
    seed_everything(cfg['seed'])
    try:
        backbone = models.create_backbone(cfg['arch'], cfg['pretrain'], weights or cfg['weights'], cfg['img_size'])
    except models.CheckpointError as e:
        raise RunError(str(e).replace("pretrain='none'", "--pretrain none")) from None
    cfg['mean'] = list(cfg['mean'] or backbone.mean)
    cfg['std'] = list(cfg['std'] or backbone.std)
    train_split, _ = data.split_names(cfg['data'], cfg['eval_split'])
    num_classes = cfg.get('num_classes')  # recorded by a run (resume, eval.py)
    if num_classes is None:  # FGVC: the head follows train.json (fewer classes with VPT_ALLOW_PARTIAL=1)
        num_classes = (data.build_dataset(cfg['data'], train_split, cfg['data_root']).num_classes
                       if cfg['data'] in data.FGVC else data.num_classes(cfg['data']))
    options = {k: cfg[k] for k in MODEL_OPTIONS if cfg.get(k) is not None}
    try:
        model = methods.build_model(cfg['method'], backbone, num_classes, **options)
    except (TypeError, ValueError) as e:
        raise RunError(f"--method {cfg['method']}: {e}") from None
    return model.to(device), num_classes


def tuned_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def load_tuned(model, state, source):
    """Load a tuned-tensor state dict; its keys must be exactly the model's tuned parameter names."""
    names = tuned_names(model)
    missing, unexpected = sorted(names - set(state)), sorted(set(state) - names)
    if missing or unexpected:
        raise RunError(f"{source}: tuned tensors do not match the model: missing {missing[:8]}, "
                       f"unexpected {unexpected[:8]}")
    model.load_state_dict(state, strict=False)  # strict on the tuned names (checked above); shapes checked by torch


def amp_dtype(amp, device):
    """The autocast dtype, or None for fp32."""
    if amp == 'auto':
        return torch.bfloat16 if device.type == 'cuda' else None
    return {'none': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}[amp]


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


@torch.no_grad()
def evaluate(model, loader, device, dtype):
    """Top-1 accuracy in percent; counts are summed over DDP ranks (each rank holds an unpadded shard)."""
    model.eval()
    counts = torch.zeros(2, dtype=torch.float64, device=device)  # correct, total
    for x, y in loader:
        x, y = data.to_device(x, device, loader.dataset), y.to(device, non_blocking=True)
        with autocast(device, dtype):
            logits = model(x)                                   # (B, C)
        counts[0] += (logits.argmax(-1) == y).sum()
        counts[1] += y.numel()
    if dist.is_initialized():
        dist.all_reduce(counts)
    return 100.0 * counts[0].item() / max(counts[1].item(), 1)


def peak_memory_mb(device):
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    except ImportError:  # Windows
        return float('nan')


# -----------------------------------------------------------------------------
# optimizer, schedule, checkpoints


def make_optimizer(model, cfg):
    """SGD (VPT's optimizer.py: weight decay on every tuned tensor but the head bias) or AdamW (no decay on
    biases and 1-D tensors); the head weight takes --wd-head when it is set."""
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
    params = [{'params': ps, 'weight_decay': wd} for wd, ps in groups.items()]
    if cfg['optimizer'] == 'sgd':
        return torch.optim.SGD(params, lr=cfg['lr'], momentum=cfg['momentum'])
    return torch.optim.AdamW(params, lr=cfg['lr'])


def lr_at(step, total, warmup, lr, min_lr):
    """Linear warmup from 0 over `warmup` steps, then cosine from lr to min_lr at `total` steps."""
    if step < warmup:
        return lr * step / warmup
    if total <= warmup:
        return lr
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def rng_state():
    st = np.random.get_state()
    s = {'python': random.getstate(), 'torch': torch.get_rng_state(),
         'numpy': [st[0], torch.from_numpy(st[1].astype(np.int64)), st[2], st[3], st[4]]}
    if torch.cuda.is_available():
        s['cuda'] = torch.cuda.get_rng_state()
    return s


def set_rng_state(s):
    random.setstate(s['python'])
    torch.set_rng_state(s['torch'])
    name, keys, pos, has_gauss, cached = s['numpy']
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if 'cuda' in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s['cuda'])


def atomic_save(obj, path):
    tmp = path + '.tmp'
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_json(obj, path):
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(obj, f, indent=2)
        f.write('\n')
    os.replace(tmp, path)


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise RunError(f"cannot resume: {path} does not exist")
    return torch.load(path, map_location='cpu', weights_only=True)


class LossModule(nn.Module):
    """forward(x, y) = model.loss(x, y), so that DDP (which hooks forward) sees the training loss."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, y):
        return self.model.loss(x, y)


# -----------------------------------------------------------------------------
# the run


def resolve_device(name):
    """--device auto|cpu|cuda|cuda:N -> torch.device (auto: cuda when available). Asking for CUDA where there is
    none is a RunError, never a silent fallback to the CPU."""
    if not re.fullmatch(r'auto|cpu|cuda(:\d+)?', name):
        raise RunError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if name == 'cpu':
        return torch.device('cpu')
    if not torch.cuda.is_available():
        raise RunError(f"--device {name}: torch sees no CUDA device (torch {torch.__version__}, built for CUDA "
                       f"{torch.version.cuda or 'none'}); pass --device cpu, or install the torch build for this "
                       f"machine's CUDA version (README: 'On a GPU box')")
    device = torch.device(name)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise RunError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                       f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def setup_distributed(name='auto'):
    """(rank, world size, device) for --device `name`. torchrun sets RANK/WORLD_SIZE/LOCAL_RANK: nccl on GPU
    (each process on cuda:LOCAL_RANK), gloo on CPU."""
    device = resolve_device(name)
    if 'RANK' not in os.environ or 'WORLD_SIZE' not in os.environ:
        return 0, 1, device
    if device.type == 'cuda':
        if device.index is not None:
            raise RunError(f"--device {name} under torchrun: each process takes cuda:LOCAL_RANK; pass --device cuda")
        local = int(os.environ.get('LOCAL_RANK', 0))
        torch.cuda.set_device(local)
        dist.init_process_group('nccl')
        return dist.get_rank(), dist.get_world_size(), torch.device('cuda', local)
    dist.init_process_group('gloo')
    return dist.get_rank(), dist.get_world_size(), torch.device('cpu')


def interrupted(out):
    """The message for Ctrl-C: which checkpoint --resume would continue from."""
    path = os.path.join(out, 'last.pt')
    try:
        epoch = torch.load(path, map_location='cpu', weights_only=True, mmap=True)['epoch']
    except Exception:  # no checkpoint (or none readable): nothing to continue
        return f"interrupted before the first checkpoint; nothing to resume in {out}"
    return (f"interrupted during epoch {epoch + 1}; the last checkpoint is after epoch {epoch}; "
            f"continue with `--resume --out {out}`")


def environment(device):
    """What ran the code: the device's name, the torch / timm / Python versions and the git commit (None outside
    a git checkout; '-dirty' when tracked files differ from it)."""
    if device.type == 'cuda':
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        if os.path.exists('/proc/cpuinfo'):
            with open('/proc/cpuinfo') as f:
                name = next((ln.split(':', 1)[1].strip() for ln in f if ln.startswith('model name')), name)
        name = f"cpu ({name}, {os.cpu_count()} cores)"
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        git = lambda *a: subprocess.run(['git', *a], cwd=here, capture_output=True, text=True,  # noqa: E731
                                        timeout=10, check=True).stdout.strip()
        commit = git('rev-parse', 'HEAD') + ('-dirty' if git('status', '--porcelain', '--untracked-files=no') else '')
    except (OSError, subprocess.SubprocessError):
        commit = None
    return dict(device=name, torch=torch.__version__, timm=__import__('timm').__version__,
                python=platform.python_version(), git_commit=commit)


def resolved_fields(model, num_classes, world, micro, steps_per_epoch, dtype, train_split, eval_split):
    """What a built run adds to its configuration (recorded in last.pt and result.json): the options read back from
    the model, the backbone's identity, the batch split and the schedule's step count."""
    return dict(num_classes=num_classes, backbone_identity=model.backbone.identity, world_size=world,
                micro_batch=micro, steps_per_epoch=steps_per_epoch,
                amp_dtype=str(dtype).replace('torch.', '') if dtype else 'float32', train_split=train_split,
                eval_split_name=eval_split, model_options=methods.built_options(model))


def result_record(cfg, accuracy, tuned, total, identity, wall_time_s, device):
    """result.json: what a table needs at the top level, then the whole resolved configuration."""
    return dict(method=cfg['method'], data=cfg['data'], eval_split=cfg['eval_split'], accuracy=accuracy,
                tuned_params=tuned, total_params=total, epochs=cfg['epochs'], arch=cfg['arch'], pretrain=cfg['pretrain'],
                seed=cfg['seed'], backbone_identity=identity, wall_time_s=wall_time_s, **environment(device), config=cfg)


def duration(seconds):
    """'3d 04:05:06' / '04:05:06'."""
    days, rest = divmod(int(seconds), 86400)
    return (f'{days}d ' if days else '') + time.strftime('%H:%M:%S', time.gmtime(rest))


def main(argv=None):
    """Run training; returns the result dict (None when stopped by --stop-after-epoch)."""
    cfg, explicit = parse_args(argv)
    rank, world, device = setup_distributed(cfg['device'])
    try:
        return run(cfg, explicit, rank, world, device)
    except KeyboardInterrupt:
        raise Interrupted(interrupted(cfg['out'])) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def datasets(cfg):
    """(train split, eval split, train dataset, eval dataset, dataset options) of a run, read before the weights are
    resolved (split files take a moment, the weights may take minutes). Fills in cfg's mean / std with the
    backbone's normalisation when unset. A missing folder or split file, a bad label: a RunError."""
    mean, std = models.PRETRAIN[cfg['pretrain']][1]
    cfg['mean'], cfg['std'] = list(cfg['mean'] or mean), list(cfg['std'] or std)
    train_split, eval_split = data.split_names(cfg['data'], cfg['eval_split'])
    ds_kw = dict(root=cfg['data_root'], img_size=cfg['img_size'], mean=cfg['mean'], std=cfg['std'])
    try:
        train_ds = data.build_dataset(cfg['data'], train_split, train=True, **ds_kw)
        eval_ds = data.build_dataset(cfg['data'], eval_split, train=False, **ds_kw)
    except (FileNotFoundError, ValueError) as e:
        raise RunError(f"--data {cfg['data']}: {e}") from None
    return train_split, eval_split, train_ds, eval_ds, ds_kw


def schedule(cfg, train_loader):
    """(optimizer steps per epoch, total steps, warmup steps); --max-steps-per-epoch caps the first."""
    steps_per_epoch = math.ceil(len(train_loader) / cfg['accum'])
    if cfg['max_steps_per_epoch']:
        steps_per_epoch = min(steps_per_epoch, cfg['max_steps_per_epoch'])
    return steps_per_epoch, cfg['epochs'] * steps_per_epoch, round(cfg['warmup_epochs'] * steps_per_epoch)


def claim_run_dir(out, overwrite, remove=True):
    """A fresh start in `out`: refused when it holds a run, unless --overwrite (then its run files go)."""
    ckpt_path, result_path = os.path.join(out, 'last.pt'), os.path.join(out, 'result.json')
    if os.path.exists(result_path) or os.path.exists(ckpt_path):
        what = 'a finished run (result.json)' if os.path.exists(result_path) else 'an unfinished run (last.pt)'
        if not overwrite:
            raise RunError(f"{out} already holds {what}; pass --resume to continue it, --overwrite to start afresh, "
                           f"or --out DIR to put this run elsewhere")
        if remove:
            for path in (ckpt_path, result_path):
                if os.path.exists(path):
                    os.remove(path)


def open_run_dir(cfg, explicit, rank):
    """The run directory of a fresh start, an overwrite or a resume -> (configuration, checkpoint or None).
    A fresh start refuses a directory that holds a run (claim_run_dir). A resume continues the configuration
    recorded in last.pt: an explicitly given flag may differ from it only if it is in RESUME_OVERRIDES."""
    out = cfg['out']
    if not cfg['resume']:
        claim_run_dir(out, cfg['overwrite'], remove=rank == 0)
        return cfg, None
    ckpt_path = os.path.join(out, 'last.pt')
    ckpt = load_checkpoint(ckpt_path)
    rec = ckpt['args']
    if 'method' in explicit and cfg['method'] != rec['method']:
        raise RunError(f"cannot resume: --method {cfg['method']} differs from the checkpoint's "
                       f"{rec['method']} ({ckpt_path})")
    changed = [f"--{k.replace('_', '-')} {cfg[k]!r} (checkpoint: {rec.get(k)!r})" for k in sorted(explicit)
               if k not in RESUME_OVERRIDES and cfg[k] != rec.get(k)]
    if changed:
        raise RunError(f"cannot resume {out} with a different configuration: {', '.join(changed)}")
    resumed = dict(rec, stop_after_epoch=None)
    resumed.update({k: v for k, v in cfg.items() if k in explicit and k in RESUME_OVERRIDES})
    resumed.update(out=out, resume=True, overwrite=False)
    return resumed, ckpt


def decoded_cache(cfg, train_ds, eval_ds, log):
    """--decoded-cache: both splits decoded and resized once into memory (data.DecodedCache)."""
    if cfg['data'] not in data.FGVC and not cfg['data'].startswith('vtab-'):
        raise RunError(f"--decoded-cache is for FGVC and VTAB image files; --data {cfg['data']} is held in "
                       f"memory already: drop --decoded-cache")
    t0 = time.time()
    kw = dict(img_size=cfg['img_size'], mean=cfg['mean'], std=cfg['std'], workers=cfg['workers'])
    try:
        train_ds, eval_ds = data.DecodedCache(train_ds, train=True, **kw), data.DecodedCache(eval_ds, train=False, **kw)
    except (FileNotFoundError, RuntimeError) as e:
        raise RunError(f"--decoded-cache: {e}") from None
    log(f"decoded cache: {len(train_ds) + len(eval_ds)} images, {(train_ds.nbytes + eval_ds.nbytes) / 2**30:.2f} "
        f"GiB in memory, {time.time() - t0:.0f}s")
    return train_ds, eval_ds


def run(cfg, explicit, rank, world, device):
    """One training run from a parsed configuration (parse_args); main() sets up the processes and devices."""
    t_run = time.time()
    log = print if rank == 0 else (lambda *a, **k: None)
    warn = (lambda msg: print(f"warning: {msg}", file=sys.stderr, flush=True)) if rank == 0 else (lambda msg: None)
    if isinstance(cfg['lr'], list) or isinstance(cfg['wd'], list):
        return run_grid(cfg, world, device, log)

    # ---- the run directory: a fresh start, an overwrite, or a resume
    cfg, ckpt = open_run_dir(cfg, explicit, rank)
    out = cfg['out']
    ckpt_path, result_path, metrics_path = (os.path.join(out, f) for f in ('last.pt', 'result.json', 'metrics.jsonl'))
    if ckpt is not None and ckpt['epoch'] >= cfg['epochs'] and os.path.exists(result_path):
        log(f"{out} finished all {cfg['epochs']} epochs already; its result.json stands")
        with open(result_path) as f:
            return json.load(f)
    if cfg['accum'] < 1 or cfg['batch_size'] % (world * cfg['accum']):
        raise RunError(f"--batch-size {cfg['batch_size']} must be divisible by processes x --accum "
                       f"= {world} x {cfg['accum']}")
    micro = cfg['batch_size'] // (world * cfg['accum'])  # per-process micro-batch

    # ---- data first: its split files are read in a moment, where the weights may take minutes to resolve
    train_split, eval_split, train_ds, eval_ds, ds_kw = datasets(cfg)
    if cfg.setdefault('num_classes', train_ds.num_classes) != train_ds.num_classes:
        raise RunError(f"cannot resume: {train_split} of {cfg['data']} now holds {train_ds.num_classes} classes, "
                       f"the checkpoint's head has {cfg['num_classes']} ({ckpt_path})")

    # ---- model (every rank seeded identically, so parameters start equal; DDP broadcasts them anyway)
    model, num_classes = build(cfg, device)
    model.set_grad_checkpointing(cfg.get('grad_checkpointing', False))  # absent in older checkpoints
    identity = model.backbone.identity
    if ckpt is not None and not models.same_backbone(model.backbone, ckpt['identity']):
        raise RunError(f"cannot resume: the backbone is {identity}, but the checkpoint was trained on "
                       f"{ckpt['identity']} ({ckpt_path})")
    tuned = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())

    workers = cfg['workers']
    if cfg.get('decoded_cache'):  # absent in older checkpoints; decoded after the (cheap) checks above
        train_ds, eval_ds = decoded_cache(cfg, train_ds, eval_ds, log)
        workers = 0  # a batch is now a few memory copies: worker processes would only add transfers
    distributed = world > 1
    train_loader = data.build_loader(train_ds, micro, train=True, workers=workers, distributed=distributed,
                                     seed=cfg['seed'])
    eval_loader = data.build_loader(eval_ds, micro, train=False, workers=workers, distributed=distributed)
    steps_per_epoch, total_steps, warmup_steps = schedule(cfg, train_loader)
    if warmup_steps >= total_steps:
        warn(f"--warmup-epochs {cfg['warmup_epochs']:g} is not shorter than --epochs {cfg['epochs']}: the lr rises "
             f"linearly for the whole run to {lr_at(total_steps - 1, total_steps, warmup_steps, cfg['lr'], 0):.3g} "
             f"and never reaches the peak {cfg['lr']:g} or the cosine; pass --warmup-epochs below {cfg['epochs']}")

    # ---- optimizer, AMP, and the starting point
    opt = make_optimizer(model, cfg)
    dtype = amp_dtype(cfg['amp'], device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    start_epoch, step = 0, 0
    wall_before = ckpt.get('wall_time_s', 0.0) if ckpt is not None else 0.0  # earlier segments of a resumed run
    if ckpt is not None:
        load_tuned(model, ckpt['model'], ckpt_path)
        opt.load_state_dict(ckpt['optimizer'])
        scaler.load_state_dict(ckpt['scaler'])
        start_epoch, step = ckpt['epoch'], ckpt['step']
        if rank == 0 and os.path.exists(metrics_path):  # drop lines of an epoch that finished after the checkpoint
            with open(metrics_path) as f:
                lines = [ln for ln in f if ln.strip() and json.loads(ln)['epoch'] <= start_epoch]
            with open(metrics_path, 'w') as f:
                f.writelines(lines)
        log(f"resuming {out} after epoch {start_epoch} (step {step})")
    elif hasattr(model, 'init_prompts'):  # SPT: prompts from the training images, eval transform (same on every rank)
        t0 = time.time()
        init_ds = data.build_dataset(cfg['data'], train_split, train=False, **ds_kw)
        init_loader = data.build_loader(init_ds, micro, train=False, workers=cfg['workers'], distributed=False)
        model.init_prompts(init_loader, generator=torch.Generator().manual_seed(cfg['seed']))
        log(f"{cfg['method']} prompt init on {len(init_ds)} {train_split} images: {time.time() - t0:.1f}s")

    train_module = LossModule(model)
    ddp = DDP(train_module, device_ids=[device.index] if device.type == 'cuda' else None,
              forward_sync_buffers=False) if distributed else None  # buffers (SA²VP's mask) are constants
    step_fn = ddp or train_module
    if cfg['compile']:
        step_fn = torch.compile(step_fn)
    # training randomness (dropout, augmentation, loader seeds): per rank, restored exactly on resume
    if ckpt is not None:
        states = ckpt['rng']
        set_rng_state(states[rank] if len(states) == world else states[0])
        if len(states) != world:
            log(f"warning: the checkpoint holds RNG states of {len(states)} processes, this run has {world}")
    else:
        seed_everything(cfg['seed'] + rank)

    # ---- the resolved configuration (recorded in last.pt and result.json)
    cfg.update(resolved_fields(model, num_classes, world, micro, steps_per_epoch, dtype, train_split, eval_split))
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        if ckpt is None:  # a fresh start: no lines of an earlier attempt
            open(metrics_path, 'w').close()
    log(f"{cfg['method']} on {cfg['data']} ({train_split} -> {eval_split}), backbone {identity}: "
        f"{tuned:,} tuned of {total:,} parameters; {cfg['optimizer']} lr {cfg['lr']:g} wd {cfg['wd']:g}, batch "
        f"{cfg['batch_size']} = {world} x {cfg['accum']} x {micro}, {cfg['epochs']} epochs x {steps_per_epoch} steps, "
        f"{cfg['amp_dtype']} on {device}; out {out}")

    # ---- the loop
    force_nan = int(os.environ.get('VPT_FORCE_NAN_STEP', -1))  # test hook, see the docstring
    acc = None
    t_start, step_start = time.time(), step
    for epoch in range(start_epoch, cfg['epochs']):
        t_epoch = time.time()
        model.train()
        train_loader.sampler.set_epoch(epoch)  # the order is a function of (seed, epoch) only
        batches = iter(train_loader)
        loss_sum, images, lr = 0.0, 0, 0.0
        for s in range(steps_per_epoch):
            lr = lr_at(step, total_steps, warmup_steps, cfg['lr'], cfg['min_lr'])
            for group in opt.param_groups:
                group['lr'] = lr
            micro_batches = []
            for _ in range(cfg['accum']):
                try:
                    micro_batches.append(next(batches))
                except StopIteration:
                    break
            step_loss = torch.zeros((), device=device)
            for j, (x, y) in enumerate(micro_batches):
                x, y = data.to_device(x, device, train_ds), y.to(device, non_blocking=True)
                last = j == len(micro_batches) - 1
                with ddp.no_sync() if (ddp is not None and not last) else nullcontext():  # sync grads once per step
                    with autocast(device, dtype):
                        loss = step_fn(x, y)
                    if step == force_nan:
                        loss = loss * float('nan')
                    scaler.scale(loss / len(micro_batches)).backward()
                step_loss += loss.detach().float() / len(micro_batches)
                images += x.shape[0] * world
            if distributed:
                dist.all_reduce(step_loss)
                step_loss /= world
            step_loss = step_loss.item()
            if not math.isfinite(step_loss):
                raise RunError(f"non-finite loss {step_loss} at epoch {epoch + 1}, step {s + 1} of {steps_per_epoch} "
                               f"(global step {step}); stopping")
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            step += 1
            loss_sum += step_loss
            if rank == 0 and cfg['log_interval'] and (step - step_start == 1 or step % cfg['log_interval'] == 0
                                                      or s == steps_per_epoch - 1):  # after the first step, then every N
                per_step = (time.time() - t_start) / (step - step_start)
                log(f"epoch {epoch + 1}/{cfg['epochs']} step {s + 1}/{steps_per_epoch} | loss {step_loss:.4f} | "
                    f"lr {lr:.3e} | {per_step:.3f} s/step, {images / (time.time() - t_epoch):.0f} img/s | peak "
                    f"{peak_memory_mb(device):.0f} MB | eta {duration(per_step * (total_steps - step))}", flush=True)
        train_time = time.time() - t_epoch
        final = epoch + 1 == cfg['epochs']
        if final or (epoch + 1) % cfg['eval_every'] == 0:
            acc = evaluate(model, eval_loader, device, dtype)
        else:
            acc = None
        row = dict(epoch=epoch + 1, train_loss=loss_sum / steps_per_epoch, accuracy=acc, eval_split=cfg['eval_split'],
                   lr=lr, images_per_s=images / train_time, peak_mem_mb=peak_memory_mb(device), time=time.time() - t_epoch)
        log(f"epoch {epoch + 1}: train loss {row['train_loss']:.4f}, {eval_split} accuracy "
            f"{'-' if acc is None else format(acc, '.2f')}%, {row['time']:.1f}s", flush=True)
        states = [rng_state()]
        if distributed:
            states = [None] * world
            dist.all_gather_object(states, rng_state())
        if rank == 0:
            with open(metrics_path, 'a') as f:
                f.write(json.dumps(row) + '\n')
            atomic_save(dict(model=methods.tuned_state_dict(model), optimizer=opt.state_dict(),
                             scaler=scaler.state_dict(), step=step, epoch=epoch + 1, rng=states, args=cfg,
                             identity=identity, method=cfg['method'], wall_time_s=wall_before + time.time() - t_run),
                        ckpt_path)
        if cfg['stop_after_epoch'] is not None and epoch + 1 == cfg['stop_after_epoch'] and not final:
            log(f"stopping after epoch {epoch + 1} (--stop-after-epoch); continue with --resume")
            return None

    if acc is None:  # resumed after the last epoch's checkpoint, but result.json was never written
        acc = evaluate(model, eval_loader, device, dtype)
    result = result_record(cfg, acc, tuned, total, identity, wall_before + time.time() - t_run, device)
    if rank == 0:
        atomic_json(result, result_path)
    log(f"final {eval_split} accuracy {acc:.2f}% ({cfg['method']}, {cfg['data']}); wrote {out}")
    return result


def run_grid(cfg, world, device, log):
    """`--method linear` with comma lists of --lr / --wd: every (lr, wd) head trains side by side on one stream of
    backbone features, one backbone forward per batch for all heads, and each cell is written as the ordinary run
    directory OUT/lr<lr>_wd<wd>/ it would have been on its own (same seed: same head init, data order, schedule).
    When the training transform has no randomness (VTAB, digits) the features of both splits are computed once
    and every epoch reads them from memory; with FGVC's random crop and flip they are recomputed per batch.
    One process only, without --resume (a killed cell resumes on its own: train.py --resume --out OUT/<cell>)."""
    if world > 1 or cfg['resume'] or cfg['accum'] != 1 or cfg['compile'] or cfg['decoded_cache']:
        raise RunError("a --lr/--wd grid runs on one process without --resume, --accum, --compile or --decoded-cache; "
                       "run it without torchrun, or resume a cell on its own with --resume --out <grid out>/<cell>")
    lrs = cfg['lr'] if isinstance(cfg['lr'], list) else [cfg['lr']]
    wds = cfg['wd'] if isinstance(cfg['wd'], list) else [cfg['wd']]
    grid = [(lr, wd, os.path.join(cfg['out'], cell_name(lr, wd))) for wd in wds for lr in lrs]
    for _, _, out in grid:
        claim_run_dir(out, cfg['overwrite'])
    micro = cfg['batch_size']
    t_run = time.time()

    train_split, eval_split, train_ds, eval_ds, _ = datasets(cfg)  # the data first, as in a single run
    model, num_classes = build(cfg, device)  # every cell's separate run would build exactly this (same seed)
    cells = [dict(cfg, lr=lr, wd=wd, out=out) for lr, wd, out in grid]  # each cell's configuration
    identity = model.backbone.identity
    tuned = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    train_loader = data.build_loader(train_ds, micro, train=True, workers=cfg['workers'], seed=cfg['seed'])
    eval_loader = data.build_loader(eval_ds, micro, train=False, workers=cfg['workers'])
    steps_per_epoch, total_steps, warmup_steps = schedule(cfg, train_loader)
    dtype = amp_dtype(cfg['amp'], device)
    heads = []  # per cell: a module holding `head` (parameter names as in the model: head.weight, head.bias)
    for c in cells:
        m = nn.Module()
        m.head = copy.deepcopy(model.head)
        heads.append(m)
    opts = [make_optimizer(m, c) for m, c in zip(heads, cells)]
    scalers = [torch.amp.GradScaler(device.type, enabled=dtype == torch.float16) for _ in cells]
    seed_everything(cfg['seed'])  # as a separate run after its build

    cached = cfg['data'] not in data.FGVC  # VTAB and digits train without augmentation (data.build_transform)
    model.eval()

    def features_of(x):  # one backbone forward for every head
        with torch.no_grad(), autocast(device, dtype):
            return model.features(x.to(device, non_blocking=True))  # (B, D)

    def features(loader):  # (N, D), (N,): one backbone forward per image of the split
        f, ys = zip(*((features_of(x), y.to(device)) for x, y in loader))
        return torch.cat(f), torch.cat(ys)

    t0 = time.time()
    if cached:
        train_feats, train_labels = features(data.build_loader(train_ds, micro, train=False, workers=cfg['workers']))
        eval_feats, eval_labels = features(eval_loader)
    how = (f"features cached: {len(train_ds)} {train_split} + {len(eval_ds)} {eval_split} images, one backbone "
           f"forward each ({time.time() - t0:.1f}s)" if cached else
           "features recomputed per batch (random augmentation), one backbone forward per batch for all heads")
    log(f"linear grid on {cfg['data']} ({train_split} -> {eval_split}), backbone {identity}: {len(cells)} heads "
        f"(lr {','.join(f'{v:g}' for v in lrs)} x wd {','.join(f'{v:g}' for v in wds)}), {tuned:,} tuned parameters "
        f"each; {how}; out {cfg['out']}")
    for c in cells:
        c.update(resolved_fields(model, num_classes, 1, micro, steps_per_epoch, dtype, train_split, eval_split),
                 grid_features='cached' if cached else 'per batch')
        os.makedirs(c['out'], exist_ok=True)
        open(os.path.join(c['out'], 'metrics.jsonl'), 'w').close()

    live = list(range(len(cells)))  # cells still training (a non-finite loss stops its cell only)
    failed = {}
    step, acc = 0, [None] * len(cells)
    for epoch in range(cfg['epochs']):
        t_epoch = time.time()
        train_loader.sampler.set_epoch(epoch)  # the same order as each cell's own run
        if cached:
            order = list(train_loader.sampler)
            batches = ((train_feats[idx], train_labels[idx]) for idx in
                       (torch.tensor(order[i:i + micro]) for i in range(0, len(order), micro)))
        else:
            batches = ((features_of(x), y.to(device)) for x, y in train_loader)
        loss_sum = [0.0] * len(cells)
        images, lrs_now = 0, [0.0] * len(cells)
        for s in range(steps_per_epoch):
            f, y = next(batches)                                        # (B, D), (B,)
            images += y.shape[0]
            for k in list(live):
                c = cells[k]
                lrs_now[k] = lr_at(step, total_steps, warmup_steps, c['lr'], c['min_lr'])
                for group in opts[k].param_groups:
                    group['lr'] = lrs_now[k]
                with autocast(device, dtype):
                    loss = F.cross_entropy(heads[k].head(f), y)        # = model.loss(x, y) of the cell's own run
                if not math.isfinite(loss.item()):
                    failed[k] = f"non-finite loss {loss.item()} at epoch {epoch + 1}, step {s + 1}"
                    live.remove(k)
                    continue
                scalers[k].scale(loss).backward()
                scalers[k].step(opts[k])
                scalers[k].update()
                opts[k].zero_grad(set_to_none=True)
                loss_sum[k] += loss.item()
            step += 1
        train_time = time.time() - t_epoch
        final = epoch + 1 == cfg['epochs']
        evaluate_now = final or (epoch + 1) % cfg['eval_every'] == 0
        with torch.no_grad():
            if evaluate_now and not cached:
                eval_feats, eval_labels = features(eval_loader)  # once for all heads
            for k in live:
                if evaluate_now:
                    with autocast(device, dtype):
                        pred = heads[k].head(eval_feats).argmax(-1)                # (N,)
                    acc[k] = 100.0 * (pred == eval_labels).sum().item() / max(len(eval_labels), 1)
                else:
                    acc[k] = None
        states = [rng_state()]
        for k in live:
            c = cells[k]
            row = dict(epoch=epoch + 1, train_loss=loss_sum[k] / steps_per_epoch, accuracy=acc[k],
                       eval_split=c['eval_split'], lr=lrs_now[k], images_per_s=images / train_time,
                       peak_mem_mb=peak_memory_mb(device), time=time.time() - t_epoch)
            with open(os.path.join(c['out'], 'metrics.jsonl'), 'a') as f:
                f.write(json.dumps(row) + '\n')
            atomic_save(dict(model=methods.tuned_state_dict(heads[k]), optimizer=opts[k].state_dict(),
                             scaler=scalers[k].state_dict(), step=step, epoch=epoch + 1, rng=states, args=c,
                             identity=identity, method='linear', wall_time_s=time.time() - t_run),
                        os.path.join(c['out'], 'last.pt'))
        shown = ', '.join('-' if acc[k] is None else f"{acc[k]:.1f}" for k in live)
        log(f"epoch {epoch + 1}/{cfg['epochs']}: {eval_split} accuracy per head {shown}; {time.time() - t_epoch:.1f}s",
            flush=True)
    results = []
    for k in live:
        c = cells[k]
        result = dict(result_record(c, acc[k], tuned, total, identity, time.time() - t_run, device),
                      features=c['grid_features'])
        atomic_json(result, os.path.join(c['out'], 'result.json'))
        results.append(result)
        log(f"final {eval_split} accuracy {acc[k]:.2f}% (linear lr {c['lr']:g} wd {c['wd']:g}); wrote {c['out']}")
    if failed:
        raise RunError('; '.join(f"{cells[k]['out']}: {msg}" for k, msg in failed.items()) + " (the other cells "
                       "finished)")
    return results


def cli(main_fn):
    """Run main_fn on the command line. An anticipated failure (RunError, an unreadable image, Ctrl-C) prints one
    `error: ...` line, no traceback, and exits with status 1 (130 for Ctrl-C)."""
    try:
        main_fn(sys.argv[1:])
    except (RunError, data.ImageError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(130 if isinstance(e, Interrupted) else 1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == '__main__':
    cli(main)
