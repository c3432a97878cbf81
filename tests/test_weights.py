"""Checkpoint resolution: explicit path, cache, verified download, clear errors."""
from __future__ import annotations

import dataclasses

import pytest

from video_features.utils import weights as uw
from video_features.utils.errors import WeightsError


def _card(tmp_path, data: bytes, **kw) -> uw.WeightCard:
    src = tmp_path / "served.bin"
    src.write_bytes(data)
    base = dict(name="test-card", url=src.as_uri(), sha256=uw.sha256_of(src),
                filename="test-card.bin", layout="bytes")
    base.update(kw)
    return uw.WeightCard(**base)


def test_download_checks_sha256_and_prefix(tmp_path, monkeypatch):
    monkeypatch.delenv("VIDEO_FEATURES_OFFLINE")
    card = _card(tmp_path, b"weights" * 100)
    got = uw.resolve_checkpoint(card)
    assert got == uw.cache_dir() / "test-card.bin" and got.read_bytes() == b"weights" * 100
    got.unlink()
    prefix = dataclasses.replace(card, sha256=card.sha256[:8])
    assert uw.resolve_checkpoint(prefix).exists()
    uw.resolve_checkpoint(prefix).unlink()
    wrong = dataclasses.replace(card, sha256="0" * 64)
    with pytest.raises(WeightsError, match="refusing to use it"):
        uw.resolve_checkpoint(wrong)
    assert not (uw.cache_dir() / "test-card.bin").exists()
    assert not list(uw.cache_dir().glob("test-card.bin.*"))  # no partial download left


def test_order_explicit_then_cache_then_error(tmp_path):
    card = _card(tmp_path, b"x", url="https://example.invalid/w.bin", filename="order.bin")
    explicit = tmp_path / "mine.bin"
    explicit.write_bytes(b"mine")
    assert uw.resolve_checkpoint(card, str(explicit)) == explicit
    with pytest.raises(WeightsError, match="does not exist"):
        uw.resolve_checkpoint(card, str(tmp_path / "nope.bin"))
    with pytest.raises(WeightsError) as ei:  # offline in tests: no cache, no download
        uw.resolve_checkpoint(card)
    assert "https://example.invalid/w.bin" in str(ei.value) and str(uw.cache_dir() / "order.bin") in str(ei.value)
    cached = uw.cache_dir() / "order.bin"
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(b"cached")
    try:
        assert uw.resolve_checkpoint(card) == cached
    finally:
        cached.unlink()


def test_unreadable_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_text("not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read checkpoint"):
        uw.load_state_dict(bad)


@pytest.mark.parametrize("family", ["resnet", "r21d", "i3d", "pwc"])
def test_an_explicit_checkpoint_wins_over_allow_random_weights(tmp_path, family):
    """One rule for every family: allow_random_weights never replaces a checkpoint the user named."""
    import torch

    from video_features.utils.config import Config

    if family == "resnet":
        from video_features.models.resnet.weights import load_resnet, write_random_checkpoint

        path = write_random_checkpoint(tmp_path / "r18.pth", "resnet18", seed=5)
        cfg = Config({"allow_random_weights": True, "checkpoint_path": str(path)})
        state = load_resnet("resnet18", cfg, torch.device("cpu")).resnet.state_dict()
    elif family == "r21d":
        from video_features.models.r21d.weights import load_r21d, write_random_checkpoint

        path = write_random_checkpoint(tmp_path / "r21d.pth", seed=5)
        cfg = Config({"allow_random_weights": True, "checkpoint_path": str(path)})
        state = load_r21d(cfg, torch.device("cpu")).net.state_dict()
    elif family == "i3d":
        from video_features.models.i3d import weights as iw

        path = tmp_path / "i3d_rgb.pt"
        torch.save(iw.random_official_state_dict("video_features", "rgb", 400, seed=5), path)
        explicit = iw.load_i3d("rgb", "i3d_rgb", str(path), allow_random=True).state_dict()
        real = iw.load_i3d("rgb", "i3d_rgb", str(path), allow_random=False).state_dict()
        rand = iw.load_i3d("rgb", "i3d_rgb", None, allow_random=True).state_dict()
        assert all(torch.equal(explicit[k], real[k]) for k in real)
        assert not all(torch.equal(rand[k], real[k]) for k in real)
        return
    else:
        from video_features.models.flow_weights import load_pwc, write_random_checkpoint

        path = write_random_checkpoint(tmp_path / "pwc.pt", "pwc", seed=5)
        explicit = load_pwc(str(path), allow_random=True).state_dict()
        real = load_pwc(str(path), allow_random=False).state_dict()
        assert all(torch.equal(explicit[k], real[k]) for k in real)
        return
    saved = torch.load(path)
    assert all(torch.equal(state[k], saved[k]) for k in saved)
