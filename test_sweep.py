"""Tests for sweep.py: a tiny random ViT (vit_nano_patch8, 16 px) on digits and a tmp_path VTAB fixture, runs of
2 epochs x 3 steps. Each cell is a real train.py process (mostly import time), so the sweeps that do not depend
on each other start together at the beginning of the module and the tests wait for them.

Run: python -m pytest -q test_sweep.py
"""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import methods
import runs
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
    runs = {
        'e2e': TINY + GRID + ['--jobs', '2'] + FIXED,
        'failing': TINY + ['--data', 'digits', '--lr', '1e30,0.1', '--wd', '0', '--seeds', '0'] + FIXED,  # diverges
        'submitit': TINY + ['--data', 'digits', '--lr', '0.1', '--wd', '0', '--seeds', '3', '--launcher',
                            'submitit-local'] + FIXED,
        'linear': ['--method', 'linear'] + TINY[2:-2] + ['--data', 'digits', '--lr', '0.5,0.1', '--wd', '0,0.001',
                                                       '--seeds', '0'] + FIXED,
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
    (line,) = [ln[len('error: '):] for ln in log.read_text().splitlines() if ln.startswith('error: ')]
    assert line.startswith('non-finite loss nan at epoch 1')
    # the cell's own error line, in the progress line and at the end
    assert f"digits lr1e+30_wd0_p4: FAILED (exit status 1: {line}), log {log}" in stdout
    assert f"error: digits lr1e+30_wd0_p4 failed ({line}); see {log}" in stderr
    assert read(out / 'digits' / 'val' / 'lr0.1_wd0_p4' / 'result.json')['eval_split'] == 'val'  # the other ran
    (row,) = read(out / 'results.json')['rows']
    assert row['mean'] is None and '1 of 2 cells done, 1 failed' in row['status'] and str(log) in row['status']
    assert not (out / 'digits' / 'test').exists()  # phase 2 waits for a complete phase 1


def test_the_data_is_checked_before_any_cell(tmp_path):
    """A missing split that phase 2 needs (here VTAB's test.txt), or a wrong --data-root, is one error line before
    any cell starts, and nothing is written."""
    make_vtab(tmp_path / 'data', 'eurosat', {'train800': 8, 'val200': 4, 'train800val200': 12, 'test': 4})
    (tmp_path / 'data' / 'vtab-1k' / 'eurosat' / 'test.txt').unlink()
    common = TINY + ['--data', 'vtab-eurosat', '--lr', '0.1', '--wd', '0', '--seeds', '0']
    procs = [start(common + ['--data-root', str(tmp_path / root), '--out', str(tmp_path / out)] + FIXED)
             for root, out in (('data', 'no-test'), ('nowhere', 'no-root'))]
    (rc, _, err), (rc2, _, err2) = (finish(p) for p in procs)
    assert rc == rc2 == 1 and 'Traceback' not in err + err2
    assert err.startswith(f"error: vtab-eurosat: missing split file "
                          f"{tmp_path / 'data' / 'vtab-1k' / 'eurosat' / 'test.txt'}\n"), err
    assert err2.startswith("error: dataset folder for 'vtab-eurosat' not found"), err2
    assert not (tmp_path / 'no-test').exists() and not (tmp_path / 'no-root').exists()
    import torch  # and the weights: resolved and checked once, here a supervised ViT's file given as MAE's
    import models
    torch.save(models.create_backbone('vit_nano_patch8', img_size=16).state_dict(), tmp_path / 'w.pth')
    with pytest.raises(sweep.SweepError, match=r"^--pretrain mae does not fit .*w\.pth \(timm state dict; its "
                                               r"pos_embed is learned"):
        sweep.main([a if a != 'none' else 'mae' for a in TINY] + ['--weights', str(tmp_path / 'w.pth'), '--data',
                   'digits', '--lr', '0.1', '--wd', '0', '--seeds', '0', '--out', str(tmp_path / 'w')] + FIXED)
    assert not (tmp_path / 'w').exists()


def test_a_train_py_flag_before_the_dashes_says_where_it_goes(capsys):
    with pytest.raises(SystemExit):
        sweep.parse_args(['--method', 'vpt', '--data', 'cub', '--epochs', '2'])
    assert capsys.readouterr().err.splitlines()[-1].endswith("error: --epochs is a flag of train.py: give it after "
                                                             "--, e.g. `python sweep.py ... -- --epochs 2`")


def test_the_papers_number_only_beside_vit_b16_at_224(e2e, tmp_path):
    """The papers' numbers are ViT-B/16's at 224 px: a sweep of another arch or size shows none, and no delta."""
    import shutil
    out = tmp_path / 'cub'
    shutil.copytree(e2e[0] / 'digits', out / 'cub')  # the e2e sweep's cells, as if they were cub's
    spec = dict(read(e2e[0] / 'sweep.json'), data=['cub'], pretrain='in21k')
    paper = dict(zip(sweep.PAPER_KEYS, methods.METHODS['vpt'].papers['in21k'][1]))['cub']
    for arch, img_size, shown in (('vit_nano_patch8', 16, None), ('vit_base_patch16_224', 112, None),
                                  ('vit_base_patch16_224', 224, paper)):
        (out / 'sweep.json').write_text(json.dumps(dict(spec, arch=arch, img_size=img_size)))
        (row,) = sweep.report(str(out))['rows']
        assert row['paper'] == shown and (row['delta'] is None) == (shown is None)
        note = f"(none: the papers' numbers are ViT-B/16 at 224 px, this is {arch} at {img_size} px)"
        assert (note in (out / 'results.md').read_text()) == (shown is None)


def alive(pid):
    """Whether process `pid` runs (a zombie, reaped by nobody in a container, does not)."""
    try:
        return Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0] != 'Z'
    except (FileNotFoundError, IndexError):
        return False


