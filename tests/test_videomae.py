"""VideoMAE clip features: our device preprocessing against transformers' VideoMAEImageProcessor,
features against transformers' own VideoMAE forward on the processor's output, windows and
timestamps, weight resolution (local folder, hub cache, offline error, random weights), errors,
and one run through the multi-process runner.

Models are tiny VideoMAE configs (hidden 64, 2 layers, 64 px, 4 frames) with random weights,
written with ``save_pretrained`` in transformers' layout, so they load through the real path.
"""
from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from video_features.models.registry import get_extractor_class  # noqa: E402
from video_features.models.hf_video.preprocess import OnDevice  # noqa: E402
from video_features.models.videomae.extractor import VideoMAEExtractor  # noqa: E402
from video_features.models.videomae.weights import KINETICS_LABELS  # noqa: E402
from video_features.utils.config import make_config  # noqa: E402
from video_features.utils.errors import ConfigError, VideoError, WeightsError  # noqa: E402
from video_features.utils.transforms import to_device  # noqa: E402

CPU = torch.device("cpu")
FPS = 25.0
W, H = 96, 72          # 4:3 frames: short side 72 -> 64, long side 85, centre crop 64
FRAMES = 4             # the tiny models' num_frames
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


pytestmark = pytest.mark.usefixtures("private_hub_cache")   # tests/conftest.py


def tiny_config(kind: str = "classify", **kw) -> "transformers.VideoMAEConfig":
    values = dict(image_size=64, patch_size=16, num_frames=FRAMES, tubelet_size=2, hidden_size=64,
                  num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                  decoder_hidden_size=32, decoder_num_hidden_layers=1,
                  decoder_num_attention_heads=2, decoder_intermediate_size=64)
    if kind == "classify":
        values.update(use_mean_pooling=True, num_labels=400)
    else:
        values.update(use_mean_pooling=False)
    values.update(kw)
    return transformers.VideoMAEConfig(**values)


def write_tiny_model(folder: Path, kind: str = "classify", seed: int = 0,
                     processor: dict | None = None) -> Path:
    """A random VideoMAE (classifier or self-supervised pre-training model) with its processor
    config, saved as transformers saves a hub repo."""
    torch.manual_seed(seed)
    cls = (transformers.VideoMAEForVideoClassification if kind == "classify"
           else transformers.VideoMAEForPreTraining)
    model = cls(tiny_config(kind))
    with torch.no_grad():   # off the initialiser's ones/zeros, so every LayerNorm matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(folder)
    values = dict(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64},
                  image_mean=list(MEAN), image_std=list(STD), resample=2)
    values.update(processor or {})
    transformers.VideoMAEImageProcessor(**values).save_pretrained(folder)
    return Path(folder)


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("vmae") / "tiny-k400")


@pytest.fixture(scope="module")
def pretrain_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("vmae") / "tiny-ssl", kind="pretrain", seed=1)


@pytest.fixture(scope="module")
def hf_classifier(classifier_dir):
    return transformers.VideoMAEForVideoClassification.from_pretrained(classifier_dir).eval()


def _cfg(**kw):
    base = dict(timestamps_form="reference", video_paths=["x"], device="cpu", step_size=FRAMES, batch_size=2)
    base.update(kw)
    return make_config("videomae", **base)


def _extract(path, **kw):
    ex = VideoMAEExtractor(_cfg(**kw), CPU)
    return ex, ex.extract(str(path))


