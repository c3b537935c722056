"""
A hand-written Vision Transformer with timm's parameter names, and strict loading of every
checkpoint the prompt-tuning papers use.

References:
1) timm `models/vision_transformer.py` (VisionTransformer, Block, Attention): the names and the
   numerics we match. On the same weights our forward_features equals timm's bit for bit.
2) Google's original ViT `.npz` layout (VPT and SA²VP load `imagenet21k_ViT-B_16.npz`).
3) facebookresearch/mae (`{'model': encoder}`) and facebookresearch/moco-v3 (pre-training files
   with `module.base_encoder.` and linear-probe files with `module.`).

Loading is strict: anything that is not a backbone tensor is dropped by name (heads, decoder,
mask token, momentum encoder, predictor, projector); every other missing or unexpected key, or a
shape mismatch, raises one error that names the file, the detected format and the keys. timm's own
loader silently falls back to a non-strict load; that cannot happen here.
"""

import argparse
import hashlib
import math
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# the model


class PatchEmbed(nn.Module):
    """Image to patch tokens: a stride-p convolution. (B, 3, H, W) -> (B, H/p * W/p, D)"""

    def __init__(self, patch_size, embed_dim):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        x = self.proj(x)                     # (B, D, h, w)
        return x.flatten(2).transpose(1, 2)  # (B, h*w, D)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection, as timm's Attention."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def split_qkv(self, x):
        """(B, N, D) normalised tokens -> q, k, v, each (B, H, N, D/H)."""
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)

    def merge_heads(self, x):
        """(B, H, N, D/H) -> (B, N, D); the output projection is applied separately."""
        B, H, N, d = x.shape
        return x.transpose(1, 2).reshape(B, N, H * d)

    def forward(self, x, attn_mask=None):
        q, k, v = self.split_qkv(x)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, N, D/H)
        return self.proj(self.merge_heads(x))


class Mlp(nn.Module):
    """fc1 -> exact GELU -> dropout -> fc2 -> dropout (dropout only for SA²VP's backbone)."""

    def __init__(self, dim, hidden, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x):
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, drop=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x, attn_mask=None):
        x = x + self.attn(self.norm1(x), attn_mask)
        x = x + self.mlp(self.norm2(x))
        return x


def resample_pos_embed(pos_embed, grid, num_prefix=1):
    """Resize a (1, prefix + h*w, D) position embedding to a new (h', w') grid the way timm does
    (bicubic, antialias=True, in float32); the cls slot is kept as is."""
    n = pos_embed.shape[1] - num_prefix
    old = int(math.sqrt(n))
    if old * old != n:
        raise ValueError(f"pos_embed has {n} patch positions, which is not a square grid")
    if (old, old) == tuple(grid):
        return pos_embed
    prefix, pe = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    D = pe.shape[-1]
    pe = pe.float().reshape(1, old, old, D).permute(0, 3, 1, 2)
    pe = F.interpolate(pe, size=tuple(grid), mode='bicubic', antialias=True)
    pe = pe.permute(0, 2, 3, 1).reshape(1, -1, D).to(pos_embed.dtype)
    return torch.cat([prefix, pe], dim=1)


class VisionTransformer(nn.Module):
    """ViT backbone without a head. Parameter names are timm's, so a timm state dict loads
    strictly. Methods drive `blocks` themselves: `embed` -> blocks[i] -> `norm`."""

    def __init__(self, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, drop_rate=0.0):
        super().__init__()
        self.img_size, self.patch_size = img_size, patch_size
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.grid = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + self.num_patches, embed_dim) * 0.02)
        self.pos_drop = nn.Dropout(drop_rate)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, drop_rate) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self._init_weights()
        # filled in by create_backbone (what the weights are and how to read them out)
        self.pretrain, self.identity, self.readout = 'none', 'random', 'cls'
        self.mean, self.std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    def _init_weights(self):
        # timm's default ('jax'-free) init: trunc-normal 0.02 Linear weights, zero biases
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def pos_embed_for(self, grid):
        """The position embedding for an input whose patch grid is `grid` (resampled if needed)."""
        if tuple(grid) == self.grid:
            return self.pos_embed
        return resample_pos_embed(self.pos_embed, grid)

    def patchify(self, x):
        """(B, 3, H, W) -> patch tokens (B, N, D) before any position embedding, and the grid."""
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        return self.patch_embed(x), grid

    def embed(self, x):
        """(B, 3, H, W) -> [cls, patches] + pos_embed, then dropout: (B, 1+N, D)."""
        x, grid = self.patchify(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + self.pos_embed_for(grid))

    def forward_features(self, x):
        """All tokens after the final norm, (B, 1+N, D), as timm's forward_features."""
        x = self.embed(x)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward(self, x):
        return self.forward_features(x)


