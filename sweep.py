"""
From runs to a paper's table with VPT's protocol (KMnP/vpt tune_vtab.py, tune_fgvc.py), without its costs: the
lr x wd (x prompts) grid trained on the tuning split and scored on val into DIR/<data>/val/<cell>/ (the test files
never opened), the best cell retrained for every seed into DIR/<data>/test/seed<s>/ (the test set evaluated once,
after the last epoch), and the mean +- sample std over the seeds beside the paper's number in
DIR/results.{md,csv,json,png} and DIR/<data>/grid.png. README, "Reproduce a table", has the details.

    python sweep.py --method vpt --pretrain in21k --data vtab                     # 19 tasks, VPT's grid
    python sweep.py --method vpt --data cub --print-commands > cmds.txt            # for any scheduler
    python sweep.py --method vpt --data fgvc --launcher slurm --partition gpu      # SLURM through submitit
    python sweep.py --report sweeps/vpt-in21k-fgvc                                 # the table of what finished

Every cell is an ordinary train.py run directory, so the report only reads directories, whoever ran the cells.
Rerunning the same command skips finished cells and resumes unfinished ones; a cell directory recorded with
another configuration is an error, never reused. The data and weights are checked before any cell starts; Ctrl-C,
SIGTERM or SIGHUP stop the running cells as Ctrl-C does, and no cell outlives its sweep, even a killed one.
"""

import argparse
import csv
import ctypes
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time

import data
import datacheck
import linear_grid
import methods
import runs
import train
import weights

TRAIN_PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'train.py')
# VTAB-1k's groups, each task with its test set size for --dry-run (the full official test set: tfds, as NOAH's
# get_vtab1k.py writes it; train800 / val200 / train800val200 for every task)
VTAB_GROUPS = {
    'vtab-natural': {'cifar': 10000, 'caltech101': 6084, 'dtd': 1880, 'oxford_flowers102': 6149,
                     'oxford_iiit_pet': 3669, 'svhn': 26032, 'sun397': 21750},
    'vtab-specialized': {'patch_camelyon': 32768, 'eurosat': 5400, 'resisc45': 6300, 'diabetic_retinopathy': 42670},
    'vtab-structured': {'clevr_count': 15000, 'clevr_dist': 15000, 'dmlab': 22735, 'kitti': 711,
                        'dsprites_loc': 73728, 'dsprites_ori': 73728, 'smallnorb_azi': 12150, 'smallnorb_ele': 12150},
}
SUITES = {**{g: [f'vtab-{t}' for t in tasks] for g, tasks in VTAB_GROUPS.items()},
          'vtab': [f'vtab-{t}' for tasks in VTAB_GROUPS.values() for t in tasks], 'fgvc': list(data.FGVC)}
GROUP_NAMES = {'vtab-natural': 'Natural', 'vtab-specialized': 'Specialized', 'vtab-structured': 'Structured',
               'vtab': 'VTAB mean (19)', 'fgvc': 'FGVC mean (5)'}

SEEDS = [42, 44, 82, 100, 800]  # KMnP/vpt tune_vtab.py: the final-run seeds

# The papers' numbers (ViT-B/16, top-1 %, test) are each method class's `papers` (methods.py), in this order:
PAPER_SETTING = ('vit_base_patch16_224', 224)  # (arch, img size) of every number in `papers`
PAPER_KEYS = ('cub', 'nabirds', 'flowers', 'dogs', 'cars', 'fgvc', 'vtab-natural', 'vtab-specialized',
              'vtab-structured')

# --dry-run's (tuning-train, val, final-train, test) sizes. FGVC: VPT's json splits (VPT paper, Table 7), the final
# runs trained on train.json alone, as VPT does; digits: 1797 images, 1000 of them train800val200's.
SPLITS = {'cub': (5394, 600, 5394, 5794), 'nabirds': (21536, 2393, 21536, 24633), 'dogs': (10800, 1200, 10800, 8580),
          'flowers': (1020, 1020, 1020, 6149), 'cars': (7329, 815, 7329, 8041), 'digits': (800, 200, 1000, 797),
          **{f'vtab-{t}': (800, 200, 1000, n) for tasks in VTAB_GROUPS.values() for t, n in tasks.items()}}


