"""The ``circuitfind`` command line.

    circuitfind models                       # shipped toy models
    circuitfind tasks                        # task specs in tasks/
    circuitfind evaluate --model toy-ioi     # accuracy and clean/corrupted logit difference
    circuitfind patch --what heads --corruption gn --metric kl --direction noise
    circuitfind train toy-ioi                # rebuild a shipped toy model
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

PATCH_KINDS = ("heads", "heads_by_pos", "resid_pre", "attn_out", "mlp_out", "mlp_window", "path")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="shipped model, HF folder or hub name (default: the task's)")
    p.add_argument("--task", default="ioi", help="task name in tasks/ or a JSON path (default: ioi)")
    p.add_argument("-n", "--prompts", type=int, default=100, help="number of prompts (default: 100)")
    p.add_argument("--seed", type=int, default=0, help="prompt sampling seed")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")


def _load(args):
    from circuitfind.models import load_model
    from circuitfind.tasks import TaskBatch, load_task

    task = load_task(args.task)
    model = load_model(args.model or task.default_model or "toy-ioi", device=args.device)
    return model, TaskBatch.build(model, task, args.prompts, seed=args.seed)


def cmd_models(args) -> None:
    from circuitfind.models import shipped_models

    print("\n".join(shipped_models()))


def cmd_tasks(args) -> None:
    from circuitfind.tasks import available_tasks

    print("\n".join(available_tasks()))


def cmd_evaluate(args) -> None:
    from circuitfind.evaluation import evaluate

    model, batch = _load(args)
    report = evaluate(model, batch)
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.format())


def cmd_patch(args) -> None:
    from circuitfind import patching

    model, batch = _load(args)
    setup = patching.prepare(model, batch, args.corruption, args.metric, progress=True)
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
    print(f"{args.what} patching, {result.corruption} / {result.metric} / {result.direction}: "
          f"clean {result.clean:.4f}, corrupt {result.corrupt:.4f}; normalised values, axes {result.axes}")
    torch_print(result.normalised)
    sign = "positive" if args.direction == "denoise" else "negative"
    hits = patching.detect(result.effect, k=args.k, sign=sign)
    print(f"components >= {args.k} SD from the mean ({sign}): {hits}")
    if args.out:
        from circuitfind.io import write_json

        write_json(args.out, {**result.as_dict(), "detected": hits})
        print(f"wrote {args.out}")


def torch_print(t) -> None:
    import torch

    torch.set_printoptions(precision=3, sci_mode=False, linewidth=140)
    print(t)


def cmd_train(args) -> None:
    from circuitfind.zoo import train

    train.main([args.model] + (["--out", args.out] if args.out else []))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="circuitfind", description="Circuit discovery under many patching settings.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("models", help="list shipped toy models").set_defaults(fn=cmd_models)
    sub.add_parser("tasks", help="list task specs").set_defaults(fn=cmd_tasks)
    p = sub.add_parser("evaluate", help="accuracy and clean/corrupted baselines of a model on a task")
    _common(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(fn=cmd_evaluate)
    p = sub.add_parser("patch", help="node or path patching sweep")
    _common(p)
    p.add_argument("--what", choices=PATCH_KINDS, default="heads")
    p.add_argument("--corruption", default="str", help="str, str:<variant>, gn, mean, zero, resample")
    p.add_argument("--metric", default="logit_diff", help="logit_diff, prob, logprob, kl")
    p.add_argument("--direction", choices=("denoise", "noise"), default="denoise")
    p.add_argument("--window", type=int, default=1, help="MLP window size (mlp_window)")
    p.add_argument("--positions", nargs="*", default=None, help="key token names to patch at (mlp_window, path)")
    p.add_argument("-k", type=float, default=2.0, help="detection threshold in SDs (default 2)")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    p.set_defaults(fn=cmd_patch)
    p = sub.add_parser("train", help="retrain a shipped toy model deterministically")
    p.add_argument("model", help="toy-ioi, toy-induction or all")
    p.add_argument("--out", default=None, help="parent folder (default: the package's zoo/)")
    p.set_defaults(fn=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    from circuitfind.errors import USER_ERRORS

    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except USER_ERRORS as err:
        print(f"circuitfind: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
