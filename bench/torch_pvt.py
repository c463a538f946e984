"""PVT v1 family for the PyTorch side of `slabformer bench`: PVT-T (softmax spatial-reduction
attention, LayerNorm) and SLAB-PVT-T (simplified linear attention, PRepBN).

Written after the structure of the official SLAB code (`classification/models/slab_pvt.py`, the
PyramidVisionTransformer that both `pvt_t_prepbn` and `slab_pvt_t` build) with its state-dict key
names: `patch_embed{i}.{proj,norm}`, `pos_embed{i}`, `block{i}.{j}.{norm1,attn,norm2,mlp}`, `head`.
No class token and no final norm: mean over the stage-4 tokens → head (../shared/SPEC.md §4.2).

Attention per stage ('S' / 'L' in `attn_type`):
* 'S' — SRA: q from all N tokens; k, v from the map reduced by an R×R stride-R conv `sr` + `norm`
  (R = sr_ratios[i]); softmax(q kᵀ/√d) v → proj.
* 'L' — SLA: the same q / kv / optional sr+norm (R = la_sr_ratios[i], "1111" in the released
  SLAB-PVT configs, so full resolution), k += positional_encoding (N/R² tokens), ReLU on q and k,
  normalised linear attention, + a 5×5 depthwise conv of v (head_dim channels shared by all heads; v
  linearly interpolated back to N tokens first when R > 1) → proj.
"""
import torch
import torch.nn.functional as F
from torch import nn

from torch_models import LinearNorm, Mlp, identity, merge_heads, official_init, sla_core, split_heads


class PatchEmbed(nn.Module):
    def __init__(self, patch, in_chans, dim, norm):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch, stride=patch)
        self.norm = norm(dim)

    def forward(self, images):
        x = self.proj(images)
        hw = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), hw


class SpatialReduction(nn.Module):
    """q / kv projections and the optional R×R reduction of the map that k and v come from."""

    def __init__(self, dim, num_heads, sr_ratio, norm, qkv_bias):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio)
            self.norm = norm(dim)

    def keys_values(self, x, hw):
        """(B, N, C) → k, v (B, N/R², C) each."""
        if self.sr_ratio > 1:
            b, n, c = x.shape
            x = self.sr(x.transpose(1, 2).reshape(b, c, *hw)).flatten(2).transpose(1, 2)
            x = self.norm(x)
        return self.kv(x).chunk(2, dim=-1)