def folder_sizes(name, spec):
    """(tuning-train, val, final-train, test) sizes of a user's image folders (--data imagefolder), counted on disk."""
    n = {s: len(data.build_dataset(name, s, spec['data_root']).samples) if os.path.isdir(
        os.path.join(data.dataset_dir(name, spec['data_root']), s)) else 0 for s in ('train', 'val', 'test')}
    return n['train'], n['val'], n['train'], n['test']


class SweepError(runs.RunError):
    """A sweep that cannot go on; printed as one `error:` line."""


def comma_list(kind):
    def parse(s):
        try:
            return [kind(v) for v in s.split(',')]
        except ValueError:
            what = 'numbers' if kind is float else 'integers'
            raise argparse.ArgumentTypeError(f"expected a comma list of {what}, got {s!r}") from None
    return parse


def parse_args(argv):
    """(sweep args, train.py flags after --)."""
    argv, extra = (argv[:argv.index('--')], argv[argv.index('--') + 1:]) if '--' in argv else (argv, [])
    p = argparse.ArgumentParser(description="Grid search on val, seeded final runs on test, and the table beside "
                                "the papers' numbers (VPT's protocol). Fixed train.py flags go after --, e.g. "
                                "`-- --epochs 2 --workers 0`.", allow_abbrev=False)
    g = p.add_argument_group('what to run')
    g.add_argument('--method', choices=list(methods.METHODS))
    g.add_argument('--pretrain', default='in21k', help="train.py --pretrain (default: %(default)s)")
    g.add_argument('--arch', default='vit_base_patch16_224', help="train.py --arch (default: %(default)s)")
    g.add_argument('--weights', help="train.py --weights")
    g.add_argument('--img-size', type=int, default=224, help="train.py --img-size (default: %(default)s)")
    g.add_argument('--data-root', help="train.py --data-root")
    g.add_argument('--data', help="comma list of train.py --data names and suites: "
                   + ', '.join(f"{s} ({len(v)})" for s, v in SUITES.items()))
    g.add_argument('--out', help="sweep directory (default: sweeps/<method>-<pretrain>-<data>)")
    g = p.add_argument_group('grid (default: the method class\'s sweep_grid, methods.py)')
    g.add_argument('--lr', type=comma_list(float), help="absolute learning rates, comma list")
    g.add_argument('--wd', type=comma_list(float), help="weight decays, comma list")
    g.add_argument('--prompts', type=comma_list(int), help="prompt lengths, comma list (default: the method's)")
    g.add_argument('--seeds', type=comma_list(int), default=SEEDS, help="final-run seeds; phase 1 uses the first "
                   "(default: 42,44,82,100,800)")
    g = p.add_argument_group('execution')
    g.add_argument('--jobs', type=int, help="cells at once (default: one per GPU of --gpus, 1 on a CPU-only "
                   "machine; slurm: all)")
    g.add_argument('--gpus', help="comma list of GPU ids, one job pinned to each in turn (default: every visible "
                   "GPU)")
    g.add_argument('--launcher', choices=['local', 'slurm', 'submitit-local'], default='local',
                   help="local processes, SLURM jobs through submitit, or submitit's local executor (a test of "
                   "the slurm path on this machine) (default: %(default)s)")
    g.add_argument('--partition', help="slurm partition")
    g.add_argument('--gpus-per-job', type=int, default=1, help="slurm GPUs per cell (default: %(default)s)")
    g.add_argument('--time', type=int, default=1440, help="slurm time limit per cell, minutes (default: %(default)s)")
    g.add_argument('--print-commands', action='store_true', help="print every remaining train.py command, one per "
                   "line, and exit (phase 2 appears once a dataset's phase 1 has finished)")
    g.add_argument('--dry-run', action='store_true', help="print the number of runs and image passes per phase")
    g.add_argument('--report', metavar='DIR', help="write DIR/results.{md,csv,json,png} from whatever has "
                   "finished, and print the table")
    unknown = p.parse_known_args(argv)[1]  # `sweep.py --epochs 2`: what to type instead
    if unknown and unknown[0].split('=')[0] in {o for a in train.build_parser()._actions for o in a.option_strings}:
        p.error(f"{unknown[0]} is a flag of train.py: give it after --, e.g. `python sweep.py ... -- "
                f"{shlex.join(unknown)}`")
    args = p.parse_args(argv)
    if args.report is None and (args.method is None or args.data is None):
        p.error("--method and --data are required (or --report DIR)")
    owned = {'--method', '--data', '--arch', '--pretrain', '--weights', '--img-size', '--data-root', '--lr', '--wd',
             '--prompts', '--seed', '--out', '--eval-split', '--resume', '--overwrite'}
    for flag in (f.split('=')[0] for f in extra):
        if flag in owned:
            raise SweepError(f"{flag} after -- is set by sweep.py itself; give it before the --")
    return args, extra


