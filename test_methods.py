"""Tests of methods.py against independent references written here: naive loops over blocks, a
per-query window attention, step-by-step recurrences, the tuned-parameter counts of the papers and
official code counted component by component, scikit-learn's KMeans and simple sampling statistics."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import methods
import models

D_B, C_B = 768, 200      # ViT-B/16 width, CUB classes (the parameter-count tests)


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    """Tiny tensors: one thread is several times faster than two on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def vit(img=32, patch=8, dim=32, depth=4, heads=2, drop_rate=0.0, seed=0):
    """A tiny random ViT whose LayerNorms, biases, cls token and attention all matter."""
    torch.manual_seed(seed)
    bb = models.VisionTransformer(img_size=img, patch_size=patch, embed_dim=dim, depth=depth,
                                  num_heads=heads, drop_rate=drop_rate)
    with torch.no_grad():
        for m in bb.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0, m.in_features ** -0.5)
        for n, p in bb.named_parameters():
            if 'norm' in n and n.endswith('weight'):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif n.endswith('bias') or n in ('cls_token', 'pos_embed'):
                p.copy_(0.3 * torch.randn_like(p))
    return bb.eval()


def images(bb, B=3, seed=1):
    return torch.randn(B, 3, bb.img_size, bb.img_size, generator=torch.Generator().manual_seed(seed))


def close(a, b, tol=1e-5):
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= tol, (a - b).abs().max().item()


def embed_ref(bb, x):
    """[cls, patches] + pos_embed, written out (no methods code)."""
    patches = bb.patch_embed(x)
    return torch.cat([bb.cls_token.expand(x.shape[0], -1, -1), patches], 1) + bb.pos_embed


def pool_ref(bb, t, readout):
    if readout == 'cls':
        return bb.norm(t)[:, 0]
    m = t[:, 1:].mean(1)
    return bb.norm(m) if readout == 'mean' else F.layer_norm(m, m.shape[-1:], eps=1e-6)


def ce_ref(logits, y):
    return -F.log_softmax(logits, 1)[torch.arange(len(y)), y].mean()


def set_mode(model, mode):
    return model.train() if mode == 'train' else model.eval()


# a (method, options, depth of the tiny ViT) per method / variant: used by several tests
VARIANTS = [
    ('linear', {}, 4), ('full', {}, 4),
    ('vpt', dict(prompts=3), 4), ('vpt', dict(prompts=3, depth='shallow'), 4),
    ('spt', dict(prompts=3), 4), ('spt', dict(prompts=3, depth='shallow'), 4),
    ('lspt', dict(prompts=3), 4), ('lspt', dict(prompts=3, lspt_lpc='gru'), 4),
    ('lspt', dict(prompts=3, lspt_gspc='kmeans'), 4),
    ('sa2vp', {}, 12),   # depth >= 9: the deep prompt maps at layers 4 and 8 exist
]
VARIANTS += [(m, {}, 4) for m in methods.METHODS if m not in {v[0] for v in VARIANTS}]   # a new method: its defaults
VID = [f"{m}-{'-'.join(map(str, o.values())) or 'default'}" for m, o, _ in VARIANTS]


def build(method, options, depth, num_classes=5, **vit_kw):
    torch.manual_seed(2)
    return methods.build_model(method, vit(depth=depth, **vit_kw), num_classes, **options)


# -----------------------------------------------------------------------------
# tuned-parameter counts, ViT-B/16, C = 200, from each method's structure (SPT's Remark I: 12*20*768 =
# 0.18M prompts; SA²VP at t=16: 372,912 + head, the n_parameters tommy-xq/SA2VP vit_train_sa2vp.py prints)

@pytest.fixture(scope='module')
def vitb():
    return models.VisionTransformer(img_size=224)


