"""tv_video: torchvision's Kinetics-400 video models, checked against torchvision itself.

Checkpoints are the state dicts of torchvision's own networks built with ``weights=None``
(seeded), written where the real files are cached (a private torch hub cache for this module,
since other feature types cache files of the same names) and loaded through the card. Features
are compared with torchvision's forward on the same weights, fed by the Weights entry's own
``transforms()`` on the same decoded frames: the input of the final classifier layer, caught by
a hook. Frames are tiny (upsampled to the crop); MViT runs at its only size, 16 x 224 x 224.
"""
from __future__ import annotations

import av
import numpy as np
import pytest
import torch

from video_features.models.tv_video.extractor import PREPROCESS_FRAMES, TVVideoExtractor, preprocess
from video_features.models.tv_video.weights import (MODEL_NAMES, SPECS, build_torchvision, labels, spec_for,
                                     write_random_checkpoint)
from video_features.utils.config import make_config
from video_features.utils.errors import ConfigError, VideoError, WeightsError

CPU = torch.device("cpu")
FPS = 15.0
W, H = 64, 48


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    home = tmp_path_factory.mktemp("tv_video_torch_home")
    mp.setenv("TORCH_HOME", str(home))
    path = home / "hub" / "checkpoints"
    path.mkdir(parents=True)
    yield path
    mp.undo()


@pytest.fixture(scope="module")
def weights(hub):
    """``weights(model_name)``: the random checkpoint at its card's cache path, as a state dict."""
    made: dict = {}

    def get(name: str) -> dict:
        if name not in made:
            path = write_random_checkpoint(hub / spec_for(name).card.filename, name,
                                           seed=len(made) + 1)
            made[name] = torch.load(path, weights_only=True)
        return made[name]

    return get


def _cfg(**kw):
    base = dict(timestamps_form="reference", video_paths=["x"], device="cpu", batch_size=2)
    base.update(kw)
    return make_config("tv_video", **base)


def decode_rgb(path) -> torch.Tensor:
    """(T, 3, H, W) uint8, every frame."""
    with av.open(str(path)) as c:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    return torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()


def torchvision_forward(name: str, state: dict, clips: torch.Tensor):
    """(B, T, 3, H, W) uint8 clips -> (pre-classifier features, logits), all torchvision's."""
    import torchvision

    net = build_torchvision(name)
    net.load_state_dict(state)
    net.eval()
    x = torchvision.models.get_weight(spec_for(name).weights).transforms()(clips)
    last = {"fc": lambda n: n.fc, "classifier": lambda n: n.classifier[1],
            "head": lambda n: n.head[1] if isinstance(n.head, torch.nn.Sequential) else n.head}
    layer = last[spec_for(name).head_attr](net)
    seen = []
    hook = layer.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    try:
        with torch.no_grad():
            logits = net(x)
    finally:
        hook.remove()
    feats = seen[0]
    if feats.ndim == 5:  # S3D's 1x1x1 convolution reads (B, 1024, T', 1, 1); it means over T'
        feats = feats.mean(dim=(2, 3, 4))
    return feats, logits


def max_rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# -- the cards against torchvision's Weights entries ------------------------------------------
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_cards_match_torchvision_weights(name):
    import torchvision

    spec = spec_for(name)
    entry = torchvision.models.get_weight(spec.weights)
    assert entry is getattr(type(entry), "DEFAULT")
    card = spec.card
    assert card.url == entry.url and card.url.endswith("/" + card.filename)
    assert card.filename.rsplit("-", 1)[1] == card.sha256 + ".pth" and len(card.sha256) == 8
    tf = entry.transforms()
    assert (tuple(tf.crop_size), tuple(tf.resize_size)) == (spec.crop, spec.resize)
    assert (tuple(tf.mean), tuple(tf.std)) == (spec.mean, spec.std)
    assert str(tf.interpolation) == "InterpolationMode.BILINEAR"
    docs = entry.meta["_docs"]
    assert f"frame_rate={spec.frame_rate:g}`" in docs
    # S3D is documented at its evaluation clip (128); we take its training clip, 64
    assert f"clip_len={128 if name == 's3d' else spec.clip_len}`" in docs
    assert spec.min_frames == entry.meta.get("min_temporal_size", 1)
    assert len(entry.meta["categories"]) == 400 and labels(name) == entry.meta["categories"]
    with torch.device("meta"):  # architecture only, no memory
        net = build_torchvision(name)
    keys = net.state_dict()
    head = getattr(net, spec.head_attr)
    final = [m for m in head.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv3d))]
    dim = final[0].in_channels if isinstance(final[0], torch.nn.Conv3d) else final[0].in_features
    assert len(final) == 1 and dim == spec.feature_dim
    named = [w.strip(" ,()") for w in card.layout.split() if "." in w and "..." not in w]
    assert named and all(k.rstrip(",") in keys for k in named), named


