"""shard=i/N: a deterministic split of the input list for job arrays; the shards together are
the full run, each input in exactly one."""
from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import run_main
from video_features.utils.config import make_config
from video_features.utils.errors import ConfigError
from video_features.utils.runner import run


@pytest.fixture(scope="module")
def videos(make_video):
    return [make_video(f"shard{i}.mp4", n_frames=3 + i, fps=25.0, width=32, height=24)
            for i in range(5)]


def _cfg(paths, out, **kw):
    return make_config("null", video_paths=[str(p) for p in paths], device="cpu",
                       on_extraction="save_numpy", output_path=str(out),
                       input_root=str(paths[0].parent), **kw)


def test_shards_split_the_deduplicated_list_every_nth(videos, tmp_path):
    listed = videos + [videos[1]]   # a duplicate stays in the shard of its first place
    got = [_cfg(listed, tmp_path, shard=f"{i}/3").video_paths for i in range(3)]
    assert got == [[str(videos[0]), str(videos[3])], [str(videos[1]), str(videos[4])],
                   [str(videos[2])]]


def test_the_union_of_the_shards_is_the_full_run(videos, tmp_path):
    full = tmp_path / "full"
    assert run(_cfg(videos, full)).count("done") == 5
    parts = tmp_path / "parts"
    done = [r.path for i in range(3) for r in run(_cfg(videos, parts, shard=f"{i}/3")).results
            if r.status == "done"]
    assert sorted(done) == sorted(str(v) for v in videos)      # each input once
    for v in videos:
        name = f"{v.stem}_null.npy"
        np.testing.assert_array_equal(np.load(parts / "null" / name), np.load(full / "null" / name))
    # a shard run again finds its own inputs done
    assert run(_cfg(videos, parts, shard="1/3")).count("skipped") == 2


def test_a_shard_with_no_inputs_is_an_empty_successful_run(videos, tmp_path):
    cfg = _cfg(videos[:2], tmp_path, shard="3/4")
    assert cfg.video_paths == []
    summary = run(cfg)
    assert summary.results == [] and summary.exit_code == 0


@pytest.mark.parametrize("bad", ["2/2", "1", "a/b", "0/0", "-1/3", "1/2/3"])
def test_bad_shards_name_the_option(videos, tmp_path, bad):
    with pytest.raises(ConfigError, match=f"option shard '{bad}' must be i/N"):
        _cfg(videos, tmp_path, shard=bad)


def test_shard_on_the_command_line(videos, tmp_path):
    res = run_main("--feature_type", "null", "--video_paths", *map(str, videos), "--device", "cpu",
                   "--on_extraction", "save_numpy", "--output_path", str(tmp_path),
                   "--input_root", str(videos[0].parent), "--shard", "0/2")
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (tmp_path / "null").glob("*_null.npy")) == \
        [f"{videos[i].stem}_null.npy" for i in (0, 2, 4)]
