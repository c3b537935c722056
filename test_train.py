"""Tests for train.py and eval.py on the CPU: a tiny random ViT (vit_nano_patch8: dim 32, depth 2) on the offline
digits set at 16 px, a few steps per run.

Run: python -m pytest -q test_train.py     (49 tests, about 2 minutes on a shared 2-core CPU)

Most runs call train.main([...]) in-process with one torch thread (with 2 threads on a 2-core CPU whose other
core is busy, these tiny models ran up to ~30x slower). The torchrun and CLI runs are subprocesses started at the
beginning of the module so that their start-up overlaps with the in-process tests.

Why 16 px: the random backbone's frozen features are weak at 32 px (a logistic-regression probe on its cls
features reaches 35-50% on digits val200), but good at 16 px (a 2x2 patch grid: 82-84%), so the
accuracy tests are fast and far from chance.
"""

import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import data
import eval as eval_py
import maps
import methods
import models
import runs
import train
import weights
from train import RunError

HERE = Path(__file__).resolve().parent
TINY = ['--arch', 'vit_nano_patch8', '--pretrain', 'none', '--data', 'digits', '--img-size', '16', '--workers', '0',
        '--log-interval', '0']
TINY_IN21K = [a if a != 'none' else 'in21k' for a in TINY]  # the same, on a weights file given with --weights


def weights_files(tmp_path):
    """({'pth', 'safetensors'}: one set of vit_nano tensors in two formats, another set as .pth)."""
    from safetensors.torch import save_file
    torch.manual_seed(1)
    sd = models.create_backbone('vit_nano_patch8', img_size=16).state_dict()
    a = {'pth': tmp_path / 'a.pth', 'safetensors': tmp_path / 'a.safetensors'}
    torch.save(sd, a['pth'])
    save_file({k: v.contiguous() for k, v in sd.items()}, str(a['safetensors']))
    torch.manual_seed(2)
    torch.save(models.create_backbone('vit_nano_patch8', img_size=16).state_dict(), tmp_path / 'b.pth')
    return a, tmp_path / 'b.pth'
CKPT_KEYS = {'model', 'optimizer', 'scaler', 'step', 'epoch', 'rng', 'args', 'identity', 'method', 'wall_time_s'}
METRIC_KEYS = {'epoch', 'train_loss', 'accuracy', 'eval_split', 'lr', 'images_per_s', 'peak_mem_mb', 'time'}
RESULT_KEYS = {'method', 'data', 'eval_split', 'accuracy', 'tuned_params', 'total_params', 'epochs', 'config',
               'arch', 'pretrain', 'seed', 'wall_time_s', 'device', 'torch', 'timm', 'python', 'git_commit'}


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def resume_args(method, out, ddp=False):
    """[uninterrupted run in out/a, the same stopped after epoch 1 in out/b, its resume]: 3 epochs of 2 steps at
    --workers 2 with the method's own dropout (so the global RNG stream matters), evaluated after every epoch. SA²VP
    under DDP on vit_tiny at 32 px: its deep prompt maps sit at blocks 4 and 8, so on vit_nano's 2 blocks they are
    empty parameters, which get no gradient, and DDP refuses a parameter without one."""
    args = TINY[:-4] + ['--workers', '2', '--log-interval', '0', '--method', method, '--epochs', '3',
                        '--max-steps-per-epoch', '2', '--batch-size', '16', '--warmup-epochs', '0']
    args += ['--arch', 'vit_tiny_patch16_224', '--img-size', '32'] if ddp and method == 'sa2vp' else []
    args += [a for a in SHORT_RUN.get(method, []) if a != '--no-sa2vp-dropout']
    args += ['--prompts', '4'] if method in methods.PROMPTED else []
    return [args + ['--out', str(out / 'a')], args + ['--out', str(out / 'b'), '--stop-after-epoch', '1'],
            ['--resume', '--out', str(out / 'b')]]


def assert_same_run(a, b):
    """Two run directories hold bit-identical results: tuned tensors, optimizer state, step, metrics, accuracy."""
    ca, cb = (torch.load(d / 'last.pt', weights_only=True) for d in (a, b))
    assert set(ca['model']) == set(cb['model']) and ca['step'] == cb['step']
    assert all(torch.equal(ca['model'][k], cb['model'][k]) for k in ca['model']), b
    flat = lambda state: [v for s in state['state'].values() for v in s.values() if torch.is_tensor(v)]  # noqa: E731
    assert all(torch.equal(x, y) for x, y in zip(flat(ca['optimizer']), flat(cb['optimizer'])))
    strip = lambda rows: [{k: r[k] for k in ('epoch', 'train_loss', 'accuracy', 'lr')} for r in rows]  # noqa: E731
    assert strip(read_metrics(a)) == strip(read_metrics(b))
    assert json.loads((a / 'result.json').read_text())['accuracy'] == json.loads((b / 'result.json').read_text())[
        'accuracy']


