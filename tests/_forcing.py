"""The plain-forward reference for teacher-forced answers, shared by the multi-token tests."""

import torch

from circuitfind.tasks.batch import encode


def forced_log_prob(model, prompt: str, answer: str, clean_prompt: str | None = None) -> float:
    """log p(answer | prompt) from one plain forward pass of the prompt and the answer's tokens, taken as
    they continue ``clean_prompt`` (default ``prompt``; a corrupted prompt is fed the clean answer's
    tokens: teacher forcing)."""
    clean_prompt = clean_prompt or prompt
    head_clean, full_clean = encode(model, clean_prompt), encode(model, clean_prompt + answer)
    assert full_clean[: len(head_clean)] == head_clean  # the answer starts at a token boundary
    head = encode(model, prompt)
    full = head + full_clean[len(head_clean) :]
    with torch.no_grad():
        logprobs = model(torch.tensor([full])).float().log_softmax(-1)[0]
    return sum(logprobs[k - 1, full[k]].item() for k in range(len(head), len(full)))
