"""CLAP audio embeddings: our torch front end against transformers' ClapFeatureExtractor, features
against transformers' own pipeline (ClapFeatureExtractor on each 48 kHz window +
ClapModel.get_audio_features) for an unfused and a fused model, the window/hop/min_window rule,
audio files and videos, weight resolution (hub cache offline, local folder, random weights),
errors, show_pred and one run through the runner.

Models are tiny ClapConfigs (HTSAT 8..64 channels, one block per stage; RoBERTa 16-d, one
layer) with random weights, saved with ``save_pretrained`` into a private Hugging Face hub cache
(``models--org--name/snapshots/<commit>``, as ``hf download`` leaves it) and loaded through the
real code path. The front end stays real size (48 kHz, 10 s, 1024/480, 64 mels).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from tests.test_audio import tone, write_media, write_wav  # noqa: E402
from video_features.models.clap.extractor import CLAPExtractor  # noqa: E402
from video_features.models.clap.frontend import ClapLogMel  # noqa: E402
from video_features.models.clap.weights import SOUND_LABELS  # noqa: E402
from video_features.models.registry import get_extractor_class  # noqa: E402
from video_features.utils.audio import load_audio  # noqa: E402
from video_features.utils.config import make_config  # noqa: E402
from video_features.utils.errors import ConfigError, VideoError, WeightsError  # noqa: E402

CPU = torch.device("cpu")
SR = 48_000
COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPOS = {False: "test-org/clap-tiny-unfused", True: "test-org/clap-tiny-fused"}


# -- tiny models in the hub cache -----------------------------------------------------------------
def tiny_config(fused: bool) -> "transformers.ClapConfig":
    audio = dict(depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 2, 2], patch_embeds_hidden_size=8,
                 hidden_size=64, enable_fusion=fused)
    text = dict(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=1,
                intermediate_size=16, max_position_embeddings=64)
    return transformers.ClapConfig(audio_config=audio, text_config=text, projection_dim=512)


def tiny_tokenizer() -> "transformers.RobertaTokenizer":
    """Byte-level BPE without merges over a-z and the space marker: enough for the prompts."""
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for c in "abcdefghijklmnopqrstuvwxyzĠ":
        vocab[c] = len(vocab)
    vocab["<mask>"] = len(vocab)
    return transformers.RobertaTokenizer(vocab=vocab, merges=[])


def write_model(folder: Path, fused: bool, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = transformers.ClapModel(tiny_config(fused))
    with torch.no_grad():  # off the initialiser's zeros/ones, so every weight and statistic matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.add_(0.1 * torch.randn_like(b))
            elif name.endswith("running_var"):
                b.mul_(torch.exp(0.2 * torch.randn_like(b)))
    model.save_pretrained(folder)
    transformers.ClapFeatureExtractor(frequency_min=50, frequency_max=14000,
                                      truncation="fusion" if fused else "rand_trunc",
                                      padding="repeatpad").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return Path(folder)


def into_hub_cache(cache: Path, repo: str, source: Path, skip: tuple = ()) -> Path:
    """``source``'s files as the hub cache holds a downloaded repo; returns the snapshot."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / COMMIT
    snap.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
        if f.name not in skip:
            (snap / f.name).write_bytes(f.read_bytes())
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(COMMIT)
    return snap


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> dict:
    cache = tmp_path_factory.mktemp("clap-hf-hub")
    made = tmp_path_factory.mktemp("clap-models")
    out = {"cache": cache}
    for fused, repo in REPOS.items():
        folder = write_model(made / repo.split("/")[1], fused, seed=int(fused))
        out[fused] = into_hub_cache(cache, repo, folder)
    out["no_tokenizer"] = into_hub_cache(cache, "test-org/clap-no-tok", made / "clap-tiny-unfused",
                                         skip=("tokenizer.json", "tokenizer_config.json"))
    return out


