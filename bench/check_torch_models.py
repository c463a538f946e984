"""Checks the PyTorch bench models of the hierarchical families against the golden files.

usage: check_torch_models.py [--golden DIR] [--slabformer BIN] [--sweep]

For every golden file of the PVT / Swin / CSwin families (../shared/golden, README there): builds our
class (torch_pvt / torch_swin / torch_cswin, timm for plain Swin) from the file's `config.ctor`, loads
`param.*` with load_state_dict(strict=True), runs the file's procedure (train forward + gradients of
sum(output · loss_weight), state after it, eval forward; or the single layer forward) and compares
with the stored tensors: max|a − b| ≤ 1e-4 + 1e-4·max|b| for outputs and state, 1e-3 + 1e-4·max|b| for
gradients, integer buffers exactly. Prints PASS/FAIL per file (exit status 1 on any FAIL).
Then, per preset at 224², the parameter count of the training form (and of the deploy form) beside
`slabformer info --model NAME`'s, and a batch-1 forward of both forms. --sweep also builds and runs
the SLAB-Swin-T deploy form at 448², 896², 1344² (the bench's resolution sweep).
"""
import argparse
import json
import os
import re
import subprocess
import sys

import torch
from safetensors import safe_open

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import torch_cswin  # noqa: E402
import torch_models  # noqa: E402
import torch_pvt  # noqa: E402
import torch_swin  # noqa: E402
from torch_models import LinearNorm, RepBN  # noqa: E402

PRESETS = ["pvt_tiny", "slab_pvt_tiny", "swin_tiny", "prepbn_swin_tiny", "slab_swin_tiny", "cswin_tiny", "slab_cswin_tiny"]


class Golden:
    def __init__(self, path):
        self.file = safe_open(path, "pt")
        self.keys = list(self.file.keys())
        self.config = json.loads(self.file.metadata()["config"])

    def get(self, key):
        return self.file.get_tensor(key)

    def group(self, prefix):
        return {k[len(prefix):]: self.file.get_tensor(k) for k in self.keys if k.startswith(prefix)}

    def norm_factory(self):
        """LinearNorm as the file's norm_layer describes it (LN eps, warm, step)."""
        desc = self.config["norm_layer"]
        eps = float(re.search(r"eps=?\s*\(?([0-9.e-]+)", desc["norm1"]).group(1)) if "eps" in desc["norm1"] else 1e-5
        return lambda dim: LinearNorm(dim, warm=desc.get("warm", 0), step=desc["step"], ln_eps=eps)


class Report:
    def __init__(self):
        self.worst = 0.0  # max over compared tensors of |Δ| / tolerance
        self.failures = []
        self.count = 0

    def compare(self, name, ours, ref, grad=False):
        ours = ours.detach()
        self.count += 1
        if ours.shape != ref.shape:
            self.failures.append(f"{name}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}")
            return
        if not ref.is_floating_point():
            if not torch.equal(ours.to(ref.dtype), ref):
                self.failures.append(f"{name}: integer buffer {ours.tolist()} vs {ref.tolist()}")
            return
        diff = (ours.double() - ref.double()).abs().max().item() if ref.numel() else 0.0
        scale = ref.abs().max().item() if ref.numel() else 0.0
        tol = (1e-3 if grad else 1e-4) + 1e-4 * scale
        self.worst = max(self.worst, diff / tol)
        if not diff <= tol:
            self.failures.append(f"{name}: max|Δ| {diff:.3g} > tol {tol:.3g} (max|ref| {scale:.3g})")


def load_strict(model, golden, prefix="param."):
    state = golden.group(prefix)
    model.load_state_dict(state, strict=True)
    return model


def check_grads(rep, model, golden, x):
    for name, p in model.named_parameters():
        key = "grad." + name
        if key in golden.keys:
            rep.compare(key, p.grad if p.grad is not None else torch.zeros_like(p), golden.get(key), grad=True)
        else:
            rep.failures.append(f"{key}: missing in the golden file")
    if "grad.input" in golden.keys:
        rep.compare("grad.input", x.grad, golden.get("grad.input"), grad=True)


