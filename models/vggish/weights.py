"""VGGish checkpoints: cards, loading (PyTorch port or original TensorFlow checkpoint), PCA files.

Two public forms of the same weights exist:

* the PyTorch port's ``vggish-10086976.pth`` (keys ``features.{0,3,6,8,11,13}.{weight,bias}``,
  ``embeddings.{0,2,4}.{weight,bias}``) and ``vggish_pca_params-970ea276.pth``
  (``pca_eigen_vectors`` (128, 128), ``pca_means`` (128,), pickled NumPy arrays) - the cards below,
  resolved through :mod:`utils.weights` (explicit path -> torch hub cache -> verified download);
* Google's TensorFlow checkpoint ``vggish_model.ckpt`` (variables ``vggish/conv1/weights`` ...)
  and ``vggish_pca_params.npz``. ``checkpoint_path`` may name the TF checkpoint directly (the
  ``.ckpt`` file, or a TF2 ``.index`` / ``.data-*`` file or prefix); it is converted in memory
  with TensorFlow's checkpoint reader, the only place tensorflow is ever imported.
  ``pca_path`` accepts the ``.npz`` as it is.
"""
from __future__ import annotations

import logging
import os
import re
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from video_features.utils.errors import WeightsError
from video_features.utils.weights import (WeightCard, check_keys, load_state_dict, use_random_weights,
                           register_card, resolve_checkpoint)

log = logging.getLogger(__name__)

_PREPROCESSING = ("audio: 16 kHz mono (int16/32768, channel mean, resampy kaiser_best); log-mel: "
                  "25 ms periodic Hann frames every 10 ms, 512-point FFT magnitude, 64 HTK mel "
                  "bands 125-7500 Hz, log(mel + 0.01); 96 x 64 examples of 0.96 s, no overlap")

VGGISH_CARD = register_card(WeightCard(
    name="vggish",
    url="https://github.com/harritaylor/torchvggish/releases/download/v0.1/vggish-10086976.pth",
    sha256="10086976",
    filename="vggish-10086976.pth",
    layout="torchvggish: features.{0,3,6,8,11,13}.{weight,bias}, embeddings.{0,2,4}.{weight,bias}",
    preprocessing=_PREPROCESSING,
    extra={"size_bytes": 288_567_937,
           "tensorflow_checkpoint": "https://storage.googleapis.com/audioset/vggish_model.ckpt"},
))

PCA_CARD = register_card(WeightCard(
    name="vggish_pca",
    url="https://github.com/harritaylor/torchvggish/releases/download/v0.1/"
        "vggish_pca_params-970ea276.pth",
    sha256="970ea276",
    filename="vggish_pca_params-970ea276.pth",
    layout="pca_eigen_vectors (128, 128), pca_means (128,) (NumPy arrays in a torch pickle)",
    preprocessing="applied to 128-d embeddings: PCA + whitening, clip [-2, 2], 8-bit quantisation",
    extra={"size_bytes": 181_358,
           "numpy_original": "https://storage.googleapis.com/audioset/vggish_pca_params.npz"},
))

#: torch parameter prefix -> TF variable scope in Google's checkpoint
TF_SCOPES: dict[str, str] = {
    "features.0": "vggish/conv1",
    "features.3": "vggish/conv2",
    "features.6": "vggish/conv3/conv3_1",
    "features.8": "vggish/conv3/conv3_2",
    "features.11": "vggish/conv4/conv4_1",
    "features.13": "vggish/conv4/conv4_2",
    "embeddings.0": "vggish/fc1/fc1_1",
    "embeddings.2": "vggish/fc1/fc1_2",
    "embeddings.4": "vggish/fc2",
}

_TF2_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
_DATA_SHARD = re.compile(r"\.data-\d+-of-\d+$")


# -- TensorFlow checkpoints ---------------------------------------------------------------------
def tf_checkpoint_prefix(path: str | os.PathLike) -> str | None:
    """The checkpoint prefix if ``path`` names a TensorFlow checkpoint, else None.

    Recognises a V1 ``*.ckpt`` file, a V2 prefix (``<prefix>.index`` exists), and the V2
    ``.index`` / ``.data-NNNNN-of-NNNNN`` files themselves.
    """
    p = os.path.expanduser(str(path))
    if p.endswith(".index"):
        return p[: -len(".index")]
    if _DATA_SHARD.search(p):
        return _DATA_SHARD.sub("", p)
    if p.endswith(".ckpt") and os.path.isfile(p) and zipfile.is_zipfile(p):
        return None  # a torch (e.g. Lightning) checkpoint that happens to end in .ckpt
    if p.endswith(".ckpt") or os.path.exists(p + ".index"):
        return p
    return None