def pool(backbone, x, readout=None):
    """The readout of a backbone: tokens after the last block, (B, T, D) pre-norm -> (B, D).
    'cls':  final norm, then token 0 (supervised, MoCo v3, VPT).
    'mean': mean of every non-cls token (prompts and patches), then the *pretrained* final norm
            (MAE in GaPT / SPT / LSPT).
    'mean-ln': the same mean, then an affine-free LayerNorm (VPT's fresh frozen fc_norm for MAE)."""
    readout = readout or backbone.readout
    if readout == 'cls':
        return backbone.norm(x)[:, 0]
    if readout == 'mean':
        return backbone.norm(x[:, 1:].mean(dim=1))
    if readout == 'mean-ln':
        return F.layer_norm(x[:, 1:].mean(dim=1), (x.shape[-1],), eps=1e-6)
    raise ValueError(f"unknown readout {readout!r}; expected cls, mean or mean-ln")


# -----------------------------------------------------------------------------
# architectures, pre-training tags and their defaults (the README's Weights table)

ARCHS = {
    'vit_tiny_patch16_224': dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    'vit_small_patch16_224': dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    'vit_base_patch16_224': dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    'vit_large_patch16_224': dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    'vit_huge_patch14_224': dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
    # small custom sizes for tests and the offline CPU demo (no pretrained weights exist)
    'vit_micro_patch8': dict(patch_size=8, embed_dim=64, depth=4, num_heads=4),
    'vit_nano_patch8': dict(patch_size=8, embed_dim=32, depth=2, num_heads=2),
}

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
INCEPTION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

# pretrain -> (timm tag or None, normalisation, default readout)
PRETRAIN = {
    'none': (None, IMAGENET, 'cls'),
    'in21k': ('orig_in21k', INCEPTION, 'cls'),            # Google's 2020 ViT-B_16.npz (VPT, SA²VP)
    'in21k-augreg': ('augreg_in21k', INCEPTION, 'cls'),   # what SPT's timm 0.6 gave
    'mae': ('mae', IMAGENET, 'mean'),                     # GaPT/SPT/LSPT readout
    'mocov3': (None, IMAGENET, 'cls'),                    # no timm tag: --weights only
}

MOCO_URL = 'https://dl.fbaipublicfiles.com/moco-v3/vit-b-300ep/vit-b-300ep.pth.tar'


class CheckpointError(RuntimeError):
    """A weights file that does not fit the model, or weights that cannot be found."""


# keys that are never part of the backbone: dropped by name, everything else must match
def _irrelevant(key):
    return (key.startswith(('head.', 'head_', 'fc_norm_head', 'pre_logits.', 'decoder', 'mask_token',
                            'momentum_encoder.', 'predictor.', 'projector.'))
            or key in ('head', 'mask_token'))


def _npz_to_timm(npz):
    """Google's original ViT .npz (flax names, HWIO / (D, H, d) kernels) -> timm state dict.
    The mapping of timm's _load_weights (timm/models/vision_transformer.py), which VPT's and SA²VP's
    load_from (jeonsworld/ViT-pytorch) also apply: q/k/v kernels stacked into qkv, kernels transposed."""
    t = lambda a: torch.from_numpy(a.copy()).float()  # noqa: E731
    sd = {}
    sd['patch_embed.proj.weight'] = t(npz['embedding/kernel']).permute(3, 2, 0, 1)  # HWIO -> OIHW
    sd['patch_embed.proj.bias'] = t(npz['embedding/bias'])
    sd['cls_token'] = t(npz['cls'])
    sd['pos_embed'] = t(npz['Transformer/posembed_input/pos_embedding'])
    sd['norm.weight'] = t(npz['Transformer/encoder_norm/scale'])
    sd['norm.bias'] = t(npz['Transformer/encoder_norm/bias'])
    i = 0
    while f'Transformer/encoderblock_{i}/LayerNorm_0/scale' in npz:
        p, b = f'Transformer/encoderblock_{i}/', f'blocks.{i}.'
        att = p + 'MultiHeadDotProductAttention_1/'
        sd[b + 'norm1.weight'] = t(npz[p + 'LayerNorm_0/scale'])
        sd[b + 'norm1.bias'] = t(npz[p + 'LayerNorm_0/bias'])
        sd[b + 'attn.qkv.weight'] = torch.cat([t(npz[att + n + '/kernel']).flatten(1).T for n in ('query', 'key', 'value')])
        sd[b + 'attn.qkv.bias'] = torch.cat([t(npz[att + n + '/bias']).flatten() for n in ('query', 'key', 'value')])
        sd[b + 'attn.proj.weight'] = t(npz[att + 'out/kernel']).flatten(0, 1).T
        sd[b + 'attn.proj.bias'] = t(npz[att + 'out/bias'])
        sd[b + 'norm2.weight'] = t(npz[p + 'LayerNorm_2/scale'])
        sd[b + 'norm2.bias'] = t(npz[p + 'LayerNorm_2/bias'])
        for j in (0, 1):
            sd[b + f'mlp.fc{j + 1}.weight'] = t(npz[p + f'MlpBlock_3/Dense_{j}/kernel']).T
            sd[b + f'mlp.fc{j + 1}.bias'] = t(npz[p + f'MlpBlock_3/Dense_{j}/bias'])
        i += 1
    used = {k for k in npz.files if k.startswith(('embedding/', 'cls', 'Transformer/'))}
    leftover = [k for k in npz.files if k not in used and not k.startswith(('head/', 'pre_logits/'))]
    return sd, leftover


