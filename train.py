"""
Train a prompt-tuning method (or a baseline) on a frozen ViT: plain argparse, one training loop.

    python train.py --method vpt --pretrain in21k --data cub                  # VPT's recipe, nothing else
    torchrun --nproc_per_node=4 train.py --method sa2vp --data cub            # the same global batch of 64
    python train.py --method linear --data vtab-dtd --lr 12.5,2.5,0.5 --wd 0.01,0   # a grid in one pass

Defaults: the papers' recipes (each class's `recipe` in methods.py), per-step warmup then cosine, absolute
learning rates, bf16 autocast on CUDA, torchrun DDP with a global batch that does not depend on the processes.
Around the loop: runs.py (run directory, resume, records), weights.py (weights files, the hub), decoded_cache.py,
linear_grid.py (linear heads trained side by side with train_epoch).
"""

import argparse
import itertools
import math
import os
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
# configuration: the flags; the method's recipe and these defaults fill in what is not given
MOMENTUM = 0.9  # SGD momentum in every SGD recipe
DEFAULTS = dict(arch='vit_base_patch16_224', pretrain='in21k', eval_split='val', img_size=224, momentum=MOMENTUM,
                seed=0, device='auto', amp='auto', accum=1, workers=runs.DEFAULT_WORKERS, log_interval=20,
                compile=False, grad_checkpointing=False, decoded_cache=False, resume=False, overwrite=False)
# flags that change the result: spelled out in the default --out when given (and every method option)
NAMED_FLAGS = ('img_size', 'mean', 'std', 'epochs', 'batch_size', 'lr', 'wd', 'wd_head', 'optimizer', 'momentum',
               'warmup_epochs', 'min_lr', 'max_steps_per_epoch', 'vtab_source', 'pipeline')


def recipe(key):
    """--help's default of a recipe value: one value for every method, or one per method."""
    values = {m: 'same as --wd' if v is None else format(v, 'g') if not isinstance(v, str) else v
              for m, v in ((m, cls.recipe[key]) for m, cls in methods.METHODS.items())}
    return 'recipe: ' + (f"{values.popitem()[1]} for every method" if len(set(values.values())) == 1 else
                         ', '.join(f"{m} {v}" for m, v in values.items()))


def number_or_list(s):
    """A number, or a comma list of numbers: a grid, trained in one pass (--method linear only)."""
    try:
        values = [float(v) for v in s.split(',')]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or a comma list of numbers, got {s!r}") from None
    return values[0] if len(values) == 1 else values


