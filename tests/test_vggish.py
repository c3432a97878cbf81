"""feature_type=vggish: log-mel front end, network, checkpoints (PyTorch port and TensorFlow),
post-processing and the extractor.

Numerics are held against independent re-computations written here: the original NumPy log-mel
algorithm, Google's post-processing in NumPy, and the original TF-Slim layer stack rebuilt in
TensorFlow 2 with the official checkpoint's variable names (skipped without tensorflow).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from video_features.models.vggish import mel
from video_features.models.vggish.extractor import VGGishExtractor
from video_features.models.vggish.net import PCAQuantizer, VGGish
from video_features.models.vggish.weights import (PCA_CARD, TF_SCOPES, VGGISH_CARD, read_pca_file,
                                   state_from_tf_arrays, tf_checkpoint_prefix,
                                   write_random_checkpoint, write_random_pca)
from tests.test_audio import tone, write_media, write_wav
from video_features.utils.audio import load_audio
from video_features.utils.config import Config
from video_features.utils.errors import ConfigError, VideoError, WeightsError

ROOT = Path(__file__).resolve().parent.parent
PUBLIC_KEYS = sorted([f"features.{i}.{p}" for i in (0, 3, 6, 8, 11, 13) for p in ("weight", "bias")]
                     + [f"embeddings.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")])


# -- independent NumPy re-computations ---------------------------------------------------------
def numpy_log_mel_examples(x: np.ndarray, sr: int = 16000) -> np.ndarray:
    """The original VGGish input pipeline written out in NumPy, float64."""
    win = int(round(sr * 0.025))
    hop = int(round(sr * 0.010))
    nfft = 2 ** int(np.ceil(np.log2(win)))
    n_frames = 1 + (len(x) - win) // hop
    idx = np.arange(win)[None, :] + hop * np.arange(n_frames)[:, None]
    window = 0.5 - 0.5 * np.cos(2 * np.pi / win * np.arange(win))
    spec = np.abs(np.fft.rfft(x[idx] * window, nfft))
    n_bins = spec.shape[1]

    def to_mel(f):
        return 1127.0 * np.log(1.0 + f / 700.0)

    bins = to_mel(np.linspace(0.0, sr / 2, n_bins))
    edges = np.linspace(to_mel(125.0), to_mel(7500.0), 64 + 2)
    weights = np.empty((n_bins, 64))
    for i in range(64):
        lo, c, hi = edges[i:i + 3]
        weights[:, i] = np.maximum(0.0, np.minimum((bins - lo) / (c - lo), (hi - bins) / (hi - c)))
    weights[0, :] = 0.0
    logmel = np.log(spec @ weights + 0.01)
    n_ex = 1 + (len(logmel) - 96) // 96
    return logmel[:n_ex * 96].reshape(n_ex, 96, 64)


def numpy_postprocess(emb: np.ndarray, ev: np.ndarray, mu: np.ndarray) -> np.ndarray:
    """Google's vggish_postprocess.Postprocessor.postprocess."""
    pca = np.dot(ev, (emb.T - mu.reshape(-1, 1))).T
    clipped = np.clip(pca, -2.0, 2.0)
    return ((clipped + 2.0) * (255.0 / 4.0)).astype(np.uint8)


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("vggish")
    t = np.arange(int(44100 * 3.2)) / 44100
    sweep = 0.5 * np.sin(2 * np.pi * (150 * t + 900 * t ** 2))        # 150 Hz -> ~5.9 kHz
    stereo = np.stack([sweep, 0.3 * np.sin(2 * np.pi * 440 * t)]).astype(np.float32)
    return {
        "mp4": write_media(d / "sweep.mp4", stereo, 44100, "aac", video_frames=32),
        "noaudio": write_media(d / "mute.mp4", None, 0, video_frames=10),
        "short": write_wav(d / "short.wav", tone(16000, 0.9, 440.0), 16000),
        "wav": write_wav(d / "one_example.wav", tone(16000, 1.2, 700.0), 16000),
        "ckpt": write_random_checkpoint(d / "vggish-random.pth", seed=1),
        "pca": write_random_pca(d / "pca-random.pth", seed=2),
    }