def tuned(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def sa2vp_count(t, C):
    """SA²VP's tuned tensors (tommy-xq/SA2VP Dual_model) component by component."""
    D, N1 = D_B, 197
    prompt_map = N1 * t + (D * t + D)
    adapters = 12 * (2 * D + (D * t + t) + (t * D + D))
    deep = 2 * (N1 * t + (D * t + D) + D)
    return prompt_map + adapters + deep + (D + 1) * C


@pytest.mark.parametrize('method, options, formula, expected', [
    ('linear', {}, (D_B + 1) * C_B, 153_800),
    ('vpt', dict(prompts=10), 12 * 10 * D_B + (D_B + 1) * C_B, 245_960),
    ('vpt', dict(prompts=50), 12 * 50 * D_B + (D_B + 1) * C_B, 614_600),
    ('vpt', dict(prompts=100, depth='shallow'), 100 * D_B + (D_B + 1) * C_B, 230_600),
    ('spt', {}, 12 * 20 * D_B + (D_B + 1) * C_B, 338_120),                       # deep, P = 20 default
    ('spt', dict(depth='shallow'), 100 * D_B + (D_B + 1) * C_B, 230_600),       # shallow, P = 100 default
    ('lspt', dict(prompts=100), 12 * 100 * D_B + 4 * (2 * D_B * D_B + 2 * D_B) + (D_B + 1) * C_B,
     921_600 + 4_724_736 + 153_800),
    ('lspt', dict(prompts=100, lspt_lpc='gru'), 12 * 100 * D_B + 3 * (2 * D_B * D_B + 2 * D_B) + (D_B + 1) * C_B,
     921_600 + 3_543_552 + 153_800),
    ('sa2vp', dict(sa2vp_dim=16), 21_339 * 16 + 31_488 + (D_B + 1) * C_B, 526_712),
    ('full', {}, 85_798_656 + (D_B + 1) * C_B, 85_952_456),
])
def test_tuned_parameter_count_vit_b(vitb, method, options, formula, expected):
    assert formula == expected
    model = methods.build_model(method, vitb, C_B, **options)
    assert tuned(model) == expected
    if method == 'full':
        assert tuned(model) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize('t', [8, 32, 64])
def test_sa2vp_count_formula(vitb, t):
    model = methods.build_model('sa2vp', vitb, C_B, sa2vp_dim=t)
    assert tuned(model) == 21_339 * t + 31_488 + 769 * C_B == sa2vp_count(t, C_B)


def test_vit_b_prompt_bound(vitb):
    assert methods.prompt_init_bound(vitb) == 0.0625


# -----------------------------------------------------------------------------
# freezing, gradients, optimizer steps, train/eval modes

@pytest.mark.parametrize('method, options, depth', VARIANTS, ids=VID)
def test_gradients_reach_exactly_the_tuned_parameters(method, options, depth):
    model = build(method, options, depth).train()
    x, y = images(model.backbone), torch.tensor([0, 1, 2])
    model.loss(x, y).backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
            if n in ('prompts', 'deep_ppt', 'deep_scale'):   # every prompt set is used
                assert all(g.abs().sum() > 0 for g in p.grad), n
        else:
            assert p.grad is None, n
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    if method == 'full':
        assert frozen == []
    else:
        assert sorted(frozen) == sorted('backbone.' + n for n, _ in model.backbone.named_parameters())


def step_with_checkpointing(model, x, y, enable):
    """One training loss + backward in train mode, seeded (every dropout is live: VPT/LSPT prompt dropout,
    SA²VP's 0.1 in the backbone and adapters). Returns (loss, {tuned name: grad}, block calls, next
    random number): block calls count norm1 forwards, which checkpointing runs twice (forward, recompute)."""
    model.set_grad_checkpointing(enable).train()
    model.zero_grad(set_to_none=True)
    calls = [0]
    hooks = [b.norm1.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
             for b in model.backbone.blocks]
    torch.manual_seed(7)
    loss = model.loss(x, y)
    loss.backward()
    for h in hooks:
        h.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, calls[0], torch.rand(1).item()


@pytest.mark.parametrize('method, options, depth', VARIANTS, ids=VID)
def test_grad_checkpointing_keeps_loss_gradients_and_rng(method, options, depth):
    model = build(method, options, depth).double()
    x, y = images(model.backbone).double(), torch.tensor([0, 1, 2])
    loss0, g0, calls0, rand0 = step_with_checkpointing(model, x, y, False)
    loss1, g1, calls1, rand1 = step_with_checkpointing(model, x, y, True)
    # checkpointing really ran: every block executed twice when anything before it is tuned (linear: under no_grad)
    assert calls1 == (calls0 if method == 'linear' else 2 * calls0)
    close(loss1, loss0, 1e-6)
    assert g1.keys() == g0.keys()
    for n in g0:   # the same dropout masks in the recomputation, every prompt set inserted
        close(g1[n], g0[n], 1e-6)
    assert rand1 == rand0   # the global RNG ends where it would without checkpointing (exact resume)
    with torch.no_grad():   # evaluation never checkpoints
        model.eval()
        close(model(x), model.set_grad_checkpointing(False)(x), 0)


@pytest.mark.parametrize('opt', ['sgd', 'adamw'])
@pytest.mark.parametrize('method, options, depth', [v for v in VARIANTS if v[0] != 'full'],
                         ids=[i for i in VID if not i.startswith('full')])
def test_optimizer_step_leaves_backbone_bit_identical(method, options, depth, opt):
    model = build(method, options, depth).train()
    before_bb = copy.deepcopy(model.backbone.state_dict())
    before_tuned = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    o = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3) if opt == 'sgd'
         else torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05))
    o.zero_grad()
    model.loss(images(model.backbone), torch.tensor([0, 1, 2])).backward()
    o.step()
    after = model.backbone.state_dict()
    assert after.keys() == before_bb.keys()
    for k, v in before_bb.items():
        assert torch.equal(after[k], v), k
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before_tuned[n]), n   # while every tuned tensor moved


