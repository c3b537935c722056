"""
A hand-written Vision Transformer with timm's parameter names, the readout `pool`, and the tables of
architectures and pre-trainings.

References:
1) timm `models/vision_transformer.py` (VisionTransformer, Block, Attention): the names and the
   numerics we match. On the same weights our forward_features equals timm's bit for bit.
2) karpathy/nanoGPT `model.py`: one readable module, shape comments.

Reading weights files (timm, Google's .npz, MAE, MoCo v3) and the Hugging Face hub live in weights.py;
`create_backbone` here takes a state dict in timm's names and loads it strictly.
"""

import math

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
    """Multi-head self-attention with a fused qkv projection, as timm's Attention. A method may change the logits
    through forward's `bias` and `scale` (see attend); `record` (a list, set by maps.py) keeps the attention
    probabilities of every call, computed in the same forward from which the output is made."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.record = None

    def split_qkv(self, x):
        """(B, N, D) normalised tokens -> q, k, v, each (B, H, N, D/H)."""
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)

    def merge_heads(self, x):
        """(B, H, N, D/H) -> (B, N, D); the output projection is applied separately."""
        B, H, N, d = x.shape
        return x.transpose(1, 2).reshape(B, N, H * d)

    def attend(self, q, k, v, bias=None, scale=None):
        """softmax(scale * q k^T / sqrt(d) + bias) v: (B, H, Nq, d) queries, (B, H, Nk, d) keys and values. bias: a
        float tensor added to the logits, or a boolean mask (True = attend), broadcast to (B, H, Nq, Nk); scale: a
        number or a tensor broadcast to q, e.g. a learnable temperature per head (H, 1, 1). Both may be learnable."""
        if scale is not None:
            q = q * scale
        if bias is not None and bias.ndim == 1:  # a bias per key: (Nk,) -> (1, Nk), as attention masks need 2 dims
            bias = bias[None]
        if self.record is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)               # (B, H, Nq, d)
        logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])                       # (B, H, Nq, Nk)
        if bias is not None:
            logits = logits.masked_fill(~bias, float('-inf')) if bias.dtype == torch.bool else logits + bias
        self.record.append(logits.softmax(-1))
        return self.record[-1] @ v

    def forward(self, x, bias=None, scale=None):
        q, k, v = self.split_qkv(x)
        return self.proj(self.merge_heads(self.attend(q, k, v, bias, scale)))


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

    def forward(self, x, bias=None, scale=None):
        x = x + self.attn(self.norm1(x), bias, scale)   # bias, scale: a method's change of the logits (attend)
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
        # set by create_backbone and weights.load_backbone: what the weights are and how to read them out
        self.arch, self.pretrain, self.identity, self.readout = None, 'none', 'random', 'cls'
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
# architectures, pre-training tags and their defaults

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


def create_backbone(arch, pretrain='none', weights=None, img_size=224, drop_rate=0.0):
    """A ViT of `arch` (see ARCHS) for the pre-training `pretrain` (see PRETRAIN), with `weights` (a state dict in
    timm's names, as weights.read_checkpoint returns it; None = random init) loaded strictly: pos_embed is resampled
    to img_size, and a missing, unexpected or mis-shaped key is torch's error. weights.load_backbone reads a file or
    the hub and explains a mismatch; this builds the model. The result carries .arch, .pretrain, .readout, .mean,
    .std (the pre-training's readout and normalisation) and .identity ('random' until weights.py sets it)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose from {', '.join(ARCHS)}")
    if pretrain not in PRETRAIN:
        raise ValueError(f"unknown pretrain {pretrain!r}; choose from {', '.join(PRETRAIN)}")
    cfg = dict(ARCHS[arch])
    if pretrain == 'mocov3' and arch == 'vit_small_patch16_224':
        cfg['num_heads'] = 12  # MoCo v3's own ViT-S has 12 heads of 32; timm's has 6 of 64 (same shapes!)
    model = VisionTransformer(img_size=img_size, drop_rate=drop_rate, **cfg)
    if weights is not None:
        sd = dict(weights)
        if sd.get('pos_embed') is not None and sd['pos_embed'].shape != model.pos_embed.shape:
            sd['pos_embed'] = resample_pos_embed(sd['pos_embed'], model.grid)
        model.load_state_dict(sd, strict=True)
    _, (model.mean, model.std), model.readout = PRETRAIN[pretrain]
    model.arch, model.pretrain = arch, pretrain
    return model
