"""How long ``circuitfind report`` takes, and what it writes, on a toy sweep and a real one.

    python benchmarks/bench_report.py [--quick] [--outputs DIR] [--repeats 3]

Builds (or reuses, when the run folder has its manifest) two sweeps and times ``circuitfind report RUN``
as a researcher runs it, in a fresh process (imports included):

- ``bench-report-toy``: toy-ioi, EAP and ACDC x STR x logit difference and KL, 8 prompts (seconds to build);
- ``bench-report``: SmolLM2-135M on IOI, EAP x STR and resample x logit difference and probability,
  noising, 8 prompts, ``--top-k 1000`` (70,651-edge graph, 1,000-edge circuits; minutes to build, once).
  ``--quick`` leaves it out.

Prints a table: the report's wall time (best of ``--repeats``) and CPU time, the page's size, its longest
inline list (table rows, list items, comma-separated items of a paragraph or cell; figures left out)
and the machine's load average while it ran (a report timed under load is slower than on an idle
machine). Goal: the SmolLM2 report in at most 5 s on an idle 2-core CPU, no inline list over 25.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import torch

GOAL_S = 5.0
MAX_LIST = 25
ROOT = Path(__file__).resolve().parents[1]
SWEEPS = {
    "bench-report-toy": [
        "--models", "toy-ioi", "--tasks", "ioi", "--algorithms", "eap", "acdc", "--corruptions", "str",
        "--metrics", "logit_diff", "kl", "--directions", "noise", "--prompts", "8",
    ],
    "bench-report": [
        "--models", "smollm2-135m", "--tasks", "ioi", "--algorithms", "eap", "--corruptions", "str", "resample",
        "--metrics", "logit_diff", "prob", "--directions", "noise", "--prompts", "8", "--top-k", "1000",
    ],
}  # fmt: skip


def inline_items(text: str) -> int:
    """Comma-separated items of a text, not counting a closing '... (N more in FILE)'."""
    return len([x for x in text.split(", ") if x.strip() and not x.strip().startswith("...")])


class InlineLists(HTMLParser):
    """Every list a reader meets in the page, outside figures, as ``(tag, items)``: rows of a table body,
    items of a list, comma-separated items of a paragraph or cell (``inline_items``). The report's tests
    count with it too (``tests/test_report_scale.py``)."""

    def __init__(self) -> None:
        super().__init__()
        self.lists: list[tuple[str, int]] = []
        self.stack: list[list] = []  # [tag, count or text]
        self.in_svg = 0

    @property
    def longest(self) -> int:
        return max((n for _, n in self.lists), default=0)

    def handle_starttag(self, tag, attrs):
        self.in_svg += tag == "svg"
        if self.in_svg:
            return
        if tag in ("tbody", "ul"):
            self.stack.append([tag, 0])
        elif tag in ("tr", "li") and self.stack and self.stack[-1][0] in ("tbody", "ul"):
            self.stack[-1][1] += 1
        elif tag in ("p", "td"):
            self.stack.append([tag, ""])

    def handle_endtag(self, tag):
        if tag == "svg":
            self.in_svg -= 1
        elif not self.in_svg and self.stack and self.stack[-1][0] == tag:
            kind, value = self.stack.pop()
            self.lists.append((kind, value if isinstance(value, int) else inline_items(value)))

    def handle_data(self, data):
        if not self.in_svg and self.stack and isinstance(self.stack[-1][1], str):
            self.stack[-1][1] += data


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "CIRCUITFIND_TORCH_THREADS": "1",
        "CIRCUITFIND_PROGRESS": "0",
    }


def build(run: str, outputs: Path) -> None:
    """The sweep, unless its run folder is finished (has its manifest)."""
    if (outputs / run / "manifest.json").is_file():
        return
    print(f"building {run} (once) ...", file=sys.stderr, flush=True)
    command = [sys.executable, "-m", "circuitfind", "sweep", *SWEEPS[run], "--torch-threads", "1"]
    subprocess.run([*command, "--run", run, "--outputs", str(outputs)], env=_env(), check=True)


def time_report(folder: Path, repeats: int) -> dict:
    """Best wall time of ``circuitfind report`` in a fresh process, its CPU time, and the load average."""
    best, cpu, loads = float("inf"), float("inf"), []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        loads.append(os.getloadavg()[0])
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "circuitfind", "report", str(folder)], env=_env(), check=True)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        loads.append(os.getloadavg()[0])
        best = min(best, wall)
        cpu = min(cpu, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    html = (folder / "report.html").read_text()
    parser = InlineLists()
    parser.feed(html)
    return {"wall": best, "cpu": cpu, "bytes": len(html.encode()), "longest": parser.longest, "load": max(loads)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the toy-ioi sweep only")
    p.add_argument("--outputs", type=Path, default=ROOT / "outputs", help="where the sweeps are built or found")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    runs = ["bench-report-toy"] if args.quick else ["bench-report-toy", "bench-report"]
    print(f"circuitfind report: best of {args.repeats}, fresh process, 1 torch thread, {os.cpu_count()} CPUs")
    print(f"GPU: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'not measured, no device lent'}")
    header = f"{'run':<20}{'settings':>9}{'wall s':>9}{'CPU s':>8}{'page KB':>9}{'longest list':>14}{'load':>7}"
    print(header)
    print("-" * len(header))
    for run in runs:
        build(run, args.outputs)
        folder = args.outputs / run
        r = time_report(folder, args.repeats)
        settings = len(list((folder / "circuits").glob("*.json")))
        print(
            f"{run:<20}{settings:>9}{r['wall']:>9.2f}{r['cpu']:>8.2f}{r['bytes'] / 1024:>9.0f}"
            f"{r['longest']:>14}{r['load']:>7.2f}"
        )
        if run == "bench-report":
            met = "met" if r["wall"] <= GOAL_S else "NOT met"
            print(f"  goal: <= {GOAL_S:.0f} s on an idle 2-core CPU: {met} (load average {r['load']:.1f} while timed)")
        print(f"  longest inline list <= {MAX_LIST}: {'met' if r['longest'] <= MAX_LIST else 'NOT met'}")


if __name__ == "__main__":
    main()
