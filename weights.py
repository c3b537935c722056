"""
Weights files and the Hugging Face hub: every checkpoint layout the prompt-tuning papers use, read strictly
into timm's names, and the identity of a backbone.

Formats, detected from the file:
1) timm state dicts (.safetensors, .pth, .bin), e.g. the hub's timm/vit_base_patch16_224.mae;
2) Google's original ViT .npz (VPT and SA²VP load imagenet21k_ViT-B_16.npz), mapped as timm's _load_weights;
3) facebookresearch/mae files ({'model': encoder});
4) facebookresearch/moco-v3 pre-training files (module.base_encoder.) and linear-probe files (module.).

Loading is strict: anything that is not a backbone tensor is dropped by name (heads, decoder, mask token,
momentum encoder, predictor, projector); every other missing or unexpected key, or a shape mismatch, is one
CheckpointError naming the file, the detected format and the keys. timm's own loader silently falls back to a
non-strict load; that cannot happen here. A backbone's identity is a digest of its tensors (tensor_digest), so
the same weights in any file or hub copy are the same backbone.
"""

import argparse
import hashlib
import os
import re

import torch

import models

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
        sd[b + 'attn.qkv.weight'] = torch.cat([t(npz[att + n + '/kernel']).flatten(1).T
                                               for n in ('query', 'key', 'value')])
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


def check_fits(model, sd, leftover, path, fmt):
    """A CheckpointError naming the file, its format and every missing, unexpected or mis-shaped key when the state
    dict `sd` does not fit `model` (pos_embed may differ in length: it is resampled)."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own] + leftover
    resampled = lambda k: k == 'pos_embed' and sd[k].ndim == 3 and sd[k].shape[-1] == own[k].shape[-1]  # noqa: E731
    shapes = [f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in own
              if k in sd and sd[k].shape != own[k].shape and not resampled(k)]
    if not (missing or unexpected or shapes) and sd['pos_embed'].shape != own['pos_embed'].shape:
        try:
            models.resample_pos_embed(sd['pos_embed'][:, :, :1], model.grid)  # one channel: is it a square grid?
        except ValueError as e:
            raise CheckpointError(f"{path} ({fmt}): {e}") from None
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


SUPERVISED = ('in21k', 'in21k-augreg')  # the --pretrain values of a supervised ViT's weights


def sincos_pos_embed(pos_embed):
    """Whether a (1, 1 + N, D) pos_embed is a fixed 2-D sin-cos table, as MAE's (facebookresearch/mae
    util/pos_embed.py, get_2d_sincos_pos_embed) and MoCo v3's (facebookresearch/moco-v3 vits.py,
    build_2d_sincos_position_embedding) are: after the cls row, four D/4-wide blocks sin(a), cos(a), sin(b), cos(b)
    of the two grid coordinates, so that every (sin, cos) pair squares to 1. A learned table never does."""
    pe, D = pos_embed.float().reshape(-1, pos_embed.shape[-1]), pos_embed.shape[-1]
    blocks = pe[1:].reshape(-1, 2, 2, D // 4) if D % 4 == 0 else None  # (N, coordinate, sin|cos, D/4)
    return blocks is not None and bool(((blocks[:, :, 0] ** 2 + blocks[:, :, 1] ** 2 - 1).abs() < 1e-3).all())


def fits(sd, fmt):
    """What a read weights file fits: (the --pretrain values, why, the models.ARCHS, its (embed dim, depth, patch)).
    Google's .npz is a supervised ViT's, an MAE or MoCo v3 file its own pre-training's; a timm state dict tells by its
    pos_embed: a fixed sin-cos table is MAE's or MoCo v3's, a learned one a supervised ViT's."""
    pretrains, why = {'Google': SUPERVISED, 'MAE': ('mae',), 'MoCo': ('mocov3',)}.get(fmt.split()[0]), ''
    if pretrains is None and 'pos_embed' in sd and sincos_pos_embed(sd['pos_embed']):
        pretrains, why = ('mae', 'mocov3'), "; its pos_embed is a fixed 2-D sin-cos table, as MAE's and MoCo v3's are"
    elif pretrains is None and 'pos_embed' in sd:
        pretrains, why = SUPERVISED, "; its pos_embed is learned, as a supervised ViT's is"
    w, depth = sd.get('patch_embed.proj.weight'), len({k.split('.')[1] for k in sd if k.startswith('blocks.')})
    shape = None if w is None else (w.shape[0], depth, w.shape[-1])
    archs = [a for a, c in models.ARCHS.items() if shape == (c['embed_dim'], c['depth'], c['patch_size'])]
    return pretrains or tuple(models.PRETRAIN), why, archs, shape


def checked(arch, pretrain, path=None, img_size=224):
    """(path, state dict in timm names, format) of the weights that load_backbone builds `arch` for `pretrain` with:
    the file `path`, else the hub's copy (from the Hugging Face cache, or downloaded); (None, None, None) when there
    are none. Every check done: a file whose format or tensors contradict --pretrain or --arch, or that does not fit
    the model, is a CheckpointError naming what it fits. sweep.py calls this once before its cells."""
    tag = models.PRETRAIN[pretrain][0]
    if pretrain == 'none' and path is not None:
        raise CheckpointError(f"--pretrain none means a random backbone, but a weights file was given ({path}): "
                              f"drop --weights, or say what the file holds with --pretrain "
                              f"{'|'.join(p for p in models.PRETRAIN if p != 'none')}")
    if path is None and pretrain == 'mocov3':
        raise CheckpointError(f"--pretrain mocov3 has no hub copy: download {MOCO_URL} (or the linear-probe "
                              f"file) and pass it with --weights")
    if path is None and tag is not None:
        path = hub_weights(arch, tag)
    if path is None:
        return None, None, None
    sd, fmt, leftover = read_checkpoint(path)
    pretrains, why, archs, shape = fits(sd, fmt)
    if archs and arch not in archs:
        raise CheckpointError(f"--arch {arch} does not fit {path} ({fmt}): it holds a ViT of embed dim {shape[0]}, "
                              f"depth {shape[1]}, patch {shape[2]}; pass --arch {' or '.join(archs)}")
    if pretrain not in pretrains:
        raise CheckpointError(f"--pretrain {pretrain} does not fit {path} ({fmt}{why}); pass --pretrain "
                              f"{' or '.join(pretrains)}")
    with torch.device('meta'):  # the shapes alone, no memory and no init
        check_fits(models.create_backbone(arch, pretrain, img_size=img_size), sd, leftover, path, fmt)
    return path, sd, fmt


def load_backbone(arch, pretrain='none', path=None, img_size=224, drop_rate=0.0):
    """models.create_backbone with weights: the file `path` (any format above), else the hub weights of `pretrain`
    (timm's tag in models.PRETRAIN, from the Hugging Face cache or downloaded), checked by `checked`. pretrain='none'
    is a random backbone and takes no file. The model also carries .identity ('tensors:<16 hex>' of the tensors as
    read, 'random' for none), .weights_path and .weights_format."""
    if arch not in models.ARCHS or pretrain not in models.PRETRAIN:
        return models.create_backbone(arch, pretrain)  # its ValueError lists the valid names
    path, sd, fmt = checked(arch, pretrain, path, img_size)
    if path is None:
        model = models.create_backbone(arch, pretrain, img_size=img_size, drop_rate=drop_rate)
        model.weights_path = model.weights_format = None
        return model
    model = models.create_backbone(arch, pretrain, sd, img_size=img_size, drop_rate=drop_rate)
    model.identity, model.weights_path, model.weights_format = f'tensors:{tensor_digest(sd)}', path, fmt
    return model