class Attention(SpatialReduction):
    """PVT's softmax spatial-reduction attention."""

    def forward(self, x, hw):
        b, n, c = x.shape
        h = self.num_heads
        q = self.q(x).reshape(b, n, h, c // h).transpose(1, 2)
        k, v = (t.reshape(b, -1, h, c // h).transpose(1, 2) for t in self.keys_values(x, hw))
        out = F.scaled_dot_product_attention(q, k, v)  # scale head_dim^-0.5, as the official code
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class SimplifiedLinearAttention(SpatialReduction):
    """SLAB-PVT's SLA (official `slab_pvt.SimplifiedLinearAttention`)."""

    def __init__(self, dim, num_patches, num_heads, sr_ratio, norm, qkv_bias, kernel_size=5):
        super().__init__(dim, num_heads, sr_ratio, norm, qkv_bias)
        d = dim // num_heads
        self.dwc = nn.Conv2d(d, d, kernel_size, padding=kernel_size // 2, groups=d)
        self.positional_encoding = nn.Parameter(torch.zeros(1, num_patches // (sr_ratio * sr_ratio), dim))

    def forward(self, x, hw):
        b, n, c = x.shape
        h = self.num_heads
        k, v = self.keys_values(x, hw)
        q, k = torch.relu(self.q(x)), torch.relu(k + self.positional_encoding)
        q, k, v = (split_heads(t, h) for t in (q, k, v))
        out = sla_core(q, k, v)
        if self.sr_ratio > 1:
            v = F.interpolate(v.transpose(1, 2), size=n, mode="linear").transpose(1, 2)
        image = v.transpose(1, 2).reshape(b * h, c // h, *hw)
        out = out + self.dwc(image).flatten(2).transpose(1, 2)
        return self.proj(merge_heads(out, h))


class Block(nn.Module):
    def __init__(self, dim, num_patches, num_heads, mlp_ratio, qkv_bias, norm, sr_ratio, attn_type, kernel_size):
        super().__init__()
        self.norm1 = norm(dim)
        if attn_type == "L":
            self.attn = SimplifiedLinearAttention(dim, num_patches, num_heads, sr_ratio, norm, qkv_bias, kernel_size)
        else:
            self.attn = Attention(dim, num_heads, sr_ratio, norm, qkv_bias)
        self.norm2 = norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, hw):
        x = x + self.attn(self.norm1(x), hw)
        return x + self.mlp(self.norm2(x))


class PyramidVisionTransformer(nn.Module):
    """Official `slab_pvt.PyramidVisionTransformer` (constructor arguments of the same names;
    `norm` is the norm-layer factory, dim → module)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dims=(64, 128, 256, 512),
                 num_heads=(1, 2, 4, 8), mlp_ratios=(4, 4, 4, 4), qkv_bias=False, depths=(3, 4, 6, 3),
                 sr_ratios=(8, 4, 2, 1), la_sr_ratios="8421", num_stages=4, kernel_size=5, attn_type="LLLL",
                 norm=nn.LayerNorm, **_unused):
        super().__init__()
        self.num_stages = num_stages
        for i in range(num_stages):
            if i == 0:
                patch_embed = PatchEmbed(patch_size, in_chans, embed_dims[0], norm)
                side = img_size // patch_size
            else:
                patch_embed = PatchEmbed(2, embed_dims[i - 1], embed_dims[i], norm)
                side = img_size // 2 ** (i + 1) // 2
            num_patches = side * side
            sr = sr_ratios[i] if attn_type[i] == "S" else int(str(la_sr_ratios)[i])
            blocks = nn.ModuleList(
                Block(embed_dims[i], num_patches, num_heads[i], mlp_ratios[i], qkv_bias, norm, sr, attn_type[i], kernel_size)
                for _ in range(depths[i])
            )
            setattr(self, f"patch_embed{i + 1}", patch_embed)
            setattr(self, f"pos_embed{i + 1}", nn.Parameter(torch.zeros(1, num_patches, embed_dims[i])))
            setattr(self, f"block{i + 1}", blocks)
        self.head = nn.Linear(embed_dims[num_stages - 1], num_classes)
        official_init(self)
        for i in range(num_stages):
            nn.init.trunc_normal_(getattr(self, f"pos_embed{i + 1}"), std=0.02)

    def forward(self, images):
        x = images
        for i in range(self.num_stages):
            x, (h, w) = getattr(self, f"patch_embed{i + 1}")(x)
            pos = getattr(self, f"pos_embed{i + 1}")
            if pos.shape[1] != h * w:  # the official code's resize of the stage's embedding
                side = int(pos.shape[1] ** 0.5)
                pos = F.interpolate(pos.reshape(1, side, side, -1).permute(0, 3, 1, 2), size=(h, w), mode="bilinear")
                pos = pos.flatten(2).transpose(1, 2)
            x = x + pos  # (the official same-size bilinear resize of stages 2–4 is the identity)
            for block in getattr(self, f"block{i + 1}"):
                x = block(x, (h, w))
            if i != self.num_stages - 1:
                b, _, c = x.shape
                x = x.reshape(b, h, w, c).permute(0, 3, 1, 2)
        return self.head(x.mean(dim=1))


def layer_norm(dim):
    return nn.LayerNorm(dim, eps=1e-6)


def prepbn(dim):
    return LinearNorm(dim, step=300000, ln_eps=1e-6)


PVT_T = dict(patch_size=4, embed_dims=[64, 128, 320, 512], num_heads=[1, 2, 5, 8], mlp_ratios=[8, 8, 4, 4],
             qkv_bias=True, depths=[2, 2, 2, 2], sr_ratios=[8, 4, 2, 1])
PRESETS = {
    # `pvt_t_prepbn.yaml`'s builder with LayerNorm: softmax SRA everywhere.
    "pvt_tiny": dict(PVT_T, attn_type="SSSS"),
    # `slab_pvt_t.yaml`: SLA in every stage at full resolution (config default la_sr_ratios 1111).
    "slab_pvt_tiny": dict(PVT_T, attn_type="LLLL", la_sr_ratios="1111"),
}


def create(name, deploy, img_size=224):
    """PVT-T keeps its LayerNorms in both forms; SLAB-PVT-T: PRepBN (T = 3e5) while training, every
    norm folded away (identity) in the deploy form."""
    if name == "pvt_tiny":
        norm = layer_norm
    else:
        norm = identity if deploy else prepbn
    return PyramidVisionTransformer(img_size=img_size, norm=norm, **PRESETS[name])
