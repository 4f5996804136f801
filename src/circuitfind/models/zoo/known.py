"""Known-answer models: transformers whose circuit is known by construction (hand-set weights).

Three models, each loadable by name through :mod:`circuitfind.models.catalogue` and each writing its edge
sets to ``known_circuit.json`` beside the weights (:data:`KNOWN_TRUTH` has them by name):

* ``known-induction`` (:func:`build_induction_model`): previous-token + induction head among
  distractors; truth :data:`INDUCTION_TRUTH`.
* ``known-suppress`` (:func:`build_suppression_model`): the answer reaches the logits through an
  MLP, and a negative head suppresses it; truth :data:`SUPPRESSION_TRUTH`.
* ``known-backup`` (:func:`build_backup_model`): a backup head that takes over only when the main
  head is patched; truth :data:`BACKUP_TRUTH` (:data:`BACKUP_MAIN_TRUTH` is what is active in the
  full model).

All run the induction task at accuracy 1.0. :func:`build_induction_model` writes a 2-layer GPT-2 (HF format, the induction task's tokenizer)
whose residual stream is split into one-hot subspaces:

    TOK (token)  POS (position)  PREV (previous token)  OUT (answer)  JUNK_1..JUNK_6 (distractors)

* ``a0.0`` is a previous-token head: it attends from position i to i-1 (q and k read POS) and
  copies that token (v reads TOK) into PREV.
* ``a1.0`` is an induction head: its query (current token, TOK) matches keys whose PREV holds the
  same token, and it copies the token found there (v reads TOK) into OUT, which the unembedding reads.
* Distractors: ``a0.1``-``a0.3`` attend to their own position and copy the token into
  JUNK_1..3; ``a1.1``-``a1.3`` copy JUNK_1..3 onwards into JUNK_4..6. They compute
  token-dependent values along their own chain of edges, but nothing reads it. MLPs are zero.

Every subspace holds exactly one one-hot vector per position, so the LayerNorm scales are the same
whatever is patched, and an edge outside the circuit has no effect at all.

:data:`INDUCTION_TRUTH` lists the edges that carry token information to the answer. The previous-token
head's q/k edges carry positions only, which are identical in clean and corrupted runs, so no
patching experiment can see them; they are in :data:`INDUCTION_STRUCTURAL` but not in the truth.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from circuitfind.models.zoo.train import build_tokenizer, task_words
from circuitfind.tasks.batch import load_task

INDUCTION_TRUTH = [
    ("input", "a0.0<v>"),
    ("a0.0", "a1.0<k>"),
    ("input", "a1.0<q>"),
    ("input", "a1.0<v>"),
    ("a1.0", "logits"),
]
INDUCTION_STRUCTURAL = INDUCTION_TRUTH + [("input", "a0.0<q>"), ("input", "a0.0<k>")]
DISTRACTOR_HEADS = ["a0.1", "a0.2", "a0.3", "a1.1", "a1.2", "a1.3"]


def _set_head(
    t: Any,
    layer: int,
    h: int,
    d_head: int,
    V: int,
    sharpness: float,
    q_from: tuple[int, int],
    k_from: tuple[int, int],
    v_from: int,
    out_to: int,
    out_scale: float,
    q_shift: int = 0,
) -> None:
    """Set one head: q/k read one-hot blocks (k offset by q_shift), v copies a V-block to out_to."""
    d_model = t.wte.weight.shape[1]
    W = t.h[layer].attn.c_attn.weight  # [d_model, 3 * d_model], x @ W
    O = t.h[layer].attn.c_proj.weight  # [d_model, d_model]
    q0, k0, v0 = h * d_head, d_model + h * d_head, 2 * d_model + h * d_head
    (qb, qn), (kb, kn) = q_from, k_from
    for i in range(qn):
        W[qb + i, q0 + i] = sharpness
    for i in range(kn):
        if 0 <= i + q_shift < d_head:
            W[kb + i, k0 + i + q_shift] = 1.0
    for i in range(V):
        W[v_from + i, v0 + i] = 1.0
        O[h * d_head + i, out_to + i] = out_scale


def _one_hot_gpt2(V: int, P: int, d_model: int, *, n_layer: int, n_head: int, n_inner: int, tok: int, pos: int):
    """A GPT-2 with every weight zero but the one-hot token (at ``tok``) and position (at ``pos``)
    embeddings and unit LayerNorm scales: the skeleton every known-answer model sets its heads in."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=V,
        n_positions=P,
        n_embd=d_model,
        n_layer=n_layer,
        n_head=n_head,
        n_inner=n_inner,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        t: Any = model.transformer
        for i in range(V):
            t.wte.weight[i, tok + i] = 1.0
        for i in range(P):
            t.wpe.weight[i, pos + i] = 1.0
        for ln in [t.ln_f] + [b.ln_1 for b in t.h] + [b.ln_2 for b in t.h]:
            ln.weight.fill_(1.0)
    return model


