"""Prompt tuning methods on a frozen ViT (models.VisionTransformer), one class each:

    Linear  linear probe: only the head
    Full    full fine-tuning: every parameter
    VPT     Visual Prompt Tuning (Jia et al., ECCV 2022), official code KMnP/vpt
    SPT     Self-Prompt Tuning (Wang et al., ICML 2024), official code WangYZ1608/Self-Prompt-Tuning
    LSPT    Long-term Spatial Prompt Tuning (Mo et al., 2024, arXiv 2402.17406), no official code: our reading
    SA2VP   Spatially Aligned-and-Adapted Visual Prompt (Pei et al., AAAI 2024), official code tommy-xq/SA2VP

`build_model(method, backbone, num_classes, **options)` is the one entry point; after it, requires_grad is True exactly
on the tuned parameters. `model(x)` gives the logits used for prediction, `model.loss(x, y)` the training loss. Token
order is always [cls, prompts, patches]; prompts never get a position embedding.

`METHODS` (at the end) maps --method names to classes. A class carries its options (the `__init__` keywords after
backbone, num_classes: build_model's options), `flags` (train.py's flags for them, see `method_flags`), `recipe`
(train.py's defaults), `options()` (read back from a built model), `data_defaults` (per dataset: SA²VP) and
`grid_in_one_pass` (Linear: a comma list of --lr / --wd in one pass).
"""

import inspect
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from models import pool


# --- shared pieces
def vpt_head(dim, num_classes):
    """VPT / GaPT head: Kaiming-normal (fan_out) weight, bias -ln((1-0.01)/0.01) ('prior 0.01')."""
    head = nn.Linear(dim, num_classes)
    nn.init.kaiming_normal_(head.weight, a=0, mode='fan_out')
    nn.init.constant_(head.bias, -math.log((1 - 0.01) / 0.01))
    return head


def prompt_init_bound(backbone):
    """VPT's uniform init bound, xavier for a patch-embedding output: sqrt(6 / (3*patch^2 + D)), 0.0625 for ViT-B/16."""
    return math.sqrt(6.0 / (3 * backbone.patch_size ** 2 + backbone.embed_dim))


class Tuner(nn.Module):
    """Base class: holds the frozen backbone, in eval mode while training (VPT, SPT, GaPT/LSPT all override train() so;
    SA²VP opts out to keep the official dropout). `recipe`, the paper's training recipe: optimizer ('sgd' with momentum
    0.9 or 'adamw'), lr (absolute, at batch_size), wd, wd_head (None = same as wd), batch_size (global), epochs,
    warmup_epochs, min_lr (end of the cosine). `flags`, per option: (type or choices, what it is, its default as --help
    shows it, None = the __init__ default); train.py makes a flag of each (a bool defaulting to True: --no-<name>)."""

    backbone_train_mode = False
    recipe = None
    flags = {}
    grid_in_one_pass = False  # train.py trains a comma list of --lr / --wd in one pass (linear_grid.py): Linear only
    grad_checkpointing = False  # see set_grad_checkpointing
    # for the tools; a new class inherits these. sweep.py's lr x wd grid (base: lrs are VPT's base lrs, x batch / 256;
    # KMnP/vpt tune_vtab.py's prompt grid); bench.py: target=(row to compare with: 'backbone' or a method at the same
    # P, bound or 'tokens' = 1.1 (N+P)/N), variants={label: options}; the options that turn training's randomness off
    # (the precision tests); the papers' top-1 per pretrain (CUB, NABirds, Flowers, Dogs, Cars, FGVC mean, VTAB
    # Natural, Specialized, Structured) for sweep.py's report
    sweep_grid = dict(lr=[50, 25, 10, 5, 2.5, 1, 0.5, 0.25, 0.1, 0.05], wd=[0.01, 0.001, 0.0001, 0], base=True)
    bench, deterministic, papers = {}, {}, {}

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        for p in backbone.parameters():
            p.requires_grad_(False)

    def train(self, mode=True):
        super().train(mode)
        self.backbone.train(mode and self.backbone_train_mode)
        return self

    def loss(self, x, y):
        return F.cross_entropy(self(x), y)

    @staticmethod
    def data_defaults(data):
        """Option defaults that depend on the dataset (train.py fills in flags not given): only SA²VP has any."""
        return {}

    def options(self):
        """The options the model was built with, read back (train.py records them in result.json and last.pt): the
        attribute named like each option; a class naming them otherwise overrides this (build_model checks them)."""
        return {k: getattr(self, k, None) for k in init_options(type(self))}

    def set_grad_checkpointing(self, enable=True):
        """Activation checkpointing of the backbone blocks (timm's method name): block activations are recomputed in
        backward, not stored (ViT-L/H, large batches). Every method calls its blocks through `block_call` and inserts
        prompts outside it, so all prompts stay (VPT's per-block sets, LSPT's recurrence, SA²VP's two pathways); a
        checkpointed run of the plain blocks would silently drop VPT's deep prompts. The gradients are unchanged."""
        self.grad_checkpointing = enable
        return self

    def block(self, i, x):
        """Frozen block i on tokens x (B, T, D), as every method runs a block: with the change of its attention logits
        that attention(i, x) gives, checkpointed under --grad-checkpointing (see block_call)."""
        blk, (bias, scale) = self.backbone.blocks[i], self.attention(i, x)
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(blk, x, bias, scale, use_reentrant=False)
        return blk(x, bias, scale)

    def attention(self, i, x):
        """(bias, scale) of block i's attention logits on tokens x (models.Attention.attend): None, None = unchanged.
        A method that changes attention (a temperature, a bias, a mask; learnable or not) overrides this."""
        return None, None

    def block_call(self, fn, *args):
        """fn(*args), checkpointed when grad checkpointing is on and autograd records. Non-reentrant checkpoint restores
        the RNG state to recompute: dropout in fn (SA²VP's) draws the same masks, the RNG ends as without it."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)


def tuned_state_dict(model):
    """Only the tuned tensors (what a checkpoint of this codebase holds)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in names}