def decode_rgb(path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def hf_pixels(folder, frames: np.ndarray) -> torch.Tensor:
    """transformers' own processor on decoded frames: (1, T, 3, h, w)."""
    proc = transformers.VideoMAEImageProcessor.from_pretrained(folder)
    return proc([list(frames)], return_tensors="pt").pixel_values


@pytest.fixture(scope="module")
def video9(make_video):
    return make_video("vmae9.mp4", n_frames=9, fps=FPS, width=W, height=H)


@pytest.mark.parametrize("w,h,processor", [
    (W, H, {}),                                             # bilinear, 4:3
    (90, 50, {"resample": 3}),                              # bicubic, wide frame
    (48, 80, {"size": {"shortest_edge": 72}}),              # portrait, crop off-centre by rounding
    (40, 30, {"size": {"height": 64, "width": 64}, "do_center_crop": False,
              "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}),   # fixed size, upscale
])
def test_preprocess_matches_the_hf_image_processor(make_video, tmp_path, w, h, processor):
    frames = decode_rgb(make_video(f"vmae_pp{w}x{h}.mp4", n_frames=3, width=w, height=h))
    values = dict(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64},
                  image_mean=list(MEAN), image_std=list(STD), resample=2)
    values.update(processor)
    proc = transformers.VideoMAEImageProcessor(**values)
    proc.save_pretrained(tmp_path)
    want = proc([list(frames)], return_tensors="pt").pixel_values[0]
    ours = OnDevice(
        transformers.VideoMAEImageProcessor.from_pretrained(tmp_path))(to_device(frames, CPU))
    assert ours.shape == want.shape == (3, 3, 64, 64) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, want, rtol=0, atol=1e-6)   # measured: identical


def test_features_match_transformers_forward(classifier_dir, hf_classifier, video9):
    # 9 frames, clips of 4 every 4: 2 clips, frame 8 dropped
    ex, out = _extract(video9, model_name=str(classifier_dir))
    assert list(out) == ["videomae", "fps", "timestamps_ms"]
    assert out["videomae"].shape == (2, 64) and out["videomae"].dtype == np.float32
    assert float(out["fps"]) == FPS and ex.frames_read == 9
    np.testing.assert_allclose(out["timestamps_ms"], [3 / FPS * 1000, 7 / FPS * 1000])
    assert ex.pooling == "fc_norm"      # auto on a fine-tuned checkpoint

    frames = decode_rgb(video9)
    pv = torch.cat([hf_pixels(classifier_dir, frames[s:s + 4]) for s in (0, 4)])
    with torch.no_grad():
        hidden = hf_classifier.videomae(pv).last_hidden_state
        want = hf_classifier.fc_norm(hidden.mean(1)).numpy()
        logits = hf_classifier(pixel_values=pv).logits.numpy()
        ours_logits = ex.net.classifier(torch.from_numpy(out["videomae"])).numpy()
    scale = np.abs(want).max()
    assert np.abs(out["videomae"] - want).max() <= 1e-4 * scale
    assert np.abs(ours_logits - logits).max() <= 1e-4 * np.abs(logits).max()
    assert np.abs(want[0] - want[1]).max() > 1e-2 * scale   # the clips differ: the check has teeth

    _, mean = _extract(video9, model_name=str(classifier_dir), pooling="mean")
    np.testing.assert_allclose(mean["videomae"], hidden.mean(1).numpy(), rtol=0,
                               atol=1e-4 * np.abs(hidden.numpy()).max())


def test_self_supervised_checkpoint_mean_pools_the_encoder(pretrain_dir, video9):
    ex, out = _extract(video9, model_name=str(pretrain_dir))
    assert ex.pooling == "mean" and not hasattr(ex.net, "classifier")
    hf = transformers.VideoMAEModel.from_pretrained(pretrain_dir).eval()   # drops the decoder
    assert hf.layernorm is not None
    frames = decode_rgb(video9)
    pv = torch.cat([hf_pixels(pretrain_dir, frames[s:s + 4]) for s in (0, 4)])
    with torch.no_grad():
        want = hf(pv).last_hidden_state.mean(1).numpy()
    assert np.abs(out["videomae"] - want).max() <= 1e-4 * np.abs(want).max()
    with pytest.raises(ConfigError, match="fc_norm"):
        VideoMAEExtractor(_cfg(model_name=str(pretrain_dir), pooling="fc_norm"), CPU)


def expected_clip_starts(n: int, stack: int, step: int, tail: str) -> list[int]:
    starts, s = [], 0
    while s + stack <= n:
        starts.append(s)
        s += step
    if tail == "pad" and s < n:
        starts.append(s)
    return starts


@pytest.mark.parametrize("n,step,tail", [
    (11, 2, "drop"),    # overlapping clips (dense, as for temporal action localisation)
    (21, 3, "pad"),     # overlapping across the 16-frame decoding chunks, padded tail clip
    (13, 6, "pad"),     # gaps between clips, padded tail after a gap
])
def test_windows_timestamps_and_contents(classifier_dir, hf_classifier, make_video, n, step, tail):
    path = make_video(f"vmae{n}.mp4", n_frames=n, fps=FPS, width=W, height=H)
    _, out = _extract(path, model_name=str(classifier_dir), step_size=step, tail=tail,
                      batch_size=3)
    starts = expected_clip_starts(n, FRAMES, step, tail)
    assert out["videomae"].shape == (len(starts), 64)
    ends = [min(s + FRAMES, n) - 1 for s in starts]       # a clip's stamp: its last real frame
    np.testing.assert_allclose(out["timestamps_ms"], np.array(ends) / FPS * 1000)
    frames = decode_rgb(path)
    for k, s in enumerate(starts):   # clip k: frames s.., the last real one repeated
        idx = np.minimum(np.arange(s, s + FRAMES), n - 1)
        with torch.no_grad():
            hidden = hf_classifier.videomae(hf_pixels(classifier_dir, frames[idx])).last_hidden_state
            want = hf_classifier.fc_norm(hidden.mean(1))[0].numpy()
        assert np.abs(out["videomae"][k] - want).max() <= 1e-4 * np.abs(want).max()


def test_too_short_fails_the_input(classifier_dir, make_video):
    path = make_video("vmae3.mp4", n_frames=3, fps=FPS, width=W, height=H)
    with pytest.raises(VideoError, match="too short: fewer than stack_size=4 frames"):
        _extract(path, model_name=str(classifier_dir))
    _, out = _extract(path, model_name=str(classifier_dir), tail="pad")
    assert out["videomae"].shape == (1, 64)
    np.testing.assert_allclose(out["timestamps_ms"], [2 / FPS * 1000])


def test_show_pred_prints_kinetics_top5(classifier_dir, video9, capsys):
    _extract(video9, model_name=str(classifier_dir), show_pred=True, batch_size=1)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if " clip #" in ln]
    assert [ln.split(" clip #")[1].split(":")[0] for ln in lines] == ["0", "1"]
    names = set(KINETICS_LABELS.read_text().splitlines())
    assert len(names) == 400
    for ln in lines:
        preds = ln.split(" clip #", 1)[1].split(": ", 1)[1].split("  ")
        assert len(preds) == 5 and all(p.rsplit(": ", 1)[0] in names for p in preds)


