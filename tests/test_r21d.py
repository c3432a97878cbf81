"""R(2+1)D clip features: windows and timestamps, the reference preprocessing recomputed with
plain torch ops, features against torchvision's own r2plus1d_18 and against an R(2+1)D-34 built
directly from torchvision's VideoResNet as the IG-65M conversions build it, per-model stack
defaults, the record of the weights used, errors and the alias.

The checkpoints are random state dicts in the published layouts, written under the cards' file
names in the private torch hub cache, so the extractor loads them through the real path.
"""
from __future__ import annotations

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from video_features.models.r21d.extractor import R21DExtractor, preprocess, resolve_stacks
from video_features.models.r21d.weights import CARD, card_for, labels, write_random_checkpoint
from video_features.models.registry import get_extractor_class
from video_features.utils.config import make_config, parse_args
from video_features.utils.errors import ConfigError, VideoError, WeightsError
from video_features.utils.transforms import to_device

CPU = torch.device("cpu")
W, H = 64, 48
FPS = 25.0
MEAN = (0.43216, 0.394666, 0.37645)
STD = (0.22803, 0.22145, 0.216989)


@pytest.fixture(scope="session")
def r21d_weights(hub_checkpoints):
    path = hub_checkpoints / CARD.filename
    write_random_checkpoint(path)   # seeded: rewriting gives the same weights
    return path


def _cfg(**kw):
    base = dict(timestamps_form="reference", video_paths=["x"], device="cpu", stack_size=4, step_size=4, batch_size=2)
    base.update(kw)
    return make_config("r21d", **base)


def _extract(path, **kw):
    ex = R21DExtractor(_cfg(**kw), CPU)
    return ex, ex.extract(str(path))


def expected_stack_ends(n_frames: int, stack: int, step: int, tail: str) -> list[int]:
    """Index of each clip's last frame: clips of ``stack`` frames start every ``step`` frames;
    with tail='pad' one more clip starts at the next position if a frame is left there, and
    ends at the last frame."""
    ends, s = [], 0
    while s + stack <= n_frames:
        ends.append(s + stack - 1)
        s += step
    if tail == "pad" and s < n_frames:
        ends.append(n_frames - 1)
    return ends