# -- preprocessing --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["r2plus1d_18", "s3d", "mvit_v2_s", "swin3d_t"])
@pytest.mark.parametrize("w,h", [(W, H), (H, W), (90, 50)])
def test_preprocessing_equals_the_weights_transform(name, w, h):
    import torchvision

    g = torch.Generator().manual_seed(w * h)
    u8 = torch.randint(0, 256, (PREPROCESS_FRAMES + 3, 3, h, w), dtype=torch.uint8, generator=g)
    want = torchvision.models.get_weight(spec_for(name).weights).transforms()(u8)  # (C, T, h, w)
    ours = preprocess(u8, spec_for(name))
    assert ours.shape == (len(u8), 3, *spec_for(name).crop)
    torch.testing.assert_close(ours, want.permute(1, 0, 2, 3), rtol=0, atol=1e-6)


# -- features against torchvision's forward --------------------------------------------------
# model, frames, stack_size, step_size (None: the model's own), video size
PARITY = [
    ("r2plus1d_18", 24, None, 8, (W, H)),     # the default: 16-frame clips, overlapping
    ("r3d_18", 10, 4, 3, (90, 50)),
    ("mc3_18", 9, 4, 5, (H, W)),              # a gap between clips, portrait frames
    ("s3d", 14, 14, None, (W, H)),            # its fewest frames
    ("swin3d_t", 6, 4, 2, (W, H)),
    ("mvit_v2_s", 32, None, None, (W, H)),    # 16 frames at 7.5 fps from a 15 fps video
]


@pytest.mark.parametrize("name,n,stack,step,size", PARITY, ids=[p[0] for p in PARITY])
def test_features_match_torchvision(name, n, stack, step, size, weights, make_video, capsys):
    state = weights(name)
    path = make_video(f"tv_{name}.mp4", n_frames=n, fps=FPS, width=size[0], height=size[1])
    ex = TVVideoExtractor(_cfg(model_name=name, stack_size=stack, step_size=step,
                               show_pred=True), CPU)
    out = ex.extract(str(path))
    spec = spec_for(name)
    stack, step = ex.cfg.stack_size, ex.cfg.step_size
    frames = decode_rgb(path)[::round(FPS / spec.frame_rate)]  # the frames the rate picks
    starts = list(range(0, len(frames) - stack + 1, step))
    assert list(out) == ["tv_video", "fps", "timestamps_ms"]
    assert out["tv_video"].shape == (len(starts), spec.feature_dim)
    assert out["tv_video"].dtype == np.float32 and float(out["fps"]) == spec.frame_rate
    np.testing.assert_allclose(out["timestamps_ms"],
                               [(s + stack - 1) / spec.frame_rate * 1000 for s in starts])

    clips = torch.stack([frames[s:s + stack] for s in starts])
    want, logits = torchvision_forward(name, state, clips)
    assert max_rel(out["tv_video"], want) < 1e-4
    if len(starts) > 1:  # the check has teeth: clips differ
        assert max_rel(want[0], want[1]) > 1e-3
    with torch.no_grad():
        ours_logits = ex.net.head(torch.from_numpy(out["tv_video"]))
    assert max_rel(ours_logits, logits) < 1e-4

    # show_pred: top-5 of torchvision's categories per clip, with torchvision's probabilities
    lines = [ln for ln in capsys.readouterr().out.splitlines() if " clip #" in ln]
    assert len(lines) == len(starts)
    names, probs = labels(name), torch.softmax(logits, -1)
    for row, ln in enumerate(lines):
        preds = ln.split(" clip #", 1)[1].split(": ", 1)[1].split("  ")
        top = probs[row].topk(5)
        assert [p.rsplit(": ", 1)[0] for p in preds] == [names[i] for i in top.indices]
        np.testing.assert_allclose([float(p.rsplit(": ", 1)[1]) for p in preds],
                                   top.values.numpy(), atol=1e-3)