def datasets_of(spec):
    names = list(dict.fromkeys(n for name in spec.split(',') for n in SUITES.get(name, [name])))
    for n in names:
        if n not in data.DATASETS:
            raise SweepError(f"--data: unknown dataset or suite {n!r}; valid: {', '.join(SUITES)}, "
                             f"{', '.join(data.DATASETS)}")
    return names


def grid_of(args, extra):
    """[(lr, wd, prompts)] in the order of the grid; lr absolute (VPT's base lrs x batch / 256, at the batch size
    the runs will use: --batch-size after --, else the recipe's)."""
    grid = methods.METHODS[args.method].sweep_grid
    lrs = args.lr or grid['lr']
    if args.lr is None and grid['base']:
        batch = intended_config(['--method', args.method, '--data', 'digits'] + extra)['batch_size']
        lrs = [lr * batch / 256 for lr in grid['lr']]
    return [(lr, wd, p) for p in args.prompts or [None] for wd in args.wd or grid['wd'] for lr in lrs]


def intended_config(argv):
    """train.py's resolved configuration for these flags, without running anything."""
    try:
        return train.parse_args(argv)[0]
    except SystemExit:  # argparse has printed its message
        raise SweepError(f"train.py refuses the flags {shlex.join(argv)}") from None
    except runs.RunError as e:  # a value that cannot work (a negative lr, ...) or an option of another method
        raise SweepError(f"train.py refuses {shlex.join(argv)}: {e}") from None


def check_first(spec):
    """Before any cell: the files of every dataset with cells left (the splits both phases read, from the VTAB-1k
    source the cells will read, as `data.py --check` checks them) and the weights, resolved once (the hub asked
    once, not by every cell); a SweepError otherwise."""
    source = intended_config(['--method', spec['method'], '--data', 'digits'] + spec['extra'])['vtab_source']
    try:
        for name in [n for n in spec['data'] if todo(spec, n)]:
            splits = dict.fromkeys(s for split in ('val', 'test') for s in data.split_names(name, split))
            datacheck.check(name, spec['data_root'], source=source, splits=list(splits))
        weights.checked(spec['arch'], spec['pretrain'], spec['weights'], spec['img_size'])
    except (FileNotFoundError, ValueError, weights.CheckpointError) as e:  # each names the dataset or the file
        raise SweepError(str(e)) from None


def last_error(log):
    """The text of the last `error: ...` line in a cell's log ('' when there is none)."""
    with open(log, errors='replace') as f:
        return next((ln[7:].strip() for ln in reversed(f.readlines()) if ln.startswith('error: ')), '')


def cell_name(lr, wd, prompts):
    return linear_grid.cell_name(lr, wd) + ('' if prompts is None else f"_p{prompts}")


def choose(cells):
    """The best of [(lr, wd, prompts, val accuracy)]; ties go to the smaller lr, then wd, then fewer prompts."""
    return min(cells, key=lambda c: (-c[3], c[0], c[1], -1 if c[2] is None else c[2]))


