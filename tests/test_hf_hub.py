"""utils.hf_hub: the resolution order (explicit path, local folder, hub cache, download, one-line
error), the cache / offline environment and what a download asks the hub for. Repos are written
in the hub cache's own layout (``models--org--name/refs/main`` -> ``snapshots/<commit>/``); the
network is never used (downloads are replaced where a test needs one)."""
from __future__ import annotations

from pathlib import Path

import pytest

from video_features.utils import hf_hub
from video_features.utils.errors import WeightsError
from video_features.utils.hf_hub import CACHE_LACKS, ExtraFiles, Source, resolve

COMMIT = "0123456789abcdef0123456789abcdef01234567"
TOKENIZER = ExtraFiles(("tokenizer.json", "tokenizer_config.json"), "tokenizer_config.json",
                       "the tokenizer files")


class Cfg(dict):
    """The part of a Config that resolution reads: ``model_name`` and ``get``."""

    def __init__(self, model_name, **kw):
        super().__init__(kw)
        self.model_name = model_name


def model_folder(folder: Path, weights: str | None = "model.safetensors",
                 extra: tuple[str, ...] = ()) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("config.json",) + ((weights,) if weights else ()) + extra:
        (folder / name).write_text("{}")
    return folder


def cached_repo(cache: Path, repo: str, **kw) -> Path:
    root = cache / ("models--" + repo.replace("/", "--"))
    snap = model_folder(root / "snapshots" / COMMIT, **kw)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(COMMIT)
    return snap


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    c = tmp_path / "hf-cache"
    c.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(c))
    monkeypatch.setenv("VIDEO_FEATURES_OFFLINE", "1")
    return c


def test_offline_and_cache_follow_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for value, expected in (("1", True), ("TRUE", True), ("on", True), ("0", False), ("", False)):
        monkeypatch.setenv("VIDEO_FEATURES_OFFLINE", value)
        assert hf_hub.offline() is expected
    monkeypatch.setenv("HF_HUB_OFFLINE", "yes")
    assert hf_hub.offline()
    assert hf_hub.hub_cache_dir() == str(tmp_path / "hf-cache")
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hf_hub.hub_cache_dir() == str(tmp_path / "home" / "hub")


def test_weights_file_preference(tmp_path):
    folder = model_folder(tmp_path / "m", weights="pytorch_model.bin")
    assert hf_hub.weights_in(folder) == folder / "pytorch_model.bin"
    (folder / "model.safetensors").write_text("{}")
    assert hf_hub.weights_in(folder) == folder / "model.safetensors"
    assert hf_hub.weights_in(model_folder(tmp_path / "none", weights=None)) is None


def test_explicit_path_wins(tmp_path):
    ckpt = model_folder(tmp_path / "ckpt")
    other = model_folder(tmp_path / "other")
    src = resolve(Cfg(str(other), checkpoint_path=str(ckpt)), random_weights=True, label="x")
    assert src == Source(str(ckpt.resolve()), None, ckpt.resolve(), ckpt / "model.safetensors")
    # a weights file takes its config from model_name (a local folder here)
    src = resolve(Cfg(str(other), checkpoint_path=str(ckpt / "model.safetensors")), False,
                  label="x")
    assert (src.folder, src.weights) == (other.resolve(), (ckpt / "model.safetensors").resolve())
    # ... or from nowhere for a built-in config
    src = resolve(Cfg("org/built", revision="v1", checkpoint_path=str(ckpt / "model.safetensors")),
                  False, label="x", built_in=("org/built",))
    assert (src.model_id, src.revision, src.folder) == ("org/built", "v1", None)
    with pytest.raises(WeightsError, match=r"^checkpoint_path '/no/such' for x does not exist$"):
        resolve(Cfg("org/m", checkpoint_path="/no/such"), False, label="x")
    with pytest.raises(WeightsError, match="holds no model.safetensors or pytorch_model.bin"):
        resolve(Cfg("org/m", checkpoint_path=str(model_folder(tmp_path / "e", weights=None))),
                False, label="x")


