"""CLAP audio embeddings: against transformers' own ClapFeatureExtractor + get_audio_features on
the same 48 kHz windows (unfused and fused models), the window/hop rule, wav and video inputs,
the hub cache offline, errors and a run through the runner. Models are tiny ClapConfigs with
random weights saved in transformers' layout and loaded through the real code path."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from video_features.models.clap.extractor import CLAPExtractor  # noqa: E402
from tests.test_audio import tone, write_media, write_wav  # noqa: E402
from video_features.utils.audio import load_audio  # noqa: E402
from video_features.utils.config import make_config  # noqa: E402
from video_features.utils.errors import ConfigError, VideoError, WeightsError  # noqa: E402

CPU = torch.device("cpu")
SR = 48_000


@pytest.fixture(autouse=True)
def private_hub_cache(tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.getbasetemp() / "hf-hub-cache-clap"
    cache.mkdir(exist_ok=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def tiny_model(fused: bool, seed: int = 0):
    a = transformers.ClapAudioConfig(depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 1, 1],
                                     patch_embeds_hidden_size=8, hidden_size=64,
                                     projection_hidden_size=32, enable_fusion=fused)
    t = transformers.ClapTextConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1,
                                    num_attention_heads=1, intermediate_size=16,
                                    projection_hidden_size=32, max_position_embeddings=40)
    torch.manual_seed(seed)
    cfg = transformers.ClapConfig(text_config=t.to_dict(), audio_config=a.to_dict(), projection_dim=16)
    return transformers.ClapModel(cfg).eval()


@pytest.fixture(scope="module", params=[False, True], ids=["unfused", "fused"])
def model_dir(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("clap-fused" if request.param else "clap-unfused")
    tiny_model(request.param).save_pretrained(folder)
    transformers.ClapFeatureExtractor(truncation="fusion" if request.param else "rand_trunc") \
        .save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def wav(tmp_path_factory):
    rng = np.random.default_rng(0)
    x = tone(SR, 4.3, 440.0)[0] * 0.3 + rng.normal(0, 0.05, int(SR * 4.3)).astype(np.float32)
    return write_wav(tmp_path_factory.mktemp("clapwav") / "a.wav", x[None], SR)


def _cfg(folder, **kw):
    base = dict(video_paths=["x"], device="cpu", model_name=str(folder), batch_size=2)
    base.update(kw)
    return make_config("clap", **base)


def upstream(folder: Path, windows: list[np.ndarray]) -> np.ndarray:
    """transformers' own pipeline on each window; every window marked not longer (what the
    extractor does; the processor would mark one random window of a fused batch longer)."""
    fe = transformers.ClapFeatureExtractor.from_pretrained(str(folder))
    model = transformers.ClapModel.from_pretrained(str(folder)).eval()
    rows = []
    for w in windows:
        inp = fe(w.astype(np.float64), sampling_rate=SR, return_tensors="pt")
        with torch.no_grad():
            out = model.get_audio_features(input_features=inp["input_features"].float(),
                                           is_longer=torch.zeros((1, 1), dtype=torch.bool))
        rows.append(out.pooler_output[0].numpy())
    return np.stack(rows)


@pytest.mark.parametrize("window,hop", [(2.0, None), (1.5, 1.0)])
def test_embeddings_match_transformers_pipeline(model_dir, wav, window, hop):
    audio = load_audio(str(wav), SR)
    out = CLAPExtractor(_cfg(model_dir, window_s=window, hop_s=hop), CPU).extract(str(wav))
    w, h = int(window * SR), int((hop or window) * SR)
    starts = list(range(0, len(audio) - w + 1, h))
    windows = [audio[s:s + w] for s in starts]
    tail = starts[-1] + h
    if len(audio) - tail >= SR and len(audio) > starts[-1] + w:  # min_window_s 1 s
        windows.append(audio[tail:])
        starts.append(tail)
    expect = upstream(model_dir, windows)
    assert out["clap"].shape == expect.shape and out["clap"].dtype == np.float32
    assert np.abs(out["clap"] - expect).max() <= 1e-4 * np.abs(expect).max()
    np.testing.assert_allclose(np.linalg.norm(out["clap"], axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(out["timestamps_ms"][:, 0], np.array(starts) / SR * 1000)
    ends = [s + len(x) for s, x in zip(starts, windows)]
    np.testing.assert_allclose(out["timestamps_ms"][:, 1], np.array(ends) / SR * 1000)


def test_window_rule_counts(model_dir, wav):
    audio_s = len(load_audio(str(wav), SR)) / SR  # 4.3 s
    cases = {(1.0, None, 1.0): 4, (1.0, None, 0.2): 5, (2.0, 0.5, 1.0): 6, (10.0, None, 1.0): 1,
             (1.0, 2.0, 0.5): 2, (1.0, 2.0, 0.2): 3}
    for (window, hop, min_w), n in cases.items():
        out = CLAPExtractor(_cfg(model_dir, window_s=window, hop_s=hop, min_window_s=min_w),
                            CPU).extract(str(wav))
        assert len(out["clap"]) == n, (window, hop, min_w, audio_s)


def test_a_video_with_audio_and_one_without(model_dir, tmp_path):
    x = tone(44100, 2.5, 330.0)
    video = write_media(tmp_path / "v.mp4", x, 44100, video_frames=3)
    out = CLAPExtractor(_cfg(model_dir, window_s=1.0), CPU).extract(str(video))
    assert out["clap"].shape[0] == 2
    silent = write_media(tmp_path / "s.mp4", None, 44100, video_frames=3)
    with pytest.raises(VideoError, match="audio"):
        CLAPExtractor(_cfg(model_dir), CPU).extract(str(silent))
    short = write_wav(tmp_path / "short.wav", tone(SR, 0.5, 440.0), SR)
    with pytest.raises(VideoError, match="too short"):
        CLAPExtractor(_cfg(model_dir), CPU).extract(str(short))


def test_hub_cache_offline_and_missing(model_dir, private_hub_cache, monkeypatch, wav):
    repo = "someone/clap-tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = private_hub_cache / f"models--someone--clap-tiny-{model_dir.name}"
    repo = f"someone/clap-tiny-{model_dir.name}"
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    a = CLAPExtractor(_cfg(repo, window_s=2.0), CPU).extract(str(wav))
    b = CLAPExtractor(_cfg(model_dir, window_s=2.0), CPU).extract(str(wav))
    np.testing.assert_array_equal(a["clap"], b["clap"])
    card, path = CLAPExtractor.weights_for(_cfg(repo))["clap"]
    assert card.url == f"https://huggingface.co/{repo}" and Path(path) == snap / "model.safetensors"
    with pytest.raises(WeightsError) as ei:
        CLAPExtractor(_cfg("laion/clap-htsat-unfused"), CPU)
    assert "hf download laion/clap-htsat-unfused" in str(ei.value) and "\n" not in str(ei.value)
    # random weights only on request; transformers' default CLAP, 512-d
    ex = CLAPExtractor(_cfg("laion/clap-htsat-unfused", allow_random_weights=True), CPU)
    assert ex.model.config.projection_dim == 512


@pytest.mark.parametrize("kw,match", [(dict(window_s=12.0), "window_s"), (dict(window_s=0.0), "window_s"),
                                      (dict(hop_s=-1.0), "hop_s"), (dict(min_window_s=20.0), "min_window_s")])
def test_invalid_options_name_the_option(model_dir, kw, match):
    with pytest.raises(ConfigError, match=match):
        CLAPExtractor(_cfg(model_dir, **kw), CPU)


def test_show_pred_without_a_tokenizer_is_a_clear_error(model_dir):
    with pytest.raises(ConfigError, match="tokenizer"):
        CLAPExtractor(_cfg(model_dir, show_pred=True), CPU)


def test_runner_saves_numpy(model_dir, wav, tmp_path):
    from video_features.utils.runner import run

    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF nothing")
    cfg = _cfg(model_dir, video_paths=[str(wav), str(bad)], on_extraction="save_numpy",
               output_path=str(tmp_path / "out"), window_s=2.0, progress=False)
    summary = run(cfg)
    assert summary.count("done") == 1 and summary.count("failed") == 1
    saved = {p.name for p in (tmp_path / "out" / "clap").rglob("*.npy")}
    assert saved == {"a_clap.npy", "a_timestamps_ms.npy"}
    direct = CLAPExtractor(_cfg(model_dir, window_s=2.0), CPU).extract(str(wav))
    got = np.load(next((tmp_path / "out" / "clap").rglob("a_clap.npy")))
    np.testing.assert_allclose(got, direct["clap"], rtol=1e-5, atol=1e-6)
