"""The circuit explorer page of a run folder: its size, the time to write it, and in headless Chromium
(Selenium with Debian's chromium-driver) the time until it is interactive and the time of a re-render.

    python benchmarks/bench_explorer.py outputs/<run> [--compare outputs/<run B>] [--loads 3]

"interactive" is the page's script having drawn the first view (``window.circuitExplorer.readyAt``, from
the navigation's start); "top-k 3000" and "compare" are the time of one size change and of one switch to
the comparison. Prints one table row per page.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from circuitfind.reports.explorer import write_explorer


def browser_times(page: Path, loads: int) -> dict[str, float] | None:
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        return None
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    try:
        ready = []
        for _ in range(loads):
            driver.get(page.as_uri())
            ready.append(driver.execute_script("return window.circuitExplorer.readyAt"))
        change = (
            "var t = performance.now(); var m = document.getElementById('mode'); m.value = arguments[0];"
            "m.dispatchEvent(new Event('change')); if (arguments[1]) { var r = document.getElementById('size');"
            "r.value = arguments[1]; r.dispatchEvent(new Event('input')); } return performance.now() - t;"
        )
        topk = driver.execute_script(change, "topk", 3000)
        compare = driver.execute_script(change, "compare", 0)
    finally:
        driver.quit()
    return {"ready": statistics.median(ready), "topk": topk, "compare": compare}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a sweep run folder or circuit file")
    p.add_argument("--compare", default=None, help="a second run folder or circuit file")
    p.add_argument("--loads", type=int, default=3, help="page loads (the median is shown)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "explorer.html"
        start = time.perf_counter()
        write_explorer(args.run, page, args.compare)
        written = time.perf_counter() - start
        times = browser_times(page, args.loads)
        size = page.stat().st_size / 2**20
    cells = [f"{size:.2f}", f"{written:.1f}"]
    cells += [f"{times[k]:.0f}" for k in ("ready", "topk", "compare")] if times else ["(no chromium)"] * 3
    print("| page | MiB | write s | interactive ms | top-k 3000 ms | compare ms |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {Path(args.run).name}{' + ' + Path(args.compare).name if args.compare else ''} | "
        + " | ".join(cells)
        + " |"
    )


if __name__ == "__main__":
    main()
