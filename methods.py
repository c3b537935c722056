"""
Prompt tuning methods on a frozen ViT (models.VisionTransformer), one class each:

    Linear  linear probe: only the head
    Full    full fine-tuning: every parameter
    VPT     Visual Prompt Tuning (Jia et al., ECCV 2022), official code KMnP/vpt
    SPT     Self-Prompt Tuning (Wang et al., ICML 2024), official code WangYZ1608/Self-Prompt-Tuning
    LSPT    Long-term Spatial Prompt Tuning (Mo et al., 2024), no official code: reference/gapt_lspt.md §3.5
    SA2VP   Spatially Aligned-and-Adapted Visual Prompt (Pei et al., AAAI 2024), official code tommy-xq/SA2VP

`build_model(method, backbone, num_classes, **options)` is the one entry point. After it,
requires_grad is True exactly on the tuned parameters. `model(x)` gives the logits used for
prediction, `model.loss(x, y)` the training loss. Token order is always [cls, prompts, patches];
prompts never get a position embedding.
"""

import inspect
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from models import pool

# -----------------------------------------------------------------------------
# shared pieces


def vpt_head(dim, num_classes):
    """VPT / GaPT head: Kaiming-normal (fan_out) weight, bias -ln((1-0.01)/0.01) ('prior 0.01')."""
    head = nn.Linear(dim, num_classes)
    nn.init.kaiming_normal_(head.weight, a=0, mode='fan_out')
    nn.init.constant_(head.bias, -math.log((1 - 0.01) / 0.01))
    return head


def prompt_init_bound(backbone):
    """VPT's uniform init bound: xavier with the prompt seen as a patch-embedding output,
    v = sqrt(6 / (3*patch^2 + D)) = 0.0625 for ViT-B/16."""
    return math.sqrt(6.0 / (3 * backbone.patch_size ** 2 + backbone.embed_dim))


class Tuner(nn.Module):
    """Base class: holds the frozen backbone and keeps it in eval mode while training (VPT, SPT,
    GaPT/LSPT all override train() so; SA²VP opts out to keep the official dropout)."""

    backbone_train_mode = False
    grad_checkpointing = False  # see set_grad_checkpointing

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

    def set_grad_checkpointing(self, enable=True):
        """Activation checkpointing of the backbone blocks (timm's method name): each block's activations
        are recomputed in backward instead of stored, for ViT-L/H and large batches. Every method calls its
        blocks through `block_call`, and prompts are inserted outside it, so all prompts (VPT's per-block
        sets, LSPT's recurrence, SA²VP's two pathways) are still there; a checkpointed branch that ran the
        plain backbone blocks would silently drop VPT's deep prompts. The gradients are unchanged."""
        self.grad_checkpointing = enable
        return self

    def block_call(self, fn, *args):
        """fn(*args), checkpointed when grad checkpointing is on and autograd records. Non-reentrant
        torch.utils.checkpoint saves the RNG state and restores it for the recomputation, so dropout inside
        fn (SA²VP's) draws the same masks twice and the global RNG ends where it would without it."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)


def tuned_state_dict(model):
    """Only the tuned tensors (what a checkpoint of this codebase holds)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in names}


# -----------------------------------------------------------------------------
# baselines


class Linear(Tuner):
    """Linear probe: frozen features (the backbone's readout, SPEC §3) and a VPT-initialised head."""

    def __init__(self, backbone, num_classes, readout=None):
        super().__init__(backbone)
        self.readout = readout or backbone.readout
        self.head = vpt_head(backbone.embed_dim, num_classes)

    def backbone_features(self, x):
        """The plain backbone's readout: (B, 3, H, W) -> (B, D)."""
        t = self.backbone.embed(x)
        for blk in self.backbone.blocks:
            t = self.block_call(blk, t)
        return pool(self.backbone, t, self.readout)

    def features(self, x):
        with torch.no_grad():  # nothing before the head is tuned
            return self.backbone_features(x)

    def forward(self, x):
        return self.head(self.features(x))


class Full(Linear):
    """Full fine-tuning: the same model as the linear probe, every parameter tuned."""
    backbone_train_mode = True

    def __init__(self, backbone, num_classes, readout=None):
        super().__init__(backbone, num_classes, readout)
        for p in self.parameters():
            p.requires_grad_(True)

    def features(self, x):
        return self.backbone_features(x)


# -----------------------------------------------------------------------------
# VPT