# -- options --------------------------------------------------------------------------------
def test_defaults_are_each_models_own():
    cfg = make_config("tv_video", video_paths=["a.mp4"], device="cpu")
    assert cfg.model_name == "r2plus1d_18" and cfg.batch_size == 1 and cfg.tail == "drop"
    want = {"r3d_18": (16, 15.0), "mc3_18": (16, 15.0), "r2plus1d_18": (16, 15.0),
            "s3d": (64, 15.0), "mvit_v1_b": (16, 7.5), "mvit_v2_s": (16, 7.5),
            "swin3d_t": (32, 15.0), "swin3d_s": (32, 15.0), "swin3d_b": (32, 15.0)}
    assert set(want) == set(SPECS)
    for name, (clip, fps) in want.items():
        cfg = _cfg(model_name=name)
        assert (cfg.stack_size, cfg.step_size, cfg.extraction_fps) == (clip, clip, fps)
        assert TVVideoExtractor.weights_for(cfg)["tv_video"] == (spec_for(name).card, None)
    assert _cfg(stack_size=8).step_size == 8                 # back-to-back clips of the size used
    assert _cfg(model_fps=False).extraction_fps is None      # the native rate
    assert _cfg(extraction_fps=25).extraction_fps == 25.0    # explicit wins
    cfg = _cfg(extraction_total=40)
    assert cfg.extraction_fps is None and cfg.extraction_total == 40


