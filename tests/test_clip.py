"""CLIP frame-wise features: preprocessing against open_clip's PIL transforms, features against
open_clip's own OpenAI loader and ``encode_image``, TorchScript and plain checkpoints (fp16 and
fp32), a SigLIP configuration with random weights, SigLIP 2 (shrunk) from the Hugging Face hub
cache, zero-shot ``show_pred``, errors and a run through the runner.

Checkpoints are random weights in OpenAI's exact state-dict layout, written under the card's
file name in the private torch hub cache or passed as ``checkpoint_path``.
"""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

open_clip = pytest.importorskip("open_clip")

from video_features.models.clip.extractor import CLIPExtractor  # noqa: E402
from video_features.models.clip.preprocess import ImageRecipe, preprocess, recipe_from_cfg  # noqa: E402
from video_features.models.clip.weights import (kinetics_prompts, openai_card,  # noqa: E402
                                 write_random_openai_checkpoint)
from video_features.utils.config import make_config, parse_args  # noqa: E402
from video_features.utils.errors import ConfigError, VideoError, WeightsError  # noqa: E402
from video_features.utils.transforms import to_device  # noqa: E402
from video_features.utils.video import open_frames  # noqa: E402

CPU = torch.device("cpu")
RTOL = 1e-4


def _cfg(**kw):
    base = dict(timestamps_form="reference", video_paths=["x"], device="cpu", batch_size=2)
    base.update(kw)
    return make_config("clip", **base)


def decode(path) -> np.ndarray:
    with open_frames(str(path)) as src:
        return np.concatenate([c.frames for c in src.chunks(8)])


def max_rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def vitb32(hub_checkpoints):
    """fp16 ViT-B/32 in OpenAI's layout at the card's hub-cache path, and open_clip's own
    OpenAI loader's model of the same file."""
    path = hub_checkpoints / openai_card("ViT-B/32").filename
    write_random_openai_checkpoint(path, "ViT-B/32", seed=0, dtype=torch.float16)
    ref = open_clip.load_openai_model(str(path), precision="fp32", device="cpu").eval()
    return path, ref


@pytest.fixture(scope="module")
def video(make_video):
    return make_video("clip5.mp4", n_frames=5, fps=25.0, width=96, height=72)


def open_clip_features(model, frames: np.ndarray, transform) -> np.ndarray:
    with torch.no_grad():
        x = torch.stack([transform(Image.fromarray(f)) for f in frames])
        return model.encode_image(x).numpy()


# -- preprocessing ---------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(320, 240), (240, 320), (64, 48), (250, 188)])
@pytest.mark.parametrize("tag", [("ViT-B-32", "openai"), ("ViT-B-16-SigLIP", "webli")])
def test_preprocessing_equals_open_clip_pil_transform(make_video, size, tag):
    w, h = size
    frames = decode(make_video(f"clippp{w}x{h}.mp4", n_frames=3, width=w, height=h))
    pcfg = {**open_clip.get_pretrained_cfg(*tag), "size": 224}
    recipe = recipe_from_cfg(pcfg)
    assert recipe.resize_mode == ("shortest" if tag[1] == "openai" else "squash")
    upstream = open_clip.image_transform(224, is_train=False, mean=pcfg["mean"], std=pcfg["std"],
                                         resize_mode=pcfg["resize_mode"],
                                         interpolation=pcfg["interpolation"])
    ref = torch.stack([upstream(Image.fromarray(f)) for f in frames])
    ours = preprocess(to_device(frames, CPU), recipe)
    assert ours.shape == ref.shape == (3, 3, 224, 224) and ours.dtype == torch.float32
    # PIL's fixed-point resampling is recomputed exactly: same levels, same floats
    assert (ours - ref).abs().max().item() < 1e-6


def test_bilinear_and_larger_inputs_equal_pil():
    rng = np.random.default_rng(0)
    frames = (rng.random((2, 200, 360, 3)) * 255).astype(np.uint8)
    for interpolation in ("bicubic", "bilinear"):
        recipe = ImageRecipe((224, 224), interpolation=interpolation)
        upstream = open_clip.image_transform(224, is_train=False, interpolation=interpolation)
        ref = torch.stack([upstream(Image.fromarray(f)) for f in frames])
        assert (preprocess(to_device(frames, CPU), recipe) - ref).abs().max().item() < 1e-6


