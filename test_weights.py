"""Tests of weights.py: every checkpoint layout, the backbone identity, the Hugging Face hub and cache, bad input."""
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer as TimmViT
from timm.models.vision_transformer import checkpoint_filter_fn, _load_weights

import models
import weights
from test_models import MICRO, max_diff, timm_vit

HERE = os.path.dirname(os.path.abspath(__file__))


# -----------------------------------------------------------------------------
# every checkpoint layout round-trips through weights.load_backbone

def write_npz(model, path):
    """Google's original ViT .npz layout, written independently of models.py."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    D = model.embed_dim
    H = model.blocks[0].attn.num_heads
    out = {'embedding/kernel': sd['patch_embed.proj.weight'].transpose(2, 3, 1, 0),   # OIHW -> HWIO
           'embedding/bias': sd['patch_embed.proj.bias'], 'cls': sd['cls_token'],
           'Transformer/posembed_input/pos_embedding': sd['pos_embed'],
           'Transformer/encoder_norm/scale': sd['norm.weight'], 'Transformer/encoder_norm/bias': sd['norm.bias'],
           'pre_logits/kernel': np.zeros((D, D), np.float32), 'head/kernel': np.zeros((D, 7), np.float32),
           'head/bias': np.zeros(7, np.float32)}
    for i in range(len(model.blocks)):
        p, b = f'Transformer/encoderblock_{i}/', f'blocks.{i}.'
        a = p + 'MultiHeadDotProductAttention_1/'
        out[p + 'LayerNorm_0/scale'], out[p + 'LayerNorm_0/bias'] = sd[b + 'norm1.weight'], sd[b + 'norm1.bias']
        out[p + 'LayerNorm_2/scale'], out[p + 'LayerNorm_2/bias'] = sd[b + 'norm2.weight'], sd[b + 'norm2.bias']
        W, bias = sd[b + 'attn.qkv.weight'], sd[b + 'attn.qkv.bias']
        for j, n in enumerate(('query', 'key', 'value')):
            out[a + n + '/kernel'] = W[j * D:(j + 1) * D].T.reshape(D, H, D // H)       # (D, heads, head_dim)
            out[a + n + '/bias'] = bias[j * D:(j + 1) * D].reshape(H, D // H)
        out[a + 'out/kernel'] = sd[b + 'attn.proj.weight'].T.reshape(H, D // H, D)
        out[a + 'out/bias'] = sd[b + 'attn.proj.bias']
        for j in (0, 1):
            out[p + f'MlpBlock_3/Dense_{j}/kernel'] = sd[b + f'mlp.fc{j + 1}.weight'].T
            out[p + f'MlpBlock_3/Dense_{j}/bias'] = sd[b + f'mlp.fc{j + 1}.bias']
    np.savez(path, **out)


def moco_projector(prefix, D):
    """MoCo v3's 3-layer projector (with BN) and 2-layer predictor key layout."""
    sd = {}
    dims = [(D, 32), (32, 32), (32, 16)]
    for (i, lin), (bn, (din, dout)) in zip(enumerate((0, 3, 6)), zip((1, 4, 7), dims)):
        sd[f'{prefix}{lin}.weight'] = torch.randn(dout, din)
        for s in ('running_mean', 'running_var'):
            sd[f'{prefix}{bn}.{s}'] = torch.randn(dout)
        sd[f'{prefix}{bn}.num_batches_tracked'] = torch.tensor(5)
        if bn != 7:  # the last BN is affine=False
            sd[f'{prefix}{bn}.weight'], sd[f'{prefix}{bn}.bias'] = torch.randn(dout), torch.randn(dout)
    return sd