class VPT(Tuner):
    """Visual Prompt Tuning. Official code: KMnP/vpt src/models/vit_prompt/vit.py
    (incorporate_prompt, forward_deep_prompt) and vit_mae.py / vit_moco.py.

    shallow: P prompts after cls before block 0, carried through every block.
    deep:    a new set of P before every block, *replacing* the previous block's prompt outputs
             (12 sets; VPT stores them as 1 + 11).
    Init U(-v, v), v = sqrt(6/(3 p^2 + D)); prompt dropout after the batch expand (an independent
    mask per sample and per insertion); head: Kaiming fan_out, bias -ln 99.
    Paper/code: the official MAE readout replaces the pretrained norm with a fresh frozen LN
    (readout='mean-ln' here); the default MAE readout of this codebase is GaPT/SPT's 'mean'."""

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
        for i, blk in enumerate(self.backbone.blocks):
            if i == 0:
                x = self.insert(x, 0, replace=False)
            elif self.deep:
                x = self.insert(x, i, replace=True)
            x = self.block_call(blk, x)                                       # (B, 1+P+N, D)
        return pool(self.backbone, x, self.readout)

    def forward(self, x):
        return self.head(self.features(x))


# -----------------------------------------------------------------------------
# SPT


class SPT(VPT):
    """Self-Prompt Tuning: VPT's structure (no prompt dropout) with prompts initialised from the
    frozen backbone's own tokens on the training images (paper §4, official train.py:
    prompt_generator). The prompts for block i come from the patch tokens entering block i of the
    prompt-free backbone; for block 0, as in the official code, the patch-embedding output
    *without* position embedding (the paper says with). Call `init_prompts(loader)` before training.

    Strategies (`spt_init`):
      random   P tokens uniformly without replacement from all images' tokens of that layer.
      mean/max per image, 1-D raster windows of w = N // (P-1) tokens for p < P-1 and a last
               window of the last N mod w tokens (all N if N mod w == 0), pooled: P tokens per
               image; then P of the P x images pooled tokens at random (the official code; the
               paper describes one batch pooled with one kernel).
      kmeans   P centroids of a bounded random subsample of the layer's tokens (k-means++ seeding,
               batched Lloyd iterations in torch). The paper's best variant; its code only loads
               precomputed centroid files.
    Streaming: images go through in loader batches; per layer only a bounded reservoir of tokens
    is kept (P for random/mean/max, `spt_kmeans_tokens` for kmeans), never all tokens of all layers
    (the official code holds ~55 GB for CUB). Shallow SPT applies the strategy to block 0's tokens
    (the official code always samples random patch-embedding tokens there).
    Head: trunc-normal std 0.02 (0.01 for MoCo v3), zero bias."""

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
        """Initialise the prompts from the training images in `loader` (eval transform).
        kmeans streams the whole loader once, keeping a bounded reservoir of tokens per layer.
        random/mean/max need only P tokens per layer: when the loader has a `.dataset`, P distinct
        training images are drawn and prompt k of every layer is a uniformly drawn token (or pooled
        window) of image k, so each prompt is a uniform draw from all the layer's tokens, as in the
        official code, at the cost of a forward over P images instead of an epoch. Any other
        iterable of (x, y) batches is streamed through a reservoir."""
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
        if len(ds) >= P:  # P distinct images for all layers (as the official code's one image sample),
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
    """A uniform random sample without replacement of at most `size` rows from a stream: every row
    gets a random key and the `size` smallest keys are kept (so the result does not depend on
    batching, and memory stays at `size` rows)."""

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
    """SPT's official pooling: (B, N, D) -> (B, P, D). Windows [p*w, (p+1)*w) for p < P-1 with
    w = N // (P-1), and a last window of the last N mod w tokens (all N when that is 0)."""
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
    """k-means on the rows of x (M, D): greedy k-means++ seeding, then Lloyd iterations until no
    assignment changes or the centroids move less than scikit-learn's tolerance (tol times the mean
    per-dimension variance); the best of n_init runs (default 1, as scikit-learn's for k-means++).
    Runs on x's device. Returns (centroids, inertia)."""
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
        # greedy k-means++ (as scikit-learn): 2 + ln k candidates drawn with probability
        # proportional to D(x)^2, keep the one that lowers the total D^2 the most
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


# -----------------------------------------------------------------------------
# LSPT