def test_model_from_the_hub_cache_offline(classifier_dir, private_hub_cache, video9):
    """A repo in the hub cache's layout (refs/main -> snapshots/<commit>/) loads offline, and the
    card names the repo and revision."""
    repo = "someone/videomae-tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = private_hub_cache / "models--someone--videomae-tiny"
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in classifier_dir.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    _, out = _extract(video9, model_name=repo)
    _, local = _extract(video9, model_name=str(classifier_dir))
    np.testing.assert_array_equal(out["videomae"], local["videomae"])
    card, path = VideoMAEExtractor.weights_for(_cfg(model_name=repo))["videomae"]
    assert card.name == f"videomae:{repo}" and card.url == f"https://huggingface.co/{repo}"
    assert Path(path) == snap / "model.safetensors"
    card, _ = VideoMAEExtractor.weights_for(_cfg(model_name=repo, revision=commit))["videomae"]
    assert card.name == f"videomae:{repo}@{commit}"


def test_missing_weights_offline_name_the_repo(monkeypatch):
    repo = "MCG-NJU/videomae-base-finetuned-kinetics"
    for env in ({"VIDEO_FEATURES_OFFLINE": "1"}, {"VIDEO_FEATURES_OFFLINE": "0", "HF_HUB_OFFLINE": "1"}):
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        with pytest.raises(WeightsError) as ei:
            VideoMAEExtractor.weights_for(_cfg())
        msg = str(ei.value)
        assert "\n" not in msg and repo in msg and f"hf download {repo}" in msg
        assert "model_name=LOCAL_FOLDER" in msg
    with pytest.raises(WeightsError, match=repo):
        VideoMAEExtractor(_cfg(), CPU)


