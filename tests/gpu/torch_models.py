#!/usr/bin/env python3
"""Correctness of real work on the GPU (run with and without the shim).

    torch_models.py run OUTFILE         matmul + ResNet-50 forward; saves the outputs to OUTFILE
    torch_models.py compare A B         compare two saved runs (allclose rtol 1e-3 atol 1e-3)

run prints matmul_ok=, resnet_ok= (each checked against a reference computed independently:
float64 for the matmul, the CPU for ResNet-50), the error figures, and exits 0 unless something
raised. compare prints same_matmul=, same_logits=, max_abs_diff_* and exits 0.
"""
import sys
import time

from procout import out, preloaded_gpuslice

MIB = 1024 * 1024


def strict_fp32(torch):
    """No TF32 anywhere: the references are full fp32/fp64."""
    if hasattr(torch.backends, "fp32_precision"):  # torch >= 2.9 API
        try:
            torch.backends.fp32_precision = "ieee"
            torch.backends.cuda.matmul.fp32_precision = "ieee"
            torch.backends.cudnn.fp32_precision = "ieee"
            torch.backends.cudnn.conv.fp32_precision = "ieee"
            return "fp32_precision=ieee"
        except Exception as e:  # fall back to the old switches
            out("fp32_precision_error", type(e).__name__)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return "allow_tf32=False"


def run(outfile):
    import torch
    import torchvision

    out("torch_version", torch.__version__)
    out("torchvision_version", torchvision.__version__)
    out("preloaded_gpuslice", preloaded_gpuslice())
    out("precision", strict_fp32(torch))
    for name, obj in (("matmul", getattr(torch.backends.cuda, "matmul", None)),
                      ("cudnn_conv", getattr(torch.backends.cudnn, "conv", None))):
        out(f"{name}_fp32_precision", getattr(obj, "fp32_precision", "n/a"))
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    dev = torch.device("cuda")

    # --- matmul: 4096x4096 fp32 against a float64 reference
    t0 = time.time()
    g = torch.Generator().manual_seed(1234)
    a = torch.randn(4096, 4096, generator=g, dtype=torch.float32)
    b = torch.randn(4096, 4096, generator=g, dtype=torch.float32)
    a_d, b_d = a.to(dev), b.to(dev)
    c = (a_d @ b_d).cpu()
    ref = (a_d.double() @ b_d.double()).cpu()
    torch.cuda.synchronize()
    err = (c.double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    rel = err / scale if scale > 0 else float("inf")
    # Full fp32 gives ~1e-7 here, TF32 ~5e-4; garbage (a broken copy, a stale buffer) gives ~1.
    matmul_ok = bool(torch.isfinite(c).all().item()) and rel <= 2e-3
    out("matmul_max_abs_err", f"{err:.3e}")
    out("matmul_max_rel_err", f"{rel:.3e}")
    out("matmul_ok", int(matmul_ok))
    out("matmul_s", f"{time.time() - t0:.2f}")

    # --- ResNet-50 forward, eval, fp32, batch 8, against the same model on the CPU
    t0 = time.time()
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    x = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(42))
    with torch.no_grad():
        cpu_logits = model(x)
        model_d = model.to(dev)
        logits = model_d(x.to(dev)).cpu()
    torch.cuda.synchronize()
    diff = (logits - cpu_logits).abs().max().item()
    lscale = cpu_logits.abs().max().item()
    lrel = diff / lscale if lscale > 0 else float("inf")
    resnet_ok = (
        bool(torch.isfinite(logits).all().item())
        and lscale > 0
        and lrel <= 1e-2  # fp32 on both sides: ~1e-5; wrong results are O(1)
    )
    out("resnet_logits_shape", "x".join(str(s) for s in logits.shape))
    out("resnet_logits_absmax", f"{lscale:.4e}")
    out("resnet_max_abs_diff_vs_cpu", f"{diff:.3e}")
    out("resnet_max_rel_diff_vs_cpu", f"{lrel:.3e}")
    out("resnet_ok", int(resnet_ok))
    out("resnet_s", f"{time.time() - t0:.2f}")
    out("max_memory_allocated_mib", f"{torch.cuda.max_memory_allocated() / MIB:.1f}")

    torch.save({"matmul": c, "logits": logits}, outfile)
    out("saved", outfile)
    out("done", 1)
    return 0


def compare(path_a, path_b):
    import torch

    a = torch.load(path_a, map_location="cpu")
    b = torch.load(path_b, map_location="cpu")
    ok = True
    for key in ("matmul", "logits"):
        x, y = a[key], b[key]
        same = x.shape == y.shape and bool(torch.allclose(x, y, rtol=1e-3, atol=1e-3))
        d = (x - y).abs().max().item() if x.shape == y.shape else float("inf")
        out(f"same_{key}", int(same))
        out(f"max_abs_diff_{key}", f"{d:.3e}")
        out(f"bitwise_equal_{key}", int(x.shape == y.shape and torch.equal(x, y)))
        ok = ok and same
    out("same_outputs", int(ok))
    return 0


def main(argv):
    if len(argv) == 3 and argv[1] == "run":
        return run(argv[2])
    if len(argv) == 4 and argv[1] == "compare":
        return compare(argv[2], argv[3])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
