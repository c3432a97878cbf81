"""How far TF32, bf16 or fp16 move each feature type's outputs from IEEE fp32.

Prints, per feature type, max |x - fp32| / max |fp32| over the output (random weights), the
measure the README quotes.

``--compare tf32``: TF32 tensor cores read fp32 operands with a 10-bit mantissa (round to
nearest) and accumulate in fp32. On the CPU this script emulates exactly that rounding (every
convolution and linear layer gets its input and weight rounded before an fp32 computation); with
``--device cuda`` it runs the real ``tf32=true`` against ``tf32=false``.
``--compare bf16`` / ``fp16``: the ``precision`` option (autocast), for real on either device.

    python bench/numerics.py --video sample/A.mp4                      # TF32, emulated on the CPU
    python bench/numerics.py --video sample/A.mp4 --compare bf16
    python bench/numerics.py --video sample/A.mp4 --device cuda --compare fp16
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

FEATURES = {
    "resnet": (dict(model_name="resnet50"), "resnet"),
    "r21d": ({}, "r21d"),
    "i3d": (dict(stack_size=16, step_size=16), "rgb", "flow"),
    "vggish": ({}, "vggish"),
}


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> the nearest value with a 10-bit mantissa (ties to even), kept as fp32."""
    bits = x.contiguous().view(torch.int32)
    lsb = (bits >> 13) & 1
    rounded = (bits + 0xFFF + lsb) & ~0x1FFF
    return rounded.view(torch.float32)


@contextlib.contextmanager
def emulated_tf32(model: torch.nn.Module) -> Iterator[None]:
    """Round the operands of every conv / linear layer of ``model`` to TF32 while active."""
    handles, saved = [], []
    kinds = (torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose2d, torch.nn.Linear)
    for m in model.modules():
        if isinstance(m, kinds):
            saved.append((m, m.weight.data))
            m.weight.data = round_to_tf32(m.weight.data)
            handles.append(m.register_forward_pre_hook(
                lambda _m, args: tuple(round_to_tf32(a) if torch.is_tensor(a) and a.dtype == torch.float32
                                       else a for a in args)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for m, w in saved:
            m.weight.data = w


def _models(ex) -> list[torch.nn.Module]:
    out = [v for v in vars(ex).values() if isinstance(v, torch.nn.Module)]
    out += [n for n in getattr(ex, "nets", {}).values()]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--video", default="sample/A.mp4")
    ap.add_argument("--device", default="cpu", help="cpu (emulated TF32) or cuda (real TF32)")
    ap.add_argument("--feature_types", nargs="+", default=list(FEATURES))
    ap.add_argument("--compare", default="tf32", choices=["tf32", "bf16", "fp16"])
    args = ap.parse_args()

    from video_features.utils.config import make_config
    from video_features.utils.device import apply_numerics, precision_context
    from video_features.utils.runner import build_extractor, configure_logging

    configure_logging("error")
    for ft in args.feature_types:
        options, *keys = FEATURES[ft]
        cfg = make_config(ft, video_paths=[args.video], allow_random_weights=True,
                          device="cpu" if args.device == "cpu" else "cuda", **options)
        ex = build_extractor(cfg, "cpu" if args.device == "cpu" else "cuda:0")
        torch.manual_seed(0)
        ref = ex.extract(args.video)
        if args.compare != "tf32":
            with precision_context(ex.device, args.compare):  # same weights, autocast on
                got = ex.extract(args.video)
        elif args.device == "cpu":
            with contextlib.ExitStack() as stack:
                for m in _models(ex):
                    stack.enter_context(emulated_tf32(m))
                got = ex.extract(args.video)
        else:
            apply_numerics(True)
            got = ex.extract(args.video)
            apply_numerics(False)
        for key in keys:
            a, b = np.asarray(ref[key], np.float64), np.asarray(got[key], np.float64)
            rel = np.abs(a - b).max() / max(np.abs(a).max(), 1e-30)
            how = ("emulated on CPU" if args.device == "cpu" and args.compare == "tf32"
                   else f"on {args.device}")
            print(f"{ft} {key}: max |{args.compare} - fp32| / max |fp32| = {rel:.2e} ({how}, "
                  f"shape {a.shape})", flush=True)


if __name__ == "__main__":
    main()