def test_no_network_names_the_repo(monkeypatch):
    """Downloads allowed but the hub unreachable: the same one-line advice, with the reason."""
    import huggingface_hub

    def unreachable(*a, **k):
        raise OSError("Network is unreachable")

    monkeypatch.setenv("VIDEO_FEATURES_OFFLINE", "0")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", unreachable)
    with pytest.raises(WeightsError) as ei:
        VideoMAEExtractor.weights_for(_cfg(model_name="MCG-NJU/videomae-large"))
    msg = str(ei.value)
    assert "\n" not in msg and "Network is unreachable" in msg
    assert "hf download MCG-NJU/videomae-large" in msg


def test_missing_transformers_names_the_package(monkeypatch, classifier_dir):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)   # import transformers -> ImportError
    with pytest.raises(ConfigError, match="pip install transformers"):
        VideoMAEExtractor(_cfg(model_name=str(classifier_dir)), CPU)


def test_extraction_fps_changes_the_clips(classifier_dir, make_video):
    path = make_video("vmae25.mp4", n_frames=25, fps=FPS, width=W, height=H)
    _, out = _extract(path, model_name=str(classifier_dir), extraction_fps=10, step_size=2)
    n10 = int(np.floor(25 / FPS * 10 + 0.5))                    # 1 s at 10 fps: 10 frames
    starts = expected_clip_starts(n10, FRAMES, 2, "drop")
    assert float(out["fps"]) == 10.0 and out["videomae"].shape == (len(starts), 64) == (4, 64)
    np.testing.assert_allclose(out["timestamps_ms"], (np.array(starts) + FRAMES - 1) / 10 * 1000)


def test_random_weights_from_the_built_in_table_offline():
    cfg = _cfg(model_name="MCG-NJU/videomae-large-finetuned-kinetics", allow_random_weights=True)
    card, path = VideoMAEExtractor.weights_for(cfg)["videomae"]
    assert path is None and card.num_classes == 400    # the record then says "random"
    from video_features.models.videomae.weights import build_config, resolve

    config = build_config(resolve(cfg, random_weights=True))
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.intermediate_size, config.num_frames, config.tubelet_size,
            config.image_size) == (1024, 24, 16, 4096, 16, 2, 224)
    assert config.use_mean_pooling and config.id2label[0] == "abseiling"
    ssl = build_config(resolve(cfg.replace(model_name="MCG-NJU/videomae-base"), random_weights=True))
    assert (ssl.hidden_size, ssl.num_hidden_layers, ssl.num_attention_heads) == (768, 12, 12)
    assert not ssl.use_mean_pooling


def test_random_weights_on_a_folder_and_explicit_path_wins(classifier_dir, video9, caplog):
    ex, rand = _extract(video9, model_name=str(classifier_dir), allow_random_weights=True)
    assert "RANDOM WEIGHTS" in caplog.text and rand["videomae"].shape == (2, 64)
    _, real = _extract(video9, model_name=str(classifier_dir))
    assert np.abs(rand["videomae"] - real["videomae"]).max() > 1e-3
    # checkpoint_path (a folder or its weights file) wins over allow_random_weights
    _, explicit = _extract(video9, model_name=str(classifier_dir), allow_random_weights=True,
                           checkpoint_path=str(classifier_dir / "model.safetensors"))
    np.testing.assert_array_equal(explicit["videomae"], real["videomae"])
    card, path = VideoMAEExtractor.weights_for(_cfg(checkpoint_path=str(classifier_dir)))["videomae"]
    assert path == str(classifier_dir / "model.safetensors")


def test_videomae_v2_is_refused_clearly(tmp_path):
    with pytest.raises(ConfigError, match="trust_remote_code"):
        _cfg(model_name="OpenGVLab/VideoMAEv2-Base")
    folder = tmp_path / "v2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(
        {"model_type": "VideoMAEv2", "auto_map": {"AutoModel": "modeling_videomaev2.VideoMAEv2"}}))
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="not supported"):
        VideoMAEExtractor(_cfg(model_name=str(folder)), CPU)


