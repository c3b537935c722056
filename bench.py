"""
Speed, memory and FLOPs of every method side by side, as the ratios of SPEC §7, in one process.

    python bench.py                                   # ViT-B/16, 224 px, batch 8, CPU (takes a while)
    python bench.py --arch vit_tiny_patch16_224 --iters 5
    python bench.py --methods vpt,lspt --prompts 50,100 --json > bench.json

Every timed call ("phase") of every row runs once per round, round-robin (the starting phase rotates
each round), so machine noise hits all rows alike; the first --warmup rounds are dropped and the
median of the other --iters rounds is reported. Ratios are medians of the per-round ratios (a
round that something else on the machine slowed down then cancels). The rows:

  backbone (ours) / timm ViT   fwd: forward_features under no_grad. fwd+bwd: the floor every prompt
                               method pays: embedding (no grad), then blocks + norm on tokens that
                               require grad, a cross-entropy from the cls token through a fixed
                               linear head, backward. All weights frozen: the gradient reaches the
                               input tokens only. timm's VisionTransformer has the same config and
                               our weights (timm's patch_embed / _pos_embed, then its blocks / norm).
  each method                  fwd: eval, no_grad, model(x). train: zero_grad, model.loss(x, y),
                               backward, optimizer step with the method's optimizer (SGD momentum
                               for linear/full/vpt/lspt, AdamW for spt/sa2vp).
  vpt / spt / lspt at P        the same, at each --prompts P (deep); lspt also without prompt
                               dropout (its input-side gate projection is then batch-independent).
  spt init <strategy>          SPT.init_prompts with a DataLoader (batches of --batch-size) over
                               --spt-images fixed random images; timed in the last --init-iters
                               rounds only (no warm-up of its own: the backbone forward is already
                               warm). random/mean/max read only the images their drawn (image,
                               token) pairs fall in (at most P x depth); the row says how many. With
                               few images that is nearly all of them, so their init/epoch ratio
                               here is an upper bound of the one on a real training set.
  spt epoch (estimated)        ceil(spt_images / batch) x the median SPT train step of this run.

FLOPs: torch.utils.flop_counter.FlopCounterMode over one eval forward at batch 1 (prompt tokens
included; matmuls, convolutions and attention; CPU attention is counted with the same formula
as the CUDA kernels, which FlopCounterMode lacks for CPU). Peak memory, in one extra pass after
timing: on CUDA max_memory_allocated above memory_allocated before the call (stats reset per call);
on CPU the peak resident set size above the RSS before the call, sampled every ~1 ms from
/proc/self/statm in a thread, with glibc's mmap threshold fixed at 64 KiB for that pass so that
freed tensors leave the RSS (weights and optimizer state that already exist are not counted;
activations, gradients and temporaries are).

--json prints the results to stdout as a JSON list of dicts instead of the Markdown table: the
first dict is the run's metadata (arm == 'meta'), then one per row. main(argv) returns the same
list. Progress goes to stderr. The backbone is random (models.create_backbone(arch, 'none')):
speed does not depend on the weights. Every row gets its own deep copy of one backbone.
Style: karpathy/nanoGPT bench.py (one flat script, plain argparse).
"""

import argparse
import contextlib
import copy
import ctypes
import inspect
import json
import math
import os
import statistics
import sys
import threading
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import methods
import models

