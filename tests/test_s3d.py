"""S3D clip features, both weight families.

Checkpoints are random weights (BatchNorm statistics randomised too, so that swapped tensors of
equal shape show) in the two published layouts, written where the real files are cached (or
passed as checkpoint_path), so the extractor loads them through the real path:

* kylemin/S3D keys (the reference tool's ``S3D_kinetics400_torchified.pt``), made by
  :class:`KyleminS3D` below: an independent re-statement of the reference tool's layer stack
  and forward (module names give the key names), the check of both the key conversion and the
  pooling;
* torchvision's ``S3D`` state dict, checked against torchvision's own forward and its Weights
  entry's transform.

S3D needs 13 frames per stack and 224x224 input (frames are upsampled), so forwards are few.
"""
from __future__ import annotations

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from video_features.models.s3d.extractor import S3DExtractor, preprocess_reference, preprocess_torchvision
from video_features.models.s3d.net import MIN_FRAMES, temporal_length
from video_features.models.s3d.weights import (REFERENCE_CARD, TORCHVISION_CARD, convert_kylemin, detect_layout,
                                kylemin_key, labels, load_s3d)
from video_features.utils.config import make_config
from video_features.utils.errors import ConfigError, VideoError, WeightsError

CPU = torch.device("cpu")
FPS = 25.0
W, H = 64, 48


# -- an independent kylemin/S3D layer stack (the reference tool's s3d_src/s3d.py, restated) ----
class KyBasic(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, 1, bias=False)
        self.bn = nn.BatchNorm3d(cout, eps=1e-3, momentum=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class KySep(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, s: int, p: int):
        super().__init__()
        self.conv_s = nn.Conv3d(cin, cout, (1, k, k), (1, s, s), (0, p, p), bias=False)
        self.bn_s = nn.BatchNorm3d(cout, eps=1e-3, momentum=1e-3)
        self.conv_t = nn.Conv3d(cout, cout, (k, 1, 1), (s, 1, 1), (p, 0, 0), bias=False)
        self.bn_t = nn.BatchNorm3d(cout, eps=1e-3, momentum=1e-3)

    def forward(self, x):
        return F.relu(self.bn_t(self.conv_t(F.relu(self.bn_s(self.conv_s(x))))))


class KyMixed(nn.Module):
    def __init__(self, cin, b0, b1m, b1, b2m, b2, b3):
        super().__init__()
        self.branch0 = nn.Sequential(KyBasic(cin, b0))
        self.branch1 = nn.Sequential(KyBasic(cin, b1m), KySep(b1m, b1, 3, 1, 1))
        self.branch2 = nn.Sequential(KyBasic(cin, b2m), KySep(b2m, b2, 3, 1, 1))
        self.branch3 = nn.Sequential(nn.MaxPool3d(3, 1, 1), KyBasic(cin, b3))

    def forward(self, x):
        return torch.cat([self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(x)], 1)


# Mixed_3b ... Mixed_5c of the S3D paper: in, 1x1, 3x3 reduce, 3x3, 3x3 reduce, 3x3, pool proj
_MIXED = [(192, 64, 96, 128, 16, 32, 32), (256, 128, 128, 192, 32, 96, 64),
          (480, 192, 96, 208, 16, 48, 64), (512, 160, 112, 224, 24, 64, 64),
          (512, 128, 128, 256, 24, 64, 64), (512, 112, 144, 288, 32, 64, 64),
          (528, 256, 160, 320, 32, 128, 128), (832, 256, 160, 320, 32, 128, 128),
          (832, 384, 192, 384, 48, 128, 128)]


class KyleminS3D(nn.Module):
    def __init__(self):
        super().__init__()
        m = [KyMixed(*c) for c in _MIXED]
        self.base = nn.Sequential(
            KySep(3, 64, 7, 2, 3), nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)), KyBasic(64, 64),
            KySep(64, 192, 3, 1, 1), nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)), m[0], m[1],
            nn.MaxPool3d(3, 2, 1), m[2], m[3], m[4], m[5], m[6], nn.MaxPool3d(2, 2, 0), m[7], m[8])
        self.fc = nn.Sequential(nn.Conv3d(1024, 400, 1, bias=True))

    def forward(self, x):
        """(features, logits) as the reference's forward(features=True / False) computes them:
        average over 2 time steps and the whole plane, then (classifier and) mean over time."""
        y = self.base(x)
        y = F.avg_pool3d(y, (2, y.size(3), y.size(4)), stride=1)
        feats = y.flatten(2).mean(2)
        logits = self.fc(y).flatten(2).mean(2)
        return feats, logits


