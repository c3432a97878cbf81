"""timm frame-wise features: our device preprocessing against timm's own eval transform
(``create_transform(**data_config)`` on PIL images) for every crop mode and both
interpolations, features against timm's own pipeline (PIL frames -> create_transform ->
forward_features -> forward_head(pre_logits=True)) on the same weights (tiny DINOv2 / DINOv3
included), weight resolution (the Hugging Face hub cache, checkpoint_path, offline and
no-network errors, random weights), show_pred, errors and a run through the runner.

Weights are random, in timm's published layout (``model.safetensors`` of the tag's hub repo)
written into a private hub cache, loaded through the real path; the reference models are built
by ``timm.create_model(name, pretrained=True)`` reading that same cache.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

timm = pytest.importorskip("timm")
import timm.data  # noqa: E402

from video_features.models.timm_image.extractor import TimmExtractor  # noqa: E402
from video_features.models.timm_image.preprocess import preprocess, recipe_from_data_config  # noqa: E402
from video_features.models.timm_image.weights import write_random_hub_weights  # noqa: E402
from video_features.utils.config import make_config  # noqa: E402
from video_features.utils.errors import ConfigError, VideoError, WeightsError  # noqa: E402
from video_features.utils.transforms import to_device  # noqa: E402
from video_features.utils.video import open_frames  # noqa: E402
from timm.models import (generate_default_cfgs, get_pretrained_cfg, model_entrypoint,  # noqa: E402
                         register_model, resolve_pretrained_cfg)

CPU = torch.device("cpu")
RTOL = 1e-4
FPS = 25.0


# -- tiny DINOv2 / DINOv3 --------------------------------------------------------------------
# Registered in timm under names of their own, as timm registers its test_vit models: the real
# entrypoint (vit_small_patch14_dinov2, its reg4 variant, vit_small_patch16_dinov3: the class,
# registers, layer scale, rope) with a 32-wide, 2-block trunk at a small input size; the
# pretrained config is the real tag's (interpolation, crop_pct, mean / std, no classifier) but for
# that input size, and its hub repo is timm/<name>.<tag>, written only in the private hub cache
# below. timm's register_model reads the pretrained configs from this module's default_cfgs.
TINY_TRUNK = dict(embed_dim=32, depth=2, num_heads=2)


def _tiny_cfg(real: str, side: int) -> dict:
    cfg = get_pretrained_cfg(real).to_dict()
    for key in ("architecture", "tag", "url"):     # the real tag's identity and its release file
        cfg.pop(key, None)
    return {**cfg, "input_size": (3, side, side), "hf_hub_id": "timm/"}


TINY_DINO = {  # registered name -> the real timm name it shrinks, input side
    "vf_tiny_patch14_dinov2.lvd142m": ("vit_small_patch14_dinov2.lvd142m", 56),
    "vf_tiny_patch14_reg4_dinov2.lvd142m": ("vit_small_patch14_reg4_dinov2.lvd142m", 56),
    "vf_tiny_patch16_dinov3.lvd1689m": ("vit_small_patch16_dinov3.lvd1689m", 64),
}
default_cfgs = generate_default_cfgs({k: _tiny_cfg(*v) for k, v in TINY_DINO.items()})


def _shrunk(name: str, pretrained: bool, pretrained_cfg=None, pretrained_cfg_overlay=None,
            **kwargs):
    """The real entrypoint of ``name``'s model, with TINY_TRUNK and ``name``'s pretrained config
    (its weights: the tiny repo's file, or the file timm's caller overlays)."""
    cfg = resolve_pretrained_cfg(name, pretrained_cfg, pretrained_cfg_overlay).to_dict()
    real = TINY_DINO[f"{name}.{cfg['tag']}"][0].split(".")[0]
    args = {**TINY_TRUNK, "img_size": cfg["input_size"][1:], **kwargs}
    return model_entrypoint(real)(pretrained=pretrained, pretrained_cfg=cfg, **args)


@register_model
def vf_tiny_patch14_dinov2(pretrained=False, **kwargs):
    return _shrunk("vf_tiny_patch14_dinov2", pretrained, **kwargs)


@register_model
def vf_tiny_patch14_reg4_dinov2(pretrained=False, **kwargs):
    return _shrunk("vf_tiny_patch14_reg4_dinov2", pretrained, **kwargs)


@register_model
def vf_tiny_patch16_dinov3(pretrained=False, **kwargs):
    return _shrunk("vf_tiny_patch16_dinov3", pretrained, **kwargs)


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A private Hugging Face cache holding random weights of the tiny test models."""
    cache = tmp_path_factory.mktemp("hf-hub-cache")
    files = {name: write_random_hub_weights(name, cache, seed=i)
             for i, name in enumerate(("test_vit", "test_vit3", "test_resnet", *TINY_DINO))}
    return cache, files