class Cell:
    """One train.py process of the sweep, its directory and what that holds. `cells` are the grid cells whose run
    directories it writes: itself, or for `linear`'s phase 1 in one process ('grid') all of a dataset's cells."""

    def __init__(self, spec, name, phase, lr, wd, prompts, seed, key, cells=None):
        self.data, self.key, self.lr, self.wd, self.prompts, self.seed = name, key, lr, wd, prompts, seed
        self.cells, split = cells or [self], 'val' if phase == 1 else 'test'
        self.dir = os.path.join(spec['out'], name, split, *([] if cells else [key]))
        self.log = os.path.join(self.dir, 'grid.log' if cells else 'train.log')
        self.failed_path = os.path.join(self.dir, 'sweep_failed.txt')
        self.args = ['--method', spec['method'], '--arch', spec['arch'], '--pretrain', spec['pretrain'], '--img-size',
                     str(spec['img_size']), '--data', name, '--eval-split', split, '--lr', str(lr), '--wd', str(wd),
                     '--seed', str(seed), '--out', self.dir]
        self.args += ['--prompts', str(prompts)] if prompts is not None else []
        self.args += ['--weights', spec['weights']] if spec['weights'] else []
        self.args += (['--data-root', spec['data_root']] if spec['data_root'] else []) + spec['extra']

    def result(self):
        path = os.path.join(self.dir, 'result.json')
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f)
        return None

    def check(self):
        """A SweepError when the directory holds a run (result.json, else last.pt) of another configuration."""
        path, ckpt = os.path.join(self.dir, 'result.json'), os.path.join(self.dir, 'last.pt')
        if os.path.isfile(path):
            recorded = self.result()['config']
        elif os.path.isfile(ckpt):
            path, recorded = ckpt, runs.read_run(self.dir)[1]
        else:
            return
        want, skip = intended_config(self.args), runs.RESUME_OVERRIDES | {'device'}
        diff = [f"--{k.replace('_', '-')} {want[k]!r} (recorded: {recorded.get(k)!r})" for k in sorted(want)
                if k not in skip and not (k in ('mean', 'std') and want[k] is None) and want[k] != recorded.get(k)]
        if diff:
            raise SweepError(f"{path} was recorded with another configuration than this sweep's cell: "
                             f"{', '.join(diff)}; use another --out or delete {self.dir}")

    def status(self):
        return 'done' if self.result() is not None else 'failed' if os.path.isfile(self.failed_path) else 'left'

    def failure(self):
        with open(self.failed_path) as f:
            return f.read().strip()  # "exit status N; log: PATH"

    def command(self):
        resume = ['--resume'] if os.path.isfile(os.path.join(self.dir, 'last.pt')) else []
        return [sys.executable, TRAIN_PY] + self.args + resume


def dataset(spec, name):
    """(phase-1 cells, phase-2 cells, the chosen (lr, wd, prompts, val accuracy)); no phase 2 before phase 1 ends."""
    cells = [Cell(spec, name, 1, lr, wd, p, spec['seeds'][0], cell_name(lr, wd, p)) for lr, wd, p in spec['grid']]
    results = [c.result() for c in cells]
    if any(r is None for r in results):
        return cells, [], None
    best = choose([(c.lr, c.wd, c.prompts, r['accuracy']) for c, r in zip(cells, results)])
    return cells, [Cell(spec, name, 2, *best[:3], s, f'seed{s}') for s in spec['seeds']], best


def todo(spec, name):
    """A dataset's unfinished cells, phase 2 once phase 1 is complete; for `linear`, while no grid cell has started,
    one process for the whole grid (one backbone forward per image; train.py writes each cell's run directory)."""
    cells, finals, _ = dataset(spec, name)
    if methods.METHODS[spec['method']].grid_in_one_pass and len(cells) > 1 and all(
            c.result() is None and not os.path.exists(os.path.join(c.dir, 'last.pt')) for c in cells):
        lrs, wds = (','.join(dict.fromkeys(str(getattr(c, k)) for c in cells)) for k in ('lr', 'wd'))
        return [Cell(spec, name, 1, lrs, wds, None, spec['seeds'][0], 'grid', cells)]
    return [c for c in cells + finals if c.status() != 'done']


