"""MkDocs hooks: pages that are generated from the code, so they cannot drift from it.

* ``<!-- generated: cli -->`` becomes every command's ``--help`` (the ``circuitfind`` subcommands and
  the flow scripts), as a user's terminal prints it at 100 columns.
* ``<!-- generated: methods -->`` becomes one section per built-in method, read from
  :func:`circuitfind.methods.registry.builtin`: name, paper, summary, traits, the sign of its scores
  and its options (default, bounds, description).
* The docstrings' Sphinx roles (``:func:`x```, ``:class:`~a.b.C```), which mkdocstrings prints as
  they are, become plain code (``x``, ``C``).
* ``<!-- link: performance -->`` becomes a link to ``performance.md`` once that page exists (another
  part of issue 28 writes it), and the page joins the navigation; until then it is named as text.

The hooks import this checkout's ``src/`` first, so the site documents the code beside it and not an
installed copy.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

# What a method's edge scores mean, by name: the registry states what a method is, not how to read the
# sign of its numbers, so the reference says it here and a built-in method without an entry fails the build.
SIGNS: dict[str, str] = {
    "acdc": "each evaluated edge's change of the objective when it is removed (0 for edges never tried); "
    "edges whose removal moves the metric by less than `--acdc-tau` are pruned. Noising only.",
    "eap": "`-d metric / d mask` at the full model: the first-order change of the metric when the edge is "
    "patched. Noising: an important edge is negative; denoising: positive. Ranked by magnitude.",
    "eap_ig": "as EAP, with the gradient averaged along the path between the input embeddings of the two "
    "runs: noising negative, denoising positive for an important edge. Ranked by magnitude.",
    "eap_ig_act": "as EAP, the gradient averaged over masks `k / steps`: noising negative, denoising "
    "positive for an important edge; one step is EAP exactly. Ranked by magnitude.",
    "ifr": "non-negative importances (L1 proximity of the sender's write to the receiver's input, "
    "propagated from the logits); no sign and no corruption: the corruption only measures faithfulness.",
    "edge_pruning": "each edge's keep probability in [0, 1] after the mask optimisation: larger is more "
    "needed; no sign.",
    "ugs": "each edge's learned inclusion probability `sigmoid(theta)` in [0, 1]: larger is more needed; no sign.",
    "path_patching": "a circuit: an edge's score is its sender head's path-patching effect at its level "
    "(noising negative, denoising positive for a needed head); heads are kept by the k-SD rule, or by "
    "`--path-top-k` / `--path-threshold`.",
    "node": "a circuit: an edge's score is the node-patching effect of the head it feeds (into the logits: of "
    "the head it leaves); noising negative, denoising positive for a needed head; heads kept by the k-SD rule, "
    "or by `--node-top-k` / `--node-threshold`.",
    "atp": "a circuit of heads and MLPs: an edge's score is the AtP estimate of node patching (`patched - base`) "
    "of the component it feeds (into the logits: of the component it leaves); noising negative, denoising "
    "positive for a needed component; heads and MLPs ranked together by |estimate| (the same units).",
    "atp_star": "as AtP, with the QK fix and GradDrop; GradDrop's mean of magnitudes carries the "
    "QK-fixed estimate's sign.",
}


def _help(fn: Callable[[list[str]], Any], argv: list[str], prog: str) -> str:
    """What ``prog argv`` prints: argparse's help exits, so the exit is caught and stdout kept."""
    out = io.StringIO()
    old_argv0, old_columns = sys.argv[0], os.environ.get("COLUMNS")
    sys.argv[0], os.environ["COLUMNS"] = prog, "100"
    try:
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            fn(argv)
    finally:
        sys.argv[0] = old_argv0
        if old_columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old_columns
    return out.getvalue().rstrip()