def state_from_tf_arrays(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Google's variables (``vggish/conv1/weights`` ...) -> the PyTorch port's state dict.

    Convolutions go from HWIO to OIHW, dense kernels from (in, out) to (out, in). No reordering
    of fc1's input is needed because :class:`models.vggish.net.VGGish` flattens in TF's NHWC order.
    """
    names = {k[: -len(_TF2_SUFFIX)] if k.endswith(_TF2_SUFFIX) else k: k for k in arrays}
    state: dict[str, torch.Tensor] = {}
    missing = []
    for prefix, scope in TF_SCOPES.items():
        for tf_leaf, torch_leaf in (("weights", "weight"), ("biases", "bias")):
            key = f"{scope}/{tf_leaf}"
            if key not in names:
                missing.append(key)
                continue
            value = np.asarray(arrays[names[key]], dtype=np.float32)
            if tf_leaf == "weights":
                value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
            state[f"{prefix}.{torch_leaf}"] = torch.from_numpy(np.ascontiguousarray(value))
    if missing:
        raise WeightsError(f"TensorFlow checkpoint lacks VGGish variables: {', '.join(missing[:3])}"
                           f"{' ...' if len(missing) > 3 else ''}")
    return state


def convert_tf_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read Google's VGGish TF checkpoint with ``tf.train.load_checkpoint`` -> torch state dict."""
    prefix = tf_checkpoint_prefix(path)
    if prefix is None:
        raise WeightsError(f"{path} is not a TensorFlow checkpoint (.ckpt, .index or .data-*)")
    if not (os.path.isfile(prefix) or os.path.isfile(prefix + ".index")):
        raise WeightsError(f"TensorFlow checkpoint {prefix!r} does not exist")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf
    except ImportError:
        raise WeightsError(
            f"checkpoint_path {str(path)!r} is a TensorFlow checkpoint; reading it needs tensorflow "
            "(pip install tensorflow-cpu), or convert it once with "
            "'python -m video_features.models.vggish.convert_tf --ckpt FILE --out vggish.pth'") from None
    try:
        reader = tf.train.load_checkpoint(prefix)
        available = reader.get_variable_to_shape_map()
        arrays = {}
        for name in available:
            base = name[: -len(_TF2_SUFFIX)] if name.endswith(_TF2_SUFFIX) else name
            if any(base == f"{s}/{leaf}" for s in TF_SCOPES.values() for leaf in ("weights", "biases")):
                arrays[name] = reader.get_tensor(name)
    except Exception as exc:
        raise WeightsError(f"cannot read TensorFlow checkpoint {prefix}: "
                           f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
    return state_from_tf_arrays(arrays)


# -- state dicts ---------------------------------------------------------------------------------
def _read_state(cfg: Any) -> tuple[dict[str, torch.Tensor] | None, str]:
    """The state dict the config asks for (None: random weights) and where it came from.

    Order: ``checkpoint_path`` (a .pth in the port's layout, or a TF checkpoint) -> random
    weights when ``allow_random_weights`` -> the card (cache, verified download, clear error).
    """
    path = getattr(cfg, "checkpoint_path", None)
    if path and tf_checkpoint_prefix(path) is not None and not str(path).endswith(".pth"):
        return convert_tf_checkpoint(path), f"TensorFlow checkpoint {path}"
    if use_random_weights(getattr(cfg, "allow_random_weights", False), path, "vggish"):
        return None, "random weights"
    file = resolve_checkpoint(VGGISH_CARD, path)
    return load_state_dict(file), str(file)


def build_vggish(cfg: Any) -> tuple[torch.nn.Module, str]:
    """A :class:`~models.vggish.net.VGGish` on the CPU with the weights ``cfg`` selects, loaded
    strictly; returns ``(model, source)``. Real weights are assigned into a model built on the
    meta device, so the 72M parameters are never initialised only to be overwritten."""
    from video_features.models.vggish.net import VGGish

    state, source = _read_state(cfg)
    if state is None:
        return VGGish(), source
    state = {(k[len("module."):] if k.startswith("module.") else k): v.float()
             for k, v in state.items()}
    with torch.device("meta"):
        model = VGGish()
    check_keys(state, model.state_dict(), f"vggish ({source})")
    model.load_state_dict(state, strict=True, assign=True)
    return model, source


def _numpy_pickle_globals() -> list[Any]:
    """What a torch pickle of NumPy arrays references, for ``weights_only`` loading."""
    try:
        from numpy._core import multiarray
    except ImportError:  # NumPy 1.x
        from numpy.core import multiarray  # type: ignore[no-redef]
    allowed: list[Any] = [multiarray._reconstruct, np.ndarray, np.dtype,
                          (multiarray._reconstruct, "numpy.core.multiarray._reconstruct")]
    for t in (np.float64, np.float32):
        dt = type(np.dtype(t))
        allowed += [dt, (dt, f"numpy.dtypes.{dt.__name__}")]
    return allowed


def read_pca_file(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """``(eigen_vectors (128, 128), means (128,))`` float64 from a .npz or a torch pickle."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise WeightsError(f"PCA parameters {str(path)!r} do not exist")
    try:
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                obj: Any = {k: z[k] for k in z.files}
        else:
            try:
                obj = torch.load(p, map_location="cpu", weights_only=True)
            except Exception:
                with torch.serialization.safe_globals(_numpy_pickle_globals()):
                    obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"cannot read PCA parameters {p}: {type(exc).__name__}: "
                           f"{str(exc).splitlines()[0][:200] if str(exc) else ''}") from None
    try:
        ev = torch.as_tensor(np.asarray(obj["pca_eigen_vectors"]), dtype=torch.float64)
        mu = torch.as_tensor(np.asarray(obj["pca_means"]), dtype=torch.float64).reshape(-1)
    except (KeyError, TypeError, IndexError):
        raise WeightsError(f"{p} lacks pca_eigen_vectors / pca_means") from None
    if tuple(ev.shape) != (128, 128) or tuple(mu.shape) != (128,):
        raise WeightsError(f"{p}: PCA shapes {tuple(ev.shape)}, {tuple(mu.shape)}; "
                           "expected (128, 128) and (128,)")
    return ev, mu


def load_pca(cfg: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """PCA parameters for ``postprocess``: ``pca_path`` -> identity when running on random
    weights -> the card (cache, verified download, clear error)."""
    path = getattr(cfg, "pca_path", None)
    if path:
        return read_pca_file(path)
    if use_random_weights(getattr(cfg, "allow_random_weights", False),
                          getattr(cfg, "checkpoint_path", None), "vggish PCA"):
        log.warning("vggish: postprocess with random weights uses an identity PCA")
        return torch.eye(128, dtype=torch.float64), torch.zeros(128, dtype=torch.float64)
    return read_pca_file(resolve_checkpoint(PCA_CARD))


# -- files for tests and benchmarks -------------------------------------------------------------
def write_random_checkpoint(path: str | os.PathLike, seed: int = 0) -> Path:
    """Random VGGish weights in the exact layout of ``vggish-10086976.pth``.

    Weights are He-scaled so that activations neither vanish nor explode through the stack
    (features stay informative for tests); the global RNG is left untouched.
    """
    from video_features.models.vggish.net import VGGish

    gen = torch.Generator().manual_seed(seed)
    state = {}
    with torch.device("meta"):
        shapes = VGGish().state_dict()
    for key, ref in shapes.items():
        if key.endswith(".weight"):
            fan_in = int(np.prod(ref.shape[1:]))
            state[key] = torch.randn(ref.shape, generator=gen) * (2.0 / fan_in) ** 0.5
        else:
            state[key] = torch.randn(ref.shape, generator=gen) * 0.01
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
    return out


def write_random_pca(path: str | os.PathLike, seed: int = 0, numpy_arrays: bool = True) -> Path:
    """Random PCA parameters in the layout of ``vggish_pca_params-970ea276.pth`` (NumPy arrays
    pickled by torch, like the public file) or, with ``numpy_arrays=False``, as tensors.
    A ``.npz`` suffix writes the layout of Google's ``vggish_pca_params.npz`` instead."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((128, 128)))
    ev = q * rng.uniform(0.5, 3.0, size=(128, 1))
    mu = rng.standard_normal(128) * 0.1
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npz":
        with open(out, "wb") as f:
            np.savez(f, pca_eigen_vectors=ev, pca_means=mu)
    elif numpy_arrays:
        torch.save({"pca_eigen_vectors": ev, "pca_means": mu}, out)
    else:
        torch.save({"pca_eigen_vectors": torch.from_numpy(ev), "pca_means": torch.from_numpy(mu)}, out)
    return out
