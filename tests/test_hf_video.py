"""hf_video: every supported transformers video architecture against transformers' own pipeline
(the repo's processor on the decoded frames, then the model, pooled as its model card or head
pools), the processor on the device against the processor on host frames, multi-crop views,
clip windows and timestamps, models that ship their own code (refused unless
trust_remote_code=true), errors, and a run through the runner.

Models are tiny random configs of the real architectures (32 px, 4 frames, 1 layer), written
with ``save_pretrained`` in transformers' layout, so they load through the real path.
"""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import av
import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "AutoVideoProcessor"):
    pytest.skip("transformers without video processors", allow_module_level=True)

from video_features.models.hf_video.extractor import HFVideoExtractor  # noqa: E402
from video_features.models.hf_video.preprocess import OnDevice  # noqa: E402
from video_features.utils.config import make_config  # noqa: E402
from video_features.utils.errors import ConfigError, VideoError, WeightsError  # noqa: E402
from video_features.utils.transforms import to_device  # noqa: E402

CPU = torch.device("cpu")
FPS = 25.0
FRAMES = 4
VIT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
PIXELS = {"size": {"shortest_edge": 36}, "crop_size": {"height": 32, "width": 32}}


def _jitter(model):
    """Weights off the initialiser's ones and zeros, so every norm and bias matters."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _vjepa2(classify: bool):
    cfg = transformers.VJEPA2Config(
        crop_size=32, frames_per_clip=FRAMES, hidden_size=32, num_hidden_layers=1,
        num_attention_heads=2, mlp_ratio=2, pred_hidden_size=16, pred_num_hidden_layers=1,
        pred_num_attention_heads=2, num_pooler_layers=1, patch_size=16, tubelet_size=2,
        **({"num_labels": 5} if classify else {}))
    model = (transformers.VJEPA2ForVideoClassification if classify else transformers.VJEPA2Model)(cfg)
    return model, transformers.VJEPA2VideoProcessor(crop_size=32)


def _xclip():
    cfg = transformers.XCLIPConfig(
        text_config=dict(VIT), projection_dim=32, prompt_layers=1, prompt_num_attention_heads=2,
        vision_config=dict(VIT, image_size=32, patch_size=16, num_frames=FRAMES,
                           mit_hidden_size=32, mit_intermediate_size=64,
                           mit_num_hidden_layers=1, mit_num_attention_heads=2))
    return transformers.XCLIPModel(cfg), transformers.VideoMAEImageProcessor(**PIXELS)


#: name -> (model and processor, the pooling auto picks)
ARCHS = {
    "vjepa2": (lambda: _vjepa2(False), "mean"),
    "vjepa2_classifier": (lambda: _vjepa2(True), "attentive"),
    "timesformer": (lambda: (transformers.TimesformerForVideoClassification(
        transformers.TimesformerConfig(image_size=32, patch_size=16, num_frames=FRAMES,
                                       num_labels=5, **VIT)),
        transformers.TimesformerVideoProcessor(**PIXELS)), "cls"),
    "vivit": (lambda: (transformers.VivitForVideoClassification(
        transformers.VivitConfig(image_size=32, num_frames=FRAMES, tubelet_size=[2, 16, 16],
                                 num_labels=5, **VIT)),
        transformers.VivitVideoProcessor(**PIXELS)), "cls"),
    "xclip": (_xclip, "mit"),
    "videomae": (lambda: (transformers.VideoMAEForVideoClassification(
        transformers.VideoMAEConfig(image_size=32, patch_size=16, num_frames=FRAMES,
                                    tubelet_size=2, use_mean_pooling=True, num_labels=5, **VIT)),
        transformers.VideoMAEImageProcessor(**PIXELS)), "fc_norm"),
}


pytestmark = pytest.mark.usefixtures("private_hub_cache")   # tests/conftest.py


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hfv")
    out = {}
    for name, (make, _) in ARCHS.items():
        torch.manual_seed(0)
        model, processor = make()
        _jitter(model).save_pretrained(root / name)
        processor.save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def video(make_video):
    return make_video("hfv9.mp4", n_frames=9, fps=FPS, width=64, height=48)


def _cfg(folder, **kw):
    base = dict(video_paths=["x"], device="cpu", model_name=str(folder), batch_size=2)
    base.update(kw)
    return make_config("hf_video", **base)


def _extract(folder, path, **kw):
    ex = HFVideoExtractor(_cfg(folder, **kw), CPU)
    return ex, ex.extract(str(path))


def decode_rgb(path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def reference(name: str, folder: Path, clip: np.ndarray, pooling: str) -> np.ndarray:
    """transformers' own pipeline on one clip of decoded frames: the repo's processor (the
    processor class X-CLIP's processor uses for videos), the model, its card's pooling."""
    with torch.no_grad():
        if name == "xclip":
            model = transformers.XCLIPModel.from_pretrained(folder).eval()
            pv = transformers.AutoImageProcessor.from_pretrained(folder)(
                images=list(clip), return_tensors="pt").pixel_values
            if pooling == "mit":
                return model.get_video_features(pixel_values=pv).pooler_output[0].numpy()
            frames = model.vision_model(pixel_values=pv[0]).pooler_output
            return model.visual_projection(frames).mean(0).numpy()
        inputs = transformers.AutoVideoProcessor.from_pretrained(folder)(videos=[clip],
                                                                         return_tensors="pt")
        model = transformers.AutoModelForVideoClassification.from_pretrained(folder).eval() \
            if name != "vjepa2" else transformers.AutoModel.from_pretrained(folder).eval()
        if name == "vjepa2":
            hidden = model.get_vision_features(**inputs)
        elif name == "vjepa2_classifier":
            hidden = model.vjepa2(**inputs, skip_predictor=True).last_hidden_state
            if pooling == "attentive":
                return model.pooler(hidden)[0].numpy()
        else:
            hidden = getattr(model, name)(**inputs).last_hidden_state
        if pooling == "fc_norm":
            return model.fc_norm(hidden.mean(1))[0].numpy()
        if pooling == "cls":
            return hidden[0, 0].numpy()
        tokens = hidden if name.startswith(("vjepa2", "videomae")) else hidden[:, 1:]
        return tokens.mean(1)[0].numpy()


@pytest.mark.parametrize("name", list(ARCHS))
def test_features_equal_the_transformers_pipeline(models, video, name):
    ex, out = _extract(models[name], video)
    auto = ARCHS[name][1]
    assert ex.pooling == auto and ex.stack == FRAMES and ex.step == FRAMES
    assert list(out) == ["hf_video", "fps", "timestamps_ms"]
    feats = out["hf_video"]
    assert feats.shape == (2, 32) and feats.dtype == np.float32   # 9 frames: 2 clips of 4
    # spans: first frame's time to the end of the clip's last frame
    np.testing.assert_allclose(out["timestamps_ms"], [[0, 160], [160, 320]])
    frames = decode_rgb(video)
    want = np.stack([reference(name, models[name], frames[s:s + FRAMES], auto) for s in (0, 4)])
    assert np.abs(feats - want).max() <= 1e-5 * np.abs(want).max()
    assert np.abs(want[0] - want[1]).max() > 1e-3 * np.abs(want).max()   # the clips differ


@pytest.mark.parametrize("name,pooling", [("timesformer", "mean"), ("xclip", "mean"),
                                          ("vjepa2_classifier", "mean"), ("videomae", "mean")])
def test_other_poolings_equal_the_transformers_pipeline(models, video, name, pooling):
    _, out = _extract(models[name], video, pooling=pooling)
    frames = decode_rgb(video)
    want = np.stack([reference(name, models[name], frames[s:s + FRAMES], pooling)
                     for s in (0, 4)])
    assert np.abs(out["hf_video"] - want).max() <= 1e-5 * np.abs(want).max()


def test_a_pooling_the_network_lacks_names_the_ones_it_has(models):
    with pytest.raises(ConfigError, match=r"pooling=attentive: .*pools by mean$"):
        HFVideoExtractor(_cfg(models["vjepa2"], pooling="attentive"), CPU)
    with pytest.raises(ConfigError, match=r"pools by cls \| mean"):
        HFVideoExtractor(_cfg(models["vivit"], pooling="mit"), CPU)


@pytest.mark.parametrize("name,hw", [("vivit", (50, 90)), ("vjepa2", (80, 48)),
                                     ("xclip", (40, 30))])
def test_the_processor_on_the_device_equals_it_on_host_frames(models, make_video, name, hw):
    """Offset rescaling (ViViT), V-JEPA 2's crop-derived resize, an image processor (X-CLIP);
    wide, portrait and upscaled frames."""
    h, w = hw
    frames = decode_rgb(make_video(f"hfv_pp_{name}.mp4", n_frames=3, width=w, height=h))
    proc = transformers.AutoVideoProcessor.from_pretrained(models[name])
    want = proc(videos=[frames], return_tensors="pt")
    want = next(v for k, v in want.items() if k.startswith("pixel_values"))[0]
    ours = OnDevice(proc)(to_device(frames, CPU))
    assert ours.shape == want.shape == (3, 3, 32, 32) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("crops", ["5", "10"])
def test_crops_are_a_batch_dimension_with_the_processor_centre_as_view_4(models, video, crops):
    _, one = _extract(models["timesformer"], video)
    ex, out = _extract(models["timesformer"], video, crops=crops)
    assert out["hf_video"].shape == (2, int(crops), 32)
    np.testing.assert_allclose(out["hf_video"][:, 4], one["hf_video"], rtol=0,
                               atol=1e-5 * np.abs(one["hf_video"]).max())
    assert np.abs(out["hf_video"][:, 0] - out["hf_video"][:, 4]).max() > 1e-4


def test_overlapping_clips_padded_tail_and_too_short(models, make_video, video):
    _, out = _extract(models["vivit"], video, step_size=2, tail="pad")
    # starts 0, 2, 4 hold 4 real frames; the one at 6 holds 3, padded with the last
    assert out["hf_video"].shape == (4, 32)
    np.testing.assert_allclose(out["timestamps_ms"][:, 0], [0, 80, 160, 240])
    np.testing.assert_allclose(out["timestamps_ms"][:, 1], [160, 240, 320, 360])
    frames = decode_rgb(video)
    want = reference("vivit", models["vivit"], frames[[6, 7, 8, 8]], "cls")
    assert np.abs(out["hf_video"][3] - want).max() <= 1e-5 * np.abs(want).max()
    _, ref = _extract(models["vivit"], video, timestamps_form="reference")
    np.testing.assert_allclose(ref["timestamps_ms"], [120, 280])
    short = make_video("hfv3.mp4", n_frames=3, fps=FPS, width=64, height=48)
    with pytest.raises(VideoError, match="too short: fewer than stack_size=4 frames"):
        _extract(models["vivit"], short)


def test_stack_size_other_than_the_model_s_where_its_positions_allow(models, video):
    """V-JEPA 2 uses rotary positions (any clip length); ViViT's positions are fixed."""
    with pytest.raises(ConfigError, match="stack_size=8: .* takes clips of 4 frames"):
        HFVideoExtractor(_cfg(models["vivit"], stack_size=8), CPU)
    _, out = _extract(models["vjepa2"], video, stack_size=8)
    assert out["hf_video"].shape == (1, 32)
    frames = decode_rgb(video)
    want = reference("vjepa2", models["vjepa2"], frames[:8], "mean")
    assert np.abs(out["hf_video"][0] - want).max() <= 1e-5 * np.abs(want).max()


def test_show_pred_uses_the_classifier_on_the_pooled_features(models, video, capsys):
    _extract(models["timesformer"], video, show_pred=True)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if " clip #" in ln]
    assert len(lines) == 2 and all(len(ln.split(": ", 1)[1].split("  ")) == 5 for ln in lines)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["vjepa2", "vivit", "xclip"])