def write_all_formats(src, tmp_path):
    """src: a timm ViT with a 1000-class head. Returns {pretrain: [paths]}."""
    sd = src.state_dict()
    enc = {k: v for k, v in sd.items() if not k.startswith('head.')}
    paths = {}
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / 'model.safetensors'))
    torch.save(sd, tmp_path / 'model.pth')
    torch.save(sd, tmp_path / 'pytorch_model.bin')
    write_npz(src, tmp_path / 'ViT-B_16.npz')
    paths['in21k'] = [tmp_path / 'model.safetensors', tmp_path / 'model.pth', tmp_path / 'pytorch_model.bin',
                      tmp_path / 'ViT-B_16.npz']
    torch.save({'model': enc}, tmp_path / 'mae_pretrain.pth')
    paths['mae'] = [tmp_path / 'mae_pretrain.pth']
    D = src.embed_dim
    pre = {f'module.base_encoder.{k}': v for k, v in enc.items()}
    pre.update(moco_projector('module.base_encoder.head.', D))
    pre.update({f'module.momentum_encoder.{k}': v + 1 for k, v in enc.items()})
    pre.update(moco_projector('module.momentum_encoder.head.', D))
    pre.update({f'module.predictor.{k}': v for k, v in moco_projector('', 16).items() if not k.startswith('6')})
    torch.save({'epoch': 300, 'arch': 'vit_base', 'state_dict': pre,
                'optimizer': {'state': {}, 'param_groups': [{'lr': 0.1}]}, 'scaler': {'scale': 65536.0}},
               tmp_path / 'vit-b-300ep.pth.tar')
    lin = {f'module.{k}': v for k, v in sd.items()}  # includes module.head.{weight,bias} (1000 classes)
    torch.save({'epoch': 90, 'arch': 'vit_base', 'state_dict': lin, 'best_acc1': torch.tensor(76.7),
                'optimizer': {'state': {}, 'param_groups': [{'lr': 0.1}]}}, tmp_path / 'linear-vit-b-300ep.pth.tar')
    paths['mocov3'] = [tmp_path / 'vit-b-300ep.pth.tar', tmp_path / 'linear-vit-b-300ep.pth.tar']
    return paths


