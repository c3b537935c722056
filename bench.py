"""
Speed, memory and FLOPs of every method side by side, as ratios against fixed targets, in one process.

    python bench.py --methods vpt,lspt --prompts 50,100 --json > bench.json   # CUDA + bf16 if there, else CPU fp32

The rows. backbone (ours) and timm ViT (same weights): fwd = forward_features; train = fwd+bwd through the frozen
blocks, gradient to the input tokens only (a fixed head on cls): the floor of every prompt method. Each method at its
defaults, at each --prompts P, its class's bench variants (lspt without prompt dropout, sa2vp without its backbone
dropout), each with grad checkpointing (memory and time as multiples of the default's): fwd = eval forward under
no_grad; train = zero_grad, model.loss, backward and a step of the optimizer of the method's recipe as train.py builds
it. <method> init <strategy> (a class's bench['init']: SPT): init_prompts over --spt-images random images, timed in
the last --init-iters rounds; <method> epoch (estimated): ceil(spt_images / batch) x its median train step.

Each round runs every timed call once, round-robin from a rotating start, so machine noise hits all rows alike; the
--warmup rounds are dropped, times are medians of the --iters rounds and ratios medians of the per-round ratios. A
target passes when every round's ratio is within its bound, MISSes when all are above it, is unresolved when they
straddle it (noise decides: run more --iters on a quieter machine). The targets, each class's `bench` in methods.py:
  ours / timm fwd+bwd <= 1.05  models.py is a readable copy of timm's ViT on the same kernels: at most 5% slower.
  VPT, SPT <= 1.1 x (N+P)/N    of the backbone (N = 197 for ViT-B/16): prompts only lengthen the sequence (+10%).
  LSPT <= 1.3 x VPT-deep       at the same P: its shared LSTMCell adds 19% forward FLOPs at P = 100 for ViT-B.
  SA²VP <= 2.4 x backbone      ours does ~2.3x a backbone's FLOPs (80.2 vs 35.1 G for ViT-B; the official ~2.5x).
  SPT init / epoch             kmeans <= 1, random/mean/max <= 0.25: an init must not dominate a run.
The loader table: images/s of one worker on folder JPEGs, the same files as TFDS records, FGVC's decoded cache.
--loader-only: that table alone. --linear-grid: see linear_grid(). --json: the list main(argv) returns.
"""

import argparse
import contextlib
import copy
import ctypes
import io
import itertools
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import data
import decoded_cache
import methods
import models
import runs
import tfds
import train

GPU_RATE = 2500  # images/s a current datacenter GPU consumes for VPT-deep ViT-B/16 in bf16 (an estimate)
LOADER_SETS = (  # (label, data name, (width, height)): FGVC photos, and VTAB-1k's typical image sizes
    ('fgvc train 500x375', 'cub', (500, 375)), ('vtab 32x32 (cifar, svhn)', 'vtab-cifar', (32, 32)),
    ('vtab 256x256 (resisc45)', 'vtab-resisc45', (256, 256)), ('vtab 480x320 (clevr)', 'vtab-clevr_count', (480, 320)))
try:
    LIBC = ctypes.CDLL('libc.so.6')   # glibc's malloc_trim and mallopt, for the CPU memory pass