def make_cfg(**kw) -> Config:
    base = dict(checkpoint_path=None, allow_random_weights=False, postprocess=False,
                batch_size=64, show_pred=False, pca_path=None, keep_priming=False)
    base.update(kw)
    return Config(base)


# -- front end ------------------------------------------------------------------------------------
def test_front_end_constants() -> None:
    assert (mel.WINDOW, mel.HOP, mel.FFT_SIZE, mel.NUM_BINS) == (400, 160, 512, 257)
    assert (mel.EXAMPLE_FRAMES, mel.NUM_BANDS, mel.EXAMPLE_HOP, mel.EXAMPLE_SPAN) == \
        (96, 64, 15360, 15600)
    m = mel.mel_weight_matrix()
    assert m.shape == (257, 64) and not m[0].any() and (m >= 0).all()
    assert [mel.num_examples(n) for n in (0, 15359, 15599, 15600, 30959, 30960, 46320)] == \
        [0, 0, 0, 1, 1, 2, 3]


def test_log_mel_matches_numpy_reference() -> None:
    rng = np.random.default_rng(0)
    t = np.arange(16000 * 4 + 1234) / 16000
    x = 0.3 * np.sin(2 * np.pi * (100 * t + 700 * t ** 2)) + 0.05 * rng.standard_normal(len(t))
    x[20000:26000] = 0.0                                         # silence: log(0.01) floor
    expected = numpy_log_mel_examples(x)
    got64 = mel.LogMelExamples()(torch.from_numpy(x)).numpy()
    assert got64.shape == expected.shape == (4, 96, 64)
    assert got64.dtype == np.float32
    # float64 front end: only the final float32 rounding separates us from NumPy
    assert np.abs(got64 - expected.astype(np.float32)).max() <= 1e-5
    assert np.abs(got64 - expected).max() / np.abs(expected).max() < 1e-6
    got32 = mel.LogMelExamples(dtype=torch.float32)(torch.from_numpy(x.astype(np.float32))).numpy()
    assert np.abs(got32 - expected).max() < 1e-4


def test_log_mel_batches_of_examples_are_independent() -> None:
    x = torch.from_numpy(np.random.default_rng(1).standard_normal(16000 * 5))
    front = mel.LogMelExamples()
    whole = front(x)
    k = 2
    tail = front(x[k * mel.EXAMPLE_HOP:])
    assert torch.equal(whole[k:], tail)
    assert front(x[:15599]).shape == (0, 96, 64)


# -- network and post-processing -----------------------------------------------------------------
def test_random_checkpoint_has_public_layout(files: dict[str, Path]) -> None:
    state = torch.load(files["ckpt"], map_location="cpu", weights_only=True)
    assert sorted(state) == PUBLIC_KEYS
    assert tuple(state["features.0.weight"].shape) == (64, 1, 3, 3)
    assert tuple(state["embeddings.0.weight"].shape) == (4096, 12288)
    assert tuple(state["embeddings.4.weight"].shape) == (128, 4096)
    net = VGGish()
    net.load_state_dict(state, strict=True)
    out = net.eval()(torch.randn(3, 96, 64))
    assert out.shape == (3, 128) and (out >= 0).all()


def test_cards() -> None:
    assert VGGISH_CARD.url.endswith("/v0.1/vggish-10086976.pth")
    assert VGGISH_CARD.sha256 == "10086976" and PCA_CARD.sha256 == "970ea276"
    assert PCA_CARD.filename == "vggish_pca_params-970ea276.pth"


