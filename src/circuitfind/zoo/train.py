"""Deterministic training of the shipped toy models.

    python -m circuitfind.zoo.train toy-ioi        # rebuilds src/circuitfind/zoo/toy-ioi/
    python -m circuitfind.zoo.train toy-induction
    python -m circuitfind.zoo.train all --out /tmp/zoo

Each model is a small GPT-2 (Hugging Face ``GPT2LMHeadModel``) with a word-level tokenizer built
from the task's word lists, trained on prompts sampled from ``tasks/<task>.json``. Training runs on
one CPU thread with fixed seeds, so the same torch version rebuilds the same weights.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from circuitfind.tasks import TaskSpec, generate_prompts, load_task

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
            ids = [0] + tokenizer(p.text + " " + p.answer, add_special_tokens=False)["input_ids"]
            rows.append(ids)
            answer_mask.append([0] * (len(ids) - 2) + [1, 0])
    width = max(len(r) for r in rows)
    tokens = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    real = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=torch.bool)
    answers = torch.tensor([m + [0] * (width - len(m)) for m in answer_mask], dtype=torch.bool)
    return tokens, real, answers


def train(name: str, out_dir: Path | None = None, log_every: int = 250) -> dict:
    """Train toy model ``name`` and save it as an HF folder; return its evaluation summary."""
    from transformers import GPT2Config, GPT2LMHeadModel

    recipe = RECIPES[name]
    spec = load_task(recipe.task)
    out_dir = Path(out_dir or ZOO / name)
    torch.set_num_threads(1)
    torch.manual_seed(recipe.seed)
    random.seed(recipe.seed)
    torch.use_deterministic_algorithms(True)

    tokenizer = build_tokenizer(task_words(spec))
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=32, n_embd=recipe.n_embd, n_layer=recipe.n_layer,
        n_head=recipe.n_head, n_inner=4 * recipe.n_embd, activation_function="gelu_new",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    model = GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=recipe.steps, pct_start=0.1)
    start = time.time()
    model.train()
    for step in range(recipe.steps):
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
        if log_every and (step % log_every == 0 or step == recipe.steps - 1):
            print(f"[{name}] step {step:5d}  lm {lm.item():.3f}  answer {ans.item():.4f}  {time.time() - start:.0f}s", flush=True)
    model.eval()
    summary = evaluate_hf(model, spec, tokenizer)
    summary.update(recipe=asdict(recipe), train_seconds=round(time.time() - start, 1), torch=torch.__version__)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
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
        r = tokenizer.convert_tokens_to_ids(p.answer)
        r2 = tokenizer.convert_tokens_to_ids(p.counter_answer)
        correct += int(logits.argmax().item() == r)
        diffs.append((logits[r] - logits[r2]).item())
    return {"accuracy": correct / n, "logit_diff": sum(diffs) / n, "n_eval": n}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=[*RECIPES, "all"])
    parser.add_argument("--out", type=Path, default=None, help="parent folder (default: the package's zoo/)")
    args = parser.parse_args(argv)
    for name in RECIPES if args.model == "all" else [args.model]:
        train(name, (args.out / name) if args.out else None)


if __name__ == "__main__":
    main()
