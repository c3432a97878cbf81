"""video-features report: a page built from a generated run with a failed input, a black and a
frozen stretch and a NaN written by the test; its counts equal the records, its flags name the
planted defects, its images decode, and a browser renders it without console errors."""
from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from tests.conftest import run_main
from tests.test_check import videos  # noqa: F401  (the generated inputs, a fixture)
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
    assert re.search(rf"<td>null</td><td>{len(records)}</td><td>1</td>", page)
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