def ddp_args(out, accum):
    """One optimizer step of VPT with a global batch of 32, no warmup (so lr > 0), no prompt dropout."""
    return TINY + ['--method', 'vpt', '--prompts', '4', '--prompt-dropout', '0', '--batch-size', '32', '--epochs', '1',
                   '--max-steps-per-epoch', '1', '--warmup-epochs', '0', '--accum', str(accum), '--out', str(out)]


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='module', autouse=True)
def subprocesses(tmp_path_factory):
    """Start the torchrun run (2 processes, gloo) and two CLI runs now; tests wait for them later."""
    root = tmp_path_factory.mktemp('sub')
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR',
                                                            'MASTER_PORT')}
    env['OMP_NUM_THREADS'] = '1'

    def start(cmd):
        return subprocess.Popen(cmd, cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    # under torchrun: train.main on each argument list in turn, each on a store of its own (torch numbers a new
    # process group as the destroyed one, so a second group on torchrun's store would read the first one's keys)
    driver = root / ('runs_in_one_process' + '.py')
    driver.write_text(f"import json, os, sys\nsys.path.insert(0, {str(HERE)!r})\nimport train\n"
                      f"for i, argv in enumerate(json.loads(sys.argv[2])):\n"
                      f"    os.environ.update(MASTER_PORT=str(int(sys.argv[1]) + i),\n"
                      f"                      TORCHELASTIC_USE_AGENT_STORE='0')\n"
                      f"    train.main(argv)\n")
    resumes = [a for m in methods.METHODS for a in resume_args(m, root / 'ddp-resume' / m, ddp=True)]
    procs = {
        'ddp': start([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_port',
                      str(free_port()), 'train.py', *ddp_args(root / 'ddp', accum=2)]),
        'ddp-resume': start([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_port',
                             str(free_port()), str(driver), str(free_port()), json.dumps(resumes)]),
        'help': start([sys.executable, 'train.py', '--help']),
        'error': start([sys.executable, 'train.py', *TINY, '--method', 'vpt', '--resume', '--out', str(root / 'none')]),
    }
    procs['root'] = root
    yield procs
    for name, p in procs.items():  # a module stopped early (pytest -x): SIGTERM lets torchrun end its workers
        if name != 'root' and p.poll() is None:
            p.terminate()
            try:
                p.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()


def finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """train(name, args) -> (run dir, result); each named run is trained once per module."""
    cache, root = {}, tmp_path_factory.mktemp('runs')

    def train_once(name, args):
        if name not in cache:
            out = root / name
            cache[name] = (out, train.main(args + ['--out', str(out)]))
        return cache[name]
    return train_once


# a sane lr per method for a 36-step run on the random backbone (SPT / SA²VP's AdamW recipe lr of 1e-3 barely
# moves the loss in 36 steps); SA²VP without its backbone dropout, which slows a 32-dim model down a lot. A method
# not listed runs its recipe's lr.
SHORT_RUN = {'linear': ['--lr', '0.1'], 'full': ['--optimizer', 'adamw', '--lr', '1e-3'], 'vpt': ['--lr', '0.25'],
             'spt': ['--lr', '0.1'], 'lspt': ['--lr', '0.1'], 'sa2vp': ['--lr', '2e-2', '--no-sa2vp-dropout']}


def short_run(trained, method):
    args = TINY + ['--method', method, '--epochs', '3', '--max-steps-per-epoch', '12', '--batch-size', '32',
                   '--warmup-epochs', '0', *SHORT_RUN.get(method, [])]
    args += ['--prompts', '4'] if method in methods.PROMPTED else []
    return trained(f'short-{method}', args)


def read_metrics(out):
    return [json.loads(line) for line in open(out / 'metrics.jsonl')]


# -----------------------------------------------------------------------------
# configuration


def test_recipes_resolve_and_overrides_win():
    cfg, _ = train.parse_args(['--method', 'spt', '--data', 'cub'])
    assert (cfg['optimizer'], cfg['lr'], cfg['wd'], cfg['wd_head'], cfg['batch_size'], cfg['min_lr']) == \
        ('adamw', 1e-3, 1e-2, 1.0, 32, 1e-8)
    assert (cfg['arch'], cfg['pretrain'], cfg['img_size']) == ('vit_base_patch16_224', 'in21k', 224)
    assert cfg['eval_split'] == 'val'
    assert cfg['out'] == os.path.join('runs', 'spt-cub-in21k-base_patch16-val-seed0')
    cfg, _ = train.parse_args(['--method', 'vpt', '--data', 'dogs', '--lr', '0.5', '--epochs', '7'])
    assert (cfg['lr'], cfg['epochs'], cfg['wd'], cfg['batch_size'], cfg['warmup_epochs']) == (0.5, 7, 1e-3, 64, 10)
    cfg, _ = train.parse_args(['--method', 'sa2vp', '--data', 'cars'])
    assert (cfg['sa2vp_dim'], cfg['sa2vp_gamma'], cfg['min_lr']) == (64, 1.5, 1e-7)
    cfg, _ = train.parse_args(['--method', 'sa2vp', '--data', 'digits', '--sa2vp-gamma', '0.3'])
    assert (cfg['sa2vp_dim'], cfg['sa2vp_gamma']) == (methods.SA2VP_DEFAULT[0], 0.3)
    cfg, _ = train.parse_args(['--method', 'lspt', '--data', 'cub', '--pretrain', 'mae'])
    assert (cfg['optimizer'], cfg['lr'], cfg['wd'], cfg['batch_size']) == ('sgd', 0.1, 0.0, 64)
    with pytest.raises(SystemExit):
        train.parse_args(['--method', 'vpt'])  # --data is required


def test_lr_schedule():
    lr = lambda s: train.lr_at(s, total=110, warmup=10, lr=1.0, min_lr=0.1)  # noqa: E731
    assert lr(0) == 0.0 and lr(5) == pytest.approx(0.5) and lr(10) == pytest.approx(1.0)
    assert lr(60) == pytest.approx(0.1 + 0.9 * 0.5) and lr(110) == pytest.approx(0.1)
    assert train.lr_at(0, total=10, warmup=0, lr=0.3, min_lr=0.0) == pytest.approx(0.3)


def test_weight_decay_groups():
    def decay(method, **options):
        cfg, _ = train.parse_args(['--method', method, '--data', 'digits'])
        torch.manual_seed(0)
        model = methods.build_model(method, models.create_backbone('vit_nano_patch8', img_size=16), 10, **options)
        opt = train.make_optimizer(model, cfg)
        by_param = {id(p): g['weight_decay'] for g in opt.param_groups for p in g['params']}
        return {n: by_param[id(p)] for n, p in model.named_parameters() if p.requires_grad}

    assert decay('vpt') == {'prompts': 1e-3, 'head.weight': 1e-3, 'head.bias': 0.0}    # VPT: all but the head bias
    assert decay('spt', prompts=4) == {'prompts': 1e-2, 'head.weight': 1.0, 'head.bias': 0.0}
    wd = decay('sa2vp')
    assert wd['ppt'] == wd['adapters.0.fc1.weight'] == wd['head.weight'] == 1e-4
    assert wd['adapters.0.fc1.bias'] == wd['adapters.0.norm.weight'] == wd['head.bias'] == 0.0


# -----------------------------------------------------------------------------
# every method end to end


@pytest.mark.parametrize('method', list(methods.METHODS))
def test_every_method_trains(trained, method):
    out, result = short_run(trained, method)
    rows = read_metrics(out)
    assert [r['epoch'] for r in rows] == [1, 2, 3] and all(METRIC_KEYS <= set(r) for r in rows)
    assert RESULT_KEYS <= set(result) and result == json.loads((out / 'result.json').read_text())
    assert result['method'] == method and result['eval_split'] == 'val' and result['epochs'] == 3
    assert result['accuracy'] == rows[-1]['accuracy'] and 0 <= result['accuracy'] <= 100
    assert all(r['eval_split'] == result['eval_split'] for r in rows)  # one name for the accuracy and the split
    assert (result['arch'], result['pretrain'], result['seed']) == ('vit_nano_patch8', 'none', 0)
    assert result['python'] == platform.python_version() and result['torch'] == torch.__version__
    assert result['device'].startswith('cpu') and result['wall_time_s'] > 0
    head = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=HERE, capture_output=True, text=True).stdout.strip()
    assert result['git_commit'].removesuffix('-dirty') == head  # the tests run in a git checkout
    given = SHORT_RUN.get(method, [])
    lr = float(given[given.index('--lr') + 1]) if '--lr' in given else methods.METHODS[method].recipe['lr']
    assert result['config']['backbone_identity'] == 'random' and result['config']['lr'] == lr
    ckpt = torch.load(out / 'last.pt', map_location='cpu', weights_only=True)
    assert CKPT_KEYS == set(ckpt) and (ckpt['epoch'], ckpt['step']) == (3, 36)
    # last.pt holds exactly the tuned tensors, and is small (tensors + optimizer state + a few kB)
    model = train.build(dict(ckpt['args']), torch.device('cpu'))
    assert set(ckpt['model']) == set(methods.tuned_state_dict(model))
    tuned = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert tuned == result['tuned_params'] and result['total_params'] == sum(p.numel() for p in model.parameters())
    assert os.path.getsize(out / 'last.pt') < 4 * 3 * tuned + 64 * 1024
    if method != 'full':
        assert not any(k.startswith('backbone.') for k in ckpt['model'])
    # the loss goes down: mean train loss of epoch 3 vs epoch 1 (measured ratios 0.60-0.96 over seeds 0-2;
    # the runs are seeded, so this is deterministic on a given platform)
    losses = [r['train_loss'] for r in rows]
    assert losses[-1] < 0.98 * losses[0], losses


