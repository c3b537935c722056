"""Every method in methods.METHODS, through every path that builds one: train.py's flags -> build_model -> the
options recorded in result.json / last.pt, eval.py's rebuild from last.pt, and bench.py's rows. A method added to
methods.METHODS is picked up here without editing this file; one that is missing a piece fails here.

Run: python -m pytest -q test_every_method.py     (about 20 s on a shared 2-core CPU)
"""
import contextlib
import io
import json
import sys

import pytest
import torch

import bench
import eval as eval_py
import methods
import runs
import train
from test_train import TINY, one_thread  # noqa: F401  (the tiny run's flags; one torch thread for this module)
from train import RunError

RECIPE_KEYS = {'optimizer', 'lr', 'wd', 'wd_head', 'batch_size', 'epochs', 'warmup_epochs', 'min_lr'}
CPU = torch.device('cpu')


def option_flags(parser):
    """{dest: argparse action} of train.py's 'method options' group."""
    group = next(g for g in parser._action_groups if g.title.startswith('method options'))
    return {a.dest: a for a in group._group_actions}


def unrouted(parser, classes):
    """(class options without a train.py flag, flags that no class takes)."""
    options = {k for cls in classes for k in methods.init_options(cls)}
    flags = option_flags(parser)
    return sorted(options - set(flags)), sorted(set(flags) - options)


def flag_value(action, current):
    """A command-line value for a method-option flag that differs from `current`, and the value it parses to."""
    if action.const is False:                       # --no-sa2vp-dropout
        return [], False
    if action.choices:
        v = [c for c in action.choices if c != current][-1]
        return [str(v)], v
    v = current + 1 if action.type is int else (current / 2 if current else 0.5)
    return [str(v)], action.type(str(v))


# -----------------------------------------------------------------------------
# one source of truth


@pytest.mark.parametrize('method', list(methods.METHODS))
def test_every_method_has_a_recipe(method):
    recipe = methods.METHODS[method].recipe
    assert isinstance(recipe, dict) and set(recipe) == RECIPE_KEYS, f"{method}: recipe must have keys {RECIPE_KEYS}"
    assert recipe['optimizer'] in ('sgd', 'adamw') and recipe['lr'] > 0 and recipe['batch_size'] > 0
    cfg, _ = train.parse_args(['--method', method, '--data', 'cub'])
    assert {k: cfg[k] for k in RECIPE_KEYS} == recipe


def test_every_option_has_a_flag_and_every_flag_an_option(monkeypatch):
    parser = train.build_parser()
    assert unrouted(parser, methods.METHODS.values()) == ([], [])
    for dest, action in option_flags(parser).items():   # None: the flag was not given, the method decides
        assert action.default is None, dest
    assert unrouted(parser, [c for m, c in methods.METHODS.items() if m != 'spt']) == \
        ([], ['spt_init', 'spt_kmeans_tokens'])

    class Gated(methods.VPT):   # a new option: its flag comes from the class's `flags`, and it must have one
        def __init__(self, backbone, num_classes, prompts=50, probe_gate_init=0.0):
            super().__init__(backbone, num_classes, prompts)
    monkeypatch.setitem(methods.METHODS, 'gated', Gated)
    with pytest.raises(TypeError, match=r"Gated.flags has no entry for its option 'probe_gate_init'"):
        train.build_parser()
    monkeypatch.setattr(Gated, 'flags', dict(methods.VPT.flags, probe_gate_init=(float, "initial gate value", None)))
    parser = train.build_parser()
    assert unrouted(parser, methods.METHODS.values()) == ([], [])
    assert option_flags(parser)['probe_gate_init'].help == "gated: initial gate value (default: 0.0)"


# -----------------------------------------------------------------------------
# no silent drop: a flag reaches the model, or it is an error


@pytest.mark.parametrize('method', list(methods.METHODS))
def test_every_flag_reaches_the_model_and_reads_back(method):
    actions = option_flags(train.build_parser())
    cfg, _ = train.parse_args(TINY + ['--method', method, '--img-size', '16'])
    default = train.build(dict(cfg, num_classes=10), CPU)
    defaults = methods.built_options(default)
    assert set(defaults) == set(methods.init_options(methods.METHODS[method]))
    for k, current in defaults.items():
        argv, value = flag_value(actions[k], current)
        cfg, _ = train.parse_args(TINY + ['--method', method, '--img-size', '16', actions[k].option_strings[0], *argv])
        model = train.build(dict(cfg, num_classes=10), CPU)
        assert methods.built_options(model)[k] == value, k   # (others may follow it: VPT's dropout, the depth)
    # the record is enough to rebuild the same model
    again = methods.build_model(method, default.backbone, 10, **defaults)
    assert methods.built_options(again) == defaults
    assert {n: p.shape for n, p in methods.tuned_state_dict(again).items()} == \
        {n: p.shape for n, p in methods.tuned_state_dict(default).items()}


