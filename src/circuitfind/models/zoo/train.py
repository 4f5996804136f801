"""Deterministic training of the shipped toy models.

    python -m circuitfind.models.zoo.train toy-ioi        # rebuilds src/circuitfind/zoo/toy-ioi/
    python -m circuitfind.models.zoo.train toy-induction
    python -m circuitfind.models.zoo.train all --out /tmp/zoo
    python -m circuitfind.models.zoo.train toy-ioi --out /tmp/zoo --checkpoints 6   # + 6 checkpoints over training

Each model is a small GPT-2 (Hugging Face ``GPT2LMHeadModel``) with a word-level tokenizer built
from the task's word lists, trained on prompts sampled from ``tasks/<task>.json``. Training runs on
one CPU thread with fixed seeds, so the same torch version on the same CPU type rebuilds the same
weights, bit for bit. Another CPU type rounds the kernels differently: the weights differ a little
and the behaviour does not (toy-induction retrained on CI's machine: accuracy 1.0, logit diff 13.5494
against the shipped 13.5493).

With ``checkpoints=N`` the model is also saved at ``N`` evenly spaced step counts, from the
initialisation (step 0) to the last step, as HF folders ``<out>/checkpoints/step-NNNNN`` (each written
to a temporary folder and renamed into place) listed in ``<out>/checkpoints/checkpoints.json``.
Saving reads the weights only, so the final checkpoint is the final model, bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from circuitfind.checks import positive_int
from circuitfind.io import write_json, write_text
from circuitfind.tasks.batch import TaskSpec, generate_prompts, load_task

ZOO = Path(__file__).parent
SPECIAL = "<|endoftext|>"


@dataclass(frozen=True)
class Recipe:
    """Architecture and optimisation settings of one toy model."""

    task: str
    n_layer: int
    n_head: int
    n_embd: int
    steps: int
    batch: int = 128
    lr: float = 3e-3
    seed: int = 0
    answer_weight: float = 1.0  # weight of the answer-position loss relative to the LM loss


RECIPES = {
    "toy-ioi": Recipe(task="ioi", n_layer=3, n_head=4, n_embd=64, steps=2500),
    "toy-induction": Recipe(task="induction", n_layer=2, n_head=4, n_embd=64, steps=1500),
}


def task_words(spec: TaskSpec) -> list[str]:
    """Every word a task's prompts can contain, for the word-level vocabulary."""
    d = spec.data
    words: set[str] = set()
    for key in ("names", "places", "objects", "vocab"):
        words.update(d.get(key, []))
    for template in d.get("templates", []):
        words.update(w for w in re_words(template) if not w.startswith("["))
    return sorted(words)


def re_words(text: str) -> list[str]:
    import re

    return re.findall(r"\[[A-Z]+\]|\w+|[^\w\s]", text)


def build_tokenizer(words: list[str]):
    """A word-level fast tokenizer: whitespace and punctuation split, one id per word."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {SPECIAL: 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=SPECIAL, eos_token=SPECIAL, unk_token=SPECIAL, pad_token=SPECIAL
    )


def _training_batch(spec: TaskSpec, tokenizer, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids, padding mask and answer positions of ``n`` prompts followed by their answers."""
    prompts = generate_prompts(spec, n, seed)
    if spec.kind == "induction":  # train on complete repeats: every second-half token is an answer
        rows, answer_mask = [], []
        for p in prompts:
            first = p.text.split(" ")[: p.template]
            ids = [0] + tokenizer.convert_tokens_to_ids(first + first)
            rows.append(ids)
            answer_mask.append([0] * (len(first) + 1) + [1] * (len(first) - 1) + [0])
    else:
        rows, answer_mask = [], []
        for p in prompts:
            ids = [0] + tokenizer(p.text + " " + p.answer.strip(), add_special_tokens=False)["input_ids"]
            rows.append(ids)
            answer_mask.append([0] * (len(ids) - 2) + [1, 0])
    width = max(len(r) for r in rows)
    tokens = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    real = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=torch.bool)
    answers = torch.tensor([m + [0] * (width - len(m)) for m in answer_mask], dtype=torch.bool)
    return tokens, real, answers


def checkpoint_steps(total_steps: int, n: int) -> list[int]:
    """``n`` evenly spaced step counts from 0 (the initialisation) to ``total_steps`` (``n=1``: the end only)."""
    positive_int("checkpoints", n)
    if n > total_steps + 1:
        raise ValueError(
            f"checkpoints must be at most {total_steps + 1} (one per step count 0..{total_steps}), got {n}"
        )
    if n == 1:
        return [total_steps]
    return [round(i * total_steps / (n - 1)) for i in range(n)]