@pytest.mark.parametrize('method', list(methods.METHODS))
def test_bf16_autocast_on_cpu(tmp_path, method):
    args = TINY + ['--method', method, '--amp', 'bf16', '--epochs', '1', '--max-steps-per-epoch', '2',
                   '--batch-size', '16', '--out', str(tmp_path)]
    args += ['--prompts', '4'] if method in methods.PROMPTED else []
    result = train.main(args)
    assert result['config']['amp_dtype'] == 'bfloat16'
    assert all(torch.isfinite(torch.tensor(r['train_loss'])) for r in read_metrics(tmp_path))


def test_grad_checkpointing_flag_trains_the_same(tmp_path, monkeypatch):
    # SA²VP with its backbone dropout on: the recomputation must draw the same masks, so the run is unchanged
    args = TINY + ['--method', 'sa2vp', '--epochs', '1', '--max-steps-per-epoch', '2', '--batch-size', '16',
                   '--warmup-epochs', '0']
    plain = train.main(args + ['--out', str(tmp_path / 'plain')])
    calls = []
    real = methods.checkpoint
    monkeypatch.setattr(methods, 'checkpoint', lambda *a, **k: calls.append(1) or real(*a, **k))
    ckpt = train.main(args + ['--grad-checkpointing', '--out', str(tmp_path / 'ckpt')])
    assert len(calls) == 2 * 2   # 2 layers of vit_nano x 2 steps; none in evaluation
    assert ckpt['config']['grad_checkpointing'] and not plain['config']['grad_checkpointing']
    assert read_metrics(tmp_path / 'ckpt')[0]['train_loss'] == read_metrics(tmp_path / 'plain')[0]['train_loss']
    assert ckpt['accuracy'] == plain['accuracy']
    a, b = (torch.load(tmp_path / d / 'last.pt', weights_only=True)['model'] for d in ('plain', 'ckpt'))
    assert all(torch.equal(a[k], b[k]) for k in a)