# -- OpenAI checkpoints ----------------------------------------------------------------------
def test_vit_b32_fp16_from_hub_cache_matches_open_clip(vitb32, video):
    path, ref_model = vitb32
    ex = CLIPExtractor(_cfg(), CPU)
    out = ex.extract(str(video))
    assert set(out) == {"clip", "fps", "timestamps_ms"}
    assert out["clip"].shape == (5, 512) and out["clip"].dtype == np.float32
    assert float(out["fps"]) == 25.0
    np.testing.assert_allclose(out["timestamps_ms"], np.arange(5) * 40.0)
    ref = open_clip_features(ref_model, decode(video), open_clip.image_transform(224, False))
    assert max_rel(out["clip"], ref) < RTOL
    # projected, not normalised (as the reference saves it)
    assert not np.allclose(np.linalg.norm(out["clip"], axis=1), 1.0, atol=1e-3)


def test_torchscript_archive_loads_like_the_plain_state_dict(vitb32, video, tmp_path):
    ts = write_random_openai_checkpoint(tmp_path / "vitb32_ts.pt", "ViT-B/32", seed=0,
                                        dtype=torch.float16, torchscript=True)
    archive = torch.jit.load(str(ts))        # a real TorchScript archive, with OpenAI's extras
    keys = set(archive.state_dict())
    assert {"input_resolution", "context_length", "vocab_size", "visual.proj"} <= keys
    plain = CLIPExtractor(_cfg(), CPU).extract(str(video))["clip"]
    from_ts = CLIPExtractor(_cfg(checkpoint_path=str(ts)), CPU).extract(str(video))["clip"]
    np.testing.assert_array_equal(from_ts, plain)


def test_rn50_fp32_checkpoint_path_matches_open_clip(tmp_path, make_video):
    path = write_random_openai_checkpoint(tmp_path / "rn50.pt", "RN50", seed=1,
                                          dtype=torch.float32)
    clip_video = make_video("clip_rn.mp4", n_frames=3, fps=25.0, width=80, height=96)
    out = CLIPExtractor(_cfg(model_name="RN50", checkpoint_path=str(path)), CPU).extract(
        str(clip_video))
    assert out["clip"].shape == (3, 1024)
    # open_clip's generic loader keeps fp32 weights as they are, as we do
    ref_model = open_clip.create_model("RN50", pretrained=str(path), force_quick_gelu=True).eval()
    transform = open_clip.image_transform(224, False)
    ref = open_clip_features(ref_model, decode(clip_video), transform)
    assert max_rel(out["clip"], ref) < RTOL
    # OpenAI's loader (and the reference tool) round every checkpoint through fp16 first
    fp16_model = open_clip.load_openai_model(str(path), precision="fp32", device="cpu").eval()
    rounded = open_clip_features(fp16_model, decode(clip_video), transform)
    assert RTOL / 100 < max_rel(out["clip"], rounded) < 1e-2
    # the architecture comes from model_name: another one does not fit, said in one line
    with pytest.raises(WeightsError, match="does not fit the network"):
        CLIPExtractor(_cfg(model_name="RN101", checkpoint_path=str(path)), CPU)


def test_open_clip_spelling_of_an_openai_model_is_the_same_card():
    a = CLIPExtractor.weights_for(_cfg(model_name="ViT-B-32"))["clip"][0]
    b = CLIPExtractor.weights_for(_cfg(model_name="ViT-B/32"))["clip"][0]
    assert a is b and a.sha256 in a.url and a.filename == "clip-openai-ViT-B-32.pt"
    big = CLIPExtractor.weights_for(_cfg(model_name="ViT-L/14@336px"))["clip"][0]
    assert big.url.endswith("3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/"
                            "ViT-L-14-336px.pt")


def test_missing_openai_weights_name_url_and_cache_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    monkeypatch.setenv("HOME", str(tmp_path))     # no ~/.cache/clip either
    with pytest.raises(WeightsError) as ei:
        CLIPExtractor(_cfg(model_name="RN50x4"), CPU)
    msg = str(ei.value)
    assert ("https://openaipublic.azureedge.net/clip/models/7e526bd135e493cef0776de27d5f42653e6b4c8"
            "bf9e0f653bb11773263205fdd/RN50x4.pt") in msg
    assert "hub/checkpoints/clip-openai-RN50x4.pt" in msg