class Launcher:
    """Runs train.py processes, at most `capacity` at once. --launcher local: subprocesses, the i-th slot pinned to
    GPU gpus[i % len(gpus)] (--gpus, else every visible GPU). slurm, submitit-local: one submitit job per process,
    on SLURM or on submitit's local executor (a test of the slurm path)."""

    def __init__(self, args, out):
        self.executor = None
        if args.launcher == 'local':
            gpus = args.gpus if args.gpus is not None else os.environ.get('CUDA_VISIBLE_DEVICES')
            if gpus is None:
                import torch
                gpus = ','.join(str(i) for i in range(torch.cuda.device_count()))
            self.gpus = [g for g in gpus.split(',') if g]
            self.capacity = args.jobs or max(len(self.gpus), 1)
            self.free = list(range(self.capacity))
        else:
            import submitit
            cluster = 'slurm' if args.launcher == 'slurm' else 'local'
            self.executor = submitit.AutoExecutor(folder=os.path.join(out, 'submitit'), cluster=cluster)
            slurm = dict(gpus_per_node=args.gpus_per_job, tasks_per_node=1, slurm_partition=args.partition)
            self.executor.update_parameters(timeout_min=args.time, name='sweep', **{
                k: v for k, v in slurm.items() if cluster == 'slurm' and v is not None})
            self.capacity = args.jobs or 10**9

    def start(self, task):
        if self.executor:  # the job's result: train.py's exit status
            shell = shlex.join(task.command()) + ' >> ' + shlex.quote(task.log) + ' 2>&1'
            return self.executor.submit(subprocess.call, ['sh', '-c', shell])
        slot, sweep = self.free.pop(0), os.getpid()
        env = dict(os.environ, **({'CUDA_VISIBLE_DEVICES': self.gpus[slot % len(self.gpus)]} if self.gpus else {}))

        def end_with_the_sweep():  # in the cell, before exec: SIGTERM when the sweep dies, even by SIGKILL (Linux)
            if sys.platform.startswith('linux'):
                ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
            if os.getppid() != sweep:  # it died before that
                os.kill(os.getpid(), signal.SIGTERM)
        with open(task.log, 'a') as log:  # a session of its own: a terminal's Ctrl-C reaches the cell once, via stop
            return subprocess.Popen(task.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True, preexec_fn=end_with_the_sweep), slot

    def poll(self, handle):  # the exit status, or None while it runs
        if self.executor:
            try:
                return handle.result() if handle.done() else None
            except Exception:  # the job itself failed (cancelled, out of time); its log is in DIR/submitit
                return 1
        rc = handle[0].poll()
        if rc is not None:
            self.free.append(handle[1])
        return rc

    def stop(self, handle):
        if not self.executor:  # as Ctrl-C: the cell's log says so (SLURM jobs keep running; a rerun resumes them)
            handle[0].send_signal(signal.SIGINT)
            try:
                handle[0].wait(timeout=60)
            except subprocess.TimeoutExpired:  # it must not outlive the sweep
                handle[0].kill()
                handle[0].wait()


def execute(spec, launcher):
    """Run every remaining cell, a dataset's phase 2 once its phase 1 is complete; returns the failed cells."""
    names, chosen, running, failed, durations, t_start = spec['data'], set(), {}, [], [], time.time()
    n_total = len(names) * (len(spec['grid']) + len(spec['seeds']))
    queue = [task for name in names if dataset(spec, name)[2] is None for task in todo(spec, name)]  # phase 1

    def counts():
        done = sum(c.status() == 'done' for name in names for c in sum(dataset(spec, name)[:2], []))
        n_run = sum(c.status() != 'done' for task, _, _ in running.values() for c in task.cells)  # not yet polled
        return done, n_run, len(failed), n_total - done - n_run - len(failed)

    print(f"sweep {spec['out']}: {len(names)} datasets x ({len(spec['grid'])} grid cells + {len(spec['seeds'])} "
          f"seeds) = {n_total} runs, {counts()[0]} finished before", flush=True)
    runs.lock(spec['out'])  # one sweep per directory
    try:
        while True:
            busy = {task.data for task, _, _ in running.values()}
            for name in [n for n in names if n not in chosen | busy]:  # phase 1 complete: phase 2 first in the queue
                _, finals, best = dataset(spec, name)
                if best is not None:
                    chosen.add(name)
                    print(f"{name}: chose {cell_name(*best[:3])} (val {best[3]:.2f}%)", flush=True)
                    for cell in finals:
                        cell.check()
                    queue[:0] = [c for c in finals if c.status() != 'done']
            while queue and len(running) < launcher.capacity:
                task = queue.pop(0)
                os.makedirs(task.dir, exist_ok=True)
                for path in [c.failed_path for c in task.cells if os.path.exists(c.failed_path)]:
                    os.remove(path)  # a failure of an earlier sweep
                running[task.dir] = (task, launcher.start(task), time.time())
            if not running:
                break
            time.sleep(0.2)
            for key, (task, handle, t0) in list(running.items()):
                rc = launcher.poll(handle)
                if rc is None:
                    continue
                del running[key]
                durations.append(time.time() - t0)
                error = None  # the log's error line, read once for the task's failed cells
                for c in task.cells:
                    res = c.result()
                    if rc == 0 and res is not None:
                        what = f"{res['eval_split']} {res['accuracy']:.2f}%"
                    else:
                        failed.append(c)
                        os.makedirs(c.dir, exist_ok=True)
                        error = last_error(task.log) if error is None else error
                        why = f"exit status {rc}" + (f": {error}" if error else '')
                        with open(c.failed_path, 'w') as f:
                            f.write(f"{why}; log: {task.log}\n")
                        c.log, what = task.log, f"FAILED ({why}), log {task.log}"
                    done, n_run, n_fail, left = counts()
                    eta = ('?' if launcher.capacity == 10**9 else  # SLURM: all at once, no ETA
                           runs.duration(sum(durations) / len(durations) * (left + n_run / 2) / launcher.capacity))
                    print(f"[{done} done, {n_run} running, {n_fail} failed, {left} left | elapsed "
                          f"{runs.duration(time.time() - t_start)}, eta {eta}] {c.data} {c.key}: {what}", flush=True)
    except KeyboardInterrupt:
        raise runs.Interrupted("interrupted; rerun the same command to continue (finished cells are kept, unfinished "
                         "ones resume)") from None
    finally:  # after an error or Ctrl-C, stop the running cells; a rerun resumes them
        for _, handle, _ in running.values():
            launcher.stop(handle)
        runs.unlock(spec['out'])
    print(f"sweep finished in {runs.duration(time.time() - t_start)}; {len(failed)} failed; report in "
          f"{spec['out']}/results.md", flush=True)
    return failed


