"""video-features finetune: annotation parsers, the mAP, checkpoints in the public layouts, a
short fine-tuning run on generated videos whose classes are learnable, exact resume, and inputs
or rows that are bad."""
from __future__ import annotations

import json
import math
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from tests.conftest import run_main
from video_features.finetune import build_model, evaluate, Inputs, train
from video_features.finetune_options import parse_options
from video_features.models.i3d.extractor import I3DExtractor
from video_features.models.i3d.weights import (convert_state_dict, export_state_dict,
                                               random_official_state_dict, write_random_checkpoint)
from video_features.utils.annotations import (AnnotationError, frame_labels, parse_charades_actions,
                                              read_charades, read_generic)
from video_features.utils.config import make_config
from video_features.utils.metrics import average_precision, mean_average_precision

FPS = 8
COLOURS = [(220, 40, 40), (40, 200, 40), (40, 60, 230)]


# -- generated data ----------------------------------------------------------------------------
def write_mp4(path: Path, frames: np.ndarray, fps: int = FPS) -> Path:
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        s.options = {"crf": "10"}
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def make_split(root: Path, n: int, seed: int) -> Path:
    """``n`` 3-second videos on grey noise; in one segment a bar of its class's colour sweeps
    across: colour says which class, the bar's presence says when."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        frames = np.full((24, 40, 48, 3), 128, np.uint8) + rng.integers(0, 20, (24, 40, 48, 3)).astype(np.uint8)
        cls = i % 3
        start = int(rng.integers(0, 12))
        end = min(24, start + int(rng.integers(8, 13)))
        for t in range(start, end):
            x = (t * 3) % 48
            frames[t, :, max(0, x - 8):x + 8] = COLOURS[cls]
        write_mp4(root / f"v{i}.mp4", frames)
        rows.append(f"v{i}.mp4,{cls},{start / FPS:.3f},{(end - 1) / FPS:.3f}")
    (root / "ann.csv").write_text("video,label,start,end\n" + "\n".join(rows) + "\n")
    return root / "ann.csv"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    start = write_random_checkpoint(root / "rgb_imagenet.pt", "pytorch_i3d", "rgb", 400)
    return {"train": make_split(root / "train", 12, 0), "test": make_split(root / "test", 9, 1),
            "start": start, "root": root}


def _opts(data, out, **kw):
    words = dict(data_format="generic", train_annotations=data["train"],
                 test_annotations=data["test"], checkpoint_path=data["start"], fps=FPS,
                 clip_frames=12, side_size=40, crop_size=32, batch_size=4, accumulate=1,
                 lr=0.01, max_steps=8, eval_every=8, output_dir=out, num_workers=0,
                 device="cpu", progress=False, seed=0, bn_momentum=0.3)
    words.update(kw)
    return parse_options([f"{k}={v}" for k, v in words.items()])


# -- annotations --------------------------------------------------------------------------------
CHARADES_HEADER = "id,subject,scene,quality,relevance,verified,script,objects,descriptions,actions,length"


def test_charades_csv_against_a_hand_written_sample(tmp_path, caplog):
    videos = tmp_path / "videos"
    (videos / "46GP8").mkdir(parents=True)          # a frame folder
    (videos / "N11GT.mp4").write_bytes(b"x")        # a video file (not decoded here)
    csv = tmp_path / "Charades_v1_train.csv"
    csv.write_text(
        CHARADES_HEADER + "\n"
        '46GP8,HR43,Kitchen,6,7,Yes,"A person cooks.",food,"cooks",'
        '"c092 11.90 21.20;c147 0.00 12.60",24.83\n'
        'N11GT,0KZ7,Stairs,6,7,Yes,"walks",stairs,"walks",,17.58\n'
        'ZZZZZ,0KZ7,Stairs,6,7,Yes,"gone",,"",c001 1 2,5.0\n')
    ann = read_charades(csv, videos)
    assert ann.num_classes == 157 and ann.missing == 1 and ann.class_names is None
    assert [Path(s.video).name for s in ann.samples] == ["46GP8", "N11GT.mp4"]
    assert ann.samples[0].segments == ((92, 11.9, 21.2), (147, 0.0, 12.6))
    assert ann.samples[0].length_s == pytest.approx(24.83)
    assert ann.samples[1].segments == ()
    assert "ZZZZZ" in caplog.text


@pytest.mark.parametrize("actions,match", [("c092 11.90", "is not 'cNNN start end'"),
                                           ("x092 1 2", "is not 'cNNN start end'"),
                                           ("c200 1 2", "class c200 is not below 157"),
                                           ("c001 5 2", "ends before it starts"),
                                           ("c001 a 2", "time 'a' is not a number")])
def test_bad_charades_actions_name_file_and_line(tmp_path, actions, match):
    csv = tmp_path / "a.csv"
    csv.write_text(CHARADES_HEADER + f"\nOK,s,k,1,1,Yes,,,,c001 0 1,3\nBAD,s,k,1,1,Yes,,,,{actions},3\n")
    (tmp_path / "OK.mp4").write_bytes(b"x")
    with pytest.raises(AnnotationError, match=rf"a\.csv:3: .*{match}"):
        read_charades(csv, tmp_path)


def test_generic_csv_with_names_and_json(tmp_path):
    for name in ("a.mp4", "b.mp4"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "ann.csv").write_text("video,label,start,end\na.mp4,run,1,2\na.mp4,jump,3,4\n"
                                      "b.mp4,jump,,\nmissing.mp4,run,0,1\n")
    ann = read_generic(tmp_path / "ann.csv")
    assert ann.class_names == ["jump", "run"] and ann.num_classes == 2 and ann.missing == 1
    a, b = ann.samples
    assert a.segments == ((1, 1.0, 2.0), (0, 3.0, 4.0))
    assert b.segments == ((0, 0.0, math.inf),)       # no times: the whole video
    (tmp_path / "ann.json").write_text(json.dumps([{"video": "a.mp4", "label": 2, "start": 0.5}]))
    ann = read_generic(tmp_path / "ann.json", num_classes=5)
    assert ann.num_classes == 5 and ann.samples[0].segments == ((2, 0.5, math.inf),)
    (tmp_path / "bad.csv").write_text("video,label,start,end\na.mp4,1,4,2\n")
    with pytest.raises(AnnotationError, match=r"bad\.csv:2: end 2 is before start 4"):
        read_generic(tmp_path / "bad.csv")
    (tmp_path / "nohead.csv").write_text("path,class\na.mp4,1\n")
    with pytest.raises(AnnotationError, match=r"nohead\.csv:1: the header lacks column\(s\) video, label"):
        read_generic(tmp_path / "nohead.csv")


def test_frame_labels_follow_the_segments():
    (sample,) = read_generic_rows([("v", 1, 0.5, 1.0), ("v", 0, 0.0, 0.25)])
    got = frame_labels(sample, [0.0, 0.25, 0.5, 0.75, 1.0, 1.25], 3)
    assert got == [[1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0]]
    assert parse_charades_actions("", "x") == ()


def read_generic_rows(rows):
    from video_features.utils.annotations import Sample

    return [Sample("v", tuple((c, s, e) for _, c, s, e in rows))]


# -- metrics ------------------------------------------------------------------------------------
def test_average_precision_equals_scikit_learn():
    sklearn = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for _ in range(100):
        n = int(rng.integers(2, 50))
        labels = rng.integers(0, 2, n)
        if not labels.any():
            continue
        scores = np.round(rng.random(n), 1)           # ties, handled as thresholds
        assert average_precision(labels, scores) == pytest.approx(
            sklearn.average_precision_score(labels, scores), abs=1e-12)
    labels = np.array([[1, 0, 0], [0, 0, 1], [1, 0, 1]])
    scores = rng.random((3, 3))
    want = np.mean([sklearn.average_precision_score(labels[:, c], scores[:, c]) for c in (0, 2)])
    assert mean_average_precision(labels, scores) == pytest.approx(want)   # class 1: no positive


# -- checkpoints ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["pytorch_i3d", "video_features"])
@pytest.mark.parametrize("stream,channels", [("rgb", 3), ("flow", 2)])
def test_export_is_the_inverse_of_loading(family, stream, channels):
    state = random_official_state_dict(family, stream, 157, seed=3)
    weights = convert_state_dict(state, family, channels, 157)
    exported = export_state_dict(weights, family)
    assert {k: tuple(v.shape) for k, v in exported.items() if not k.endswith("num_batches_tracked")} \
        == {k: tuple(v.shape) for k, v in state.items() if not k.endswith("num_batches_tracked")}
    for k, v in state.items():
        assert torch.equal(exported[k], v), k
    again = convert_state_dict(exported, family, channels, 157)
    assert all(torch.equal(again[k], weights[k]) for k in weights)


# -- training -----------------------------------------------------------------------------------
def test_fine_tuning_learns_and_its_checkpoint_extracts(data, tmp_path):
    out = tmp_path / "run"
    cfg = _opts(data, out, max_steps=16, eval_every=8)
    start = build_model(cfg, 3, torch.device("cpu"))
    test = read_generic(data["test"]).samples
    before = evaluate(start, Inputs(cfg, torch.device("cpu")), test, cfg, 3)
    result = train(cfg)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [8, 16]
    assert result["video_map"] > before["video_map"] + 0.1
    assert result["frame_map"] > before["frame_map"]
    # chance: a random ranking's AP is about the share of positives (1 in 3 videos per class)
    assert result["video_map"] > 0.6
    sidecar = json.loads((out / "best_rgb.json").read_text())
    assert sidecar["num_classes"] == 3 and sidecar["layout"] == "pytorch_i3d"
    assert "checkpoint_path_rgb=" in sidecar["extract_with"]

    # the saved checkpoint is what the extractor loads (class count from the file)
    ex = I3DExtractor(make_config("i3d", video_paths=["x"], device="cpu", streams=["rgb"],
                                  weights="imagenet", checkpoint_path_rgb=str(out / "last_rgb.pt"),
                                  stack_size=12, step_size=12), torch.device("cpu"))
    assert ex.nets["rgb"].num_classes == 3
    state = torch.load(out / "state.pt", weights_only=False)["model"]
    for k, v in ex.nets["rgb"].state_dict().items():
        assert torch.equal(v, state[k].to(v.dtype)), k
    feats = ex.extract(test[0].video)["rgb"]
    assert feats.shape == (1, 1024) and np.isfinite(feats).all()   # 24 frames: one 12-stack + 1


def test_resume_continues_the_steps_and_optimiser_exactly(data, tmp_path):
    whole = train(_opts(data, tmp_path / "whole", max_steps=4, eval_every=2, num_workers=1,
                        test_annotations="null"))
    train(_opts(data, tmp_path / "parts", max_steps=2, eval_every=2, num_workers=1,
                test_annotations="null"))
    resumed = train(_opts(data, tmp_path / "parts", max_steps=4, eval_every=2, num_workers=1,
                          test_annotations="null"))
    assert resumed["step"] == whole["step"] == 4
    a = torch.load(tmp_path / "whole" / "state.pt", weights_only=False)
    b = torch.load(tmp_path / "parts" / "state.pt", weights_only=False)
    assert a["step"] == b["step"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for (ka, va), (kb, vb) in zip(a["optimizer"]["state"].items(), b["optimizer"]["state"].items()):
        assert torch.equal(va["momentum_buffer"], vb["momentum_buffer"])
    assert a["scheduler"] == b["scheduler"]
    assert resumed["loss"] == whole["loss"]


def test_a_video_that_fails_to_decode_is_skipped_and_counted(data, tmp_path, caplog):
    root = tmp_path / "mixed"
    root.mkdir()
    rows = data["train"].read_text().splitlines()
    for row in rows[1:]:
        name = row.split(",")[0]
        (root / name).symlink_to(data["train"].parent / name)
    for i in range(4):
        (root / f"broken{i}.mp4").write_text("not a video")
    (root / "ann.csv").write_text("\n".join(rows + [f"broken{i}.mp4,0,0,1" for i in range(4)]) + "\n")
    result = train(_opts(data, tmp_path / "out", train_annotations=root / "ann.csv",
                         test_annotations="null", max_steps=3, eval_every=3))
    assert result["step"] == 3 and result["skipped_clips"] >= 1
    assert "left out of training: " in caplog.text and "broken" in caplog.text


@pytest.mark.parametrize("flow_type", ["pwc", "tvl1"])
def test_flow_stream_on_the_fly(data, tmp_path, flow_type):
    from video_features.models import flow_weights
    from video_features.models.tvl1 import TVL1, TVL1Params

    extra = dict(flow_checkpoint_path=flow_weights.write_random_checkpoint(
        tmp_path / "pwc.pth", "pwc")) if flow_type == "pwc" else dict(tvl1_warps=2,
                                                                       tvl1_outer_iterations=2)
    flow_start = write_random_checkpoint(tmp_path / "flow_imagenet.pt", "pytorch_i3d", "flow", 400)
    cfg = _opts(data, tmp_path / "flow", stream="flow", checkpoint_path=flow_start,
                flow_type=flow_type, max_steps=2, eval_every=2, max_eval_videos=2, clip_frames=9,
                batch_size=2, **extra)
    if flow_type == "tvl1":   # the clip's flow is TV-L1's at the options, cropped and mapped
        inputs = Inputs(cfg, "cpu")
        assert inputs.flow_net.params == TVL1Params(warps=2, outer_iterations=2)
        frames = torch.randint(0, 256, (4, 3, 40, 48), dtype=torch.uint8)
        got = inputs.one(frames, None)
        flow = TVL1(TVL1Params(warps=2, outer_iterations=2)).estimate(frames[:-1].float(),
                                                                      frames[1:].float())
        want = 2 * torch.round(128 + 255 / 40 * flow[..., 4:36, 8:40].clamp(-20, 20)) / 255 - 1
        torch.testing.assert_close(got, want)
    result = train(cfg)
    assert result["step"] == 2 and math.isfinite(result["loss"]) and result["videos"] == 2
    assert (tmp_path / "flow" / "best_flow.pt").is_file()


def test_command_line_errors_name_the_problem(data, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("video,label,start,end\nv0.mp4,0,0,1\nv1.mp4,,0,1\n")
    res = run_main("finetune", "data_format=generic", f"train_annotations={bad}",
                   f"output_dir={tmp_path / 'o'}", "device=cpu")
    assert res.returncode == 2 and f"{bad}:3: empty label" in res.stderr
    assert "Traceback" not in res.stderr
    res = run_main("finetune", "data_format=charades", f"train_annotations={bad}", "device=cpu")
    assert res.returncode == 2 and "needs video_root" in res.stderr
    res = run_main("finetune", "lr=fast", "device=cpu")
    assert res.returncode == 2 and "lr" in res.stderr


def test_two_processes_under_torchrun(data, tmp_path):
    """DistributedDataParallel on the CPU (gloo): each process trains on its share of every
    batch, one evaluates and writes the checkpoints."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    out = tmp_path / "ddp"
    args = [f"{k}={v}" for k, v in dict(
        data_format="generic", train_annotations=data["train"], test_annotations=data["test"],
        checkpoint_path=data["start"], fps=FPS, clip_frames=12, side_size=40, crop_size=32,
        batch_size=2, accumulate=2, max_steps=2, eval_every=2, max_eval_videos=1,
        output_dir=out, num_workers=0, device="cpu", progress=False).items()]
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          str(ROOT / "main.py"), "finetune", *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=600, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-2000:]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2] and log[0]["videos"] == 1     # written once
    assert (out / "best_rgb.pt").is_file() and (out / "state.pt").is_file()