class LSPT(Tuner):
    """Long-term Spatial Prompt Tuning (Mo et al. 2024; no official code). Implements the reading
    of reference/gapt_lspt.md §3.5: VPT-deep prompt sets P^0..P^{L-1} (12 for ViT-B).
    Block 1 takes P^0 directly; after each block l = 1..L-1:
        GSPC (Eq. 3):  H = (prompt outputs of block l) + mean of block l's output patch tokens
        LPC  (Eq. 4-5): (h, C^l) = LSTMCell(input = dropout(P^l), hidden = H, cell = C^{l-1}),
                        one cell shared by all blocks, C^0 = 0; h replaces the prompt slots.
    Rows of the cell are (batch x prompt) pairs: the recurrence runs over depth, not tokens.
    Nothing after the last block. Readout as the backbone's (MAE: mean of prompts + patches, then
    the pretrained norm, as GaPT). Head, init and prompt dropout 0.1 as VPT.
    Ablations: lspt_gspc mean|kmeans|none, lspt_lpc lstm|gru|none (none: the new prompt set, plus
    the patch mean if GSPC is on, replaces the slots; with both none this is VPT-deep).
    Known gaps: the paper gives no optimiser, lr or P; defaults follow GaPT (SGD, P=100)."""

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

    def new_prompts(self, l, B):
        """Prompt set l for a batch: (B, P, D), or (1, P, D) when dropout is inactive (then the
        LSTM's input projection is computed once, not per image)."""
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
        h = torch.sigmoid(o) * torch.tanh(C)                                   # X_P^{l+1}
        return h, C

    def features(self, x):
        x = self.backbone.embed(x)                                            # (B, 1+N, D)
        B, P, L = x.shape[0], self.num_prompts, len(self.backbone.blocks)
        cls, X = x[:, :1], x[:, 1:]
        xp = self.new_prompts(0, B).expand(B, -1, -1)                         # X_P^1 = P^0
        C = x.new_zeros(B, P, x.shape[-1])                                    # C^0 = 0
        for l, blk in enumerate(self.backbone.blocks):
            y = self.block_call(blk, torch.cat([cls, xp, X], dim=1))          # (B, 1+P+N, D)
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
    """LSPT's k-means GSPC (Table 6): per image, k centroids of its patch tokens, initialised at k
    evenly spaced patches, `iters` Lloyd steps without gradient, then one differentiable step
    (centroid = mean of its assigned tokens; an empty cluster keeps its previous centroid).
    patches (B, N, D) -> (B, k, D)."""
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


# -----------------------------------------------------------------------------
# SA²VP

# (t, gamma) per dataset: reference/sa2vp.md §10 (the official README's per-dataset knobs)
SA2VP_SETTINGS = {
    'cub': (16, 0.1), 'nabirds': (32, 0.1), 'flowers': (8, 0.1), 'dogs': (32, 0.1), 'cars': (64, 1.5),
    # VTAB Natural: t 8, gamma 0.1 (SVHN 16 / 0.5)
    **{f'vtab-{n}': (8, 0.1) for n in ('cifar', 'caltech101', 'dtd', 'oxford_flowers102', 'oxford_iiit_pet', 'sun397')},
    'vtab-svhn': (16, 0.5),
    # VTAB Specialized: t 16, gamma 1.5 (Resisc45 0.5)
    **{f'vtab-{n}': (16, 1.5) for n in ('patch_camelyon', 'eurosat', 'diabetic_retinopathy')},
    'vtab-resisc45': (16, 0.5),
    # VTAB Structured: t 32, gamma 1.5 (dSprites-ori 16 / 0.1, sNORB-ele 0.5)
    **{f'vtab-{n}': (32, 1.5) for n in ('clevr_count', 'clevr_dist', 'dmlab', 'kitti', 'dsprites_loc', 'smallnorb_azi')},
    'vtab-dsprites_ori': (16, 0.1), 'vtab-smallnorb_ele': (32, 0.5),
}
SA2VP_DEFAULT = (16, 0.1)  # the committed code's values, for any other data