METHODS = ('linear', 'full', 'vpt', 'spt', 'lspt', 'sa2vp')
PROMPTED = ('vpt', 'spt', 'lspt')                   # the methods also run at every --prompts P
SPT_STRATEGIES = ('random', 'mean', 'max', 'kmeans')
# optimizer per method (SPEC §4 defaults; the values do not change the speed)
OPTIM = {
    'linear': ('sgd', dict(lr=0.25, momentum=0.9, weight_decay=1e-3)),
    'full': ('sgd', dict(lr=0.25, momentum=0.9, weight_decay=1e-3)),
    'vpt': ('sgd', dict(lr=0.25, momentum=0.9, weight_decay=1e-3)),
    'lspt': ('sgd', dict(lr=0.1, momentum=0.9, weight_decay=0.0)),
    'spt': ('adamw', dict(lr=1e-3, weight_decay=1e-2)),
    'sa2vp': ('adamw', dict(lr=1e-3, weight_decay=1e-4)),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--arch', default='vit_base_patch16_224', choices=list(models.ARCHS))
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--num-classes', type=int, default=200, help='head size (200 = CUB)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--amp', default='none', choices=['none', 'bf16', 'fp16'])
    p.add_argument('--iters', type=int, default=3, help='timed rounds (each runs every phase once)')
    p.add_argument('--warmup', type=int, default=1, help='rounds run first and dropped')
    p.add_argument('--init-iters', type=int, default=1, help='timed rounds of the SPT inits (the last ones)')
    p.add_argument('--spt-images', type=int, default=64, help='images the SPT init and epoch run over')
    p.add_argument('--prompts', default='10,50,100,200', help='P values for vpt/spt/lspt (comma-separated)')
    p.add_argument('--methods', default=','.join(METHODS), help='comma-separated subset of ' + ','.join(METHODS))
    p.add_argument('--threads', type=int, default=None, help="torch threads for this run (default: torch's own)")
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--json', action='store_true', help='print a JSON list of dicts to stdout instead of the table')
    p.add_argument('--linear-grid', action='store_true', help="instead: the linear-probe grid in one pass vs one run "
                   "per cell (8 cells on digits, vit_micro_patch8, --iters rounds); see linear_grid()")
    p.add_argument('--grid-epochs', type=int, default=3, help='epochs of each --linear-grid run (default: 3)')
    args = p.parse_args(argv)
    args.prompts = sorted({int(v) for v in args.prompts.split(',') if v.strip()})
    args.methods = [m.strip() for m in args.methods.split(',') if m.strip()]
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        p.error(f"unknown method(s) {', '.join(bad)}; choose from {', '.join(METHODS)}")
    if args.iters < 1 or args.warmup < 0 or not 1 <= args.init_iters <= args.iters:
        p.error('need --iters >= 1, --warmup >= 0 and 1 <= --init-iters <= --iters')
    return args


# -----------------------------------------------------------------------------
# FLOPs and memory


def _cpu_sdpa_flop(q, k, v, *args, out_shape=None, **kwargs):
    """(B, H, Sq, d) x (B, H, Sk, d): QK^T and AV, 2 FLOPs per multiply-add (the CUDA formula)."""
    b, h, sq, d = q
    return 2 * b * h * sq * k[-2] * d + 2 * b * h * sq * k[-2] * v[-1]


def count_gflops(fn):
    """GFLOPs of one call of fn counted by FlopCounterMode (with autograd on: its module tracker
    fails under no_grad on a parameter that requires grad; no backward is run)."""
    from torch.utils.flop_counter import FlopCounterMode
    extra = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop}
    with FlopCounterMode(display=False, custom_mapping=extra) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def _rss_bytes():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def _set_malloc(measuring):
    """glibc's mmap threshold adapts upwards (to at most 32 MiB) and then keeps freed tensors in the
    heap, where they stay in the RSS. For the memory pass fix it at 64 KiB, so memory freed by torch
    leaves the RSS; afterwards fix it at the adapted state (32 MiB, trim threshold 64 MiB), as an
    in-process caller would otherwise keep paying a page fault per large allocation. Returns success."""
    try:
        libc = ctypes.CDLL('libc.so.6')
        libc.malloc_trim(0)
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        mmap, trim = (1 << 16, 1 << 17) if measuring else (32 << 20, 64 << 20)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, mmap)) and bool(libc.mallopt(M_TRIM_THRESHOLD, trim))
    except (OSError, AttributeError):
        return False


