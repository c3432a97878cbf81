"""Several feature types from one decode (``--feature_type resnet i3d vggish``).

Each type's outputs must equal those of a run of that type alone, in the same place; a type
that fails on an input fails alone; options split between the types by rule.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_main
from video_features.utils.config import parse_configs
from video_features.utils.errors import ConfigError
from video_features.utils.runner import run

TYPES = ("resnet", "r21d", "i3d", "vggish", "null")


@pytest.fixture(scope="module")
def inputs(make_video, tmp_path_factory):
    from tests.test_audio import write_media

    d = tmp_path_factory.mktemp("multi")
    t = np.arange(int(44100 * 2.2)) / 44100
    stereo = np.stack([0.5 * np.sin(2 * np.pi * 330 * t), 0.2 * np.sin(2 * np.pi * 900 * t)])
    with_audio = write_media(d / "talk.mp4", stereo.astype(np.float32), 44100, "aac",
                             video_frames=30)
    return [with_audio,
            make_video("m1.mp4", n_frames=27, fps=25.0, width=64, height=48, audio=False),
            make_video("m2.mp4", n_frames=14, fps=12.0, width=48, height=64)]


@pytest.fixture(scope="module")
def weights(resnet_weights, hub_checkpoints, tmp_path_factory):
    from video_features.models.r21d.weights import CARD, write_random_checkpoint
    from video_features.models.vggish.weights import write_random_checkpoint as vggish_random

    resnet_weights("resnet18")
    write_random_checkpoint(hub_checkpoints / CARD.filename)
    return vggish_random(tmp_path_factory.mktemp("vw") / "vggish.pth", seed=4)


def _args(paths, out, extra=()):
    return ["--video_paths", *map(str, paths), "--device", "cpu", "on_extraction=save_numpy",
            f"output_path={out}", "decoders=2", *extra]


def _type_options(vggish_ckpt):
    # per-type rates differ (native for r21d/i3d/null, 5 fps for resnet): frames are picked
    # per type on the device
    return ["resnet.model_name=resnet18", "resnet.extraction_fps=5", "resnet.batch_size=3",
            "r21d.stack_size=4", "r21d.step_size=3", "r21d.batch_size=2",
            "i3d.stack_size=4", "i3d.step_size=4", "i3d.streams=[rgb,flow]", "i3d.flow_batch_size=2",
            # TV-L1 at one short warp: flow without PWC-Net's minutes on the CPU
            "i3d.flow_type=tvl1", "i3d.tvl1_warps=1", "i3d.tvl1_outer_iterations=1",
            "i3d.allow_random_weights=true", f"vggish.checkpoint_path={vggish_ckpt}",
            "vggish.batch_size=2"]


def _arrays(root: Path, ft: str) -> dict[str, np.ndarray]:
    return {p.name: np.load(p) for p in sorted((root / ft).rglob("*.npy"))}


def test_one_decode_gives_each_types_single_run_outputs(inputs, weights, tmp_path):
    multi = tmp_path / "multi"
    cfgs = parse_configs(["--feature_type", *TYPES, *_args(inputs, multi), *_type_options(weights)])
    assert [c.feature_type for c in cfgs] == list(TYPES)
    summary = run(cfgs)
    by_path = {r.path: r for r in summary.results}
    # only vggish fails, only on the input without audio; the other types are written anyway
    assert by_path[str(inputs[1])].status == "failed"
    assert by_path[str(inputs[1])].reason == "vggish: no audio track"
    assert by_path[str(inputs[0])].status == by_path[str(inputs[2])].status == "done"

    for ft in TYPES:
        single = tmp_path / f"single_{ft}"
        own = [o.split(".", 1)[1] for o in _type_options(weights) if o.startswith(ft + ".")]
        cfgs1 = parse_configs(["--feature_type", ft, *_args(inputs, single), *own])
        run(cfgs1)
        want, got = _arrays(single, ft), _arrays(multi, ft)
        assert want and set(got) == set(want), ft
        for name, ref in want.items():
            assert got[name].shape == ref.shape, (ft, name)
            np.testing.assert_allclose(got[name], ref, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(ref).max()),
                                       err_msg=f"{ft} {name}")
    ts = np.load(next((multi / "resnet").rglob("m1_timestamps_ms.npy")))
    np.testing.assert_allclose(ts[:, 0], np.arange(len(ts)) * 200.0)  # 5 fps slots
    np.testing.assert_allclose(ts[:, 1] - ts[:, 0], 200.0)


def test_a_rerun_computes_only_the_missing_types(inputs, weights, tmp_path):
    out = tmp_path / "out"
    args = ["--feature_type", "resnet", "null", *_args(inputs[1:], out),
            "resnet.model_name=resnet18"]
    assert run(parse_configs(args)).count("done") == 2
    meta = next((out / "null").rglob("m1_meta.json"))
    meta.unlink()  # null's output of m1 is now incomplete; resnet's is done
    resnet_meta = next((out / "resnet").rglob("m1_meta.json"))
    before = resnet_meta.stat().st_mtime_ns
    summary = run(parse_configs(args))
    assert summary.count("skipped") == 1 and summary.count("done") == 1
    assert meta.exists() and json.loads(meta.read_text())["outputs"]
    assert resnet_meta.stat().st_mtime_ns == before  # not recomputed


def test_options_are_split_between_types(inputs):
    base = ["--video_paths", str(inputs[0]), "--device", "cpu"]
    cfgs = parse_configs(["feature_type=resnet,r21d", *base, "batch_size=3", "--stack_size", "5",
                          "r21d.step_size=2", "resnet50.model_name=resnet34"])
    resnet, r21d = cfgs
    assert resnet.batch_size == r21d.batch_size == 3          # shared by both
    assert r21d.stack_size == 5 and "stack_size" not in resnet  # only r21d has it
    assert r21d.step_size == 2 and resnet.model_name == "resnet34"
    with pytest.raises(ConfigError, match="unknown option 'stak_size'"):
        parse_configs(["--feature_type", "resnet", "r21d", *base, "stak_size=4"])
    with pytest.raises(ConfigError, match="is not a feature type of this run"):
        parse_configs(["--feature_type", "resnet", "r21d", *base, "i3d.stack_size=4"])
    with pytest.raises(ConfigError, match="option of the whole run"):
        parse_configs(["--feature_type", "resnet", "r21d", *base, "r21d.output_path=x"])
    with pytest.raises(ConfigError, match="checkpoint_path is ambiguous"):
        parse_configs(["--feature_type", "resnet", "r21d", *base, "checkpoint_path=x.pt"])
    with pytest.raises(ConfigError, match="feature_type 'nope' is unknown"):
        parse_configs(["--feature_type", "resnet", "nope", *base])


def test_config_file_sections_per_type(inputs, tmp_path):
    f = tmp_path / "run.yml"
    f.write_text(f"feature_type: [resnet, r21d]\nvideo_paths: [{inputs[0]}]\ndevice: cpu\n"
                 "batch_size: 2\nr21d:\n  stack_size: 6\nresnet:\n  model_name: resnet101\n")
    resnet, r21d = parse_configs(["--config", str(f)])
    assert (resnet.model_name, r21d.stack_size, resnet.batch_size, r21d.batch_size) == \
        ("resnet101", 6, 2, 2)


def test_command_line_runs_several_types(inputs, weights, tmp_path):
    res = run_main("--feature_type", "resnet", "null", *_args(inputs[1:], tmp_path),
                   "resnet.model_name=resnet18")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "done 2" in res.stderr
    for ft, key in (("resnet", "resnet"), ("null", "null")):
        for stem in ("m1", "m2"):
            assert next((tmp_path / ft).rglob(f"{stem}_{key}.npy")).stat().st_size > 0


def test_one_decode_carries_extraction_total_and_refuses_different_ones():
    from video_features.utils.multi import _common_needs

    def needs(total, fps=None):
        return {"video": True, "audio": None, "extraction_fps": fps, "extraction_total": total,
                "frames_fps": 25.0, "timestamps": "pts"}

    assert _common_needs({"resnet": needs(8), "r21d": needs(8)})["extraction_total"] == 8
    assert _common_needs({"resnet": needs(None), "r21d": needs(None, 5.0)})["extraction_total"] is None
    with pytest.raises(ConfigError, match="extraction_total must be the same"):
        _common_needs({"resnet": needs(8), "r21d": needs(None)})
