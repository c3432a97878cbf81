"""Convert Google's VGGish TensorFlow checkpoint (and PCA .npz) into the PyTorch port's files.

    python -m video_features.models.vggish.convert_tf --ckpt vggish_model.ckpt --out vggish.pth \
        [--pca vggish_pca_params.npz [--pca_out vggish_pca_params.pth]]

The written ``--out`` has exactly the keys of ``vggish-10086976.pth`` and loads with
``checkpoint_path=vggish.pth``; the PCA file has ``pca_eigen_vectors`` (128, 128) and
``pca_means`` (128,) as float64 tensors and loads with ``pca_path=...``. Needs tensorflow
(``pip install tensorflow-cpu``) for reading the checkpoint; nothing else in the tool does.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

from video_features.models.vggish.weights import convert_tf_checkpoint, read_pca_file
from video_features.utils.errors import FeatureError


def _save_atomic(obj: object, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def convert(ckpt: str, out: str, pca: str | None = None, pca_out: str | None = None) -> list[Path]:
    """Write the converted files; returns their paths."""
    written = []
    state = convert_tf_checkpoint(ckpt)
    dest = Path(out)
    _save_atomic(state, dest)
    written.append(dest)
    if pca:
        ev, mu = read_pca_file(pca)
        pdest = Path(pca_out) if pca_out else dest.with_name("vggish_pca_params.pth")
        _save_atomic({"pca_eigen_vectors": ev, "pca_means": mu}, pdest)
        written.append(pdest)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m video_features.models.vggish.convert_tf",
        description="Convert Google's VGGish TensorFlow checkpoint to the PyTorch port's layout.")
    parser.add_argument("--ckpt", required=True,
                        help="vggish_model.ckpt (TF1) or a TF2 checkpoint prefix/.index file")
    parser.add_argument("--out", required=True, help="where to write the .pth state dict")
    parser.add_argument("--pca", default=None, help="vggish_pca_params.npz to convert as well")
    parser.add_argument("--pca_out", default=None,
                        help="where to write the PCA .pth (default: vggish_pca_params.pth next to --out)")
    args = parser.parse_args(argv)
    try:
        for path in convert(args.ckpt, args.out, args.pca, args.pca_out):
            print(f"wrote {path}")
    except FeatureError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