def test_cuda_matches_the_cpu(models, video, name):
    """The processor runs on the GPU's frames (torchvision's CUDA resize may round a rare value
    one level off) and the network there: the CPU's features within fp32 noise."""
    _, cpu = _extract(models[name], video)
    ex = HFVideoExtractor(_cfg(models[name], device="cuda"), torch.device("cuda"))
    gpu = ex.extract(str(video))
    np.testing.assert_allclose(gpu["timestamps_ms"], cpu["timestamps_ms"])
    assert np.abs(gpu["hf_video"] - cpu["hf_video"]).max() <= 1e-2 * np.abs(cpu["hf_video"]).max()


# -- models that ship their own code ----------------------------------------------------------
REMOTE_CONFIG = '''
from transformers import PretrainedConfig


class TinyVidConfig(PretrainedConfig):
    model_type = "tinyvid"

    def __init__(self, hidden_size=8, num_frames=4, image_size=32, **kw):
        self.hidden_size, self.num_frames, self.image_size = hidden_size, num_frames, image_size
        super().__init__(**kw)
'''
REMOTE_MODEL = '''
import torch
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .configuration_tinyvid import TinyVidConfig


class TinyVidModel(PreTrainedModel):
    config_class = TinyVidConfig

    def __init__(self, config):
        super().__init__(config)
        self.proj = torch.nn.Conv3d(3, config.hidden_size, (2, 16, 16), stride=(2, 16, 16))
        self.post_init()

    def forward(self, pixel_values):
        tokens = self.proj(pixel_values.transpose(1, 2)).flatten(2).transpose(1, 2)
        return BaseModelOutputWithPooling(last_hidden_state=tokens, pooler_output=tokens.amax(1))
'''