def build_parser():
    """Every flag defaults to None, 'not given'; parse_args fills in DEFAULTS and the recipe."""
    p = argparse.ArgumentParser(description="Train a visual prompt-tuning method on a frozen ViT with its paper's "
                                "recipe; every recipe value can be overridden.", allow_abbrev=False)
    on = dict(action='store_const', const=True)
    g = p.add_argument_group('model and data')
    g.add_argument('--method', choices=list(methods.METHODS), help="(required)")
    g.add_argument('--arch', choices=list(models.ARCHS), help="(default: vit_base_patch16_224)")
    g.add_argument('--pretrain', choices=list(models.PRETRAIN), help="(default: in21k)")
    g.add_argument('--weights', help="weights file, any format of weights.py (default: --pretrain's hub weights)")
    g.add_argument('--data', choices=data.DATASETS, metavar='NAME', help="cub, ..., vtab-<task>, digits (required)")
    g.add_argument('--data-root', help="(default: $VPT_DATA_ROOT or ./data)")
    g.add_argument('--vtab-source', choices=data.VTAB_SOURCES, help="VTAB-1k from (default: tfds when it is there)")
    g.add_argument('--pipeline', choices=list(data.PIPELINES), help="VTAB-1k: a paper's input pipeline (DATA.md)")
    g.add_argument('--eval-split', choices=['val', 'test'], help="val: train / val; test: FGVC train, VTAB "
                   "train800val200 / test (default: val)")
    g.add_argument('--img-size', type=int, help="(default: 224)")
    for k in ('--mean', '--std'):
        g.add_argument(k, type=float, nargs=3, help="normalisation (default: --pipeline's, else the backbone's)")
    g = p.add_argument_group("recipe (default: the method's paper recipe)")
    g.add_argument('--epochs', type=int, help=recipe('epochs'))
    g.add_argument('--batch-size', type=int, help="global, whatever the number of processes; " + recipe('batch_size'))
    g.add_argument('--lr', type=number_or_list, help="peak learning rate, absolute; " + recipe('lr') + "; a comma "
                   "list for --method linear (with --wd: a grid in one pass, a run directory per cell in --out)")
    g.add_argument('--wd', type=number_or_list, help="weight decay (SGD: not on the head bias; AdamW: not on biases "
                   "and 1-D tensors); " + recipe('wd') + "; a comma list for --method linear")
    g.add_argument('--wd-head', type=float, help="weight decay of the head weight; " + recipe('wd_head'))
    g.add_argument('--optimizer', choices=['sgd', 'adamw'], help=recipe('optimizer'))
    g.add_argument('--momentum', type=float, help="SGD momentum (default: 0.9)")
    g.add_argument('--warmup-epochs', type=float, help="linear warmup from 0, per step; " + recipe('warmup_epochs'))
    g.add_argument('--min-lr', type=float, help="end of the cosine; " + recipe('min_lr'))
    g = p.add_argument_group("method options (each class's `flags` in methods.py)")
    for k, (kind, text, default) in methods.method_flags().items():
        if kind is bool:  # an option that is on by default is turned off with --no-<name>
            g.add_argument(f"--{'no-' if default else ''}{k.replace('_', '-')}", dest=k, action='store_const',
                           const=not default, help=text)
        else:
            g.add_argument(f"--{k.replace('_', '-')}", **{'choices' if isinstance(kind, tuple) else 'type': kind},
                           help=text)
    g = p.add_argument_group('system')
    g.add_argument('--seed', type=int, help="(default: 0)")
    g.add_argument('--device', help="auto (cuda if there is one), cpu, cuda or cuda:N (default: auto)")
    g.add_argument('--amp', choices=['auto', 'none', 'bf16', 'fp16'], help="auto: bf16 on CUDA, else fp32; fp16 with a "
                   "GradScaler (default: auto)")
    g.add_argument('--compile', **on, help="torch.compile the training step")
    g.add_argument('--grad-checkpointing', **on, help="recompute the blocks in backward: less memory, same gradients")
    g.add_argument('--accum', type=int, help="micro-batches per optimizer step (default: 1)")
    g.add_argument('--workers', type=int, help="data loader workers per process (default: min(4, CPUs), here "
                   f"{runs.DEFAULT_WORKERS})")
    g.add_argument('--decoded-cache', **on, help="decode every image once into memory (for GPUs that outrun JPEG)")
    g.add_argument('--eval-every', type=int, help="evaluate every N epochs and the last (default: 1; test: the last)")
    g.add_argument('--log-interval', type=int, help="steps between progress lines, 0 = none (default: 20)")
    g.add_argument('--out', help="run directory (default: runs/<method>-<data>-<pretrain>-<arch>-<split>-seed<s>-...)")
    g.add_argument('--resume', **on, help="continue --out/last.pt with its recorded configuration")
    g.add_argument('--overwrite', **on, help="start afresh in a directory that holds a run")
    g.add_argument('--max-steps-per-epoch', type=int, help="testing aid: cap the steps per epoch (and the schedule)")
    g.add_argument('--stop-after-epoch', type=int, help="testing aid: stop as if killed after this epoch")
    return p