# --- baselines
class Linear(Tuner):
    """Linear probe: frozen features (the backbone's readout, models.pool) and a VPT-initialised head."""

    # VPT's linear baseline (KMnP/vpt); its lr is a starting point, VPT tunes it on val per dataset
    recipe = dict(optimizer='sgd', lr=0.1, wd=0, wd_head=None, batch_size=64, epochs=100, warmup_epochs=10, min_lr=0)
    grid_in_one_pass = True
    flags = dict(readout=(('cls', 'mean', 'mean-ln'), "readout of the last block's tokens (models.pool; mean-ln is "
                          "VPT's fresh LayerNorm for MAE)", "the backbone's: mae mean, else cls"))

    def __init__(self, backbone, num_classes, readout=None):
        super().__init__(backbone)
        self.readout = readout or backbone.readout
        self.head = vpt_head(backbone.embed_dim, num_classes)

    def backbone_features(self, x):
        """The plain backbone's readout: (B, 3, H, W) -> (B, D)."""
        t = self.backbone.embed(x)
        for i in range(len(self.backbone.blocks)):
            t = self.block(i, t)
        return pool(self.backbone, t, self.readout)

    def features(self, x):
        with torch.no_grad():  # nothing before the head is tuned
            return self.backbone_features(x)

    def forward(self, x):
        return self.head(self.features(x))


class Full(Linear):
    """Full fine-tuning: the same model as the linear probe, every parameter tuned."""

    backbone_train_mode = True
    grid_in_one_pass = False
    recipe = dict(Linear.recipe, lr=0.0025, wd=1e-4)  # VPT's full fine-tune baseline, same caveat
    sweep_grid = dict(Linear.sweep_grid, lr=[0.005, 0.001, 0.0005, 0.0001])  # KMnP/vpt tune_vtab.py, finetune

    def __init__(self, backbone, num_classes, readout=None):
        super().__init__(backbone, num_classes, readout)
        for p in self.parameters():
            p.requires_grad_(True)

    def features(self, x):
        return self.backbone_features(x)


# --- VPT
class VPT(Tuner):
    """Visual Prompt Tuning. Official code: KMnP/vpt src/models/vit_prompt/vit.py (incorporate_prompt,
    forward_deep_prompt) and vit_mae.py / vit_moco.py.
    shallow: P prompts after cls before block 0, carried through every block.
    deep:    a new set of P before every block, *replacing* the previous block's prompt outputs (12 sets; VPT: 1 + 11).
    Init U(-v, v), v = sqrt(6/(3 p^2 + D)); prompt dropout after the batch expand (a mask per sample and per insertion;
    0.1 deep, 0 shallow, as in the official demo.ipynb runs); head: Kaiming fan_out, bias -ln 99 (KMnP/vpt
    src/models/mlp.py: MLP, special_bias); the frozen backbone stays in eval mode, as in the official train().
    Where we differ from the official code [the option that reproduces it]:
      MAE readout: VPT's vit_mae.py deletes the pretrained norm and pools into a fresh, frozen LayerNorm (weight 1,
        bias 0); our MAE default is GaPT's and SPT's pretrained norm [readout='mean-ln'].
      Normalisation: ImageNet mean/std for all backbones; ours, the backbone's own (0.5/0.5 for in21k) [--mean/--std].
      Schedule: the official LambdaLR steps once per epoch, so epoch 0 trains at lr 0; train.py warms up per step.
      Prompt length: VPT tuned P per task, and those values are not in its code; ours defaults to 50 [--prompts]."""

    # KMnP/vpt: base lr 1.0 at batch 256 -> 0.25 at 64; wd on every tuned tensor but the head bias
    recipe = dict(optimizer='sgd', lr=0.25, wd=1e-3, wd_head=None, batch_size=64, epochs=100, warmup_epochs=10,
                  min_lr=0)
    bench, deterministic = dict(target=('backbone', 'tokens')), dict(prompt_dropout=0.0)  # (its own options only)
    papers = {'in21k': ('SA²VP Tables 1, 3', (88.5, 84.2, 99.0, 90.2, 83.6, 89.11, 78.48, 82.43, 54.98)),
              'mae': ('SPT Table 2', (68.33, 65.22, 80.05, 78.83, 67.67, 72.02)),  # FGVC only
              'mocov3': ('SPT Table 2', (82.67, 75.99, 94.41, 83.33, 79.18, 83.12))}
    flags = dict(prompts=(int, "prompt tokens per set", None),
                 depth=(('shallow', 'deep'), "shallow: one set before block 0; deep: one before every block", None),
                 prompt_dropout=(float, "dropout on the prompts, a mask per image", "0.1 deep, 0 shallow"),
                 readout=Linear.flags['readout'])

    def __init__(self, backbone, num_classes, prompts=50, depth='deep', prompt_dropout=None, readout=None):
        super().__init__(backbone)
        if depth not in ('shallow', 'deep'):
            raise ValueError(f"depth must be 'shallow' or 'deep', got {depth!r}")
        self.num_prompts, self.deep = prompts, depth == 'deep'
        self.readout = readout or backbone.readout
        n_sets = len(backbone.blocks) if self.deep else 1
        v = prompt_init_bound(backbone)
        self.prompts = nn.Parameter(torch.empty(n_sets, prompts, backbone.embed_dim).uniform_(-v, v))  # (L, P, D)
        if prompt_dropout is None:
            prompt_dropout = 0.1 if self.deep else 0.0  # VPT demo: 0.1 deep, none shallow
        self.prompt_dropout = nn.Dropout(prompt_dropout)
        self.head = self.make_head(backbone, num_classes)

    def options(self):
        return dict(super().options(), prompts=self.num_prompts, depth='deep' if self.deep else 'shallow',
                    prompt_dropout=self.prompt_dropout.p)

    def make_head(self, backbone, num_classes):
        return vpt_head(backbone.embed_dim, num_classes)

    def insert(self, x, i, replace):
        """Put prompt set i after cls; replace=True drops the previous prompt outputs (deep)."""
        B, P = x.shape[0], self.num_prompts
        p = self.prompt_dropout(self.prompts[i].expand(B, -1, -1))          # (B, P, D)
        rest = x[:, 1 + P:] if replace else x[:, 1:]
        return torch.cat([x[:, :1], p, rest], dim=1)                          # (B, 1+P+N, D)

    def features(self, x):
        x = self.backbone.embed(x)                                            # (B, 1+N, D)
        for i in range(len(self.backbone.blocks)):
            if i == 0:
                x = self.insert(x, 0, replace=False)
            elif self.deep:
                x = self.insert(x, i, replace=True)
            x = self.block(i, x)                                              # (B, 1+P+N, D)
        return pool(self.backbone, x, self.readout)

    def forward(self, x):
        return self.head(self.features(x))