@pytest.mark.parametrize('method, options, depth', VARIANTS, ids=VID)
def test_train_mode_of_backbone(method, options, depth):
    model = build(method, options, depth).train()
    own = [m for n, m in model.named_modules() if not n.startswith('backbone')]
    assert all(m.training for m in own)
    backbone_train = method in ('sa2vp', 'full')
    assert all(m.training == backbone_train for m in model.backbone.modules())
    if method == 'sa2vp':   # official dropout 0.1 live in the frozen backbone
        drops = [m for m in model.backbone.modules() if isinstance(m, nn.Dropout)]
        assert len(drops) == 1 + 2 * len(model.backbone.blocks) and all(m.p == 0.1 for m in drops)
    model.eval()
    assert not any(m.training for m in model.modules())


def test_sa2vp_without_dropout_keeps_backbone_in_eval():
    model = build('sa2vp', dict(sa2vp_dropout=False), 12).train()
    assert not any(m.training for m in model.backbone.modules())
    x = images(model.backbone)
    assert torch.equal(model(x), model(x))


@pytest.mark.parametrize('method, options', [
    ('linear', {}), ('vpt', dict(prompts=3, prompt_dropout=0.0)), ('spt', dict(prompts=3)),
    ('lspt', dict(prompts=3, prompt_dropout=0.0))])
def test_backbone_dropout_never_fires_for_prompt_methods(method, options):
    """A backbone built with dropout 0.5: train-mode outputs are deterministic and equal eval's."""
    model = build(method, options, 4, drop_rate=0.5).train()
    x = images(model.backbone)
    with torch.no_grad():
        a, b = model(x), model(x)
        assert torch.equal(a, b)
        close(a, model.eval()(x), 0)


# -----------------------------------------------------------------------------
# linear / full / VPT / SPT forward against a hand-written loop over the blocks

def vpt_ref(bb, prompts, deep, head, x, readout):
    B, P = x.shape[0], prompts.shape[1]
    t = embed_ref(bb, x)
    t = torch.cat([t[:, :1], prompts[0].expand(B, -1, -1), t[:, 1:]], 1)
    for i, blk in enumerate(bb.blocks):
        if deep and i > 0:
            t = torch.cat([t[:, :1], prompts[i].expand(B, -1, -1), t[:, 1 + P:]], 1)
        t = blk(t)
    return head(pool_ref(bb, t, readout))


@pytest.mark.parametrize('readout', ['cls', 'mean', 'mean-ln'])
@pytest.mark.parametrize('mode', ['eval', 'train'])
@pytest.mark.parametrize('method, depth', [('linear', None), ('full', None), ('vpt', 'deep'), ('vpt', 'shallow'),
                                           ('spt', 'deep'), ('spt', 'shallow')])
def test_forward_equals_loop_reference(method, depth, mode, readout):
    options = dict(readout=readout)
    if method in ('vpt', 'spt'):
        options.update(prompts=4, depth=depth)
    if method == 'vpt':
        options['prompt_dropout'] = 0.0
    model = set_mode(build(method, options, 4), mode)
    x = images(model.backbone)
    if method in ('linear', 'full'):
        ref = vpt_ref(model.backbone, torch.zeros(1, 0, 32), False, model.head, x, readout)
    else:
        assert model.prompts.shape == ((4 if depth == 'deep' else 1), 4, 32)
        ref = vpt_ref(model.backbone, model.prompts, depth == 'deep', model.head, x, readout)
    close(model(x), ref)


@pytest.mark.parametrize('mode', ['eval', 'train'])
def test_vpt_zero_prompts_is_plain_backbone(mode):
    model = set_mode(build('vpt', dict(prompts=0), 4), mode)
    bb, x = model.backbone, images(model.backbone)
    t = bb.embed(x)
    for blk in bb.blocks:
        t = blk(t)
    close(model(x), model.head(models.pool(bb, t)))
    close(model.features(x), bb.forward_features(x)[:, 0])


def test_vpt_init():
    bb = vit(dim=64)
    model = methods.build_model('vpt', bb, 100, prompts=50)
    v = math.sqrt(6 / (3 * 8 ** 2 + 64))
    assert model.prompts.abs().max() <= v and model.prompts.abs().max() > 0.99 * v
    assert abs(model.prompts.mean().item()) < 0.05 * v
    assert torch.allclose(model.head.bias, torch.full((100,), -math.log(99)))
    assert abs(model.head.weight.std().item() / math.sqrt(2 / 100) - 1) < 0.05   # Kaiming fan_out
    spt = methods.build_model('spt', bb, 100)
    assert torch.equal(spt.head.bias, torch.zeros(100)) and abs(spt.head.weight.std().item() / 0.02 - 1) < 0.05


@pytest.mark.parametrize('method, options, per_sample', [
    ('vpt', dict(prompts=10), True), ('vpt', dict(prompts=10, depth='shallow'), False),
    ('lspt', dict(prompts=10), True), ('spt', dict(prompts=10), False)])
def test_prompt_dropout_is_per_sample(method, options, per_sample):
    """Defaults: deep VPT and LSPT drop prompts (0.1) with a mask per sample; shallow VPT and SPT do not."""
    model = build(method, options, 4).train()
    x = images(model.backbone, B=1).expand(2, -1, -1, -1)
    with torch.no_grad():
        out = model(x)
        assert torch.equal(out[0], out[1]) != per_sample
        out = model.eval()(x)
        assert torch.equal(out[0], out[1])