@pytest.mark.parametrize("option,value,match", [
    ("stack_size", 8, "16 frames"),         # the MCG-NJU models take 16-frame clips
    ("pooling", "cls", "pooling"),
    ("step_size", 0, "step_size"),
])
def test_invalid_options_name_the_option(option, value, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(**{option: value})


def test_stack_size_must_fit_the_model(classifier_dir):
    with pytest.raises(ConfigError, match="stack_size=6: .* takes clips of 4 frames"):
        VideoMAEExtractor(_cfg(model_name=str(classifier_dir), stack_size=6), CPU)


def test_defaults_and_registry():
    cfg = make_config("videomae", video_paths=["a.mp4"], device="cpu")
    assert get_extractor_class(cfg.feature_type) is VideoMAEExtractor
    assert cfg.model_name == "MCG-NJU/videomae-base-finetuned-kinetics"
    assert (cfg.stack_size, cfg.step_size, cfg.pooling, cfg.extraction_fps) == (None, 16, "auto", None)
    assert VideoMAEExtractor.output_keys_for(cfg) == ("videomae", "fps", "timestamps_ms")


def test_runner_saves_numpy(classifier_dir, make_video, tmp_path):
    from video_features.utils.runner import run

    videos = [make_video("vmae_run_a.mp4", n_frames=9, fps=FPS, width=W, height=H),
              make_video("vmae_run_b.mp4", n_frames=2, fps=FPS, width=W, height=H)]   # too short
    out = tmp_path / "out"
    cfg = make_config("videomae", video_paths=[str(v) for v in videos], device="cpu",
                      on_extraction="save_numpy", output_path=str(out), decoders=1, cpu_workers=2,
                      model_name=str(classifier_dir), step_size=2, batch_size=2)
    summary = run(cfg)
    by_path = {r.path: r for r in summary.results}
    assert by_path[str(videos[0])].status == "done"
    assert by_path[str(videos[1])].status == "failed"
    assert "too short" in by_path[str(videos[1])].reason
    files = {p.name: p for p in (out / "videomae").rglob("*.npy")}
    assert set(files) == {"vmae_run_a_videomae.npy", "vmae_run_a_fps.npy",
                          "vmae_run_a_timestamps_ms.npy"}
    feats = np.load(files["vmae_run_a_videomae.npy"])
    _, single = _extract(videos[0], model_name=str(classifier_dir), step_size=2)
    assert feats.shape == (3, 64)     # clips start at 0, 2, 4
    np.testing.assert_allclose(feats, single["videomae"], rtol=0, atol=1e-6)
    # timestamps_form=span (the default): clips of 4 frames starting at frames 0, 2, 4
    np.testing.assert_allclose(np.load(files["vmae_run_a_timestamps_ms.npy"]),
                               np.array([[0, 4], [2, 6], [4, 8]]) / FPS * 1000)
    meta = json.loads(next((out / "videomae").rglob("vmae_run_a_meta.json")).read_text())
    ident = json.dumps(meta)
    assert "model.safetensors" in ident and "videomae:" in ident


@pytest.mark.gpu
def test_cuda_matches_the_cpu(classifier_dir, video9):
    """On a GPU the same preprocessing (torchvision's CUDA resize rounds like its CPU kernel up to
    rare one-level differences) and network give the CPU's features within fp32 noise."""
    _, cpu = _extract(video9, model_name=str(classifier_dir))
    ex = VideoMAEExtractor(_cfg(model_name=str(classifier_dir), device="cuda"), torch.device("cuda"))
    gpu = ex.extract(str(video9))
    np.testing.assert_allclose(gpu["timestamps_ms"], cpu["timestamps_ms"])
    assert np.abs(gpu["videomae"] - cpu["videomae"]).max() <= 1e-2 * np.abs(cpu["videomae"]).max()


@pytest.mark.parametrize("crops", ["5", "10"])
def test_crops_run_every_view_through_the_model(classifier_dir, video9, crops):
    from tests.crop_checks import check_views

    ex, out = _extract(video9, model_name=str(classifier_dir), crops=crops)
    _, center = _extract(video9, model_name=str(classifier_dir))
    check_views(out["videomae"], center["videomae"], int(crops))


def test_crops_refused_when_the_processor_leaves_nothing_to_crop(make_video, tmp_path):
    folder = write_tiny_model(tmp_path / "squash", processor=dict(
        size={"height": 64, "width": 64}, do_center_crop=False))
    with pytest.raises(ConfigError, match="crops=5: .*nothing to crop"):
        VideoMAEExtractor(_cfg(model_name=str(folder), crops="5"), CPU)
