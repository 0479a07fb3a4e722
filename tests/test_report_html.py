"""report.html of a real sweep (three tiny co-location runs of the real simulator through the real `simcolo -m`
CLI, per-run plots on): everything in one file, nothing fetched from anywhere, and a real headless browser
(Debian's `chromium`) loads it and decodes every image.

The browser: `$SIMCOLO_CHROMIUM`, else `chromium`, `chromium-browser`, `google-chrome` or
`google-chrome-stable` on PATH (`apt-get install -y chromium` on Debian/Ubuntu). Without one the browser
tests fail, naming what to install; `SIMCOLO_SKIP_BROWSER_TESTS=1` turns that into a skip (listed by
pytest's `-ra` summary) for machines that cannot have one.
"""
import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from simcolo.metrics.comparison import format_metric
from simcolo.paths import PROJECT_ROOT

_SCRIPT = Path(sys.executable).with_name("simcolo")
POLICIES = ("isolated", "lemix", "harli", "tidal")
#: the config option each run was launched with (+sweep=compare runs tidal on the LoRA job: policy=tidal_lora)
OPTIONS = ("isolated", "lemix", "harli", "tidal_lora")
RUN_PLOTS = ("gpu_timeline", "latency_cdf", "queue_length", "throughput", "training")
COMPARISON_PLOTS = ("comparison_pareto.png", "comparison_latency_cdf.png", "comparison_utilization.png",
                    "comparison_training.png")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """The default comparison (isolated, LeMix, Harli on 8 H100s) on the first 100 requests of the Azure
    conv trace, each run with its own plots."""
    root = tmp_path_factory.mktemp("html") / "sweep"
    cmd = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "simcolo"]
    proc = subprocess.run([*cmd, "-m", "+sweep=compare", "workload.max_requests=100", "metrics.quiet=true",
                           f"hydra.sweep.dir={root}"],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    return root


class _Page(HTMLParser):
    """Every tag's attributes, by tag."""

    def __init__(self):
        super().__init__()
        self.tags: dict[str, list[dict]] = {}

    def handle_starttag(self, tag, attrs):
        self.tags.setdefault(tag, []).append(dict(attrs))


def _parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    return page


def test_report_holds_the_table_plots_configs_and_cost_tables(sweep):
    text = (sweep / "report.html").read_text(encoding="utf-8")
    page = _parse(text)
    # self-contained: no script, no stylesheet link, no frame; every image inline; links only within the page
    assert not {"script", "link", "iframe", "object", "embed"} & set(page.tags)
    imgs = page.tags["img"]
    assert all(img["src"].startswith("data:image/png;base64,") for img in imgs)
    assert all(a["href"].startswith("#") for a in page.tags.get("a", []))
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|file:|//)""", text)
    # every image is a real PNG: 4 comparison plots + each run's 5 plots
    assert len(imgs) == len(COMPARISON_PLOTS) + len(POLICIES) * len(RUN_PLOTS)
    for img in imgs:
        png = Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1])))
        png.verify()
        assert png.format == "PNG" and png.size[0] > 200 and png.size[1] > 100
    # the comparison plots are the very files written beside the report
    for name in COMPARISON_PLOTS:
        assert base64.b64encode((sweep / name).read_bytes()).decode() in text, name
    for job in range(len(POLICIES)):
        for plot in RUN_PLOTS:
            assert base64.b64encode((sweep / str(job) / "plots" / f"{plot}.png").read_bytes()).decode() in text

    summaries = [json.loads((sweep / str(j) / "summary.json").read_text()) for j in range(len(POLICIES))]
    # the side-by-side table: the runs numbered in order, each value as the printed table shows it
    for n, policy in enumerate(POLICIES, 1):
        assert f"<th>#{n} {policy}</th>" in text
    for key in ("slo_attainment", "ttft_p99_s", "train_tokens_per_s", "optimizer_steps"):
        row = text.split(f"<tr><th><code>{key}</code></th>", 1)[1].split("</tr>", 1)[0]
        cells = re.findall(r'<td class="num(?: best)?">([^<]*)</td>', row)
        assert cells == [format_metric(key, s[key]) for s in summaries], key
    # higher training throughput is better: the best run's cell is marked
    best = max(range(len(POLICIES)), key=lambda j: summaries[j]["train_tokens_per_s"])
    row = text.split("<tr><th><code>train_tokens_per_s</code></th>", 1)[1].split("</tr>", 1)[0]
    assert re.findall(r'<td class="num( best)?">', row)[best] == " best"

    # each run: its overrides, its resolved config, every summary key, its cost tables
    for j, (policy, option, s) in enumerate(zip(POLICIES, OPTIONS, summaries)):
        section = text.split(f'<section id="run-{j + 1}">', 1)[1].split("</section>", 1)[0]
        assert f"policy={option}\n+sweep=compare\nworkload.max_requests=100" in section
        config = section.split("resolved config</summary><pre>", 1)[1].split("</pre>", 1)[0]
        assert f"policy:\n  name: {policy}" in config and "max_requests: 100" in config
        assert "gpus_per_node: 8" in config                    # +sweep=compare's cluster override, resolved
        assert f"summary.json ({len(s)} keys)" in section
        costs = text.split("<h2 id=\"costs\">", 1)[1].split("</table>", 1)[0]
        row = costs.split(f"<td>#{j + 1} {policy}</td>", 1)[1].split("</tr>", 1)[0]
        for key in ("cost_source", "cost_interference", "cost_off_grid_queries"):
            assert f"<td>{format_metric(key, s[key])}" in row, key
        assert "shipped tables" in row and "interference: table" in row
    assert summaries[0]["cost_source"] == "roofline"


