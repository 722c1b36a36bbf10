"""The `genft eval` gallery in headless Chromium: every image decodes and the metrics table renders.

Needs Debian's `chromium` (`bash scripts/setup.sh --with-browser`); skipped without it. The screenshot is kept
in test-artifacts/gallery.png (git-ignored).
"""
import json
import re
import shutil
import subprocess
from html import unescape
from pathlib import Path

import pytest

from genft.cli import main
from test_eval_gallery import eval_args, make_eval_inputs

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium") or "") if p and Path(p).is_file()), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed; run `bash scripts/setup.sh --with-browser`")

# Added to a copy of the page by the test (the gallery itself has no script): after `load`, record what rendered.
CHECK = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images];
  const rows = document.querySelectorAll('#metrics tbody tr');
  const cells = [...document.querySelectorAll('#metrics tbody td')];
  document.documentElement.setAttribute('data-check', JSON.stringify({
    images: imgs.length,
    loaded: imgs.filter(i => i.complete && i.naturalWidth > 0).length,
    rows: rows.length,
    table_height: document.getElementById('metrics').getBoundingClientRect().height,
    filled: cells.filter(c => c.textContent.trim() !== '' && c.textContent.trim() !== '\\u2013').length,
    cells: cells.length}));
});</script>"""


def _render(page: Path, tmp_path: Path, screenshot: Path = None) -> dict:
    """Open `page` in headless Chromium; return what CHECK recorded (and write `screenshot`)."""
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1280,1400", "--hide-scrollbars",
            "--virtual-time-budget=5000", "--dump-dom"]
    if screenshot is not None:
        args.append(f"--screenshot={screenshot}")
    proc = subprocess.run(args + [page.as_uri()], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = re.search(r'data-check="([^"]*)"', proc.stdout)
    assert m, f"the check script did not run; stderr: {proc.stderr[-2000:]}"
    return json.loads(unescape(m.group(1)))


def test_gallery_renders_every_image_and_the_table_in_chromium(tmp_path):
    make_eval_inputs(tmp_path)
    out = tmp_path / "out"
    assert main(eval_args(tmp_path, out)) == 0
    html = (out / "gallery.html").read_text()
    assert "<script" not in html and "http://" not in html and "https://" not in html, "the gallery must be offline"
    expected_images = html.count("<img ")
    page = tmp_path / "checked.html"
    page.write_text(html.replace("</body>", CHECK + "</body>"))
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "gallery.png"
    shot.unlink(missing_ok=True)

    got = _render(page, tmp_path, shot)
    assert got["images"] == expected_images == 2 * 2 * 2 + 1  # samples of 2 models x 2 prompts x 2, one reward curve
    assert got["loaded"] == got["images"], f"images that did not load: {got}"
    assert got["rows"] == 4 and got["table_height"] > 50 and got["filled"] == got["cells"] == 4 * (2 + 2)
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size == (1280, 1400) and len(set(im.convert("L").getdata())) > 50, "the screenshot is blank"

    broken = tmp_path / "broken.html"  # the check must notice an image that fails to decode
    broken.write_text(page.read_text().replace("data:image/png;base64,", "data:image/png;base64,AAAA", 1))
    bad = _render(broken, tmp_path)
    assert bad["loaded"] == bad["images"] - 1