@pytest.fixture(scope="module")
def charades_frames(data, tmp_path_factory):
    """The generated train videos as Charades frame folders (``ID/ID-000001.jpg``), their
    x/y flow JPEGs (``ID/ID-000001x.jpg``), and a CSV in Charades' columns."""
    from PIL import Image

    root = tmp_path_factory.mktemp("charades")
    rows = []
    rng = np.random.default_rng(5)
    for line in data["train"].read_text().splitlines()[1:5]:
        name, cls, start, end = line.split(",")
        vid = Path(name).stem.upper()
        (root / "rgb" / vid).mkdir(parents=True)
        (root / "flow" / vid).mkdir(parents=True)
        with av.open(str(data["train"].parent / name)) as c:
            for i, frame in enumerate(c.decode(video=0), start=1):
                frame.to_image().save(root / "rgb" / vid / f"{vid}-{i:06d}.jpg", quality=95)
                for axis in "xy":
                    level = rng.integers(100, 156, (40, 48)).astype(np.uint8)
                    Image.fromarray(level).save(root / "flow" / vid / f"{vid}-{i:06d}{axis}.jpg")
        rows.append(f'{vid},S,K,5,5,Yes,"s",o,"d","c{int(cls):03d} {start} {end}",3.0')
    (root / "train.csv").write_text(CHARADES_HEADER + "\n" + "\n".join(rows) + "\n")
    return root


@pytest.mark.parametrize("stream", ["rgb", "flow"])
def test_charades_frame_folders_and_jpeg_flow(data, charades_frames, tmp_path, stream):
    root = charades_frames
    extra = dict(stream="flow", flow_source="jpg", flow_root=root / "flow",
                 checkpoint_path=write_random_checkpoint(tmp_path / "f.pt", "pytorch_i3d", "flow", 400)) \
        if stream == "flow" else {}
    cfg = _opts(data, tmp_path / "out", data_format="charades", train_annotations=root / "train.csv",
                test_annotations=root / "train.csv", video_root=root / "rgb", max_steps=2,
                eval_every=2, batch_size=2, max_eval_videos=2, **extra)
    result = train(cfg)
    assert result["step"] == 2 and result["videos"] == 2 and result["failed"] == 0
    assert result["skipped_clips"] == 0
    assert json.loads((tmp_path / "out" / f"best_{stream}.json").read_text())["num_classes"] == 157
