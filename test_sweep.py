"""Tests for sweep.py: a tiny random ViT (vit_nano_patch8, 16 px) on digits and a tmp_path VTAB fixture, runs of
2 epochs x 3 steps. Each cell is a real train.py process (mostly import time), so the sweeps that do not depend
on each other start together at the beginning of the module and the tests wait for them.

Run: python -m pytest -q test_sweep.py
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import methods
import sweep
from test_data import make_vtab

HERE = Path(__file__).resolve().parent
TINY = ['--method', 'vpt', '--arch', 'vit_nano_patch8', '--pretrain', 'none', '--img-size', '16', '--prompts', '4']
FIXED = ['--', '--epochs', '2', '--max-steps-per-epoch', '3', '--batch-size', '32', '--warmup-epochs', '0.5',
         '--workers', '0', '--log-interval', '0']
GRID = ['--data', 'digits', '--lr', '0.5,0.1', '--wd', '0,0.001', '--seeds', '0,1']  # 2 x 2 grid, 2 seeds
ENV = dict(os.environ, OMP_NUM_THREADS='1')


def start(args, **kw):
    return subprocess.Popen([sys.executable, str(HERE / 'sweep.py'), *args], cwd=HERE, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def finish(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@pytest.fixture(scope='module')
def sweeps(tmp_path_factory):
    """The independent sweeps, started together: name -> (out dir, Popen)."""
    root = tmp_path_factory.mktemp('sweeps')
    vtab = tmp_path_factory.mktemp('data')
    make_vtab(vtab, 'eurosat', {'train800': 8, 'val200': 4, 'train800val200': 12, 'test': 4})
    (vtab / 'vtab-1k' / 'eurosat' / 'test.txt').unlink()  # phase 1 must not need the test files
    for f in (vtab / 'vtab-1k' / 'eurosat' / 'images' / 'test').iterdir():
        f.unlink()
    runs = {
        'e2e': TINY + GRID + ['--jobs', '2'] + FIXED,
        'failing': TINY + ['--data', 'digits', '--lr', '1e30,0.1', '--wd', '0', '--seeds', '0'] + FIXED,  # diverges
        'submitit': TINY + ['--data', 'digits', '--lr', '0.1', '--wd', '0', '--seeds', '3', '--launcher',
                            'submitit-local'] + FIXED,
        'linear': ['--method', 'linear'] + TINY[2:-2] + ['--data', 'digits', '--lr', '0.5,0.1', '--wd', '0,0.001',
                                                       '--seeds', '0'] + FIXED,
        'vtab': TINY + ['--data', 'vtab-eurosat', '--data-root', str(vtab), '--lr', '0.1', '--wd', '0', '--seeds',
                        '0'] + FIXED,
    }
    procs = {name: (root / name, start(args[:-len(FIXED)] + ['--out', str(root / name)] + FIXED))
             for name, args in runs.items()}
    yield procs
    for _, p in procs.values():
        if p.poll() is None:
            p.kill()


@pytest.fixture(scope='module')
def e2e(sweeps):
    out, proc = sweeps['e2e']
    rc, stdout, stderr = finish(proc)
    assert rc == 0, stderr
    return out, stdout


def read(path):
    with open(path) as f:
        return json.load(f)


def test_choose_ties_go_to_smaller_lr_then_wd():
    cells = [(0.5, 0.0, None, 80.0), (0.1, 0.001, None, 80.0), (0.1, 0.01, None, 80.0), (1.0, 0.0, None, 79.0)]
    assert sweep.choose(cells) == (0.1, 0.001, None, 80.0)
    cells = [(0.1, 0.01, None, 70.0), (0.1, 0.001, None, 70.0), (0.05, 0.0, None, 69.9)]
    assert sweep.choose(cells) == (0.1, 0.001, None, 70.0)
    cells = [(0.1, 0.0, 50, 70.0), (0.1, 0.0, 10, 70.0), (0.2, 0.0, 5, 75.0)]
    assert sweep.choose(cells) == (0.2, 0.0, 5, 75.0)
    assert sweep.choose(cells[:2]) == (0.1, 0.0, 10, 70.0)


def test_grid_converts_vpt_base_lr_at_the_batch_size():
    args, extra = sweep.parse_args(['--method', 'vpt', '--data', 'cub'])
    grid = sweep.grid_of(args, extra)
    assert len(grid) == 40
    assert sorted({lr for lr, _, _ in grid}) == sorted(b * 64 / 256 for b in methods.VPT.sweep_grid['lr'])
    assert sorted({wd for _, wd, _ in grid}) == [0, 0.0001, 0.001, 0.01]
    args, extra = sweep.parse_args(['--method', 'linear', '--data', 'cub', '--', '--batch-size', '128'])
    assert max(lr for lr, _, _ in sweep.grid_of(args, extra)) == 50 * 128 / 256
    args, extra = sweep.parse_args(['--method', 'vpt', '--data', 'cub', '--lr', '0.3', '--prompts', '10,50'])
    assert sweep.grid_of(args, extra) == [(0.3, wd, p) for p in (10, 50) for wd in methods.VPT.sweep_grid['wd']]
    assert sweep.datasets_of('vtab-natural,cub,vtab-dtd') == [f'vtab-{t}' for t in sweep.VTAB_GROUPS['vtab-natural']] \
        + ['cub']
    assert len(sweep.datasets_of('vtab')) == 19 and len(sweep.datasets_of('fgvc')) == 5
    with pytest.raises(sweep.SweepError, match="--lr after --"):
        sweep.parse_args(['--method', 'vpt', '--data', 'cub', '--', '--lr', '3'])


def test_dry_run_counts_image_passes(capsys):
    sweep.main(TINY + GRID + ['--dry-run'] + FIXED)
    out = capsys.readouterr().out
    epochs = 2
    phase1 = sum(800 * epochs + 200 * epochs for _ in range(4))   # val evaluated every epoch
    phase2 = sum(1000 * epochs + 797 for _ in range(2))           # test evaluated once
    vpt = phase1 + sum(1000 * epochs + 797 * epochs for _ in range(2))
    assert f"{phase1:,d} image passes" in out and f"{phase2:,d} image passes" in out
    assert f"VPT's protocol (test every epoch): {vpt:,d}" in out


def test_end_to_end_report_equals_the_result_files(e2e):
    out, stdout = e2e
    res = read(out / 'results.json')
    assert (res['method'], res['pretrain']) == ('vpt', 'none')
    (row,) = res['rows']
    # the chosen cell, by a naive scan: lr ascending, then wd ascending, replace only on a strictly better val
    best = None
    for lr in (0.1, 0.5):
        for wd in (0.0, 0.001):
            r = read(out / 'digits' / 'val' / f'lr{lr:g}_wd{wd:g}_p4' / 'result.json')
            assert r['eval_split'] == 'val' and r['config']['lr'] == lr and r['config']['wd'] == wd
            if best is None or r['accuracy'] > best[2]:
                best = (lr, wd, r['accuracy'])
    assert (row['lr'], row['wd'], row['prompts'], row['val_accuracy']) == (best[0], best[1], 4, best[2])
    accs = []
    for seed in (0, 1):
        r = read(out / 'digits' / 'test' / f'seed{seed}' / 'result.json')
        assert (r['eval_split'], r['config']['seed'], r['config']['lr'], r['config']['wd']) == \
            ('test', seed, best[0], best[1])
        metrics = [json.loads(line) for line in open(out / 'digits' / 'test' / f'seed{seed}' / 'metrics.jsonl')]
        assert [m['accuracy'] is not None for m in metrics] == [False, True]  # test evaluated once
        accs.append(r['accuracy'])
    mean = (accs[0] + accs[1]) / 2
    std = math.sqrt(((accs[0] - mean) ** 2 + (accs[1] - mean) ** 2) / (2 - 1))
    assert row['seeds'] == [0, 1] and row['test_accuracies'] == accs and row['n'] == 2
    assert row['mean'] == pytest.approx(mean, abs=1e-12) and row['std'] == pytest.approx(std, abs=1e-12)
    assert row['tuned_params'] == r['tuned_params'] and row['paper'] is None and row['delta'] is None
    md = (out / 'results.md').read_text()
    assert f"| digits | {best[0]:g} | {best[1]:g} | 4 | {best[2]:.2f} | {mean:.2f} ± {std:.2f} | 2 |" in md
    assert (out / 'results.csv').read_text().splitlines()[1].startswith(f"digits,{best[0]},{best[1]},4,")
    assert (out / 'results.png').stat().st_size > 0 and (out / 'digits' / 'grid.png').stat().st_size > 0
    assert '[6 done, 0 running, 0 failed, 0 left' in stdout and 'digits: chose' in stdout


def test_rerun_skips_and_other_configuration_is_refused(e2e, capsys):
    out, _ = e2e
    before = {p: p.stat().st_mtime_ns for p in out.glob('digits/*/*/result.json')}
    assert len(before) == 6
    assert sweep.main(TINY + GRID + ['--out', str(out)] + FIXED) == 0  # everything finished: nothing runs
    assert '6 finished before' in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.glob('digits/*/*/result.json')} == before
    with pytest.raises(sweep.SweepError, match=r"lr0.5_wd0_p4/result.json was recorded with another configuration"
                       r".*--epochs 3 \(recorded: 2\)"):
        sweep.main(TINY + GRID + ['--out', str(out)] + [a if a != '2' else '3' for a in FIXED])


def test_report_command_rewrites_the_same_table(e2e, capsys):
    out, _ = e2e
    first = read(out / 'results.json')
    sweep.main(['--report', str(out)])
    assert read(out / 'results.json') == first
    assert '| digits |' in capsys.readouterr().out


def test_print_commands_run_as_they_are_give_the_same_table(e2e, tmp_path):
    out, _ = e2e
    mine = tmp_path / 'cmds'
    for phase in (1, 2, 3):
        rc, stdout, stderr = finish(start(TINY + GRID + ['--out', str(mine), '--print-commands'] + FIXED))
        assert rc == 0, stderr
        lines = stdout.splitlines()
        assert len(lines) == {1: 4, 2: 2, 3: 0}[phase]  # phase 2 appears once phase 1 has finished
        procs = [subprocess.Popen(['bash', '-c', line], cwd=tmp_path, env=ENV) for line in lines]
        assert all(p.wait() == 0 for p in procs)
    sweep.main(['--report', str(mine)])
    assert read(mine / 'results.json')['rows'] == read(out / 'results.json')['rows']


def test_killed_sweep_rerun_does_not_redo_finished_cells(tmp_path):
    out = tmp_path / 'killed'
    args = TINY + ['--data', 'digits', '--lr', '0.5,0.1', '--wd', '0', '--seeds', '0', '--jobs', '1',
                   '--out', str(out)] + FIXED
    proc = start(args, start_new_session=True)
    first = out / 'digits' / 'val' / 'lr0.5_wd0_p4' / 'result.json'
    while not first.exists() and proc.poll() is None:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and the train.py it runs
    proc.wait()
    finished = {p: (p.stat().st_mtime_ns, p.read_text()) for p in out.glob('digits/*/*/result.json')}
    assert first in finished
    rc, stdout, stderr = finish(start(args))
    assert rc == 0, stderr
    assert f'{len(finished)} finished before' in stdout
    assert all((p.stat().st_mtime_ns, p.read_text()) == v for p, v in finished.items())
    assert len(list(out.glob('digits/*/*/result.json'))) == 3
    assert read(out / 'results.json')['rows'][0]['n'] == 1


def test_a_value_train_py_refuses_stops_the_sweep_before_any_cell(tmp_path):
    # a grid value that cannot work (here the second lr) is one error line, and nothing is run or written
    rc, stdout, stderr = finish(start(TINY + ['--data', 'digits', '--lr', '0.1,-1', '--wd', '0', '--seeds', '0',
                                              '--out', str(tmp_path / 'bad')] + FIXED))
    assert rc == 1 and stderr.startswith('error: train.py refuses ') and stderr.count('\n') == 1, stderr
    assert stderr.rstrip().endswith('--lr -1 must be positive') and not (tmp_path / 'bad').exists()


def test_failing_cell_is_isolated_and_named(sweeps):
    out, proc = sweeps['failing']
    rc, stdout, stderr = finish(proc)
    assert rc == 1
    log = out / 'digits' / 'val' / 'lr1e+30_wd0_p4' / 'train.log'
    assert 'non-finite loss' in log.read_text()
    assert f"error: digits lr1e+30_wd0_p4 failed; see {log}" in stderr
    assert read(out / 'digits' / 'val' / 'lr0.1_wd0_p4' / 'result.json')['eval_split'] == 'val'  # the other ran
    (row,) = read(out / 'results.json')['rows']
    assert row['mean'] is None and '1 of 2 cells done, 1 failed' in row['status'] and str(log) in row['status']
    assert not (out / 'digits' / 'test').exists()  # phase 2 waits for a complete phase 1


def test_phase1_without_test_files(sweeps):
    out, proc = sweeps['vtab']
    rc, stdout, stderr = finish(proc)
    assert rc == 1  # phase 2 cannot run without test.txt ...
    assert read(out / 'vtab-eurosat' / 'val' / 'lr0.1_wd0_p4' / 'result.json')['eval_split'] == 'val'  # ... phase 1 did
    assert 'test.txt' in (out / 'vtab-eurosat' / 'test' / 'seed0' / 'train.log').read_text()


def test_submitit_local_launcher(sweeps):
    out, proc = sweeps['submitit']
    rc, stdout, stderr = finish(proc)
    assert rc == 0, stderr
    (row,) = read(out / 'results.json')['rows']
    assert row['n'] == 1 and row['test_accuracies'] == [read(out / 'digits' / 'test' / 'seed3' / 'result.json')
                                                        ['accuracy']]
    assert any((out / 'submitit').iterdir())


def test_linear_phase1_is_one_process(sweeps):
    """linear's grid runs as one train.py process per dataset (one backbone forward per image), into the same
    ordinary cell directories the other methods get."""
    out, proc = sweeps['linear']
    rc, stdout, stderr = finish(proc)
    assert rc == 0, stderr
    val = out / 'digits' / 'val'
    assert 'features cached' in (val / 'grid.log').read_text()
    cells = {p.parent.name: read(p) for p in val.glob('*/result.json')}
    assert set(cells) == {'lr0.5_wd0', 'lr0.1_wd0', 'lr0.5_wd0.001', 'lr0.1_wd0.001'}
    assert all(r['features'] == 'cached' and not (val / n / 'train.log').exists() for n, r in cells.items())
    (row,) = read(out / 'results.json')['rows']
    best = sweep.choose([(r['config']['lr'], r['config']['wd'], None, r['accuracy']) for r in cells.values()])
    assert (row['lr'], row['wd'], row['val_accuracy'], row['n']) == (best[0], best[1], best[3], 1)
