"""I3D network and checkpoint handling.

Random checkpoints are written in the exact public key layouts and loaded through the real path
(cache under TORCH_HOME -> load -> convert -> strict load).  The network is compared against an
independent, deliberately plain re-computation of each published forward pass that reads the
public state dict directly (explicit padding, one conv per branch, functional BatchNorm).
"""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

import video_features.utils.weights as uw
from video_features.models.i3d import weights as iw
from video_features.models.i3d.net import I3D
from video_features.utils.errors import WeightsError



@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield

MIXED = {  # block: (in, [b0, b1a, b1b, b2a, b2b, b3b])
    "3b": (192, (64, 96, 128, 16, 32, 32)), "3c": (256, (128, 128, 192, 32, 96, 64)),
    "4b": (480, (192, 96, 208, 16, 48, 64)), "4c": (512, (160, 112, 224, 24, 64, 64)),
    "4d": (512, (128, 128, 256, 24, 64, 64)), "4e": (512, (112, 144, 288, 32, 64, 64)),
    "4f": (528, (256, 160, 320, 32, 128, 128)), "5b": (832, (256, 160, 320, 32, 128, 128)),
    "5c": (832, (384, 192, 384, 48, 128, 128)),
}


# -- independent re-computation of the two published forward passes -------------------------
def _names(family: str):
    if family == "pytorch_i3d":
        conv = {"1a": "Conv3d_1a_7x7", "2b": "Conv3d_2b_1x1", "2c": "Conv3d_2c_3x3"}
        br = {k: k for k in ("b0", "b1a", "b1b", "b2a", "b2b", "b3b")}
        return conv, lambda b: f"Mixed_{b}", br, ".bn", "logits.conv3d"
    conv = {"1a": "conv3d_1a_7x7", "2b": "conv3d_2b_1x1", "2c": "conv3d_2c_3x3"}
    br = {"b0": "branch_0", "b1a": "branch_1.0", "b1b": "branch_1.1", "b2a": "branch_2.0",
          "b2b": "branch_2.1", "b3b": "branch_3.1"}
    return conv, lambda b: f"mixed_{b}", br, ".batch3d", "conv3d_0c_1x1.conv3d"