def test_pca_quantizer_matches_google_postprocess() -> None:
    rng = np.random.default_rng(3)
    emb = (rng.standard_normal((50, 128)) * 0.7).astype(np.float32)
    q, _ = np.linalg.qr(rng.standard_normal((128, 128)))
    mu = rng.standard_normal(128) * 0.1
    got = PCAQuantizer(torch.from_numpy(q), torch.from_numpy(mu))(torch.from_numpy(emb)).numpy()
    expected = numpy_postprocess(emb, q, mu)
    assert got.dtype == np.uint8
    diff = np.abs(got.astype(int) - expected.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.999


def test_pca_files_in_every_public_form(tmp_path: Path) -> None:
    ref_ev, ref_mu = read_pca_file(write_random_pca(tmp_path / "a.npz", seed=5))
    for name, kw in (("b.pth", {}), ("c.pth", {"numpy_arrays": False})):
        ev, mu = read_pca_file(write_random_pca(tmp_path / name, seed=5, **kw))
        assert torch.equal(ev, ref_ev) and torch.equal(mu, ref_mu)
    # a torch pickle of NumPy arrays written under NumPy 1.x names numpy.core.multiarray
    legacy = tmp_path / "legacy.pth"
    torch.save({"pca_eigen_vectors": ref_ev.numpy(), "pca_means": ref_mu.numpy()}, legacy,
               _use_new_zipfile_serialization=False)
    data = legacy.read_bytes()
    if b"numpy._core.multiarray\n" in data:
        legacy.write_bytes(data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
    ev, mu = read_pca_file(legacy)
    assert torch.equal(ev, ref_ev) and torch.equal(mu, ref_mu)
    bad = tmp_path / "bad.npz"
    np.savez(bad, pca_eigen_vectors=np.zeros((4, 4)), pca_means=np.zeros(4))
    with pytest.raises(WeightsError, match="expected"):
        read_pca_file(bad)


def test_tf_checkpoint_detection(tmp_path: Path) -> None:
    assert tf_checkpoint_prefix("x/vggish_model.ckpt") == "x/vggish_model.ckpt"
    assert tf_checkpoint_prefix("x/m.ckpt.index") == "x/m.ckpt"
    assert tf_checkpoint_prefix("x/m.ckpt.data-00000-of-00001") == "x/m.ckpt"
    assert tf_checkpoint_prefix("x/vggish.pth") is None
    torch_ckpt = tmp_path / "lightning.ckpt"
    torch.save({"a": torch.zeros(1)}, torch_ckpt)
    assert tf_checkpoint_prefix(torch_ckpt) is None


def test_tf_arrays_conversion_layout() -> None:
    """HWIO -> OIHW for convolutions, (in, out) -> (out, in) for dense layers (small fake shapes:
    the conversion does not look at sizes, the strict load does)."""
    rng = np.random.default_rng(0)
    arrays = {}
    for k, scope in enumerate(TF_SCOPES.values()):
        shape = (3, 3, 2 + k, 5 + k) if "conv" in scope else (6 + k, 4 + k)
        arrays[f"{scope}/weights"] = rng.standard_normal(shape).astype(np.float32)
        arrays[f"{scope}/biases"] = rng.standard_normal(shape[-1]).astype(np.float32)
    state = state_from_tf_arrays(arrays)
    assert sorted(state) == PUBLIC_KEYS
    w = arrays["vggish/conv3/conv3_1/weights"]
    assert state["features.6.weight"].shape == (w.shape[3], w.shape[2], 3, 3)
    assert state["features.6.weight"][4, 3, 1, 2] == float(w[1, 2, 3, 4])
    w = arrays["vggish/fc1/fc1_1/weights"]
    assert state["embeddings.0.weight"].shape == (w.shape[1], w.shape[0])
    assert state["embeddings.0.weight"][5, 3] == float(w[3, 5])
    # TF2 object-based names are accepted too
    tf2 = {f"{k}/.ATTRIBUTES/VARIABLE_VALUE": v for k, v in arrays.items()}
    assert all(torch.equal(state[k], v) for k, v in state_from_tf_arrays(tf2).items())
    del arrays["vggish/fc2/biases"]
    with pytest.raises(WeightsError, match="fc2/biases"):
        state_from_tf_arrays(arrays)


# -- extractor ------------------------------------------------------------------------------------
def test_extract_mp4(files: dict[str, Path]) -> None:
    ex = VGGishExtractor(make_cfg(checkpoint_path=str(files["ckpt"]), batch_size=2), "cpu")
    assert ex.output_keys == ("vggish", "timestamps_ms")
    out = ex.extract(str(files["mp4"]))
    feats = out["vggish"]
    n = mel.num_examples(len(load_audio(str(files["mp4"]))))
    assert n == 3
    np.testing.assert_allclose(out["timestamps_ms"], [[0, 960], [960, 1920], [1920, 2880]])
    assert feats.shape == (n, 128) and feats.dtype == np.float32
    assert (feats >= 0).all() and np.isfinite(feats).all() and feats.std() > 0
    assert ex.frames_read == n
    # the batch size changes nothing
    ex1 = VGGishExtractor(make_cfg(checkpoint_path=str(files["ckpt"]), batch_size=64), "cpu")
    assert _rel(ex1.extract(str(files["mp4"]))["vggish"], feats) < 1e-5


def test_postprocess_gives_audioset_uint8(files: dict[str, Path]) -> None:
    cfg = make_cfg(checkpoint_path=str(files["ckpt"]), postprocess=True, pca_path=str(files["pca"]))
    ex = VGGishExtractor(cfg, "cpu")
    feats = ex.extract(str(files["wav"]))["vggish"]
    assert feats.shape == (1, 128) and feats.dtype == np.uint8
    # Google's post-processing of the pre-activation embedding
    net = VGGish()
    net.load_state_dict(torch.load(files["ckpt"], weights_only=True))
    examples = mel.LogMelExamples()(torch.from_numpy(load_audio(str(files["wav"]))))
    with torch.no_grad():
        raw = net.eval()(examples, pre_activation=True).numpy()
    ev, mu = read_pca_file(files["pca"])
    expected = numpy_postprocess(raw, ev.numpy(), mu.numpy())
    assert np.abs(feats.astype(int) - expected.astype(int)).max() <= 1


def test_short_and_silent_inputs(files: dict[str, Path]) -> None:
    ex = VGGishExtractor(make_cfg(checkpoint_path=str(files["ckpt"])), "cpu")
    with pytest.raises(VideoError, match=r"shorter than one 0.96 s example \(0.900 s"):
        ex.extract(str(files["short"]))
    with pytest.raises(VideoError, match="no audio track"):
        ex.extract(str(files["noaudio"]))
    with pytest.raises(VideoError, match="file not found"):
        ex.extract(str(files["short"]) + ".missing")


def test_validate_names_the_option(files: dict[str, Path], tmp_path: Path) -> None:
    VGGishExtractor.validate(make_cfg(checkpoint_path=str(files["ckpt"])))
    from video_features.utils.config import make_config

    for option, value in (("batch_size", 0), ("postprocess", "sometimes")):  # typed by the schema
        with pytest.raises(ConfigError, match=option):
            make_config("vggish", video_paths=[str(files["wav"])], device="cpu", **{option: value})
    cases = [
        (make_cfg(show_pred=True), "show_pred"),
        (make_cfg(checkpoint_path=str(tmp_path / "none.pth")), "checkpoint_path"),
        (make_cfg(checkpoint_path=str(tmp_path / "none.ckpt")), "checkpoint_path"),
        (make_cfg(pca_path=str(tmp_path / "none.npz"), postprocess=True), "pca_path"),
    ]
    for cfg, option in cases:
        with pytest.raises(ConfigError, match=option):
            VGGishExtractor.validate(cfg)


def test_weights_resolution(files: dict[str, Path], tmp_path: Path,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub_home"))
    monkeypatch.setenv("VIDEO_FEATURES_OFFLINE", "1")
    with pytest.raises(WeightsError, match="vggish-10086976.pth"):
        VGGishExtractor(make_cfg(), "cpu")
    ex = VGGishExtractor(make_cfg(allow_random_weights=True, postprocess=True), "cpu")
    assert ex.weights_source == "random weights"
    # the cached public file is found and loaded strictly
    cache = tmp_path / "hub_home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / VGGISH_CARD.filename).symlink_to(files["ckpt"])
    ex = VGGishExtractor(make_cfg(), "cpu")
    assert ex.weights_source.endswith(VGGISH_CARD.filename)
    with pytest.raises(WeightsError, match=PCA_CARD.filename):
        VGGishExtractor(make_cfg(postprocess=True), "cpu")
    broken = tmp_path / "broken.pth"
    torch.save({"features.0.weight": torch.zeros(64, 1, 3, 3), "head.weight": torch.zeros(2)}, broken)
    with pytest.raises(WeightsError, match="17 missing.*1 unexpected"):
        VGGishExtractor(make_cfg(checkpoint_path=str(broken)), "cpu")


def test_config_defaults_and_make_config(files: dict[str, Path]) -> None:
    from video_features.utils.config import make_config

    cfg = make_config("vggish", video_paths=[str(files["wav"])], device="cpu",
                      checkpoint_path=str(files["ckpt"]))
    assert cfg.batch_size == 64 and cfg.postprocess is False and cfg.keep_priming is False
    assert cfg.pca_path is None
    out = VGGishExtractor(cfg, "cpu").extract(str(files["wav"]))
    assert out["vggish"].shape == (1, 128)
    with pytest.raises(ConfigError, match="show_pred"):
        make_config("vggish", video_paths=[str(files["wav"])], device="cpu", show_pred=True)


def test_tensorflow_is_never_imported(files: dict[str, Path]) -> None:
    code = (
        "import sys\n"
        "from video_features.utils.config import Config\n"
        "import video_features.models.registry as r\n"
        "cls = r.get_extractor_class('vggish')\n"
        "import video_features.models.vggish.convert_tf\n"
        f"cfg = Config(dict(checkpoint_path={str(files['ckpt'])!r}, batch_size=4))\n"
        f"out = cls(cfg, 'cpu').extract({str(files['wav'])!r})\n"
        "assert out['vggish'].shape == (1, 128)\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu(files: dict[str, Path]) -> None:
    cfg = make_cfg(checkpoint_path=str(files["ckpt"]), postprocess=False)
    cpu = VGGishExtractor(cfg, "cpu").extract(str(files["mp4"]))["vggish"]
    gpu = VGGishExtractor(cfg, "cuda").extract(str(files["mp4"]))["vggish"]
    assert np.abs(gpu - cpu).max() / np.abs(cpu).max() < 1e-5


# -- parity with the original TensorFlow model ---------------------------------------------------
class TFVGGish:
    """The layer stack of Google's vggish_slim.py in TensorFlow 2 (eager), with the official
    checkpoint's variable names. ``__call__`` returns the pre-activation embedding, as the
    current official code does."""

    CONVS = [("conv1", 1, 64), ("conv2", 64, 128), ("conv3/conv3_1", 128, 256),
             ("conv3/conv3_2", 256, 256), ("conv4/conv4_1", 256, 512), ("conv4/conv4_2", 512, 512)]
    FCS = [("fc1/fc1_1", 12288, 4096), ("fc1/fc1_2", 4096, 4096), ("fc2", 4096, 128)]

    def __init__(self, tf, seed: int = 0) -> None:
        self.tf = tf
        rng = np.random.default_rng(seed)
        self.vars: dict[str, object] = {}
        for scope, cin, cout in self.CONVS:
            self._make(scope, rng, (3, 3, cin, cout), 9 * cin)
        for scope, cin, cout in self.FCS:
            self._make(scope, rng, (cin, cout), cin)

    def _make(self, scope: str, rng: np.random.Generator, shape: tuple, fan_in: int) -> None:
        tf = self.tf
        w = rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))
        b = (rng.standard_normal(shape[-1]) * 0.01).astype(np.float32)
        with tf.name_scope(f"vggish/{scope}"):
            self.vars[f"vggish/{scope}/weights"] = tf.Variable(w, name="weights")
            self.vars[f"vggish/{scope}/biases"] = tf.Variable(b, name="biases")

    def __call__(self, examples: np.ndarray) -> np.ndarray:
        tf, v = self.tf, self.vars
        net = tf.reshape(tf.constant(examples, tf.float32), [-1, 96, 64, 1])

        def conv(x, scope):
            y = tf.nn.conv2d(x, v[f"vggish/{scope}/weights"], strides=1, padding="SAME")
            return tf.nn.relu(y + v[f"vggish/{scope}/biases"])

        def pool(x):
            return tf.nn.max_pool2d(x, ksize=2, strides=2, padding="SAME")

        net = pool(conv(net, "conv1"))
        net = pool(conv(net, "conv2"))
        net = pool(conv(conv(net, "conv3/conv3_1"), "conv3/conv3_2"))
        net = pool(conv(conv(net, "conv4/conv4_1"), "conv4/conv4_2"))
        net = tf.reshape(net, [tf.shape(net)[0], -1])             # slim.flatten (NHWC order)
        for scope in ("fc1/fc1_1", "fc1/fc1_2"):
            net = tf.nn.relu(tf.matmul(net, v[f"vggish/{scope}/weights"]) + v[f"vggish/{scope}/biases"])
        net = tf.matmul(net, v["vggish/fc2/weights"]) + v["vggish/fc2/biases"]
        return net.numpy()

    def save_v2(self, prefix: Path) -> Path:
        """TF2-style checkpoint (``.index`` + ``.data-*``) holding the plain variable names."""
        names = [v.name.split(":")[0] for v in self.vars.values()]
        assert sorted(names) == sorted(self.vars)
        self.tf.raw_ops.SaveV2(prefix=str(prefix), tensor_names=names,
                               shape_and_slices=[""] * len(names), tensors=list(self.vars.values()))
        return prefix

    def save_v1(self, path: Path) -> Path:
        """A single-file V1 checkpoint, the format of the published vggish_model.ckpt."""
        tf = self.tf
        path.parent.mkdir(parents=True, exist_ok=True)
        values = {name: var.numpy() for name, var in self.vars.items()}
        with tf.Graph().as_default():
            # values are fed in, not baked into the graph as (huge) constants
            holders = {n: tf.compat.v1.placeholder(tf.float32, v.shape) for n, v in values.items()}
            variables = [tf.compat.v1.Variable(holders[n], name=n) for n in values]
            saver = tf.compat.v1.train.Saver(variables,
                                             write_version=tf.compat.v1.train.SaverDef.V1)
            with tf.compat.v1.Session() as sess:
                sess.run(tf.compat.v1.global_variables_initializer(),
                         feed_dict={holders[n]: values[n] for n in values})
                saver.save(sess, str(path), write_meta_graph=False)
        return path


@pytest.fixture(scope="module")
def tf_model(tmp_path_factory: pytest.TempPathFactory):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    tf = pytest.importorskip("tensorflow")
    d = tmp_path_factory.mktemp("tf_vggish")
    model = TFVGGish(tf, seed=7)
    return {"model": model,
            "v2": model.save_v2(d / "v2" / "model.ckpt"),
            "v1": model.save_v1(d / "v1" / "vggish_model.ckpt")}


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_tf_parity_end_to_end(files: dict[str, Path], tf_model: dict) -> None:
    audio = load_audio(str(files["mp4"]))
    tf_raw = tf_model["model"](numpy_log_mel_examples(audio.astype(np.float64)).astype(np.float32))
    tf_emb = np.maximum(tf_raw, 0.0)
    assert tf_emb.shape == (3, 128) and tf_emb.std() > 0
    for ckpt in (str(tf_model["v1"]), str(tf_model["v2"]) + ".index"):
        ex = VGGishExtractor(make_cfg(checkpoint_path=ckpt, batch_size=2), "cpu")
        ours = ex.extract(str(files["mp4"]))["vggish"]
        assert ours.shape == tf_emb.shape
        rel = _rel(ours, tf_emb)
        print(f"max relative error vs TensorFlow ({Path(ckpt).name}): {rel:.2e}")
        assert rel < 1e-4
    # pre-activation embeddings through the same converted weights
    net = VGGish()
    from video_features.models.vggish.weights import convert_tf_checkpoint

    net.load_state_dict(convert_tf_checkpoint(tf_model["v1"]))
    examples = mel.LogMelExamples()(torch.from_numpy(audio))
    with torch.no_grad():
        pre = net.eval()(examples, pre_activation=True).numpy()
    assert _rel(pre, tf_raw) < 1e-4


def test_convert_tf_cli(tf_model: dict, tmp_path: Path) -> None:
    from video_features.models.vggish.convert_tf import main
    from video_features.utils.weights import load_state_dict

    npz = write_random_pca(tmp_path / "vggish_pca_params.npz", seed=3)
    out = tmp_path / "conv" / "vggish.pth"
    assert main(["--ckpt", str(tf_model["v1"]), "--out", str(out), "--pca", str(npz)]) == 0
    state = load_state_dict(out)
    assert sorted(state) == PUBLIC_KEYS
    w = tf_model["model"].vars["vggish/conv2/weights"].numpy()
    assert np.array_equal(state["features.3.weight"].numpy(), w.transpose(3, 2, 0, 1))
    ev, mu = read_pca_file(out.with_name("vggish_pca_params.pth"))
    ev0, mu0 = read_pca_file(npz)
    assert torch.equal(ev, ev0) and torch.equal(mu, mu0)
    assert main(["--ckpt", str(tmp_path / "missing.ckpt"), "--out", str(out)]) == 1


def test_hop_s_frames_examples_as_the_original_framing(files: dict[str, Path]) -> None:
    """hop_s=0.48: example k is the 0.96 s example of the audio from 0.48 k s on, computed
    independently by the default front end on that slice."""
    audio = torch.from_numpy(load_audio(str(files["mp4"])))
    front = mel.LogMelExamples()
    hop = 48
    examples = front(audio, hop)
    assert len(examples) == mel.num_examples(len(audio), hop) > mel.num_examples(len(audio))
    for k in range(len(examples)):
        start = k * hop * mel.HOP
        one = front(audio[start:start + mel.EXAMPLE_SPAN])
        torch.testing.assert_close(examples[k], one[0], rtol=0, atol=1e-5)
    ex = VGGishExtractor(make_cfg(checkpoint_path=str(files["ckpt"]), hop_s=0.48), "cpu")
    out = ex.extract(str(files["mp4"]))
    assert len(out["vggish"]) == len(examples)
    np.testing.assert_allclose(out["timestamps_ms"][:, 0], np.arange(len(examples)) * 480.0)
    np.testing.assert_allclose(out["timestamps_ms"][:, 1] - out["timestamps_ms"][:, 0], 960.0)
    # the overlapping rows equal the back-to-back ones where they coincide (every other row)
    plain = VGGishExtractor(make_cfg(checkpoint_path=str(files["ckpt"])), "cpu").extract(str(files["mp4"]))
    assert _rel(out["vggish"][::2][:len(plain["vggish"])], plain["vggish"]) < 1e-5


@pytest.mark.parametrize("hop", [0.0, -0.96, 0.005, 0.123])
def test_hop_s_must_be_a_positive_multiple_of_10_ms(files: dict[str, Path], hop: float) -> None:
    with pytest.raises(ConfigError, match="hop_s"):
        VGGishExtractor.validate(make_cfg(hop_s=hop))


def test_reference_form_saves_no_timestamps(files: dict[str, Path]) -> None:
    ex = VGGishExtractor(make_cfg(checkpoint_path=str(files["ckpt"]), timestamps_form="reference"),
                         "cpu")
    assert ex.output_keys == ("vggish",) and set(ex.extract(str(files["wav"]))) == {"vggish"}