def cli_reference() -> str:
    """Every command's ``--help``, one section each."""
    from circuitfind import cli
    from circuitfind.flows import checkpoints_flow, deploy, diff_flow, study_flow

    parser = cli.build_parser(sweep_options=False, method_options=False)
    commands = list(parser._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    sections = [("circuitfind", _help(cli.main, ["--help"], "circuitfind"))]
    sections += [(f"circuitfind {c}", _help(cli.main, [c, "--help"], "circuitfind")) for c in commands]
    for script, module in (
        ("flows/study.py", study_flow),
        ("flows/checkpoints.py", checkpoints_flow),
        ("flows/diff.py", diff_flow),
        ("flows/deploy.py", deploy),
    ):
        sections.append((f"python {script}", _help(module.main, ["--help"], script)))
    return "\n\n".join(f"## `{title}`\n\n```text\n{text}\n```" for title, text in sections)


def _cell(text: str) -> str:
    """Text for a Markdown table cell: a ``|`` would end the cell."""
    return text.replace("|", "\\|")


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _bounds(info: Any) -> str:
    parts = []
    for m in info.metadata:
        for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(m, attr, None) is not None:
                parts.append(f"{sym} {getattr(m, attr):,}")
    return ", ".join(parts) or "-"


def methods_reference() -> str:
    """One section per built-in method, from the registry."""
    from circuitfind.methods import registry
    from circuitfind.methods.base import flag

    missing = sorted(set(registry.BUILTIN) - set(SIGNS))
    if missing:
        raise ValueError(f"tools/docs_hooks.py: SIGNS has no sign convention for the method(s) {', '.join(missing)}")
    out = [
        "| method | paper | what |",
        "|---|---|---|",
        *(f"| [`{n}`](#{n}) | {_cell(m.paper)} | {_cell(m.summary)} |" for n, m in registry.builtin().items()),
    ]
    for name, method in registry.builtin().items():
        module = registry.BUILTIN[name].partition(":")[0]
        traits = [
            f"directions: {', '.join(method.directions)}",
            f"needs a corruption: {'yes' if method.needs_corruption else 'no (faithfulness only)'}",
            f"gradients: {'yes' if method.gradients else 'no'}",
            f"scores: {method.score}",
            f"default metric: `{method.default_metric}`",
            f"returns: {method.returns}",
            f"per-prompt scores: {'yes' if method.per_prompt else 'no'}",
            f"faithfulness curve: {'yes' if method.ranks_every_edge else 'no'}",
        ]
        out += [
            f"\n## {name}\n",
            f"**{_cap(method.summary)}.** Paper: {method.paper}. Module: `{module}` (class `{method.__name__}`).\n",
            f"**Sign of the scores.** {_cap(SIGNS[name])}\n",
            "Traits: " + "; ".join(traits) + ".\n",
        ]
        fields = method.Options.model_fields
        if fields:
            out += ["| option | default | bounds | what |", "|---|---|---|---|"]
            out += [
                f"| `{flag(f)}` | `{info.default!r}` | {_bounds(info)} | {_cell(info.description or '')} |"
                for f, info in fields.items()
            ]
        else:
            out.append("No options.")
    return "\n".join(out)


def performance_link(page_path: str, docs_dir: Path) -> str:
    if (docs_dir / "performance.md").exists():
        up = "../" * page_path.count("/")
        return f"[the performance notes]({up}performance.md)"
    return "the performance notes (`docs/performance.md`, being written in another part of issue 28)"


GENERATED: dict[str, Callable[[], str]] = {
    "<!-- generated: cli -->": cli_reference,
    "<!-- generated: methods -->": methods_reference,
}


def on_config(config: Any) -> Any:
    docs = Path(config["docs_dir"])
    nav = config.get("nav") or []
    if (docs / "performance.md").exists() and not any("Performance" in item for item in nav if isinstance(item, dict)):
        where = next((i for i, item in enumerate(nav) if isinstance(item, dict) and "Benchmarks" in item), len(nav))
        nav.insert(where + 1, {"Performance": "performance.md"})
    return config


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    for marker, make in GENERATED.items():
        if marker in markdown:
            markdown = markdown.replace(marker, make())
    if "<!-- link: performance -->" in markdown:
        link = performance_link(page.file.src_uri, Path(config["docs_dir"]))
        markdown = markdown.replace("<!-- link: performance -->", link)
    return markdown


ROLE = re.compile(r":(?:func|class|mod|meth|data|attr|exc|obj):<code>(~?)([^<]*)</code>")


def plain_roles(html: str) -> str:
    """``:func:<code>a.b</code>`` as ``<code>a.b</code>``; a ``~`` keeps the last name only, as Sphinx does."""
    return ROLE.sub(lambda m: f"<code>{m[2].rsplit('.', 1)[-1] if m[1] else m[2]}</code>", html)


def on_page_content(html: str, page: Any, config: Any, files: Any) -> str:
    return plain_roles(html)