def dry_run(spec):
    """Runs and image passes per phase, from train.py's resolved --epochs and --eval-every, beside VPT's protocol."""
    val_cfg, test_cfg = (intended_config(Cell(spec, 'digits', phase, *spec['grid'][0], 0, '').args)
                         for phase in (1, 2))
    epochs, every = val_cfg['epochs'], test_cfg['eval_every']
    cells, seeds = len(spec['grid']), len(spec['seeds'])

    def passes(train_images, eval_images, eval_every):  # evaluated every eval_every epochs and after the last
        return train_images * epochs + eval_images * -(-epochs // eval_every)

    p1 = p2 = vpt = 0
    for name in spec['data']:
        tune, val, final, test = SPLITS.get(name) or folder_sizes(name, spec)
        if methods.METHODS[spec['method']].grid_in_one_pass and cells > 1:  # one process, one forward per image
            p1 += tune + val if not data.augments(name) else passes(tune, val, val_cfg['eval_every'])
        else:
            p1 += cells * passes(tune, val, val_cfg['eval_every'])
        p2 += seeds * passes(final, test, every)
        vpt += cells * passes(tune, val, 1) + seeds * passes(final, test, 1)
    n = len(spec['data'])
    print(f"{spec['method']} on {n} datasets, {epochs} epochs per run (image passes = training images x epochs + "
          f"evaluated images):")
    print(f"  phase 1 (grid on val):   {n * cells:6d} runs  {p1:15,d} image passes")
    print(f"  phase 2 (seeds on test): {n * seeds:6d} runs  {p2:15,d} image passes (test evaluated "
          f"{'once per run' if every >= epochs else f'every {every} epochs'})")
    print(f"  total:                   {n * (cells + seeds):6d} runs  {p1 + p2:15,d} image passes; VPT's protocol "
          f"(test every epoch): {vpt:,d}, ours / VPT's = {(p1 + p2) / vpt:.2f}")


def mean_or_none(values):
    return sum(values) / len(values) if values and all(v is not None for v in values) else None


def tally(cells, unit):
    """'N of M <unit> done[, K failed (exit status and log of each)]'."""
    failed = [c.failure() for c in cells if c.status() == 'failed']
    done = sum(c.status() == 'done' for c in cells)
    return f"{done} of {len(cells)} {unit} done" + (f", {len(failed)} failed ({'; '.join(failed)})" if failed else '')


def fmt(v, spec='.2f'):
    return '—' if v is None else format(v, spec)


def report(out):
    """DIR/results.{md,csv,json,png} and DIR/<data>/grid.png from whatever has finished; returns the json dict."""
    path = os.path.join(out, 'sweep.json')
    if not os.path.isfile(path):
        raise SweepError(f"{path} not found: --report needs a directory written by sweep.py")
    with open(path) as f:
        spec = dict(json.load(f), out=out)
    source, values = methods.METHODS[spec['method']].papers.get(spec['pretrain'], (None, ()))
    model = (spec['arch'], spec.get('img_size', 224))
    if model != PAPER_SETTING:  # no paper number, and no delta, beside another model's
        source, values = None, ()
    paper = dict(zip(PAPER_KEYS, values))
    rows = []
    for name in spec['data']:
        cells, finals, best = dataset(spec, name)
        row = dict(data=name, lr=None, wd=None, prompts=None, val_accuracy=None, seeds=[], test_accuracies=[],
                   mean=None, std=None, n=0, tuned_params=None, paper=paper.get(name), delta=None,
                   status='phase 1: ' + tally(cells, 'cells'))
        if best is not None:
            done = [(c.seed, c.result()) for c in finals if c.result() is not None]
            accs = [r['accuracy'] for _, r in done]
            row.update(lr=best[0], wd=best[1], prompts=best[2], val_accuracy=best[3], seeds=[s for s, _ in done],
                       test_accuracies=accs, n=len(done), mean=mean_or_none(accs),
                       std=statistics.stdev(accs) if len(done) >= 2 else None, status=tally(finals, 'seeds'),
                       tuned_params=(done[0][1] if done else cells[0].result())['tuned_params'])
        if row['mean'] is not None and row['paper'] is not None:
            row['delta'] = row['mean'] - row['paper']
        rows.append(row)
    means = {r['data']: r['mean'] for r in rows}
    groups = {g: mean_or_none([means[m] for m in members]) for g, members in SUITES.items()
              if all(m in means for m in members)}
    result = dict(method=spec['method'], pretrain=spec['pretrain'], paper_source=source, rows=rows, groups=groups,
                  paper_groups={g: paper.get(g) for g in groups})
    runs.atomic_json(result, os.path.join(out, 'results.json'))
    with open(os.path.join(out, 'results.csv'), 'w', newline='') as f:
        csv.writer(f).writerows([list(rows[0])] + [
            [';'.join(map(str, v)) if isinstance(v, list) else '' if v is None else v for v in r.values()]
            for r in rows])
    src = (f" ({source})" if source else ' (no published number for this pair)' if model == PAPER_SETTING else
           f" (none: the papers' numbers are ViT-B/16 at 224 px, this is {model[0]} at {model[1]} px)")
    md = [f"# {spec['method']}, {spec['pretrain']} ({spec['arch']})", '',
          f"Grid of {len(spec['grid'])} cells on val, then {len(spec['seeds'])} seeds "
          f"({','.join(map(str, spec['seeds']))}) on test; top-1 %, final epoch; paper{src}.", '',
          '| data | lr | wd | prompts | val | test mean ± std | n | tuned params | paper | Δ | status |',
          '|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|']
    for r in rows:
        test = '—' if r['mean'] is None else fmt(r['mean']) + ('' if r['std'] is None else f" ± {r['std']:.2f}")
        prompts = (str(r['prompts']) if r['prompts'] is not None else
                   '—' if r['lr'] is None or spec['method'] not in methods.PROMPTED else "method's")
        md.append(f"| {r['data']} | {fmt(r['lr'], 'g')} | {fmt(r['wd'], 'g')} | {prompts} | "
                  f"{fmt(r['val_accuracy'])} | {test} | {r['n']} | {fmt(r['tuned_params'], ',d')} | "
                  f"{fmt(r['paper'])} | {fmt(r['delta'], '+.2f')} | {r['status']} |")
    if groups:
        md += ['', '| group | ours | paper | Δ |', '|---|--:|--:|--:|']
        for g, v in groups.items():
            p = paper.get(g)
            d = v - p if v is not None and p is not None else None
            md.append(f"| {GROUP_NAMES[g]} | {fmt(v)} | {fmt(p)} | {fmt(d, '+.2f')} |")
    with open(os.path.join(out, 'results.md'), 'w') as f:
        f.write('\n'.join(md) + '\n')
    plots(spec, rows, source)
    print('\n'.join(md))
    return result


def plots(spec, rows, source):
    """DIR/<data>/grid.png: val accuracy over the grid, one lr x wd heatmap per prompt length, the chosen cell
    marked; DIR/results.png: ours (mean ± std over the seeds) beside the paper, per dataset."""
    from matplotlib.figure import Figure  # without pyplot: no GUI backend, no figure to close
    from matplotlib.patches import Rectangle
    for r in rows:
        cells = dataset(spec, r['data'])[0]
        lrs, wds = sorted({c.lr for c in cells}), sorted({c.wd for c in cells})
        prompts = sorted({c.prompts for c in cells}, key=lambda p: -1 if p is None else p)
        fig = Figure(figsize=(1.2 + 1.1 * len(wds) * len(prompts), 1 + 0.45 * len(lrs)), layout='tight')
        for ax, p in zip(fig.subplots(1, len(prompts), squeeze=False)[0], prompts):
            acc = [[math.nan] * len(wds) for _ in lrs]
            for c in cells:
                if c.prompts == p and c.result() is not None:
                    acc[lrs.index(c.lr)][wds.index(c.wd)] = c.result()['accuracy']
            ax.imshow(acc, cmap='viridis', aspect='auto', vmin=0, vmax=100)
            for i, j in ((i, j) for i in range(len(lrs)) for j in range(len(wds))):
                v, chosen = acc[i][j], r['lr'] is not None and (lrs[i], wds[j], p) == (r['lr'], r['wd'], r['prompts'])
                ax.text(j, i, ('—' if math.isnan(v) else f"{v:.1f}") + (' *' if chosen else ''), ha='center',
                        va='center', color='white' if math.isnan(v) or v < 60 else 'black', fontsize=8,
                        fontweight='bold' if chosen else 'normal')
                if chosen:
                    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor='red', lw=2))
            ax.set(xticks=range(len(wds)), xticklabels=[f"{w:g}" for w in wds], xlabel='weight decay',
                   yticks=range(len(lrs)), yticklabels=[f"{v:g}" for v in lrs], ylabel='lr')
            ax.set_title(f"{r['data']} val %" + ('' if p is None else f", {p} prompts"), fontsize=9)
        fig.savefig(os.path.join(spec['out'], r['data'], 'grid.png'), dpi=100)
    x = range(len(rows))
    fig = Figure(figsize=(max(3.5, 1.5 + 0.6 * len(rows)), 3.5), layout='tight')
    ax = fig.subplots()
    ax.bar([i - 0.2 for i in x], [math.nan if r['mean'] is None else r['mean'] for r in rows], 0.4,
           yerr=[r['std'] or 0 for r in rows], label='ours (mean ± std)')
    ax.bar([i + 0.2 for i in x], [math.nan if r['paper'] is None else r['paper'] for r in rows], 0.4,
           label=f"paper ({source})" if source else 'paper')
    ax.set_xticks(list(x), [r['data'] for r in rows], rotation=45, ha='right', fontsize=8)
    ax.set(ylabel='test top-1 %', ylim=(0, 100))
    ax.set_title(f"{spec['method']}, {spec['pretrain']}", fontsize=9)
    ax.legend(fontsize=8, loc='lower center', bbox_to_anchor=(0.5, 1.1), ncol=2, frameon=False)  # above the bars
    fig.savefig(os.path.join(spec['out'], 'results.png'), dpi=100)


