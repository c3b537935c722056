"""Tests of bench.py: structure of the results on a tiny config, run in-process. No timing thresholds."""
import contextlib
import io
import json
import math

import pytest

import bench
import methods
import models

ARCH, IMG, C = 'vit_nano_patch8', 48, 200   # 36 patches: enough for SPT's mean/max windows at P=20
ARGS = ['--arch', ARCH, '--img-size', str(IMG), '--batch-size', '2', '--iters', '2', '--warmup', '1',
        '--spt-images', '8', '--prompts', '2,4', '--num-classes', str(C), '--device', 'cpu',
        '--threads', '1']  # one thread: a tiny model on a busy machine is far slower with two


@pytest.fixture(scope='module')
def run():
    """One Markdown-mode run: (rows without the meta record, meta, stdout)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        results = bench.main(ARGS)
    assert results[0]['arm'] == 'meta'
    return results[1:], results[0], out.getvalue()


def find(rows, **kw):
    hits = [r for r in rows if all(r[k] == v for k, v in kw.items())]
    assert len(hits) == 1, f"expected one row with {kw}, found {[r['arm'] for r in hits]}"
    return hits[0]


def test_every_row_is_present(run):
    rows, meta, _ = run
    for role in ('backbone', 'timm', 'lspt-nodrop', 'sa2vp-nodrop', 'spt-epoch'):
        r = find(rows, role=role)
        assert r['train_ms'] is not None
    for role in ('backbone', 'timm'):   # both a forward and a forward+backward
        r = find(rows, role=role)
        assert r['fwd_ms'] > 0 and len(r['fwd_times_ms']) == 2 and len(r['train_times_ms']) == 2
    for m in bench.METHODS:             # each method at its defaults: inference forward and training step
        r = find(rows, method=m, role='method', default=True)
        assert r['fwd_ms'] > 0 and r['train_ms'] > 0 and r['options'] == {}
    for m in bench.PROMPTED:
        for P in (2, 4):
            assert find(rows, method=m, role='prompts', prompts=P)['options'] == {'prompts': P}
    lspt_p = find(rows, method='lspt', role='method')['prompts']
    assert find(rows, role='lspt-nodrop')['options'] == {'prompt_dropout': 0.0}
    assert find(rows, role='lspt-nodrop')['prompts'] == lspt_p
    vpt_ps = {r['prompts'] for r in rows if r['method'] == 'vpt'}
    assert lspt_p in vpt_ps, "LSPT's target needs VPT-deep at the same P"
    for s in bench.SPT_STRATEGIES:
        r = find(rows, role='spt-init', options={'spt_init': s})
        assert len(r['train_times_ms']) == 1 and r['fwd_ms'] is None
        assert 0 < r['images_run'] <= r['images'] == 8 and f"{r['images_run']} run" in r['note']
    epoch = find(rows, role='spt-epoch')
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
    judged = [r for r in rows if r['target'] is not None]
    # ours/timm; vpt at 50 (default), 2, 4 and 100 (LSPT's default); spt at 20, 2, 4;
    # lspt at 100, 2, 4 and without dropout; sa2vp; 4 inits
    assert len(judged) == 1 + 4 + 3 + 4 + 2 + 4   # sa2vp with and without its dropout
    for r in judged:
        assert math.isfinite(r['target_value']) and r['target_value'] > 0, r['arm']
        assert r['target_pass'] == (r['target_value'] <= r['target_bound'])
    N1 = IMG // 8 * (IMG // 8) + 1
    assert find(rows, method='vpt', prompts=4)['target_bound'] == pytest.approx(1.1 * (N1 + 4) / N1)
    assert find(rows, role='spt-init', options={'spt_init': 'kmeans'})['target_bound'] == 1.0
    assert find(rows, role='spt-init', options={'spt_init': 'mean'})['target_bound'] == 0.25
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
    assert find(rows, method='full', role='method')['tuned_params'] > find(rows, role='lspt-nodrop')['tuned_params']


def test_gflops_positive_and_grow_with_prompts(run):
    rows, _, _ = run
    for r in rows:
        assert r['gflops'] > 0, r['arm']
    for m in bench.PROMPTED:
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
                          '--warmup', '0', '--methods', 'vpt', '--prompts', '2', '--threads', '1', '--json'])
    out = capsys.readouterr().out
    parsed = json.loads(out)   # stdout holds the JSON and nothing else
    assert isinstance(parsed, list) and all(isinstance(d, dict) for d in parsed)
    assert parsed == json.loads(json.dumps(results))
    assert parsed[0]['arm'] == 'meta'
    assert {r['role'] for r in parsed[1:]} == {'backbone', 'timm', 'method', 'prompts'}


def test_bad_arguments():
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        bench.parse_args(['--methods', 'vpt,nope'])


def test_linear_grid_row(capsys):
    (row,) = bench.main(['--linear-grid', '--iters', '1', '--warmup', '0', '--grid-epochs', '1', '--json'])
    assert (row['forwards_separate'], row['forwards_grid']) == (8 * 1 * (800 + 200), 800 + 200)
    assert row['grid_s'] > 0 and row['separate_s'] > 0 and math.isfinite(row['ratio'])
    assert json.loads(capsys.readouterr().out) == [row]