except OSError:
    LIBC = None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[1],   # --help shows every option's default
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--arch', default='vit_base_patch16_224', choices=list(models.ARCHS), help='the backbone')
    p.add_argument('--img-size', type=int, default=224, help='input size')
    p.add_argument('--batch-size', type=int, default=8, help='images per timed call')
    p.add_argument('--num-classes', type=int, default=200, help='head size (200 = CUB)')
    p.add_argument('--device', default='auto', help='auto (cuda when available, else cpu), cpu, cuda or cuda:N')
    p.add_argument('--amp', default='auto', choices=['auto', 'none', 'bf16', 'fp16'], help="as train.py's: auto = "
                   "bf16 autocast on CUDA, fp32 on the CPU")
    p.add_argument('--iters', type=int, default=3, help='timed rounds (each runs every phase once)')
    p.add_argument('--warmup', type=int, default=1, help='rounds run first and dropped')
    p.add_argument('--init-iters', type=int, default=1, help='timed rounds of the SPT inits (the last ones)')
    p.add_argument('--spt-images', type=int, default=64, help='images the SPT init and epoch run over')
    p.add_argument('--prompts', default='10,50,100,200', help=f"P values for {'/'.join(methods.PROMPTED)}")
    p.add_argument('--methods', default=','.join(methods.METHODS), help='a comma-separated subset')
    p.add_argument('--loader-images', type=int, default=64, help='images per loader-rate set (0: no loader rows)')
    p.add_argument('--loader-only', action='store_true', help='only the input-pipeline table (seconds, no models)')
    p.add_argument('--threads', type=int, default=None, help="torch threads for this run (None: torch's own)")
    p.add_argument('--seed', type=int, default=0, help='seeds the random backbone and inputs')
    p.add_argument('--json', action='store_true', help='print a JSON list of dicts to stdout instead of the table')
    p.add_argument('--linear-grid', action='store_true', help='instead: a linear-probe grid in one run vs one per cell')
    p.add_argument('--grid-epochs', type=int, default=3, help='epochs of each --linear-grid run')
    args = p.parse_args(argv)
    args.prompts = sorted({int(v) for v in args.prompts.split(',') if v.strip()})
    args.methods = [m.strip() for m in args.methods.split(',') if m.strip()]
    if bad := [m for m in args.methods if m not in methods.METHODS]:
        p.error(f"unknown method(s) {', '.join(bad)}; choose from {', '.join(methods.METHODS)}")
    if args.iters < 1 or args.warmup < 0 or not 1 <= args.init_iters <= args.iters:
        p.error('need --iters >= 1, --warmup >= 0 and 1 <= --init-iters <= --iters')
    if args.loader_images < 0 or (args.loader_only and args.loader_images < 1):
        p.error('--loader-images must be >= 1 with --loader-only (0 turns the loader rows off otherwise)')
    return args


