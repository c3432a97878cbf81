"""video-features report: a page built from a generated run with a failed input, a black and a
frozen stretch and a NaN written by the test; its counts equal the records, its flags name the
planted defects, its images decode, and a browser renders it without console errors. The speed
chart ends on the table's frames/s, the self-similarity image has a fixed -1..1 scale and a colour
bar, inputs are listed by name whatever order they finished in, and damaged inputs are counted and
listed."""
from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from tests.conftest import run_main
from tests.test_check import videos  # noqa: F401  (the generated inputs, a fixture)
from video_features import check as check_module
from video_features import report
from video_features.utils.config import make_config
from video_features.utils.runner import run

pytest.importorskip("matplotlib", reason="the report plots with matplotlib (requirements-dev.txt)")


@pytest.fixture(scope="module")
def folder(videos, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("report") / "out"
    paths = [str(v) for v in videos.values()] + [str(out.parent / "missing.mp4")]
    s = run(make_config("null", video_paths=paths, device="cpu", on_extraction="save_numpy",
                        output_path=str(out), input_root=str(next(iter(videos.values())).parent)))
    assert s.count("done") == 3 and s.count("failed") == 1
    feats = out / "null" / "clean_null.npy"
    x = np.load(feats)
    x[5] = np.nan
    np.save(feats, x)
    res = run_main("report", str(out))
    assert res.returncode == 0, res.stderr[-1500:]
    return out


def test_counts_flags_and_images(folder):
    page = (folder / "report.html").read_text()
    records = list((folder / "null").glob("*_meta.json"))
    assert re.search(rf"<td>null</td><td>{len(records)}</td><td>1</td><td>0</td>", page)
    assert "1 input(s) failing, 0 damaged" in page and "no damaged input" in page
    assert "missing.mp4" in page and "file not found" in page
    assert "3 output(s) checked, 3 flagged" in page
    for name, flag in (("black", "near-duplicates"), ("frozen", "near-duplicates"), ("clean", "nan")):
        section = page[page.index(f"/null/{name}</h3>"):]
        section = section[:section.index("</section>")]
        assert f"<b>{flag}</b>" in section, name
    assert "rows 14-25 (12 rows" in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) >= 3 * 3            # thumbnails, norm/similarity, self-similarity per input
    for data in images:
        Image.open(io.BytesIO(base64.b64decode(data))).verify()
    assert "http://" not in page and "https://" not in page and "<script" not in page


def test_a_browser_renders_it_without_console_errors(folder, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no Chromium here (apt-get install chromium); the page needs no script")
    shot = tmp_path / "shot.png"
    res = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                          "--window-size=1200,1600", f"--screenshot={shot}",
                          (folder / "report.html").as_uri()], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-1500:]
    assert not [ln for ln in res.stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]
    with Image.open(shot) as img:
        assert img.size == (1200, 1600)
        assert len(set(img.convert("L").getdata())) > 16     # not a blank page


# -- speed: the chart and the table are one computation -----------------------------------------
def _table_fps(section: str, run_id: str) -> str:
    m = re.search(rf"<tr><td>{re.escape(run_id)}</td>(?:<td>[^<]*</td>){{4}}<td>([0-9.]+)</td>", section)
    assert m, section
    return m.group(1)


def _chart_points(run_id: str, entries: list[dict]) -> tuple[np.ndarray, float]:
    """The curve the chart draws and its dashed run-average line, read from the figure."""
    fig = report.speed_figure(run_id, report.run_speed(entries), entries)
    lines = {ln.get_label(): ln for ln in fig.axes[0].lines}
    curve = np.asarray(lines["average since the start"].get_ydata(), np.float64)
    average = [float(v) for k, ln in lines.items() if k.startswith("run average") for v in ln.get_ydata()]
    report._plt().close(fig)
    return curve, average[0]


def test_the_speed_chart_ends_on_the_tables_frames_per_second():
    # the user's run: 1045 frames between the first two lines 5 s apart (209 frames/s), but the
    # run took 12.8 s in all (loading, writing): 81.6 frames/s
    base = {"run": "r1", "feature_types": ["null"], "devices": ["cpu"]}
    entries = [{**base, "elapsed_s": 2.0, "frames": 0, "done": 0, "failed": 0, "gpus": []},
               {**base, "elapsed_s": 7.0, "frames": 1045, "done": 3, "failed": 0, "gpus": []},
               {**base, "elapsed_s": 12.8, "summary": {"done": 3, "skipped": 0, "failed": 0}}]
    speed = report.run_speed(entries)
    assert (speed.wall_s, speed.frames) == (12.8, 1045)
    table = _table_fps(report._runs_section(entries), "r1")
    assert table == "81.6"
    curve, average = _chart_points("r1", entries)
    assert curve[-1] == average == speed.average == 1045 / 12.8
    assert f"{curve[-1]:.1f}" == table
    assert curve.max() < 209                      # no per-interval rate
    np.testing.assert_allclose(curve, [0, 1045 / 7.0, 1045 / 12.8])


def test_the_speed_chart_agrees_with_the_table_on_a_real_run(folder):
    lines = report.read_runlog(folder)
    run_id = lines[0]["run"]
    entries = [ln for ln in lines if ln["run"] == run_id]
    assert any("summary" in e for e in entries) and any("frames" in e for e in entries)
    page = (folder / "report.html").read_text()
    table = _table_fps(page, run_id)
    curve, average = _chart_points(run_id, entries)
    assert f"{curve[-1]:.1f}" == f"{average:.1f}" == table
    assert float(table) > 0