@pytest.fixture(autouse=True)
def private_hub(hub_cache, monkeypatch):
    """Nothing from the machine's cache is read; timm's own loader (the reference) stays off
    the network too."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache[0]))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return hub_cache


def _cfg(**kw):
    base = dict(timestamps_form="reference", video_paths=["x"], device="cpu", batch_size=2, model_name="test_vit")
    base.update(kw)
    return make_config("timm", **base)


def decode(path) -> np.ndarray:
    with open_frames(str(path)) as src:
        return np.concatenate([c.frames for c in src.chunks(8)])


def max_rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def timm_reference(name: str, cache, frames: np.ndarray, **data_overrides) -> np.ndarray:
    """timm's own pipeline: its loader on the hub cache, its eval transform on PIL frames."""
    model = timm.create_model(name, pretrained=True, cache_dir=str(cache)).eval()
    data = {**timm.data.resolve_model_data_config(model), **data_overrides}
    transform = timm.data.create_transform(**data, is_training=False)
    x = torch.stack([transform(Image.fromarray(f)) for f in frames])
    with torch.no_grad():
        return model.forward_head(model.forward_features(x), pre_logits=True).numpy()


@pytest.fixture(scope="module")
def video(make_video):
    return make_video("timm5.mp4", n_frames=5, fps=FPS, width=96, height=72)


