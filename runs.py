"""
The run directory contract of train.py and eval.py: where a run lives, how it starts, resumes and stops, and what
it records. The training loop itself is train.py; this is the bookkeeping around it (MAE's util/misc.py plays
this part in facebookresearch/mae).

    <out>/metrics.jsonl  one JSON object per epoch
    <out>/last.pt        tuned tensors only, optimizer, scaler, step, epoch, RNG states, the configuration
                         ('args'), the backbone identity; written atomically (write, then rename)
    <out>/result.json    the final accuracy and what a table needs, the environment, the whole configuration
    <out>/.lock          the pid of the one process that may write the directory (see lock)

A fresh start refuses a directory that holds a run unless --overwrite; --resume continues the configuration
recorded in last.pt, and an explicitly given flag may differ from it only if it is in RESUME_OVERRIDES. Every
anticipated failure is a RunError, which `cli` prints as one `error: ...` line (exit status 1; 130 for Ctrl-C,
SIGTERM and SIGHUP, which stop a run alike).
"""

import errno
import fcntl
import json
import os
import platform
import random
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import torch
import torch.distributed as dist

import data
import methods

# what --resume may change (data: as long as check_resumed finds the same examples); every other explicitly given
# flag must equal the checkpoint's value
RESUME_OVERRIDES = {'resume', 'overwrite', 'out', 'workers', 'data_root', 'weights', 'log_interval',
                    'stop_after_epoch', 'compile', 'device', 'grad_checkpointing', 'decoded_cache', 'vtab_source'}
# --workers' default: torch warns when a loader has more workers than the CPUs this process may run on
DEFAULT_WORKERS = min(4, len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1)


class RunError(RuntimeError):
    """A run that cannot start or must stop; the CLI prints the message and exits with status 1."""


class Interrupted(RunError):
    """Ctrl-C: the CLI prints the message and exits with status 130, as a shell does for SIGINT."""


def stop_on_signals():
    """SIGINT, SIGTERM and SIGHUP (Ctrl-C, a stopped sweep or job, a closed terminal) stop the process alike, once: a
    KeyboardInterrupt in the main thread, raised where this repository's code runs. Inside a library (a data loader
    building, stopping or finalising its workers, or passing them a batch) it is delivered again 50 ms later, for
    10 s at most: there the exception would be lost, or leave workers half stopped and tracebacks behind. Returns
    the handlers it replaced."""
    here, owner, state = os.path.dirname(os.path.abspath(__file__)), os.getpid(), dict(tries=0, busy=False)

    def again(signum):
        state['busy'] = False
        os.kill(owner, signum)

    def interrupt(signum, frame):
        if os.getpid() != owner or state['busy']:  # a forked loader worker (the main process stops it), or a stop
            return                                 # already under way
        state['busy'] = True
        if frame and os.path.dirname(frame.f_code.co_filename) != here and state['tries'] < 200:  # not a module here
            state['tries'] += 1
            threading.Timer(0.05, again, (signum,)).start()
        else:
            raise KeyboardInterrupt(signal.Signals(signum).name)
    return {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}