def processes_with(text):
    """The live processes whose command line contains `text`."""
    found = []
    for d in Path('/proc').glob('[0-9]*'):
        try:
            if text in (d / 'cmdline').read_bytes().decode(errors='replace') and alive(int(d.name)):
                found.append(int(d.name))
        except OSError:
            pass
    return found


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='prctl(PR_SET_PDEATHSIG) and /proc are Linux')
def test_signals_stop_the_cells_and_no_cell_outlives_its_sweep(tmp_path):
    """SIGINT, SIGTERM and SIGHUP to sweep.py stop its running cell as Ctrl-C does (the cell's log ends with
    train.py's interrupted line) and leave no process behind; the cell of a SIGKILLed sweep ends alike. A second
    sweep on a running sweep's directory is refused, naming the pid that holds it."""
    endless = ['--', '--epochs', '1000', '--max-steps-per-epoch', '2', '--batch-size', '16', '--eval-every', '1000',
               '--workers', '2', '--log-interval', '1']
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGKILL)
    args = {s: TINY + ['--data', 'digits', '--lr', '0.1', '--wd', '0', '--seeds', '0', '--out', str(tmp_path / s.name)]
            for s in sigs}
    procs = {s: start(args[s] + endless) for s in sigs}
    logs = {s: tmp_path / s.name / 'digits' / 'val' / 'lr0.1_wd0_p4' / 'train.log' for s in sigs}
    deadline = time.time() + 300
    while not all(log.exists() and 'epoch 2/1000 step' in log.read_text() for log in logs.values()):  # 1 checkpoint
        assert time.time() < deadline and all(p.poll() is None for p in procs.values())
        time.sleep(0.2)
    cells = {s: int((log.parent / '.lock').read_text()) for s, log in logs.items()}
    with pytest.raises(runs.RunError, match=f"{tmp_path / 'SIGINT'} is in use by process {procs[signal.SIGINT].pid}"):
        sweep.main(args[signal.SIGINT] + endless)
    for s, p in procs.items():
        p.send_signal(s)
    for s, p in procs.items():
        rc, _, err = finish(p, timeout=120)
        if s != signal.SIGKILL:
            assert rc == 130 and err.startswith('error: interrupted; rerun the same command'), (s, err)
    deadline = time.time() + 60  # the SIGKILLed sweep's cell: SIGTERM from the kernel, then the same line
    while any(alive(pid) for pid in cells.values()) and time.time() < deadline:
        time.sleep(0.1)
    for s, log in logs.items():
        assert re.search(r'^error: interrupted during epoch \d+; the last checkpoint is after epoch \d+',
                         log.read_text(), re.M), (s, log.read_text()[-500:])
    assert processes_with(str(tmp_path)) == []


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