def test_every_format_round_trips(tmp_path):
    src = timm_vit(MICRO, 32, num_classes=1000, perturb=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = src.forward_features(x)
    paths = write_all_formats(src, tmp_path)
    expected_fmt = ['.safetensors', 'timm state dict', 'timm state dict', 'Google ViT .npz',
                    "MAE checkpoint", 'MoCo v3 pre-training', 'MoCo v3 linear-probe']
    backbone_sd = {k: v for k, v in src.state_dict().items() if not k.startswith('head.')}
    seen, identities = [], set()
    for pretrain, files in paths.items():
        for p in files:
            m = weights.load_backbone('vit_micro_patch8', pretrain, str(p), img_size=32).eval()
            seen.append(m.weights_format)
            with torch.no_grad():
                assert max_diff(m.forward_features(x), want) <= 1e-6, p
            assert m.pretrain == pretrain
            identities.add(m.identity)
    # seven files, seven byte streams, one set of tensors: one identity, the digest of those tensors
    assert identities == {'tensors:' + reference_digest(backbone_sd)}
    for e, s in zip(expected_fmt, seen):
        assert e in s
    # timm's own npz loader reads our test-written npz to the same model (checks the test writer too)
    t = TimmViT(img_size=32, num_classes=0, **MICRO).eval()
    _load_weights(t, str(tmp_path / 'ViT-B_16.npz'))
    with torch.no_grad():
        assert max_diff(t.forward_features(x), want) <= 1e-6


def reference_digest(sd):
    """The definition of weights.tensor_digest, written out: sha256 over the sorted names, each name|shape|dtype
    line followed by the values' bytes."""
    import hashlib
    h = hashlib.sha256()
    for name in sorted(sd):
        a = sd[name].detach().numpy()
        h.update(f"{name}|{tuple(a.shape)}|{a.dtype}\n".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def test_tensor_digest_sees_every_value_name_shape_and_dtype():
    sd = {'b': torch.arange(6.0).reshape(2, 3), 'a': torch.ones(4)}
    d = weights.tensor_digest(sd)
    assert d == reference_digest(sd) == weights.tensor_digest(dict(reversed(list(sd.items()))))  # order-free
    assert weights.tensor_digest({'b': sd['b'].T.contiguous().T, 'a': sd['a']}) == d       # memory layout-free
    bumped = sd['b'].clone()
    bumped[1, 2] = torch.nextafter(bumped[1, 2], torch.tensor(1e9))                       # one ulp
    variants = [{'b': bumped, 'a': sd['a']}, {'c': sd['b'], 'a': sd['a']}, {'b': sd['b'].reshape(3, 2), 'a': sd['a']},
                {'b': sd['b'].double(), 'a': sd['a']}, {'b': sd['b']}]
    assert len({weights.tensor_digest(v) for v in variants} | {d}) == len(variants) + 1


def test_pretrain_none_refuses_a_weights_file(tmp_path):
    torch.save(timm_vit(MICRO, 32).state_dict(), tmp_path / 'w.pth')
    with pytest.raises(weights.CheckpointError, match=r"--pretrain none means a random backbone.*drop --weights"):
        weights.load_backbone('vit_micro_patch8', 'none', str(tmp_path / 'w.pth'), img_size=32)


def test_load_at_other_size_resamples(tmp_path):
    src = timm_vit(MICRO, 32, perturb=True)
    torch.save(src.state_dict(), tmp_path / 'w.pth')
    m = weights.load_backbone('vit_micro_patch8', 'in21k', str(tmp_path / 'w.pth'), img_size=48).eval()
    ref = TimmViT(img_size=48, num_classes=0, **MICRO).eval()
    ref.load_state_dict(checkpoint_filter_fn(src.state_dict(), ref))
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert max_diff(m.forward_features(x), ref.forward_features(x)) <= 1e-5


def test_defaults_per_pretrain(tmp_path):
    src = timm_vit(MICRO, 32)
    torch.save({'model': src.state_dict()}, tmp_path / 'mae.pth')
    torch.save(src.state_dict(), tmp_path / 'supervised.pth')  # a learned pos_embed: a supervised ViT's file
    mae = weights.load_backbone('vit_micro_patch8', 'mae', str(tmp_path / 'mae.pth'), img_size=32)
    assert mae.readout == 'mean' and mae.mean == (0.485, 0.456, 0.406)
    sup = weights.load_backbone('vit_micro_patch8', 'in21k', str(tmp_path / 'supervised.pth'), img_size=32)
    assert sup.readout == 'cls' and sup.mean == (0.5, 0.5, 0.5) and sup.std == (0.5, 0.5, 0.5)
    none = models.create_backbone('vit_micro_patch8', img_size=32)
    assert none.identity == 'random' and none.readout == 'cls'
    tokens = torch.randn(2, 5, 64)
    ln = torch.nn.functional.layer_norm
    assert max_diff(models.pool(mae, tokens), mae.norm(tokens[:, 1:].mean(1))) == 0
    assert max_diff(models.pool(mae, tokens, 'mean-ln'), ln(tokens[:, 1:].mean(1), (64,), eps=1e-6)) == 0
    assert max_diff(models.pool(mae, tokens, 'cls'), mae.norm(tokens)[:, 0]) == 0


def test_mocov3_vit_small_has_12_heads(tmp_path):
    cfg = dict(models.ARCHS['vit_small_patch16_224'], num_heads=12)
    src = timm_vit(cfg, 64, perturb=True)
    torch.save({'state_dict': {f'module.base_encoder.{k}': v for k, v in src.state_dict().items()}},
               tmp_path / 'vit-s-300ep.pth.tar')
    m = weights.load_backbone('vit_small_patch16_224', 'mocov3', str(tmp_path / 'vit-s-300ep.pth.tar'),
                               img_size=64).eval()
    assert all(b.attn.num_heads == 12 for b in m.blocks)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert max_diff(m.forward_features(x), src.forward_features(x)) <= 1e-5
    assert models.create_backbone('vit_small_patch16_224', img_size=64).blocks[0].attn.num_heads == 6


def sincos_pos_embed(D, grid, moco=False):
    """(1, 1 + grid², D): a zero cls row, then the fixed 2-D sin-cos table, written here from the formulas of MAE
    (facebookresearch/mae util/pos_embed.py, get_2d_sincos_pos_embed: [sin, cos] of one coordinate, then of the other,
    omega = 1 / 10000^(i / (D/4))) and MoCo v3 (facebookresearch/moco-v3 vits.py, build_2d_sincos_position_embedding:
    the same four blocks, the column coordinate first)."""
    omega = 1.0 / 10000 ** (np.arange(D // 4) / (D / 4))
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing='ij')
    one = lambda pos: np.concatenate([np.sin(np.outer(pos.ravel(), omega)), np.cos(np.outer(pos.ravel(), omega))], 1)  # noqa: E731
    table = np.concatenate([one(cols), one(rows)] if moco else [one(rows), one(cols)], 1)
    return torch.tensor(np.concatenate([np.zeros((1, D)), table]), dtype=torch.float32)[None]


def test_a_file_that_contradicts_pretrain_is_refused(tmp_path):
    """The format and the pos_embed tell what a file was trained as (README, 'Get the files'): an MAE file as in21k, a
    supervised file as mae, an MAE file as mocov3 are one error line naming the --pretrain the file fits."""
    src = timm_vit(MICRO, 32, perturb=True)
    sd = {k: v for k, v in src.state_dict().items() if not k.startswith('head.')}
    sincos = dict(sd, pos_embed=sincos_pos_embed(64, 4))
    moco = dict(sd, pos_embed=sincos_pos_embed(64, 4, moco=True))
    assert weights.sincos_pos_embed(sincos['pos_embed']) and weights.sincos_pos_embed(moco['pos_embed'])
    assert not weights.sincos_pos_embed(sd['pos_embed'])
    torch.save({'model': sincos}, tmp_path / 'mae_pretrain.pth')
    torch.save(sincos, tmp_path / 'timm_mae.pth')                      # e.g. the hub's vit_base_patch16_224.mae
    torch.save({'state_dict': {f'module.base_encoder.{k}': v for k, v in moco.items()}}, tmp_path / 'moco.pth.tar')
    torch.save(sd, tmp_path / 'supervised.pth')                         # learned pos_embed
    write_npz(src, tmp_path / 'ViT-B_16.npz')
    refused = [('mae_pretrain.pth', 'in21k', r"\(MAE checkpoint \{'model': encoder\}\); pass --pretrain mae$"),
               ('mae_pretrain.pth', 'mocov3', r"\(MAE checkpoint .*\); pass --pretrain mae$"),
               ('moco.pth.tar', 'mae', r"\(MoCo v3 pre-training checkpoint .*\); pass --pretrain mocov3$"),
               ('timm_mae.pth', 'in21k', r"\(timm state dict; its pos_embed is a fixed 2-D sin-cos table, as MAE's "
                                         r"and MoCo v3's are\); pass --pretrain mae or mocov3$"),
               ('supervised.pth', 'mae', r"\(timm state dict; its pos_embed is learned, as a supervised ViT's is\); "
                                         r"pass --pretrain in21k or in21k-augreg$"),
               ('ViT-B_16.npz', 'mocov3', r"\(Google ViT \.npz\); pass --pretrain in21k or in21k-augreg$")]
    for name, pretrain, message in refused:
        with pytest.raises(weights.CheckpointError, match=f"^--pretrain {pretrain} does not fit .*{name} " + message):
            load(tmp_path / name, pretrain)
    accepted = [('mae_pretrain.pth', 'mae'), ('timm_mae.pth', 'mae'), ('timm_mae.pth', 'mocov3'),
                ('moco.pth.tar', 'mocov3'), ('supervised.pth', 'in21k'), ('supervised.pth', 'in21k-augreg'),
                ('ViT-B_16.npz', 'in21k')]
    for name, pretrain in accepted:
        assert load(tmp_path / name, pretrain).pretrain == pretrain


# -----------------------------------------------------------------------------
# bad input: a clear error, never a random model

@pytest.fixture
def good_sd():
    return timm_vit(MICRO, 32).state_dict()


def load(path, pretrain='in21k'):
    return weights.load_backbone('vit_micro_patch8', pretrain, str(path), img_size=32)


def test_missing_block(tmp_path, good_sd):
    sd = {k: v for k, v in good_sd.items() if not k.startswith('blocks.3.')}
    torch.save(sd, tmp_path / 'w.pth')
    with pytest.raises(weights.CheckpointError, match=r"(?s)w\.pth.*timm state dict.*missing keys: blocks\.3\.attn"):
        load(tmp_path / 'w.pth')


def test_renamed_key(tmp_path, good_sd):
    good_sd['blocks.0.attn.qkv_renamed.weight'] = good_sd.pop('blocks.0.attn.qkv.weight')
    torch.save({'model': good_sd}, tmp_path / 'mae.pth')
    with pytest.raises(weights.CheckpointError, match=r"(?s)MAE.*missing keys: blocks\.0\.attn\.qkv\.weight.*"
                                                      r"unexpected keys: blocks\.0\.attn\.qkv_renamed"):
        load(tmp_path / 'mae.pth', 'mae')


def test_wrong_shape_and_wrong_arch(tmp_path, good_sd):
    good_sd['blocks.1.mlp.fc1.weight'] = torch.zeros(100, 64)
    torch.save(good_sd, tmp_path / 'w.pth')
    with pytest.raises(weights.CheckpointError, match=r"shape mismatches: blocks\.1\.mlp\.fc1\.weight \(100, 64\) "
                                                      r"vs model \(256, 64\)"):
        load(tmp_path / 'w.pth')
    nano = timm_vit(models.ARCHS['vit_nano_patch8'], 32).state_dict()
    torch.save(nano, tmp_path / 'nano.pth')  # the file names the arch it fits
    with pytest.raises(weights.CheckpointError, match=r"^--arch vit_micro_patch8 does not fit .*nano\.pth \(timm state "
                                                      r"dict\): it holds a ViT of embed dim 32, depth 2, patch 8; pass "
                                                      r"--arch vit_nano_patch8$"):
        load(tmp_path / 'nano.pth')
    del nano['blocks.1.norm1.weight']  # dims that no arch has: the keys tell what is wrong
    nano.update({k.replace('blocks.1.', 'blocks.2.'): v for k, v in nano.items() if k.startswith('blocks.1.')})
    torch.save(nano, tmp_path / 'nano3.pth')
    with pytest.raises(weights.CheckpointError, match=r"(?s)missing keys: blocks\.1\.norm1\.weight, blocks\.2.*check "
                                                      r"--arch"):
        load(tmp_path / 'nano3.pth')


def test_unknown_extra_key_is_an_error(tmp_path, good_sd):
    good_sd['fc_norm.weight'] = torch.ones(64)   # e.g. an MAE *fine-tuned* file: not a pre-trained encoder
    torch.save(good_sd, tmp_path / 'w.pth')
    with pytest.raises(weights.CheckpointError, match=r"unexpected keys: fc_norm\.weight"):
        load(tmp_path / 'w.pth')


def test_not_a_checkpoint(tmp_path):
    (tmp_path / 'notes.pth').write_text('garbage bytes here')  # torch: 'Unsupported operand 103' + its advice
    (tmp_path / 'notes.npz').write_text('these are not arrays')
    torch.save(timm_vit(MICRO, 32).state_dict(), tmp_path / 'good.pth')
    (tmp_path / 'cut.pth').write_bytes((tmp_path / 'good.pth').read_bytes()[:4096])
    for name, why in [('notes.pth', 'UnpicklingError: Unsupported operand 103'),
                      ('notes.npz', 'not a zip archive of arrays'),
                      ('cut.pth', 'failed reading zip archive')]:
        with pytest.raises(weights.CheckpointError) as info:
            load(tmp_path / name)
        message = str(info.value)
        assert message.startswith(f"{tmp_path / name} is not a readable checkpoint") and why in message, message
        # torch's and numpy's advice to unpickle the file (weights_only=False / allow_pickle) is not relayed
        assert 'weights_only' not in message and 'allow_pickle' not in message and '\n' not in message
    torch.save([1, 2, 3], tmp_path / 'list.pth')
    with pytest.raises(weights.CheckpointError, match=r"list\.pth: holds a list, not a state dict"):
        load(tmp_path / 'list.pth')
    np.savez(tmp_path / 'other.npz', a=np.zeros(3))
    with pytest.raises(weights.CheckpointError, match=r"other\.npz: .*not a Google ViT checkpoint"):
        load(tmp_path / 'other.npz')


def test_missing_path(tmp_path):
    with pytest.raises(weights.CheckpointError, match=r"weights file not found: .*nowhere\.pth"):
        load(tmp_path / 'nowhere.pth')


def test_mocov3_needs_weights():
    with pytest.raises(weights.CheckpointError, match=r"mocov3.*--weights"):
        weights.load_backbone('vit_micro_patch8', 'mocov3', img_size=32)


def run_py(code, env_extra):
    env = dict(os.environ, **env_extra)
    return subprocess.run([sys.executable, '-c', code], cwd=HERE, env=env, capture_output=True, text=True, timeout=300)


def test_hub_unreachable_without_cache(tmp_path):
    code = ("import weights\n"
            "try:\n    weights.load_backbone('vit_base_patch16_224', 'mae')\n"
            "except weights.CheckpointError as e:\n    print('ERROR:', e)\n")
    r = run_py(code, {'HF_HUB_OFFLINE': '1', 'HF_HOME': str(tmp_path / 'hf')})
    assert r.returncode == 0, r.stderr
    assert "ERROR: cannot get the weights of 'vit_base_patch16_224.mae'" in r.stdout
    assert '--weights' in r.stdout and 'hf download timm/vit_base_patch16_224.mae' in r.stdout
    assert 'models--timm--vit_base_patch16_224.mae' in r.stdout
    assert 'HF_HUB_OFFLINE is set' in r.stdout and 'set HF_HUB_OFFLINE=1' not in r.stdout  # no advice to set it again
    # a hub that refuses connections (a closed local port): the real huggingface_hub, one request, the right words
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    r = run_py(code, {'HF_HUB_OFFLINE': '0', 'HF_HOME': str(tmp_path / 'hf'),
                      'HF_ENDPOINT': f'http://127.0.0.1:{port}'})
    assert r.returncode == 0, r.stderr
    assert 'the Hugging Face hub cannot be reached (ConnectError' in r.stdout, r.stdout
    assert 'not on the hub' not in r.stdout and 'set HF_HUB_OFFLINE=1 to skip the hub' in r.stdout


class FakeHub:
    """huggingface_hub's hf_hub_download / get_hf_file_metadata replaced: nothing is cached, and every metadata
    request raises errors.pop(0) (or succeeds when the list is empty); records the calls."""

    def __init__(self, monkeypatch, errors):
        import huggingface_hub as hf
        self.errors, self.calls = list(errors), []
        monkeypatch.setattr(hf, 'hf_hub_download', self.download)
        monkeypatch.setattr(hf, 'get_hf_file_metadata', self.metadata)

    def download(self, repo, filename, local_files_only=False, **kw):
        from huggingface_hub.errors import LocalEntryNotFoundError
        self.calls.append(('cache' if local_files_only else 'download', filename))
        if local_files_only:
            raise LocalEntryNotFoundError(f'{filename} is not in the cache')
        return f'/fake/{filename}'

    def metadata(self, url, timeout=None, **kw):
        self.calls.append(('ask', url.rsplit('/', 1)[-1], timeout))
        if self.errors:
            raise self.errors.pop(0)


@pytest.mark.parametrize('error', ['local-entry', 'connection', 'timeout'])
def test_unreachable_hub_is_one_short_request(monkeypatch, error):
    from huggingface_hub.errors import LocalEntryNotFoundError
    monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
    monkeypatch.delenv('TRANSFORMERS_OFFLINE', raising=False)
    exc = {'local-entry': LocalEntryNotFoundError('cannot reach the hub'),  # a subclass of EntryNotFoundError
           'connection': ConnectionError('[Errno -2] Name or service not known'),
           'timeout': TimeoutError('timed out')}[error]
    hub = FakeHub(monkeypatch, [exc, exc])
    with pytest.raises(weights.CheckpointError) as info:
        weights.hub_weights('vit_base_patch16_224', 'mae')
    message = str(info.value)
    # the cache is looked at for both names, then ONE request with the short timeout; the second name is not asked
    assert hub.calls == [('cache', 'model.safetensors'), ('cache', 'pytorch_model.bin'),
                         ('ask', 'model.safetensors', weights.HUB_TIMEOUT)]
    assert weights.HUB_TIMEOUT <= 10
    assert 'the Hugging Face hub cannot be reached' in message and 'holds none of' not in message
    assert '--weights' in message and 'hf download timm/vit_base_patch16_224.mae' in message
    assert 'set HF_HUB_OFFLINE=1' in message
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    hub = FakeHub(monkeypatch, [exc])
    with pytest.raises(weights.CheckpointError) as info:
        weights.hub_weights('vit_base_patch16_224', 'mae')
    assert [c[0] for c in hub.calls] == ['cache', 'cache']  # offline: the hub is not asked
    assert 'HF_HUB_OFFLINE is set' in str(info.value) and 'set HF_HUB_OFFLINE=1' not in str(info.value)


def test_hub_file_missing_tries_the_next_name(monkeypatch):
    from huggingface_hub.errors import EntryNotFoundError
    monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
    hub = FakeHub(monkeypatch, [EntryNotFoundError('404 model.safetensors')])
    assert weights.hub_weights('vit_base_patch16_224', 'mae') == '/fake/pytorch_model.bin'
    assert hub.calls[2:] == [('ask', 'model.safetensors', weights.HUB_TIMEOUT),
                             ('ask', 'pytorch_model.bin', weights.HUB_TIMEOUT), ('download', 'pytorch_model.bin')]
    hub = FakeHub(monkeypatch, [EntryNotFoundError('404'), EntryNotFoundError('404')])
    with pytest.raises(weights.CheckpointError, match='holds none of model.safetensors, pytorch_model.bin'):
        weights.hub_weights('vit_base_patch16_224', 'mae')


def test_hub_weights_from_cache(tmp_path):
    """A pre-filled Hugging Face cache (the layout `hf download` writes) is used offline, and the
    real hub file's 21843-class head is dropped by name."""
    src = timm_vit(models.ARCHS['vit_tiny_patch16_224'], 224, num_classes=21843, perturb=True)
    snap = tmp_path / 'hf' / 'hub' / 'models--timm--vit_tiny_patch16_224.augreg_in21k'
    rev = 'a' * 40
    (snap / 'snapshots' / rev).mkdir(parents=True)
    (snap / 'refs').mkdir()
    (snap / 'refs' / 'main').write_text(rev)
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in src.state_dict().items()},
              str(snap / 'snapshots' / rev / 'model.safetensors'))
    x = torch.randn(1, 3, 224, 224)
    torch.save(x, tmp_path / 'x.pt')
    code = ("import torch, weights\n"
            "m = weights.load_backbone('vit_tiny_patch16_224', 'in21k-augreg').eval()\n"
            f"x = torch.load(r'{tmp_path / 'x.pt'}')\n"
            f"torch.save((m.identity, m.weights_path, m.forward_features(x).detach()), r'{tmp_path / 'out.pt'}')\n")
    r = run_py(code, {'HF_HUB_OFFLINE': '1', 'HF_HOME': str(tmp_path / 'hf')})
    assert r.returncode == 0, r.stderr
    identity, path, feats = torch.load(tmp_path / 'out.pt')
    assert 'models--timm--vit_tiny_patch16_224.augreg_in21k' in path
    # the hub copy and a local file of the same tensors (another format, with the head) are one backbone
    torch.save(src.state_dict(), tmp_path / 'local.pth')
    local = weights.load_backbone('vit_tiny_patch16_224', 'in21k-augreg', str(tmp_path / 'local.pth'))
    assert identity == local.identity and identity.startswith('tensors:')
    with torch.no_grad():
        assert max_diff(feats, src.forward_features(x)) <= 1e-5