# --- SPT
class SPT(VPT):
    """Self-Prompt Tuning: VPT's structure (no prompt dropout) with prompts initialised from the frozen backbone's own
    tokens on the training images (paper §3.3-3.4, Eq. 9-13; official code WangYZ1608/Self-Prompt-Tuning train.py,
    train_MAE.py, train_MoCo.py: prompt_generator). Block i's prompts come from the patch tokens entering block i of the
    prompt-free backbone (cls excluded); for block 0, as in the official code (a hook on patch_embed), the patch
    embedding *without* position embedding, where the paper's Eq. 1 adds it. Call `init_prompts(loader)` before
    training. Strategies (`spt_init`), per layer:
      random   one patch token per prompt.
      mean/max one pooled window per prompt: per image, the official 1-D raster windows (window_pool), P pooled tokens;
               the paper's §3.4 instead pools one batch's N_e*B tokens with one kernel of size N_e*B // P.
      kmeans   P centroids of a bounded random subsample of the layer's tokens (k-means++ seeding, batched Lloyd
               iterations in torch; on small data within 1% of the inertia of scikit-learn's KMeans): the paper's best
               variant (its Table 1: 27.3 CPU days on CUB) and our default (bench.py checks that it costs less than one
               training epoch); the official code has no clustering, SPT's train_MAE.py only loads centroids.
    Unlike the official code: the images the tokens come from (see init_prompts); shallow SPT applies the strategy to
    block 0's tokens, the official code always takes random patch-embedding tokens (they agree for 'random'); the
    backbone stays in eval mode, theirs in train mode with drop-path 0.1 by default, which its README's commands turn
    off (--drop_path 0.0). Head: trunc-normal std 0.02 (0.01 for MoCo v3, SPT's train_MoCo.py), zero bias."""

    # WangYZ1608/Self-Prompt-Tuning: wd 1e-2 on the prompts, 1.0 on the head weight, none on biases / 1-D tensors
    recipe = dict(optimizer='adamw', lr=1e-3, wd=1e-2, wd_head=1.0, batch_size=32, epochs=100, warmup_epochs=10,
                  min_lr=1e-8)
    sweep_grid = dict(lr=[5e-3, 2e-3, 1e-3, 5e-4, 2e-4], wd=[1e-1, 1e-2, 1e-3], base=False)  # around the paper's
    # bench.py also times init_prompts per strategy against one training epoch: kmeans <= 1, the others <= 0.25
    bench = dict(VPT.bench, init={'random': 0.25, 'mean': 0.25, 'max': 0.25, 'kmeans': 1.0})
    papers = {'in21k-augreg': ('SPT Table 3', (90.6, 87.6, 99.8, 89.8, 89.2, 91.40, 82.27, 85.48, 58.91)),
              'mae': ('SPT Table 2', (80.13, 76.28, 93.07, 82.23, 84.61, 83.26, 67.19, 83.15, 59.23)),
              'mocov3': ('SPT Table 2', (84.47, 77.63, 96.10, 85.84, 85.98, 86.00, 76.20, 84.95, 58.36))}
    flags = dict(VPT.flags, prompts=(int, "prompt tokens per set", "20 deep, 100 shallow"),
                 spt_init=(('random', 'mean', 'max', 'kmeans'), "prompt init from the backbone's own tokens", None),
                 spt_kmeans_tokens=(int, "k-means subsample of tokens per layer", None))

    def __init__(self, backbone, num_classes, prompts=None, depth='deep', spt_init='kmeans',
                 spt_kmeans_tokens=8192, readout=None):
        if prompts is None:
            prompts = 20 if depth == 'deep' else 100  # the official README's values
        if spt_init not in ('random', 'mean', 'max', 'kmeans'):
            raise ValueError(f"spt_init must be random, mean, max or kmeans, got {spt_init!r}")
        super().__init__(backbone, num_classes, prompts, depth, prompt_dropout=0.0, readout=readout)
        self.spt_init, self.spt_kmeans_tokens = spt_init, spt_kmeans_tokens

    def make_head(self, backbone, num_classes):
        head = nn.Linear(backbone.embed_dim, num_classes)
        nn.init.trunc_normal_(head.weight, std=0.01 if backbone.pretrain == 'mocov3' else 0.02)
        nn.init.zeros_(head.bias)
        return head

    @torch.no_grad()
    def layer_tokens(self, x):
        """The patch tokens entering each prompted block of the prompt-free backbone:
        a list of (B, N, D), index 0 = patch embedding without position embedding."""
        bb = self.backbone
        patches, grid = bb.patchify(x)
        out = [patches]
        if self.deep:
            t = torch.cat([bb.cls_token.expand(x.shape[0], -1, -1), patches], 1) + bb.pos_embed_for(grid)
            for blk in bb.blocks[:-1]:
                t = blk(t)
                out.append(t[:, 1:])
        return out

    @torch.no_grad()
    def init_prompts(self, loader, strategy=None, generator=None):
        """Initialise the prompts from the training images in `loader` (train.py passes the training split with the eval
        transform). random/mean/max, when the loader has a `.dataset`: P distinct training images (drawn without
        replacement) serve all layers; prompt k of layer i is a uniformly drawn token (or pooled window) of image k at
        layer i, so one forward over P images serves every layer (fewer than P images: P distinct (image, token) pairs
        per layer). kmeans, or any iterable of (x, y) batches without `.dataset`: one pass over the loader, each layer
        keeping a uniform reservoir of tokens (P, or `spt_kmeans_tokens` for kmeans), never all tokens of all layers.
        The official prompt_generator has the same per-layer tokens and windows, but draws images with replacement,
        with the training transform, each layer's tokens independently (and, for MoCo v3, from a single image): each of
        our prompts is, as theirs for in21k and MAE, a uniform draw from the layer's tokens, but the joint draw differs
        (METHODS.md: how, and why ours: P images forward instead of the training set's ~55 GB for CUB)."""
        strategy = strategy or self.spt_init
        g = generator or torch.Generator(device='cpu').manual_seed(0)
        was_training = self.training
        self.eval()
        if strategy != 'kmeans' and hasattr(loader, 'dataset') and hasattr(loader.dataset, '__len__'):
            self._init_from_drawn_images(loader, strategy, g)
        else:
            self._init_streaming(loader, strategy, g)
        self.train(was_training)
        return self

    def _init_streaming(self, loader, strategy, g):
        P, dev = self.num_prompts, self.prompts.device
        keep = P if strategy != 'kmeans' else max(self.spt_kmeans_tokens, P)
        reservoirs = [Reservoir(keep) for _ in range(self.prompts.shape[0])]
        for x, _ in loader:
            for res, tok in zip(reservoirs, self.layer_tokens(x.to(dev))):   # tok: (B, N, D)
                if strategy in ('mean', 'max'):
                    tok = window_pool(tok, P, strategy)                       # (B, P, D)
                res.add(tok.flatten(0, 1), g)
        for i, res in enumerate(reservoirs):
            pts = res.items()
            if pts.shape[0] < P:
                raise ValueError(f"SPT needs at least {P} tokens per layer, the loader gave {pts.shape[0]}")
            self.prompts[i] = kmeans(pts, P, generator=g)[0] if strategy == 'kmeans' else pts[:P]

    def _init_from_drawn_images(self, loader, strategy, g):
        ds, P, dev = loader.dataset, self.num_prompts, self.prompts.device
        slots = self.backbone.num_patches if strategy == 'random' else P     # tokens per image
        if len(ds) * slots < P:
            raise ValueError(f"SPT needs at least {P} tokens per layer, the dataset has {len(ds) * slots}")
        L = self.prompts.shape[0]
        if len(ds) >= P:  # P distinct images shared by all layers,
            img = torch.randperm(len(ds), generator=g)[:P]  # a uniform slot per prompt and layer
            picks = [img * slots + torch.randint(slots, (P,), generator=g) for _ in range(L)]
        else:             # fewer images than prompts: P distinct (image, slot) pairs per layer
            picks = [torch.randperm(len(ds) * slots, generator=g)[:P] for _ in range(L)]
        images = torch.unique(torch.cat(picks) // slots)                      # sorted image indices
        pos = {int(im): j for j, im in enumerate(images)}
        sub = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, images.tolist()),
                                          batch_size=loader.batch_size or 32, shuffle=False)
        start = 0
        for x, _ in sub:
            for i, tok in enumerate(self.layer_tokens(x.to(dev))):            # tok: (b, N, D)
                if strategy in ('mean', 'max'):
                    tok = window_pool(tok, P, strategy)                       # (b, P, D)
                for k, flat in enumerate(picks[i].tolist()):
                    j = pos[flat // slots] - start
                    if 0 <= j < tok.shape[0]:
                        self.prompts[i, k] = tok[j, flat % slots]
            start += x.shape[0]


class Reservoir:
    """A uniform random sample without replacement of at most `size` rows from a stream: each row gets a random key and
    the `size` smallest keys are kept (so the result does not depend on batching; memory stays `size` rows)."""

    def __init__(self, size):
        self.size, self.keys, self.rows = size, None, None

    def add(self, rows, g):
        keys = torch.rand(rows.shape[0], generator=g).to(rows.device)
        if self.rows is not None:
            rows, keys = torch.cat([self.rows, rows]), torch.cat([self.keys, keys])
        if rows.shape[0] > self.size:
            keys, idx = keys.topk(self.size, largest=False, sorted=False)
            rows = rows[idx]
        self.rows, self.keys = rows.float(), keys

    def items(self):
        """The kept rows in random order (ascending key)."""
        return self.rows[self.keys.argsort()]


def window_pool(tok, P, how):
    """SPT's official pooling: (B, N, D) -> (B, P, D). Windows [p*w, (p+1)*w) for p < P-1 with w = N // (P-1), and a
    last window of the last N mod w tokens (all N when that is 0)."""
    N = tok.shape[1]
    if P == 1:
        w, r = N, N
    else:
        w = N // (P - 1)
        if w == 0:
            raise ValueError(f"SPT mean/max pooling needs P - 1 <= N tokens (P={P}, N={N})")
        r = N % w or N
    red = (lambda a: a.mean(2)) if how == 'mean' else (lambda a: a.amax(2))
    head = red(tok[:, :(P - 1) * w].reshape(tok.shape[0], P - 1, w, tok.shape[-1]))      # (B, P-1, D)
    last = red(tok[:, N - r:].unsqueeze(1))                                    # (B, 1, D)
    return torch.cat([head, last], dim=1)


def kmeans(x, k, iters=100, n_init=1, tol=1e-4, generator=None, chunk=8192):
    """k-means on the rows of x (M, D): greedy k-means++ seeding, then Lloyd iterations until no assignment changes or
    the centroids move less than scikit-learn's tolerance (tol times the mean per-dimension variance); the best of
    n_init runs (default 1, as scikit-learn's for k-means++). Runs on x's device. Returns (centroids, inertia)."""
    g = generator or torch.Generator(device='cpu').manual_seed(0)
    x = x.float()
    sq = (x * x).sum(1)
    tol = tol * x.var(0).mean()

    def dists(c):  # squared distances (M, k), in chunks to bound memory
        cc = (c * c).sum(1)
        return torch.cat([(sq[i:i + chunk, None] - x[i:i + chunk] @ (2 * c).T + cc).clamp_min_(0)
                          for i in range(0, x.shape[0], chunk)])

    best = (None, float('inf'))
    for _ in range(n_init):
        # greedy k-means++ (as scikit-learn): 2 + ln k candidates drawn ∝ D(x)^2, keep the one lowering total D^2 most
        c = x[torch.randint(x.shape[0], (1,), generator=g)]
        d2 = dists(c)[:, 0]
        trials = 2 + int(math.log(k))
        for _ in range(1, k):
            probs = (d2 / d2.sum()).cpu() if d2.sum() > 0 else torch.ones(x.shape[0]) / x.shape[0]
            cand = x[torch.multinomial(probs, trials, replacement=True, generator=g).to(x.device)]
            new_d2 = torch.minimum(d2[:, None], dists(cand))                    # (M, trials)
            j = new_d2.sum(0).argmin()
            c, d2 = torch.cat([c, cand[j:j + 1]]), new_d2[:, j]
        assign = None
        for _ in range(iters):  # Lloyd
            prev, assign = assign, dists(c).argmin(1)
            if prev is not None and torch.equal(prev, assign):
                break
            counts = torch.bincount(assign, minlength=k).float()
            sums = torch.zeros_like(c).index_add_(0, assign, x)
            new = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], c)  # empty: keep
            shift, c = (new - c).pow(2).sum(), new
            if shift <= tol:
                break
        inertia = dists(c).min(1).values.sum().item()
        if inertia < best[1]:
            best = (c, inertia)
    return best