def cli(main_fn):
    """Run main_fn on the command line. An anticipated failure (RunError, an unreadable image, Ctrl-C, SIGTERM,
    SIGHUP) prints one `error: ...` line, no traceback, and exits with status 1 (130 when interrupted)."""
    handlers = stop_on_signals()
    try:
        main_fn(sys.argv[1:])
    except (RunError, data.ImageError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(130 if isinstance(e, Interrupted) else 1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    finally:  # as they were (tests call cli in their own process)
        for s, handler in handlers.items():
            signal.signal(s, handler)


def resolve_device(name):
    """--device auto|cpu|cuda|cuda:N -> torch.device (auto: cuda when available). Asking for CUDA where there is
    none is a RunError, never a silent fallback to the CPU."""
    if not re.fullmatch(r'auto|cpu|cuda(:\d+)?', name):
        raise RunError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    if name in ('auto', 'cpu'):
        return torch.device('cuda' if name == 'auto' and torch.cuda.is_available() else 'cpu')
    if not torch.cuda.is_available():
        raise RunError(f"--device {name}: torch sees no CUDA device (torch {torch.__version__}, built for CUDA "
                       f"{torch.version.cuda or 'none'}); pass --device cpu, or install the torch build for this "
                       f"machine's CUDA version (README: 'Set up')")
    device = torch.device(name)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise RunError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                       f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def setup_distributed(name):
    """(rank, world size, device) for --device `name`; torchrun sets RANK / WORLD_SIZE / LOCAL_RANK: nccl on GPU
    (each process on cuda:LOCAL_RANK), gloo on CPU."""
    device = resolve_device(name)
    if 'RANK' not in os.environ or 'WORLD_SIZE' not in os.environ:
        return 0, 1, device
    if device.type == 'cuda':
        if device.index is not None:
            raise RunError(f"--device {name} under torchrun: each process takes cuda:LOCAL_RANK; pass --device cuda")
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
        torch.cuda.set_device(device)
    dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return dist.get_rank(), dist.get_world_size(), device


def parse_flags(parser, argv):
    """parser.parse_args(argv), with one line for timm's habit `--resume PATH`: here --resume takes no value."""
    args, rest = parser.parse_known_args(argv)
    if rest and getattr(args, 'resume', None) and not rest[0].startswith('-'):
        run = os.path.dirname(rest[0]) if rest[0].endswith('.pt') else rest[0]
        parser.error(f"--resume takes no path: continue the run in {run} with `--resume --out {run}`")
    return parser.parse_args(argv)  # anything else left over: argparse's own message


def run_name(cfg, explicit, named):
    """runs/<method>-<data>-<pretrain>-<arch>-<eval split>-seed<seed>, then one -<flag><value> per explicitly given
    flag of `named` (numbers as lr0.1, words as depth_shallow, --no-sa2vp-dropout as no_sa2vp_dropout), so that
    runs that differ in anything that changes their result never share a directory."""
    arch = cfg['arch'].removeprefix('vit_').removesuffix('_224')
    parts = [cfg['method'], cfg['data'], cfg['pretrain'], arch, cfg['eval_split'], f"seed{cfg['seed']}"]
    for k in named:
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


# (flag, smallest value) of the flags checked by check_values, besides those with a rule of their own
AT_LEAST = [('epochs', 1), ('batch_size', 1), ('img_size', 1), ('accum', 1), ('eval_every', 1), ('prompts', 1),
            ('max_steps_per_epoch', 1), ('stop_after_epoch', 1), ('spt_kmeans_tokens', 1), ('sa2vp_dim', 1),
            ('sa2vp_window', 1), ('wd', 0), ('wd_head', 0), ('warmup_epochs', 0), ('min_lr', 0), ('workers', 0),
            ('log_interval', 0), ('sa2vp_gamma', 0)]


def check_flags(cfg, explicit, takes, flag, patch):
    """A RunError naming the first flag that cannot work: a method option the method does not take (`takes`; flag:
    option -> its flag, in --help's order), a value out of range, an --img-size that the patch size does not divide."""
    foreign = [k for k in flag if k in explicit and k not in takes and k in cfg['method_options']]
    if foreign:
        raise RunError(f"{', '.join(flag[k] for k in foreign)}: not an option of --method {cfg['method']}; its options "
                       f"are {', '.join(flag[k] for k in takes if k in flag) or 'none'}")
    rules = [(k, lambda v, lo=lo: v >= lo, f"at least {lo}" if lo else '0 or more') for k, lo in AT_LEAST]
    rules += [('lr', lambda v: v > 0, 'positive'), ('momentum', lambda v: 0 <= v < 1, 'in [0, 1)'),
              ('prompt_dropout', lambda v: 0 <= v < 1, 'in [0, 1)'),
              ('sa2vp_lambda', lambda v: 0 <= v <= 1, 'in [0, 1]')]
    for k, ok, what in rules:
        for v in cfg.get(k) if isinstance(cfg.get(k), list) else [cfg.get(k)]:  # --lr / --wd may be a grid's list
            if v is not None and not ok(v):
                raise RunError(f"--{k.replace('_', '-')} {v:g} must be {what}")
    lrs = cfg['lr'] if isinstance(cfg['lr'], list) else [cfg['lr']]
    if cfg['min_lr'] > min(lrs):
        raise RunError(f"--min-lr {cfg['min_lr']:g} is above --lr {min(lrs):g}: the cosine would rise")
    if cfg['img_size'] % patch:
        raise RunError(f"--img-size {cfg['img_size']} is not a multiple of {cfg['arch']}'s patch size {patch}; "
                       f"pass e.g. --img-size {max(patch, cfg['img_size'] // patch * patch)}")


# -----------------------------------------------------------------------------
# starting, resuming

_LOCKS = {}  # run directory -> the open <out>/.lock of a directory this process holds


def lock(out):
    """Hold the directory `out` for this process (again: nothing to do): a POSIX lock on out/.lock, which records
    the pid. The kernel drops it when the process ends, even by SIGKILL; forked loader workers do not inherit it."""
    out = os.path.abspath(out)
    if out in _LOCKS:
        return
    os.makedirs(out, exist_ok=True)
    f = open(os.path.join(out, '.lock'), 'a+')
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EAGAIN):  # a filesystem without POSIX locks (some clusters)
            warn(f"cannot lock {f.name} ({e.strerror}): nothing keeps a second process out of {out}")
        else:
            f.seek(0)
            pid = f.read().strip() or '?'
            f.close()
            raise RunError(f"{out} is in use by process {pid}, which holds {f.name}; wait for it to end, or stop it "
                           f"(kill {pid}) and continue with --resume") from None
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    _LOCKS[out] = f


def unlock(out=None):
    """Release the directory `out` (None: every directory this process holds)."""
    for key in [os.path.abspath(out)] if out else list(_LOCKS):
        if key in _LOCKS:
            _LOCKS.pop(key).close()


def teardown():
    """The end of a run, however it ends: its directories released, the torchrun process group destroyed."""
    unlock()
    if dist.is_initialized():
        dist.destroy_process_group()


def claim(out, overwrite, remove=True):
    """A fresh start in `out`: refused when it holds a run, unless --overwrite (then its run files go)."""
    ckpt_path, result_path = os.path.join(out, 'last.pt'), os.path.join(out, 'result.json')
    if os.path.exists(result_path) or os.path.exists(ckpt_path):
        what = 'a finished run (result.json)' if os.path.exists(result_path) else 'an unfinished run (last.pt)'
        if not overwrite:
            raise RunError(f"{out} already holds {what}; pass --resume to continue it, --overwrite to start afresh, "
                           f"or --out DIR to put this run elsewhere")
        for path in (ckpt_path, result_path) if remove else ():
            if os.path.exists(path):
                os.remove(path)


def open_run_dir(cfg, explicit, rank=0):
    """The run directory of a fresh start, an overwrite or a resume -> (configuration, checkpoint or None, result.json
    of a resumed run that has finished already or None). A resume continues the configuration recorded in last.pt
    with the RESUME_OVERRIDES that were given; metrics.jsonl keeps the lines up to the checkpoint's epoch."""
    out, ckpt = cfg['out'], None
    if cfg['resume'] and not os.path.isfile(os.path.join(out, 'last.pt')):
        raise RunError(f"cannot resume: {os.path.join(out, 'last.pt')} does not exist")
    if rank == 0:  # under torchrun, rank 0 holds the directory for every process
        lock(out)
    if not cfg['resume']:
        claim(out, cfg['overwrite'], remove=rank == 0)
        cfg = dict(cfg, allow_partial=os.environ.get('VPT_ALLOW_PARTIAL') == '1')  # recorded: resume and eval.py
    else:
        ckpt = torch.load(os.path.join(out, 'last.pt'), map_location='cpu', weights_only=True)
        rec = ckpt['args']
        if 'method' in explicit and cfg['method'] != rec['method']:
            raise RunError(f"cannot resume: --method {cfg['method']} differs from the checkpoint's {rec['method']} "
                           f"({os.path.join(out, 'last.pt')})")
        changed = [f"--{k.replace('_', '-')} {cfg[k]!r} (checkpoint: {rec.get(k)!r})" for k in sorted(explicit)
                   if k not in RESUME_OVERRIDES and cfg[k] != rec.get(k)]
        if changed:
            raise RunError(f"cannot resume {out} with a different configuration: {', '.join(changed)}")
        given = {k: v for k, v in cfg.items() if k in explicit and k in RESUME_OVERRIDES}
        cfg = {**rec, 'stop_after_epoch': None, **given, 'out': out, 'resume': True, 'overwrite': False}
        if ckpt['epoch'] >= cfg['epochs'] and os.path.exists(os.path.join(out, 'result.json')):
            print(f"{out} finished all {cfg['epochs']} epochs already; its result.json stands")
            return cfg, ckpt, read_json(os.path.join(out, 'result.json'))
    if rank == 0:  # the metrics of the epochs the checkpoint holds; a fresh start: none
        path, lines = os.path.join(out, 'metrics.jsonl'), []
        if ckpt is not None and os.path.exists(path):
            with open(path) as f:
                lines = [ln for ln in f if ln.strip() and json.loads(ln)['epoch'] <= ckpt['epoch']]
        os.makedirs(out, exist_ok=True)
        with open(path, 'w') as f:
            f.writelines(lines)
    return cfg, ckpt, None


def micro_batch(cfg, world):
    """The per-process micro-batch, --batch-size / (processes x --accum), which must divide."""
    if cfg['batch_size'] % (world * cfg['accum']):
        raise RunError(f"--batch-size {cfg['batch_size']} must be divisible by processes x --accum = {world} x "
                       f"{cfg['accum']}")
    return cfg['batch_size'] // (world * cfg['accum'])


def check_resumed(ckpt, cfg, identity):
    """A resumed run continues with its head's class count, on the backbone tensors it was trained on (any file or
    hub copy of them), on the same examples (config['data_source']'s fingerprints)."""
    if ckpt['args']['num_classes'] != cfg['num_classes']:
        raise RunError(f"cannot resume: {cfg['train_split']} of {cfg['data']} now holds {cfg['num_classes']} classes, "
                       f"the checkpoint's head has {ckpt['args']['num_classes']} ({cfg['out']})")
    if ckpt['identity'] != identity:
        raise RunError(f"cannot resume: the backbone is {identity}, but the checkpoint was trained on "
                       f"{ckpt['identity']} ({cfg['out']})")
    was, now = ckpt['args']['data_source'], cfg['data_source']
    if was['fingerprint'] != now['fingerprint']:  # e.g. VTAB-1k's TFDS files added since
        raise RunError(f"cannot resume: the data read now ({now['source']}, {now['dir']}) are not the checkpoint's "
                       f"({was['source']}, {was['dir']}); pass the --vtab-source / --data-root it read ({cfg['out']})")


def say(line):
    """print(line), flushed, in one write: a stop (Ctrl-C, SIGTERM) can land between print's text and its newline,
    and the `error: interrupted ...` line would then continue a half line of the log."""
    sys.stdout.write(f"{line}\n")
    sys.stdout.flush()


def warn(message):
    print(f"warning: {message}", file=sys.stderr, flush=True)


def interrupted(out):
    """The message for Ctrl-C: which checkpoint --resume would continue from."""
    try:
        epoch = torch.load(os.path.join(out, 'last.pt'), map_location='cpu', weights_only=True, mmap=True)['epoch']
    except Exception:  # no checkpoint (or none readable): nothing to continue
        return f"interrupted before the first checkpoint; nothing to resume in {out}"
    return (f"interrupted during epoch {epoch + 1}; the last checkpoint is after epoch {epoch}; "
            f"continue with `--resume --out {out}`")


def read_json(path):
    with open(path) as f:
        return json.load(f)


def load_tuned(model, state, source):
    """Load a tuned-tensor state dict; its keys must be exactly the model's tuned parameter names."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(names - set(state)), sorted(set(state) - names)
    if missing or unexpected:
        raise RunError(f"{source}: tuned tensors do not match the model: missing {missing[:8]}, "
                       f"unexpected {unexpected[:8]}")
    model.load_state_dict(state, strict=False)  # strict on the tuned names (checked above); shapes checked by torch


def read_run(run):
    """(checkpoint dict, recorded configuration) of run/last.pt, for eval.py."""
    path = os.path.join(run, 'last.pt')
    if not os.path.isfile(path):
        raise RunError(f"{run} holds no last.pt: not a train.py run directory (pass --run DIR)")
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise RunError(f"{path} is not a readable train.py checkpoint ({type(e).__name__}); train the run "
                       f"again") from None
    return ckpt, dict(ckpt['args'])


# -----------------------------------------------------------------------------
# checkpoints and records


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


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


def rng_states():
    """Every process's RNG state (a collective under DDP: every rank calls it)."""
    if not dist.is_initialized():
        return [rng_state()]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, rng_state())
    return states