def read_checkpoint(path):
    """Read any supported weights file. Returns (state dict in timm names, format name, extra keys
    that were neither mapped nor known-irrelevant). Raises CheckpointError naming the file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"weights file not found: {path}")
    try:
        if path.endswith('.npz'):
            import numpy as np
            with np.load(path) as npz:
                if 'embedding/kernel' not in npz.files:
                    raise CheckpointError(f"{path}: an .npz without 'embedding/kernel' is not a Google ViT checkpoint "
                                          f"(first keys: {sorted(npz.files)[:5]})")
                sd, leftover = _npz_to_timm(npz)
            return sd, "Google ViT .npz", leftover
        if path.endswith('.safetensors'):
            from safetensors.torch import load_file
            obj, fmt = load_file(path), "timm state dict (.safetensors)"
        else:
            torch.serialization.add_safe_globals([argparse.Namespace])  # MAE/MoCo files may hold their args
            obj, fmt = torch.load(path, map_location='cpu', weights_only=True), "timm state dict"
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable checkpoint (a .safetensors file, a Google ViT .npz, or a "
                              f"torch file of tensors): {_unreadable(e)}; re-download or re-export it") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    if 'model' in obj and isinstance(obj['model'], dict):
        obj, fmt = obj['model'], "MAE checkpoint {'model': encoder}"
    elif 'state_dict' in obj and isinstance(obj['state_dict'], dict):
        sd = obj['state_dict']
        if any(k.startswith('module.base_encoder.') for k in sd):
            p = 'module.base_encoder.'
            fmt = "MoCo v3 pre-training checkpoint (module.base_encoder.)"
            # the base encoder's head.* is MoCo's projector; momentum encoder and predictor are dropped
            obj = {k[len(p):]: v for k, v in sd.items() if k.startswith(p) and not k.startswith(p + 'head.')}
            obj.update({k[len('module.'):]: v for k, v in sd.items() if not k.startswith(p)})
        elif sd and all(k.startswith('module.') for k in sd):
            obj, fmt = {k[len('module.'):]: v for k, v in sd.items()}, "MoCo v3 linear-probe checkpoint (module.)"
        else:
            obj, fmt = sd, "checkpoint {'state_dict': ...}"
    if not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)][:5]
        raise CheckpointError(f"{path}: not a state dict of tensors (detected {fmt}; non-tensor entries: {bad})")
    sd = {k: v for k, v in obj.items() if not _irrelevant(k)}
    return sd, fmt, []


def _unreadable(e):
    """Why a weights file could not be read, without torch's advice to re-run with weights_only=False or
    numpy's allow_pickle advice (both would unpickle untrusted code, and neither helps a corrupt file)."""
    text = str(e)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if 'allow_pickle' in text:
        return 'not a zip archive of arrays'
    found = re.search(r'WeightsUnpickler error:\s*(.*?)(?:\. |\n|$)', text)
    if found:  # what torch's restricted unpickler met: "Unsupported operand 103", "Unsupported global: ..."
        return f"{type(e).__name__}: {found.group(1)}"
    return f"{type(e).__name__}: {lines[0].split('. ')[0]}" if lines else type(e).__name__


def _short(keys, n=8):
    keys = sorted(keys)
    return ', '.join(keys[:n]) + (f', ... ({len(keys)} in all)' if len(keys) > n else '')