# --- time, FLOPs and memory of one call
def seconds(fn, device=torch.device('cpu')):
    """Wall time of fn(), the work it queued on a CUDA device included."""
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda device: None)
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def count_gflops(fn):
    """GFLOPs of one call of fn, CPU attention counted as on CUDA (autograd on: FlopCounterMode needs it)."""
    sdpa = lambda q, k, v, *a, **kw: 2 * q[0] * q[1] * q[2] * k[-2] * (q[-1] + v[-1])  # noqa: E731, QK^T and AV
    with FlopCounterMode(display=False, custom_mapping={
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: sdpa}) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def peak_memory_mb(fn, device):
    """Peak memory of one call of fn above the level before it, in MB (None where VmHWM cannot be reset)."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    status = lambda key: int(re.search(key + r':\s*(\d+)', Path('/proc/self/status').read_text())[1]) / 1024  # noqa
    if LIBC is not None:
        LIBC.malloc_trim(0)
    try:
        Path('/proc/self/clear_refs').write_text('5')   # VmHWM, the peak RSS, := VmRSS (Linux >= 4.0)
    except OSError:
        return None
    base = status('VmRSS')
    fn()
    return status('VmHWM') - base


# --- the timed calls: step(x, y) with x (B, 3, H, W), y (B,)
def frozen_fwd_bwd(embed, blocks, norm, head, autocast):
    """Forward + backward through frozen blocks with the gradient flowing to the input tokens only."""
    def step(x, y):
        with autocast():
            with torch.no_grad():
                t = embed(x)                                  # (B, 1+N, D)
            t = t.detach().requires_grad_()
            for blk in blocks:
                t = blk(t)
            loss = F.cross_entropy(head(norm(t)[:, 0]), y)   # fixed head on the cls token
        loss.backward()
    return step


def train_step(model, opt, autocast, scaler):
    def step(x, y):
        model.train()
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = model.loss(x, y)
        scaler.scale(loss).backward()   # a disabled scaler (all but fp16) passes loss and step through
        scaler.step(opt)
        scaler.update()
    return step


class CountingImages(torch.utils.data.TensorDataset):
    """Fixed random images with label 0 that count their reads (SPT's random/mean/max init reads only some)."""
    reads = 0

    def __getitem__(self, i):
        self.reads += 1
        return self.tensors[0][i], 0


# --- the rows
def row(arm, role, method=None, options=None, model=None, default=False, **extra):
    """A row of the table and the JSON; model (the one timed) gives the tuned parameters and the prompts."""
    tuned = 0 if model is None else sum(p.numel() for p in model.parameters() if p.requires_grad)
    return dict(arm=arm, role=role, method=method, options=options or {}, prompts=getattr(model, 'num_prompts', None),
                default=default, tuned_params=tuned, gflops=None, fwd_ms=None, train_ms=None, fwd_times_ms=[],
                train_times_ms=[], ratio=None, fwd_ratio=None, target=None, target_value=None, target_bound=None,
                target_pass=None, target_spread=None, target_verdict=None, mem_fwd_mb=None, mem_train_mb=None,
                note='') | extra


# --- ratios, targets and the table
def verdict(lo, hi, bound):
    """Per-round ratios spread over [lo, hi] against an upper bound (target_pass is None when 'unresolved')."""
    return 'pass' if hi <= bound else 'MISS' if lo > bound else 'unresolved'


def spread(a, b, key='train'):
    """a / b: (median, lowest, highest) of the per-round ratios when both ran in the same rounds, else of medians."""
    ta, tb = a[key + '_times_ms'], b[key + '_times_ms']
    rs = [u / v for u, v in zip(ta, tb)] if ta and len(ta) == len(tb) else [a[key + '_ms'] / b[key + '_ms']]
    return statistics.median(rs), min(rs), max(rs)


def summarise(rows, base):
    """Medians, ratios to the backbone (rows[0]), the targets of the module docstring, and the notes."""
    def judge(r, ratios, bound, text):
        value, lo, hi = ratios
        v = verdict(lo, hi, bound)
        r.update(target_value=value, target_bound=bound, target_spread=[lo, hi], target_verdict=v,
                 target_pass={'pass': True, 'MISS': False}.get(v),
                 target=f"{text} {value:.2f} (rounds {lo:.2f}-{hi:.2f}) <= {bound:.2f} {v}")

    epochs = {}
    for r in rows:
        r['fwd_ms'], r['train_ms'] = [statistics.median(t) if t else None
                                      for t in (r['fwd_times_ms'], r['train_times_ms'])]
        if r['role'] == 'epoch':   # after its method's rows
            r['train_ms'] = epochs[r['method']] = r['steps'] * r.pop('of')['train_ms']
    bb, tm, N1 = rows[0], rows[1], base.num_patches + 1
    at = {(r['method'], r['prompts']): r for r in rows if r['role'] in ('method', 'prompts')}
    for r in rows:
        m, P, role = r['method'], r['prompts'], r['role']
        r['ratio'] = spread(r, bb)[0]
        if r['fwd_ms'] is not None:
            r['fwd_ratio'] = spread(r, bb, 'fwd')[0]
        target = methods.METHODS[m].bench.get('target') if m else None
        if role == 'grad-ckpt':   # against its default row, no target
            d = r.pop('of')
            mem = r['mem_train_ratio'] = (r['mem_train_mb'] / d['mem_train_mb']
                                          if r['mem_train_mb'] and d['mem_train_mb'] else None)
            r['time_ratio'] = spread(r, d)[0]
            r['note'] = f"train memory {fmt(mem, '.2f')}x, time {r['time_ratio']:.2f}x of the default"
        elif role == 'backbone':
            judge(r, spread(bb, tm), 1.05, 'ours/timm fwd+bwd')
        elif target and role in ('method', 'prompts', 'variant'):   # methods.Tuner.bench
            against, bound = target
            ref = bb if against == 'backbone' else at.get((against, P))
            if bound == 'tokens':
                bound, against = 1.1 * (N1 + P) / N1, f'backbone, 1.1x({N1}+{P})/{N1}:'
            if ref is not None:
                judge(r, spread(r, ref), bound, f"/{against}" + (f" P={P}" if ref is not bb else ''))
        elif role == 'init':   # against an estimated epoch: one value
            r['note'] = f"{r['images']} images, {r['images_run']} run"
            v = r['train_ms'] / epochs[m]
            judge(r, (v, v, v), methods.METHODS[m].bench['init'][r['strategy']], 'init/epoch')


def fmt(v, spec):
    return '-' if v is None else format(v, spec)


def markdown(rows, meta):
    lines = [f"# bench.py: {meta['arch']} at {meta['img_size']} px, batch {meta['batch_size']}", '',
             f"- command: `{meta['command']}`",
             f"- torch {meta['torch']}, timm {meta['timm']}, threads {meta['threads']}, device {meta['device']}, "
             f"amp {meta['amp']}",
             f"- medians of {meta['iters']} interleaved rounds after {meta['warmup']} warm-up round(s); "
             f"SPT inits: {meta['init_iters']} round(s), {meta['spt_images']} images; {meta['num_classes']} classes; "
             f"seed {meta['seed']}; {meta['seconds']:.0f} s in all",
             '- fwd: eval forward, no_grad. train: zero_grad + loss + backward + optimizer step (backbone, timm: '
             'fwd+bwd, gradient to the input tokens only; init rows: the init; epoch: steps x the median train step); '
             'ratios: medians of the per-round ratios (paired rounds); init / epoch: ratio of the times',
             f"- GFLOPs/img: one eval forward at batch 1 (spt init rows: the token extraction, k-means not counted). "
             f"Peak MB: {meta['memory']}", '',
             '| arm | tuned params | GFLOPs/img | fwd ms | train ms | ÷ backbone fwd+bwd | target '
             '| peak MB fwd / train |', '|---|--:|--:|--:|--:|--:|---|--:|']
    for r in rows:
        arm = r['arm'] + (f" ({r['note']})" if r['note'] else '')
        lines.append(f"| {arm} | {r['tuned_params']:,} | {fmt(r['gflops'], '.3g')} | {fmt(r['fwd_ms'], '.1f')} | "
                     f"{fmt(r['train_ms'], '.1f')} | {fmt(r['ratio'], '.2f')} | {r['target'] or '-'} | "
                     f"{fmt(r['mem_fwd_mb'], '.0f')} / {fmt(r['mem_train_mb'], '.0f')} |")
    by = {v: [r['arm'] for r in rows if r['target_verdict'] == v] for v in ('pass', 'MISS', 'unresolved')}
    arms = lambda v: f" ({'; '.join(by[v])})" if by[v] else ''  # noqa: E731
    lines += ['', f"speed targets: {len(by['pass'])} pass, {len(by['MISS'])} miss{arms('MISS')}, "
              f"{len(by['unresolved'])} unresolved (the per-round ratios straddle the bound: rerun with more --iters "
              f"on a quieter machine){arms('unresolved')}"]
    return '\n'.join(lines)


# --- the input pipeline: images/s of one loader worker (data.py's real transforms) and of the decoded cache
def loader_rows(args, device, log):
    """Per set, with one thread as in a worker: decode + train transform, best of 2 passes. For FGVC also the decoded
    cache in the main process, best of 3 passes of >= 1024 images: host side alone, then with flip + normalisation."""
    def rate_row(arm, role, kb, rate, **extra):
        log(f"loader {arm}: {rate:.0f} images/s")
        return dict(arm=arm, role=role, data=name, **extra, images=len(ds), kb_per_file=kb,
                    images_per_s_per_worker=rate, images_per_s_16_workers=16 * rate if role == 'loader' else None,
                    workers_for_gpu_rate=math.ceil(GPU_RATE / rate))
    rows = []
    torch.set_num_threads(1)   # main() restores the caller's
    with tempfile.TemporaryDirectory() as tmp:
        for label, name, (w, h) in LOADER_SETS:
            rng, paths = np.random.RandomState(args.seed), [f"{tmp}/{name}-{i}.jpg" for i in range(args.loader_images)]
            for path in paths:   # a smooth random field plus sensor-like noise: ~85 KB at 500x375, like a real photo
                low = rng.randint(0, 256, (max(h // 24, 2), max(w // 24, 2), 3)).astype(np.uint8)
                img = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC), dtype=np.float32)
                img = Image.fromarray((img + rng.normal(0, 6, img.shape)).clip(0, 255).astype(np.uint8))
                img.save(path, quality=95)
            ds = data.ImageListDataset(name, 'train', tmp, [(p, 0) for p in paths], 1,
                                       data.build_transform(name, train=True, img_size=args.img_size))
            kb = sum(os.path.getsize(p) for p in paths) / len(ds) / 1024
            sets = [(label, ds)] + [(f"{label}, TFDS records", tfds.TFDSDataset(  # the same files, as TFDS's records
                'dtd', 'test', tfds.write_shard(Path(tmp, name), paths), ds.transform))] * name.startswith('vtab-')
            for arm, d in sets:
                rate = max(len(d) / seconds(lambda: [d[i] for i in range(len(d))]) for _ in range(2))
                rows.append(rate_row(arm, 'loader', kb, rate, width=w, height=h))
            if name == 'cub':
                cache = decoded_cache.DecodedCache(ds, train=True, img_size=args.img_size)
                loader = data.build_loader(cache, args.batch_size, train=True, workers=0)
                epochs = math.ceil(1024 / len(ds))
                for finish, what in ((False, 'host side'), (True, f"host + flip/normalise on {device.type}")):
                    def passes():
                        for x, _ in itertools.chain.from_iterable(loader for _ in range(epochs)):
                            if finish:
                                cache.finish(x[0].to(device), x[1].to(device))
                    rate = max(epochs * len(ds) / seconds(passes, device) for _ in range(3))
                    kb = cache.nbytes / len(ds) / 1024   # the cached uint8 bytes
                    rows.append(rate_row(f"{label}, decoded cache, {what}", 'loader-cache', kb, rate))
    return rows


def loader_markdown(rows):
    lines = [f"Input pipeline at {GPU_RATE:,} images/s (one current GPU, VPT-deep ViT-B/16, bf16): one worker = "
             "decode + data.py's train transform in one process with one thread; the decoded cache rows run in the "
             "main process (no workers), and their KB are the cached uint8 bytes per image.", '',
             '| images | KB per image | images/s per worker | x 16 workers | workers for 2,500 images/s |',
             '|---|--:|--:|--:|--:|']
    lines += [f"| {r['arm']} | {r['kb_per_file']:.0f} | {r['images_per_s_per_worker']:,.0f} | "
              f"{fmt(r['images_per_s_16_workers'], ',.0f')} | {r['workers_for_gpu_rate']} |" for r in rows]
    return '\n'.join(lines)


# --- the linear-probe grid
def linear_grid(args):
    """The linear-probe grid in one train.py run (features cached) vs one run per cell: 8 digits cells, in-process."""
    lrs, wds = ['0.5', '0.2', '0.1', '0.05'], ['0.0', '0.001']
    common = ['--method', next(m for m, c in methods.METHODS.items() if c.grid_in_one_pass), '--data', 'digits',
              '--arch', 'vit_micro_patch8', '--pretrain', 'none', '--img-size', '16', '--epochs', str(args.grid_epochs),
              '--batch-size', '32', '--warmup-epochs', '0', '--workers', '0', '--log-interval', '0']
    runs = {'grid': [['--lr', ','.join(lrs), '--wd', ','.join(wds)]],
            'separate': [['--lr', lr, '--wd', wd] for lr in lrs for wd in wds]}
    times = {'grid': [], 'separate': []}
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        for i in range(args.warmup + args.iters):
            for arm in ('grid', 'separate') if i % 2 == 0 else ('separate', 'grid'):
                t = seconds(lambda: [train.main(common + cell + ['--out', f'{tmp}/{i}-{arm}-{j}'])
                                     for j, cell in enumerate(runs[arm])])
                if i >= args.warmup:
                    times[arm].append(t)
    cells = len(runs['separate'])
    row = dict(arm=f'linear grid, {cells} cells (digits, vit_micro_patch8, {args.grid_epochs} epochs)',
               grid_s=statistics.median(times['grid']), separate_s=statistics.median(times['separate']),
               ratio=statistics.median(s / g for s, g in zip(times['separate'], times['grid'])),
               forwards_separate=cells * args.grid_epochs * (800 + 200), forwards_grid=800 + 200)
    print(json.dumps([row], indent=1) if args.json else
          '| arm | one pass s | one run per cell s | separate / one pass | backbone forwards, separate / one pass |\n'
          f"|---|--:|--:|--:|--:|\n| {row['arm']} | {row['grid_s']:.2f} | {row['separate_s']:.2f} | "
          f"{row['ratio']:.2f} | {row['forwards_separate']:,} / {row['forwards_grid']:,} |")
    return [row]


# --- main
def main(argv=None):
    args = parse_args(argv)
    if args.linear_grid:
        return linear_grid(args)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(args.threads or threads)
        return run(args, ' '.join(['python', 'bench.py', *(sys.argv[1:] if argv is None else argv)]))
    finally:
        torch.set_num_threads(threads)   # an in-process caller (the tests) keeps its own setting


def build_rows(args, base, device, autocast, scaler):
    """The rows, their GFLOPs counted, and their timed phases [(row, 'fwd' or 'train', step(x, y))]."""
    rows, phases, x1 = [], [], torch.randn(1, 3, args.img_size, args.img_size, device=device)  # FLOPs: at batch 1

    def add(r, forward=None, step=None, flops=None):
        """forward(x) makes the fwd phase (eval, no_grad) and is what the FLOPs count, unless flops() is given."""
        def fwd(x, y):
            with torch.no_grad(), autocast():
                forward(x)
        rows.append(r)
        phases.extend([(r, 'fwd', fwd)] * (forward is not None) + [(r, 'train', step)] * (step is not None))
        if forward or flops:
            r['gflops'] = count_gflops(flops or (lambda: forward(x1)))
        return r

    # the frozen backbone, ours and timm's with the same config and weights
    head = torch.nn.Linear(base.embed_dim, args.num_classes).to(device).requires_grad_(False)
    tm = timm.models.vision_transformer.VisionTransformer(
        img_size=base.img_size, patch_size=base.patch_size, embed_dim=base.embed_dim, depth=len(base.blocks),
        num_heads=base.num_heads, mlp_ratio=base.blocks[0].mlp.fc1.out_features / base.embed_dim, num_classes=0)
    tm.load_state_dict(base.state_dict(), strict=True)
    bb, tm = copy.deepcopy(base).to(device).eval().requires_grad_(False), tm.to(device).eval().requires_grad_(False)
    timm_embed = lambda x: tm.norm_pre(tm.patch_drop(tm._pos_embed(tm.patch_embed(x))))  # noqa: E731
    for arm, role, m, embed in (('backbone (ours)', 'backbone', bb, bb.embed), ('timm ViT', 'timm', tm, timm_embed)):
        add(row(arm, role), m.forward_features, frozen_fwd_bwd(embed, m.blocks, m.norm, head, autocast))

    def add_method(arm, role, method, options=None, default=False, grad_checkpointing=False):
        model = methods.build_model(method, copy.deepcopy(base), args.num_classes, **(options or {}))
        model = model.set_grad_checkpointing(grad_checkpointing).to(device)
        opt = train.make_optimizer(model, dict(methods.METHODS[method].recipe, momentum=train.MOMENTUM))
        return add(row(arm, role, method, options, model, default), lambda x: model.eval()(x),
                   train_step(model, opt, autocast, scaler)), model

    defaults = {}   # method -> (its arm without ' (default)', its default row)
    for m in args.methods:
        cls, name = methods.METHODS[m], m
        r, model = add_method(m, 'method', m, default=True)
        if m in methods.PROMPTED:
            name = r['arm'] = f"{m} P={r['prompts']}"
            r['arm'] += ' (default)'
            compared = {methods.init_options(methods.METHODS[o])['prompts'] for o in args.methods  # a target's P
                        if methods.METHODS[o].bench.get('target', ('',))[0] == m}
            for P in sorted((set(args.prompts) | compared) - {r['prompts']}):
                add_method(f"{m} P={P}", 'prompts', m, {'prompts': P})
        for label, options in cls.bench.get('variants', {}).items():   # e.g. without dropout: its share of the time
            if set(options) <= set(methods.init_options(cls)):   # (a subclass may have dropped the option)
                add_method(f"{name} {label}", 'variant', m, options)
        defaults[m] = (name, r)
    for m, (name, d) in defaults.items():
        if not methods.METHODS[m].grid_in_one_pass:   # linear runs its blocks under no_grad: nothing to checkpoint
            add_method(f"{name} grad checkpointing", 'grad-ckpt', m, grad_checkpointing=True)[0]['of'] = d

    for m in [m for m in args.methods if 'init' in methods.METHODS[m].bench]:   # a prompt init from the data (SPT)
        g = torch.Generator().manual_seed(args.seed)
        imgs = CountingImages(torch.randn(args.spt_images, 3, args.img_size, args.img_size, generator=g))
        loader = torch.utils.data.DataLoader(imgs, batch_size=args.batch_size, shuffle=False)  # as train.py's
        model = methods.build_model(m, copy.deepcopy(base), args.num_classes).to(device)
        for s in methods.METHODS[m].bench['init']:
            r = row(f"{m} init {s}", 'init', m, {}, model, images=args.spt_images, strategy=s)
            def init(x, y, s=s, r=r, model=model):   # bound now, as the loop goes on
                imgs.reads = 0
                with autocast():
                    model.init_prompts(loader, strategy=s, generator=torch.Generator().manual_seed(0))
                r['images_run'] = imgs.reads
            add(r, step=init, flops=getattr(model, 'layer_tokens', None) and (lambda: model.layer_tokens(x1)))
        d, steps = defaults[m][1], math.ceil(args.spt_images / args.batch_size)
        add(row(f'{m} epoch (estimated)', 'epoch', m, {}, model, gflops=d['gflops'], steps=steps, of=d,
                note=f"{steps} steps x median {m} train step"))
    return rows, phases


def measure(args, phases, x, y, device, log):
    """Times of each phase, round-robin from a rotating start (SPT inits: the last rounds), then its peak memory."""
    n = args.warmup + args.iters
    for it in range(n):
        t_round, shift = time.perf_counter(), it % len(phases)
        for r, key, fn in phases[shift:] + phases[:shift]:
            if r['role'] == 'init' and it < n - args.init_iters:
                continue
            t = seconds(lambda: fn(x, y), device)
            if it >= args.warmup:
                r[key + '_times_ms'].append(t * 1e3)
        log(f"round {it + 1}/{n}{' (warm-up)' if it < args.warmup else ''}: {time.perf_counter() - t_round:.1f} s")
    set_malloc = lambda mmap, trim: device.type == 'cpu' and LIBC and LIBC.mallopt(-3, mmap) and LIBC.mallopt(-1, trim)
    set_malloc(64 << 10, 128 << 10)   # low glibc mmap and trim thresholds meanwhile: freed tensors leave the RSS
    for r, key, fn in phases:
        r[f"mem_{key}_mb"] = peak_memory_mb(lambda: fn(x, y), device)
    set_malloc(32 << 20, 64 << 20)
    return ('CUDA max_memory_allocated above the allocation before the call' if device.type == 'cuda' else
            'peak RSS above the RSS before the call (VmHWM, reset before it; glibc mmap threshold 64 KiB, so freed '
            'tensors leave the RSS; existing weights and optimizer state not counted)')


def run(args, command):
    t_start, threads = time.perf_counter(), torch.get_num_threads()
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    device = runs.resolve_device(args.device)
    if args.loader_only:
        loader = loader_rows(args, device, log)
        print(json.dumps(loader, indent=1) if args.json else loader_markdown(loader))
        return loader
    torch.manual_seed(args.seed)
    dtype = train.amp_dtype(args.amp, device)
    amp = {None: 'none', torch.bfloat16: 'bf16', torch.float16: 'fp16'}[dtype]
    autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)  # noqa: E731
    scaler = torch.amp.GradScaler(device.type, enabled=amp == 'fp16')
    base = models.create_backbone(args.arch, 'none', img_size=args.img_size)
    rows, phases = build_rows(args, base, device, autocast, scaler)
    log(f"{len(rows)} rows built, FLOPs counted; {len(phases)} phases, {args.warmup} warm-up + {args.iters} rounds")
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    y = torch.randint(args.num_classes, (args.batch_size,), device=device)
    memory = measure(args, phases, x, y, device, log)   # what the memory column measures
    summarise(rows, base)
    loader = loader_rows(args, device, log) if args.loader_images > 0 else []
    meta = dict(arm='meta', command=command, torch=torch.__version__, timm=timm.__version__, threads=threads,
                device=str(device), amp=amp, arch=args.arch, img_size=args.img_size, batch_size=args.batch_size,
                iters=args.iters, warmup=args.warmup, init_iters=args.init_iters, spt_images=args.spt_images,
                num_classes=args.num_classes, seed=args.seed, memory=memory, seconds=time.perf_counter() - t_start)
    results = [meta, *rows, *loader]
    tables = [markdown(rows, meta)] + ([loader_markdown(loader)] if loader else [])
    print(json.dumps(results, indent=1) if args.json else '\n\n'.join(tables))
    return results


if __name__ == '__main__':
    runs.cli(main)
