"""CSwin family for the PyTorch side of `slabformer bench`: CSwin-T (cross-shaped window softmax
attention with LePE, LayerNorm, depths 1-2-21-1) and SLAB-CSwin-T (SLA + LePE in stages 1–2, LePE
softmax in stages 3–4, PRepBN, depths 2-4-18-1).

Written after the structure of the official SLAB code (`classification/models/slab_cswin.py`, itself
the CSWin code with SLA branches) with its state-dict key names: `stage1_conv_embed.{0,2}`,
`stage{s}.{i}.{qkv,norm1,proj,attns.{b},mlp,norm2}`, `merge{1,2,3}.{conv,norm}`, `norm`, `head`.

* Stem: Conv2d(3, C, 7, stride 4, padding 2) → tokens → norm. Merge blocks: Conv2d(C, 2C, 3, stride 2,
  padding 1) → tokens → norm. Maps are square (H = W = img_size/4, /8, /16, /32).
* Block: x + proj(attn(norm1(x))), x + mlp(norm2(x)); qkv = [q | k | v]. ONE branch over all channels
  and heads with a global window when the block is in the last stage or its split equals the map side;
  otherwise two branches on channel halves: vertical stripes (H_sp = side, W_sp = split) on [:C/2],
  horizontal stripes (H_sp = split, W_sp = side) on [C/2:], concatenated.
* LePE branch: softmax(q kᵀ/√d) v + get_v(v), get_v a 3×3 depthwise conv run per stripe.
* SLA branch: k += positional_encoding (1, H_sp·W_sp, dim), ReLU(q), ReLU(k), normalised linear
  attention, + dwc(v) (5×5 depthwise, head_dim channels shared by the heads) + get_v(v) per stripe.
  `scale` is the official unused (1, 1, dim) parameter, kept for the key names and the count.
* 'L' blocks take their split from `la_split_size` ("56-28-14-7" in the released config = each
  stage's map side, i.e. global); `create` sets it to the map sides of the requested img_size.
"""
import torch
import torch.nn.functional as F
from torch import nn

from torch_models import LinearNorm, Mlp, identity, merge_heads, official_init, sla_core, split_heads