def main(argv):
    args, extra = parse_args(argv)
    if args.report is not None:
        report(args.report)
        return 0
    names = datasets_of(args.data)
    out = args.out or os.path.join('sweeps', f"{args.method}-{args.pretrain}-{args.data.replace(',', '+')}")
    spec = dict(method=args.method, pretrain=args.pretrain, arch=args.arch, img_size=args.img_size,
                weights=os.path.abspath(args.weights) if args.weights else None, data_root=args.data_root,
                data=names, grid=grid_of(args, extra), seeds=args.seeds, extra=extra, out=out)
    for cell in dataset(spec, names[0])[0]:  # train.py's own check of every cell's flags, before anything runs
        intended_config(cell.args)
    if args.dry_run:
        dry_run(spec)
        return 0
    for name in names:  # every existing cell directory (both phases) must hold this sweep's configuration
        for cell in sum(dataset(spec, name)[:2], []):
            cell.check()
    check_first(spec)  # the data and the weights, before anything is written
    os.makedirs(out, exist_ok=True)
    runs.atomic_json(spec, os.path.join(out, 'sweep.json'))
    if args.print_commands:  # phase 2 appears once a dataset's phase 1 has finished
        for task in (t for name in names for t in todo(spec, name)):
            os.makedirs(task.dir, exist_ok=True)
            print(shlex.join(task.command()) + ' > ' + shlex.quote(task.log) + ' 2>&1')
        return 0
    failed = execute(spec, Launcher(args, out))
    report(out)
    for cell in failed:
        print(f"error: {cell.data} {cell.key} failed ({last_error(cell.log) or 'no error line'}); see {cell.log}",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == '__main__':  # a SweepError, another sweep that holds --out, Ctrl-C / SIGTERM / SIGHUP: one line
    runs.cli(lambda argv: sys.exit(main(argv)))
