"""Tests of the hand-written ViT (models.py): equality with timm, dropout positions, the block's pieces."""
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer as TimmViT
from timm.models.vision_transformer import checkpoint_filter_fn

import models

MICRO = models.ARCHS['vit_micro_patch8']   # patch 8, dim 64, depth 4, 4 heads


def timm_vit(arch_cfg, img_size, num_classes=0, perturb=False, seed=0):
    torch.manual_seed(seed)
    m = TimmViT(img_size=img_size, num_classes=num_classes, **arch_cfg).eval()
    if perturb:  # make every LayerNorm, bias, cls token and position embedding matter
        with torch.no_grad():
            for name, p in m.named_parameters():
                if 'norm' in name and name.endswith('weight'):
                    p.copy_(1 + 0.2 * torch.randn_like(p))
                elif name.endswith('bias') or name in ('cls_token', 'pos_embed'):
                    p.copy_(0.1 * torch.randn_like(p))
    return m


def max_diff(a, b):
    return (a - b).abs().max().item()


# -----------------------------------------------------------------------------
# equality with timm

@pytest.mark.parametrize('arch', ['vit_tiny_patch16_224', 'vit_small_patch16_224', 'vit_base_patch16_224'])
@pytest.mark.parametrize('perturb', [False, True])
def test_equals_timm(arch, perturb):
    cfg = models.ARCHS[arch]
    ref = timm_vit(cfg, 224, num_classes=10, perturb=perturb)
    ours = models.VisionTransformer(img_size=224, **cfg).eval()
    sd = {k: v for k, v in ref.state_dict().items() if not k.startswith('head.')}
    ours.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert max_diff(ours.forward_features(x), ref.forward_features(x)) <= 1e-5
        # linear readout on the cls token after the final norm == timm's head
        tokens = ours.embed(x)
        for blk in ours.blocks:
            tokens = blk(tokens)
        logits = torch.nn.functional.linear(models.pool(ours, tokens, 'cls'), ref.head.weight, ref.head.bias)
        assert max_diff(logits, ref(x)) <= 1e-5


@pytest.mark.parametrize('img_size', [160, 96])
def test_resampled_pos_embed_equals_timm(img_size):
    """A 224-px checkpoint loaded at another size: timm's load-time bicubic+antialias resample."""
    cfg = models.ARCHS['vit_tiny_patch16_224']
    src = timm_vit(cfg, 224, perturb=True)
    ref = TimmViT(img_size=img_size, num_classes=0, **cfg).eval()
    ref.load_state_dict(checkpoint_filter_fn(src.state_dict(), ref), strict=True)
    ours = models.VisionTransformer(img_size=img_size, **cfg).eval()
    sd = src.state_dict()
    sd['pos_embed'] = models.resample_pos_embed(sd['pos_embed'], ours.grid)
    ours.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():
        assert max_diff(ours.forward_features(x), ref.forward_features(x)) <= 1e-5
    # and an input of a size other than the model's is resampled on the fly, like timm's dynamic_img_size
    dyn = TimmViT(img_size=224, num_classes=0, dynamic_img_size=True, **cfg).eval()
    dyn.load_state_dict(src.state_dict())
    ours224 = models.VisionTransformer(img_size=224, **cfg).eval()
    ours224.load_state_dict(src.state_dict())
    with torch.no_grad():
        assert max_diff(ours224.forward_features(x), dyn.forward_features(x)) <= 1e-5


def test_dropout_positions():
    """drop_rate puts dropout after the pos-embed and in the MLP, nowhere else (SA²VP's backbone)."""
    m = models.VisionTransformer(img_size=32, drop_rate=0.1, **MICRO)
    drops = sorted(n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Dropout) and mod.p == 0.1)
    assert drops == sorted(['pos_drop'] + [f'blocks.{i}.mlp.drop{j}' for i in range(4) for j in (1, 2)])
    m.train()
    x = torch.randn(2, 3, 32, 32)
    assert max_diff(m(x), m(x)) > 0
    m.eval()
    assert max_diff(m(x), m(x)) == 0


def test_block_pieces_compose():
    """A block computed piece by piece (norm1, qkv, attention, proj, norm2, mlp) equals the block."""
    m = models.VisionTransformer(img_size=32, **MICRO).eval()
    x = torch.randn(2, 17, 64)
    blk = m.blocks[0]
    q, k, v = blk.attn.split_qkv(blk.norm1(x))
    att = torch.softmax(q @ k.transpose(-1, -2) / (16 ** 0.5), dim=-1) @ v        # naive attention
    y = x + blk.attn.proj(att.transpose(1, 2).reshape(2, 17, 64))
    y = y + blk.mlp.fc2(torch.nn.functional.gelu(blk.mlp.fc1(blk.norm2(y))))
    assert max_diff(y, blk(x)) < 1e-5