def decode_rgb(path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def reference_preprocess(frames: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, 112, 112), the reference recipe step by step."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0
    x = F.interpolate(x, size=(128, 171), mode="bilinear", align_corners=False)  # no antialias
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    h, w = x.shape[-2:]
    top, left = int(round((h - 112) / 2)), int(round((w - 112) / 2))
    return x[..., top:top + 112, left:left + 112]


@pytest.fixture(scope="module")
def video20(make_video):
    return make_video("r21d20.mp4", n_frames=20, fps=FPS, width=W, height=H)


def test_preprocess_matches_reference_recipe(make_video):
    for w, h in ((W, H), (90, 50)):   # 4:3 and a wide frame: the output size is fixed anyway
        frames = decode_rgb(make_video(f"r21d_pp{w}x{h}.mp4", n_frames=3, width=w, height=h))
        ours = preprocess(to_device(frames, CPU))
        want = reference_preprocess(frames)
        assert ours.shape == want.shape == (3, 3, 112, 112) and ours.dtype == torch.float32
        torch.testing.assert_close(ours, want, rtol=0, atol=1e-6)   # measured: identical


def test_features_match_torchvision_r2plus1d_18(r21d_weights, video20):
    # 20 frames, clips of 8 every 8: 2 clips; decoding runs in chunks of 16 frames, so the
    # second clip straddles a chunk boundary
    ex, out = _extract(video20, stack_size=8, step_size=8)
    assert list(out) == ["r21d", "fps", "timestamps_ms"]
    assert out["r21d"].shape == (2, 512) and out["r21d"].dtype == np.float32
    assert float(out["fps"]) == FPS
    np.testing.assert_allclose(out["timestamps_ms"], [7 / FPS * 1000, 15 / FPS * 1000])
    assert ex.frames_read == 20

    import torchvision

    net = torchvision.models.video.r2plus1d_18(weights=None)
    net.load_state_dict(torch.load(r21d_weights, weights_only=True))
    net.fc = torch.nn.Identity()
    net.eval()
    x = reference_preprocess(decode_rgb(video20)[:16])             # (16, 3, 112, 112)
    clips = x.reshape(2, 8, 3, 112, 112).permute(0, 2, 1, 3, 4)    # (B, C, T, H, W)
    with torch.no_grad():
        want = net(clips).numpy()
    # the same float ops in the same order: measured identical (max |diff| 0.0)
    np.testing.assert_allclose(out["r21d"], want, rtol=0, atol=1e-5 * np.abs(want).max())
    assert np.abs(want[0] - want[1]).max() > 1e-2 * np.abs(want).max()   # the check has teeth


class _Probe(torch.nn.Module):
    """Stands in for the network where only the windowing is under test: the "feature" of a
    clip is the mean of each of its frames (one number per frame, zero-padded to 512)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:    # (B, C, T, H, W)
        m = x.mean(dim=(1, 3, 4))
        return F.pad(m, (0, 512 - m.shape[1]))


@pytest.mark.parametrize("n,stack,step,tail", [
    (13, 4, 4, "drop"),
    (13, 4, 3, "drop"),   # overlapping
    (13, 3, 5, "drop"),   # gaps between clips
    (13, 4, 6, "pad"),    # padded tail clip after a gap
    (13, 4, 3, "pad"),    # 13 = 3 * 3 + 4: nothing left over, no extra clip
    (20, 16, 16, "drop"),  # the defaults' clip length; frames 16-19 are dropped
    (20, 16, 2, "pad"),    # overlapping across the 16-frame decoding chunks, padded tail
])
def test_window_counts_timestamps_and_contents(make_video, monkeypatch, n, stack, step, tail):
    monkeypatch.setattr("video_features.models.r21d.extractor.load_r21d", lambda cfg, device: _Probe())
    path = make_video(f"r21d{n}.mp4", n_frames=n, fps=FPS, width=W, height=H)
    _, single = _extract(path, stack_size=1, step_size=1)       # row i: mean of frame i
    frame_mean = single["r21d"][:, 0]
    assert len(frame_mean) == n
    _, out = _extract(path, stack_size=stack, step_size=step, tail=tail, batch_size=3)
    ends = expected_stack_ends(n, stack, step, tail)
    assert out["r21d"].shape == (len(ends), 512) and out["r21d"].dtype == np.float32
    np.testing.assert_allclose(out["timestamps_ms"], np.array(ends) / FPS * 1000)
    for k, row in enumerate(out["r21d"]):  # clip k: frames k*step ..., the last one repeated
        idx = np.minimum(np.arange(k * step, k * step + stack), n - 1)
        np.testing.assert_allclose(row[:stack], frame_mean[idx], rtol=0, atol=1e-6)
        assert not row[stack:].any()


def test_extraction_fps_changes_the_count(r21d_weights, make_video):
    path = make_video("r21d13.mp4", n_frames=13, fps=FPS, width=W, height=H)
    _, out = _extract(path, stack_size=2, step_size=2, extraction_fps=10)
    n10 = int(np.floor(13 / FPS * 10 + 0.5))                       # 0.52 s at 10 fps: 5 frames
    ends = expected_stack_ends(n10, 2, 2, "drop")
    assert float(out["fps"]) == 10.0 and out["r21d"].shape == (len(ends), 512) == (2, 512)
    np.testing.assert_allclose(out["timestamps_ms"], np.array(ends) / 10 * 1000)


def test_too_short_raises_video_error(r21d_weights, make_video):
    path = make_video("r21d3.mp4", n_frames=3, fps=FPS, width=W, height=H)
    with pytest.raises(VideoError, match="stack_size"):
        _extract(path, stack_size=4)
    _, out = _extract(path, stack_size=4, tail="pad")
    assert out["r21d"].shape == (1, 512)
    np.testing.assert_allclose(out["timestamps_ms"], [2 / FPS * 1000])


def test_show_pred_numbers_clips_across_batches(r21d_weights, make_video, capsys):
    path = make_video("r21d13.mp4", n_frames=13, fps=FPS, width=W, height=H)
    _extract(path, show_pred=True, stack_size=4, step_size=4, batch_size=2)  # batches of 2 + 1
    lines = [ln for ln in capsys.readouterr().out.splitlines() if " stack #" in ln]
    assert [ln.split(" stack #")[1].split(":")[0] for ln in lines] == ["0", "1", "2"]
    names = set(labels())
    assert len(names) == 400
    for ln in lines:
        preds = ln.split(" stack #", 1)[1].split(": ", 1)[1].split("  ")
        assert len(preds) == 5 and all(p.rsplit(": ", 1)[0] in names for p in preds)


def test_alias_r21d_rgb():
    cfg = make_config("r21d_rgb", video_paths=["a.mp4"], device="cpu")
    assert cfg.feature_type == "r21d" and cfg.model_name == "r2plus1d_18_16_kinetics"
    # configs/r21d.yml holds null: validation resolves it to the model's own
    assert (cfg.stack_size, cfg.step_size) == (16, 16)
    assert resolve_stacks(cfg.replace(stack_size=None)).stack_size == 16
    assert get_extractor_class(cfg.feature_type) is R21DExtractor
    cfg = parse_args(["--feature_type", "r21d_rgb", "--device", "cpu", "--video_paths", "a.mp4",
                      "stack_size=8"])
    assert cfg.feature_type == "r21d" and cfg.stack_size == 8


@pytest.mark.parametrize("option,value", [("stack_size", 0), ("step_size", -1), ("tail", "x")])
def test_invalid_options_name_the_option(option, value):
    with pytest.raises(ConfigError, match=option):
        make_config("r21d", video_paths=["a.mp4"], device="cpu", **{option: value})


def test_missing_weights_name_the_url(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    with pytest.raises(WeightsError) as ei:
        R21DExtractor(_cfg(), CPU)
    msg = str(ei.value)
    assert "https://download.pytorch.org/models/r2plus1d_18-91a641e6.pth" in msg
    assert "hub/checkpoints/r2plus1d_18-91a641e6.pth" in msg


# -- the IG-65M R(2+1)D-34 models -------------------------------------------------------------
M32, M8 = "r2plus1d_34_32_ig65m_ft_kinetics", "r2plus1d_34_8_ig65m_ft_kinetics"
IG65M_URL = "https://github.com/moabitcoin/ig65m-pytorch/releases/download/v1.0.0/"


@pytest.fixture(scope="module")
def ig65m_weights(hub_checkpoints):
    """Random checkpoints of both IG-65M models (255 MB each) under their release file names;
    different seeds, so the two models give different features. Removed afterwards."""
    paths = {m: write_random_checkpoint(hub_checkpoints / card_for(m).filename, seed=seed,
                                        model_name=m)
             for m, seed in ((M32, 1), (M8, 2))}
    yield paths
    for p in paths.values():
        p.unlink(missing_ok=True)


def independent_r2plus1d_34(path, bn_eps: float = 1e-3) -> torch.nn.Module:
    """R(2+1)D-34 assembled here from torchvision's VideoResNet parts the way the IG-65M
    conversion does (Caffe2 widths of the first blocks' second convs, Caffe2's BatchNorm
    epsilon), the release file loaded strictly, the classifier kept."""
    from torchvision.models.video.resnet import BasicBlock, Conv2Plus1D, R2Plus1dStem, VideoResNet

    net = VideoResNet(BasicBlock, [Conv2Plus1D] * 4, [3, 4, 6, 3], R2Plus1dStem, num_classes=400)
    net.layer2[0].conv2[0] = Conv2Plus1D(128, 128, 288)
    net.layer3[0].conv2[0] = Conv2Plus1D(256, 256, 576)
    net.layer4[0].conv2[0] = Conv2Plus1D(512, 512, 1152)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.eps = bn_eps
    net.load_state_dict(torch.load(path, weights_only=True), strict=True)
    return net.eval()


def _features_and_logits(net: torch.nn.Module, clips: torch.Tensor):
    """(B, C, T, H, W) -> the 512-d input of fc (torchvision's forward with fc as identity),
    and the logits."""
    fc, net.fc = net.fc, torch.nn.Identity()
    try:
        with torch.no_grad():
            feats = net(clips)
            return feats, fc(feats)
    finally:
        net.fc = fc


def _clips(video, n_clips: int, stack: int) -> torch.Tensor:
    x = reference_preprocess(decode_rgb(video)[: n_clips * stack])
    return x.reshape(n_clips, stack, 3, 112, 112).permute(0, 2, 1, 3, 4)


def test_ig65m_release_layout(ig65m_weights):
    """Same key names as torchvision's VideoResNet(R2Plus1dStem, [3, 4, 6, 3]) with a 400-class
    head; only the three Caffe2-width convs differ in shape."""
    from torchvision.models.video.resnet import BasicBlock, Conv2Plus1D, R2Plus1dStem, VideoResNet

    plain = VideoResNet(BasicBlock, [Conv2Plus1D] * 4, [3, 4, 6, 3], R2Plus1dStem).state_dict()
    for model in (M32, M8):
        state = torch.load(ig65m_weights[model], weights_only=True)
        assert list(state) == list(plain)
        differ = {k: tuple(v.shape) for k, v in state.items() if v.shape != plain[k].shape}
        assert differ["layer2.0.conv2.0.0.weight"] == (288, 128, 1, 3, 3)
        assert differ["layer3.0.conv2.0.3.weight"] == (256, 576, 3, 1, 1)
        assert differ["layer4.0.conv2.0.1.running_var"] == (1152,)
        assert {k.split(".conv2.")[0] for k in differ} == {"layer2.0", "layer3.0", "layer4.0"}
        assert state["fc.weight"].shape == (400, 512) and state["fc.bias"].shape == (400,)
        assert all(v.dtype == torch.float32 for k, v in state.items()
                   if not k.endswith("num_batches_tracked"))


def test_ig65m_8_matches_independent_videoresnet(ig65m_weights, make_video, capsys):
    # 17 frames, the model's own stacks of 8 every 8: 2 clips, the last frame dropped
    video = make_video("r21d_ig17.mp4", n_frames=17, fps=FPS, width=W, height=H)
    ex, out = _extract(video, model_name=M8, stack_size=None, step_size=None, batch_size=2,
                       show_pred=True)
    assert (ex.cfg.stack_size, ex.cfg.step_size) == (8, 8)
    assert out["r21d"].shape == (2, 512) and out["r21d"].dtype == np.float32
    np.testing.assert_allclose(out["timestamps_ms"], [7 / FPS * 1000, 15 / FPS * 1000])

    clips = _clips(video, 2, 8)
    want, logits = _features_and_logits(independent_r2plus1d_34(ig65m_weights[M8]), clips)
    want = want.numpy()
    scale = np.abs(want).max()
    np.testing.assert_allclose(out["r21d"], want, rtol=0, atol=1e-4 * scale)
    assert np.abs(want[0] - want[1]).max() > 1e-2 * scale          # the clips differ
    # Caffe2's BatchNorm epsilon matters: torchvision's default moves the features far more
    wrong, _ = _features_and_logits(independent_r2plus1d_34(ig65m_weights[M8], 1e-5), clips[:1])
    assert np.abs(wrong.numpy() - want[:1]).max() > 1e-2 * scale

    # show_pred: the 400-class head with the Kinetics-400 names, top-1 as the independent head's
    lines = [ln for ln in capsys.readouterr().out.splitlines() if " stack #" in ln]
    assert len(lines) == 2
    names = labels()
    for ln, row in zip(lines, logits):
        top1 = ln.split(" stack #", 1)[1].split(": ", 1)[1].split("  ")[0].rsplit(": ", 1)[0]
        assert top1 == names[int(row.argmax())]


@pytest.mark.parametrize("model,stack,step", [
    ("r2plus1d_18_16_kinetics", 16, 16), (M32, 32, 32), (M8, 8, 8)])
def test_null_stack_and_step_are_the_models_own(make_video, monkeypatch, model, stack, step):
    monkeypatch.setattr("video_features.models.r21d.extractor.load_r21d", lambda cfg, device: _Probe())
    path = make_video("r21d_defaults.mp4", n_frames=35, fps=FPS, width=W, height=H)
    cfg = make_config("r21d", video_paths=["x"], device="cpu", model_name=model)
    assert (cfg.stack_size, cfg.step_size) == (stack, step)        # configs/r21d.yml: null
    ex = R21DExtractor(cfg, CPU)
    assert (ex.cfg.stack_size, ex.cfg.step_size) == (stack, step)
    out = ex.extract(str(path))
    ends = expected_stack_ends(35, stack, step, "drop")
    assert len(out["r21d"]) == len(ends)
    # default timestamps_form=span: from the stack's first frame to the end of its last
    ends = np.array(ends)
    np.testing.assert_allclose(out["timestamps_ms"],
                               np.stack([ends - stack + 1, ends + 1], 1) / FPS * 1000)
    assert all(row[:stack].all() and not row[stack:].any() for row in out["r21d"])  # clip length
    # an explicit value wins over the model's own, one option at a time
    ex = R21DExtractor(cfg.replace(step_size=5), CPU)
    assert (ex.cfg.stack_size, ex.cfg.step_size) == (stack, 5)
    ex = R21DExtractor(cfg.replace(stack_size=3), CPU)
    assert (ex.cfg.stack_size, ex.cfg.step_size) == (3, step)


def test_ig65m_32_too_short_names_its_stack(ig65m_weights, make_video):
    path = make_video("r21d_ig20.mp4", n_frames=20, fps=FPS, width=W, height=H)
    with pytest.raises(VideoError, match="stack_size=32"):
        R21DExtractor(make_config("r21d", video_paths=["x"], device="cpu", model_name=M32),
                      CPU).extract(str(path))


def test_switching_model_name_changes_the_record_and_recomputes(ig65m_weights, make_video, tmp_path):
    """Through the runner: outputs of one IG-65M model are never reused for the other."""
    import json

    from video_features.utils.runner import run

    video = make_video("r21d_ig9.mp4", n_frames=9, fps=FPS, width=W, height=H)
    out_dir = tmp_path / "out"

    def run_model(model):
        cfg = make_config("r21d", video_paths=[str(video)], device="cpu", model_name=model,
                          stack_size=8, step_size=8, on_extraction="save_numpy",
                          output_path=str(out_dir))
        summary = run(cfg)
        meta = json.loads(next(out_dir.rglob("r21d_ig9_meta.json")).read_text())
        return summary, np.load(next(out_dir.rglob("r21d_ig9_r21d.npy"))), meta["record"]

    summary, feats8, record8 = run_model(M8)
    assert summary.count("done") == 1
    assert record8["options"]["model_name"] == M8
    assert record8["checkpoints"]["r21d"]["card"] == "r2plus1d_34_clip8_ft_kinetics_from_ig65m"
    assert record8["checkpoints"]["r21d"]["file"] == ig65m_weights[M8].name
    assert record8["checkpoints"]["r21d"]["sha256"] == uw_sha256(ig65m_weights[M8])
    want, _ = _features_and_logits(independent_r2plus1d_34(ig65m_weights[M8]), _clips(video, 1, 8))
    assert feats8.shape == (1, 512)
    np.testing.assert_allclose(feats8, want.numpy(), rtol=0, atol=1e-4 * want.abs().max().item())

    assert run_model(M8)[0].count("skipped") == 1           # same model: reused

    summary, feats32, record32 = run_model(M32)              # other model: recomputed
    assert summary.count("done") == 1
    assert record32["checkpoints"]["r21d"]["card"] == "r2plus1d_34_clip32_ft_kinetics_from_ig65m"
    assert record32["checkpoints"]["r21d"]["sha256"] == uw_sha256(ig65m_weights[M32])
    assert record32["checkpoints"]["r21d"]["sha256"] != record8["checkpoints"]["r21d"]["sha256"]
    assert feats32.shape == (1, 512) and np.abs(feats32 - feats8).max() > 1e-2 * np.abs(feats8).max()


def uw_sha256(path) -> str:
    from video_features.utils.weights import sha256_of

    return sha256_of(path)


def test_ig65m_cards_and_weights_for():
    for model, clip, sha in ((M32, 32, "ade133f1"), (M8, 8, "0aa0550b")):
        card = card_for(model)
        assert card.filename == f"r2plus1d_34_clip{clip}_ft_kinetics_from_ig65m-{sha}.pth"
        assert card.url == IG65M_URL + card.filename and card.sha256 == sha
        assert card.num_classes == 400 and "128x171" in card.preprocessing
        cfg = make_config("r21d", video_paths=["a.mp4"], device="cpu", model_name=model)
        assert R21DExtractor.weights_for(cfg) == {"r21d": (card, None)}
    cfg = make_config("r21d", video_paths=["a.mp4"], device="cpu")
    assert R21DExtractor.weights_for(cfg) == {"r21d": (CARD, None)}
    with pytest.raises(ConfigError, match="model_name"):
        make_config("r21d", video_paths=["a.mp4"], device="cpu", model_name="r2plus1d_34")


def test_missing_ig65m_weights_name_the_release_url(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    with pytest.raises(WeightsError) as ei:
        R21DExtractor(_cfg(model_name=M32), CPU)
    msg = str(ei.value)
    assert IG65M_URL + "r2plus1d_34_clip32_ft_kinetics_from_ig65m-ade133f1.pth" in msg
    assert "hub/checkpoints/r2plus1d_34_clip32_ft_kinetics_from_ig65m-ade133f1.pth" in msg


def test_ten_crops_match_torchvision_ten_crop_of_the_reference_input(r21d_weights, video20):
    """crops=10: each view equals torchvision's r2plus1d_18 on its TenCrop of the reference
    recipe's 128x171 frames, the crops of a clip in one pass; view 4 is the crops=center row."""
    import torchvision
    from torchvision.transforms.v2 import functional as TF

    ex, out = _extract(video20, stack_size=8, step_size=8, crops="10", batch_size=1)
    assert out["r21d"].shape == (2, 10, 512)
    _, center = _extract(video20, stack_size=8, step_size=8)
    np.testing.assert_allclose(out["r21d"][:, 4], center["r21d"], rtol=0,
                               atol=1e-5 * np.abs(center["r21d"]).max())

    net = torchvision.models.video.r2plus1d_18(weights=None)
    net.load_state_dict(torch.load(r21d_weights, weights_only=True))
    net.fc = torch.nn.Identity()
    net.eval()
    x = torch.from_numpy(decode_rgb(video20)[:16]).permute(0, 3, 1, 2).float() / 255.0
    x = F.interpolate(x, size=(128, 171), mode="bilinear", align_corners=False)
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    views = torch.stack(TF.ten_crop(x, [112, 112]), 1)                 # (16, 10, 3, 112, 112)
    clips = views.reshape(2, 8, 10, 3, 112, 112).permute(0, 2, 3, 1, 4, 5)  # (clip, view, C, T, H, W)
    with torch.no_grad():
        want = net(clips.reshape(20, 3, 8, 112, 112)).reshape(2, 10, 512).numpy()
    np.testing.assert_allclose(out["r21d"], want, rtol=0, atol=1e-5 * np.abs(want).max())
    assert np.abs(want[:, 0] - want[:, 5]).max() > 1e-2 * np.abs(want).max()  # flips differ