def window_mask(grid, c):
    """SA²VP's spatially aligned neighbourhoods as a (1+N, 1+N) boolean mask (True = attend):
    row 0 (the cls slot) sees every token; patch (r, s) sees the patches within a c x c window
    centred on (r, s), clipped at the borders, and never token 0."""
    h, w = grid
    r = torch.arange(h * w) // w
    s = torch.arange(h * w) % w
    near = ((r[:, None] - r[None]).abs() <= c // 2) & ((s[:, None] - s[None]).abs() <= c // 2)
    m = torch.zeros(1 + h * w, 1 + h * w, dtype=torch.bool)
    m[0] = True
    m[1:, 1:] = near
    return m


class Adapter(nn.Module):
    """SA²VP's adapter after each cross-attention: LN -> Linear(D, t) -> GELU -> dropout ->
    Linear(t, D) -> dropout, no residual (official Mlp_small; the paper's Eq. 3 says ReLU)."""

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
    """SA²VP, reproducing the function of the official tommy-xq/SA2VP vit_tinypara.py
    (reference/sa2vp.md §3-7, checklist §15). A prompt pathway of 1+N tokens (a low-rank map
    ppt (1+N, t) -> Linear(t, D), plus the frozen pos-embed, then dropout) runs through the same
    frozen blocks as the image (base) pathway. At layer l one spatially aligned cross-attention,
    re-using block l's norm1, qkv and proj, reads the two layer inputs; its adapter output is added
    x gamma to block l's output of one pathway: the prompt queries the base at layers {0, 4, 8},
    the base queries the prompt elsewhere. Deep prompt maps at layers 4 and 8 go through block l
    and are scaled by e_k. Window c x c clipped at the borders; the cls slot attends globally; patch
    queries never see token 0. One shared head on token 0 of each pathway after the shared final
    norm; loss = lambda CE(base) + (1 - lambda) CE(prompt); predictions use the base logits.

    Fast and exact: each stream's norm1 + qkv is computed once per layer and shared by its
    self-attention and the cross-attention (identical frozen copies in the official code), and the
    window attention is one masked scaled_dot_product_attention (the official code loops in Python
    over the 196 queries: 4.8 s vs 0.18 s per call, ViT-B batch 8, CPU).

    Paper vs code (we follow the code): GELU not ReLU in the adapter; low-rank prompt maps with a
    learned cls slot; one direction per layer; fusion as a parallel branch; gamma fixed per dataset
    and applied both ways; deep maps pass through block l, carry no pos-embed, e_k ~ N(0, 0.02^2);
    dropout 0.1 live in the frozen backbone while training (sa2vp_dropout=False turns it off);
    the head bias keeps PyTorch's default init. The official c is fixed at 3 (sa2vp_window)."""

    backbone_train_mode = True
    B2P = (0, 4, 8)     # layers where the prompt queries the base
    DEEP = (4, 8)       # layers with a new deep prompt map (those the backbone has)

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
        self.deep_scale = nn.Parameter(torch.randn(len(self.deep_layers), D) * 0.02)                  # e_k ('cross_conv')
        self.deep_ppt = nn.Parameter(nn.init.trunc_normal_(torch.empty(len(self.deep_layers), 1, N1, t), std=0.02))
        self.deep_proj = nn.ModuleList([nn.Linear(t, D) for _ in self.deep_layers])
        for fc in [self.ppt_proj, *self.deep_proj]:
            nn.init.xavier_uniform_(fc.weight)
            nn.init.normal_(fc.bias, std=1e-6)
        self.drop = nn.Dropout(drop)    # after the prompt embedding and after the cross-attention's proj
        self.head = nn.Linear(D, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        self.register_buffer('mask', window_mask(backbone.grid, sa2vp_window), persistent=False)

    def prompt_map(self):
        """The layer-0 prompt map before the position embedding: (1, 1+N, D)."""
        return self.ppt_proj(self.ppt)

    def layer(self, l, h, p):
        """One fused layer: both pathways through block l and the cross-attention between them."""
        blk = self.backbone.blocks[l]
        attn = blk.attn
        qh, kh, vh = attn.split_qkv(blk.norm1(h))                             # each (B, H, 1+N, d)
        qp, kp, vp = attn.split_qkv(blk.norm1(p))
        b2p = l in self.B2P
        mask = self.mask
        if b2p:   # the prompt queries the base
            cross = F.scaled_dot_product_attention(qp, kh, vh, attn_mask=mask)
        else:     # the base queries the prompt
            cross = F.scaled_dot_product_attention(qh, kp, vp, attn_mask=mask)
        cross = (p if b2p else h) + self.drop(attn.proj(attn.merge_heads(cross)))  # residual: raw query tokens
        f = self.adapters[l](cross)                                           # (B, 1+N, D)
        h = h + attn.proj(attn.merge_heads(F.scaled_dot_product_attention(qh, kh, vh)))
        h = h + blk.mlp(blk.norm2(h))                                         # Block_l(h)
        p = p + attn.proj(attn.merge_heads(F.scaled_dot_product_attention(qp, kp, vp)))
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


# -----------------------------------------------------------------------------

METHODS = {'linear': Linear, 'full': Full, 'vpt': VPT, 'spt': SPT, 'lspt': LSPT, 'sa2vp': SA2VP}


def build_model(method, backbone, num_classes, **options):
    """Wrap a backbone (models.create_backbone) for a method. Options are the CLI flags with _ for
    -, e.g. prompts=50, depth='deep', prompt_dropout=0.1, spt_init='kmeans', lspt_gspc='mean',
    lspt_lpc='lstm', sa2vp_dim=16, sa2vp_gamma=0.1, readout='mean-ln'. An option set to None means
    the method's default; an option the method does not have is an error."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    cls = METHODS[method]
    given = {k: v for k, v in options.items() if v is not None}
    accepted = set(inspect.signature(cls.__init__).parameters) - {'self', 'backbone', 'num_classes'}
    unknown = sorted(set(given) - accepted)
    if unknown:
        raise TypeError(f"method {method!r} has no option(s) {', '.join(unknown)}; it takes {', '.join(sorted(accepted))}")
    model = cls(backbone, num_classes, **given)
    model.method = method
    return model