def parse_args(argv=None):
    """The command line -> (configuration, flags given): DEFAULTS, the method's recipe and dataset defaults, the
    backbone's normalisation, the splits, --out and --eval-every filled in, every value checked; reads no file."""
    parser = build_parser()
    args = vars(runs.parse_flags(parser, argv))  # --resume PATH: what to type instead
    explicit = {k for k, v in args.items() if v is not None}
    if args['resume'] and args['overwrite']:
        parser.error("--resume and --overwrite exclude each other")
    if (args['method'] is None or args['data'] is None) and not (args['resume'] and args['out']):
        parser.error("--method and --data are required (--resume: or --out)")
    cfg = {**args, **DEFAULTS, **{k: v for k, v in args.items() if v is not None}}
    cfg['weights'] = cfg['weights'] and os.path.abspath(cfg['weights'])
    if cfg['method'] is None:  # --resume --out DIR: the configuration comes from the checkpoint
        return cfg, explicit
    cls, options = methods.METHODS[cfg['method']], methods.method_flags()
    if not cls.grid_in_one_pass and any(isinstance(cfg[k], list) for k in ('lr', 'wd')):
        parser.error(f"a comma list of --lr / --wd (a grid in one pass) is for linear probes; sweep.py runs the "
                     f"grids of --method {cfg['method']}")
    for k, v in {**cls.recipe, **cls.data_defaults(cfg['data'])}.items():
        cfg[k] = v if cfg[k] is None else cfg[k]
    mean, std = data.PIPELINES.get(cfg['pipeline']) or models.PRETRAIN[cfg['pretrain']][1]
    cfg['mean'], cfg['std'] = list(cfg['mean'] or mean), list(cfg['std'] or std)
    cfg['train_split'], cfg['eval_split_name'] = data.split_names(cfg['data'], cfg['eval_split'])
    if cfg['eval_every'] is None:  # a final run on test evaluates it once, after the last epoch
        cfg['eval_every'] = 1 if cfg['eval_split'] == 'val' else cfg['epochs']
    cfg['out'] = cfg['out'] or runs.run_name(cfg, explicit, NAMED_FLAGS + tuple(options))
    flag = {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings}  # in --help's order
    runs.check_flags(dict(cfg, method_options=options), explicit, methods.init_options(cls), flag,
                     models.ARCHS[cfg['arch']]['patch_size'])
    return cfg, explicit


def datasets(cfg):
    """(train dataset, eval dataset), read before the weights: a missing folder or file, a bad label: a RunError."""
    try:
        return (data.build_dataset(cfg['data'], cfg['train_split'], train=True, **data.dataset_kwargs(cfg)),
                data.build_dataset(cfg['data'], cfg['eval_split_name'], **data.dataset_kwargs(cfg)))
    except (FileNotFoundError, ValueError) as e:
        raise RunError(f"--data {cfg['data']}: {e}") from None


# -----------------------------------------------------------------------------
# model, optimizer, schedule, evaluation

def build(cfg, device, weights_file=None):
    """The backbone (weights_file, else --weights, else the hub) and the method's model on `device`. Seeded, so a
    random (--pretrain none) backbone and the method's initial tensors are rebuilt identically by eval.py."""
    runs.seed_everything(cfg['seed'])
    try:
        backbone = weights.load_backbone(cfg['arch'], cfg['pretrain'], weights_file or cfg['weights'], cfg['img_size'])
        options = {k: cfg[k] for k in methods.init_options(methods.METHODS[cfg['method']]) if cfg.get(k) is not None}
        model = methods.build_model(cfg['method'], backbone, cfg['num_classes'], **options)
    except weights.CheckpointError as e:
        raise RunError(str(e)) from None
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


def schedule(cfg, train_loader, warn=True):
    """(optimizer steps per epoch, total steps, warmup steps); --max-steps-per-epoch caps the first. A warning when
    the warmup is not shorter than the run."""
    steps = math.ceil(len(train_loader) / cfg['accum'])
    steps = min(steps, cfg['max_steps_per_epoch'] or steps)
    total, warmup = cfg['epochs'] * steps, round(cfg['warmup_epochs'] * steps)
    if warn and warmup >= total:
        runs.warn(f"--warmup-epochs {cfg['warmup_epochs']:g} is not shorter than --epochs {cfg['epochs']}: the lr "
                  f"rises linearly for the whole run to {lr_at(total - 1, total, warmup, cfg['lr'], 0):.3g} and never "
                  f"reaches the peak {cfg['lr']:g} or the cosine; pass --warmup-epochs below {cfg['epochs']}")
    return steps, total, warmup


