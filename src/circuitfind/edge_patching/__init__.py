"""Edge patching: any set of patched edges evaluated in one forward pass.

Start reading at :class:`EdgePatcher` (``patcher.py``): it takes a
:class:`~circuitfind.patching.PatchingSetup` and a :class:`~circuitfind.circuits.graph.ModelGraph`, and
:meth:`EdgePatcher.run` turns keep-masks into per-prompt metric values. Then, by need:

- ``engine.py``: the :class:`Engine` interface the patcher calls;
- ``hooks.py``: the ``hooks`` engine (the bridge with forward hooks; gradients, attribution);
- ``direct.py``: the ``functional`` engine (a hook-free masked pass on
  :class:`circuitfind.models.tensor_forward.TensorModel`);
- ``incremental.py``: ACDC's searches that edit a few edges at a time;
- ``prefix.py``: the forward pass below a starting point, shared by candidates.

During the forward pass every sender's output is kept, as the difference ``source - current``
between the activation patched in and the one this forward computed. Each receiver reads the
residual stream through its own copy (``hook_q_input`` / ``hook_k_input`` / ``hook_v_input`` /
``hook_mlp_in`` / the final ``hook_resid_post``), which is corrected by

    input_r += einsum((1 - mask[:, senders, r]), source_out - current_out)

over its upstream senders.

**The mask convention** (used by every API in circuitfind that takes or returns edge masks):
``mask = 1`` keeps an edge (the receiver sees the sender's value in the base run);
``mask = 0`` patches it (the receiver sees the source run's value). With the default ``noise``
direction the base run is the clean one and the source is the corrupted (or ablated) run, so
all-ones masks reproduce the clean run and all-zeros masks the corrupted run. Internally the
engines work with the dense complement ``patched = 1 - keep`` (``[candidates, senders, receivers]``).

Masks are ``[candidates, n_edges]`` (``[candidates, n_edges, pos]`` for per-position graphs),
bool or float; float masks are differentiable (EAP). Candidates are stacked on the batch axis and
evaluated together, as many rows per pass as the memory budget allows (:mod:`circuitfind.patching.memory`).

Two engines compute the same thing. ``hooks`` runs the ``TransformerBridge`` with the corrections
as forward hooks; it serves every architecture, gradients (EAP, EAP-IG), per-prompt and
per-position masks. ``functional`` (GPT-2 and Llama-style models) runs a hook-free copy of the
forward pass that starts at the first receiver whose edges differ, shares the work below it across
candidates and computes the last layer at the answer position only; the default ``auto`` uses it
for plain (no-gradient) evaluations where it applies. :meth:`EdgePatcher.incremental` serves
searches that edit a few edges at a time (ACDC): on the functional engine each candidate reruns
only the components its edit reaches.
"""

from circuitfind.edge_patching.engine import Engine
from circuitfind.edge_patching.incremental import IncrementalSearch
from circuitfind.edge_patching.patcher import EdgePatcher
from circuitfind.models.tensor_forward import UnsupportedModelError

__all__ = ["EdgePatcher", "Engine", "IncrementalSearch", "UnsupportedModelError"]