def reference_forward(state, family, x):
    """(Mixed_5c maps, features as the reference tool saves them, time-averaged logits)."""
    conv_n, mixed_n, br_n, bn_n, logits_n = _names(family)
    eps = 1e-3 if family == "pytorch_i3d" else 1e-5

    def pads_for(x, k, s):
        per_dim = []  # (before, after) for t, h, w
        for n, kk, ss in zip(x.shape[2:], k, s):
            if family == "pytorch_i3d":  # piergiaj: computed from the input size
                p = max(kk - ss, 0) if n % ss == 0 else max(kk - n % ss, 0)
            else:  # hassony2: fixed, as if divisible
                p = max(kk - ss, 0)
            per_dim.append((p // 2, p - p // 2))
        return per_dim

    def pad(x, per_dim):
        (t0, t1), (h0, h1), (w0, w1) = per_dim
        if family == "pytorch_i3d":
            return F.pad(x, (w0, w1, h0, h1, t0, t1))
        # hassony2 hands (h, h, w, w, t, t) to ConstantPad3d, i.e. h and w swapped; harmless
        # only because every kernel is square in space
        return F.pad(x, (h0, h1, w0, w1, t0, t1))

    def unit(x, prefix, k, s=(1, 1, 1)):
        w = state[prefix + ".conv3d.weight"]
        per_dim = pads_for(x, k, s)
        flat = [p for d in per_dim for p in d]
        if family == "video_features" and len(set(flat)) == 1:
            y = F.conv3d(x, w, stride=s, padding=flat[0])
        else:
            y = F.conv3d(pad(x, per_dim), w, stride=s)
        b = prefix + bn_n
        y = F.batch_norm(y, state[b + ".running_mean"], state[b + ".running_var"],
                         state[b + ".weight"], state[b + ".bias"], False, 0.0, eps)
        return F.relu(y)

    def maxpool(x, k, s):
        y = pad(x, pads_for(x, k, s))
        return F.max_pool3d(y, k, s, ceil_mode=family == "video_features")

    def mixed(x, block):
        p = mixed_n(block) + "."
        b = {k: p + v for k, v in br_n.items()}
        one, three = (1, 1, 1), (3, 3, 3)
        return torch.cat([
            unit(x, b["b0"], one),
            unit(unit(x, b["b1a"], one), b["b1b"], three),
            unit(unit(x, b["b2a"], one), b["b2b"], three),
            unit(maxpool(x, three, (1, 1, 1)), b["b3b"], one),
        ], 1)

    x = unit(x, conv_n["1a"], (7, 7, 7), (2, 2, 2))
    x = maxpool(x, (1, 3, 3), (1, 2, 2))
    x = unit(x, conv_n["2b"], (1, 1, 1))
    x = unit(x, conv_n["2c"], (3, 3, 3))
    x = maxpool(x, (1, 3, 3), (1, 2, 2))
    x = mixed(mixed(x, "3b"), "3c")
    x = maxpool(x, (3, 3, 3), (2, 2, 2))
    for blk in ("4b", "4c", "4d", "4e", "4f"):
        x = mixed(x, blk)
    x = maxpool(x, (2, 2, 2), (2, 2, 2))
    maps = mixed(mixed(x, "5b"), "5c")
    if maps.shape[-1] != 7:
        return maps, None, None
    pooled = F.avg_pool3d(maps, (2, 7, 7), (1, 1, 1))
    feats = pooled.squeeze(3).squeeze(3).mean(2)
    logits = F.conv3d(pooled, state[logits_n + ".weight"], state[logits_n + ".bias"])
    return maps, feats, logits.squeeze(3).squeeze(3).mean(2)


def _close(a, b, tol=1e-4):
    scale = b.abs().max().clamp_min(1e-6)
    return float((a - b).abs().max() / scale) < tol


# -- fixtures -----------------------------------------------------------------------------
@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("VIDEO_FEATURES_OFFLINE", "1")
    return tmp_path / "torch" / "hub" / "checkpoints"


def _cache(torch_home, card_name, family=None, stream=None, num_classes=None, **kw):
    card = uw.get_card(card_name)
    return iw.write_random_checkpoint(
        torch_home / card.filename, family or card.layout, stream or card.extra["stream"],
        num_classes or card.num_classes, **kw)


def _clip(c, t=16, size=224, b=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, t, size, size, generator=g) * 2 - 1


# -- layouts and cards --------------------------------------------------------------------
def test_official_layouts_keys_and_shapes():
    vf = iw.random_official_state_dict("video_features", "rgb")
    assert len(vf) == 344
    assert tuple(vf["conv3d_1a_7x7.conv3d.weight"].shape) == (64, 3, 7, 7, 7)
    assert tuple(vf["conv3d_1a_7x7.batch3d.running_mean"].shape) == (64,)
    assert tuple(vf["mixed_4b.branch_1.0.conv3d.weight"].shape) == (96, 480, 1, 1, 1)
    assert tuple(vf["mixed_5c.branch_3.1.conv3d.weight"].shape) == (128, 832, 1, 1, 1)
    assert tuple(vf["conv3d_0c_1x1.conv3d.weight"].shape) == (400, 1024, 1, 1, 1)
    assert tuple(vf["conv3d_0c_1x1.conv3d.bias"].shape) == (400,)
    assert vf["conv3d_1a_7x7.batch3d.num_batches_tracked"].dtype == torch.long
    flow = iw.random_official_state_dict("video_features", "flow")
    assert tuple(flow["conv3d_1a_7x7.conv3d.weight"].shape) == (64, 2, 7, 7, 7)

    pi = iw.random_official_state_dict("pytorch_i3d", "rgb", 157)
    assert len(pi) == 287 and not any(k.endswith("num_batches_tracked") for k in pi)
    assert len(iw.random_official_state_dict("pytorch_i3d", num_batches_tracked=True)) == 344
    assert list(pi)[:3] == ["logits.conv3d.weight", "logits.conv3d.bias",
                            "Conv3d_1a_7x7.conv3d.weight"]
    assert tuple(pi["Mixed_4b.b1a.conv3d.weight"].shape) == (96, 480, 1, 1, 1)
    assert tuple(pi["Conv3d_1a_7x7.bn.running_mean"].shape) == (64,)
    assert tuple(pi["logits.conv3d.bias"].shape) == (157,)
    assert sum(v.numel() for k, v in pi.items() if "running" not in k) == \
        sum(p.numel() for p in I3D(157, 3).parameters())


def test_cards():
    for name, layout, stream, classes in [
            ("i3d_rgb", "video_features", "rgb", 400), ("i3d_flow", "video_features", "flow", 400),
            ("pytorch_i3d_rgb_imagenet", "pytorch_i3d", "rgb", 400),
            ("pytorch_i3d_flow_imagenet", "pytorch_i3d", "flow", 400),
            ("pytorch_i3d_rgb_charades", "pytorch_i3d", "rgb", 157),
            ("pytorch_i3d_flow_charades", "pytorch_i3d", "flow", 157)]:
        card = uw.get_card(name)
        assert (card.layout, card.extra["stream"], card.num_classes) == (layout, stream, classes)
        assert card.url.startswith("https://raw.githubusercontent.com/")
        assert len(card.extra["git_blob_sha1"]) == 40
        assert len(iw.load_labels(card.extra["labels"])) == classes
    assert iw.DEFAULT_CHECKPOINTS == {"rgb": "i3d_rgb", "flow": "i3d_flow"}


def test_labels():
    k = iw.load_labels("kinetics400")
    assert len(k) == 400 and k[0] == "abseiling" and k[-1] == "zumba" and k == sorted(k)
    c = iw.load_labels("charades157")
    assert len(c) == 157 and c[0] == "Holding some clothes"
    assert c[-1] == "Someone is eating something"
    with pytest.raises(WeightsError, match="kinetics400"):
        iw.load_labels("nope")


# -- numerics against the published computations -----------------------------------------
def test_loaded_model_matches_reference_computation(torch_home):
    """224x224 crops: maps, pooled features and logits as the reference tool computes them."""
    path = _cache(torch_home, "i3d_rgb")
    model = iw.load_i3d("rgb", "i3d_rgb")
    assert model.variant == "video_features" and not model.training
    x = _clip(3, t=12)
    maps = model.feature_maps(x)
    feats, logits = model.features_and_logits(x)
    assert maps.shape == (1, 1024, 2, 7, 7)
    assert feats.shape == (1, 1024) and logits.shape == (1, 400)

    ref_maps, ref_feats, ref_logits = reference_forward(torch.load(path), "video_features", x)
    assert _close(maps, ref_maps) and _close(feats, ref_feats) and _close(logits, ref_logits)
    assert torch.equal(model.classify(feats), logits)
    assert feats.std() > 0.1  # random weights still give input-dependent features


def test_padding_rules_differ_on_lengths_not_divisible_by_4():
    """Each variant reproduces its own family where the two padding rules disagree (T=10)."""
    state = iw.random_official_state_dict("pytorch_i3d", "flow", seed=3)
    weights = iw.convert_state_dict(state)
    models = {}
    for variant in ("pytorch_i3d", "video_features"):
        models[variant] = I3D(400, 2, variant=variant)
        models[variant].load_state_dict(weights)
        models[variant].eval()
    vf_state = dict(zip(iw.official_layout("video_features", 2, 400, False),
                        [state[k] for k in iw.official_layout("pytorch_i3d", 2, 400, False)
                         if not k.startswith("logits")] + [state["logits.conv3d.weight"],
                                                           state["logits.conv3d.bias"]]))
    x10 = _clip(2, t=10, size=64, seed=1)
    assert _close(models["pytorch_i3d"].feature_maps(x10),
                  reference_forward(state, "pytorch_i3d", x10)[0])
    assert _close(models["video_features"].feature_maps(x10),
                  reference_forward(vf_state, "video_features", x10)[0])

    # with the BatchNorm eps made equal only the padding rule is left: it matters for T=10,
    # not for T=12 (every stride-2 layer then sees an even length)
    for mod in models["video_features"].modules():
        if isinstance(mod, torch.nn.BatchNorm3d):
            mod.eps = 1e-3
    x12 = _clip(2, t=12, size=64, seed=1)
    a, b = (models[v].feature_maps(x12) for v in ("pytorch_i3d", "video_features"))
    assert torch.equal(a, b)
    a, b = (models[v].feature_maps(x10) for v in ("pytorch_i3d", "video_features"))
    assert not _close(a, b, tol=1e-2)


def test_same_weights_in_both_layouts_give_same_features(torch_home, tmp_path):
    pi = iw.random_official_state_dict("pytorch_i3d", "rgb", seed=7)
    pi_keys = [k for k in iw.official_layout("pytorch_i3d", 3, 400, False)
               if not k.startswith("logits")]
    vf_keys = [k for k in iw.official_layout("video_features", 3, 400, False)
               if not k.startswith("conv3d_0c")]
    vf = {v: pi[p] for p, v in zip(pi_keys, vf_keys)}
    vf["conv3d_0c_1x1.conv3d.weight"] = pi["logits.conv3d.weight"]
    vf["conv3d_0c_1x1.conv3d.bias"] = pi["logits.conv3d.bias"]
    a, b = iw.convert_state_dict(pi), iw.convert_state_dict(vf)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # through the loader: one file per layout, same variant -> identical features
    torch.save(pi, tmp_path / "pi.pt")
    torch.save(vf, tmp_path / "vf.pt")
    m_pi = iw.load_i3d("rgb", "pytorch_i3d_rgb_imagenet", str(tmp_path / "pi.pt"))
    m_vf = iw.load_i3d("rgb", "i3d_rgb", str(tmp_path / "vf.pt"))
    x = _clip(3, t=12, size=64, b=2)
    m_vf_as_pi = I3D(400, 3, variant="pytorch_i3d")
    m_vf_as_pi.load_state_dict(m_vf.state_dict())
    f_pi = m_pi.features(x)
    assert f_pi.shape == (2, 1024)
    assert torch.equal(f_pi, m_vf_as_pi.eval().features(x))
    # T=12 is divisible by 4: the variants differ only by BatchNorm eps
    assert _close(m_vf.features(x), f_pi, tol=5e-2)


# -- loader behaviour ---------------------------------------------------------------------
def test_charades_checkpoint_and_batch_shapes(torch_home):
    _cache(torch_home, "pytorch_i3d_rgb_charades")
    m = iw.load_i3d("rgb", "pytorch_i3d_rgb_charades")
    x = _clip(3, t=9, size=64, b=2)
    feats, logits = m.features_and_logits(x)
    assert feats.shape == (2, 1024) and logits.shape == (2, 157)
    pooled = m.feature_maps(x, pool=True)  # pytorch-i3d's extract_features shape
    assert pooled.shape == (2, 1024, 1, 1, 1)
    assert torch.allclose(pooled.flatten(1), feats, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"\(B, 3, T, H, W\)"):
        m(_clip(2, t=9, size=64))


def test_num_batches_tracked_optional_and_module_prefix(torch_home, tmp_path):
    _cache(torch_home, "i3d_flow", num_batches_tracked=False)  # 287 keys
    assert iw.load_i3d("flow", "i3d_flow").in_channels == 2
    # DataParallel-saved fine-tune with its own head, given explicitly
    state = iw.random_official_state_dict("pytorch_i3d", "rgb", num_classes=6,
                                          num_batches_tracked=True)
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, tmp_path / "ft.pt")
    m = iw.load_i3d("rgb", "pytorch_i3d_rgb_imagenet", checkpoint_path=str(tmp_path / "ft.pt"))
    assert m.num_classes == 6 and m.variant == "pytorch_i3d"


def test_layout_mismatch_errors(torch_home, tmp_path):
    # a pytorch-i3d file where the video_features checkpoint belongs
    _cache(torch_home, "i3d_rgb", family="pytorch_i3d")
    with pytest.raises(WeightsError, match="pytorch_i3d I3D layout.*video_features"):
        iw.load_i3d("rgb", "i3d_rgb")
    # the flow checkpoint where the rgb one belongs: shapes
    _cache(torch_home, "i3d_rgb", stream="flow")
    with pytest.raises(WeightsError, match=r"wrong shape.*conv3d_1a_7x7\.conv3d\.weight: "
                                           r"\(64, 2, 7, 7, 7\) vs \(64, 3, 7, 7, 7\)"):
        iw.load_i3d("rgb", "i3d_rgb")
    # a truncated file
    state = iw.random_official_state_dict("video_features", "rgb")
    del state["mixed_4b.branch_1.0.conv3d.weight"]
    torch.save(state, tmp_path / "cut.pt")
    with pytest.raises(WeightsError, match="1 missing \\(e.g. mixed_4b.branch_1.0.conv3d.weight"):
        iw.load_i3d("rgb", "i3d_rgb", checkpoint_path=str(tmp_path / "cut.pt"))
    with pytest.raises(WeightsError, match="not an I3D state dict"):
        iw.convert_state_dict({"fc.weight": torch.zeros(2, 2)})
    with pytest.raises(WeightsError, match="flow stream, not rgb"):
        iw.load_i3d("rgb", "i3d_flow")


def test_missing_weights_error_names_url(torch_home):
    card = uw.get_card("pytorch_i3d_rgb_imagenet")
    with pytest.raises(WeightsError) as exc:
        iw.load_i3d("rgb", card.name)
    msg = str(exc.value)
    assert card.url in msg and str(torch_home / card.filename) in msg


def test_download_is_checked_against_git_blob_id(tmp_path, monkeypatch):
    """A download that is not the official file (here: random weights served from a local URL)
    is refused and never lands in the cache; the same bytes with a matching id are accepted."""
    import dataclasses

    monkeypatch.delenv("VIDEO_FEATURES_OFFLINE")
    served = iw.write_random_checkpoint(tmp_path / "served.pt", "video_features", "rgb", 400)
    card = dataclasses.replace(uw.get_card("i3d_rgb"), url=served.as_uri(), filename="blob-test.pt")
    with pytest.raises(WeightsError, match="git blob id"):
        uw.resolve_checkpoint(card)
    assert not (uw.cache_dir() / card.filename).exists()
    good = dataclasses.replace(card, extra={**card.extra, "git_blob_sha1": iw.git_blob_sha1(served)})
    assert uw.resolve_checkpoint(good) == uw.cache_dir() / card.filename
    (uw.cache_dir() / card.filename).unlink()


def test_git_blob_sha1(tmp_path):
    p = tmp_path / "hello"
    p.write_bytes(b"hello\n")
    assert iw.git_blob_sha1(p) == "ce013625030ba8dba906f756967f9e9ca394464a"


def test_allow_random_warns(torch_home, caplog):
    with caplog.at_level(logging.WARNING):
        m = iw.load_i3d("flow", allow_random=True)
    assert "RANDOM WEIGHTS" in caplog.text
    assert m.variant == "video_features" and m.in_channels == 2
    assert not any(p.requires_grad for p in m.parameters())