def img2windows(img, h_sp, w_sp):
    """(B, C, H, W) → (B·H/h_sp·W/w_sp, h_sp·w_sp, C), windows ordered (b, row, col)."""
    b, c, h, w = img.shape
    x = img.view(b, c, h // h_sp, h_sp, w // w_sp, w_sp).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(-1, h_sp * w_sp, c)


def windows2img(windows, h_sp, w_sp, h, w):
    """(B', h_sp·w_sp, C) → (B, H·W, C)."""
    c = windows.shape[-1]
    x = windows.view(-1, h // h_sp, w // w_sp, h_sp, w_sp, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h * w, c)


def tokens_to_image(x):
    b, n, c = x.shape
    side = int(round(n**0.5))
    return x.transpose(1, 2).reshape(b, c, side, side)


class StripeBranch(nn.Module):
    """What the LePE and SLA branches share: the stripe shape and the per-stripe LePE conv."""

    def __init__(self, dim, resolution, idx, split_size, num_heads):
        super().__init__()
        self.resolution, self.num_heads = resolution, num_heads
        if idx == -1:
            self.h_sp, self.w_sp = resolution, resolution
        elif idx == 0:
            self.h_sp, self.w_sp = resolution, split_size
        else:
            self.h_sp, self.w_sp = split_size, resolution
        self.get_v = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def stripes(self, x):
        """(B, L, C) tokens → (B', h_sp·w_sp, C) stripes."""
        return img2windows(tokens_to_image(x), self.h_sp, self.w_sp)

    def lepe(self, v):
        """v stripes (B', n, C) → get_v run on each stripe as its own image, (B', n, C)."""
        b_, n, c = v.shape
        image = v.transpose(1, 2).reshape(b_, c, self.h_sp, self.w_sp)
        return self.get_v(image).flatten(2).transpose(1, 2)

    def unstripe(self, x):
        return windows2img(x, self.h_sp, self.w_sp, self.resolution, self.resolution)


class LePEAttention(StripeBranch):
    def forward(self, qkv):
        q, k, v = (self.stripes(t) for t in qkv)
        b_, n, c = q.shape
        h = self.num_heads
        lepe = self.lepe(v)
        q, k, v = (t.reshape(b_, n, h, c // h).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b_, n, c)  # scale head_dim^-0.5
        return self.unstripe(out + lepe)


class SimplifiedLinearAttention(StripeBranch):
    def __init__(self, dim, resolution, idx, split_size, num_heads, kernel_size=5):
        super().__init__(dim, resolution, idx, split_size, num_heads)
        d = dim // num_heads
        self.dwc = nn.Conv2d(d, d, kernel_size, padding=kernel_size // 2, groups=d)
        self.scale = nn.Parameter(torch.zeros(1, 1, dim))  # unused, as in the official code
        self.positional_encoding = nn.Parameter(torch.zeros(1, self.h_sp * self.w_sp, dim))

    def forward(self, qkv):
        q, k, v = (self.stripes(t) for t in qkv)
        h = self.num_heads
        lepe = split_heads(self.lepe(v), h)
        q, k = torch.relu(q), torch.relu(k + self.positional_encoding)
        q, k, v = (split_heads(t, h) for t in (q, k, v))
        out = sla_core(q, k, v)
        bh, n, d = v.shape
        out = out + self.dwc(v.transpose(1, 2).reshape(bh, d, self.h_sp, self.w_sp)).flatten(2).transpose(1, 2)
        return self.unstripe(merge_heads(out + lepe, h))


class CSWinBlock(nn.Module):
    def __init__(self, dim, reso, num_heads, split_size, mlp_ratio, qkv_bias, norm, last_stage, attn_type, kernel_size):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.norm1 = norm(dim)
        self.branch_num = 1 if last_stage or reso == split_size else 2
        if self.branch_num == 2 and reso % split_size:
            raise ValueError(f"CSwin stripes of {split_size} do not divide a {reso}×{reso} map (the official code needs them to)")
        self.proj = nn.Linear(dim, dim)
        if attn_type == "L":
            def branch(d, idx, heads):
                return SimplifiedLinearAttention(d, reso, idx, split_size, heads, kernel_size)
        else:
            def branch(d, idx, heads):
                return LePEAttention(d, reso, idx, split_size, heads)
        if self.branch_num == 1:
            self.attns = nn.ModuleList([branch(dim, -1, num_heads)])
        else:
            self.attns = nn.ModuleList(branch(dim // 2, i, num_heads // 2) for i in range(2))
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.norm2 = norm(dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, c).permute(2, 0, 1, 3)
        if self.branch_num == 2:
            mixed = torch.cat([self.attns[0](qkv[..., : c // 2]), self.attns[1](qkv[..., c // 2:])], dim=2)
        else:
            mixed = self.attns[0](qkv)
        x = x + self.proj(mixed)
        return x + self.mlp(self.norm2(x))


class ToTokens(nn.Module):
    """(B, C, H, W) → (B, H·W, C) (the official stem's einops Rearrange, no parameters)."""

    def forward(self, x):
        return x.flatten(2).transpose(1, 2)


class MergeBlock(nn.Module):
    def __init__(self, dim, dim_out, norm):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim_out, 3, 2, 1)
        self.norm = norm(dim_out)

    def forward(self, x):
        return self.norm(self.conv(tokens_to_image(x)).flatten(2).transpose(1, 2))


class CSWinTransformer(nn.Module):
    """Official `slab_cswin.CSWinTransformer` (constructor arguments of the same names; `norm` is the
    norm factory). `patch_size` is ignored, as in the official code."""

    def __init__(self, img_size=224, in_chans=3, num_classes=1000, embed_dim=96, depth=(2, 2, 6, 2),
                 split_size=(1, 2, 7, 7), la_split_size="1-2-7-7", num_heads=(2, 4, 8, 16), mlp_ratio=4.0,
                 qkv_bias=True, kernel_size=5, attn_type="LLLL", norm=nn.LayerNorm, **_unused):
        super().__init__()
        la_split = [int(s) for s in str(la_split_size).split("-")]
        self.stage1_conv_embed = nn.Sequential(nn.Conv2d(in_chans, embed_dim, 7, 4, 2), ToTokens(), norm(embed_dim))
        dim = embed_dim
        for s in range(4):
            if s > 0:
                setattr(self, f"merge{s}", MergeBlock(dim, 2 * dim, norm))
                dim *= 2
            kind = attn_type[s]
            split = la_split[s] if kind == "L" else split_size[s]
            blocks = nn.ModuleList(
                CSWinBlock(dim, img_size // 2 ** (s + 2), num_heads[s], split, mlp_ratio, qkv_bias, norm, s == 3, kind, kernel_size)
                for _ in range(depth[s])
            )
            setattr(self, f"stage{s + 1}", blocks)
        self.norm = norm(dim)
        self.head = nn.Linear(dim, num_classes)
        official_init(self)

    def forward(self, images):
        x = self.stage1_conv_embed(images)
        for s in range(4):
            if s > 0:
                x = getattr(self, f"merge{s}")(x)
            for block in getattr(self, f"stage{s + 1}"):
                x = block(x)
        return self.head(self.norm(x).mean(dim=1))


PRESETS = {
    # CSWin-T (CSWin paper; slabformer's cswin_tiny): LePE softmax everywhere, LayerNorm.
    "cswin_tiny": dict(embed_dim=64, depth=[1, 2, 21, 1], split_size=[1, 2, 7, 7], num_heads=[2, 4, 8, 16], attn_type="SSSS"),
    # SLAB_CSWin_64_24181_tiny_224 with slab_cswin_t.yaml's attn_type LLSS.
    "slab_cswin_tiny": dict(embed_dim=64, depth=[2, 4, 18, 1], split_size=[1, 2, 7, 7], num_heads=[2, 4, 8, 16], attn_type="LLSS"),
}


def layer_norm(dim):
    return nn.LayerNorm(dim)


def slab_norm(dim):
    return LinearNorm(dim, step=120000, ln_eps=1e-5)


def create(name, deploy, img_size=224):
    """CSwin-T keeps its LayerNorms (eps 1e-5) in both forms; SLAB-CSwin-T: PRepBN (T = 1.2e5) while
    training, every norm folded away (identity) in the deploy form."""
    if img_size % 32:
        raise ValueError(f"CSwin needs an img_size divisible by 32, got {img_size}")
    la_split_size = "-".join(str(img_size // 2 ** (s + 2)) for s in range(4))  # each stage's map side
    norm = layer_norm if name == "cswin_tiny" else (identity if deploy else slab_norm)
    return CSWinTransformer(img_size=img_size, norm=norm, la_split_size=la_split_size, **PRESETS[name])