def lr_at(step, total, warmup, lr, min_lr):
    """Linear warmup from 0 over `warmup` steps, then cosine from lr to min_lr at `total` steps."""
    if step < warmup:
        return lr * step / warmup
    if total <= warmup:
        return lr
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def amp_dtype(amp, device):  # the autocast dtype, None for fp32
    return {'auto': torch.bfloat16 if device.type == 'cuda' else None, 'none': None, 'bf16': torch.bfloat16,
            'fp16': torch.float16}[amp]


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


class LossModule(nn.Module):  # forward(x, y) = model.loss(x, y): DDP hooks forward
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, y):
        return self.model.loss(x, y)


# -----------------------------------------------------------------------------
# the loop

def train_epoch(model, step_fn, loader, opt, scaler, step, epoch, cfg, sched, device, dtype, log):
    """One epoch of optimizer steps, each over --accum micro-batches; step_fn(x, y) is the training loss (under
    torchrun, DDP-wrapped). Returns (global step, mean loss, images/s)."""
    steps, total_steps, warmup_steps = sched
    world = dist.get_world_size() if dist.is_initialized() else 1
    model.train()
    loader.sampler.set_epoch(epoch)  # the order is a function of (seed, epoch) only
    batches, loss_sum, images, t0 = iter(loader), 0.0, 0, time.time()
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
            log(runs.progress(cfg, epoch, s, steps, step_loss, opt.param_groups[0]['lr'], images, t0,
                              total_steps - step, device))
    return step, loss_sum / steps, images / (time.time() - t0)


def start(model, opt, scaler, ckpt, cfg, micro, rank, world, log):
    """The starting (epoch, step, wall time so far): a resumed run's from its checkpoint, tensors and RNG included;
    a fresh run initialises what the method initialises from data (SPT's prompts) and seeds every process."""
    if ckpt is not None:
        runs.check_resumed(ckpt, cfg, model.backbone.identity)  # the same classes and backbone tensors as before
        runs.load_tuned(model, ckpt['model'], cfg['out'])
        opt.load_state_dict(ckpt['optimizer'])
        scaler.load_state_dict(ckpt['scaler'])
        runs.restore_rng(ckpt['rng'], rank, world)  # dropout, augmentation, loader seeds: as if never stopped
        log(f"resuming {cfg['out']} after epoch {ckpt['epoch']} (step {ckpt['step']})")
        return ckpt['epoch'], ckpt['step'], ckpt['wall_time_s']
    if hasattr(model, 'init_prompts'):  # SPT: prompts from the training images, eval transform, every rank alike
        t0, ds = time.time(), data.build_dataset(cfg['data'], cfg['train_split'], **data.dataset_kwargs(cfg))
        model.init_prompts(data.build_loader(ds, micro, False, cfg['workers']),
                           generator=torch.Generator().manual_seed(cfg['seed']))
        log(f"{cfg['method']} prompt init on {len(ds)} {cfg['train_split']} images: {time.time() - t0:.1f}s")
    runs.seed_everything(cfg['seed'] + rank)
    return 0, 0, 0.0