def _chromium() -> str:
    found = os.environ.get("SIMCOLO_CHROMIUM") or next(
        (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
         if shutil.which(n)), None)
    if found:
        return found
    message = ("no headless browser for the report.html test: install one (`apt-get install -y chromium` on "
               "Debian/Ubuntu) or point SIMCOLO_CHROMIUM at a Chrome/Chromium binary")
    if os.environ.get("SIMCOLO_SKIP_BROWSER_TESTS") == "1":
        pytest.skip(message + " (skipped: SIMCOLO_SKIP_BROWSER_TESTS=1)")
    pytest.fail(message + "; SIMCOLO_SKIP_BROWSER_TESTS=1 skips this test instead")


def _browser(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [_chromium(), "--headless", "--disable-gpu", "--no-sandbox", "--disable-dev-shm-usage",
           "--no-first-run", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


# after the page's load event (every image fetched and decoded, or failed): each image's natural size
_PROBE = """<script>
window.addEventListener("load", () => {
  const out = document.createElement("pre");
  out.id = "simcolo-probe";
  out.textContent = JSON.stringify(Array.from(document.images, (img) =>
      [img.complete, img.naturalWidth, img.naturalHeight]));
  document.body.appendChild(out);
});
</script>"""


def test_report_loads_and_every_image_decodes_in_headless_chromium(sweep, tmp_path):
    text = (sweep / "report.html").read_text(encoding="utf-8")
    probe = tmp_path / "probe.html"       # the report itself has no script: a copy carries the probe
    probe.write_text(text.replace("</body>", _PROBE + "</body>"), encoding="utf-8")
    proc = _browser(tmp_path, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = re.search(r'<pre id="simcolo-probe">(.*?)</pre>', proc.stdout, re.DOTALL)
    assert found, proc.stdout[-2000:]
    images = json.loads(found.group(1).replace("&quot;", '"'))
    assert len(images) == len(COMPARISON_PLOTS) + len(POLICIES) * len(RUN_PLOTS)
    assert all(complete and width > 200 and height > 100 for complete, width, height in images), images
    assert f"simcolo sweep: {len(POLICIES)} runs" in proc.stdout

    # and the report as it is, drawn: a page with text, tables and plots, not a blank one
    shot = tmp_path / "report.png"
    proc = _browser(tmp_path, f"--screenshot={shot}", "--window-size=1280,2400", (sweep / "report.html").as_uri())
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (1280, 2400)
        pixels = np.asarray(im.convert("RGB").resize((320, 600))).reshape(-1, 3)
    ink = float((pixels.min(axis=1) < 200).mean())
    assert ink > 0.03, ink                                  # text, table lines, plot lines
    assert len(np.unique(pixels, axis=0)) > 200             # the plots' colours, not one flat fill