def build_induction_model(folder: str | Path, sharpness: float = 2.0, unembed_scale: float = 4.0) -> Path:
    """Write the hand-set induction model to ``folder`` (an HF GPT-2 folder) and return it."""
    folder = Path(folder)
    tokenizer = build_tokenizer(task_words(load_task("induction")))
    V, P, H, n_distract = len(tokenizer), 24, 4, 3
    n_subspace_dims = 3 * V + P + 2 * n_distract * V  # TOK, PREV, OUT, POS, JUNK blocks
    d_head = max(V, P + 1, -(-n_subspace_dims // H))
    d_model = H * d_head
    TOK, POS = 0, V
    PREV, OUT = POS + P, POS + P + V
    JUNK = [OUT + V + i * V for i in range(2 * n_distract)]
    if JUNK[-1] + V > d_model:
        raise ValueError("subspaces do not fit: increase d_head")
    model = _one_hot_gpt2(V, P, d_model, n_layer=2, n_head=H, n_inner=4, tok=TOK, pos=POS)
    with torch.no_grad():
        t: Any = model.transformer  # a GPT-2 transformer: typed as a Module by torch

        # LayerNorm multiplies the residual by ~sqrt(d_model / number of one-hot blocks); head outputs
        # divide that back out so that every block holds a one-hot of norm ~1.
        ln_scale = [(d_model / 2) ** 0.5, (d_model / (3 + n_distract)) ** 0.5]

        def head(layer, h, q_from, k_from, v_from, out_to, q_shift=0):
            _set_head(t, layer, h, d_head, V, sharpness, q_from, k_from, v_from, out_to, 1.0 / ln_scale[layer], q_shift)

        # layer 0: previous-token head (query i matches key j where j + 1 = i), distractors attend to themselves
        head(0, 0, (POS, P), (POS, P), TOK, PREV, q_shift=1)
        for h in range(1, n_distract + 1):
            head(0, h, (POS, P), (POS, P), TOK, JUNK[h - 1])
        # layer 1: induction head (current token vs previous token of the key), distractor chain
        head(1, 0, (TOK, V), (PREV, V), TOK, OUT)
        for h in range(1, n_distract + 1):
            head(1, h, (POS, P), (POS, P), JUNK[h - 1], JUNK[n_distract + h - 1])
        for tok in range(1, V):  # never predict BOS
            model.lm_head.weight[tok, OUT + tok] = unembed_scale
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "known_circuit.json").write_text(
        json.dumps(
            {
                "task": "induction",
                "truth": INDUCTION_TRUTH,
                "structural": INDUCTION_STRUCTURAL,
                "distractors": DISTRACTOR_HEADS,
            },
            indent=2,
        )
        + "\n"
    )
    return folder


SUPPRESSION_TRUTH = [
    ("input", "a0.0<v>"),
    ("a0.0", "a1.0<k>"),
    ("input", "a1.0<q>"),
    ("input", "a1.0<v>"),
    ("a1.0", "m1"),
    ("m1", "logits"),
    ("a0.0", "a1.1<k>"),
    ("input", "a1.1<q>"),
    ("input", "a1.1<v>"),
    ("a1.1", "logits"),
]
SUPPRESSION_STRUCTURAL = SUPPRESSION_TRUTH + [("input", "a0.0<q>"), ("input", "a0.0<k>")]
SUPPRESSION_DISTRACTORS = ["a0.1", "a0.2", "a0.3", "a1.2", "a1.3"]
NEGATIVE_HEAD = "a1.1"


def build_suppression_model(
    folder: str | Path, sharpness: float = 2.0, unembed_scale: float = 1.0, negative_scale: float = 0.4
) -> Path:
    """Write the hand-set induction model with a negative head and an MLP path (``known-suppress``).

    The layout is :func:`build_induction_model`'s, with two changes:

    * the answer reaches the logits only through an MLP: the induction head ``a1.0`` copies the
      token into OUT, and ``m1`` (one GELU unit per token, reading OUT) rewrites it into MLP_OUT,
      the block the unembedding reads with weight ``+unembed_scale``;
    * ``a1.1`` is a negative head: the same attention as the induction head (current token vs the
      keys' previous token, copy the token found) but written into NEG, which the unembedding reads
      with weight ``-negative_scale``. It suppresses the answer (as copy-suppression heads do,
      McDougall et al. 2023), so patching it *raises* the logit difference.

    Distractors ``a0.1``-``a0.3`` copy their own token into JUNK_1..3 and ``a1.2``, ``a1.3`` copy
    JUNK_1..2 onwards; nothing reads them. ``m0`` is zero. Every block holds one one-hot vector per
    position, so LayerNorm scales do not depend on what is patched and edges outside
    :data:`SUPPRESSION_TRUTH` have no effect. The answer keeps a margin of
    ``unembed_scale - negative_scale`` (times the final LayerNorm scale, ~6.3), so accuracy is 1.0.
    The scales are small on purpose: the answer's probability is ~0.5, not 1, so KL to the full
    model still sees the negative head (a saturated softmax would hide it from ``kl``).
    """
    if not unembed_scale > negative_scale > 0:
        raise ValueError("need unembed_scale > negative_scale > 0 for the answer to win")
    folder = Path(folder)
    tokenizer = build_tokenizer(task_words(load_task("induction")))
    V, P, H = len(tokenizer), 24, 4
    n_subspace_dims = 10 * V + P  # TOK, POS, PREV, OUT, NEG, MLP_OUT, JUNK_1..5
    d_head = max(V, P + 1, -(-n_subspace_dims // H))
    d_model = H * d_head
    TOK, POS = 0, V
    PREV = POS + P
    OUT, NEG, MLP_OUT = PREV + V, PREV + 2 * V, PREV + 3 * V
    JUNK = [PREV + (4 + i) * V for i in range(5)]
    model = _one_hot_gpt2(V, P, d_model, n_layer=2, n_head=H, n_inner=V, tok=TOK, pos=POS)
    with torch.no_grad():
        t: Any = model.transformer  # a GPT-2 transformer: typed as a Module by torch
        # LayerNorm scales by ~sqrt(d_model / number of one-hot blocks) (2 blocks into layer 0, 6 into
        # layer 1's heads, 10 into m1); writers divide it back out so each block keeps norm ~1.
        s0, s1, s_mlp = (d_model / 2) ** 0.5, (d_model / 6) ** 0.5, (d_model / 10) ** 0.5

        def head(layer, h, q_from, k_from, v_from, out_to, scale, q_shift=0):
            _set_head(t, layer, h, d_head, V, sharpness, q_from, k_from, v_from, out_to, scale, q_shift)

        head(0, 0, (POS, P), (POS, P), TOK, PREV, 1 / s0, q_shift=1)  # previous-token head
        for h in range(1, 4):
            head(0, h, (POS, P), (POS, P), TOK, JUNK[h - 1], 1 / s0)
        head(1, 0, (TOK, V), (PREV, V), TOK, OUT, 1 / s1)  # induction head
        head(1, 1, (TOK, V), (PREV, V), TOK, NEG, 1 / s1)  # negative head
        for h in (2, 3):
            head(1, h, (POS, P), (POS, P), JUNK[h - 2], JUNK[h + 1], 1 / s1)
        # m1: unit j fires (gelu(3) ~ 3) when OUT holds token j and stays ~0 otherwise
        gain = 3.0
        mlp = t.h[1].mlp
        for tok in range(V):
            mlp.c_fc.weight[OUT + tok, tok] = gain / s_mlp
            mlp.c_proj.weight[tok, MLP_OUT + tok] = 1.0 / gain
        for tok in range(1, V):  # never predict BOS
            model.lm_head.weight[tok, MLP_OUT + tok] = unembed_scale
            model.lm_head.weight[tok, NEG + tok] = -negative_scale
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "known_circuit.json").write_text(
        json.dumps(
            {
                "task": "induction",
                "truth": SUPPRESSION_TRUTH,
                "structural": SUPPRESSION_STRUCTURAL,
                "distractors": SUPPRESSION_DISTRACTORS,
                "negative_heads": [NEGATIVE_HEAD],
            },
            indent=2,
        )
        + "\n"
    )
    return folder


BACKUP_MAIN_TRUTH = [
    ("input", "a0.0<v>"),
    ("a0.0", "a1.0<k>"),
    ("input", "a1.0<q>"),
    ("input", "a1.0<v>"),
    ("a1.0", "logits"),
]
BACKUP_TRUTH = BACKUP_MAIN_TRUTH + [
    ("a1.0", "a2.0<q>"),  # the main head's answer switches the backup off
    ("input", "a2.0<q>"),
    ("a0.0", "a2.0<k>"),
    ("input", "a2.0<k>"),
    ("input", "a2.0<v>"),
    ("a2.0", "logits"),
]
BACKUP_STRUCTURAL = BACKUP_TRUTH + [("input", "a0.0<q>"), ("input", "a0.0<k>")]
BACKUP_DISTRACTORS = ["a0.1", "a1.1", "a2.1"]
BACKUP_HEAD = "a2.0"


def build_backup_model(folder: str | Path, sharpness: float = 2.0, unembed_scale: float = 1.0) -> Path:
    """Write a 3-layer hand-set induction model with a backup head (``known-backup``).

    * ``a0.0`` previous-token head (as in :func:`build_induction_model`), ``a1.0`` the main
      induction head, writing the answer into OUT (read by the unembedding).
    * ``a2.0`` is a backup induction head (the backup name movers of Wang et al. 2023 in miniature):
      its score for key j is ``match(current token, PREV_j) - match(OUT, TOK_j)`` plus a constant
      bonus for the BOS position. While the main head has written the answer into OUT, the answer's
      position is vetoed and the backup attends to BOS, whose value (the BOS token) no logit reads;
      once the main head's output is patched, the veto is gone and the backup copies the answer
      into BAK, which the unembedding reads like OUT.

    In the clean and corrupted runs alike the backup is silent, so patching it alone does nothing
    (node patching scores it 0), and patching the main head shows only part of its effect. ACDC,
    which removes edges one at a time from the full model, prunes the backup path for the same
    reason. :data:`BACKUP_MAIN_TRUTH` is the path active in the full model; :data:`BACKUP_TRUTH`
    adds the backup path and the main head's veto edge. Distractors ``a0.1`` -> ``a1.1`` -> ``a2.1``
    copy tokens along their own chain into JUNK blocks nobody reads.
    """
    folder = Path(folder)
    tokenizer = build_tokenizer(task_words(load_task("induction")))
    V, P, H = len(tokenizer), 24, 2
    n_subspace_dims = 7 * V + P  # TOK, POS, PREV, OUT, BAK, JUNK_1..3
    d_head = max(2 * V + 1, P + 1, -(-n_subspace_dims // H))
    d_model = H * d_head
    TOK, POS = 0, V
    PREV = POS + P
    OUT, BAK = PREV + V, PREV + 2 * V
    JUNK = [PREV + (3 + i) * V for i in range(3)]
    model = _one_hot_gpt2(V, P, d_model, n_layer=3, n_head=H, n_inner=4, tok=TOK, pos=POS)
    with torch.no_grad():
        t: Any = model.transformer  # a GPT-2 transformer: typed as a Module by torch
        # one-hot blocks into each layer's heads: 2, 4 (+PREV, JUNK_1), 6 (+OUT, JUNK_2)
        scale = [(d_model / n) ** -0.5 for n in (2, 4, 6)]

        def head(layer, h, q_from, k_from, v_from, out_to, sharp=sharpness, q_shift=0):
            _set_head(t, layer, h, d_head, V, sharp, q_from, k_from, v_from, out_to, scale[layer], q_shift)

        head(0, 0, (POS, P), (POS, P), TOK, PREV, q_shift=1)  # previous-token head
        head(0, 1, (POS, P), (POS, P), TOK, JUNK[0])
        head(1, 0, (TOK, V), (PREV, V), TOK, OUT)  # main induction head
        head(1, 1, (POS, P), (POS, P), JUNK[0], JUNK[1])
        # backup: induction match (3 x sharpness), veto where TOK_j is in OUT (-3 x), BOS bonus (1.5 x)
        head(2, 0, (TOK, V), (PREV, V), TOK, BAK, sharp=3 * sharpness)
        W = t.h[2].attn.c_attn.weight
        q0, k0 = 0, d_model  # head 0
        for i in range(V):
            W[OUT + i, q0 + V + i] = -3 * sharpness
            W[TOK + i, k0 + V + i] = 1.0
        for i in range(P):  # every position holds one POS one-hot: a constant query
            W[POS + i, q0 + 2 * V] = 1.5 * sharpness
        W[POS + 0, k0 + 2 * V] = 1.0
        head(2, 1, (POS, P), (POS, P), JUNK[1], JUNK[2])
        for tok in range(1, V):  # never predict BOS
            model.lm_head.weight[tok, OUT + tok] = unembed_scale
            model.lm_head.weight[tok, BAK + tok] = unembed_scale
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "known_circuit.json").write_text(
        json.dumps(
            {
                "task": "induction",
                "truth": BACKUP_TRUTH,
                "active_in_full_model": BACKUP_MAIN_TRUTH,
                "structural": BACKUP_STRUCTURAL,
                "distractors": BACKUP_DISTRACTORS,
                "backup_heads": [BACKUP_HEAD],
            },
            indent=2,
        )
        + "\n"
    )
    return folder


# True edge sets by catalogue name (what a discovery method should recover on each model's task).
KNOWN_TRUTH: dict[str, list[tuple[str, str]]] = {
    "known-induction": INDUCTION_TRUTH,
    "known-suppress": SUPPRESSION_TRUTH,
    "known-backup": BACKUP_TRUTH,
}