def peak_memory_mb(fn, device):
    """Peak memory of one call of fn above the level before it, in MB (see the module docstring)."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    if not os.path.exists('/proc/self/statm'):
        return None
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    base = _rss_bytes()
    peak, stop = [base], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        fn()
    finally:
        stop.set()
        t.join()
    return (max(peak[0], _rss_bytes()) - base) / 2**20


# -----------------------------------------------------------------------------
# the timed calls


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


def frozen_fwd(forward_features, autocast):
    def step(x, y):
        with torch.no_grad(), autocast():
            forward_features(x)
    return step


def make_optimizer(method, model):
    kind, kw = OPTIM[method]
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, **kw) if kind == 'sgd' else torch.optim.AdamW(params, **kw)


def method_train(model, opt, autocast, scaler):
    def step(x, y):
        model.train()
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = model.loss(x, y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    return step


def method_fwd(model, autocast):
    def step(x, y):
        model.eval()
        with torch.no_grad(), autocast():
            model(x)
    return step


class CountingImages(torch.utils.data.Dataset):
    """Fixed random images with label 0 that count how many times they are read (SPT's
    random/mean/max init reads only the images its drawn (image, token) pairs fall in)."""

    def __init__(self, images):
        self.images, self.reads = images, 0

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        self.reads += 1
        return self.images[i], 0


def spt_init(model, loader, strategy, autocast, r):
    def step(x, y):
        loader.dataset.reads = 0
        with autocast():
            model.init_prompts(loader, strategy=strategy, generator=torch.Generator().manual_seed(0))
        r['images_run'] = loader.dataset.reads
    return step


def tuned_params(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def timm_twin(bb):
    """timm's VisionTransformer with the same config, no head, loaded with bb's weights."""
    from timm.models.vision_transformer import VisionTransformer as TimmViT
    m = TimmViT(img_size=bb.img_size, patch_size=bb.patch_size, embed_dim=bb.embed_dim, depth=len(bb.blocks),
                num_heads=bb.num_heads, mlp_ratio=bb.blocks[0].mlp.fc1.out_features / bb.embed_dim, num_classes=0)
    m.load_state_dict(bb.state_dict(), strict=True)
    return m


# -----------------------------------------------------------------------------
# the rows


def row(arm, role, method=None, options=None, prompts=None, default=False):
    return dict(arm=arm, role=role, method=method, options=options or {}, prompts=prompts, default=default,
                tuned_params=0, gflops=None, fwd_ms=None, train_ms=None, fwd_times_ms=[], train_times_ms=[],
                ratio=None, fwd_ratio=None, target=None, target_value=None, target_bound=None, target_pass=None,
                mem_fwd_mb=None, mem_train_mb=None, note='')


def build_rows(args, base, device, autocast, scaler):
    """All rows and their timed phases [(row, key, fn, init_only)], plus a FLOP-count call per row."""
    rows, phases, flop_fns = [], [], {}
    C, D = args.num_classes, base.embed_dim
    x1 = torch.randn(1, 3, args.img_size, args.img_size, device=device)

    def add(r, fwd=None, train=None, flops=None, init=None):
        rows.append(r)
        if fwd is not None:
            phases.append((r, 'fwd', fwd, False))
        if train is not None:
            phases.append((r, 'train', train, False))
        if init is not None:
            phases.append((r, 'train', init, True))
        flop_fns[id(r)] = flops

    # the frozen backbone, ours and timm's, on the same weights
    head = nn.Linear(D, C).to(device).requires_grad_(False)
    bb = copy.deepcopy(base).to(device).eval().requires_grad_(False)
    add(row('backbone (ours)', 'backbone'), frozen_fwd(bb.forward_features, autocast),
        frozen_fwd_bwd(bb.embed, bb.blocks, bb.norm, head, autocast), lambda: bb.forward_features(x1))
    tm = timm_twin(base).to(device).eval().requires_grad_(False)
    timm_embed = lambda x: tm.norm_pre(tm.patch_drop(tm._pos_embed(tm.patch_embed(x))))  # noqa: E731
    add(row('timm ViT', 'timm'), frozen_fwd(tm.forward_features, autocast),
        frozen_fwd_bwd(timm_embed, tm.blocks, tm.norm, head, autocast), lambda: tm.forward_features(x1))

    def add_method(name, role, method, options, prompts=None, default=False):
        model = methods.build_model(method, copy.deepcopy(base), C, **options).to(device)
        if prompts is None and hasattr(model, 'num_prompts'):
            prompts = model.num_prompts
        r = row(name, role, method, options, prompts, default)
        r['tuned_params'] = tuned_params(model)
        model.eval()
        add(r, method_fwd(model, autocast), method_train(model, make_optimizer(method, model), autocast, scaler),
            lambda: model.eval()(x1))
        return r, model

    defaults = {}
    for m in args.methods:
        label = {'vpt': 'vpt-deep', 'spt': 'spt-deep'}.get(m, m)
        r, model = add_method(m, 'method', m, {}, default=True)
        defaults[m] = r
        if m in PROMPTED:
            r['arm'] = f"{label} P={model.num_prompts} (default)"
            ps = set(args.prompts)
            if m == 'vpt' and 'lspt' in args.methods:
                ps.add(inspect.signature(methods.LSPT).parameters['prompts'].default)  # LSPT's reference
            for P in sorted(ps - {model.num_prompts}):
                add_method(f"{label} P={P}", 'prompts', m, {'prompts': P}, prompts=P)
        if m == 'lspt':
            add_method(f"lspt P={model.num_prompts} dropout 0", 'lspt-nodrop', 'lspt', {'prompt_dropout': 0.0})
        if m == 'sa2vp':
            r['arm'] = f"sa2vp t={model.ppt.shape[-1]}"
            # the official dropout 0.1 in the frozen backbone is RNG-bound on the CPU: show its share
            add_method(f"sa2vp t={model.ppt.shape[-1]} no dropout", 'sa2vp-nodrop', 'sa2vp', {'sa2vp_dropout': False})

    if 'spt' in args.methods:
        g = torch.Generator().manual_seed(args.seed)
        imgs = CountingImages(torch.randn(args.spt_images, 3, args.img_size, args.img_size, generator=g))
        loader = torch.utils.data.DataLoader(imgs, batch_size=args.batch_size, shuffle=False)  # as train.py's
        spt = methods.build_model('spt', copy.deepcopy(base), C).to(device)
        for s in SPT_STRATEGIES:
            r = row(f"spt init {s}", 'spt-init', 'spt', {'spt_init': s}, spt.num_prompts)
            r['tuned_params'], r['images'] = tuned_params(spt), args.spt_images
            add(r, flops=lambda: spt.layer_tokens(x1), init=spt_init(spt, loader, s, autocast, r))
        steps = math.ceil(args.spt_images / args.batch_size)
        r = row('spt epoch (estimated)', 'spt-epoch', 'spt', {}, spt.num_prompts)
        r['tuned_params'] = tuned_params(spt)
        r['note'] = f"{steps} steps x median spt train step"
        r['steps'] = steps
        add(r, flops=flop_fns[id(defaults['spt'])])
    return rows, phases, flop_fns


# -----------------------------------------------------------------------------
# measuring and summarising


def time_rounds(phases, args, x, y, device, log):
    """Round-robin over the phases; returns nothing, fills row[key + '_times_ms']."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == 'cuda' else (lambda: None)
    n = args.warmup + args.iters
    for it in range(n):
        t_round = time.perf_counter()
        shift = it % len(phases)
        for r, key, fn, init_only in phases[shift:] + phases[:shift]:
            if init_only and it < n - args.init_iters:
                continue
            sync()
            t0 = time.perf_counter()
            fn(x, y)
            sync()
            if it >= args.warmup:
                r[key + '_times_ms'].append((time.perf_counter() - t0) * 1e3)
        log(f"round {it + 1}/{n}{' (warm-up)' if it < args.warmup else ''}: {time.perf_counter() - t_round:.1f} s")