# --- LSPT
class LSPT(Tuner):
    """Long-term Spatial Prompt Tuning (Mo et al. 2024, arXiv 2402.17406). No official code exists: this is our reading
    of the paper's §4.1-4.3 (Eq. 3-5) and Algorithm A.1, each point it leaves open named with our choice.
    Prompt sets P^0..P^{L-1} (12 for ViT-B), laid out as VPT-deep's. Block 1 takes P^0 as its prompts. After
    block l = 1..L-1, whose output splits into cls, prompt outputs X̂_P^l (B, P, D) and patch tokens X^l (B, N, D):
        GSPC (Eq. 3):   X̂_SP^l = X̂_P^l + mean_i X^l_i
        LPC  (Eq. 4-5): X_P^l, C^l = LSTMCell(input = dropout(P^l), hidden = X̂_SP^l, cell = C^{l-1})
    and X_P^l becomes the prompts of block l + 1. The choices where the paper is open (METHODS.md lists each with its
    reason): the LSTM's time step is the block, over B*P rows of width D, one LSTMCell(D, D) shared by all blocks;
    the hidden state is GSPC's output, only the cell state is carried (C^0 = 0), X_P^l replaces the prompt slots;
    GSPC averages the N patch tokens of the raw residual stream; nothing after the last block; 12 sets (block 1 has
    its own); VPT-deep's base (no GaPT gates or temperature); the MAE readout is GaPT's (the least certain choice:
    readout='cls' gives the paper's "class token"); from VPT / GaPT: the prompt init, prompt dropout 0.1, the head,
    GaPT's recipe and P = 100 (LSPT gives no optimiser, lr or P).
    Ablations: lspt_gspc mean|kmeans|none, lspt_lpc lstm|gru|none. kmeans is Table 6 (k = P centroids of each image's
    patch tokens, centroid k added to prompt k; the paper gives no init or iteration count, ours are in
    patch_centroids); gru is Table C.1. With lspt_lpc none the new set (plus the patch mean if GSPC is on) replaces the
    slots (the paper defines no GSPC-only model; our reading); with both none this is VPT-deep."""

    # GaPT's recipe; no published grid: GaPT's absolute lr 0.1 and below (the LSTM shares the prompts' lr)
    recipe = dict(optimizer='sgd', lr=0.1, wd=0, wd_head=None, batch_size=64, epochs=100, warmup_epochs=10, min_lr=0)
    sweep_grid = dict(Tuner.sweep_grid, lr=[0.5, 0.25, 0.1, 0.05, 0.025, 0.01], base=False)
    bench = dict(target=('vpt', 1.3), variants={'dropout 0': dict(prompt_dropout=0.0)})
    deterministic = dict(prompt_dropout=0.0)
    papers = {'mae': ('LSPT Tables 1, 2', (73.86, 71.73, 82.32, 82.05, 74.75, 76.94, 52.36, 80.75, 41.72)),
              'mocov3': ('LSPT Tables 1, 2', (84.29, 77.16, 95.06, 84.25, 80.12, 84.18, 77.19, 85.69, 52.82))}
    flags = dict(VPT.flags, prompt_dropout=(float, "dropout on the prompts, a mask per image", None),
                 lspt_gspc=(('mean', 'kmeans', 'none'), "GSPC, the patch context added to the prompts", None),
                 lspt_lpc=(('lstm', 'gru', 'none'), "LPC, the recurrent cell carried over depth", None))

    def __init__(self, backbone, num_classes, prompts=100, prompt_dropout=0.1, lspt_gspc='mean',
                 lspt_lpc='lstm', readout=None):
        super().__init__(backbone)
        if lspt_gspc not in ('mean', 'kmeans', 'none') or lspt_lpc not in ('lstm', 'gru', 'none'):
            raise ValueError(f"lspt_gspc in mean|kmeans|none and lspt_lpc in lstm|gru|none, "
                             f"got {lspt_gspc!r}, {lspt_lpc!r}")
        D, L = backbone.embed_dim, len(backbone.blocks)
        if lspt_gspc == 'kmeans' and prompts > backbone.num_patches:
            raise ValueError(f"k-means GSPC needs prompts <= patches ({prompts} > {backbone.num_patches})")
        self.num_prompts, self.gspc, self.lpc = prompts, lspt_gspc, lspt_lpc
        self.readout = readout or backbone.readout
        v = prompt_init_bound(backbone)
        self.prompts = nn.Parameter(torch.empty(L, prompts, D).uniform_(-v, v))      # (L, P, D)
        self.prompt_dropout = nn.Dropout(prompt_dropout)
        self.cell = {'lstm': lambda: nn.LSTMCell(D, D), 'gru': lambda: nn.GRUCell(D, D),
                     'none': lambda: None}[lspt_lpc]()
        self.head = vpt_head(D, num_classes)

    def options(self):
        return dict(super().options(), prompts=self.num_prompts, prompt_dropout=self.prompt_dropout.p,
                    lspt_gspc=self.gspc, lspt_lpc=self.lpc)

    def new_prompts(self, l, B):
        """Prompt set l: (B, P, D), or (1, P, D) when dropout is off (the LSTM's input projection then runs once)."""
        p = self.prompts[l].unsqueeze(0)
        if self.training and self.prompt_dropout.p > 0:
            p = self.prompt_dropout(p.expand(B, -1, -1))
        return p

    def gspc_code(self, xp_hat, patches):
        """Eq. 3: add the global patch context to the block's prompt outputs. (B, P, D)"""
        if self.gspc == 'mean':
            return xp_hat + patches.mean(dim=1, keepdim=True)
        if self.gspc == 'kmeans':
            return xp_hat + patch_centroids(patches, self.num_prompts)
        return xp_hat

    def lpc_step(self, inp, H, C):
        """Eq. 4-5: one step of the shared recurrent cell on (B*P) rows.
        inp: (1 or B, P, D) new prompts, H: (B, P, D) hidden, C: (B, P, D) cell."""
        B, P, D = H.shape
        if self.lpc == 'gru':
            h = self.cell(inp.expand(B, -1, -1).reshape(B * P, D), H.reshape(B * P, D))
            return h.view(B, P, D), C
        cell = self.cell  # nn.LSTMCell parameters, gates in torch's order (i, f, g, o)
        gx = F.linear(inp, cell.weight_ih, cell.bias_ih)                      # (1 or B, P, 4D)
        gates = (gx + F.linear(H, cell.weight_hh, cell.bias_hh)).view(B, P, 4, D)
        i, f, g, o = gates.unbind(2)
        C = torch.sigmoid(f) * C + torch.sigmoid(i) * torch.tanh(g)          # C^l
        h = torch.sigmoid(o) * torch.tanh(C)                                   # X_P^l, the next block's prompts
        return h, C

    def features(self, x):
        x = self.backbone.embed(x)                                            # (B, 1+N, D)
        B, P, L = x.shape[0], self.num_prompts, len(self.backbone.blocks)
        cls, X = x[:, :1], x[:, 1:]
        xp = self.new_prompts(0, B).expand(B, -1, -1)                         # block 1's prompts: P^0
        C = x.new_zeros(B, P, x.shape[-1])                                    # C^0 = 0
        for l in range(L):
            y = self.block(l, torch.cat([cls, xp, X], dim=1))                 # (B, 1+P+N, D)
            cls, xp_hat, X = y[:, :1], y[:, 1:1 + P], y[:, 1 + P:]
            if l == L - 1:
                xp = xp_hat                                                   # no coding after the last block
                break
            H = self.gspc_code(xp_hat, X)                                     # Eq. 3
            inp = self.new_prompts(l + 1, B)
            if self.lpc == 'none':  # ablation: the new set (+ patch context) replaces the slots
                xp = (inp + (H - xp_hat)).expand(B, -1, -1)
            else:
                xp, C = self.lpc_step(inp, H, C)                              # Eq. 4-5
        return pool(self.backbone, torch.cat([cls, xp, X], dim=1), self.readout)

    def forward(self, x):
        return self.head(self.features(x))