def restore_rng(states, rank, world):
    set_rng_state(states[rank] if len(states) == world else states[0])
    if len(states) != world and rank == 0:
        warn(f"the checkpoint holds RNG states of {len(states)} processes, this run has {world}")


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


def save_epoch(out, row, rank, ckpt):
    """One epoch's record: its metrics line, then last.pt with every process's RNG state (rank 0 writes; every rank
    calls this, as the states are gathered under DDP)."""
    ckpt = dict(ckpt, rng=rng_states())
    if rank == 0:
        with open(os.path.join(out, 'metrics.jsonl'), 'a') as f:
            f.write(json.dumps(row) + '\n')
        atomic_save(ckpt, os.path.join(out, 'last.pt'))


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


def data_record(*datasets):
    """The data a run read (config['data_source']): the source (tfds, folder, scikit-learn), its folder, the TFDS
    dataset and version, and per split the fingerprint `python data.py --check` prints."""
    import datacheck
    ds = datasets[0]
    return dict(source=ds.source, dir=ds.root and str(ds.root), tfds_version=getattr(ds, 'version', None),
                fingerprint={d.split: datacheck.fingerprint(d) for d in datasets})


def run_record(cfg, model, world, micro, steps_per_epoch, dtype, **extra):
    """The configuration as a run ran it (last.pt's 'args', result.json's 'config'): cfg, the backbone's identity,
    processes, micro-batch, steps per epoch, the autocast dtype and the model's options, read back."""
    return dict(cfg, backbone_identity=model.backbone.identity, world_size=world, micro_batch=micro,
                steps_per_epoch=steps_per_epoch, amp_dtype=str(dtype or torch.float32).replace('torch.', ''),
                model_options=methods.built_options(model), **extra)