def load_weights(model, path):
    """Strictly load a weights file into `model`; pos_embed is resampled to the model's grid.
    Returns the detected format; sets model.identity to 'tensors:<tensor_digest>' of the backbone tensors as
    read (timm names, before any resampling)."""
    sd, fmt, leftover = read_checkpoint(path)
    digest = tensor_digest(sd)
    if 'pos_embed' in sd and sd['pos_embed'].ndim == 3 and sd['pos_embed'].shape[1] != model.pos_embed.shape[1]:
        try:
            sd['pos_embed'] = resample_pos_embed(sd['pos_embed'], model.grid)
        except ValueError as e:
            raise CheckpointError(f"{path} ({fmt}): {e}") from e
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own] + leftover
    shapes = [f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in own
              if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        msg = [f"{path}: detected format: {fmt}; it does not fit a ViT with embed_dim={model.embed_dim}, "
               f"depth={len(model.blocks)}, patch={model.patch_size}."]
        if missing:
            msg.append(f"missing keys: {_short(missing)}")
        if unexpected:
            msg.append(f"unexpected keys: {_short(unexpected)}")
        if shapes:
            msg.append(f"shape mismatches: {_short(shapes, 4)}")
        msg.append("Expected timm ViT names (patch_embed.proj, cls_token, pos_embed, blocks.N.{norm1,attn.qkv,"
                   "attn.proj,norm2,mlp.fc1,mlp.fc2}, norm), a Google ViT .npz, an MAE {'model'} file or a "
                   "MoCo v3 file; check --arch against the checkpoint.")
        raise CheckpointError('\n  '.join(msg))
    model.load_state_dict(sd, strict=True)
    model.identity = f'tensors:{digest}'
    return fmt


HUB_FILES = ('model.safetensors', 'pytorch_model.bin')  # what timm's hub repos hold, in timm's order of preference
HUB_TIMEOUT = 5  # seconds for the one request that asks the hub whether a file is there


def hub_offline():
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set to a true value, as huggingface_hub reads it."""
    value = os.environ.get('HF_HUB_OFFLINE') or os.environ.get('TRANSFORMERS_OFFLINE') or ''
    return value.upper() in ('1', 'ON', 'YES', 'TRUE')


def hub_weights(arch, tag):
    """Path of `<arch>.<tag>` weights from the Hugging Face cache, else downloaded from the hub.
    The repo is the one timm's pretrained config names, e.g. timm/vit_base_patch16_224.mae.

    Without the file in the cache, one request (timeout HUB_TIMEOUT s, no retries) asks the hub whether the
    file exists before hf_hub_download is called: an unreachable hub then fails in seconds, where
    hf_hub_download itself retries for about a minute. huggingface_hub raises LocalEntryNotFoundError, a
    subclass of EntryNotFoundError, when it cannot reach the hub, so that case is told apart first."""
    from timm.models import get_pretrained_cfg
    try:
        cfg = get_pretrained_cfg(f'{arch}.{tag}')
    except RuntimeError:
        cfg = None
    if cfg is None or not cfg.hf_hub_id:
        raise CheckpointError(f"timm has no pretrained weights '{arch}.{tag}'; pass a local file with --weights")
    repo = cfg.hf_hub_id
    import huggingface_hub as hf
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError
    for fname in HUB_FILES:  # the cache first
        try:
            return hf.hf_hub_download(repo, fname, local_files_only=True)
        except OSError:  # LocalEntryNotFoundError: not in the cache
            pass
    if hub_offline():
        problem = "they are not in the Hugging Face cache, and HF_HUB_OFFLINE is set, so the hub was not asked"
    else:
        problem = None
        for fname in HUB_FILES:
            try:
                hf.get_hf_file_metadata(hf.hf_hub_url(repo, fname), timeout=HUB_TIMEOUT)  # one attempt
            except LocalEntryNotFoundError as e:  # must come before EntryNotFoundError, its base class
                problem = f"they are not in the cache and the Hugging Face hub cannot be reached ({_reason(e)})"
                break
            except EntryNotFoundError:  # reachable, but no such file in the repo: try the next name
                continue
            except HfHubHTTPError as e:  # reachable, but it refused (unknown or gated repo, 5xx)
                problem = f"the Hugging Face hub answered {_reason(e)}"
                break
            except Exception as e:  # connection refused, DNS, timeout, proxy: no network
                problem = f"they are not in the cache and the Hugging Face hub cannot be reached ({_reason(e)})"
                break
            try:
                return hf.hf_hub_download(repo, fname)
            except Exception as e:
                raise CheckpointError(f"downloading {fname} of {repo} from the Hugging Face hub failed "
                                      f"({_reason(e)}); run again, or pass a local file with --weights") from None
        if problem is None:
            problem = f"the hub repo {repo} holds none of {', '.join(HUB_FILES)}"
    from huggingface_hub import constants
    advice = ("" if hub_offline() else
              "\n  On a machine without network, set HF_HUB_OFFLINE=1 to skip the hub.")
    raise CheckpointError(
        f"cannot get the weights of '{arch}.{tag}': {problem}.\n"
        f"  Either pass the file directly: --weights /path/to/model.safetensors (or the original .npz/.pth),\n"
        f"  or fill the cache on a machine with internet:  hf download {repo} model.safetensors\n"
        f"  and copy {constants.HF_HUB_CACHE}/models--{repo.replace('/', '--')} to this machine's cache "
        f"(HF_HOME / HF_HUB_CACHE).{advice}")


def _reason(e):
    """'<ExceptionType>: <first line of its message>' for an error message."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else ''
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def file_digest(path, n=16):
    """sha256 of a file's bytes (the identity of a local weights file in runs recorded before tensor_digest)."""
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()[:n]


def tensor_digest(state_dict, n=16):
    """sha256 over the tensors of a state dict: for each name in sorted order the name, shape, dtype and the
    values' bytes (C order). The same weights give the same digest whatever file format or hub copy they came
    from; a different value, name, shape or dtype gives another."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{str(t.dtype).replace('torch.', '')}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:n]


def same_backbone(backbone, recorded):
    """Whether `backbone` is the one a run recorded as `recorded`. Current runs record 'tensors:<digest>' (or
    'random'); runs recorded before that hold a hub tag '<arch>.<tag>' or 'sha256:<digest of the file bytes>',
    which are compared the old way so that those runs still evaluate and resume."""
    if recorded.startswith('sha256:'):
        path = getattr(backbone, 'weights_path', None)
        return path is not None and recorded == f'sha256:{file_digest(path)}'
    if recorded not in ('random',) and not recorded.startswith('tensors:'):  # an old run's hub tag
        return getattr(backbone, 'hub_tag', None) == recorded
    return backbone.identity == recorded


def create_backbone(arch, pretrain='none', weights=None, img_size=224, drop_rate=0.0):
    """Build a frozen-ready ViT and load its weights.
    arch: a timm architecture name (see ARCHS). pretrain: none | in21k | in21k-augreg | mae | mocov3.
    weights: a local file in any supported format; without it, the hub weights of the pretrain tag.
    The returned model carries .pretrain, .identity ('tensors:<16 hex>', the tensor_digest of the loaded
    weights, whichever file or hub copy held them; 'random' for pretrain='none'), .hub_tag ('<arch>.<tag>' when
    the weights came from the hub, else None), .weights_path, .readout, .mean and .std."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose from {', '.join(ARCHS)}")
    if pretrain not in PRETRAIN:
        raise ValueError(f"unknown pretrain {pretrain!r}; choose from {', '.join(PRETRAIN)}")
    cfg = dict(ARCHS[arch])
    if pretrain == 'mocov3' and arch == 'vit_small_patch16_224':
        cfg['num_heads'] = 12  # MoCo v3's own ViT-S has 12 heads of 32; timm's has 6 of 64 (same shapes!)
    model = VisionTransformer(img_size=img_size, drop_rate=drop_rate, **cfg)
    tag, (mean, std), readout = PRETRAIN[pretrain]
    if weights is None and pretrain == 'mocov3':
        raise CheckpointError(f"pretrain='mocov3' has no hub copy: download {MOCO_URL} (or the linear-probe "
                              f"file) and pass it with --weights")
    if pretrain == 'none' and weights is not None:
        raise CheckpointError(f"pretrain='none' means a random backbone, but a weights file was given ({weights}): "
                              f"drop --weights, or say what the file holds with --pretrain "
                              f"{'|'.join(p for p in PRETRAIN if p != 'none')}")
    model.hub_tag = None
    if weights is None and tag is not None:
        weights, model.hub_tag = hub_weights(arch, tag), f'{arch}.{tag}'
    model.weights_path = weights
    if weights is not None:
        model.weights_format = load_weights(model, weights)  # sets model.identity
    model.pretrain, model.readout, model.mean, model.std = pretrain, readout, mean, std
    model.arch = arch
    return model
