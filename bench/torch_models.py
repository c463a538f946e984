"""PyTorch eager versions of the benchmarked models, for `slabformer bench`.

DeiT-T, Swin-T and the mobile hybrids (MobileViT v1/v2, EfficientFormer v1/V2) are timm's. The
hierarchical backbones (PVT-T, SLAB-PVT-T, PRepBN/SLAB-Swin-T,
CSwin-T, SLAB-CSwin-T) are in torch_pvt.py, torch_swin.py and torch_cswin.py, written after the
official SLAB code's structure and key names (check_torch_models.py checks them against the golden
files). PRepBN-DeiT-T is timm's VisionTransformer with its norms swapped: identity in the
deploy form (every RepBN folded away), RepBN while training. SLAB-DeiT-T (simplified linear
attention, mean pool, PRepBN) is written here after the SLAB paper's code and ../shared/SPEC.md §3:
q ← ReLU(q), k ← ReLU(k + P), O = Q(KᵀV) ⊙ z with z = 1/(q·Σk + 1e-6), plus a 5×5 depthwise conv
on V shared by all heads.
"""
import importlib
import os
import sys

import timm
import torch
from torch import nn
from timm.models.vision_transformer import VisionTransformer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


class RepBN(nn.Module):
    """BatchNorm over tokens plus α·x (SLAB's RepBN)."""

    def __init__(self, dim, **_):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1))
        self.bn = nn.BatchNorm1d(dim)

    def forward(self, x):
        x = x.transpose(1, 2)
        x = self.bn(x) + self.alpha * x
        return x.transpose(1, 2)


class LinearNorm(nn.Module):
    """PRepBN: λ·LayerNorm + (1 − λ)·RepBN while training, λ decaying linearly over `step` calls.

    `ln_eps`: the LayerNorm's eps (1e-6 in SLAB-DeiT/PVT, the nn.LayerNorm default 1e-5 in SLAB-Swin/CSwin)."""

    def __init__(self, dim, warm=0, step=60000, ln_eps=1e-6, **_):
        super().__init__()
        self.register_buffer("warm", torch.tensor(warm))
        self.register_buffer("iter", torch.tensor(step))
        self.register_buffer("total_step", torch.tensor(step))
        self.norm1 = nn.LayerNorm(dim, eps=ln_eps)
        self.norm2 = RepBN(dim)

    def forward(self, x):
        if not self.training:
            return self.norm2(x)
        if self.warm > 0:
            self.warm.copy_(self.warm - 1)
            return self.norm1(x)
        lam = self.iter / self.total_step
        if self.iter > 0:
            self.iter.copy_(self.iter - 1)
        return lam * self.norm1(x) + (1 - lam) * self.norm2(x)


def sla_core(q, k, v):
    """SLA's normalised ReLU-kernel attention on (B·h, N, d) heads, q and k already ReLU'd:
    (q Σ_j k_j v_jᵀ) / (q · Σ_j k_j + 1e-6), kv-first when that is cheaper (the official rule)."""
    i, j, c, d = q.shape[-2], k.shape[-2], k.shape[-1], v.shape[-1]
    z = 1 / (q @ k.sum(dim=-2, keepdim=True).transpose(-2, -1) + 1e-6)  # (B·h, N, 1)
    if i * j * (c + d) > c * d * (i + j):
        return (q @ (k.transpose(-2, -1) @ v)) * z
    return ((q @ k.transpose(-2, -1)) @ v) * z


def split_heads(x, heads):
    """(B, N, h·d) → (B·h, N, d), channel = head·d + e."""
    b, n, c = x.shape
    return x.reshape(b, n, heads, c // heads).transpose(1, 2).reshape(b * heads, n, c // heads)


def merge_heads(x, heads):
    """(B·h, N, d) → (B, N, h·d)."""
    bh, n, d = x.shape
    return x.reshape(bh // heads, heads, n, d).transpose(1, 2).reshape(bh // heads, n, heads * d)


def official_init(module):
    """The official code's init: Linear weights trunc-normal(0.02), zero biases; LayerNorm 1 / 0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return module


class SimplifiedLinearAttention(nn.Module):
    def __init__(self, dim, num_heads, tokens, kernel_size=5):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.positional_encoding = nn.Parameter(torch.zeros(1, tokens, dim))
        d = dim // num_heads
        self.dwc = nn.Conv2d(d, d, kernel_size, padding=kernel_size // 2, groups=d)

    def forward(self, x):
        b, n, c = x.shape
        h, d = self.num_heads, c // self.num_heads
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k = torch.relu(q), torch.relu(k + self.positional_encoding)
        q, k, v = (t.reshape(b, n, h, d).transpose(1, 2) for t in (q, k, v))  # (B, h, N, d)
        z = 1 / (q @ k.sum(dim=-2, keepdim=True).transpose(-2, -1) + 1e-6)  # (B, h, N, 1)
        out = (q @ (k.transpose(-2, -1) @ v)) * z
        side = int(n**0.5)
        image = v.reshape(b * h, n, d).transpose(1, 2).reshape(b * h, d, side, side)
        out = out + self.dwc(image).reshape(b, h, d, n).transpose(2, 3)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SlabBlock(nn.Module):
    def __init__(self, dim, num_heads, tokens, norm):
        super().__init__()
        self.norm1, self.attn = norm(dim), SimplifiedLinearAttention(dim, num_heads, tokens)
        self.norm2, self.mlp = norm(dim), Mlp(dim, 4 * dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SlabDeiT(nn.Module):
    def __init__(self, norm, img_size=224, patch=16, dim=192, depth=12, heads=3, classes=1000):
        super().__init__()
        tokens = (img_size // patch) ** 2
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.Sequential(*[SlabBlock(dim, heads, tokens, norm) for _ in range(depth)])
        self.norm = norm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, images):
        x = self.patch_embed(images).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, C)
        x = self.norm(self.blocks(x))
        return self.head(x.mean(dim=1))


def identity(*_, **__):
    return nn.Identity()


def fused_attention(model):
    """Switches timm's window attention to F.scaled_dot_product_attention (timm leaves it off for
    Swin as 'experimental'), as every other softmax attention here runs: timm's DeiT by default, and
    the PVT / Swin / CSwin modules of torch_pvt, torch_swin, torch_cswin."""
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = True
    return model


# The mobile hybrids timm has (Mobile-Former is not in timm).
TIMM_MOBILE = ("mobilevit_", "mobilevitv2_", "efficientformer_", "efficientformerv2_")


def create(name, deploy, img_size=224):
    """The model `name` of slabformer's presets for `img_size`² inputs; `deploy`: the fused, norm-free form."""
    if name == "deit_tiny":
        return timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=img_size)
    if name == "prepbn_deit_tiny":
        return VisionTransformer(img_size=img_size, embed_dim=192, depth=12, num_heads=3, norm_layer=identity if deploy else RepBN)
    if name == "slab_deit_tiny":
        return SlabDeiT(identity if deploy else LinearNorm, img_size=img_size)
    if name.startswith(TIMM_MOBILE):
        # timm's own modules at their default input size (the presets' too; `img_size` is the
        # input's, these take any or only that one); `deploy` changes nothing: timm's eval mode
        # runs each BatchNorm as it is, unfolded — what a PyTorch user of these models runs.
        return timm.create_model(name, pretrained=False)
    if name == "swin_tiny":
        return fused_attention(timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=img_size))
    for module in ("torch_pvt", "torch_swin", "torch_cswin"):
        family = importlib.import_module(module)
        if name in family.PRESETS:
            return family.create(name, deploy, img_size)
    raise ValueError(f"unknown model {name}")