# -- the self-similarity image --------------------------------------------------------------------
@pytest.mark.parametrize("rows", [
    np.abs(np.random.default_rng(1).normal(size=(30, 8))) + 5,        # similarities near 1 only
    np.random.default_rng(2).normal(size=(30, 8)),                    # some negative
])
def test_the_self_similarity_image_has_a_fixed_range_and_a_colour_bar(rows):
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    fig = report.similarity_figure("x", unit)
    image = fig.axes[0].images[0]
    assert image.get_clim() == (-1.0, 1.0)
    assert image.colorbar is not None and image.colorbar.ax in fig.axes and len(fig.axes) == 2
    assert image.colorbar.vmin == -1.0 and image.colorbar.vmax == 1.0
    sim = np.asarray(image.get_array())
    np.testing.assert_allclose(sim, unit @ unit.T, atol=1e-12)
    report._plt().close(fig)


# -- inputs by name, damaged inputs ---------------------------------------------------------------
def _build(root, monkeypatch) -> tuple[str, list]:
    """build(root) in this process; the figures it embeds are kept to be inspected."""
    figs = []
    real = report._png

    def keep(fig):
        figs.append([(ax.get_title(), [im.get_clim() for im in ax.images], [im.colorbar for im in ax.images])
                     for ax in fig.axes])
        return real(fig)

    monkeypatch.setattr(report, "_png", keep)
    return report.build(root), figs


def test_inputs_are_listed_by_name_not_in_the_order_they_finished(videos, tmp_path, monkeypatch):  # noqa: F811
    # listed (and so finished, one worker) frozen, clean, black; two missing inputs fail z before
    # a; black and frozen are flagged, clean is not (before: the flagged ones came first)
    out = tmp_path / "out"
    paths = [str(videos[n]) for n in ("frozen", "clean", "black")]
    paths += [str(tmp_path / "z_missing.mp4"), str(tmp_path / "a_missing.mp4")]
    s = run(make_config("null", video_paths=paths, device="cpu", on_extraction="save_numpy",
                        output_path=str(out), input_root=str(videos["clean"].parent)))
    assert s.count("done") == 3 and s.count("failed") == 2
    failed = [json.loads(ln)["path"] for ln in (out / "failures.jsonl").read_text().splitlines()]
    assert [p.split("/")[-1] for p in failed] == ["z_missing.mp4", "a_missing.mp4"]

    page, figs = _build(out, monkeypatch)
    sections = re.findall(r"<section class=video><h3>[^<]*/([^</]*)</h3>", page)
    assert sections == ["black", "clean", "frozen"]
    assert "<b>near-duplicates</b>" in page and "no flags" in page  # flagged and clean, mixed
    assert page.index("a_missing.mp4 (") < page.index("z_missing.mp4 (")
    similarity = [f[0] for f in figs if f[0][0].endswith("self-similarity")]
    assert len(similarity) == 3
    for _, clims, bars in similarity:
        assert clims == [(-1.0, 1.0)] and bars[0] is not None


def test_name_order_compares_numbers_as_numbers():
    names = ["/v/clip10.mp4", "/v/Clip2.mp4", "/v/clip1.mp4", "/a/z.mp4"]
    assert sorted(names, key=report.name_key) == ["/a/z.mp4", "/v/clip1.mp4", "/v/Clip2.mp4", "/v/clip10.mp4"]


DAMAGE = {"frozen": "skipped 3 undecodable video packets; decoded 37 frames",
          "black": "skipped 1 undecodable video packets; decoded 39 frames"}


def _damaged_copy(folder, tmp_path):
    """The run's folder with the records of two inputs marked damaged, as the decoder notes it:
    a top-level "damaged" line in the input's record."""
    root = tmp_path / "out"
    shutil.copytree(folder, root)
    (root / "report.html").unlink()
    for name, why in DAMAGE.items():
        meta_path = root / "null" / f"{name}_meta.json"
        meta = json.loads(meta_path.read_text())
        meta["damaged"] = why
        meta_path.write_text(json.dumps(meta, indent=1))
    return root


def _assert_damaged_shown(page: str) -> None:
    assert "1 input(s) failing, 2 damaged" in page
    assert re.search(r"<td>null</td><td>3</td><td>1</td><td>2</td>", page)
    part = page[page.index("<h2>Damaged inputs</h2>"):page.index("<h2>Runs</h2>")]
    assert "2 input(s) decoded despite damage" in part
    assert "2 x skipped N undecodable video packets; decoded N frames" in part
    listed = re.findall(r"<li>([^<]*)</li>", part)
    assert [li.split("/")[-1] for li in listed] == [f"black.mp4 (null): {DAMAGE['black']}",
                                                    f"frozen.mp4 (null): {DAMAGE['frozen']}"]
    for name, why in DAMAGE.items():
        section = page[page.index(f"/null/{name}</h3>"):]
        assert f"<b>damaged</b>: {why}" in section[:section.index("</section>")]
    section = page[page.index("/null/clean</h3>"):]
    assert "<b>damaged</b>" not in section[:section.index("</section>")]


def test_damaged_inputs_are_counted_and_listed(folder, tmp_path, monkeypatch):
    """The report's part, with the records read whole (check's reader keeps a few keys only)."""
    root = _damaged_copy(folder, tmp_path)
    real = report.iter_outputs

    def whole_records(r):
        for out in real(r):
            full = json.loads((root / "null" / (out.name.split("/")[-1] + "_meta.json")).read_text())
            yield check_module.Output(out.feature_type, out.name, {**out.meta, "damaged": full.get("damaged")},
                                      out.load)

    monkeypatch.setattr(report, "iter_outputs", whole_records)
    page, _ = _build(root, monkeypatch)
    _assert_damaged_shown(page)


def test_damaged_inputs_are_counted_and_listed_from_the_records(folder, tmp_path, monkeypatch):
    page, _ = _build(_damaged_copy(folder, tmp_path), monkeypatch)
    _assert_damaged_shown(page)
