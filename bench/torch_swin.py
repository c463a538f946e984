"""Swin family for the PyTorch side of `slabformer bench`: PRepBN-Swin-T (softmax window attention,
pure RepBN) and SLAB-Swin-T (SLA over 56×56 windows in stages 1–2, softmax windows in stages 3–4,
PRepBN). The plain Swin-T is timm's (torch_models.create).

Written after the official SLAB code (`classification/models/swin_transformer.py`, the PRepBN Swin, and
`slab_swin.py`, SlabSwinTransformer) with its state-dict key names: `patch_embed.{proj,norm}`,
`layers.{s}.blocks.{i}.{norm1,attn,norm2,mlp}`, `layers.{s}.downsample.{norm,reduction}` (patch merging
at the END of stage s), `norm`, `head`; window attention with `relative_position_bias_table` and the
persistent buffers `relative_position_index` / `attn_mask`.

Window rule (official): a block's window is `window_size` ('L' blocks and every PRepBN-Swin block) or,
for SlabSwin 'S' blocks, 7 if window_size ≤ 56 else 12; if the stage map's shorter side is ≤ the
window, the window becomes that side and the block does not shift; odd blocks shift by window // 2.
So at 224² every SLA stage is one global window (56², 28²); at 448², 896², 1344² stage 1 (and stage 2
from 896²) is partitioned into 56×56 windows with the 28-token cyclic shift in odd blocks, which SLA
ignores the mask of (the official SLA takes no mask). Maps that windows do not divide are padded
with zeros after norm1 and cropped after attention (the official detection backbone's rule; the
classification code needs divisible maps), and odd maps are zero-padded before patch merging.
Deviation: shifted SLA blocks do not hold the official (unused) `attn_mask` buffer — at 1344² it
would be 36×3136×3136 floats.
"""
import torch
import torch.nn.functional as F
from torch import nn

from torch_models import LinearNorm, Mlp, RepBN, identity, merge_heads, official_init, sla_core, split_heads


