"""A fork's new method is one class: `Tempered`, defined here and registered in methods.METHODS, changes attention
inside the frozen blocks (a learnable temperature per block and head, a learnable bias toward the cls key), and works
with train.py, eval.py --maps, bench.py and sweep.py (--dry-run and a real tiny sweep) with no other edit. Its
attention map is checked against a reference written out here, block by block.

Run: python -m pytest -q test_forking.py     (about 40 s on a shared 2-core CPU)
"""
import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import bench
import eval as eval_py
import maps
import methods
import models
import sweep
import train
from test_train import TINY, one_thread  # noqa: F401  (the tiny run's flags; one torch thread for this module)

HERE = Path(__file__).resolve().parent


class Tempered(methods.VPT):
    """VPT-deep whose blocks attend with logits / t[block, head] + c[block] * (key is cls): an attention-level change,
    through Tuner.attention alone."""

    flags = dict(methods.VPT.flags, temper_init=(float, "initial attention temperature", None))

    def __init__(self, backbone, num_classes, prompts=4, temper_init=1.0):
        super().__init__(backbone, num_classes, prompts)
        self.temper_init = temper_init
        L, H = len(backbone.blocks), backbone.num_heads
        self.temper = nn.Parameter(torch.full((L, H, 1, 1), temper_init))   # one temperature per block and head
        self.cls_bias = nn.Parameter(torch.zeros(L))

    def attention(self, i, x):
        bias = torch.zeros(x.shape[1], device=x.device, dtype=x.dtype)
        bias = bias.index_add(0, torch.tensor([0], device=x.device), self.cls_bias[i:i + 1].to(x.dtype))  # (T,)
        return bias, 1 / self.temper[i]


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(methods.METHODS, 'tempered', Tempered)
    monkeypatch.setattr(methods, 'PROMPTED', methods.PROMPTED + ('tempered',))


def reference_map(model, x):
    """The last block's cls-to-patch attention (mean over heads), computed here from the definition: the method's
    tokens through every block, each block's attention written out with its temperature and cls bias."""
    bb, P, N = model.backbone, model.num_prompts, model.backbone.num_patches
    t = bb.embed(x)
    for i, blk in enumerate(bb.blocks):
        prompts = model.prompts[i].expand(x.shape[0], -1, -1)              # eval: no prompt dropout
        t = torch.cat([t[:, :1], prompts, t[:, 1:] if i == 0 else t[:, 1 + P:]], 1)
        h = blk.norm1(t)
        B, T, D = h.shape
        H, d = blk.attn.num_heads, D // blk.attn.num_heads
        q, k, v = blk.attn.qkv(h).reshape(B, T, 3, H, d).permute(2, 0, 3, 1, 4)
        logits = torch.einsum('bhqd,bhkd->bhqk', q, k) / d ** 0.5 / model.temper[i]
        logits[..., 0] += model.cls_bias[i]
        a = logits.softmax(-1)
        t = t + blk.attn.proj(torch.einsum('bhqk,bhkd->bqhd', a, v).reshape(B, T, D))
        t = t + blk.mlp(blk.norm2(t))
    return a[:, :, 0, -N:].mean(1).reshape(B, *bb.grid)


def test_attention_change_reaches_the_forward_and_the_map():
    torch.manual_seed(0)
    model = Tempered(models.create_backbone('vit_micro_patch8', img_size=32), 10).eval()
    with torch.no_grad():
        model.temper.uniform_(0.5, 2.0)
        model.cls_bias.uniform_(-1, 1)
        x = torch.randn(2, 3, 32, 32)
        plain = methods.VPT(model.backbone, 10, prompts=4).eval()
        plain.prompts.copy_(model.prompts)
        plain.head.load_state_dict(model.head.state_dict())
        assert (model(x) - plain(x)).abs().max() > 1e-3          # the change is in the forward, not only the map
        got, want = maps.attention_map(model, x), reference_map(model, x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    loss = model.loss(x, torch.tensor([1, 2]))                  # and it is learnable
    loss.backward()
    assert model.temper.grad.abs().sum() > 0 and model.cls_bias.grad.abs().sum() > 0


def test_a_new_method_works_with_train_eval_bench(registered, tmp_path, capsys):
    out = tmp_path / 'run'
    result = train.main(TINY + ['--method', 'tempered', '--temper-init', '0.5', '--img-size', '56', '--epochs', '1',
                                '--max-steps-per-epoch', '2', '--batch-size', '8', '--out', str(out)])
    assert result['config']['model_options']['temper_init'] == 0.5
    assert result['tuned_params'] == 2 * 4 * 32 + 2 * 2 + 2 + 32 * 10 + 10   # prompts, temperatures, biases, head
    assert eval_py.main(['--run', str(out), '--workers', '0', '--maps', '2']) == result['accuracy']
    assert len(list((out / 'maps').glob('*.png'))) == 2 and 'attention' in capsys.readouterr().out
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        rows = bench.main(['--methods', 'vpt,tempered', '--arch', 'vit_nano_patch8', '--img-size', '16', '--batch-size',
                           '2', '--iters', '1', '--warmup', '0', '--prompts', '2', '--num-classes', '10', '--threads',
                           '1', '--loader-images', '0', '--json'])[1:]
    row = next(r for r in rows if r['method'] == 'tempered' and r['role'] == 'method')
    assert row['train_ms'] > 0 and row['target'] is not None   # VPT's target, inherited
    assert any(r['method'] == 'tempered' and r['role'] == 'grad-ckpt' for r in rows)


def registering_site(tmp_path):
    """A folder whose sitecustomize module registers Tempered: on PYTHONPATH, every child python knows the method."""
    site = tmp_path / 'site'
    site.mkdir()
    code = (f"import sys\nsys.path.insert(0, {str(HERE)!r})\nimport methods\n"
            "from test_forking import Tempered\nmethods.METHODS['tempered'] = Tempered\n")
    (site / ('sitecustomize' + '.py')).write_text(code)
    return site


def test_a_new_method_works_with_sweep(registered, tmp_path, capsys, monkeypatch):
    fixed = ['--', '--epochs', '1', '--max-steps-per-epoch', '2', '--batch-size', '32', '--warmup-epochs', '0',
             '--workers', '0', '--log-interval', '0']
    args = ['--method', 'tempered', '--arch', 'vit_nano_patch8', '--pretrain', 'none', '--img-size', '16', '--data',
            'digits', '--seeds', '0', '--out', str(tmp_path / 'sweep')]
    assert sweep.main(args + ['--dry-run'] + fixed) == 0
    dry = capsys.readouterr().out
    assert 'tempered on 1 datasets' in dry and str(len(methods.VPT.sweep_grid['lr']) * 4) in dry  # VPT's grid
    # a real sweep: its train.py processes learn of the class the way a fork's would, from an imported module
    site = registering_site(tmp_path)
    monkeypatch.setenv('PYTHONPATH', str(site))
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    assert sweep.main(args + ['--lr', '0.1', '--wd', '0'] + fixed) == 0
    table = json.loads((tmp_path / 'sweep' / 'results.json').read_text())
    row = table['rows'][0]
    assert row['data'] == 'digits' and row['n'] == 1 and row['mean'] is not None, row


def test_sitecustomize_reaches_a_child_process(tmp_path):
    """The mechanism the sweep test relies on: a child python sees the registered class."""
    site = registering_site(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(site))
    r = subprocess.run([sys.executable, '-c', "import methods; print('tempered' in methods.METHODS)"], cwd=HERE,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == 'True', r.stderr