def _randomise(net: nn.Module, seed: int) -> nn.Module:
    """Random convolutions and BatchNorm parameters/statistics (seeded), eval mode."""
    g = torch.Generator().manual_seed(seed)
    for mod in net.modules():
        if isinstance(mod, nn.Conv3d):
            fan_in = mod.weight[0].numel()
            mod.weight.data = torch.randn(mod.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5
            if mod.bias is not None:
                mod.bias.data = torch.randn(mod.bias.shape, generator=g) * 0.1
        elif isinstance(mod, nn.BatchNorm3d):
            n = mod.num_features
            mod.weight.data = 0.5 + torch.rand(n, generator=g)
            mod.bias.data = torch.randn(n, generator=g) * 0.1
            mod.running_mean = torch.randn(n, generator=g) * 0.1
            mod.running_var = 0.5 + torch.rand(n, generator=g)
    return net.eval()


@pytest.fixture(scope="module")
def kylemin_net():
    return _randomise(KyleminS3D(), seed=1)


@pytest.fixture(scope="module")
def kylemin_file(hub_checkpoints, kylemin_net):
    """The random kylemin-layout checkpoint, where the reference card's file is cached."""
    path = hub_checkpoints / REFERENCE_CARD.filename
    torch.save(kylemin_net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def tv_net():
    import torchvision

    return _randomise(torchvision.models.video.s3d(weights=None), seed=2)


@pytest.fixture(scope="module")
def tv_file(hub_checkpoints, tv_net):
    path = hub_checkpoints / TORCHVISION_CARD.filename
    torch.save(tv_net.state_dict(), path)
    return path


def _cfg(**kw):
    base = dict(timestamps_form="reference", video_paths=["x"], device="cpu", stack_size=13, step_size=13, batch_size=2)
    base.update(kw)
    return make_config("s3d", **base)


def decode_rgb(path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def reference_recipe(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (3, T, h, w), the reference tool's transform written out: whole
    clip as (C, T, H, W) / 255, interpolate by the scale factor, torchvision-style centre crop."""
    vid = torch.from_numpy(frames).permute(3, 0, 1, 2).to(torch.float32) / 255
    scale = 224.0 / min(vid.shape[-2:])
    vid = F.interpolate(vid, scale_factor=scale, mode="bilinear", align_corners=False,
                        recompute_scale_factor=False)
    h, w = vid.shape[-2:]
    i, j = int(round((h - 224) / 2.0)), int(round((w - 224) / 2.0))
    return vid[..., i:i + 224, j:j + 224]


def expected_stack_ends(n: int, stack: int, step: int, tail: str) -> list[int]:
    ends, s = [], 0
    while s + stack <= n:
        ends.append(s + stack - 1)
        s += step
    if tail == "pad" and s < n:
        ends.append(n - 1)
    return ends


@pytest.fixture(scope="module")
def video26(make_video):
    return make_video("s3d26.mp4", n_frames=26, fps=FPS, width=W, height=H)


# -- layouts --------------------------------------------------------------------------------
def test_kylemin_layout_converts_onto_torchvision_s3d(kylemin_net):
    import torchvision

    state = kylemin_net.state_dict()
    # the layout of the reference's checkpoint, as its source names the modules
    assert len(state) == 464
    for key, shape in {"base.0.conv_s.weight": (64, 3, 1, 7, 7),
                       "base.0.conv_t.weight": (64, 64, 7, 1, 1),
                       "base.2.bn.running_var": (64,),
                       "base.5.branch3.1.conv.weight": (32, 192, 1, 1, 1),
                       "base.15.branch1.1.conv_t.weight": (384, 384, 3, 1, 1),
                       "fc.0.weight": (400, 1024, 1, 1, 1), "fc.0.bias": (400,)}.items():
        assert tuple(state[key].shape) == shape
    assert kylemin_key("base.5.branch0.0.bn.running_mean") == "features.5.branch0.1.running_mean"
    assert kylemin_key("base.3.bn_t.weight") == "features.3.1.1.weight"
    assert kylemin_key("base.15.branch2.1.conv_s.weight") == "features.15.branch2.1.0.0.weight"
    assert kylemin_key("fc.0.bias") == "classifier.1.bias"

    tv = torchvision.models.video.s3d(weights=None)
    converted = convert_kylemin(state)
    tv.load_state_dict(converted, strict=True)   # every key found, every shape right
    for k, v in state.items():
        assert torch.equal(tv.state_dict()[kylemin_key(k)], v)
    # kylemin's own file may carry DataParallel's prefix
    prefixed = {"module." + k: v for k, v in state.items()}
    assert detect_layout(prefixed) == "kylemin" and convert_kylemin(prefixed).keys() == converted.keys()
    assert detect_layout(tv.state_dict()) == "torchvision"
    with pytest.raises(WeightsError, match="known layout"):
        detect_layout({"conv1.weight": torch.zeros(1)})


# -- preprocessing --------------------------------------------------------------------------
@pytest.mark.parametrize("w,h", [(W, H), (90, 50), (150, 110)])
def test_reference_preprocessing_matches_the_recipe(make_video, w, h):
    frames = decode_rgb(make_video(f"s3d_pp{w}x{h}.mp4", n_frames=3, width=w, height=h))
    ours = preprocess_reference(torch.from_numpy(frames).permute(0, 3, 1, 2))
    want = reference_recipe(frames).permute(1, 0, 2, 3)          # -> (T, C, h, w)
    # a 110-pixel short side scales to 223 rows (224 / 110 * 110 floors): kept as the reference does
    assert ours.shape == want.shape == (3, 3, 223 if h == 110 else 224, 224)
    torch.testing.assert_close(ours, want, rtol=0, atol=1e-6)
    assert 0 <= float(ours.min()) and float(ours.max()) <= 1
    sym = preprocess_reference(torch.from_numpy(frames).permute(0, 3, 1, 2), symmetric=True)
    torch.testing.assert_close(sym, want * 2 - 1, rtol=0, atol=1e-6)


@pytest.mark.parametrize("w,h", [(W, H), (90, 50)])
def test_torchvision_preprocessing_matches_the_weights_transform(make_video, w, h):
    from torchvision.models.video import S3D_Weights

    frames = decode_rgb(make_video(f"s3d_pp{w}x{h}.mp4", n_frames=3, width=w, height=h))
    u8 = torch.from_numpy(frames).permute(0, 3, 1, 2)
    want = S3D_Weights.KINETICS400_V1.transforms()(u8.contiguous())   # (C, T, 224, 224)
    ours = preprocess_torchvision(u8)
    assert ours.shape == (3, 3, 224, 224)
    torch.testing.assert_close(ours, want.permute(1, 0, 2, 3), rtol=0, atol=1e-6)


# -- features against the upstream forwards ----------------------------------------------------
@pytest.fixture(scope="module")
def reference_run(kylemin_file, video26):
    """Our extraction with the default (reference) weights: 26 frames, stacks of 13 -> 2."""
    ex = S3DExtractor(_cfg(), CPU)
    return ex, ex.extract(str(video26))


def test_reference_weights_match_the_kylemin_forward(reference_run, kylemin_net, video26):
    ex, out = reference_run
    assert ex.layout == "kylemin"
    assert list(out) == ["s3d", "fps", "timestamps_ms"]
    assert out["s3d"].shape == (2, 1024) and out["s3d"].dtype == np.float32
    assert float(out["fps"]) == FPS and ex.frames_read == 26
    np.testing.assert_allclose(out["timestamps_ms"], [12 / FPS * 1000, 25 / FPS * 1000])

    clip = reference_recipe(decode_rgb(video26))                # (3, 26, 224, 224)
    stacks = torch.stack([clip[:, :13], clip[:, 13:26]])        # (B, C, T, H, W)
    with torch.no_grad():
        want, logits = kylemin_net(stacks)
        ours_logits = ex.net.head(torch.from_numpy(out["s3d"]))
    scale = float(want.abs().max())
    np.testing.assert_allclose(out["s3d"], want.numpy(), rtol=0, atol=1e-4 * scale)
    torch.testing.assert_close(ours_logits, logits, rtol=0, atol=1e-4 * float(logits.abs().max()))
    assert float((want[0] - want[1]).abs().max()) > 1e-2 * scale   # the check has teeth


def test_torchvision_weights_match_torchvision_forward(tv_file, tv_net, make_video, capsys):
    from torchvision.models.video import S3D_Weights

    path = make_video("s3d_tv.mp4", n_frames=28, fps=FPS, width=90, height=50)
    # 21-frame stacks leave 3 time steps, so the 2-step windows weigh the middle one double
    # (a plain mean over time would differ); stacks at frames 0 and 7 overlap
    assert temporal_length(21) == 3
    ex = S3DExtractor(_cfg(weights="torchvision", show_pred=True, stack_size=21, step_size=7), CPU)
    out = ex.extract(str(path))
    assert ex.layout == "torchvision" and out["s3d"].shape == (2, 1024)
    np.testing.assert_allclose(out["timestamps_ms"], [20 / FPS * 1000, 27 / FPS * 1000])

    u8 = torch.from_numpy(decode_rgb(path)).permute(0, 3, 1, 2).contiguous()
    x = S3D_Weights.KINETICS400_V1.transforms()(torch.stack([u8[:21], u8[7:28]]))  # (B, C, T, H, W)
    pooled = []
    hook = tv_net.avgpool.register_forward_hook(lambda m, i, o: pooled.append(o))
    try:
        with torch.no_grad():
            logits = tv_net(x)                                  # torchvision's own forward
    finally:
        hook.remove()
    want = pooled[0].mean(dim=(2, 3, 4))                        # the classifier's input, over time
    np.testing.assert_allclose(out["s3d"], want.numpy(), rtol=0,
                               atol=1e-4 * float(want.abs().max()))
    with torch.no_grad():
        ours_logits = ex.net.head(torch.from_numpy(out["s3d"]))
    torch.testing.assert_close(ours_logits, logits, rtol=0, atol=1e-4 * float(logits.abs().max()))

    # show_pred: top-5 Kinetics classes per stack, numbered, with torchvision's probabilities
    lines = [ln for ln in capsys.readouterr().out.splitlines() if " stack #" in ln]
    assert [ln.split(" stack #")[1].split(":")[0] for ln in lines] == ["0", "1"]
    names, probs = labels(), torch.softmax(logits, -1)
    assert len(names) == 400
    for row, ln in enumerate(lines):
        preds = ln.split(" stack #", 1)[1].split(": ", 1)[1].split("  ")
        top = probs[row].topk(5)
        assert [p.rsplit(": ", 1)[0] for p in preds] == [names[i] for i in top.indices]
        np.testing.assert_allclose([float(p.rsplit(": ", 1)[1]) for p in preds],
                                   top.values.numpy(), atol=1e-3)


def test_checkpoint_path_is_recognised_by_its_keys(kylemin_file, tv_file, kylemin_net, tmp_path):
    # a kylemin file given with weights=torchvision: its keys decide, so does the preprocessing
    ex = S3DExtractor(_cfg(weights="torchvision", checkpoint_path=str(kylemin_file)), CPU)
    assert ex.layout == "kylemin"
    assert S3DExtractor.weights_for(ex.cfg)["s3d"][0] is REFERENCE_CARD
    frames = torch.randint(0, 256, (2, 3, H, W), dtype=torch.uint8)
    torch.testing.assert_close(ex.preprocess(frames), preprocess_reference(frames))
    ex = S3DExtractor(_cfg(checkpoint_path=str(tv_file)), CPU)
    assert ex.layout == "torchvision"
    assert S3DExtractor.weights_for(ex.cfg)["s3d"][0] is TORCHVISION_CARD
    torch.testing.assert_close(ex.preprocess(frames), preprocess_torchvision(frames))

    # kylemin's original form: DataParallel prefix, no BatchNorm counters
    state = {"module." + k: v for k, v in kylemin_net.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "S3D_kinetics400.pt")
    cfg = _cfg(checkpoint_path=str(tmp_path / "S3D_kinetics400.pt"))
    assert S3DExtractor(cfg, CPU).layout == "kylemin"
    # the network as loaded (the extractor folds its BatchNorms into the convolutions on CPUs)
    net, layout = load_s3d(cfg, CPU)
    got = net.net.state_dict()
    assert layout == "kylemin"
    for k, v in state.items():
        assert torch.equal(got[kylemin_key(k[len("module."):])], v)

    torch.save({"conv1.weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(WeightsError, match="not an S3D checkpoint"):
        S3DExtractor(_cfg(checkpoint_path=str(tmp_path / "other.pt")), CPU)


# -- windows, timestamps, errors (a probe stands in for the network) --------------------------
class _Probe(nn.Module):
    """The "feature" of a stack: the mean of each of its frames (zero-padded to 1024)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:    # (B, C, T, H, W)
        m = x.mean(dim=(1, 3, 4))
        return F.pad(m, (0, 1024 - m.shape[1]))


@pytest.fixture
def probe(monkeypatch):
    monkeypatch.setattr("video_features.models.s3d.extractor.load_s3d", lambda cfg, device: (_Probe(), "kylemin"))


@pytest.mark.parametrize("n,stack,step,tail", [
    (30, 13, 13, "drop"),
    (30, 13, 5, "drop"),    # overlapping, across the 16-frame decoding chunks
    (30, 13, 20, "pad"),    # a gap, then a padded tail stack
    (39, 13, 13, "pad"),    # nothing left over: no extra stack
])
def test_window_counts_timestamps_and_contents(make_video, probe, n, stack, step, tail):
    path = make_video(f"s3d{n}.mp4", n_frames=n, fps=FPS, width=W, height=H)
    frame_mean = preprocess_reference(
        torch.from_numpy(decode_rgb(path)).permute(0, 3, 1, 2)).mean(dim=(1, 2, 3)).numpy()
    out = S3DExtractor(_cfg(stack_size=stack, step_size=step, tail=tail, batch_size=3),
                       CPU).extract(str(path))
    ends = expected_stack_ends(n, stack, step, tail)
    assert out["s3d"].shape == (len(ends), 1024)
    np.testing.assert_allclose(out["timestamps_ms"], np.array(ends) / FPS * 1000)
    for k, row in enumerate(out["s3d"]):
        idx = np.minimum(np.arange(k * step, k * step + stack), n - 1)
        np.testing.assert_allclose(row[:stack], frame_mean[idx], rtol=0, atol=1e-6)
        assert not row[stack:].any()


def test_extraction_fps_default_resamples_to_25(make_video, probe):
    path = make_video("s3d_50fps.mp4", n_frames=40, fps=50.0, width=W, height=H)
    cfg = _cfg(stack_size=13, step_size=13)
    assert cfg.extraction_fps == 25.0                  # the reference's default
    out = S3DExtractor(cfg, CPU).extract(str(path))
    # 0.8 s at 25 fps: 20 frames, one stack of 13
    assert float(out["fps"]) == 25.0 and out["s3d"].shape == (1, 1024)
    np.testing.assert_allclose(out["timestamps_ms"], [12 / 25 * 1000])


def test_too_short_raises_video_error(make_video, probe):
    path = make_video("s3d10.mp4", n_frames=10, fps=FPS, width=W, height=H)
    with pytest.raises(VideoError, match=r"too short: fewer than stack_size=13 frames \(10 at 25 fps\)"):
        S3DExtractor(_cfg(), CPU).extract(str(path))
    out = S3DExtractor(_cfg(tail="pad"), CPU).extract(str(path))
    assert out["s3d"].shape == (1, 1024)
    np.testing.assert_allclose(out["timestamps_ms"], [9 / FPS * 1000])


def test_minimum_stack_size():
    # 13 frames are the fewest the final 2-step pool accepts
    assert temporal_length(MIN_FRAMES) == 2 and temporal_length(MIN_FRAMES - 1) == 1
    assert temporal_length(64) == 8
    with pytest.raises(ConfigError, match="stack_size"):
        _cfg(stack_size=MIN_FRAMES - 1)


@pytest.mark.parametrize("option,value", [("weights", "kinetics"), ("input_range", "x"),
                                          ("step_size", 0), ("tail", "x")])
def test_invalid_options_name_the_option(option, value):
    with pytest.raises(ConfigError, match=option):
        _cfg(**{option: value})
    with pytest.raises(ConfigError, match="input_range"):
        _cfg(weights="torchvision", input_range="symmetric")


def test_defaults_are_the_reference_tools():
    cfg = make_config("s3d", video_paths=["a.mp4"], device="cpu")
    assert (cfg.stack_size, cfg.step_size, cfg.extraction_fps, cfg.tail) == (64, 64, 25.0, "drop")
    assert (cfg.weights, cfg.input_range) == ("reference", "unit")
    assert S3DExtractor.weights_for(cfg)["s3d"] == (REFERENCE_CARD, None)


def test_missing_weights_name_the_url(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    for weights, card in (("reference", REFERENCE_CARD), ("torchvision", TORCHVISION_CARD)):
        with pytest.raises(WeightsError) as ei:
            S3DExtractor(_cfg(weights=weights), CPU)
        assert card.url in str(ei.value) and f"hub/checkpoints/{card.filename}" in str(ei.value)


# -- the real multi-process pipeline --------------------------------------------------------
def test_runner_saves_numpy_and_a_short_video_fails_alone(reference_run, video26, make_video,
                                                         tmp_path):
    from video_features.utils.runner import run

    short = make_video("s3d_short.mp4", n_frames=8, fps=FPS, width=W, height=H)
    out_dir = tmp_path / "out"
    cfg = _cfg(video_paths=[str(video26), str(short)], on_extraction="save_numpy",
               output_path=str(out_dir), decoders=2)
    summary = run(cfg)
    assert summary.count("done") == 1 and summary.count("failed") == 1
    assert summary.failed[0].path == str(short) and "too short" in summary.failed[0].reason
    files = {p.name: np.load(p) for p in out_dir.rglob("*.npy")}
    assert sorted(files) == ["s3d26_fps.npy", "s3d26_s3d.npy", "s3d26_timestamps_ms.npy"]
    _, single = reference_run      # the in-process extraction of the same video
    np.testing.assert_allclose(files["s3d26_s3d.npy"], single["s3d"], rtol=0,
                               atol=1e-5 * np.abs(single["s3d"]).max())
    np.testing.assert_array_equal(files["s3d26_timestamps_ms.npy"], single["timestamps_ms"])
    assert float(files["s3d26_fps.npy"]) == FPS


@pytest.mark.parametrize("layout", ["kylemin", "torchvision"])
def test_crops_are_views_of_each_layouts_frames(make_video, monkeypatch, layout):
    from tests.crop_checks import check_views

    monkeypatch.setattr("video_features.models.s3d.extractor.load_s3d",
                        lambda cfg, device: (_Probe(), layout))
    path = make_video("s3d30.mp4", n_frames=30, fps=FPS, width=W, height=H)
    runs = {crops: S3DExtractor(_cfg(stack_size=13, step_size=13, crops=crops), CPU).extract(str(path))
            for crops in ("center", "10")}
    check_views(runs["10"]["s3d"], runs["center"]["s3d"], 10, mirror_equal=True)
    np.testing.assert_array_equal(runs["10"]["timestamps_ms"], runs["center"]["timestamps_ms"])
