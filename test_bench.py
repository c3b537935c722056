"""Tests of bench.py: structure of the results on a tiny config, run in-process. No timing thresholds."""
import contextlib
import io
import json
import math

import pytest
import torch

import bench
import runs
import methods
import models

ARCH, IMG, C = 'vit_nano_patch8', 48, 200   # 36 patches: enough for SPT's mean/max windows at P=20
ARGS = ['--arch', ARCH, '--img-size', str(IMG), '--batch-size', '2', '--iters', '2', '--warmup', '1',
        '--spt-images', '8', '--prompts', '2,4', '--num-classes', str(C), '--device', 'cpu',
        '--threads', '1', '--loader-images', '2']  # one thread: a tiny model on a busy machine is far slower with two


@pytest.fixture(scope='module')
def run():
    """One Markdown-mode run: (rows without the meta record, meta, stdout)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        results = bench.main(ARGS)
    assert results[0]['arm'] == 'meta'
    rows = [r for r in results[1:] if not r['role'].startswith('loader')]
    assert [r['role'] for r in results[1 + len(rows):]] == ['loader', 'loader-cache', 'loader-cache'] + ['loader'] * 6
    return rows, results[0], out.getvalue()


def find(rows, **kw):
    hits = [r for r in rows if all(r[k] == v for k, v in kw.items())]
    assert len(hits) == 1, f"expected one row with {kw}, found {[r['arm'] for r in hits]}"
    return hits[0]


def test_every_row_is_present(run):
    rows, meta, _ = run
    for kw in (dict(role='backbone'), dict(role='timm'), dict(role='variant', method='lspt'),
               dict(role='variant', method='sa2vp'), dict(role='epoch')):   # the variants of each class's `bench`
        assert find(rows, **kw)['train_ms'] is not None
    for role in ('backbone', 'timm'):   # both a forward and a forward+backward
        r = find(rows, role=role)
        assert r['fwd_ms'] > 0 and len(r['fwd_times_ms']) == 2 and len(r['train_times_ms']) == 2
    for m in methods.METHODS:           # each method at its defaults: inference forward and training step
        r = find(rows, method=m, role='method', default=True)
        assert r['fwd_ms'] > 0 and r['train_ms'] > 0 and r['options'] == {}
    for m in methods.PROMPTED:
        for P in (2, 4):
            assert find(rows, method=m, role='prompts', prompts=P)['options'] == {'prompts': P}
    lspt_p = find(rows, method='lspt', role='method')['prompts']
    assert find(rows, role='variant', method='lspt')['options'] == {'prompt_dropout': 0.0}
    assert find(rows, role='variant', method='lspt')['prompts'] == lspt_p
    vpt_ps = {r['prompts'] for r in rows if r['method'] == 'vpt'}
    assert lspt_p in vpt_ps, "LSPT's target needs VPT-deep at the same P"
    for s in methods.SPT.bench['init']:
        r = find(rows, role='init', strategy=s)
        assert len(r['train_times_ms']) == 1 and r['fwd_ms'] is None
        assert 0 < r['images_run'] <= r['images'] == 8 and f"{r['images_run']} run" in r['note']
    epoch = find(rows, role='epoch')
    spt = find(rows, method='spt', role='method')
    assert epoch['steps'] == 4 and epoch['train_ms'] == pytest.approx(4 * spt['train_ms'])
    assert len({r['arm'] for r in rows}) == len(rows)
    assert meta['threads'] >= 1 and meta['device'] == 'cpu' and meta['command'].startswith('python bench.py')


def test_ratios_are_positive_and_finite(run):
    rows, _, _ = run
    for r in rows:
        assert math.isfinite(r['ratio']) and r['ratio'] > 0, r['arm']
        if r['fwd_ratio'] is not None:
            assert math.isfinite(r['fwd_ratio']) and r['fwd_ratio'] > 0, r['arm']
        # judged: ours/timm, the inits, and every row of a method whose class has a bench target (vpt at 50, 2, 4 and
        # 100, LSPT's P; spt; lspt and its variant against vpt at the same P; sa2vp and its variant); no other row
        cls = methods.METHODS.get(r['method'])
        has_target = r['role'] in ('backbone', 'init') or (
            r['role'] in ('method', 'prompts', 'variant') and 'target' in getattr(cls, 'bench', {}))
        assert (r['target'] is not None) == has_target, r['arm']
    judged = [r for r in rows if r['target'] is not None]
    assert len(judged) >= 1 + 4 + 3 + 4 + 2 + 4   # at least the six methods' of today
    for r in judged:
        assert math.isfinite(r['target_value']) and r['target_value'] > 0, r['arm']
        lo, hi = r['target_spread']
        assert lo <= r['target_value'] <= hi
        assert r['target_verdict'] == bench.verdict(lo, hi, r['target_bound'])
        assert r['target_pass'] == {'pass': True, 'MISS': False, 'unresolved': None}[r['target_verdict']]
        assert r['target'].endswith(r['target_verdict'])
    # the spread is that of the per-round ratios, e.g. VPT-deep P=4 / the backbone, round by round
    bb, vpt = find(rows, role='backbone'), find(rows, method='vpt', prompts=4)
    per_round = [a / b for a, b in zip(vpt['train_times_ms'], bb['train_times_ms'])]
    assert vpt['target_spread'] == [min(per_round), max(per_round)]
    N1 = IMG // 8 * (IMG // 8) + 1
    assert find(rows, method='vpt', prompts=4)['target_bound'] == pytest.approx(1.1 * (N1 + 4) / N1)
    assert find(rows, role='init', strategy='kmeans')['target_bound'] == 1.0
    assert find(rows, role='init', strategy='mean')['target_bound'] == 0.25
    assert find(rows, method='sa2vp', role='method')['target_bound'] == 2.4
    assert find(rows, role='backbone')['target_bound'] == 1.05


def test_tuned_params_match_a_fresh_model(run):
    rows, _, _ = run
    for r in rows:
        if r['method'] is None:
            assert r['tuned_params'] == 0
            continue
        model = methods.build_model(r['method'], models.create_backbone(ARCH, 'none', img_size=IMG), C, **r['options'])
        assert r['tuned_params'] == sum(p.numel() for p in model.parameters() if p.requires_grad), r['arm']
    assert find(rows, method='full', role='method')['tuned_params'] > \
        find(rows, role='variant', method='lspt')['tuned_params']


def test_gflops_positive_and_grow_with_prompts(run):
    rows, _, _ = run
    for r in rows:
        assert r['gflops'] > 0, r['arm']
    for m in methods.PROMPTED:
        assert find(rows, method=m, prompts=4)['gflops'] > find(rows, method=m, prompts=2)['gflops'], m
    bb, tm = find(rows, role='backbone'), find(rows, role='timm')
    assert bb['gflops'] == pytest.approx(tm['gflops'])   # the same model, counted the same way
    assert find(rows, method='sa2vp', role='method')['gflops'] > 2 * bb['gflops']


def test_markdown_table(run):
    rows, _, out = run
    lines = out.splitlines()
    assert any(line.startswith('- command: `python bench.py --arch') for line in lines)
    assert any('torch ' in line and 'threads' in line and 'device cpu' in line for line in lines)
    header = [i for i, line in enumerate(lines) if line.startswith('| arm | tuned params | GFLOPs/img |')]
    assert len(header) == 1
    table = lines[header[0] + 2:header[0] + 2 + len(rows)]
    assert len(table) == len(rows)
    for line, r in zip(table, rows):
        assert line.startswith(f"| {r['arm']}") and line.count('|') == 9, line
    assert lines[header[0] + 2 + len(rows)] == ''   # nothing else in the table


def test_json_mode(capsys):
    results = bench.main(['--arch', ARCH, '--img-size', str(IMG), '--batch-size', '2', '--iters', '1',
                          '--warmup', '0', '--methods', 'vpt', '--prompts', '2,50', '--threads', '1', '--json',
                          '--loader-images', '0'])   # 50: VPT's default P, which has its row once
    out = capsys.readouterr().out
    parsed = json.loads(out)   # stdout holds the JSON and nothing else
    assert isinstance(parsed, list) and all(isinstance(d, dict) for d in parsed)
    assert parsed == json.loads(json.dumps(results))
    assert parsed[0]['arm'] == 'meta'
    assert {r['role'] for r in parsed[1:]} == {'backbone', 'timm', 'method', 'prompts', 'grad-ckpt'}
    assert [r['prompts'] for r in parsed[1:] if r['method'] == 'vpt' and r['role'] != 'grad-ckpt'] == [50, 2]


def test_grad_checkpointing_rows(run):
    rows, _, out = run
    for m in methods.METHODS:
        hits = [r for r in rows if r['role'] == 'grad-ckpt' and r['method'] == m]
        if m == 'linear':   # its blocks run under no_grad: nothing to checkpoint
            assert hits == []
            continue
        (r,) = hits
        d = find(rows, method=m, role='method', default=True)
        assert r['options'] == d['options'] == {} and r['tuned_params'] == d['tuned_params'] and r['target'] is None
        assert r['time_ratio'] > 0 and len(r['train_times_ms']) == len(d['train_times_ms']) == 2
        if r['mem_train_ratio'] is not None:
            assert r['mem_train_ratio'] == pytest.approx(r['mem_train_mb'] / d['mem_train_mb'])
        assert f"time {r['time_ratio']:.2f}x of the default" in r['note'] and r['arm'] in out


def test_loader_only():
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        rows = bench.main(['--loader-only', '--loader-images', '3', '--img-size', '32', '--batch-size', '2',
                           '--device', 'cpu'])
    assert [r['data'] for r in rows] == ['cub'] * 3 + [f'vtab-{t}' for t in ('cifar', 'resisc45', 'clevr_count')
                                                        for _ in range(2)]  # the folder, then TFDS's records
    assert [r['arm'].endswith(', TFDS records') for r in rows[3:]] == [False, True] * 3
    for r in rows:
        rate = r['images_per_s_per_worker']
        assert r['images'] == 3 and rate > 0 and r['workers_for_gpu_rate'] == math.ceil(bench.GPU_RATE / rate)
        if r['role'] == 'loader':
            assert r['images_per_s_16_workers'] == 16 * rate and r['kb_per_file'] > 0
        else:   # the cache holds Resize(round(32 * 256 / 224)) = 37 px short side, 37 x 49 for 500 x 375
            assert r['kb_per_file'] == pytest.approx(37 * 49 * 3 / 1024)
    table = out.getvalue().splitlines()
    assert table[0].startswith('Input pipeline at 2,500 images/s') and len(table) == 4 + len(rows)


def test_bad_arguments():
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        bench.parse_args(['--methods', 'vpt,nope'])


def test_verdict_is_unresolved_when_the_rounds_straddle_the_bound():
    assert bench.verdict(0.9, 1.0, 1.05) == 'pass'
    assert bench.verdict(1.06, 1.3, 1.05) == 'MISS'
    assert bench.verdict(0.15, 1.4, 1.1) == 'unresolved'  # a noisy round cannot decide either way
    assert bench.verdict(1.05, 1.05, 1.05) == 'pass'


def test_markdown_counts_unresolved(run):
    rows, _, out = run
    verdicts = [r['target_verdict'] for r in rows if r['target_verdict']]
    (summary,) = [ln for ln in out.splitlines() if ln.startswith('speed targets: ')]
    assert summary.startswith(f"speed targets: {verdicts.count('pass')} pass, {verdicts.count('MISS')} miss")
    assert f", {verdicts.count('unresolved')} unresolved" in summary


def test_help_shows_every_default_and_device(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(['--help'])
    raw = capsys.readouterr().out
    text = ' '.join(raw.split())
    options = [ln for ln in raw.splitlines() if ln.startswith('  --')]  # one entry per option but -h/--help
    assert len(options) > 10 and text.count('(default: ') == len(options)  # every one shows its default
    assert '--device DEVICE auto (cuda when available, else cpu), cpu, cuda or cuda:N (default: auto)' in text
    assert "bf16 autocast on CUDA, fp32 on the CPU (default: auto)" in text


def test_device_and_amp_follow_train_py(capsys):
    if not torch.cuda.is_available():
        with pytest.raises(runs.RunError, match='--device cuda: torch sees no CUDA device'):
            bench.main(['--device', 'cuda'])
    results = bench.main(['--arch', ARCH, '--img-size', '16', '--batch-size', '2', '--iters', '1', '--warmup', '0',
                          '--methods', 'linear', '--prompts', '2', '--threads', '1', '--device', 'cpu', '--json'])
    capsys.readouterr()
    assert results[0]['device'] == 'cpu' and results[0]['amp'] == 'none'  # auto: fp32 on the CPU, as train.py


def test_linear_grid_row(capsys):
    (row,) = bench.main(['--linear-grid', '--iters', '1', '--warmup', '0', '--grid-epochs', '1', '--json'])
    assert (row['forwards_separate'], row['forwards_grid']) == (8 * 1 * (800 + 200), 800 + 200)
    assert row['grid_s'] > 0 and row['separate_s'] > 0 and math.isfinite(row['ratio'])
    assert json.loads(capsys.readouterr().out) == [row]