def window_partition(x, m):
    """(B, H, W, C) → (B·H/m·W/m, m·m, C), windows row-major."""
    b, h, w, c = x.shape
    x = x.view(b, h // m, m, w // m, m, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, m * m, c)


def window_reverse(windows, m, h, w):
    c = windows.shape[-1]
    x = windows.view(-1, h // m, w // m, m, m, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def relative_position_index(m):
    coords = torch.stack(torch.meshgrid(torch.arange(m), torch.arange(m), indexing="ij")).flatten(1)  # (2, m²)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (m - 1)  # (m², m², 2)
    return rel[..., 0] * (2 * m - 1) + rel[..., 1]


def shifted_window_mask(hp, wp, m, s):
    """(nW, m², m²): 0 inside a region, −100 across regions of the padded, shifted map."""
    labels = torch.zeros(1, hp, wp, 1)
    count = 0
    for hs in (slice(0, -m), slice(-m, -s), slice(-s, None)):
        for ws in (slice(0, -m), slice(-m, -s), slice(-s, None)):
            labels[:, hs, ws, :] = count
            count += 1
    windows = window_partition(labels, m).squeeze(-1)  # (nW, m²)
    diff = windows.unsqueeze(1) - windows.unsqueeze(2)
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


class WindowAttention(nn.Module):
    """Softmax attention inside m×m windows with a relative position bias."""

    def __init__(self, dim, window, num_heads, qkv_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x, mask=None):
        b_, n, c = x.shape
        h = self.num_heads
        q, k, v = self.qkv(x).reshape(b_, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(n, n, h).permute(2, 0, 1).unsqueeze(0)  # (1, h, n, n)
        if mask is not None:
            nw = mask.shape[0]
            bias = (bias + mask.unsqueeze(1)).unsqueeze(0).expand(b_ // nw, -1, -1, -1, -1).reshape(b_, h, n, n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # scale head_dim^-0.5
        return self.proj(out.transpose(1, 2).reshape(b_, n, c))


class SimplifiedLinearAttention(nn.Module):
    """SLAB-Swin's SLA over m×m windows (official `slab_swin.SimplifiedLinearAttention`); no mask."""

    def __init__(self, dim, window, num_heads, qkv_bias=True, kernel_size=5):
        super().__init__()
        self.num_heads, self.window = num_heads, window
        d = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.dwc = nn.Conv2d(d, d, kernel_size, padding=kernel_size // 2, groups=d)
        self.positional_encoding = nn.Parameter(torch.zeros(1, window * window, dim))

    def forward(self, x, mask=None):
        b_, n, c = x.shape
        h = self.num_heads
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k = torch.relu(q), torch.relu(k + self.positional_encoding)
        q, k, v = (split_heads(t, h) for t in (q, k, v))
        out = sla_core(q, k, v)
        image = v.transpose(1, 2).reshape(b_ * h, c // h, self.window, self.window)
        out = out + self.dwc(image).flatten(2).transpose(1, 2)
        return self.proj(merge_heads(out, h))


class SwinTransformerBlock(nn.Module):
    def __init__(self, dim, input_resolution, num_heads, window_size, shift_size, mlp_ratio, qkv_bias, norm,
                 attn_type="S", kernel_size=5):
        super().__init__()
        self.input_resolution = input_resolution
        if min(input_resolution) <= window_size:
            window_size, shift_size = min(input_resolution), 0
        self.window_size, self.shift_size = window_size, shift_size
        self.norm1 = norm(dim)
        if attn_type == "L":
            self.attn = SimplifiedLinearAttention(dim, window_size, num_heads, qkv_bias, kernel_size)
        else:
            self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias)
        self.norm2 = norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        hp, wp = (-(-r // window_size) * window_size for r in input_resolution)
        self.padded = (hp, wp)
        mask = shifted_window_mask(hp, wp, window_size, shift_size) if shift_size > 0 and attn_type != "L" else None
        self.register_buffer("attn_mask", mask)

    def forward(self, x):
        h, w = self.input_resolution
        b, n, c = x.shape
        (hp, wp), m, s = self.padded, self.window_size, self.shift_size
        shortcut = x
        x = self.norm1(x).view(b, h, w, c)
        if (hp, wp) != (h, w):
            x = F.pad(x, (0, 0, 0, wp - w, 0, hp - h))
        if s > 0:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
        x = window_reverse(self.attn(window_partition(x, m), mask=self.attn_mask), m, hp, wp)
        if s > 0:
            x = torch.roll(x, shifts=(s, s), dims=(1, 2))
        if (hp, wp) != (h, w):
            x = x[:, :h, :w, :]
        x = shortcut + x.reshape(b, n, c)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2×2 gather [x(2i,2j), x(2i+1,2j), x(2i,2j+1), x(2i+1,2j+1)] → norm(4C) → reduction (4C → 2C);
    `bias`: the deploy form's reduction, which gains a bias when the norm is folded into it."""

    def __init__(self, input_resolution, dim, norm, bias=False):
        super().__init__()
        self.input_resolution = input_resolution
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=bias)
        self.norm = norm(4 * dim)

    def output_resolution(self):
        return tuple(-(-r // 2) for r in self.input_resolution)

    def forward(self, x):
        h, w = self.input_resolution
        b, _, c = x.shape
        x = x.view(b, h, w, c)
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.reshape(b, -1, 4 * c)))


class BasicLayer(nn.Module):
    def __init__(self, dim, input_resolution, depth, num_heads, window_sizes, attn_types, mlp_ratio, qkv_bias, norm,
                 downsample, kernel_size):
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(dim, input_resolution, num_heads, window_sizes[i], 0 if i % 2 == 0 else window_sizes[i] // 2,
                                 mlp_ratio, qkv_bias, norm, attn_types[i], kernel_size)
            for i in range(depth)
        )
        self.downsample = downsample(input_resolution, dim, norm) if downsample is not None else None

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, in_chans, embed_dim, norm):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.norm = norm(embed_dim)

    def forward(self, images):
        return self.norm(self.proj(images).flatten(2).transpose(1, 2))


class SwinTransformer(nn.Module):
    """Official `swin_transformer.SwinTransformer` (the PRepBN Swin; softmax windows of
    `window_size` everywhere). `norm`: the norm factory; `merge_bias`: the deploy form's patch merging."""

    slab_window_rule = False
    default_attn_type = "SSSS"

    def __init__(self, img_size=224, patch_size=4, in_chans=3, num_classes=1000, embed_dim=96, depths=(2, 2, 6, 2),
                 num_heads=(3, 6, 12, 24), window_size=7, mlp_ratio=4.0, qkv_bias=True, patch_norm=True,
                 kernel_size=5, attn_type=None, norm=RepBN, merge_bias=False, **_unused):
        super().__init__()
        attn_type = attn_type or self.default_attn_type
        stages = len(depths)
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, norm if patch_norm else identity)
        resolution = (img_size // patch_size, img_size // patch_size)

        def merging(res, dim, norm):
            return PatchMerging(res, dim, norm, bias=merge_bias)

        self.layers = nn.ModuleList()
        for s in range(stages):
            kind = attn_type[s]
            if self.slab_window_rule and kind == "S":
                window = 7 if window_size <= 56 else 12
            else:
                window = window_size
            layer = BasicLayer(embed_dim * 2**s, resolution, depths[s], num_heads[s], [window] * depths[s],
                               [kind] * depths[s], mlp_ratio, qkv_bias, norm,
                               merging if s < stages - 1 else None, kernel_size)
            self.layers.append(layer)
            if layer.downsample is not None:
                resolution = layer.downsample.output_resolution()
        self.norm = norm(embed_dim * 2 ** (stages - 1))
        self.head = nn.Linear(embed_dim * 2 ** (stages - 1), num_classes)
        official_init(self)

    def forward(self, images):
        x = self.patch_embed(images)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x).mean(dim=1))


class SlabSwinTransformer(SwinTransformer):
    """Official `slab_swin.SlabSwinTransformer`: per-stage 'L' (SLA, window `window_size`) or 'S'
    (softmax, window 7 if window_size ≤ 56 else 12)."""

    slab_window_rule = True
    default_attn_type = "LLLL"


SWIN_T = dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24])
PRESETS = {
    "prepbn_swin_tiny": (SwinTransformer, dict(SWIN_T, window_size=7)),  # swin_t_prepbn.yaml
    "slab_swin_tiny": (SlabSwinTransformer, dict(SWIN_T, window_size=56, attn_type="LLSS")),  # slab_swin_t.yaml
}


def slab_norm(dim):
    return LinearNorm(dim, step=60000, ln_eps=1e-5)


def create(name, deploy, img_size=224):
    """Training form: pure RepBN (PRepBN-Swin-T, T = 0) or PRepBN (SLAB-Swin-T, T = 6e4, LN eps 1e-5).
    Deploy form: every norm folded away — identity, and the patch-merging reductions with a bias."""
    cls, config = PRESETS[name]
    if deploy:
        return cls(img_size=img_size, norm=identity, merge_bias=True, **config)
    return cls(img_size=img_size, norm=RepBN if name == "prepbn_swin_tiny" else slab_norm, **config)