# -- open_clip tags --------------------------------------------------------------------------
def test_siglip_random_weights_match_open_clip_encode_image(make_video):
    clip_video = make_video("clip_sig.mp4", n_frames=2, fps=25.0, width=96, height=64)
    cfg = _cfg(model_name="ViT-B-16-SigLIP", pretrained="webli", allow_random_weights=True)
    assert CLIPExtractor.weights_for(cfg)["clip"][1] is None      # random: nothing to fetch
    torch.manual_seed(3)
    ex = CLIPExtractor(cfg, CPU)
    assert ex.recipe.resize_mode == "squash" and ex.recipe.mean == (0.5, 0.5, 0.5)
    out = ex.extract(str(clip_video))
    assert out["clip"].shape == (2, 768)
    torch.manual_seed(3)   # the same random initialisation, built by open_clip itself
    model = open_clip.create_model("ViT-B-16-SigLIP", pretrained=None,
                                   pretrained_text=False).eval()
    torch.testing.assert_close(model.visual.state_dict(), ex.visual.state_dict())
    pcfg = open_clip.get_pretrained_cfg("ViT-B-16-SigLIP", "webli")
    transform = open_clip.image_transform(224, False, mean=pcfg["mean"], std=pcfg["std"],
                                          resize_mode="squash", interpolation="bicubic")
    ref = open_clip_features(model, decode(clip_video), transform)
    assert max_rel(out["clip"], ref) < RTOL


def vf_tiny_patch16_siglip(pretrained=False, **kwargs):
    """timm's SigLIP image tower (the vit_base_patch16_siglip_224 entrypoint: no class token,
    attention-pool head, tanh GELU), 32 wide, 2 blocks, 32 x 32 input."""
    from timm.models import model_entrypoint

    args = dict(embed_dim=32, depth=2, num_heads=2, img_size=32)
    return model_entrypoint("vit_base_patch16_siglip_224")(pretrained=pretrained,
                                                            **{**args, **kwargs})