def result_record(config, accuracy, tuned, total, wall_time_s, device):
    """result.json: what a table needs at the top level, then the whole configuration of the run."""
    return dict(method=config['method'], data=config['data'], eval_split=config['eval_split'], accuracy=accuracy,
                tuned_params=tuned, total_params=total, epochs=config['epochs'], arch=config['arch'],
                pretrain=config['pretrain'], seed=config['seed'], backbone_identity=config['backbone_identity'],
                wall_time_s=wall_time_s, **environment(device), config=config)


def peak_memory_mb(device):
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    except ImportError:  # Windows
        return float('nan')


def progress(cfg, epoch, s, steps, loss, lr, images, t0, steps_left, device):
    """The progress line after step s (0-based) of an epoch that started at t0."""
    per_step = (time.time() - t0) / (s + 1)
    return (f"epoch {epoch + 1}/{cfg['epochs']} step {s + 1}/{steps} | loss {loss:.4f} | lr {lr:.3e} | "
            f"{per_step:.3f} s/step, {images / (time.time() - t0):.0f} img/s | peak {peak_memory_mb(device):.0f} MB | "
            f"eta {duration(per_step * steps_left)}")


def duration(seconds):
    """'3d 04:05:06' / '04:05:06'."""
    days, rest = divmod(int(seconds), 86400)
    return (f'{days}d ' if days else '') + time.strftime('%H:%M:%S', time.gmtime(rest))