def summarise(rows, args, base):
    """Medians, ratios and the SPEC §7 targets."""
    med = lambda v: statistics.median(v) if v else None  # noqa: E731
    for r in rows:
        r['fwd_ms'], r['train_ms'] = med(r['fwd_times_ms']), med(r['train_times_ms'])
    by_role = lambda role: [r for r in rows if r['role'] == role]  # noqa: E731
    bb, tm = by_role('backbone')[0], by_role('timm')[0]
    spt = next((r for r in rows if r['method'] == 'spt' and r['default'] and r['role'] == 'method'), None)
    for r in by_role('spt-epoch'):
        r['train_ms'] = r['steps'] * spt['train_ms']
    vpt_at = {r['prompts']: r for r in rows if r['method'] == 'vpt' and r['role'] in ('method', 'prompts')}
    N1 = base.num_patches + 1

    def ratio(a, b, ka='train', kb='train'):
        """a / b: the median of the per-round ratios when both ran in the same rounds (paired, so a
        round slowed down by something else on the machine cancels), else the ratio of the medians."""
        ta, tb = a[ka + '_times_ms'], b[kb + '_times_ms']
        if ta and len(ta) == len(tb):
            return statistics.median(u / v for u, v in zip(ta, tb))
        return a[ka + '_ms'] / b[kb + '_ms']

    def target(r, value, bound, text):
        r['target_value'], r['target_bound'] = value, bound
        r['target_pass'] = value <= bound
        r['target'] = f"{text} {value:.2f} <= {bound:.2f} {'pass' if value <= bound else 'MISS'}"

    epoch = next((r['train_ms'] for r in by_role('spt-epoch')), None)
    for r in by_role('spt-init'):
        r['note'] = f"{r['images']} images, {r['images_run']} run"
    for r in rows:
        r['ratio'] = ratio(r, bb)
        if r['fwd_ms'] is not None:
            r['fwd_ratio'] = ratio(r, bb, 'fwd', 'fwd')
        if r['role'] == 'backbone':
            target(r, ratio(bb, tm), 1.05, 'ours/timm fwd+bwd')
        elif r['method'] in ('vpt', 'spt') and r['role'] in ('method', 'prompts'):
            P = r['prompts']
            target(r, r['ratio'], 1.1 * (N1 + P) / N1, f'/backbone, 1.1x({N1}+{P})/{N1}:')
        elif r['method'] == 'lspt' and r['prompts'] in vpt_at:
            target(r, ratio(r, vpt_at[r['prompts']]), 1.3, f"/vpt-deep P={r['prompts']}")
        elif r['method'] == 'sa2vp':
            target(r, r['ratio'], 2.4, '/backbone')
        elif r['role'] == 'spt-init':
            target(r, r['train_ms'] / epoch, 1.0 if r['options']['spt_init'] == 'kmeans' else 0.25, 'init/epoch')
    return rows


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
             '- fwd: eval forward, no_grad. train: zero_grad + loss + backward + optimizer step; for the backbone and '
             'timm rows: fwd+bwd with the gradient to the input tokens only; for spt init rows: the init; the spt '
             'epoch is estimated as steps x the median spt train step of this run',
             '- ratios: medians of the per-round ratios (paired rounds); spt init / epoch: ratio of the times',
             f"- GFLOPs/img: one eval forward at batch 1 (spt init rows: the token extraction, k-means not counted). "
             f"Peak MB: {meta['memory']}", '',
             '| arm | tuned params | GFLOPs/img | fwd ms | train ms | ÷ backbone fwd+bwd | target (SPEC §7) '
             '| peak MB fwd / train |',
             '|---|--:|--:|--:|--:|--:|---|--:|']
    for r in rows:
        mem = f"{fmt(r['mem_fwd_mb'], '.0f')} / {fmt(r['mem_train_mb'], '.0f')}"
        arm = r['arm'] + (f" ({r['note']})" if r['note'] else '')
        lines.append(f"| {arm} | {r['tuned_params']:,} | {fmt(r['gflops'], '.3g')} | {fmt(r['fwd_ms'], '.1f')} | "
                     f"{fmt(r['train_ms'], '.1f')} | {fmt(r['ratio'], '.2f')} | {r['target'] or '-'} | {mem} |")
    judged = [r for r in rows if r['target_pass'] is not None]
    missed = [r['arm'] for r in judged if not r['target_pass']]
    lines += ['', f"SPEC §7 targets: {len(judged) - len(missed)} pass, {len(missed)} miss"
              + (f" ({'; '.join(missed)})" if missed else '')]
    return '\n'.join(lines)