def check_state(rep, model, golden, prefix):
    ref = golden.group(prefix)
    ours = model.state_dict()
    for key, value in ref.items():
        if key not in ours:
            rep.failures.append(f"{prefix}{key}: not in our state_dict")
        else:
            rep.compare(prefix + key, ours[key], value)


def whole_model(rep, model, golden, grads=True):
    """The whole-model procedure: train forward (+ grads, state after it), then eval forward."""
    x = golden.get("input.x").clone().requires_grad_(grads and "grad.input" in golden.keys)
    model.train()
    if "output.train" in golden.keys:
        out = model(x)
        rep.compare("output.train", out, golden.get("output.train"))
        if grads and "input.loss_weight" in golden.keys:
            (out * golden.get("input.loss_weight")).sum().backward()
            check_grads(rep, model, golden, x)
        for prefix in ("state_after_train.",):
            if any(k.startswith(prefix) for k in golden.keys):
                check_state(rep, model, golden, prefix)
    model.eval()
    with torch.no_grad():
        rep.compare("output.eval", model(golden.get("input.x")), golden.get("output.eval"))


def case_sla_pvt(golden):
    rep, c = Report(), golden.config["ctor"]
    model = torch_pvt.SimplifiedLinearAttention(c["dim"], c["num_patches"], c["num_heads"], c["sr_ratio"],
                                                golden.norm_factory(), c["qkv_bias"], c["kernel_size"])
    load_strict(model, golden)
    model.eval()  # config "mode": eval (the sr-branch norm uses its running stats)
    x = golden.get("input.x").clone().requires_grad_(True)
    out = model(x, tuple(golden.config["HW"]))
    rep.compare("output.y", out, golden.get("output.y"))
    (out * golden.get("input.loss_weight")).sum().backward()
    check_grads(rep, model, golden, x)
    return rep


def case_sla_swin(golden):
    rep, c = Report(), golden.config["ctor"]
    assert c["window_size"][0] == c["window_size"][1]
    model = torch_swin.SimplifiedLinearAttention(c["dim"], c["window_size"][0], c["num_heads"], c["qkv_bias"], c["kernel_size"])
    load_strict(model, golden)
    model.train()
    x = golden.get("input.x").clone().requires_grad_(True)
    out = model(x)
    rep.compare("output.y", out, golden.get("output.y"))
    (out * golden.get("input.loss_weight")).sum().backward()
    check_grads(rep, model, golden, x)
    return rep


def case_prepbn_swin(golden):
    rep, c = Report(), golden.config["ctor"]
    model = load_strict(torch_swin.SwinTransformer(norm=RepBN, **c), golden)
    whole_model(rep, model, golden, grads=False)
    # The deploy form (norms → identity, patch-merging reduction with a bias) holds the official merge's
    # fused.* state strictly and reproduces its logits (output.eval_fused_official, with the official
    # PatchEmbed omission of alpha·conv_bias baked into those weights).
    deploy = load_strict(torch_swin.SwinTransformer(norm=torch_models.identity, merge_bias=True, **c), golden, "fused.")
    with torch.no_grad():
        rep.compare("output.eval_fused_official (deploy form on fused.*)", deploy.eval()(golden.get("input.x")),
                    golden.get("output.eval_fused_official"))
    return rep


def official_slab_model(model_class):
    """The check of a whole official SLAB model: `model_class` built from the file's ctor with its
    norm layer, loaded strictly, compared on every whole-model output."""

    def case(golden):
        rep = Report()
        model = load_strict(model_class(norm=golden.norm_factory(), **golden.config["ctor"]), golden)
        whole_model(rep, model, golden)
        return rep

    return case


def case_timm_swin(golden):
    from timm.models.swin_transformer import SwinTransformer

    rep = Report()
    model = load_strict(torch_models.fused_attention(SwinTransformer(**golden.config["ctor"])), golden)
    whole_model(rep, model, golden)  # with SDPA, as torch_models.create("swin_tiny") runs it
    return rep