@pytest.fixture(scope="module")
def remote_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("remote") / "tinyvid"
    folder.mkdir()
    (folder / "configuration_tinyvid.py").write_text(textwrap.dedent(REMOTE_CONFIG))
    (folder / "modeling_tinyvid.py").write_text(textwrap.dedent(REMOTE_MODEL))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "tinyvid", "hidden_size": 8, "num_frames": FRAMES, "image_size": 32,
        "auto_map": {"AutoConfig": "configuration_tinyvid.TinyVidConfig",
                     "AutoModel": "modeling_tinyvid.TinyVidModel"}}))
    transformers.VideoMAEVideoProcessor(**PIXELS).save_pretrained(folder)
    config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=True)
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(config, trust_remote_code=True)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(folder / "model.safetensors"))
    return folder


def test_repo_code_is_refused_without_trust_remote_code(remote_model):
    with pytest.raises(ConfigError, match="ships its network as code .*auto_map.*"
                                          "trust_remote_code=true"):
        HFVideoExtractor(_cfg(remote_model), CPU)


def test_repo_code_runs_with_trust_remote_code(remote_model, video):
    ex, out = _extract(remote_model, video, trust_remote_code=True)
    assert ex.pooling == "pooler" and out["hf_video"].shape == (2, 8)
    model = transformers.AutoModel.from_pretrained(remote_model, trust_remote_code=True).eval()
    proc = transformers.AutoVideoProcessor.from_pretrained(remote_model)
    frames = decode_rgb(video)
    with torch.no_grad():
        want = np.stack([model(**proc(videos=[frames[s:s + FRAMES]], return_tensors="pt"))
                         .pooler_output[0].numpy() for s in (0, 4)])
    assert np.abs(out["hf_video"] - want).max() <= 1e-5 * np.abs(want).max()