@pytest.mark.parametrize("option,value,match", [
    ("model_name", "r2plus1d_34", "model_name"),
    ("stack_size", 0, "stack_size"),
    ("step_size", 0, "step_size"),
    ("tail", "x", "tail"),
    ("model_fps", "maybe", "model_fps"),
])
def test_invalid_options_name_the_option(option, value, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(**{option: value})


def test_clip_length_limits():
    with pytest.raises(ConfigError, match=r"stack_size=8: mvit_v1_b takes clips of exactly 16"):
        _cfg(model_name="mvit_v1_b", stack_size=8)
    with pytest.raises(ConfigError, match=r"stack_size=13: s3d needs at least 14"):
        _cfg(model_name="s3d", stack_size=13)
    assert _cfg(model_name="swin3d_b", stack_size=1).stack_size == 1


# -- weights --------------------------------------------------------------------------------
def test_missing_weights_name_the_url(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    card = spec_for("mc3_18").card
    with pytest.raises(WeightsError) as ei:
        TVVideoExtractor(_cfg(model_name="mc3_18"), CPU)
    assert card.url in str(ei.value) and f"hub/checkpoints/{card.filename}" in str(ei.value)
    # random weights only on explicit request, in torchvision's own layout and init
    ex = TVVideoExtractor(_cfg(model_name="mc3_18", allow_random_weights=True), CPU)
    assert ex.net.classifier.in_features == 512


def test_checkpoint_path_is_loaded_strictly(weights, tmp_path):
    state = weights("r3d_18")
    ex = TVVideoExtractor(_cfg(model_name="r3d_18", checkpoint_path=str(
        write_random_checkpoint(tmp_path / "mine.pth", "r3d_18", seed=9))), CPU)
    assert not torch.equal(ex.net.classifier.weight, state["fc.weight"])
    torch.save({k: v for k, v in state.items() if not k.startswith("fc.")}, tmp_path / "cut.pth")
    with pytest.raises(WeightsError, match="2 missing"):
        TVVideoExtractor(_cfg(model_name="r3d_18", checkpoint_path=str(tmp_path / "cut.pth")), CPU)


# -- bad input and the real pipeline --------------------------------------------------------
def test_bad_inputs_raise_video_error(weights, make_video, tmp_path):
    weights("r3d_18")
    ex = TVVideoExtractor(_cfg(model_name="r3d_18", stack_size=4), CPU)
    short = make_video("tv_short.mp4", n_frames=3, fps=FPS, width=W, height=H)
    with pytest.raises(VideoError, match=r"too short: fewer than stack_size=4 frames \(3 at 15 fps\)"):
        ex.extract(str(short))
    bad = tmp_path / "notavideo.mp4"
    bad.write_text("hello")
    with pytest.raises(VideoError):
        ex.extract(str(bad))
    out = TVVideoExtractor(_cfg(model_name="r3d_18", stack_size=4, tail="pad"),
                           CPU).extract(str(short))
    assert out["tv_video"].shape == (1, 512)
    np.testing.assert_allclose(out["timestamps_ms"], [2 / FPS * 1000])


def test_runner_saves_numpy_and_a_short_video_fails_alone(weights, make_video, tmp_path):
    from video_features.utils.runner import run

    weights("r3d_18")
    video = make_video("tv_run.mp4", n_frames=30, fps=30.0, width=W, height=H)
    short = make_video("tv_short.mp4", n_frames=3, fps=FPS, width=W, height=H)
    out_dir = tmp_path / "out"
    cfg = _cfg(model_name="r3d_18", stack_size=4, video_paths=[str(video), str(short)],
               on_extraction="save_numpy", output_path=str(out_dir), decoders=2, progress=False)
    summary = run(cfg)
    assert summary.count("done") == 1 and summary.count("failed") == 1
    assert summary.failed[0].path == str(short) and "too short" in summary.failed[0].reason
    files = {p.name: np.load(p) for p in (out_dir / "tv_video").rglob("*.npy")}
    assert sorted(files) == ["tv_run_fps.npy", "tv_run_timestamps_ms.npy", "tv_run_tv_video.npy"]
    direct = TVVideoExtractor(_cfg(model_name="r3d_18", stack_size=4), CPU).extract(str(video))
    # 1 s of a 30 fps video at the model's 15 fps: 15 frames, 3 clips of 4
    assert float(files["tv_run_fps.npy"]) == 15.0 and direct["tv_video"].shape == (3, 512)
    np.testing.assert_allclose(files["tv_run_tv_video.npy"], direct["tv_video"], rtol=0,
                               atol=1e-5 * np.abs(direct["tv_video"]).max())
    np.testing.assert_array_equal(files["tv_run_timestamps_ms.npy"], direct["timestamps_ms"])


class _Probe(torch.nn.Module):
    """The "feature" of a clip: the mean of each of its frames (one number per frame, zero-padded
    to the model's feature size)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:    # (B, C, T, H, W)
        m = x.mean(dim=(1, 3, 4))
        return torch.nn.functional.pad(m, (0, self.dim - m.shape[1]))


@pytest.mark.parametrize("name", ["r3d_18", "swin3d_t"])
def test_crops_are_views_of_the_weights_transform(make_video, monkeypatch, name):
    from tests.crop_checks import check_views

    monkeypatch.setattr("video_features.models.tv_video.extractor.load_network",
                        lambda cfg, device: _Probe(spec_for(name).feature_dim))
    path = make_video("tv_crops.mp4", n_frames=20, fps=FPS, width=W, height=H)
    runs = {crops: TVVideoExtractor(_cfg(model_name=name, stack_size=8, crops=crops), CPU)
            .extract(str(path)) for crops in ("center", "10")}
    check_views(runs["10"]["tv_video"], runs["center"]["tv_video"], 10, mirror_equal=True)