def save_atomically(model, tokenizer, folder: Path, extra: dict | None = None) -> Path:
    """Save an HF model and tokenizer (and ``training.json`` from ``extra``) so that ``folder`` is
    either absent, the old folder or the complete new one: written to a temporary sibling, then renamed."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if extra is not None:
            write_json(tmp / "training.json", extra)
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700 folders; models are meant to be shared
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def train(
    name: str,
    out_dir: Path | None = None,
    log_every: int = 250,
    checkpoints: int = 0,
    steps: int | None = None,
    until: int | None = None,
) -> dict:
    """Train toy model ``name`` and save it as an HF folder; return its evaluation summary.

    ``checkpoints``: also save that many evenly spaced checkpoints (:func:`checkpoint_steps`) under
    ``<out_dir>/checkpoints``. ``steps`` overrides the recipe's step count (a shorter run, for tests).
    ``until`` stops after that many steps of the full schedule: the checkpoints up to there are those
    of the full run, bit for bit, and no final model is saved (the summary holds no evaluation)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    recipe = RECIPES[name]
    if steps is not None:
        recipe = replace(recipe, steps=positive_int("steps", steps))
    save_at = checkpoint_steps(recipe.steps, checkpoints) if checkpoints else []
    if until is not None and not 0 <= until <= recipe.steps:
        raise ValueError(f"until must be in 0..{recipe.steps} (the recipe's steps), got {until}")
    if until is not None and not checkpoints:
        raise ValueError(
            "--until stops before the final model and saves only checkpoints: give --checkpoints N too "
            "(without it nothing would be written)"
        )
    stop = recipe.steps if until is None else until
    spec = load_task(recipe.task)
    out_dir = Path(out_dir or ZOO / name)
    torch.set_num_threads(1)
    torch.manual_seed(recipe.seed)
    random.seed(recipe.seed)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)

    tokenizer = build_tokenizer(task_words(spec))
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=32,
        n_embd=recipe.n_embd,
        n_layer=recipe.n_layer,
        n_head=recipe.n_head,
        n_inner=4 * recipe.n_embd,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    model = GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=recipe.steps, pct_start=0.1)
    start = time.time()
    saved: list[dict] = []

    def checkpoint(done: int) -> None:
        folder = save_atomically(
            model,
            tokenizer,
            out_dir / "checkpoints" / f"step-{done:05d}",
            {"step": done, "of_steps": recipe.steps, "recipe": asdict(recipe)},
        )
        saved.append({"step": done, "folder": folder.name})

    try:
        model.train()
        if 0 in save_at:
            checkpoint(0)
        for step in range(stop):
            tokens, real, answers = _training_batch(spec, tokenizer, recipe.batch, seed=10_000 + step)
            logits = model(tokens, attention_mask=real.long()).logits[:, :-1]
            targets = tokens[:, 1:]
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
            lm = (nll * real[:, 1:]).sum() / real[:, 1:].sum()
            ans_mask = answers[:, :-1]
            ans = (nll * ans_mask).sum() / ans_mask.sum()
            loss = lm + recipe.answer_weight * ans
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            if step + 1 in save_at:
                checkpoint(step + 1)
            if log_every and (step % log_every == 0 or step == recipe.steps - 1):
                print(
                    f"[{name}] step {step:5d}  lm {lm.item():.3f}  answer {ans.item():.4f}  {time.time() - start:.0f}s",
                    flush=True,
                )
        model.eval()
        summary = evaluate_hf(model, spec, tokenizer) if until is None else {"stopped_at": stop}
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
    if until is not None:
        if saved:
            write_json(
                out_dir / "checkpoints" / "checkpoints.json",
                {"model": name, "steps": recipe.steps, "checkpoints": saved},
            )
        return {**summary, "checkpoints": saved}
    summary.update(recipe=asdict(recipe), train_seconds=round(time.time() - start, 1), torch=torch.__version__)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=".model.", suffix=".tmp"))
    try:  # each file of the final model replaced atomically (the folder may hold checkpoints/)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for f in sorted(tmp.iterdir()):
            os.chmod(f, 0o644)
            os.replace(f, out_dir / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_text(out_dir / "training.json", json.dumps(summary, indent=2) + "\n")
    if saved:
        write_json(
            out_dir / "checkpoints" / "checkpoints.json", {"model": name, "steps": recipe.steps, "checkpoints": saved}
        )
    print(f"[{name}] saved to {out_dir}: {json.dumps({k: summary[k] for k in ('accuracy', 'logit_diff')})}")
    return summary


@torch.no_grad()
def evaluate_hf(model, spec: TaskSpec, tokenizer, n: int = 500, seed: int = 12345) -> dict:
    """Top-1 accuracy and mean logit difference r - r' of an HF model on fresh prompts."""
    prompts = generate_prompts(spec, n, seed)
    correct, diffs = 0, []
    for p in prompts:
        ids = torch.tensor([[0] + tokenizer(p.text, add_special_tokens=False)["input_ids"]])
        logits = model(ids).logits[0, -1]
        r = tokenizer.convert_tokens_to_ids(p.answer.strip())
        r2 = tokenizer.convert_tokens_to_ids(p.counter_answer.strip())
        correct += int(logits.argmax().item() == r)
        diffs.append((logits[r] - logits[r2]).item())
    return {"accuracy": correct / n, "logit_diff": sum(diffs) / n, "n_eval": n}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=[*RECIPES, "all"])
    parser.add_argument("--out", type=Path, default=None, help="parent folder (default: the package's zoo/)")
    parser.add_argument(
        "--checkpoints",
        type=int,
        default=None,
        help="also save N evenly spaced checkpoints, step 0 to the last, in <out>/<model>/checkpoints/",
    )
    parser.add_argument("--steps", type=int, default=None, help="train this many steps instead of the recipe's")
    parser.add_argument(
        "--until",
        type=int,
        default=None,
        help="stop after this many steps of the schedule (checkpoints only, no final model)",
    )
    args = parser.parse_args(argv)
    if args.checkpoints is not None:
        positive_int("checkpoints", args.checkpoints)
    for name in RECIPES if args.model == "all" else [args.model]:
        train(
            name,
            (args.out / name) if args.out else None,
            checkpoints=args.checkpoints or 0,
            steps=args.steps,
            until=args.until,
        )


if __name__ == "__main__":
    main()