@pytest.fixture(autouse=True)
def private_hub_cache(hub, monkeypatch):
    """Our own hub cache, offline: nothing of the machine's cache or the network is used."""
    monkeypatch.setenv("HF_HUB_CACHE", str(hub["cache"]))
    monkeypatch.setenv("VIDEO_FEATURES_OFFLINE", "1")
    return hub["cache"]


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("clap-media")
    rng = np.random.default_rng(0)
    n = int(SR * 4.3)
    t = np.arange(n) / SR
    x = 0.3 * np.sin(2 * np.pi * (200 * t + 600 * t ** 2)) + 0.05 * rng.standard_normal(n)
    x[SR:SR + SR // 2] *= 1e-3                                         # a near-silent stretch
    stereo = np.stack([tone(44100, 2.6, 330.0)[0], tone(44100, 2.6, 500.0)[0]])
    return {"wav": write_wav(d / "a.wav", x[None], SR),
            "mp4": write_media(d / "av.mp4", stereo, 44100, "aac", video_frames=20),
            "mute": write_media(d / "mute.mp4", None, 0, video_frames=5),
            "short": write_wav(d / "short.wav", tone(SR, 0.5, 440.0), SR)}


def _cfg(fused: bool = False, **kw):
    base = dict(video_paths=["x"], device="cpu", model_name=REPOS[fused], batch_size=2)
    base.update(kw)
    return make_config("clap", **base)


def _extract(path, fused: bool = False, **kw):
    ex = CLAPExtractor(_cfg(fused, **kw), CPU)
    return ex, ex.extract(str(path))


def expected_windows(n: int, window: int, hop: int, minimum: int) -> list[tuple[int, int]]:
    """(start, length) in samples: complete windows every hop, then one shorter window with
    the rest when it holds at least ``minimum`` samples."""
    out, s = [], 0
    while s + window <= n:
        out.append((s, window))
        s += hop
    if n - s >= minimum:
        out.append((s, n - s))
    return out


def upstream(folder: Path, windows: list[np.ndarray], longer: bool | None = False) -> np.ndarray:
    """transformers' own pipeline, one window at a time: ClapFeatureExtractor (NumPy) then
    ClapModel.get_audio_features; ``longer`` None keeps the extractor's is_longer."""
    fe = transformers.ClapFeatureExtractor.from_pretrained(folder)
    model = transformers.ClapModel.from_pretrained(folder).eval()
    rows = []
    for w in windows:
        inp = fe(w.astype(np.float64), sampling_rate=SR, return_tensors="pt")
        is_longer = inp["is_longer"] if longer is None else torch.full((1, 1), longer)
        with torch.no_grad():
            rows.append(model.get_audio_features(input_features=inp["input_features"],
                                                 is_longer=is_longer).pooler_output[0].numpy())
    return np.stack(rows)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


# -- front end ------------------------------------------------------------------------------------
@pytest.mark.parametrize("truncation", ["rand_trunc", "fusion"])
def test_front_end_matches_the_feature_extractor(truncation):
    fe = transformers.ClapFeatureExtractor(frequency_min=50, frequency_max=14000,
                                           truncation=truncation)
    ours = ClapLogMel.from_feature_extractor(fe)
    rng = np.random.default_rng(1)
    for n in (SR * 10, SR * 3 + 17, 50_000, 700):     # exactly 10 s, shorter: repeat-padded
        x = (0.3 * rng.standard_normal(n)).astype(np.float32)
        x[: n // 4] *= 1e-6                             # quiet: the 1e-10 floor matters
        want = fe(x.astype(np.float64), sampling_rate=SR, return_tensors="pt")["input_features"]
        got = ours(torch.from_numpy(x)[None])
        assert got.shape == want.shape == (1, 4 if truncation == "fusion" else 1, 1001, 64)
        assert got.dtype == torch.float32
        assert (got - want).abs().max().item() <= 1e-4   # dB; measured <= 8e-6 (float32 rounding)


# -- parity with transformers ---------------------------------------------------------------------
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_features_match_the_transformers_pipeline(hub, media, fused):
    """window 2 s, hop 1.5 s on 4.3 s: windows at 0 and 1.5 s, then 1.3 s from 3.0 s (padded)."""
    ex, out = _extract(media["wav"], fused, window_s=2.0, hop_s=1.5)
    audio = load_audio(str(media["wav"]), SR)
    wins = expected_windows(len(audio), 2 * SR, int(1.5 * SR), SR)
    assert [s for s, _ in wins] == [0, int(1.5 * SR), 3 * SR]
    want = upstream(hub[fused], [audio[s:s + n] for s, n in wins])
    assert list(out) == ["clap", "timestamps_ms"]
    assert out["clap"].shape == (3, 512) and out["clap"].dtype == np.float32
    err = rel(out["clap"], want)
    print(f"clap {'fused' if fused else 'unfused'}: max relative error vs transformers {err:.2e}")
    assert err <= 1e-4
    np.testing.assert_allclose(np.linalg.norm(out["clap"], axis=1), 1.0, atol=1e-5)
    assert np.abs(want[0] - want[1]).max() > 1e-3                 # rows differ: the check has teeth
    np.testing.assert_allclose(out["timestamps_ms"], [[0, 2000], [1500, 3500], [3000, 4300]])
    assert ex.frames_read == 3
    if fused:
        # fused_longer: the fusion branch, as the extractor marks a clip processed alone
        _, longer = _extract(media["wav"], True, window_s=2.0, hop_s=1.5, fused_longer=True)
        want_l = upstream(hub[True], [audio[s:s + n] for s, n in wins], longer=None)
        print(f"clap fused, fused_longer=true: max relative error {rel(longer['clap'], want_l):.2e}")
        assert rel(longer["clap"], want_l) <= 1e-4
        assert np.abs(want_l - want).max() > 1e-3


def test_batch_size_changes_nothing(media):
    _, a = _extract(media["wav"], window_s=1.0, batch_size=1)
    _, b = _extract(media["wav"], window_s=1.0, batch_size=3)
    assert rel(a["clap"], b["clap"]) < 1e-5


@pytest.mark.parametrize("window,hop,minimum", [
    (10.0, None, None),     # the default: one 4.3 s window, padded
    (1.0, None, None),      # 4 back to back, 0.3 s left over: dropped (min 1 s)
    (1.0, None, 0.25),      # ... kept with min_window_s 0.25
    (2.0, 0.5, 1.0),        # overlapping
    (1.0, 1.6, 0.3),        # gaps between windows
])
def test_window_hop_and_minimum_give_the_rows(media, window, hop, minimum):
    _, out = _extract(media["wav"], window_s=window, hop_s=hop, min_window_s=minimum)
    n = len(load_audio(str(media["wav"]), SR))
    m = min(1.0, window) if minimum is None else minimum
    wins = expected_windows(n, round(window * SR), round((hop or window) * SR), round(m * SR))
    assert len(out["clap"]) == len(wins)
    np.testing.assert_allclose(out["timestamps_ms"], [[s / SR * 1000, (s + k) / SR * 1000]
                                                      for s, k in wins])


# -- inputs and errors ----------------------------------------------------------------------------
def test_video_with_audio_track_and_without(media):
    """An mp4 with a 44.1 kHz stereo AAC track: resampled to 48 kHz mono and windowed."""
    ex, out = _extract(media["mp4"], window_s=1.0)
    n = len(load_audio(str(media["mp4"]), SR))
    assert out["clap"].shape == (len(expected_windows(n, SR, SR, SR)), 512) == (2, 512)
    with pytest.raises(VideoError) as ei:
        ex.extract(str(media["mute"]))
    assert str(ei.value) == "no audio track"


def test_too_short_audio_is_one_line(media):
    with pytest.raises(VideoError) as ei:
        _extract(media["short"])
    msg = str(ei.value)
    assert msg.startswith("too short: 0.500 s of audio") and "min_window_s=1" in msg
    assert "\n" not in msg
    _, out = _extract(media["short"], min_window_s=0.4)      # allowed when asked for
    assert out["clap"].shape == (1, 512)


@pytest.mark.parametrize("options,match", [
    (dict(window_s=12.0), "window_s=12: laion/clap-htsat-unfused takes at most 10"),
    (dict(window_s=0.0), "window_s"),
    (dict(hop_s=-1.0), "hop_s"),
    (dict(window_s=2.0, min_window_s=5.0), "min_window_s=5 is longer than window_s=2"),
    (dict(pred_texts=[""]), "pred_texts"),
    (dict(fused_longer=True), "fused_longer"),
    (dict(model_name=""), "model_name"),
    (dict(batch_size=0), "batch_size"),
])
def test_invalid_options_name_the_option(options, match):
    with pytest.raises(ConfigError, match=match):
        make_config("clap", video_paths=["a.wav"], device="cpu", **options)


def test_folder_checks_at_load(hub, tmp_path):
    with pytest.raises(ConfigError, match="window_s=12"):     # a folder's limit, from its extractor
        CLAPExtractor(_cfg(model_name=str(hub[False]), window_s=12.0), CPU)
    with pytest.raises(ConfigError, match="fused_longer"):
        CLAPExtractor(_cfg(model_name=str(hub[False]), fused_longer=True), CPU)
    bad = tmp_path / "mismatch"
    bad.mkdir()
    (bad / "config.json").write_bytes((hub[False] / "config.json").read_bytes())
    (bad / "model.safetensors").write_bytes((hub[False] / "model.safetensors").read_bytes())
    transformers.ClapFeatureExtractor(truncation="fusion").save_pretrained(bad)
    with pytest.raises(ConfigError, match="truncation='fusion'"):
        CLAPExtractor(_cfg(model_name=str(bad)), CPU)


# -- weights --------------------------------------------------------------------------------------
def test_hub_cache_local_folder_and_card(hub, media):
    _, a = _extract(media["wav"], window_s=2.0)
    _, b = _extract(media["wav"], window_s=2.0, model_name=str(hub[False]))   # the same folder
    np.testing.assert_array_equal(a["clap"], b["clap"])
    card, path = CLAPExtractor.weights_for(_cfg())["clap"]
    assert card.name == f"clap:{REPOS[False]}" and card.url == f"https://huggingface.co/{REPOS[False]}"
    assert Path(path) == hub[False] / "model.safetensors"
    # checkpoint_path (a weights file) wins over allow_random_weights
    _, c = _extract(media["wav"], window_s=2.0, allow_random_weights=True,
                    checkpoint_path=str(hub[False] / "model.safetensors"))
    np.testing.assert_array_equal(c["clap"], a["clap"])
    _, r = _extract(media["wav"], window_s=2.0, allow_random_weights=True)
    assert np.abs(r["clap"] - a["clap"]).max() > 1e-3


def test_missing_weights_offline_name_the_download(monkeypatch):
    repo = "laion/clap-htsat-unfused"
    for env in ({"VIDEO_FEATURES_OFFLINE": "1"}, {"VIDEO_FEATURES_OFFLINE": "0", "HF_HUB_OFFLINE": "1"}):
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        with pytest.raises(WeightsError) as ei:
            CLAPExtractor.weights_for(_cfg(model_name=repo))
        msg = str(ei.value)
        assert "\n" not in msg and f"hf download {repo}`" in msg and "model_name=LOCAL_FOLDER" in msg
    with pytest.raises(WeightsError, match=f"hf download {repo}"):
        CLAPExtractor(_cfg(model_name=repo), CPU)


def test_no_network_names_the_download(monkeypatch):
    """Downloads allowed but the hub unreachable: the same one-line advice, with the reason."""
    import huggingface_hub

    def unreachable(*a, **k):
        raise OSError("Network is unreachable")

    monkeypatch.setenv("VIDEO_FEATURES_OFFLINE", "0")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", unreachable)
    with pytest.raises(WeightsError) as ei:
        CLAPExtractor.weights_for(_cfg(model_name="laion/clap-htsat-fused"))
    msg = str(ei.value)
    assert "\n" not in msg and "Network is unreachable" in msg
    assert "hf download laion/clap-htsat-fused" in msg


def test_missing_transformers_names_the_package(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)   # import transformers -> ImportError
    with pytest.raises(ConfigError, match="pip install transformers"):
        CLAPExtractor(_cfg(), CPU)


def test_random_weights_build_the_real_unfused_architecture(media):
    """allow_random_weights on the default model: the built-in config (HTSAT-tiny, 512-d), no
    download; the one real-size network of this file."""
    cfg = make_config("clap", video_paths=["x"], device="cpu", allow_random_weights=True)
    assert cfg.model_name == "laion/clap-htsat-unfused"
    card, path = CLAPExtractor.weights_for(cfg)["clap"]
    assert path is None and card.name == "clap:laion/clap-htsat-unfused"
    ex = CLAPExtractor(cfg, CPU)
    a = ex.audio.config
    assert (a.patch_embeds_hidden_size, tuple(a.depths), tuple(a.num_attention_heads),
            a.hidden_size, a.projection_dim, a.enable_fusion, a.spec_size) == \
        (96, (2, 2, 6, 2), (4, 8, 16, 32), 768, 512, False, 256)
    assert ex.frontend.fusion is False and ex.window == 10 * SR
    out = ex.extract(str(media["mp4"]))       # 2.6 s: one window, repeat-padded to 10 s
    assert out["clap"].shape == (1, 512)
    np.testing.assert_allclose(np.linalg.norm(out["clap"], axis=1), 1.0, atol=1e-5)


# -- show_pred ------------------------------------------------------------------------------------
def test_show_pred_ranks_the_sound_classes(hub, media, capsys):
    ex, _ = _extract(media["wav"], window_s=2.0, show_pred=True)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if " window #" in ln]
    assert [ln.split(" window #")[1].split(":")[0] for ln in lines] == ["0", "1"]
    names = {s for s in SOUND_LABELS.read_text().splitlines() if s}
    assert len(names) >= 40
    for ln in lines:
        preds = ln.split(" window #", 1)[1].split(": ", 1)[1].split("  ")
        assert len(preds) == 5 and all(p.rsplit(": ", 1)[0] in names for p in preds)
    # the text side equals transformers' get_text_features and logits_per_audio's scale
    model = transformers.ClapModel.from_pretrained(hub[False]).eval()
    tok = transformers.AutoTokenizer.from_pretrained(hub[False])
    enc = tok([f"the sound of {s}" for s in ex.labels], padding=True, return_tensors="pt")
    with torch.no_grad():
        want = model.get_text_features(**enc).pooler_output.double()
    assert (ex.text_feats - want).abs().max().item() < 1e-5
    assert ex.logit_scale == pytest.approx(float(model.logit_scale_a.detach().exp()))


def test_show_pred_with_own_texts_and_without_a_tokenizer(media, capsys):
    _extract(media["wav"], show_pred=True, pred_texts=["rain", "a dog"])
    out = capsys.readouterr().out
    assert "window #0: " in out and "rain: " in out and "a dog: " in out
    with pytest.raises(WeightsError, match="tokenizer"):
        CLAPExtractor(_cfg(model_name="test-org/clap-no-tok", show_pred=True), CPU)
    _extract(media["wav"], model_name="test-org/clap-no-tok")   # features need no tokenizer


# -- config and runner ----------------------------------------------------------------------------
def test_defaults_and_registry():
    cfg = make_config("clap", video_paths=["a.wav"], device="cpu")
    assert get_extractor_class("clap") is CLAPExtractor
    assert (cfg.model_name, cfg.window_s, cfg.hop_s, cfg.min_window_s, cfg.fused_longer) == \
        ("laion/clap-htsat-unfused", 10.0, 10.0, 1.0, False)
    assert cfg.batch_size == 4
    assert make_config("clap", video_paths=["a.wav"], device="cpu", window_s=0.5).min_window_s == 0.5
    assert CLAPExtractor.output_keys_for(cfg) == ("clap", "timestamps_ms")
    assert CLAPExtractor.output_keys_for(cfg.replace(timestamps_form="reference")) == ("clap",)


def test_runner_saves_numpy(media, tmp_path):
    from video_features.utils.runner import run

    out = tmp_path / "out"
    cfg = _cfg(video_paths=[str(media["wav"]), str(media["mute"])], on_extraction="save_numpy",
               output_path=str(out), window_s=2.0, decoders=1, progress=False)
    summary = run(cfg)
    by_path = {r.path: r for r in summary.results}
    assert by_path[str(media["wav"])].status == "done"
    assert by_path[str(media["mute"])].status == "failed"
    assert by_path[str(media["mute"])].reason == "no audio track"
    files = {p.name: p for p in (out / "clap").rglob("*.npy")}
    assert set(files) == {"a_clap.npy", "a_timestamps_ms.npy"}
    _, direct = _extract(media["wav"], window_s=2.0)
    np.testing.assert_allclose(np.load(files["a_clap.npy"]), direct["clap"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.load(files["a_timestamps_ms.npy"]), direct["timestamps_ms"])
    meta = json.dumps(json.loads(next((out / "clap").rglob("a_meta.json")).read_text()))
    assert "clap:test-org/clap-tiny-unfused" in meta and "model.safetensors" in meta


@pytest.mark.gpu
def test_cuda_matches_the_cpu(media):
    _, cpu = _extract(media["wav"], window_s=2.0)
    ex = CLAPExtractor(_cfg(window_s=2.0, device="cuda", tf32=False), torch.device("cuda"))
    gpu = ex.extract(str(media["wav"]))
    assert rel(gpu["clap"], cpu["clap"]) < 1e-4