@pytest.fixture
def tiny_siglip2(tmp_path, monkeypatch):
    """open_clip's ViT-B-16-SigLIP2 with its tag (webli: repo timm/ViT-B-16-SigLIP2, squash
    resize) as it is, its towers shrunk (the image tower: timm's SigLIP tower, tiny), and random
    weights in open_clip's layout as the tag's ``open_clip_model.safetensors`` in a private
    Hugging Face hub cache."""
    import copy

    import huggingface_hub.constants
    import open_clip.factory
    import timm.models
    from safetensors.torch import save_file

    import video_features.utils.weights as vf_weights

    if not timm.models.is_model("vf_tiny_patch16_siglip"):
        timm.models.register_model(vf_tiny_patch16_siglip)
    arch = "ViT-B-16-SigLIP2"
    cfg = copy.deepcopy(open_clip.get_model_config(arch))
    cfg["embed_dim"] = 32
    cfg["vision_cfg"].update(timm_model_name="vf_tiny_patch16_siglip", image_size=32)
    cfg["text_cfg"].update(vocab_size=64, width=32, heads=2, layers=1)
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, arch, cfg)
    # the tag's weight card, which names the input size, is registered for this test only
    monkeypatch.setattr(vf_weights, "CARDS", dict(vf_weights.CARDS))
    torch.manual_seed(5)
    state = open_clip.create_model(arch, pretrained=None, pretrained_text=False).state_dict()
    state = {k: (v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v).contiguous()
             for k, v in state.items()}
    repo, commit = tmp_path / "hub" / "models--timm--ViT-B-16-SigLIP2", "0" * 40
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    path = repo / "snapshots" / commit / "open_clip_model.safetensors"
    save_file(state, str(path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hub", path


def test_siglip2_from_the_hub_cache_matches_open_clip(tiny_siglip2, make_video):
    """SigLIP 2 (model_name=ViT-B-16-SigLIP2 pretrained=webli) through the path users take: the
    tag's file from the Hugging Face hub cache, its squash resize; features equal open_clip's own
    create_model_and_transforms(pretrained='webli') transform and encode_image."""
    cache, path = tiny_siglip2
    clip_video = make_video("clip_sig2.mp4", n_frames=3, fps=25.0, width=64, height=48)
    cfg = _cfg(model_name="ViT-B-16-SigLIP2", pretrained="webli")
    card, found = CLIPExtractor.weights_for(cfg)["clip"]
    assert found == str(path) and card.url == "https://huggingface.co/timm/ViT-B-16-SigLIP2"
    ex = CLIPExtractor(cfg, CPU)
    assert (ex.recipe.resize_mode, ex.recipe.interpolation) == ("squash", "bicubic")
    assert ex.recipe.mean == (0.5, 0.5, 0.5) and ex.recipe.size == (32, 32)
    assert ex.visual.trunk.global_pool == "map" and ex.visual.trunk.num_prefix_tokens == 0
    out = ex.extract(str(clip_video))["clip"]
    assert out.shape == (3, 32)
    model, _, transform = open_clip.create_model_and_transforms(
        "ViT-B-16-SigLIP2", pretrained="webli", cache_dir=str(cache))
    ref = open_clip_features(model.eval(), decode(clip_video), transform)
    assert max_rel(out, ref) < RTOL
    assert np.abs(ref[0] - ref[-1]).max() > 1e-2 * np.abs(ref).max()   # frames differ


def test_offline_open_clip_tag_names_what_to_fetch():
    cfg = _cfg(model_name="ViT-B-16-SigLIP2", pretrained="webli")
    with pytest.raises(WeightsError) as ei:
        CLIPExtractor.weights_for(cfg)
    msg = str(ei.value)
    assert "https://huggingface.co/timm/ViT-B-16-SigLIP2" in msg and "open_clip_model.safetensors" in msg
    assert "`hf download timm/ViT-B-16-SigLIP2 open_clip_model.safetensors --cache-dir" in msg
    assert "checkpoint_path" in msg


# -- show_pred -------------------------------------------------------------------------------
TEXTS = ["a dog", "a cat", "people dancing", "a red car", "playing guitar", "a beach", "cooking"]


def test_show_pred_ranks_pred_texts_as_zero_shot(vitb32, video, capsys):
    _, ref_model = vitb32
    out = CLIPExtractor(_cfg(show_pred=True, pred_texts=TEXTS), CPU).extract(str(video))
    lines = [ln for ln in capsys.readouterr().out.splitlines() if " frame #" in ln]
    assert len(lines) == 5
    # independent zero-shot logits: open_clip's text tower and tokenizer, cosine * exp(scale)
    tokens = open_clip.get_tokenizer("ViT-B-32")(TEXTS)
    with torch.no_grad():
        text = ref_model.encode_text(tokens).double()
        image = ref_model.encode_image(torch.stack([
            open_clip.image_transform(224, False)(Image.fromarray(f)) for f in decode(video)]))
    image = image.double()
    logits = ref_model.logit_scale.detach().exp().double() * (
        image / image.norm(dim=-1, keepdim=True)) @ (text / text.norm(dim=-1, keepdim=True)).T
    probs = torch.softmax(logits, -1)
    for row, ln in enumerate(lines):
        assert ln.split(" frame #")[1].startswith(f"{row}:")
        preds = ln.split(" frame #", 1)[1].split(": ", 1)[1].split("  ")
        assert len(preds) == 5
        top_p, top_i = probs[row].topk(5)
        assert [p.rsplit(": ", 1)[0] for p in preds] == [TEXTS[i] for i in top_i]
        np.testing.assert_allclose([float(p.rsplit(": ", 1)[1]) for p in preds], top_p.numpy(),
                                   atol=1.5e-3)
    assert out["clip"].shape == (5, 512)


def test_kinetics_prompts_follow_the_reference_template():
    names, prompts = kinetics_prompts()
    assert len(names) == len(prompts) == 400
    assert prompts[0] == "a photo of abseiling" and prompts[-1] == f"a photo of {names[-1]}"


# -- errors, options, runner -----------------------------------------------------------------
def test_bad_input_and_no_frames_raise_video_error(vitb32, tmp_path):
    from video_features.utils.pipeline import VideoWork

    ex = CLIPExtractor(_cfg(), CPU)
    bad = tmp_path / "bad.mp4"
    bad.write_text("not a video")
    with pytest.raises(VideoError):
        ex.extract(str(bad))
    with pytest.raises(VideoError, match="no frames"):
        ex.finish(VideoWork(0, "empty.mp4", fps=25.0))


@pytest.mark.parametrize("values,match", [
    (dict(model_name="ViT-X/99"), "model_name"),
    (dict(model_name="ViT-B-32", pretrained="no_such_tag"), "pretrained"),
    (dict(model_name="not-an-arch", pretrained="laion2b_s34b_b79k"), "model_name"),
    (dict(pred_texts=[]), "pred_texts"),
])
def test_invalid_options_name_the_option(values, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(**values)


def test_missing_open_clip_names_the_pip_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(ConfigError, match="pip install open_clip_torch"):
        _cfg()


def test_command_line_options():
    cfg = parse_args(["--feature_type", "clip", "--device", "cpu", "--video_paths", "a.mp4",
                      "--pred_texts", "a dog", "a cat", "model_name=ViT-L/14@336px"])
    assert cfg.model_name == "ViT-L/14@336px" and cfg.pred_texts == ["a dog", "a cat"]
    assert cfg.pretrained == "openai" and cfg.batch_size == 8


def test_runner_saves_numpy(vitb32, video, tmp_path):
    from video_features.utils.runner import run

    out_dir = tmp_path / "out"
    cfg = _cfg(video_paths=[str(video)], on_extraction="save_numpy", output_path=str(out_dir),
               progress=False)
    summary = run(cfg)
    assert summary.count("done") == 1
    saved = {p.name.split("_", 1)[1]: np.load(p) for p in (out_dir / "clip").rglob("*.npy")}
    assert set(saved) == {"clip.npy", "fps.npy", "timestamps_ms.npy"}
    direct = CLIPExtractor(_cfg(), CPU).extract(str(video))
    np.testing.assert_allclose(saved["clip.npy"], direct["clip"], rtol=1e-5,
                               atol=1e-5 * np.abs(direct["clip"]).max())
    np.testing.assert_allclose(saved["timestamps_ms.npy"], direct["timestamps_ms"])


@pytest.mark.gpu
def test_cuda_matches_cpu(vitb32, video):
    frames = decode(video)
    cpu_x = preprocess(to_device(frames, CPU), ImageRecipe((224, 224)))
    gpu_x = preprocess(to_device(frames, torch.device("cuda")), ImageRecipe((224, 224)))
    assert (gpu_x.cpu() - cpu_x).abs().max().item() < 1e-6
    cpu = CLIPExtractor(_cfg(), CPU).extract(str(video))["clip"]
    gpu = CLIPExtractor(_cfg(device="cuda", tf32=False), torch.device("cuda")).extract(str(video))
    assert max_rel(gpu["clip"], cpu) < 1e-4
    half = CLIPExtractor(_cfg(device="cuda", precision="fp16"),
                         torch.device("cuda")).extract(str(video))["clip"]
    assert max_rel(half, cpu) < 2e-2


@pytest.mark.parametrize("crops", ["5", "10"])
@pytest.mark.parametrize("size", [(320, 240), (250, 188)])
def test_crops_equal_open_clip_transform_with_ten_crop(make_video, size, crops):
    from tests.crop_checks import with_crops

    w, h = size
    frames = decode(make_video(f"clippp{w}x{h}.mp4", n_frames=3, width=w, height=h))
    pcfg = {**open_clip.get_pretrained_cfg("ViT-B-32", "openai"), "size": 224}
    upstream = open_clip.image_transform(224, is_train=False, mean=pcfg["mean"], std=pcfg["std"],
                                         resize_mode=pcfg["resize_mode"],
                                         interpolation=pcfg["interpolation"])
    ref = torch.stack([with_crops(upstream, crops)(Image.fromarray(f)) for f in frames])
    ours = preprocess(to_device(frames, CPU), recipe_from_cfg(pcfg), crops)
    assert ours.shape == ref.shape == (3, int(crops), 3, 224, 224)
    assert (ours - ref).abs().max().item() < 1e-6
    torch.testing.assert_close(ours[:, 4], preprocess(to_device(frames, CPU), recipe_from_cfg(pcfg)),
                               rtol=0, atol=0)


def test_crops_run_every_view_and_squashing_models_refuse_them(vitb32, video):
    from tests.crop_checks import check_views

    out = CLIPExtractor(_cfg(crops="5"), CPU).extract(str(video))
    center = CLIPExtractor(_cfg(), CPU).extract(str(video))
    check_views(out["clip"], center["clip"], 5)
    with pytest.raises(ConfigError, match="crops=10: ViT-B-16-SigLIP squashes"):
        CLIPExtractor(_cfg(model_name="ViT-B-16-SigLIP", pretrained="webli", crops="10",
                           allow_random_weights=True), CPU)