def test_local_folder(tmp_path):
    folder = model_folder(tmp_path / "m")
    src = resolve(Cfg(str(folder), revision="ignored"), False, label="x")
    assert src == Source(str(folder.resolve()), None, folder.resolve(),
                         folder.resolve() / "model.safetensors")
    assert resolve(Cfg(str(folder)), True, label="x").weights is None
    bare = model_folder(tmp_path / "bare", weights=None)
    assert resolve(Cfg(str(bare)), True, label="x").folder == bare.resolve()
    with pytest.raises(WeightsError, match="holds no model.safetensors"):
        resolve(Cfg(str(bare)), False, label="x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="is a folder without config.json"):
        resolve(Cfg(str(tmp_path / "empty")), True, label="x")


def test_built_in_random_weights_need_no_hub():
    src = resolve(Cfg("org/built", revision="r"), True, label="x", built_in={"org/built"})
    assert src == Source("org/built", "r", None, None)


def test_hub_cache_snapshot_offline(cache):
    snap = cached_repo(cache, "org/cached")
    src = resolve(Cfg("org/cached"), False, label="x")
    assert src == Source("org/cached", None, snap, snap / "model.safetensors")
    assert resolve(Cfg("org/cached"), True, label="x").weights is None


def test_offline_errors_name_the_download(cache):
    hint = ("fetch it where there is network with `hf download org/absent --revision r1` "
            f"(hub cache: {cache}), or pass model_name=LOCAL_FOLDER")
    with pytest.raises(WeightsError) as ei:
        resolve(Cfg("org/absent", revision="r1"), False, label="x")
    assert str(ei.value) == ("x: weights of org/absent are not in the Hugging Face cache and "
                             "downloads are disabled (VIDEO_FEATURES_OFFLINE / HF_HUB_OFFLINE); "
                             + hint)
    with pytest.raises(WeightsError) as ei:
        resolve(Cfg("org/absent", revision="r1"), False, label="y", offline_text=CACHE_LACKS)
    assert str(ei.value) == ("y: the Hugging Face cache lacks the repo of org/absent and "
                             "downloads are disabled (VIDEO_FEATURES_OFFLINE / HF_HUB_OFFLINE); "
                             + hint)
    cached_repo(cache, "org/no-tok")
    assert resolve(Cfg("org/no-tok"), False, label="y").folder is not None
    with pytest.raises(WeightsError, match="^y: the Hugging Face cache lacks the tokenizer files "
                                           "of org/no-tok and downloads are disabled"):
        resolve(Cfg("org/no-tok"), False, label="y", extra=TOKENIZER, offline_text=CACHE_LACKS)
    cached_repo(cache, "org/no-weights", weights=None)
    with pytest.raises(WeightsError, match=r"lacks the weights \(model.safetensors\) of "
                                           "org/no-weights"):
        resolve(Cfg("org/no-weights"), False, label="y", offline_text=CACHE_LACKS)


def test_download_asks_for_what_is_needed(cache, monkeypatch):
    import huggingface_hub

    files = ["config.json", "preprocessor_config.json", "README.md", "tokenizer.json",
             "model.safetensors.index.json", "model-00001-of-00002.safetensors",
             "model-00002-of-00002.safetensors"]
    asked = []

    def snapshot_download(repo, revision=None, cache_dir=None, local_files_only=False,
                          allow_patterns=None):
        if local_files_only:
            raise FileNotFoundError(repo)
        asked.append(allow_patterns)
        return str(model_folder(Path(cache_dir) / "fake", weights=None))

    monkeypatch.setenv("VIDEO_FEATURES_OFFLINE", "0")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, *a, **k: files)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    hf_hub.hub_folder("org/sharded", None, label="x", extra=TOKENIZER)
    hf_hub.hub_folder("org/sharded", None, label="x", need_weights=False)
    assert asked == [["config.json", "preprocessor_config.json", "tokenizer.json",
                      "model.safetensors.index.json", "model-*"],
                     ["config.json", "preprocessor_config.json"]]
    files[:] = ["config.json", "flax_model.msgpack"]
    with pytest.raises(WeightsError, match=r"^x: org/flax has no config.json with "
                                           r"model.safetensors or pytorch_model.bin \(not "
                                           "transformers' layout\\)$"):
        hf_hub.hub_folder("org/flax", None, label="x")


def test_unreachable_hub_gives_the_reason_and_the_command(cache, monkeypatch):
    import huggingface_hub

    def unreachable(*a, **k):
        raise OSError("Network is unreachable\nmore detail")

    monkeypatch.setenv("VIDEO_FEATURES_OFFLINE", "0")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", unreachable)
    with pytest.raises(WeightsError) as ei:
        hf_hub.hub_folder("org/far", None, label="x")
    assert str(ei.value) == ("x: cannot download org/far from the Hugging Face hub (OSError: "
                             "Network is unreachable); fetch it where there is network with "
                             f"`hf download org/far` (hub cache: {cache}), or pass "
                             "model_name=LOCAL_FOLDER")