CASES = [
    ("sla_pvt.safetensors", "layer", case_sla_pvt),
    ("sla_swin.safetensors", "layer", case_sla_swin),
    ("slab_pvt_tiny.safetensors", "model", official_slab_model(torch_pvt.PyramidVisionTransformer)),
    ("prepbn_swin_tiny.safetensors", "model", case_prepbn_swin),
    ("slab_swin_tiny.safetensors", "model", official_slab_model(torch_swin.SlabSwinTransformer)),
    ("slab_cswin_tiny.safetensors", "model", official_slab_model(torch_cswin.CSWinTransformer)),
    ("zoo/swin_tiny_small.safetensors", "model", case_timm_swin),
]


def slabformer_params(binary, name):
    if not binary or not os.path.exists(binary):
        return None
    try:
        out = subprocess.run([binary, "info", "--model", name], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"params:\s+(\d+)", out)
    return int(m.group(1)) if m else None


def count(model):
    return sum(p.numel() for p in model.parameters())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--golden", default=os.path.join(HERE, "..", "..", "shared", "golden"))
    parser.add_argument("--slabformer", default=os.path.join(HERE, "..", "target", "release", "slabformer"))
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ok = True

    print("golden checks (abs 1e-4 + 1e-4·max|ref| outputs/state, 1e-3 + 1e-4·max|ref| grads):")
    for file, kind, case in CASES:
        path = os.path.join(args.golden, file)
        if not os.path.exists(path):
            print(f"  SKIP {file}: not found")
            continue
        try:
            rep = case(Golden(path))
        except Exception as e:  # a load or shape error is a failure of that file
            ok = False
            print(f"  FAIL {file} ({kind}): {type(e).__name__}: {e}")
            continue
        status = "PASS" if not rep.failures else "FAIL"
        ok &= not rep.failures
        print(f"  {status} {file} ({kind}): {rep.count} tensors, worst |Δ|/tol {rep.worst:.3f}")
        for failure in rep.failures[:10]:
            print(f"       {failure}")

    print("\nparameters at 224² (training form; deploy form) vs slabformer info:")
    x = torch.randn(1, 3, 224, 224)
    for name in PRESETS:
        train = torch_models.create(name, deploy=False)
        deploy = torch_models.create(name, deploy=True)
        ours, theirs = count(train), slabformer_params(args.slabformer, name)
        with torch.no_grad():
            y_deploy = deploy.eval()(x)
        y_train = train.train()(torch.randn(2, 3, 224, 224))
        finite = bool(torch.isfinite(y_deploy).all() and torch.isfinite(y_train).all())
        shapes = f"{tuple(y_deploy.shape)}/{tuple(y_train.shape)}"
        match = "n/a" if theirs is None else ("equal" if ours == theirs else f"DIFF {ours - theirs:+d}")
        ok &= finite and y_deploy.shape == (1, 1000)
        print(f"  {name:18s} ours {ours:>10,d} (deploy {count(deploy):>10,d})  slabformer {theirs if theirs is not None else '?':>10}  "
              f"{match}; forward {shapes} finite={finite}")

    if args.sweep:
        print("\nSLAB-Swin-T deploy form across the bench's resolution sweep (batch 1, eval):")
        for size in (224, 448, 896, 1344):
            model = torch_models.create("slab_swin_tiny", deploy=True, img_size=size).eval()
            windows = [(blk.window_size, blk.shift_size) for layer in model.layers for blk in layer.blocks]
            with torch.inference_mode():
                y = model(torch.randn(1, 3, size, size))
            ok &= bool(torch.isfinite(y).all())
            print(f"  {size}²: logits {tuple(y.shape)} finite={bool(torch.isfinite(y).all())} params {count(model):,d} "
                  f"(window, shift) per block {windows}")
    print("\nOK" if ok else "\nFAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