def linear_grid(args):
    """The linear-probe grid trained in one pass (train.py with comma lists of --lr / --wd: one backbone forward per
    image, features cached, since digits has no augmentation) vs one train.py run per cell, 8 cells (lr 4 x wd 2),
    digits, a random vit_micro_patch8 at 16 px, --grid-epochs epochs, in-process train.main calls. Each round runs
    both arms (the order alternates); the ratio is the median of the per-round ratios. Also the backbone forwards
    each arm needs, counted: per cell epochs x (800 train + 200 val) for separate runs, 800 + 200 once for the grid."""
    import io
    import tempfile

    import train
    lrs, wds = [0.5, 0.2, 0.1, 0.05], [0.0, 0.001]
    common = ['--method', 'linear', '--arch', 'vit_micro_patch8', '--pretrain', 'none', '--data', 'digits',
              '--img-size', '16', '--epochs', str(args.grid_epochs), '--batch-size', '32', '--warmup-epochs', '0',
              '--workers', '0', '--log-interval', '0']
    times = {'grid': [], 'separate': []}
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        for r in range(args.warmup + args.iters):
            arms = ['grid', 'separate'] if r % 2 == 0 else ['separate', 'grid']
            for arm in arms:
                t0 = time.perf_counter()
                if arm == 'grid':
                    train.main(common + ['--lr', ','.join(map(str, lrs)), '--wd', ','.join(map(str, wds)),
                                         '--out', os.path.join(tmp, f'{r}-grid')])
                else:
                    for lr in lrs:
                        for wd in wds:
                            train.main(common + ['--lr', str(lr), '--wd', str(wd),
                                                 '--out', os.path.join(tmp, f'{r}-lr{lr}-wd{wd}')])
                if r >= args.warmup:
                    times[arm].append(time.perf_counter() - t0)
    ratio = statistics.median(s / g for s, g in zip(times['separate'], times['grid']))
    cells = len(lrs) * len(wds)
    row = dict(arm=f'linear grid, {cells} cells (digits, vit_micro_patch8, {args.grid_epochs} epochs)',
               grid_s=statistics.median(times['grid']), separate_s=statistics.median(times['separate']), ratio=ratio,
               forwards_separate=cells * args.grid_epochs * (800 + 200), forwards_grid=800 + 200)
    if args.json:
        print(json.dumps([row], indent=1))
    else:
        print('| arm | one pass s | one run per cell s | separate / one pass '
              '| backbone forwards, separate / one pass |\n|---|--:|--:|--:|--:|\n'
              f"| {row['arm']} | {row['grid_s']:.2f} | {row['separate_s']:.2f} | {ratio:.2f} | "
              f"{row['forwards_separate']:,} / {row['forwards_grid']:,} |")
    return [row]