def patch_centroids(patches, k, iters=10):
    """LSPT's k-means GSPC (Table 6): per image, k centroids of its patch tokens, initialised at k evenly spaced
    patches, `iters` Lloyd steps without gradient, then one differentiable step (centroid = mean of its assigned tokens;
    an empty cluster keeps its previous centroid). patches (B, N, D) -> (B, k, D)."""
    B, N, D = patches.shape
    idx = torch.linspace(0, N - 1, k, device=patches.device).round().long()

    def step(c, pts):
        assign = torch.cdist(pts, c).argmin(-1)                               # (B, N)
        onehot = F.one_hot(assign, k).to(pts.dtype)                           # (B, N, k)
        counts = onehot.sum(1)                                                # (B, k)
        means = onehot.transpose(1, 2) @ pts / counts.clamp_min(1)[..., None]
        return torch.where(counts[..., None] > 0, means, c)

    with torch.no_grad():
        c = patches[:, idx].detach()
        for _ in range(iters):
            c = step(c, patches.detach())
    return step(c, patches)


# --- SA²VP
# (t, gamma) per dataset: the official tommy-xq/SA2VP README.md, "Experiment steps", step 5, its inter-dim (t) /
# inter-weight (gamma) tables for ViT (FGVC per dataset, VTAB per group) and the VTAB exceptions above them. The
# official code has no flag for either: t is edited into SA²VP's vit_tinypara.py, gamma is Encoder.add_scale (0.1 as
# committed). The same step lists lr 5e-4 for Pets and Clevr-count; the official scripts pass 1e-3 to every task, as
# train.py does (--lr overrides).
SA2VP_SETTINGS = {
    'cub': (16, 0.1), 'nabirds': (32, 0.1), 'flowers': (8, 0.1), 'dogs': (32, 0.1), 'cars': (64, 1.5),
    # VTAB Natural: t 8, gamma 0.1 (SVHN 16 / 0.5)
    **{f'vtab-{n}': (8, 0.1) for n in ('cifar', 'caltech101', 'dtd', 'oxford_flowers102', 'oxford_iiit_pet', 'sun397')},
    'vtab-svhn': (16, 0.5),
    # VTAB Specialized: t 16, gamma 1.5 (Resisc45 0.5)
    **{f'vtab-{n}': (16, 1.5) for n in ('patch_camelyon', 'eurosat', 'diabetic_retinopathy')},
    'vtab-resisc45': (16, 0.5),
    # VTAB Structured: t 32, gamma 1.5 (dSprites-ori 16 / 0.1, sNORB-ele 0.5)
    **{f'vtab-{n}': (32, 1.5)
       for n in ('clevr_count', 'clevr_dist', 'dmlab', 'kitti', 'dsprites_loc', 'smallnorb_azi')},
    'vtab-dsprites_ori': (16, 0.1), 'vtab-smallnorb_ele': (32, 0.5),
}
SA2VP_DEFAULT = (16, 0.1)  # the committed code's values, for any other data