# -----------------------------------------------------------------------------
# SA²VP

def allowed_keys(grid, c):
    """Per query row the key indices it may attend to: row 0 all tokens; patch (r, s) the patches
    within |dr|, |ds| <= c // 2, clipped at the borders, never token 0."""
    h, w = grid
    keys = [list(range(1 + h * w))]
    for n in range(h * w):
        r, s = divmod(n, w)
        keys.append([1 + rr * w + ss for rr in range(max(0, r - c // 2), min(h, r + c // 2 + 1))
                     for ss in range(max(0, s - c // 2), min(w, s + c // 2 + 1))])
    return keys


def loop_attention(q, k, v, keys):
    """q, k, v (B, H, T, d): softmax over the allowed keys of each query only."""
    out = torch.zeros_like(q)
    for i, ks in enumerate(keys):
        s = q[:, :, i:i + 1] @ k[:, :, ks].transpose(-1, -2) / math.sqrt(q.shape[-1])
        out[:, :, i] = (torch.softmax(s, -1) @ v[:, :, ks])[:, :, 0]
    return out


@pytest.mark.parametrize('grid', [(4, 4), (14, 14), (3, 5)])
@pytest.mark.parametrize('c', [1, 3, 5])
def test_window_attention_equals_per_query_loop(grid, c):
    T = 1 + grid[0] * grid[1]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, T, 8, generator=g, dtype=torch.float64) for _ in range(3))
    mask = methods.window_mask(grid, c)
    assert mask.shape == (T, T) and mask.dtype == torch.bool
    if c == 3 and grid == (14, 14):
        assert sorted(set(mask[1:].sum(1).tolist())) == [4, 6, 9]   # corners, edges, interior
    ref = loop_attention(q, k, v, allowed_keys(grid, c))
    close(F.scaled_dot_product_attention(q, k, v, attn_mask=mask), ref, 1e-12)


def cross_ref(model, l, kv, q, keys):
    """Cross block l (SA²VP's Cross_Block: CrossAttention + Mlp_small): block l's norm1 and qkv/proj weights, loop
    window attention, residual on the raw query tokens, then the adapter (LN -> fc1 -> GELU -> fc2), no residual."""
    blk = model.backbone.blocks[l]
    B, T, D = q.shape
    H = blk.attn.num_heads
    (wq, wk, wv), (bq, bk, bv) = blk.attn.qkv.weight.chunk(3), blk.attn.qkv.bias.chunk(3)
    heads = lambda t: t.reshape(B, T, H, D // H).transpose(1, 2)  # noqa: E731
    qn, kvn = blk.norm1(q), blk.norm1(kv)
    o = loop_attention(heads(F.linear(qn, wq, bq)), heads(F.linear(kvn, wk, bk)), heads(F.linear(kvn, wv, bv)), keys)
    y = q + F.linear(o.transpose(1, 2).reshape(B, T, D), blk.attn.proj.weight, blk.attn.proj.bias)
    ad = model.adapters[l]
    z = F.layer_norm(y, (D,), ad.norm.weight, ad.norm.bias, eps=1e-6)
    return F.linear(F.gelu(F.linear(z, ad.fc1.weight, ad.fc1.bias)), ad.fc2.weight, ad.fc2.bias)


def sa2vp_ref(model, x, gamma, window):
    """tommy-xq/SA2VP vit_tinypara.py Encoder.forward, literally: per layer the cross block, then the
    blocks of each pathway, the deep map at layers 4 and 8, and gamma times the cross output."""
    bb = model.backbone
    B, keys = x.shape[0], allowed_keys(bb.grid, window)
    h = embed_ref(bb, x)
    p = F.linear(model.ppt, model.ppt_proj.weight, model.ppt_proj.bias).expand(B, -1, -1) + bb.pos_embed
    for l, blk in enumerate(bb.blocks):
        if l in (0, 4, 8):
            f = cross_ref(model, l, kv=h, q=p, keys=keys)
            p2 = blk(p)
            if l in (4, 8):
                k = l // 4 - 1
                dk = F.linear(model.deep_ppt[k], model.deep_proj[k].weight, model.deep_proj[k].bias)
                p2 = p2 + model.deep_scale[k] * blk(dk.expand(B, -1, -1))
            h = blk(h)
            p = p2 + gamma * f
        else:
            f = cross_ref(model, l, kv=p, q=h, keys=keys)
            p = blk(p)
            h = blk(h) + gamma * f
    return model.head(bb.norm(h)[:, 0]), model.head(bb.norm(p)[:, 0])


def sa2vp_model(**options):
    torch.manual_seed(3)
    model = methods.build_model('sa2vp', vit(img=48, depth=12), 7, **options).eval()
    with torch.no_grad():   # make every tuned tensor matter (e_k starts near 0)
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize('window, gamma', [(3, 0.7), (1, 1.5), (5, 0.1)])
def test_sa2vp_equals_naive_reference(window, gamma):
    model = sa2vp_model(sa2vp_window=window, sa2vp_gamma=gamma, sa2vp_dim=4)
    x = images(model.backbone)
    with torch.no_grad():
        base, prompt = model.forward_both(x)
        rb, rp = sa2vp_ref(model, x, gamma, window)
    close(base, rb)
    close(prompt, rp)
    assert torch.equal(model(x), base)
    assert (base - prompt).abs().max() > 1e-2


def test_sa2vp_gamma_zero_base_is_plain_backbone():
    model = sa2vp_model(sa2vp_gamma=0.0)
    bb, x = model.backbone, images(model.backbone)
    t = embed_ref(bb, x)
    for blk in bb.blocks:
        t = blk(t)
    with torch.no_grad():
        close(model(x), model.head(bb.norm(t)[:, 0]))


def test_sa2vp_eval_deterministic_train_stochastic():
    model = sa2vp_model()
    x = images(model.backbone)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        assert not torch.equal(model(x), model(x))


@pytest.mark.parametrize('lam', [None, 0.5])
def test_sa2vp_loss(lam):
    model = sa2vp_model(sa2vp_lambda=lam)
    x, y = images(model.backbone), torch.tensor([1, 0, 6])
    with torch.no_grad():
        base, prompt = model.forward_both(x)
        lam = 0.8 if lam is None else lam
        close(model.loss(x, y), lam * ce_ref(base, y) + (1 - lam) * ce_ref(prompt, y))


@pytest.mark.parametrize('method, options', [('linear', {}), ('vpt', dict(prompts=3)), ('lspt', dict(prompts=3))])
def test_other_losses_are_cross_entropy(method, options):
    model = build(method, options, 4).eval()
    x, y = images(model.backbone), torch.tensor([4, 0, 2])
    with torch.no_grad():
        close(model.loss(x, y), ce_ref(model(x), y))


def test_sa2vp_settings_table():
    """tommy-xq/SA2VP README.md step 5: FGVC per dataset; VTAB per group with its exceptions."""
    natural = ['cifar', 'caltech101', 'dtd', 'oxford_flowers102', 'oxford_iiit_pet', 'svhn', 'sun397']
    specialized = ['patch_camelyon', 'eurosat', 'resisc45', 'diabetic_retinopathy']
    structured = ['clevr_count', 'clevr_dist', 'dmlab', 'kitti', 'dsprites_loc', 'dsprites_ori',
                  'smallnorb_azi', 'smallnorb_ele']
    want = {'cub': (16, 0.1), 'nabirds': (32, 0.1), 'flowers': (8, 0.1), 'dogs': (32, 0.1), 'cars': (64, 1.5)}
    want.update({f'vtab-{n}': (8, 0.1) for n in natural})
    want.update({f'vtab-{n}': (16, 1.5) for n in specialized})
    want.update({f'vtab-{n}': (32, 1.5) for n in structured})
    want.update({'vtab-svhn': (16, 0.5), 'vtab-resisc45': (16, 0.5), 'vtab-dsprites_ori': (16, 0.1),
                 'vtab-smallnorb_ele': (32, 0.5)})
    assert len(want) == 24
    assert {k: methods.SA2VP_SETTINGS[k] for k in want} == want   # incl. cub, cars, svhn, kitti, dtd, ...


# -----------------------------------------------------------------------------
# LSPT

def centroids_ref(pts, k, steps=11):
    """Per image: init at k evenly spaced patches, then Lloyd steps; an empty cluster keeps its centroid."""
    N = pts.shape[0]
    c = pts[[round(j * (N - 1) / (k - 1)) for j in range(k)] if k > 1 else [0]].clone()
    for _ in range(steps):
        a = ((pts[:, None] - c[None]) ** 2).sum(-1).argmin(1)
        c = torch.stack([pts[a == j].mean(0) if (a == j).any() else c[j] for j in range(k)])
    return c


def lspt_ref(model, x, lpc, gspc, readout, drop=0.0, seed=None):
    """The reading in methods.LSPT's docstring step by step, with torch's own LSTMCell / GRUCell holding
    the model's weights."""
    bb, P, L = model.backbone, model.prompts.shape[1], len(model.backbone.blocks)
    B, D = x.shape[0], bb.embed_dim
    prompt = lambda l: F.dropout(model.prompts[l].expand(B, -1, -1), drop, training=drop > 0)  # noqa: E731
    cell = {'lstm': nn.LSTMCell, 'gru': nn.GRUCell}[lpc](D, D) if lpc != 'none' else None
    if cell is not None:
        cell.load_state_dict(model.cell.state_dict())
    if seed is not None:   # the dropout masks drawn after the cell's own init
        torch.manual_seed(seed)
    t = embed_ref(bb, x)
    c, X = t[:, :1], t[:, 1:]
    xp, C = prompt(0), torch.zeros(B * P, D)
    for l, blk in enumerate(bb.blocks):
        y = blk(torch.cat([c, xp, X], 1))
        c, xph, X = y[:, :1], y[:, 1:1 + P], y[:, 1 + P:]
        if l == L - 1:
            xp = xph
            break
        if gspc == 'mean':
            H = xph + X.mean(1, keepdim=True)
        elif gspc == 'kmeans':
            H = xph + torch.stack([centroids_ref(X[b], P) for b in range(B)])
        else:
            H = xph
        inp = prompt(l + 1)
        if lpc == 'lstm':
            h, C = cell(inp.reshape(B * P, D), (H.reshape(B * P, D), C))
        elif lpc == 'gru':
            h = cell(inp.reshape(B * P, D), H.reshape(B * P, D))
        else:
            h = inp + (H - xph)
        xp = h.reshape(B, P, D)
    return model.head(pool_ref(bb, torch.cat([c, xp, X], 1), readout))


@pytest.mark.parametrize('mode', ['eval', 'train'])
@pytest.mark.parametrize('readout', ['cls', 'mean'])
@pytest.mark.parametrize('lpc, gspc', [('lstm', 'mean'), ('gru', 'mean'), ('lstm', 'none'), ('none', 'mean'),
                                       ('lstm', 'kmeans'), ('none', 'none')])
def test_lspt_equals_recurrence(lpc, gspc, readout, mode):
    model = set_mode(build('lspt', dict(prompts=4, lspt_lpc=lpc, lspt_gspc=gspc, prompt_dropout=0.0,
                                        readout=readout), 4, img=48), mode)
    x = images(model.backbone)
    with torch.no_grad():
        close(model(x), lspt_ref(model, x, lpc, gspc, readout))


@pytest.mark.parametrize('lpc', ['lstm', 'gru'])
def test_lspt_per_sample_prompt_dropout_path(lpc):
    """Train mode with dropout: the per-sample input path; masks drawn in the same (layer) order."""
    model = build('lspt', dict(prompts=3, lspt_lpc=lpc, prompt_dropout=0.3), 4).train()
    x = images(model.backbone)
    with torch.no_grad():
        torch.manual_seed(11)
        out = model(x)
        close(out, lspt_ref(model, x, lpc, 'mean', 'cls', drop=0.3, seed=11))


@pytest.mark.parametrize('mode', ['eval', 'train'])
@pytest.mark.parametrize('readout', ['cls', 'mean'])
def test_lspt_without_gspc_and_lpc_is_vpt_deep(mode, readout):
    bb = vit()
    lspt = methods.build_model('lspt', bb, 5, prompts=3, lspt_gspc='none', lspt_lpc='none', prompt_dropout=0.0,
                               readout=readout)
    vpt = methods.build_model('vpt', bb, 5, prompts=3, depth='deep', prompt_dropout=0.0, readout=readout)
    with torch.no_grad():
        vpt.prompts.copy_(lspt.prompts)
        vpt.head.load_state_dict(lspt.head.state_dict())
        x = images(bb)
        close(set_mode(lspt, mode)(x), set_mode(vpt, mode)(x))


def test_patch_centroids_finds_separated_clusters():
    B, k, n, D = 2, 4, 3, 5
    g = torch.Generator().manual_seed(0)
    centres = 10 * torch.randn(B, k, D, generator=g)
    pts = (centres[:, :, None] + 0.1 * torch.randn(B, k, n, D, generator=g)).reshape(B, k * n, D)
    pts.requires_grad_(True)   # contiguous blocks of n: evenly spaced init hits each cluster once
    c = methods.patch_centroids(pts, k)
    assert c.shape == (B, k, D)
    close(c, pts.detach().reshape(B, k, n, D).mean(2))
    c.sum().backward()   # the last step is differentiable: d(mean)/d(point) = 1/n
    close(pts.grad, torch.full_like(pts, 1 / n), 1e-6)
    dup = torch.tensor([[[1., 1.], [1., 1.], [5., 5.]]])   # init at all 3 points; cluster 1 ends up empty
    close(methods.patch_centroids(dup, 3), dup, 0)            # and keeps its previous centroid
    model = build('lspt', dict(prompts=4, lspt_gspc='kmeans'), 4)
    assert model(images(model.backbone)).shape == (3, 5)
    with pytest.raises(ValueError):
        build('lspt', dict(prompts=17, lspt_gspc='kmeans'), 4)   # 16 patches


# -----------------------------------------------------------------------------
# SPT prompt initialisation

def spt_layers(bb, x, deep):
    """Tokens entering each prompted block of the prompt-free backbone, cls excluded; layer 0 = the
    patch embedding without position embedding. A list of (B, N, D)."""
    out = [bb.patch_embed(x)]
    if deep:
        t = torch.cat([bb.cls_token.expand(x.shape[0], -1, -1), out[0]], 1) + bb.pos_embed
        for blk in bb.blocks[:-1]:
            t = blk(t)
            out.append(t[:, 1:])
    return out


def windows_ref(tok, P, how):
    """SPT's windows for one image (N, D): [p w, (p+1) w) for p < P-1, w = N // (P-1); the last the
    last N mod w tokens, or all N when that is 0 (or when P = 1)."""
    N = tok.shape[0]
    red = (lambda a: a.mean(0)) if how == 'mean' else (lambda a: a.max(0).values)
    if P == 1:
        return [red(tok)]
    w = N // (P - 1)
    return [red(tok[p * w:(p + 1) * w]) for p in range(P - 1)] + [red(tok[N - N % w:] if N % w else tok)]


def matches(prompts, candidates, tol=1e-5):
    """Index of the candidate row each prompt row equals (asserting there is one)."""
    d = torch.cdist(prompts.double(), candidates.double())
    assert (d.min(1).values <= tol).all(), d.min(1).values
    return d.argmin(1).tolist()


def clustered_images(n, k=5, seed=7):
    """48 x 48 images whose 8 x 8 patches are each one of k patterns plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    pat = torch.randn(k, 3, 8, 8, generator=g)[torch.randint(k, (n, 36), generator=g)]   # (n, 36, 3, 8, 8)
    x = pat.reshape(n, 6, 6, 3, 8, 8).permute(0, 3, 1, 4, 2, 5).reshape(n, 3, 48, 48)
    return x + 0.05 * torch.randn(x.shape, generator=g)


def spt_setup(P, depth, init, n_images=6, batch=4, x=None, **opt):
    bb = vit(img=48)   # 6 x 6 = 36 patches
    model = methods.build_model('spt', bb, 5, prompts=P, depth=depth, spt_init=init, **opt)
    x = images(bb, B=n_images, seed=5) if x is None else x
    loader = [(x[i:i + batch], torch.zeros(len(x[i:i + batch]))) for i in range(0, n_images, batch)]
    return model, x, loader


@pytest.mark.parametrize('depth', ['deep', 'shallow'])
def test_spt_random_init_draws_layer_tokens(depth):
    model, x, loader = spt_setup(5, depth, 'random')
    model.train().init_prompts(loader)
    assert model.training and model.prompts.shape == (4 if depth == 'deep' else 1, 5, 32)
    with torch.no_grad():
        layers = spt_layers(model.backbone, x, depth == 'deep')
    for i, tok in enumerate(layers):
        assert len(set(matches(model.prompts[i], tok.flatten(0, 1)))) == 5   # distinct tokens


@pytest.mark.parametrize('how, P, depth', [('mean', 6, 'deep'), ('mean', 7, 'deep'), ('max', 6, 'deep'),
                                           ('max', 7, 'deep'), ('mean', 6, 'shallow'), ('max', 7, 'shallow'),
                                           ('mean', 1, 'deep'), ('max', 1, 'deep')])
def test_spt_pooled_init_draws_pooled_windows(how, P, depth):
    """N = 36: P = 6 gives w = 7 and a last window of 1 token; P = 7 gives w = 6 and N mod w = 0."""
    model, x, loader = spt_setup(P, depth, how)
    model.init_prompts(loader)
    with torch.no_grad():
        layers = spt_layers(model.backbone, x, depth == 'deep')
    assert model.prompts.shape[0] == len(layers)
    for i, tok in enumerate(layers):
        cand = torch.stack([w for img in tok for w in windows_ref(img, P, how)])
        assert len(set(matches(model.prompts[i], cand))) == P


def inertia(x, c):
    return torch.cdist(x.double(), c.double()).pow(2).min(1).values.sum().item()


@pytest.mark.parametrize('data', ['blobs', 'noise'])
def test_kmeans_matches_sklearn(data):
    from sklearn.cluster import KMeans
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 16, generator=g)
    if data == 'blobs':
        x = x + 6 * torch.randn(8, 16, generator=g)[torch.randint(8, (2000,), generator=g)]
    c, ours = methods.kmeans(x, 8)
    assert c.shape == (8, 16)
    assert abs(ours - inertia(x, c)) <= 1e-4 * ours
    ref = KMeans(n_clusters=8, n_init=3, random_state=0).fit(x.double().numpy()).inertia_
    assert inertia(x, c) <= 1.01 * ref


def test_spt_kmeans_prompts_are_centroids_of_layer_tokens():
    """Tokens of images made of 5 patch patterns (6 x 36 per layer <= spt_kmeans_tokens: all kept)."""
    from sklearn.cluster import KMeans
    model, x, loader = spt_setup(5, 'deep', 'kmeans', x=clustered_images(6))
    model.init_prompts(loader)
    with torch.no_grad():
        layers = spt_layers(model.backbone, x, True)
    for i, tok in enumerate(layers):
        pts, c = tok.flatten(0, 1), model.prompts[i].detach()
        ref = KMeans(n_clusters=5, n_init=3, random_state=0).fit(pts.double().numpy()).inertia_
        assert inertia(pts, c) <= 1.01 * ref
        a = torch.cdist(pts, c).argmin(1)   # a Lloyd fixed point: each prompt is the mean of its tokens
        close(c, torch.stack([pts[a == j].mean(0) for j in range(5)]), 1e-4)


def test_spt_kmeans_memory_is_bounded(monkeypatch):
    sizes, add = {}, methods.Reservoir.add

    def recording_add(self, rows, g):
        add(self, rows, g)
        sizes.setdefault(id(self), []).append(self.rows.shape[0])

    monkeypatch.setattr(methods.Reservoir, 'add', recording_add)
    model, x, loader = spt_setup(5, 'deep', 'kmeans', n_images=80, batch=4, spt_kmeans_tokens=50)
    model.init_prompts(loader)   # 80 x 36 = 2880 tokens per layer
    assert len(sizes) == 4 and all(len(s) == 20 for s in sizes.values())
    assert max(max(s) for s in sizes.values()) == 50 and all(s[-1] == 50 for s in sizes.values())
    assert torch.isfinite(model.prompts).all()


def test_spt_too_few_tokens():
    model, x, loader = spt_setup(5, 'deep', 'mean', n_images=1, batch=1)   # 1 image x 5 pooled tokens: enough
    model.init_prompts(loader)
    model, x, loader = spt_setup(40, 'shallow', 'random', n_images=1, batch=1)   # 36 tokens < 40
    with pytest.raises(ValueError):
        model.init_prompts(loader)


def reservoir_sample(seed, split, size=10):
    res, g = methods.Reservoir(size), torch.Generator().manual_seed(seed)
    for chunk in torch.arange(1000.).split(split):
        res.add(chunk[:, None], g)
    assert res.rows.shape[0] <= size
    return res.items()[:, 0].long()


SPLITS = [[1000], [1, 999], [300, 300, 400], [50] * 20, [7] * 142 + [6]]


def test_reservoir_is_uniform_without_replacement():
    seeds = 2000
    counts = torch.zeros(1000)
    for s in range(seeds):
        items = reservoir_sample(s, SPLITS[s % 4])
        assert len(set(items.tolist())) == 10
        counts[items] += 1
    e = seeds * 10 / 1000   # each value kept with probability 1%: 20 times
    assert counts.min() >= 2 and counts.max() <= 50
    chi2 = ((counts - e) ** 2 / e).sum().item()
    assert 800 < chi2 < 1200   # about 999 for a uniform sample
    for part in (counts[:100], counts[450:550], counts[900:]):   # no bias to early or late rows
        assert abs(part.mean().item() / e - 1) < 0.2


@pytest.mark.parametrize('seed', range(3))
def test_reservoir_does_not_depend_on_batching(seed):
    ref = reservoir_sample(seed, SPLITS[0])
    for split in SPLITS[1:]:
        assert torch.equal(reservoir_sample(seed, split), ref)


# -----------------------------------------------------------------------------
# build_model and tuned_state_dict

def test_build_model_rejects_unknown_method_and_option():
    bb = vit()
    with pytest.raises(ValueError, match='nope'):
        methods.build_model('nope', bb, 5)
    with pytest.raises(TypeError, match='prompts'):
        methods.build_model('linear', bb, 5, prompts=10)
    with pytest.raises(TypeError, match='spt_init'):
        methods.build_model('vpt', bb, 5, spt_init='mean')
    with pytest.raises(TypeError, match='sa2vp_gamma'):
        methods.build_model('lspt', bb, 5, sa2vp_gamma=0.5)


def test_build_model_none_means_default():
    bb = vit()
    cli = dict(prompts=None, depth=None, prompt_dropout=None, spt_init=None, lspt_gspc=None, lspt_lpc=None,
               sa2vp_dim=None, sa2vp_gamma=None, readout=None)
    vpt = methods.build_model('vpt', bb, 5, **cli)
    assert vpt.prompts.shape == (4, 50, 32) and vpt.deep and vpt.prompt_dropout.p == 0.1
    assert methods.build_model('vpt', bb, 5, depth='shallow').prompt_dropout.p == 0.0
    spt = methods.build_model('spt', bb, 5, **cli)
    assert spt.prompts.shape == (4, 20, 32) and spt.prompt_dropout.p == 0.0 and spt.spt_init == 'kmeans'
    assert methods.build_model('spt', bb, 5, **{**cli, 'depth': 'shallow'}).prompts.shape == (1, 100, 32)
    lspt = methods.build_model('lspt', bb, 5, **cli)
    assert lspt.prompts.shape == (4, 100, 32) and lspt.prompt_dropout.p == 0.1
    assert isinstance(lspt.cell, nn.LSTMCell) and lspt.gspc == 'mean'
    v = methods.prompt_init_bound(bb)
    assert lspt.prompts.abs().max() <= v
    sa = methods.build_model('sa2vp', vit(depth=12), 5, **cli)
    assert (sa.ppt.shape[-1], sa.gamma, sa.lam, sa.window) == (16, 0.1, 0.8, 3)
    lin = methods.build_model('linear', bb, 5, **cli)
    assert lin.readout == 'cls' and lin.method == 'linear'


@pytest.mark.parametrize('method, options, depth', VARIANTS, ids=VID)
def test_tuned_state_dict_is_exactly_the_tuned_tensors(method, options, depth):
    model = build(method, options, depth)
    sd = methods.tuned_state_dict(model)
    params = dict(model.named_parameters())
    assert set(sd) == {n for n, p in params.items() if p.requires_grad}
    for n, v in sd.items():
        assert torch.equal(v, params[n]) and v.data_ptr() != params[n].data_ptr() and not v.requires_grad