# -- preprocessing ---------------------------------------------------------------------------
DATA_CONFIGS = {
    "bicubic-center-0.95": dict(input_size=(3, 64, 64), interpolation="bicubic", crop_pct=0.95,
                                crop_mode="center", mean=(0.5,) * 3, std=(0.5,) * 3),
    "bilinear-center-0.875": dict(input_size=(3, 56, 56), interpolation="bilinear",
                                  crop_pct=0.875, crop_mode="center",
                                  mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    "siglip-squash-1.0": dict(input_size=(3, 64, 64), interpolation="bicubic", crop_pct=1.0,
                              crop_mode="squash", mean=(0.5,) * 3, std=(0.5,) * 3),
    "bilinear-squash-0.9": dict(input_size=(3, 48, 48), interpolation="bilinear", crop_pct=0.9,
                                crop_mode="squash", mean=(0.5,) * 3, std=(0.5,) * 3),
    "border-1.0": dict(input_size=(3, 64, 64), interpolation="bicubic", crop_pct=1.0,
                       crop_mode="border", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    "nonsquare-center-0.9": dict(input_size=(3, 64, 48), interpolation="bicubic", crop_pct=0.9,
                                 crop_mode="center", mean=(0.5,) * 3, std=(0.5,) * 3),
    "upscale-pad-1.3": dict(input_size=(3, 64, 64), interpolation="bilinear", crop_pct=1.3,
                            crop_mode="center", mean=(0.5,) * 3, std=(0.5,) * 3),
}


@pytest.mark.parametrize("hw", [(72, 96), (96, 72), (30, 40), (61, 113)])
@pytest.mark.parametrize("which", list(DATA_CONFIGS))
def test_preprocessing_equals_timm_eval_transform(which, hw):
    data = DATA_CONFIGS[which]
    frames = (np.random.default_rng(hw[0]).random((2, *hw, 3)) * 255).astype(np.uint8)
    upstream = timm.data.create_transform(**data, is_training=False)
    ref = torch.stack([upstream(Image.fromarray(f)) for f in frames])
    ours = preprocess(to_device(frames, CPU), recipe_from_data_config(data))
    assert ours.shape == ref.shape == (2, 3, *data["input_size"][1:])
    assert ours.dtype == torch.float32
    # PIL's fixed-point resampling recomputed exactly: the same levels, the same floats
    assert (ours - ref).abs().max().item() < 1e-6


# -- features --------------------------------------------------------------------------------
def test_bicubic_vit_from_the_hub_cache_matches_timm(private_hub, video):
    cache, files = private_hub
    cfg = _cfg()
    card, path = TimmExtractor.weights_for(cfg)["timm"]
    assert path == str(files["test_vit"])            # the snapshot file: its sha256 is recorded
    assert card.name == "timm:test_vit.r160_in1k"
    assert card.url == "https://huggingface.co/timm/test_vit.r160_in1k"
    assert "bicubic" in card.preprocessing and "crop_pct=0.95" in card.preprocessing
    ex = TimmExtractor(cfg, CPU)
    assert (ex.recipe.interpolation, ex.recipe.crop_pct, ex.recipe.crop_mode) == (
        "bicubic", 0.95, "center")
    out = ex.extract(str(video))
    assert list(out) == ["timm", "fps", "timestamps_ms"]
    assert out["timm"].shape == (5, 64) and out["timm"].dtype == np.float32
    assert float(out["fps"]) == FPS
    np.testing.assert_allclose(out["timestamps_ms"], np.arange(5) * 40.0)
    ref = timm_reference("test_vit.r160_in1k", cache, decode(video))
    assert max_rel(out["timm"], ref) < RTOL
    assert np.abs(ref[0] - ref[-1]).max() > 1e-2 * np.abs(ref).max()   # frames differ


def test_bilinear_resnet_checkpoint_path_matches_timm(private_hub, make_video, caplog):
    cache, files = private_hub
    clip = make_video("timm_rn.mp4", n_frames=3, fps=FPS, width=80, height=96)
    # an explicit file (timm's state dict) wins over allow_random_weights
    cfg = _cfg(model_name="test_resnet", checkpoint_path=str(files["test_resnet"]),
               allow_random_weights=True)
    assert TimmExtractor.weights_for(cfg)["timm"][1] == str(files["test_resnet"])
    ex = TimmExtractor(cfg, CPU)
    assert "RANDOM WEIGHTS" not in caplog.text
    assert ex.recipe.interpolation == "bilinear"
    out = ex.extract(str(clip))["timm"]
    assert out.shape == (3, 96)
    assert max_rel(out, timm_reference("test_resnet.r160_in1k", cache, decode(clip))) < RTOL


def test_attention_pool_vit_squashed_as_siglip_matches_timm(private_hub, make_video):
    """test_vit3 pools with an attention head (global_pool='map'), as SigLIP towers do; with
    crop_mode=squash crop_pct=1 the frame is resized as SigLIP / open_clip do."""
    cache, _ = private_hub
    clip = make_video("timm_sig.mp4", n_frames=3, fps=FPS, width=96, height=64)
    ex = TimmExtractor(_cfg(model_name="test_vit3", crop_mode="squash", crop_pct=1.0), CPU)
    assert ex.model.global_pool == "map"
    out = ex.extract(str(clip))["timm"]
    assert out.shape == (3, 96)
    ref = timm_reference("test_vit3.r160_in1k", cache, decode(clip), crop_mode="squash",
                         crop_pct=1.0)
    assert max_rel(out, ref) < RTOL
    centre = TimmExtractor(_cfg(model_name="test_vit3"), CPU).extract(str(clip))["timm"]
    assert np.abs(centre - out).max() > 1e-3 * np.abs(out).max()   # the override mattered


def test_siglip2_tower_random_weights(make_video, caplog):
    """A real SigLIP 2 tower of timm: its pretrained config's transform (timm: centre crop
    0.9, not the squash of open_clip), 768-d attention-pool output, nothing to fetch."""
    clip = make_video("timm_sig2.mp4", n_frames=2, fps=FPS, width=64, height=48)
    cfg = _cfg(model_name="vit_base_patch16_siglip_224.v2_webli", allow_random_weights=True)
    assert (cfg.crop_pct, cfg.crop_mode) == (0.9, "center")
    assert TimmExtractor.weights_for(cfg)["timm"][1] is None        # the record says random
    ex = TimmExtractor(cfg, CPU)
    assert "RANDOM WEIGHTS" in caplog.text
    assert ex.model.num_classes == 0 and ex.model.global_pool == "map"
    assert ex.recipe.mean == (0.5, 0.5, 0.5) and ex.recipe.size == (224, 224)
    out = ex.extract(str(clip))["timm"]
    assert out.shape == (2, 768)
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(ex.model))
    x = torch.stack([transform(Image.fromarray(f)) for f in decode(clip)])
    with torch.no_grad():
        ref = ex.model.forward_head(ex.model.forward_features(x), pre_logits=True).numpy()
    assert max_rel(out, ref) < RTOL


@pytest.mark.parametrize("name", ["vf_tiny_patch14_dinov2.lvd142m",
                                  "vf_tiny_patch14_reg4_dinov2.lvd142m"])
def test_dinov2_is_the_class_token_and_matches_timm(private_hub, make_video, name):
    """DINOv2 (vit_*_patch14_dinov2.lvd142m, with registers vit_*_patch14_reg4_dinov2.lvd142m):
    no classifier, the pooled pre-logits are the final-norm class token (registers left out);
    the tag's transform: bicubic resize of the shorter side, crop_pct 1, ImageNet mean / std."""
    cache, files = private_hub
    clip = make_video("timm_dinov2.mp4", n_frames=3, fps=FPS, width=96, height=72)
    cfg = _cfg(model_name=name)
    assert (cfg.crop_pct, cfg.crop_mode) == (1.0, "center")
    assert TimmExtractor.weights_for(cfg)["timm"][1] == str(files[name])
    ex = TimmExtractor(cfg, CPU)
    assert type(ex.model).__name__ == "VisionTransformer" and ex.model.global_pool == "token"
    assert ex.model.num_classes == 0
    assert ex.model.num_prefix_tokens == (5 if "reg4" in name else 1)
    assert ex.recipe.interpolation == "bicubic" and ex.recipe.mean == (0.485, 0.456, 0.406)
    out = ex.extract(str(clip))["timm"]
    assert out.shape == (3, 32)
    frames = decode(clip)
    assert max_rel(out, timm_reference(name, cache, frames)) < RTOL
    x = preprocess(to_device(frames, CPU), ex.recipe)
    with torch.no_grad():
        cls = ex.model.forward_features(x)[:, 0]
    assert max_rel(out, cls.numpy()) < RTOL
    with pytest.raises(ConfigError, match="option show_pred"):
        _cfg(model_name=name, show_pred=True)


def test_dinov3_is_the_patch_token_mean_and_matches_timm(private_hub, make_video):
    """DINOv3 ViTs (vit_*_patch16_dinov3.lvd1689m, timm's Eva with rope and 4 registers): timm
    pools the mean of the patch tokens after the final norm (its default global_pool 'avg'; the
    class token and the registers left out), not upstream's class token."""
    cache, files = private_hub
    name = "vf_tiny_patch16_dinov3.lvd1689m"
    clip = make_video("timm_dinov3.mp4", n_frames=3, fps=FPS, width=72, height=96)
    cfg = _cfg(model_name=name)
    assert (cfg.crop_pct, cfg.crop_mode) == (1.0, "center")
    assert TimmExtractor.weights_for(cfg)["timm"][1] == str(files[name])
    ex = TimmExtractor(cfg, CPU)
    assert type(ex.model).__name__ == "Eva" and ex.model.rope is not None
    assert (ex.model.global_pool, ex.model.num_prefix_tokens, ex.model.num_classes) == ("avg", 5, 0)
    out = ex.extract(str(clip))["timm"]
    assert out.shape == (3, 32)
    frames = decode(clip)
    assert max_rel(out, timm_reference(name, cache, frames)) < RTOL
    x = preprocess(to_device(frames, CPU), ex.recipe)
    with torch.no_grad():
        patches = ex.model.forward_features(x)[:, 5:]
    assert max_rel(out, patches.mean(1).numpy()) < RTOL


# -- show_pred -------------------------------------------------------------------------------
def test_show_pred_prints_imagenet_top5(private_hub, video, capsys):
    cache, _ = private_hub
    TimmExtractor(_cfg(show_pred=True, batch_size=3), CPU).extract(str(video))
    lines = [ln for ln in capsys.readouterr().out.splitlines() if " frame #" in ln]
    assert [ln.split(" frame #")[1].split(":")[0] for ln in lines] == ["0", "1", "2", "3", "4"]
    model = timm.create_model("test_vit.r160_in1k", pretrained=True, cache_dir=str(cache)).eval()
    names = timm.data.ImageNetInfo("imagenet-1k").label_descriptions()
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
    with torch.no_grad():
        probs = torch.softmax(model(torch.stack([transform(Image.fromarray(f))
                                                 for f in decode(video)])), -1)
    for row, ln in enumerate(lines):
        preds = ln.split(" frame #", 1)[1].split(": ", 1)[1].split("  ")
        top_p, top_i = probs[row].topk(5)
        assert [p.rsplit(": ", 1)[0] for p in preds] == [names[i] for i in top_i]
        np.testing.assert_allclose([float(p.rsplit(": ", 1)[1]) for p in preds], top_p.numpy(),
                                   atol=1.5e-3)


# -- weights and errors ----------------------------------------------------------------------
def test_offline_names_the_hf_download_and_the_cache(private_hub, monkeypatch):
    cache, _ = private_hub
    name = "vit_base_patch16_224.augreg_in21k"
    for env in ({"VIDEO_FEATURES_OFFLINE": "1"},
                {"VIDEO_FEATURES_OFFLINE": "0", "HF_HUB_OFFLINE": "1"}):
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        with pytest.raises(WeightsError) as ei:
            TimmExtractor.weights_for(_cfg(model_name=name))
        msg = str(ei.value)
        assert "\n" not in msg and f"hf download timm/{name} model.safetensors" in msg
        assert str(cache) in msg and "checkpoint_path" in msg
    with pytest.raises(WeightsError, match="hf download timm/convnext_base.fb_in22k_ft_in1k"):
        TimmExtractor(_cfg(model_name="convnext_base"), CPU)   # the default tag's repo


def test_no_network_names_the_reason(monkeypatch):
    import huggingface_hub

    real = huggingface_hub.hf_hub_download

    def unreachable(*a, local_files_only=False, **k):
        if local_files_only:
            return real(*a, local_files_only=True, **k)
        raise OSError("Network is unreachable")

    monkeypatch.setenv("VIDEO_FEATURES_OFFLINE", "0")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    with pytest.raises(WeightsError) as ei:
        TimmExtractor.weights_for(_cfg(model_name="convnext_base"))
    msg = str(ei.value)
    assert "\n" not in msg and "Network is unreachable" in msg
    assert "hf download timm/convnext_base.fb_in22k_ft_in1k" in msg


def test_weights_that_do_not_fit_or_do_not_exist(private_hub, tmp_path):
    _, files = private_hub
    with pytest.raises(WeightsError) as ei:          # a test_resnet file for test_vit
        TimmExtractor(_cfg(checkpoint_path=str(files["test_resnet"])), CPU)
    assert "cannot load" in str(ei.value) and "\n" not in str(ei.value)
    with pytest.raises(WeightsError, match="does not exist"):
        TimmExtractor.weights_for(_cfg(checkpoint_path=str(tmp_path / "none.safetensors")))
    with pytest.raises(WeightsError, match="publishes no weights"):   # test_vit4: no repo, no URL
        TimmExtractor.weights_for(_cfg(model_name="test_vit4"))


@pytest.mark.parametrize("values,match", [
    (dict(model_name="vit_bse_patch16_224"), "option model_name.*vit_base_patch16_224"),
    (dict(model_name="convnext_base.no_such_tag"), "option model_name.*tag.*list_pretrained"),
    (dict(model_name="vit_base_patch16_siglip_224.webli", show_pred=True), "option show_pred"),
    (dict(crop_mode="stretch"), "option crop_mode"),
    (dict(crop_pct=0.0), "option crop_pct"),
])
def test_invalid_options_name_the_option(values, match):
    with pytest.raises(ConfigError, match=match) as ei:
        _cfg(**values)
    assert "\n" not in str(ei.value)


def test_defaults_are_filled_with_the_values_used():
    cfg = make_config("timm", video_paths=["a.mp4"], device="cpu")
    assert cfg.model_name == "vit_base_patch16_224.augreg_in21k" and cfg.batch_size == 8
    assert (cfg.crop_pct, cfg.crop_mode) == (0.9, "center")    # from timm's pretrained config
    assert TimmExtractor.output_keys_for(cfg) == ("timm", "fps", "timestamps_ms")


def test_bad_input_and_no_frames_raise_video_error(tmp_path):
    from video_features.utils.pipeline import VideoWork

    ex = TimmExtractor(_cfg(), CPU)
    bad = tmp_path / "bad.mp4"
    bad.write_text("not a video")
    with pytest.raises(VideoError) as ei:
        ex.extract(str(bad))
    assert "\n" not in str(ei.value)
    with pytest.raises(VideoError, match="no frames"):
        ex.finish(VideoWork(0, "empty.mp4", fps=FPS))


def test_runner_saves_numpy(private_hub, video, tmp_path):
    from video_features.utils.runner import run

    out_dir = tmp_path / "out"
    cfg = _cfg(video_paths=[str(video)], on_extraction="save_numpy", output_path=str(out_dir),
               progress=False)
    summary = run(cfg)
    assert summary.count("done") == 1
    saved = {p.name.split("_", 1)[1]: np.load(p) for p in (out_dir / "timm").rglob("*.npy")}
    assert set(saved) == {"timm.npy", "fps.npy", "timestamps_ms.npy"}
    direct = TimmExtractor(_cfg(), CPU).extract(str(video))
    np.testing.assert_allclose(saved["timm.npy"], direct["timm"], rtol=1e-5,
                               atol=1e-5 * np.abs(direct["timm"]).max())
    np.testing.assert_allclose(saved["timestamps_ms.npy"], direct["timestamps_ms"])
    meta = json.loads(next((out_dir / "timm").rglob("*_meta.json")).read_text())
    ident = json.dumps(meta)
    assert "timm:test_vit.r160_in1k" in ident and "model.safetensors" in ident


@pytest.mark.gpu
def test_cuda_matches_cpu(video):
    frames = decode(video)
    recipe = recipe_from_data_config(DATA_CONFIGS["bicubic-center-0.95"])
    cpu_x = preprocess(to_device(frames, CPU), recipe)
    gpu_x = preprocess(to_device(frames, torch.device("cuda")), recipe)
    assert (gpu_x.cpu() - cpu_x).abs().max().item() < 1e-6
    cpu = TimmExtractor(_cfg(), CPU).extract(str(video))["timm"]
    gpu = TimmExtractor(_cfg(device="cuda", tf32=False), torch.device("cuda")).extract(str(video))
    assert max_rel(gpu["timm"], cpu) < 1e-4


@pytest.mark.parametrize("crops", ["5", "10"])
@pytest.mark.parametrize("hw", [(72, 96), (61, 113)])
@pytest.mark.parametrize("which", ["bicubic-center-0.95", "bilinear-squash-0.9", "nonsquare-center-0.9"])
def test_crops_equal_timm_eval_transform_with_ten_crop(which, hw, crops):
    from tests.crop_checks import with_crops

    data = DATA_CONFIGS[which]
    frames = (np.random.default_rng(hw[0]).random((2, *hw, 3)) * 255).astype(np.uint8)
    upstream = with_crops(timm.data.create_transform(**data, is_training=False), crops)
    ref = torch.stack([upstream(Image.fromarray(f)) for f in frames])
    ours = preprocess(to_device(frames, CPU), recipe_from_data_config(data), crops)
    assert ours.shape == ref.shape == (2, int(crops), 3, *data["input_size"][1:])
    assert (ours - ref).abs().max().item() < 1e-6


def test_crops_run_every_view_and_a_squash_to_size_refuses_them(private_hub, video, capsys):
    from tests.crop_checks import check_views

    out = TimmExtractor(_cfg(crops="10", show_pred=True), CPU).extract(str(video))
    center = TimmExtractor(_cfg(), CPU).extract(str(video))
    check_views(out["timm"], center["timm"], 10)
    assert len([ln for ln in capsys.readouterr().out.splitlines() if "frame #" in ln]) == 5
    with pytest.raises(ConfigError, match="crops=5: .*nothing to crop"):
        TimmExtractor(_cfg(crops="5", crop_mode="squash", crop_pct=1.0), CPU)