def window_mask(grid, c):
    """SA²VP's spatially aligned neighbourhoods as a (1+N, 1+N) boolean mask (True = attend): row 0 (the cls slot) sees
    every token; patch (r, s) sees the patches in its c x c window, clipped at the borders, never token 0."""
    h, w = grid
    r = torch.arange(h * w) // w
    s = torch.arange(h * w) % w
    near = ((r[:, None] - r[None]).abs() <= c // 2) & ((s[:, None] - s[None]).abs() <= c // 2)
    m = torch.zeros(1 + h * w, 1 + h * w, dtype=torch.bool)
    m[0] = True
    m[1:, 1:] = near
    return m


class Adapter(nn.Module):
    """SA²VP's adapter after each cross-attention: LN -> Linear(D, t) -> GELU -> dropout -> Linear(t, D) -> dropout, no
    residual (official Mlp_small; the paper's Eq. 3 says ReLU)."""

    def __init__(self, dim, t, drop):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc1, self.fc2 = nn.Linear(dim, t), nn.Linear(t, dim)
        self.drop = nn.Dropout(drop)
        for fc in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.normal_(fc.bias, std=1e-6)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(self.norm(x))))))


class SA2VP(Tuner):
    """SA²VP (Pei et al., AAAI 2024), reproducing the function of the official code: tommy-xq/SA2VP
    vpt_main/src/models/vit_backbones/vit_tinypara.py (Embeddings, Encoder.forward, Cross_Block, CrossAttention,
    Mlp_small), vit_train_sa2vp.py (Dual_model) and engine_for_train.py (train_class_batch), not vit_tinypara_acc.py,
    the faster file its README offers, which computes another function (one head, zero-padded windows).
    A prompt pathway of 1+N tokens (a low-rank map ppt (1+N, t) -> Linear(t, D), plus the frozen pos-embed, then
    dropout) runs through the same frozen blocks as the image (base) pathway. At layer l one spatially aligned
    cross-attention (window_mask), re-using block l's norm1, qkv and proj, reads both layer inputs; its adapter output
    x gamma is added to block l's output of one pathway: the prompt queries the base at layers {0, 4, 8}, the base
    queries the prompt elsewhere. Deep prompt maps at layers 4 and 8 pass block l, scaled by e_k. A head on token 0 of
    each pathway after the shared final norm; loss = lambda CE(base) + (1 - lambda) CE(prompt); predictions use the base
    logits. Fast, exact: per layer, each stream's norm1 + qkv is computed once for both attentions (the official code:
    identical frozen copies), and the window attention is one masked scaled_dot_product_attention (the official code
    loops in Python over the 196 queries: 4.8 s vs 0.18 s per call, ViT-B batch 8, CPU).
    Paper vs code (we follow the code): the adapter uses GELU, not Eq. 3's ReLU; the cross-attention (Eq. 2) also
    applies block l's norm1 and proj, with 12 heads and dropout; the prompt maps are low-rank (t) with a learned cls
    slot, of the image grid's size (the paper's "scaled" maps are not in the code); one direction per layer, added as a
    parallel branch to the block output; gamma is fixed per dataset (Eq. 4: "tuned on a validation set") and applied on
    both pathways; deep maps (Eq. 5, O = E * P^l + O) pass through block l first, carry no pos-embed and start with
    e_k ~ N(0, 0.02^2); lambda = 0.8 in Eq. 6, one head shared by both pathways; dropout 0.1 is live in the frozen
    backbone while training (sa2vp_dropout=False turns it off); the head bias keeps PyTorch's default init. The paper
    gives no window size; the official code hard-codes c = 3 (sa2vp_window)."""

    backbone_train_mode = True
    B2P = (0, 4, 8)     # layers where the prompt queries the base
    DEEP = (4, 8)       # layers with a new deep prompt map (those the backbone has)
    # tommy-xq/SA2VP: wd not on biases and 1-D tensors
    recipe = dict(optimizer='adamw', lr=1e-3, wd=1e-4, wd_head=None, batch_size=64, epochs=100, warmup_epochs=10,
                  min_lr=1e-7)
    sweep_grid = dict(lr=[5e-3, 2e-3, 1e-3, 5e-4, 2e-4], wd=[1e-3, 1e-4, 0], base=False)  # around the paper's
    bench = dict(target=('backbone', 2.4), variants={'no dropout': dict(sa2vp_dropout=False)})
    deterministic = dict(sa2vp_dropout=False)
    papers = {'in21k': ('SA²VP Tables 1, 3', (89.1, 85.8, 99.3, 92.1, 84.1, 90.08, 80.97, 85.73, 60.80))}
    flags = dict(sa2vp_dim=(int, "t, the rank of the prompt maps", "per dataset (SA2VP_SETTINGS), else 16"),
                 sa2vp_gamma=(float, "gamma, the weight of the adapter outputs", "per dataset, else 0.1"),
                 sa2vp_lambda=(float, "loss weight of the base logits", None),
                 sa2vp_window=(int, "window c of the cross-attention", None),
                 sa2vp_dropout=(bool, "the official dropout 0.1 in the frozen backbone and the cross blocks (the flag "
                                "turns it off)", "on"))

    @staticmethod
    def data_defaults(data):
        """t (sa2vp_dim) and gamma from the per-dataset table SA2VP_SETTINGS."""
        t, gamma = SA2VP_SETTINGS.get(data, SA2VP_DEFAULT)
        return dict(sa2vp_dim=t, sa2vp_gamma=gamma)

    def __init__(self, backbone, num_classes, sa2vp_dim=16, sa2vp_gamma=0.1, sa2vp_lambda=0.8,
                 sa2vp_window=3, sa2vp_dropout=True):
        super().__init__(backbone)
        D, t, N1 = backbone.embed_dim, sa2vp_dim, 1 + backbone.num_patches
        drop = 0.1 if sa2vp_dropout else 0.0
        self.backbone_train_mode = sa2vp_dropout
        for m in backbone.modules():  # the official backbone has dropout 0.1 after the embedding and in each MLP
            if isinstance(m, nn.Dropout):
                m.p = drop
        self.gamma, self.lam, self.window = sa2vp_gamma, sa2vp_lambda, sa2vp_window
        self.deep_layers = [l for l in self.DEEP if l < len(backbone.blocks)]
        self.ppt = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, N1, t), std=0.02))        # (1, 1+N, t)
        self.ppt_proj = nn.Linear(t, D)
        self.adapters = nn.ModuleList([Adapter(D, t, drop) for _ in backbone.blocks])
        if self.deep_layers:  # a backbone of fewer than 5 blocks has none (DDP refuses empty parameters)
            self.deep_scale = nn.Parameter(torch.randn(len(self.deep_layers), D) * 0.02)  # e_k ('cross_conv')
            self.deep_ppt = nn.Parameter(nn.init.trunc_normal_(torch.empty(len(self.deep_layers), 1, N1, t), std=0.02))
        self.deep_proj = nn.ModuleList([nn.Linear(t, D) for _ in self.deep_layers])
        for fc in [self.ppt_proj, *self.deep_proj]:
            nn.init.xavier_uniform_(fc.weight)
            nn.init.normal_(fc.bias, std=1e-6)
        self.drop = nn.Dropout(drop)    # after the prompt embedding and after the cross-attention's proj
        self.head = nn.Linear(D, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        self.register_buffer('mask', window_mask(backbone.grid, sa2vp_window), persistent=False)

    def options(self):
        return dict(super().options(), sa2vp_dim=self.ppt.shape[-1], sa2vp_gamma=self.gamma, sa2vp_lambda=self.lam,
                    sa2vp_window=self.window, sa2vp_dropout=self.backbone_train_mode)

    def prompt_map(self):
        """The layer-0 prompt map before the position embedding: (1, 1+N, D)."""
        return self.ppt_proj(self.ppt)

    def layer(self, l, h, p):
        """One fused layer: both pathways through block l and the cross-attention between them."""
        blk = self.backbone.blocks[l]
        attn = blk.attn
        qh, kh, vh = attn.split_qkv(blk.norm1(h))                             # each (B, H, 1+N, d)
        qp, kp, vp = attn.split_qkv(blk.norm1(p))
        self_h = attn.attend(qh, kh, vh)                                      # first: the image's own attention
        b2p = l in self.B2P
        if b2p:   # the prompt queries the base
            cross = attn.attend(qp, kh, vh, self.mask)
        else:     # the base queries the prompt
            cross = attn.attend(qh, kp, vp, self.mask)
        cross = (p if b2p else h) + self.drop(attn.proj(attn.merge_heads(cross)))  # residual: raw query tokens
        f = self.adapters[l](cross)                                           # (B, 1+N, D)
        h = h + attn.proj(attn.merge_heads(self_h))
        h = h + blk.mlp(blk.norm2(h))                                         # Block_l(h)
        p = p + attn.proj(attn.merge_heads(attn.attend(qp, kp, vp)))
        p = p + blk.mlp(blk.norm2(p))                                         # Block_l(p)
        if l in self.deep_layers:  # Eq. 5 as coded: O = Block_l(O) + e_k * Block_l(P^l)
            k = self.deep_layers.index(l)
            d = self.deep_proj[k](self.deep_ppt[k]).expand(h.shape[0], -1, -1)   # (B, 1+N, D), no pos-embed
            p = p + self.deep_scale[k] * blk(d)
        if b2p:
            p = p + self.gamma * f                                            # Eq. 4, prompt side
        else:
            h = h + self.gamma * f                                            # Eq. 4, base side
        return h, p

    def forward_both(self, x):
        """(base logits, prompt logits), each (B, C)."""
        bb = self.backbone
        grid = (x.shape[-2] // bb.patch_size, x.shape[-1] // bb.patch_size)
        if grid != bb.grid:
            raise ValueError(f"SA²VP's prompt map is built for a {bb.grid} grid; got an input with grid {grid}")
        B = x.shape[0]
        h = bb.embed(x)                                                       # (B, 1+N, D) base
        p = self.drop(self.prompt_map().expand(B, -1, -1) + bb.pos_embed)     # (B, 1+N, D) prompt
        for l in range(len(bb.blocks)):
            h, p = self.block_call(self.layer, l, h, p)                       # both pathways and the cross-attention
        zb, zp = bb.norm(h[:, 0]), bb.norm(p[:, 0])                           # shared final norm, token 0
        return self.head(zb), self.head(zp)

    def forward(self, x):
        return self.forward_both(x)[0]

    def loss(self, x, y):
        base, prompt = self.forward_both(x)
        return self.lam * F.cross_entropy(base, y) + (1 - self.lam) * F.cross_entropy(prompt, y)  # Eq. 6


# --- the methods: --method name -> class. A new method is one class above and one entry here.
METHODS = {'linear': Linear, 'full': Full, 'vpt': VPT, 'spt': SPT, 'lspt': LSPT, 'sa2vp': SA2VP}


def init_options(cls):
    """{option: default} of a method class: the keyword arguments of its __init__ after backbone and num_classes. They
    are build_model's options and train.py's flags (- for _); None = decided in __init__."""
    params = inspect.signature(cls.__init__).parameters
    return {k: p.default for k, p in params.items() if k not in ('self', 'backbone', 'num_classes')}


PROMPTED = tuple(m for m, cls in METHODS.items() if 'prompts' in init_options(cls))  # methods with --prompts


def method_flags():
    """{option: (type or choices, help, default)} over every method in METHODS: train.py's method flags. The help
    is the first declaring class's text, then each method's default."""
    flags = {}
    for name, cls in METHODS.items():
        for k, default in init_options(cls).items():
            if k not in cls.flags:
                raise TypeError(f"{cls.__name__}.flags has no entry for its option {k!r}: add (type or choices, "
                                f"what it is, its default for --help or None)")
            kind, what, shown = cls.flags[k]
            flags.setdefault(k, (kind, what, default, {}))[3][name] = default if shown is None else shown
    return {k: (kind, f"{', '.join(each)}: {what} (default: " + (
                f"{next(iter(each.values()))})" if len(set(each.values())) == 1 else
                ', '.join(f"{m} {v}" for m, v in each.items()) + ')'), default)
            for k, (kind, what, default, each) in flags.items()}


def build_model(method, backbone, num_classes, **options):
    """Wrap a backbone (models.create_backbone) for a method. Options are the CLI flags with _ for -, e.g. prompts=50,
    depth='deep', prompt_dropout=0.1, spt_init='kmeans', lspt_gspc='mean', lspt_lpc='lstm', sa2vp_dim=16,
    sa2vp_gamma=0.1, readout='mean-ln'. None means the method's default; an option it lacks is an error."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    cls = METHODS[method]
    given = {k: v for k, v in options.items() if v is not None}
    accepted = init_options(cls)
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        raise TypeError(f"method {method!r} has no option(s) {', '.join(unknown)}; "
                        f"it takes {', '.join(sorted(accepted))}")
    model = cls(backbone, num_classes, **given)
    model.method = method
    built_options(model)  # every option reads back
    return model


def built_options(model):
    """{option: value} the model was built with, read back from it by model.options(): every option of its class, each a
    concrete bool / int / float / str (what result.json and last.pt record)."""
    read = model.options()
    values = {k: read.get(k) for k in init_options(type(model))}
    bad = sorted(k for k, v in values.items() if not isinstance(v, (bool, int, float, str)))
    if bad:
        raise TypeError(f"{type(model).__name__}.options() gives no value for {', '.join(bad)} "
                        f"(got {', '.join(repr(values[k]) for k in bad)}): store each option as an attribute "
                        f"of the same name, or return its value from options()")
    return values
