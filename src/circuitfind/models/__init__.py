"""Stage 1, the model: loading folders and hub names as TransformerLens bridges with per-head hooks
(:mod:`~circuitfind.models.loading`), models by name (:mod:`~circuitfind.models.catalogue`), registry
models fetched offline (:mod:`~circuitfind.models.fetch`), the GPT-2 tokenizer built offline
(:mod:`~circuitfind.models.bpe`), a model's components as tensor functions
(:mod:`~circuitfind.models.tensor_forward`) and the shipped and known-answer models (:mod:`~circuitfind.models.zoo`)."""

from circuitfind.models.catalogue import load_model

__all__ = ["load_model"]