def tiny_cub(root):
    """<root>/CUB_200_2011 with 12 train / 6 val JPEGs of 3 classes and two aspect ratios."""
    folder = root / 'CUB_200_2011'
    g = torch.Generator().manual_seed(0)
    for split, n in (('train', 12), ('val', 6)):
        entries = {}
        for k in range(n):
            rel = f'{k % 3:03d}.bird/{split}_{k}.jpg'
            (folder / 'images' / rel).parent.mkdir(parents=True, exist_ok=True)
            size = (30, 40) if k % 2 else (40, 30)   # (h, w): portrait and landscape
            img = torch.randint(0, 256, (*size, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(img).save(folder / 'images' / rel)
            entries[rel] = k % 3 + 1
        (folder / f'{split}.json').write_text(json.dumps(entries))
    return root


def test_decoded_cache_trains_bit_identically(tmp_path, monkeypatch):
    # the same RNG draws in the same order (crops, flips, then prompt dropout): the same run, to the bit
    monkeypatch.setenv('VPT_ALLOW_PARTIAL', '1')
    args = ['--arch', 'vit_nano_patch8', '--pretrain', 'none', '--data', 'cub', '--data-root', str(tiny_cub(tmp_path)),
            '--img-size', '16', '--workers', '0', '--log-interval', '0', '--method', 'vpt', '--prompts', '2',
            '--epochs', '2', '--batch-size', '4', '--warmup-epochs', '0']
    plain = train.main(args + ['--out', str(tmp_path / 'plain')])
    cached = train.main(args + ['--decoded-cache', '--out', str(tmp_path / 'cached')])
    assert cached['config']['decoded_cache'] and not plain['config']['decoded_cache']
    strip = lambda rows: [(r['train_loss'], r['accuracy']) for r in rows]  # noqa: E731
    assert strip(read_metrics(tmp_path / 'cached')) == strip(read_metrics(tmp_path / 'plain'))
    a, b = (torch.load(tmp_path / d / 'last.pt', weights_only=True)['model'] for d in ('plain', 'cached'))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(RunError, match='--decoded-cache'):
        train.main(TINY + ['--method', 'vpt', '--decoded-cache', '--out', str(tmp_path / 'digits')])
    bad = tmp_path / 'CUB_200_2011' / 'images' / '001.bird' / 'train_4.jpg'
    bad.write_bytes(b'not a jpeg')   # decoded by a worker process: one message naming the file, no traceback
    with pytest.raises(RunError, match=f"--decoded-cache: cannot read image {bad}"):
        train.main(args[:args.index('--workers')] + args[args.index('--workers') + 2:]
                   + ['--workers', '2', '--decoded-cache', '--out', str(tmp_path / 'bad')])


# -----------------------------------------------------------------------------
# accuracy on digits with a random tiny backbone


def vpt_run(trained):
    # measured val200 accuracy for seeds 0/1/2: 69.0 / 60.0 / 62.5% (chance 10%), ~3 s
    return trained('vpt-acc', TINY + ['--method', 'vpt', '--prompts', '4', '--lr', '0.25', '--epochs', '12',
                                      '--batch-size', '32', '--warmup-epochs', '1'])


def test_full_and_vpt_reach_accuracy(trained):
    # full fine-tuning of the random ViT with AdamW (SGD at lr 0.0025, the recipe for a pre-trained backbone, barely
    # moves a random one): measured 88.5 / 84.0 / 90.0% for seeds 0/1/2, ~3 s. Thresholds leave >20 points of room.
    _, full = trained('full-acc', TINY + ['--method', 'full', '--optimizer', 'adamw', '--lr', '1e-3', '--epochs', '8',
                                          '--batch-size', '32', '--warmup-epochs', '1'])
    assert full['accuracy'] >= 60, full['accuracy']
    _, vpt = vpt_run(trained)
    assert vpt['accuracy'] >= 40, vpt['accuracy']


# -----------------------------------------------------------------------------
# resume, errors


@pytest.mark.parametrize('method', list(methods.METHODS))
def test_resume_is_bit_exact_at_workers_2(tmp_path, method):
    """Stopped after epoch 1 and resumed in a new loader (as a new process would): the eval loader's persistent
    workers start again, and must not draw from the global RNG (dropout masks, train workers' seeds) to do so."""
    first, stopped, resumed = resume_args(method, tmp_path)
    train.main(first)
    assert train.main(stopped) is None and not (tmp_path / 'b' / 'result.json').exists()
    assert torch.load(tmp_path / 'b' / 'last.pt', weights_only=True)['epoch'] == 1
    train.main(resumed)
    assert_same_run(tmp_path / 'a', tmp_path / 'b')


def test_ddp_resume_is_bit_exact_for_every_method(subprocesses):
    """The same under torchrun (2 processes, gloo): every method, --workers 2, one torchrun for all the runs."""
    code, out, err = finish(subprocesses['ddp-resume'], timeout=600)
    assert code == 0, err[-3000:]
    for method in methods.METHODS:
        run = subprocesses['root'] / 'ddp-resume' / method
        assert torch.load(run / 'a' / 'last.pt', weights_only=True)['args']['world_size'] == 2
        assert_same_run(run / 'a', run / 'b')


def test_resume_refuses_other_method_or_backbone(tmp_path):
    out = tmp_path / 'run'
    args = TINY + ['--method', 'vpt', '--prompts', '4', '--epochs', '2', '--max-steps-per-epoch', '1',
                   '--batch-size', '16', '--lr', '0.25']
    assert train.main(args + ['--out', str(out), '--stop-after-epoch', '1']) is None
    with pytest.raises(RunError, match='--method spt differs'):
        train.main(TINY + ['--method', 'spt', '--resume', '--out', str(out)])
    other = tmp_path / 'other.pth'
    torch.save(models.create_backbone('vit_nano_patch8', img_size=16).state_dict(), other)
    with pytest.raises(RunError, match=r'--pretrain none means a random backbone.*drop --weights'):
        train.main(TINY + ['--method', 'vpt', '--resume', '--out', str(out), '--weights', str(other)])
    # a run on a weights file resumes on the same tensors in another format, not on other tensors
    a, b = weights_files(tmp_path)
    run_a = tmp_path / 'run-a'
    args_a = TINY_IN21K + ['--method', 'vpt', '--prompts', '4', '--epochs', '2', '--max-steps-per-epoch', '1',
                           '--batch-size', '16', '--out', str(run_a)]
    assert train.main(args_a + ['--weights', str(a['pth']), '--stop-after-epoch', '1']) is None
    with pytest.raises(RunError, match=r'backbone is tensors:[0-9a-f]{16}, but the checkpoint was trained on '
                                       r'tensors:[0-9a-f]{16}'):
        train.main(['--resume', '--out', str(run_a), '--weights', str(b)])
    assert train.main(['--resume', '--out', str(run_a), '--weights', str(a['safetensors'])])['epochs'] == 2
    with pytest.raises(RunError, match='different configuration: --lr'):
        train.main(TINY + ['--method', 'vpt', '--resume', '--out', str(out), '--lr', '0.1'])
    assert train.main(TINY + ['--resume', '--out', str(out), '--workers', '0'])['epochs'] == 2  # the run is intact


def test_finished_run_dir_is_not_overwritten(trained):
    out, result = vpt_run(trained)
    args = TINY + ['--method', 'vpt', '--prompts', '4', '--out', str(out)]
    with pytest.raises(RunError, match=r'already holds a finished run .*--resume.*--overwrite.*--out DIR'):
        train.main(args)
    assert json.loads((out / 'result.json').read_text()) == result
    assert train.main(args + ['--resume'])['accuracy'] == result['accuracy']  # nothing left to train


def test_nan_loss_stops_the_run(tmp_path, monkeypatch):
    calls, real = [], methods.VPT.loss

    def nan_at_step_2(self, x, y):  # the loss of global step 2 (0-based) times NaN
        calls.append(1)
        return real(self, x, y) * (float('nan') if len(calls) == 3 else 1.0)
    monkeypatch.setattr(methods.VPT, 'loss', nan_at_step_2)
    with pytest.raises(RunError, match=r'non-finite loss nan at epoch 1, step 3 of 5 \(global step 2\)'):
        train.main(TINY + ['--method', 'vpt', '--prompts', '4', '--epochs', '2', '--max-steps-per-epoch', '5',
                           '--batch-size', '16', '--out', str(tmp_path)])
    assert not (tmp_path / 'result.json').exists() and not (tmp_path / 'last.pt').exists()


def test_cli(subprocesses):
    code, out, err = finish(subprocesses['help'])
    assert code == 0, err
    assert 'recipe: linear 0.1, full 0.0025, vpt 0.25, spt 0.001, lspt 0.1, sa2vp 0.001' in ' '.join(out.split())
    code, out, err = finish(subprocesses['error'])
    assert code == 1 and 'error: cannot resume' in err and 'Traceback' not in err, err


# -----------------------------------------------------------------------------
# DDP and gradient accumulation: the global batch does not depend on processes x micro-batches


def test_ddp_and_accumulation_match_one_process(subprocesses, tmp_path):
    # TrainSampler gives rank r the indices perm[r::2] of one seeded permutation, so the first optimizer step of
    # 2 processes x 2 micro-batches x 8 covers exactly perm[:32], the first batch of one process: the same
    # samples, hence the same mean-loss gradient and the same update.
    ref = train.main(ddp_args(tmp_path / 'ref', accum=1))
    train.main(ddp_args(tmp_path / 'acc2', accum=2))
    code, out, err = finish(subprocesses['ddp'])
    assert code == 0, err[-3000:]
    ddp_dir = subprocesses['root'] / 'ddp'
    ddp = json.loads((ddp_dir / 'result.json').read_text())
    assert (ddp['config']['world_size'], ddp['config']['micro_batch']) == (2, 8)
    assert (ref['config']['world_size'], ref['config']['micro_batch']) == (1, 32)
    tensors = {name: torch.load(d / 'last.pt', weights_only=True)['model']
               for name, d in [('ref', tmp_path / 'ref'), ('acc2', tmp_path / 'acc2'), ('ddp', ddp_dir)]}
    # the initial tuned tensors (train.build is seeded): the one step must have moved them
    ref_args = torch.load(tmp_path / 'ref' / 'last.pt', weights_only=True)['args']
    init = train.build(dict(ref_args), torch.device('cpu'))
    init = methods.tuned_state_dict(init)
    for k, v in tensors['ref'].items():
        assert not torch.allclose(v, init[k], atol=1e-4), k
        for other in ('acc2', 'ddp'):
            torch.testing.assert_close(tensors[other][k], v, rtol=0, atol=1e-5, msg=f'{other} {k}')
    assert read_metrics(ddp_dir)[0]['train_loss'] == pytest.approx(read_metrics(tmp_path / 'ref')[0]['train_loss'],
                                                                   abs=1e-5)


# -----------------------------------------------------------------------------
# eval.py


def test_eval_reproduces_and_refuses_other_backbone(trained, tmp_path, capsys):
    out, result = vpt_run(trained)
    assert eval_py.main(['--run', str(out), '--workers', '0']) == result['accuracy']
    assert f"train.py reported {result['accuracy']:.2f}%" in capsys.readouterr().out
    record = json.loads((out / 'eval-val.json').read_text())  # eval.py's result, next to train.py's
    assert record['accuracy'] == result['accuracy'] and record['eval_split'] == 'val' and record['images'] == 200
    assert {'device', 'torch', 'timm', 'python', 'git_commit', 'backbone_identity'} <= set(record)
    a, b = weights_files(tmp_path)
    run = tmp_path / 'run-a'
    trained_a = train.main(TINY_IN21K + ['--method', 'linear', '--epochs', '1', '--max-steps-per-epoch', '2',
                                         '--batch-size', '16', '--weights', str(a['pth']), '--out', str(run)])
    for fmt in ('pth', 'safetensors'):  # the same tensors in any file are the same backbone
        assert eval_py.main(['--run', str(run), '--weights', str(a[fmt]), '--workers', '0']) == trained_a['accuracy']
    with pytest.raises(RunError, match=r'trained on tensors:[0-9a-f]{16}, but the backbone built here is '
                                       r'tensors:[0-9a-f]{16}'):
        eval_py.main(['--run', str(run), '--weights', str(b), '--workers', '0'])
    with pytest.raises(RunError, match='backbone mismatch'):
        eval_py.main(['--run', str(run), '--weights', str(b), '--workers', '0'])


@pytest.mark.parametrize('method', ['vpt', 'sa2vp'])
def test_eval_maps(trained, method, capsys):
    out, _ = short_run(trained, method)
    eval_py.main(['--run', str(out), '--maps', '3', '--workers', '0'])
    captured = capsys.readouterr()
    assert 'warning: the patch grid is 2x2 (--img-size 16 / patch 8)' in captured.err  # 16 px: too coarse to read
    assert re.search(r'drew maps of 3 images into .*maps \(one figure each\); colour scale shared', captured.out)
    files = sorted((out / 'maps').glob('*.png'))
    assert [f.name for f in files] == [f'val200_{i:05d}.png' for i in range(3)]  # one figure per image
    for f in files:
        with Image.open(f) as im:
            im.load()
            assert im.width > im.height >= 200  # input + one panel per map, side by side


def test_maps_titles_predictions_and_one_scale(trained, tmp_path):
    out, _ = short_run(trained, 'sa2vp')  # two maps per image
    model, cfg = eval_py.load_run(str(out), torch.device('cpu'))
    ds = data.build_dataset('digits', 'val200', img_size=16, mean=cfg['mean'], std=cfg['std'])
    figures, scales = maps.write_maps(model, ds, 5, 2, torch.device('cpu'), cfg['mean'], cfg['std'], str(tmp_path),
                                      'val200')
    x = torch.stack([ds[i][0] for i in range(5)])
    with torch.no_grad():
        pred = model(x).argmax(-1).tolist()
    for i, f in enumerate(figures):
        assert (f['index'], f['true'], f['pred']) == (i, ds[i][1], pred[i])
        assert f['title'] == f"val200 image {i}: true {ds[i][1]}, predicted {pred[i]}"  # digits' names are digits
        assert Path(f['path']).is_file()
    # one colour scale per kind for the whole run: the min and max over all 5 images (drawn 2 at a time)
    for kind, fn in [('attention', maps.attention_map), ('similarity', maps.similarity_map)]:
        m = fn(model, x)
        assert scales[kind] == pytest.approx((m.min().item(), m.max().item()), abs=1e-6)


def test_attention_map_is_a_distribution_over_patches(trained):
    out, _ = short_run(trained, 'vpt')
    model, cfg = eval_py.load_run(str(out), torch.device('cpu'))
    x = torch.randn(2, 3, 16, 16)
    a = maps.attention_map(model, x)
    assert a.shape == (2, 2, 2) and (a >= 0).all() and (a.sum((1, 2)) <= 1 + 1e-6).all()


# -----------------------------------------------------------------------------
# first contact: run directories, one-line errors, Ctrl-C, the order of checks, --device, feedback


def test_default_out_distinguishes_every_result_changing_flag():
    base = ['--method', 'vpt', '--data', 'cub']
    variants = [[], ['--eval-split', 'test'], ['--lr', '0.1'], ['--arch', 'vit_small_patch16_224'],
                ['--pretrain', 'mae'], ['--seed', '1'], ['--prompts', '10'], ['--depth', 'shallow'],
                ['--epochs', '5'], ['--batch-size', '32'], ['--wd', '0'], ['--warmup-epochs', '2'],
                ['--img-size', '112'], ['--eval-split', 'test', '--lr', '0.1'], ['--lr', '0.1', '--wd', '0']]
    outs = [train.parse_args(base + v)[0]['out'] for v in variants]
    assert len(set(outs)) == len(outs), outs
    assert outs[0] == os.path.join('runs', 'vpt-cub-in21k-base_patch16-val-seed0')
    assert outs[1] == os.path.join('runs', 'vpt-cub-in21k-base_patch16-test-seed0')
    assert outs[13] == os.path.join('runs', 'vpt-cub-in21k-base_patch16-test-seed0-lr0.1')
    assert outs[3].endswith('vpt-cub-in21k-small_patch16-val-seed0') and outs[7].endswith('-depth_shallow')
    # what does not change the result does not change the name; an explicit --out wins
    for same in (['--workers', '2'], ['--log-interval', '5'], ['--device', 'cpu']):
        assert train.parse_args(base + same)[0]['out'] == outs[0]
    assert train.parse_args(base + ['--out', 'x'])[0]['out'] == 'x'
    sa2vp = train.parse_args(['--method', 'sa2vp', '--data', 'cub', '--no-sa2vp-dropout'])[0]['out']
    assert sa2vp.endswith('-no_sa2vp_dropout')


def cli_error(monkeypatch, capsys, main, args):
    """Run main through runs.cli as the command line would; returns (exit status, stderr)."""
    monkeypatch.setattr(sys, 'argv', ['train.py', *map(str, args)])
    with pytest.raises(SystemExit) as info:
        runs.cli(main)
    err = capsys.readouterr().err
    assert err.startswith('error: ') and 'Traceback' not in err, err
    return info.value.code, err


def write_vtab_dtd(root, n=8, label=lambda i: i % 47):
    """<root>/vtab-1k/dtd with train800 and val200 of n 16-px images each; returns the task folder."""
    folder = root / 'vtab-1k' / 'dtd'
    for split in ('train800', 'val200'):
        lines = []
        for i in range(n):
            rel = f'images/{split}/{i:06d}.jpg'
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(torch.randint(0, 256, (16, 16, 3), dtype=torch.uint8).numpy()).save(folder / rel)
            lines.append(f'{rel} {label(i)}\n')
        (folder / f'{split}.txt').write_text(''.join(lines))
    return folder


def test_every_anticipated_failure_is_one_error_line(tmp_path, monkeypatch, capsys):
    run = ['--method', 'linear', '--arch', 'vit_nano_patch8', '--pretrain', 'none', '--img-size', '16',
           '--epochs', '1', '--warmup-epochs', '0', '--batch-size', '4', '--log-interval', '0',
           '--out', tmp_path / 'run']
    vtab = run + ['--data', 'vtab-dtd', '--data-root', tmp_path / 'data', '--workers', '0']
    # the data: a missing root, a missing split file, a bad label, a missing / unreadable image in a loader worker
    code, err = cli_error(monkeypatch, capsys, train.main, vtab)
    assert code == 1 and err.startswith(f"error: --data vtab-dtd: dataset folder for 'vtab-dtd' not found: neither "
                                        f"{tmp_path / 'data' / 'vtab-1k' / 'dtd'} exists") and '--data-root' in err
    folder = write_vtab_dtd(tmp_path / 'data')
    (folder / 'val200.txt').unlink()
    _, err = cli_error(monkeypatch, capsys, train.main, vtab)
    assert err.startswith(f"error: --data vtab-dtd: missing split file {folder / 'val200.txt'}")
    folder = write_vtab_dtd(tmp_path / 'data', label=lambda i: 99 if i == 3 else 0)
    _, err = cli_error(monkeypatch, capsys, train.main, vtab)
    assert err == f"error: --data vtab-dtd: {folder / 'train800.txt'}:4: label 99 out of range 0..46 (vtab-dtd has " \
                  f"47 classes)\n"
    folder = write_vtab_dtd(tmp_path / 'data')
    cifar = [a if a != 'vtab-dtd' else 'vtab-cifar' for a in vtab[:-4]] + ['--data-root', folder, '--workers', '0']
    _, err = cli_error(monkeypatch, capsys, train.main, cifar)  # the dtd task folder given for vtab-cifar
    assert err == f"error: --data vtab-cifar: {folder} is the folder of vtab-dtd, not of vtab-cifar: pass --data " \
                  f"vtab-dtd, or --data-root the folder that holds vtab-cifar's\n"
    workers = [a if a != '0' or vtab[i - 1] != '--workers' else '2' for i, a in enumerate(vtab)]
    (folder / 'images' / 'train800' / '000005.jpg').unlink()
    _, err = cli_error(monkeypatch, capsys, train.main, workers)
    assert err == f"error: image file not found: {folder / 'images/train800/000005.jpg'} (`python data.py --check " \
                  f"NAME` lists every missing file)\n"
    (folder / 'images' / 'train800' / '000005.jpg').write_bytes(b'\xff\xd8 not really a jpeg')
    _, err = cli_error(monkeypatch, capsys, train.main, workers + ['--overwrite'])
    assert err.startswith(f"error: cannot read image {folder / 'images/train800/000005.jpg'}: ") and \
        err.count('\n') == 1 and 'worker process' not in err
    # flag values
    digits = run + ['--data', 'digits', '--workers', '0', '--overwrite']
    for extra, message in [(['--lr', '-0.1'], 'error: --lr -0.1 must be positive\n'),
                           (['--accum', '3'], 'error: --batch-size 4 must be divisible by processes x --accum = '
                                              '1 x 3\n'),
                           (['--img-size', '20'], "error: --img-size 20 is not a multiple of vit_nano_patch8's patch "
                                                  "size 8; pass e.g. --img-size 16\n"),
                           (['--epochs', '0'], 'error: --epochs 0 must be at least 1\n'),
                           (['--device', 'gpu'], "error: --device 'gpu': expected auto, cpu, cuda or cuda:N\n"),
                           (['--weights', tmp_path / 'w.pth'], 'error: --pretrain none means a random backbone, but '
                                                               'a weights file was given'),
                           (['--pretrain', 'mae', '--weights', weights_files(tmp_path)[1]],  # a learned pos_embed
                            f"error: --pretrain mae does not fit {tmp_path / 'b.pth'} (timm state dict; its pos_embed "
                            f"is learned, as a supervised ViT's is); pass --pretrain in21k or in21k-augreg\n")]:
        _, err = cli_error(monkeypatch, capsys, train.main, digits + extra)
        assert err.startswith(message), err
    # timm's habit `--resume PATH`: what to type instead (argparse's status 2, its usage line, then ours)
    monkeypatch.setattr(sys, 'argv', ['train.py', '--resume', 'runs/x/last.pt'])
    with pytest.raises(SystemExit) as info:
        runs.cli(train.main)
    assert info.value.code == 2 and capsys.readouterr().err.splitlines()[-1] == \
        "train.py: error: --resume takes no path: continue the run in runs/x with `--resume --out runs/x`"
    # eval.py: not a run directory
    code, err = cli_error(monkeypatch, capsys, eval_py.main, ['--run', tmp_path / 'nowhere'])
    assert code == 1 and err == f"error: {tmp_path / 'nowhere'} holds no last.pt: not a train.py run directory " \
                                f"(pass --run DIR)\n"


def test_data_is_checked_before_the_weights(tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr(weights, 'hub_weights', lambda arch, tag: asked.append(tag) or 1 / 0)
    with pytest.raises(RunError, match=r"--data cub: dataset folder for 'cub' not found"):
        train.main(['--method', 'lspt', '--pretrain', 'mae', '--data', 'cub', '--data-root', str(tmp_path),
                    '--out', str(tmp_path / 'run')])
    assert asked == []  # the hub was never asked


def test_device_flag(tmp_path):
    assert runs.resolve_device('auto') == torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    assert runs.resolve_device('cpu') == torch.device('cpu')
    for bad in ('gpu', 'cuda:x', 'mps'):
        with pytest.raises(RunError, match=f"--device '{bad}': expected auto, cpu, cuda or cuda:N"):
            runs.resolve_device(bad)
    if not torch.cuda.is_available():
        for name in ('cuda', 'cuda:1'):
            with pytest.raises(RunError, match=f'--device {name}: torch sees no CUDA device .*--device cpu'):
                train.main(TINY + ['--method', 'vpt', '--device', name, '--out', str(tmp_path)])
        with pytest.raises(RunError, match='--device cuda: torch sees no CUDA device'):
            eval_py.main(['--run', str(tmp_path), '--device', 'cuda'])
    result = train.main(TINY + ['--method', 'linear', '--device', 'cpu', '--epochs', '1', '--max-steps-per-epoch', '1',
                                '--batch-size', '16', '--out', str(tmp_path / 'cpu')])
    assert result['config']['device'] == 'cpu' and result['device'].startswith('cpu')


def test_warmup_warning_and_first_progress_line(tmp_path, capsys):
    args = TINY[:-2] + ['--method', 'vpt', '--prompts', '4', '--batch-size', '16', '--max-steps-per-epoch', '7',
                        '--log-interval', '5']
    train.main(args + ['--epochs', '2', '--warmup-epochs', '3', '--out', str(tmp_path / 'a')])
    captured = capsys.readouterr()
    # 14 steps, all in the warmup of 21: the last step's lr is 0.25 * 13 / 21
    assert (f"warning: --warmup-epochs 3 is not shorter than --epochs 2: the lr rises linearly for the whole run to "
            f"{0.25 * 13 / 21:.3g} and never reaches the peak 0.25") in captured.err
    progress = [ln for ln in captured.out.splitlines() if re.match(r'epoch \d+/2 step', ln)]
    # after each epoch's first step, then every 5 global steps, and at the end of each epoch
    assert [ln.split(' |')[0] for ln in progress] == ['epoch 1/2 step 1/7', 'epoch 1/2 step 5/7', 'epoch 1/2 step 7/7',
                                                      'epoch 2/2 step 1/7', 'epoch 2/2 step 3/7', 'epoch 2/2 step 7/7']
    assert re.search(r'\| \d+\.\d{3} s/step, \d+ img/s \| .* \| eta \d\d:\d\d:\d\d$', progress[0]), progress[0]
    train.main(args + ['--epochs', '2', '--warmup-epochs', '1', '--out', str(tmp_path / 'b')])
    assert 'warning' not in capsys.readouterr().err
    assert runs.duration(3 * 86400 + 3661) == '3d 01:01:01' and runs.duration(59) == '00:00:59'


def test_ctrl_c_is_one_line_and_the_run_resumes(tmp_path):
    """With loader workers (--workers 2): a SIGINT that lands while a loader starts or stops its workers is delivered
    again where train.py's own code runs, so it is never lost in a finalizer nor leaves a traceback."""
    out = tmp_path / 'run'
    args = TINY[:-4] + ['--workers', '2', '--method', 'vpt', '--prompts', '4', '--epochs', '1000',
                        '--max-steps-per-epoch', '2', '--batch-size', '16', '--eval-every', '1000', '--log-interval',
                        '1', '--out', str(out)]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.Popen([sys.executable, 'train.py', *args], cwd=HERE, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:  # wait until epoch 3 trains: epochs 1 and 2 have checkpoints
            if line.startswith('epoch 3/1000 step'):
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and 'Traceback' not in err and 'KeyboardInterrupt' not in err, err
    found = re.fullmatch(r'error: interrupted during epoch (\d+); the last checkpoint is after epoch (\d+); continue '
                         r'with `--resume --out (.+)`\n', err)
    assert found and found.group(3) == str(out), err
    during, saved = int(found.group(1)), int(found.group(2))
    assert during == saved + 1 and saved >= 2
    assert torch.load(out / 'last.pt', weights_only=True)['epoch'] == saved
    assert train.main(['--resume', '--out', str(out), '--stop-after-epoch', str(saved + 1)]) is None  # it continues
    assert torch.load(out / 'last.pt', weights_only=True)['epoch'] == saved + 1


def test_test_split_is_evaluated_once(tmp_path):
    """--eval-split test evaluates after the last epoch only; an explicit --eval-every still wins; val every epoch."""
    base = TINY + ['--method', 'linear', '--epochs', '3', '--max-steps-per-epoch', '2', '--batch-size', '32']
    for name, extra, evaluated in (('test', ['--eval-split', 'test'], [3]),
                                   ('test-every', ['--eval-split', 'test', '--eval-every', '1'], [1, 2, 3]),
                                   ('val', [], [1, 2, 3])):
        result = train.main(base + extra + ['--out', str(tmp_path / name)])
        rows = read_metrics(tmp_path / name)
        assert [r['epoch'] for r in rows if r['accuracy'] is not None] == evaluated, name
        assert rows[-1]['accuracy'] == result['accuracy']
    assert result['config']['eval_every'] == 1
    with open(tmp_path / 'test' / 'result.json') as f:
        assert json.load(f)['config']['eval_every'] == 3


LINEAR_GRID = TINY + ['--method', 'linear', '--epochs', '2', '--max-steps-per-epoch', '5', '--batch-size', '32',
                      '--warmup-epochs', '0.5']


def test_linear_grid_equals_separate_runs(tmp_path):
    """A 2 x 2 (lr, wd) linear grid in one pass (cached features) ends every cell with the head, metrics and
    accuracy of the cell's own separate run (same seed), and writes ordinary run directories."""
    results = train.main(LINEAR_GRID + ['--lr', '0.5,0.05', '--wd', '0,0.01', '--out', str(tmp_path / 'grid')])
    assert [(r['config']['lr'], r['config']['wd']) for r in results] == [(0.5, 0), (0.05, 0), (0.5, 0.01),
                                                                         (0.05, 0.01)]
    for res in results:
        lr, wd = res['config']['lr'], res['config']['wd']
        cell = tmp_path / 'grid' / f'lr{lr:g}_wd{wd:g}'
        own = train.main(LINEAR_GRID + ['--lr', str(lr), '--wd', str(wd), '--out', str(tmp_path / cell.name)])
        assert res['features'] == 'cached' and set(res) == set(own) | {'features'}
        assert res['accuracy'] == own['accuracy']
        assert {k: v for k, v in res['config'].items() if k not in ('out', 'grid_features')} == \
            {k: v for k, v in own['config'].items() if k != 'out'}
        a, b = (torch.load(d / 'last.pt', weights_only=True) for d in (cell, tmp_path / cell.name))
        assert set(a) == set(b) == CKPT_KEYS and set(a['model']) == set(b['model']) == {'head.weight', 'head.bias'}
        for k in b['model']:
            torch.testing.assert_close(a['model'][k], b['model'][k], atol=1e-5, rtol=0)
        assert (a['step'], a['epoch']) == (b['step'], b['epoch'])
        ma, mb = read_metrics(cell), read_metrics(tmp_path / cell.name)
        assert [m['accuracy'] for m in ma] == [m['accuracy'] for m in mb]
        assert [m['train_loss'] for m in ma] == pytest.approx([m['train_loss'] for m in mb], abs=1e-5)
        assert eval_py.main(['--run', str(cell), '--workers', '0']) == res['accuracy']  # an ordinary run directory


def test_linear_grid_refusals(tmp_path):
    with pytest.raises(SystemExit):
        train.parse_args(['--method', 'vpt', '--data', 'digits', '--lr', '0.1,0.2'])  # grids: --method linear only
    with pytest.raises(RunError, match="one process without --resume, --accum"):
        train.main(LINEAR_GRID + ['--lr', '0.1,0.2', '--accum', '2', '--out', str(tmp_path / 'g')])
    train.main(LINEAR_GRID + ['--lr', '0.1', '--wd', '0,0.01', '--epochs', '1', '--out', str(tmp_path / 'g')])
    with pytest.raises(RunError, match=r"lr0.1_wd0 already holds a finished run"):
        train.main(LINEAR_GRID + ['--lr', '0.1', '--wd', '0,0.01', '--epochs', '1', '--out', str(tmp_path / 'g')])


def test_one_process_per_run_directory(tmp_path, monkeypatch, capsys):
    """A run directory held by a live process (its pid in <out>/.lock, as runs.lock writes it) is refused with one
    line naming that pid, for a run and for a grid's cell; once the holder is SIGKILLed, the same command runs."""
    args = TINY + ['--method', 'linear', '--epochs', '1', '--max-steps-per-epoch', '1', '--batch-size', '16']
    cell = tmp_path / 'grid' / 'lr0.1_wd0'
    for d in (tmp_path / 'run', cell):
        d.mkdir(parents=True)
    hold = ("import fcntl, os, sys, time\nfiles = [open(os.path.join(d, '.lock'), 'a+') for d in sys.argv[1:]]\n"
            "for f in files:\n    fcntl.lockf(f, fcntl.LOCK_EX)\n    f.write(f'{os.getpid()}\\n')\n    f.flush()\n"
            "print('held', flush=True)\ntime.sleep(120)\n")
    holder = subprocess.Popen([sys.executable, '-c', hold, str(tmp_path / 'run'), str(cell)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline() == 'held\n'
        for out, lr in ((tmp_path / 'run', '0.1'), (tmp_path / 'grid', '0.1,0.2')):
            with pytest.raises(RunError, match=f"^{out if lr == '0.1' else cell} is in use by process {holder.pid}"):
                train.main(args + ['--lr', lr, '--out', str(out)])
    finally:
        holder.kill()
        holder.wait()
    assert train.main(args + ['--lr', '0.1', '--out', str(tmp_path / 'run')])['epochs'] == 1
    assert len(train.main(args + ['--lr', '0.1,0.2', '--out', str(tmp_path / 'grid')])) == 2
    import errno  # a filesystem without POSIX locks: a warning, and the run goes on unguarded

    def no_locks(f, how):
        raise OSError(errno.ENOLCK, 'No locks available')
    monkeypatch.setattr(runs.fcntl, 'lockf', no_locks)
    capsys.readouterr()
    runs.lock(tmp_path / 'nolock')
    runs.unlock()
    assert capsys.readouterr().err == f"warning: cannot lock {tmp_path / 'nolock' / '.lock'} (No locks available): " \
                                      f"nothing keeps a second process out of {tmp_path / 'nolock'}\n"


def test_linear_grid_with_augmentation_equals_separate_runs(tmp_path, monkeypatch):
    """FGVC (random crop and flip): features recomputed per batch, shared by the heads; still the separate runs'."""
    from test_data import make_fgvc
    make_fgvc(tmp_path / 'data', 'dogs')
    monkeypatch.setenv('VPT_ALLOW_PARTIAL', '1')  # the fixture holds 3 of the 120 classes
    args = [a if a != 'digits' else 'dogs' for a in LINEAR_GRID] + ['--data-root', str(tmp_path / 'data'),
                                                                   '--batch-size', '2']
    results = train.main(args + ['--lr', '0.5,0.05', '--out', str(tmp_path / 'grid')])
    for res in results:
        lr = res['config']['lr']
        own = train.main(args + ['--lr', str(lr), '--out', str(tmp_path / f'own{lr}')])
        assert res['features'] == 'per batch' and res['accuracy'] == own['accuracy']
        a = torch.load(tmp_path / 'grid' / f'lr{lr:g}_wd0' / 'last.pt', weights_only=True)['model']
        b = torch.load(tmp_path / f'own{lr}' / 'last.pt', weights_only=True)['model']
        for k in b:
            torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)


def test_a_partial_run_resumes_and_evaluates_in_a_fresh_shell(tmp_path, monkeypatch):
    """VPT_ALLOW_PARTIAL=1 is recorded with the run: --resume and eval.py work without it in the environment."""
    from test_data import make_fgvc
    make_fgvc(tmp_path / 'data', 'dogs')  # 3 of Stanford Dogs' 120 classes
    args = [a if a != 'digits' else 'dogs' for a in LINEAR_GRID] + ['--data-root', str(tmp_path / 'data'),
                                                                   '--batch-size', '2', '--out', str(tmp_path / 'run')]
    with pytest.raises(RunError, match='has 3 classes but dogs has 120: wrong or partial split files'):
        train.main(args)
    monkeypatch.setenv('VPT_ALLOW_PARTIAL', '1')
    assert train.main(args + ['--overwrite', '--stop-after-epoch', '1']) is None
    monkeypatch.delenv('VPT_ALLOW_PARTIAL')  # a fresh shell
    result = train.main(['--resume', '--out', str(tmp_path / 'run')])
    assert result['config']['allow_partial'] and result['config']['num_classes'] == 3
    assert eval_py.main(['--run', str(tmp_path / 'run'), '--workers', '0']) == result['accuracy']


def test_workers_default_avoids_torchs_warning():
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    assert train.parse_args(['--method', 'vpt', '--data', 'cub'])[0]['workers'] == runs.DEFAULT_WORKERS == min(4, cpus)
    assert f"(default: min(4, CPUs), here {min(4, cpus)})" in ' '.join(train.build_parser().format_help().split())


def test_your_own_dataset(tmp_path, monkeypatch, capsys):
    """--data imagefolder: a torchvision ImageFolder tree trains and evaluates; no val/ is one error line; sweep.py
    takes it too (its --dry-run counts the images on disk)."""
    from test_data import make_imagefolder
    import sweep
    root = make_imagefolder(tmp_path / 'mine')
    args = ['--method', 'vpt', '--prompts', '2', '--arch', 'vit_nano_patch8', '--pretrain', 'none', '--data',
            'imagefolder', '--data-root', str(root), '--img-size', '16', '--epochs', '1', '--batch-size', '4',
            '--warmup-epochs', '0', '--workers', '0', '--log-interval', '0']
    result = train.main(args + ['--out', str(tmp_path / 'run')])
    assert result['config']['num_classes'] == 3 and result['eval_split'] == 'val'
    assert eval_py.main(['--run', str(tmp_path / 'run'), '--workers', '0']) == result['accuracy']
    final = train.main(args + ['--eval-split', 'test', '--out', str(tmp_path / 'test')])   # trains on train, as FGVC
    assert final['config']['train_split'] == 'train' and final['config']['eval_split_name'] == 'test'
    import shutil
    shutil.rmtree(root / 'val')
    capsys.readouterr()
    code, err = cli_error(monkeypatch, capsys, train.main, args + ['--out', tmp_path / 'noval'])
    assert code == 1 and err.startswith(f"error: --data imagefolder: {root / 'val'} not found: --data imagefolder has "
                                        f"no val split there (without val/, use --eval-split test)"), err
    assert sweep.main(['--method', 'vpt', '--arch', 'vit_nano_patch8', '--pretrain', 'none', '--img-size', '16',
                       '--data', 'imagefolder', '--data-root', str(root), '--out', str(tmp_path / 'sweep'),
                       '--dry-run']) == 0
    assert 'vpt on 1 datasets' in capsys.readouterr().out