def test_flag_of_another_method_is_an_error_line(monkeypatch, capsys):
    actions = option_flags(train.build_parser())
    for method, cls in methods.METHODS.items():
        cfg, _ = train.parse_args(TINY + ['--method', method])   # flags left at None are not 'given'
        assert all(cfg[k] is None for k in methods.method_flags() if k not in methods.init_options(cls))
        for k, action in actions.items():
            if k in methods.init_options(cls):
                continue
            argv, _ = flag_value(action, action.choices[0] if action.choices else 1)
            with pytest.raises(RunError, match=f"^{action.option_strings[0]}: not an option of --method {method}; "):
                train.parse_args(TINY + ['--method', method, action.option_strings[0], *argv])
    monkeypatch.setattr(sys, 'argv', ['train.py', *TINY, '--method', 'sa2vp', '--prompts', '4', '--depth', 'deep'])
    with pytest.raises(SystemExit) as exit_:
        runs.cli(train.main)
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err == ("error: --prompts, --depth: not an option of --method sa2vp; its options "
                                             "are --sa2vp-dim, --sa2vp-gamma, --sa2vp-lambda, --sa2vp-window, "
                                             "--no-sa2vp-dropout\n")


def test_an_option_that_does_not_read_back_is_an_error(monkeypatch):
    class Gated(methods.VPT):   # stores its option under another name and does not report it
        def __init__(self, backbone, num_classes, prompts=50, depth='deep', prompt_dropout=None, readout=None,
                     probe_gate_init=0.0):
            super().__init__(backbone, num_classes, prompts, depth, prompt_dropout, readout)
            self.gate = torch.nn.Parameter(torch.full((len(backbone.blocks),), probe_gate_init))
            self.init = probe_gate_init
    Gated.flags = dict(methods.VPT.flags, probe_gate_init=(float, "initial gate value", None))
    monkeypatch.setitem(methods.METHODS, 'gated', Gated)
    cfg, _ = train.parse_args(TINY + ['--method', 'vpt', '--img-size', '16'])
    backbone = train.build(dict(cfg, num_classes=10), CPU).backbone
    with pytest.raises(TypeError, match=r'Gated.options\(\) gives no value for probe_gate_init'):
        methods.build_model('gated', backbone, 10)
    Gated.options = lambda self: dict(methods.VPT.options(self), probe_gate_init=self.init)
    built = methods.build_model('gated', backbone, 10, probe_gate_init=0.5)
    assert methods.built_options(built)['probe_gate_init'] == 0.5


# -----------------------------------------------------------------------------
# every method through train.py, eval.py and bench.py


@pytest.mark.parametrize('method', list(methods.METHODS))
def test_every_method_through_train_eval_bench(tmp_path, method):
    # train.py: one step at the method's default options, 48 px (36 patches: SPT's pooled init needs P - 1 <= N)
    out = tmp_path / 'run'
    result = train.main(TINY + ['--method', method, '--img-size', '48', '--epochs', '1', '--max-steps-per-epoch', '1',
                                '--batch-size', '8', '--out', str(out)])
    ckpt = torch.load(out / 'last.pt', map_location='cpu', weights_only=True)
    assert json.loads((out / 'result.json').read_text()) == result and ckpt['step'] == 1
    recorded = result['config']['model_options']
    assert ckpt['args']['model_options'] == recorded
    assert set(recorded) == set(methods.init_options(methods.METHODS[method]))

    # eval.py: rebuilt from last.pt, the same options and tuned tensors, the same accuracy
    model, _ = eval_py.load_run(str(out), CPU)
    assert methods.built_options(model) == recorded
    assert all(torch.equal(v, ckpt['model'][k]) for k, v in methods.tuned_state_dict(model).items())
    with contextlib.redirect_stdout(io.StringIO()):
        assert eval_py.main(['--run', str(out), '--workers', '0']) == result['accuracy']

    # bench.py: the method's row at its defaults, with the same model as train.py's
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        rows = bench.main(['--methods', method, '--arch', 'vit_nano_patch8', '--img-size', '48', '--batch-size', '2',
                           '--iters', '1', '--warmup', '0', '--spt-images', '4', '--prompts', '2',
                           '--num-classes', '10', '--threads', '1', '--json'])[1:]
    row = next(r for r in rows if r['method'] == method and r['role'] == 'method')
    assert row['fwd_ms'] > 0 and row['train_ms'] > 0 and row['tuned_params'] == result['tuned_params']
    if method in methods.PROMPTED:
        assert any(r['method'] == method and r['prompts'] == 2 for r in rows)