def main(argv=None):
    args = parse_args(argv)
    if args.linear_grid:
        return linear_grid(args)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run(args, argv)
    finally:
        torch.set_num_threads(threads)  # an in-process caller (the tests) keeps its own setting


def run(args, argv):
    t_start = time.perf_counter()
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    amp_dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(args.amp)
    autocast = ((lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype is not None
                else contextlib.nullcontext)
    scaler = torch.amp.GradScaler(device.type) if args.amp == 'fp16' else None

    base = models.create_backbone(args.arch, 'none', img_size=args.img_size)
    rows, phases, flop_fns = build_rows(args, base, device, autocast, scaler)
    log(f"{len(rows)} rows built; counting FLOPs")
    for r in rows:
        fn = flop_fns[id(r)]
        r['gflops'] = count_gflops(fn) if fn is not None else None
    log(f"{len(phases)} timed phases; {args.warmup} warm-up + {args.iters} rounds")
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    y = torch.randint(args.num_classes, (args.batch_size,), device=device)
    time_rounds(phases, args, x, y, device, log)

    # peak memory: one more call of every phase, after timing (the allocator tweak would slow timing down)
    if device.type == 'cuda':
        memory = 'CUDA max_memory_allocated above the allocation before the call'
    elif _set_malloc(measuring=True):
        memory = ('peak RSS above the RSS before the call (/proc/self/statm every ~1 ms; glibc mmap threshold '
                  '64 KiB, so freed tensors leave the RSS; existing weights and optimizer state not counted)')
    else:
        memory = 'peak RSS above the RSS before the call (/proc/self/statm; freed memory may stay in the heap)'
    for r, key, fn, _ in phases:
        r[f"mem_{key}_mb"] = peak_memory_mb(lambda: fn(x, y), device)
    if device.type != 'cuda':
        _set_malloc(measuring=False)
    log('memory pass done')

    summarise(rows, args, base)
    meta = dict(arm='meta', command=' '.join(['python', 'bench.py', *(sys.argv[1:] if argv is None else argv)]),
                torch=torch.__version__, timm=__import__('timm').__version__, threads=torch.get_num_threads(),
                device=str(device), amp=args.amp, arch=args.arch, img_size=args.img_size, batch_size=args.batch_size,
                iters=args.iters, warmup=args.warmup, init_iters=args.init_iters, spt_images=args.spt_images,
                num_classes=args.num_classes, seed=args.seed, memory=memory,
                seconds=time.perf_counter() - t_start)
    results = [meta, *rows]
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print(markdown(rows, meta))
    return results


if __name__ == '__main__':
    main()