def run(cfg, explicit, rank, world, device):
    """One training run: the run directory, data, model, optimizer, then the epochs. Returns result.json's dict
    (None when stopped by --stop-after-epoch)."""
    t_run, log = time.time(), runs.say if rank == 0 else (lambda *a, **k: None)
    cfg, ckpt, done = runs.open_run_dir(cfg, explicit, rank)  # a fresh start, an overwrite or a resume
    if done:  # resumed after the last epoch: its result.json stands
        return done
    micro = runs.micro_batch(cfg, world)  # --batch-size / (processes x --accum)
    train_ds, eval_ds = datasets(cfg)  # the data before the weights
    cfg = MappingProxyType(dict(cfg, num_classes=train_ds.num_classes, data_source=runs.data_record(train_ds, eval_ds)))
    model = build(cfg, device)  # every rank seeded alike, so parameters start equal (DDP broadcasts them anyway)
    if cfg['decoded_cache']:
        import decoded_cache
        train_loader, eval_loader = decoded_cache.loaders(train_ds, eval_ds, cfg, micro, device, world > 1, log)
    else:
        train_loader = data.build_loader(train_ds, micro, True, cfg['workers'], world > 1, cfg['seed'])
        eval_loader = data.build_loader(eval_ds, micro, False, cfg['workers'], world > 1)
    sched, opt = schedule(cfg, train_loader, rank == 0), make_optimizer(model, cfg)
    dtype = amp_dtype(cfg['amp'], device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    epoch0, step, wall_before = start(model, opt, scaler, ckpt, cfg, micro, rank, world, log)
    record = runs.run_record(cfg, model, world, micro, sched[0], dtype)
    tuned = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log(f"{cfg['method']} on {cfg['data']} ({cfg['train_split']} -> {cfg['eval_split_name']}, {train_ds.source}), "
        f"{tuned:,} tuned of {total:,} parameters, batch {cfg['batch_size']} = {world} x {cfg['accum']} x {micro}, "
        f"{cfg['epochs']} epochs x {sched[0]} steps, {record['amp_dtype']} on {device}, backbone "
        f"{model.backbone.identity}; out {cfg['out']}")
    step_fn = model.loss  # under torchrun DDP wraps it (no buffer broadcast: buffers, SA²VP's mask, are constants)
    if world > 1:
        step_fn = DDP(LossModule(model), device_ids=[device.index] if device.type == 'cuda' else None,
                      forward_sync_buffers=False)
    step_fn = torch.compile(step_fn) if cfg['compile'] else step_fn
    acc = None
    for epoch in range(epoch0, cfg['epochs']):
        t0 = time.time()
        step, loss, rate = train_epoch(model, step_fn, train_loader, opt, scaler, step, epoch, cfg, sched, device,
                                       dtype, log)
        final = epoch + 1 == cfg['epochs']
        acc = evaluate(model, eval_loader, device, dtype) if final or (epoch + 1) % cfg['eval_every'] == 0 else None
        row = dict(epoch=epoch + 1, train_loss=loss, accuracy=acc, eval_split=cfg['eval_split'],
                   lr=opt.param_groups[0]['lr'], images_per_s=rate, peak_mem_mb=runs.peak_memory_mb(device),
                   time=time.time() - t0)
        log(f"epoch {epoch + 1}: train loss {loss:.4f}, {cfg['eval_split_name']} accuracy "
            f"{'-' if acc is None else format(acc, '.2f')}%, {row['time']:.1f}s")
        runs.save_epoch(cfg['out'], row, rank, dict(  # every process's RNG state too: a collective under DDP
            model=methods.tuned_state_dict(model), optimizer=opt.state_dict(), scaler=scaler.state_dict(), step=step,
            epoch=epoch + 1, args=record, identity=model.backbone.identity, method=cfg['method'],
            wall_time_s=wall_before + time.time() - t_run))
        if cfg['stop_after_epoch'] == epoch + 1 and not final:
            log(f"stopping after epoch {epoch + 1} (--stop-after-epoch); continue with --resume")
            return None
    if acc is None:  # resumed after the last epoch's checkpoint, but result.json was never written
        acc = evaluate(model, eval_loader, device, dtype)
    result = runs.result_record(record, acc, tuned, total, wall_before + time.time() - t_run, device)
    if rank == 0:
        runs.atomic_json(result, os.path.join(cfg['out'], 'result.json'))
    log(f"final {cfg['eval_split_name']} accuracy {acc:.2f}% ({cfg['method']}, {cfg['data']}); wrote {cfg['out']}")
    return result


def main(argv=None):
    """Train; returns result.json's dict (a list of them for a grid; None when stopped by --stop-after-epoch)."""
    cfg, explicit = parse_args(argv)
    try:
        if isinstance(cfg['lr'], list) or isinstance(cfg['wd'], list):
            import linear_grid
            return linear_grid.run(cfg, runs.resolve_device(cfg['device']))
        return run(cfg, explicit, *runs.setup_distributed(cfg['device']))
    except KeyboardInterrupt:
        raise runs.Interrupted(runs.interrupted(cfg['out'])) from None
    finally:
        runs.teardown()  # the run directories released, the process group destroyed


if __name__ == '__main__':
    runs.cli(main)