# -- errors and the run ---------------------------------------------------------------------
def test_missing_model_offline_names_the_repo_and_the_command(monkeypatch):
    monkeypatch.setenv("VIDEO_FEATURES_OFFLINE", "1")
    cfg = make_config("hf_video", video_paths=["x"], device="cpu")
    assert cfg.model_name == "facebook/vjepa2-vitl-fpc64-256"
    with pytest.raises(WeightsError, match="hf download facebook/vjepa2-vitl-fpc64-256"):
        HFVideoExtractor.weights_for(cfg)


def test_a_folder_without_processor_or_with_other_weights_is_refused(models, video, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        (bare / f).write_bytes((models["vivit"] / f).read_bytes())
    with pytest.raises(ConfigError, match="no video_preprocessor_config.json or "
                                          "preprocessor_config.json"):
        HFVideoExtractor(_cfg(bare), CPU)
    # an explicit weights file of the same architecture: the folder's config, the file's tensors
    _, own = _extract(models["vivit"], video)
    _, explicit = _extract(models["vivit"], video,
                           checkpoint_path=str(models["vivit"] / "model.safetensors"))
    np.testing.assert_array_equal(explicit["hf_video"], own["hf_video"])
    with pytest.raises(WeightsError, match="does not fit"):
        HFVideoExtractor(_cfg(models["vivit"], checkpoint_path=str(
            models["timesformer"] / "model.safetensors")), CPU)


def test_runner_saves_numpy(models, video, tmp_path):
    from video_features.utils.runner import run

    cfg = make_config("hf_video", video_paths=[str(video)], device="cpu", progress=False,
                      model_name=str(models["xclip"]), on_extraction="save_numpy",
                      output_path=str(tmp_path), input_root=str(video.parent))
    summary = run(cfg)
    assert summary.count("done") == 1, summary.text()
    saved = np.load(tmp_path / "hf_video" / "hfv9_hf_video.npy")
    _, direct = _extract(models["xclip"], video)
    np.testing.assert_array_equal(saved, direct["hf_video"])
