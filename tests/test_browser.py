"""The diff report of a small real sweep, opened in headless Chromium.

How the page is checked: ``chromium --headless --dump-dom`` loads the file, runs the page and prints
the DOM as the browser built it (so a figure that failed to parse would be missing from it);
``--enable-logging=stderr --v=0`` writes every console message (``console.*``, uncaught errors,
resources that failed to load) to stderr as ``INFO:CONSOLE...`` lines. The report has no scripts
and loads nothing, so any console line is a failure. A control page with a deliberate error checks
that such lines are seen. ``--screenshot`` renders the first screen to a PNG (the README's picture
``docs/report-first-screen.png``, comes from the same command).
"""

import os
import re
import shutil
import struct
import subprocess

import pytest

from circuitfind.reports import write_run_report
from circuitfind.runs import health
from circuitfind.runs.sweep import SweepConfig, load_records, run_setting

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium here (.ci/run installs it with apt-get)")

# 2 algorithms x 2 corruptions x 2 metrics, noising: the EAP + KL settings have all-zero scores
GRID = SweepConfig(
    algorithms=["eap", "acdc"], corruptions=["str", "gn"], metrics=["logit_diff", "kl"], directions=["noise"], prompts=8
)


def chromium(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    flags = ["--headless", "--disable-gpu", "--no-first-run", "--enable-logging=stderr", "--v=0"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        flags.append("--no-sandbox")  # Chromium refuses to start its sandbox as root (CI containers)
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=timeout)


def console_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    cache = tmp_path_factory.mktemp("cache")
    for setting in GRID.settings():
        run_setting(setting, GRID, run, cache)
    write_run_report(run, title="Circuit diff report: small sweep")
    return run


def test_the_console_check_sees_errors(tmp_path):
    page = tmp_path / "bad.html"
    page.write_text(
        "<!doctype html><html><body><p>x</p><script>console.error('deliberate'); missing();</script></body></html>"
    )
    result = chromium("--dump-dom", page.as_uri())
    assert result.returncode == 0 and "<p>x</p>" in result.stdout
    lines = console_lines(result.stderr)
    assert any("deliberate" in line for line in lines) and any("missing is not defined" in line for line in lines)


def test_the_report_renders_in_chromium_without_console_errors(report, tmp_path):
    checks = health.check_records(load_records(report))
    flagged = {name.split("__", 2)[2]: c["flags"] for name, c in checks.items() if c["flags"]}
    assert flagged == {"eap__str__kl__noise": ["zero_scores"], "eap__gn__kl__noise": ["zero_scores"]}
    result = chromium("--dump-dom", (report / "report.html").as_uri())
    assert result.returncode == 0, result.stderr[-2000:]
    assert console_lines(result.stderr) == []
    dom = result.stdout
    assert "<h1>Circuit diff report: small sweep</h1>" in dom and '<nav class="contents">' in dom
    # the axis figure, 3 overlap heatmaps, the layer x layer score mass, the consensus circuit, 8 setting
    # drawings, and one faithfulness panel per algorithm (the flagged EAP + KL settings have none):
    # 1 + 3 + 1 + 1 + 8 + 2
    assert len(re.findall(r"<svg[\s>]", dom)) == 16
    assert len(re.findall(r"<img[\s>]", dom)) == 0
    assert (
        dom.index("Which choice matters") < dom.index("Settings and health checks") < dom.index("Faithfulness curves")
    )


def test_a_screenshot_of_the_first_screen(report, tmp_path):
    shot = tmp_path / "first-screen.png"
    result = chromium(
        f"--screenshot={shot}", "--window-size=1280,900", "--hide-scrollbars", (report / "report.html").as_uri()
    )
    assert result.returncode == 0 and console_lines(result.stderr) == []
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24]) == (1280, 900)  # IHDR: width, height
    assert len(data) > 20_000  # text, tables and a figure, not a blank page
