"""Node activation patching and path patching, batched over prompts and over candidate patches.

Start reading at ``setup.py``: :func:`prepare` runs the clean and corrupted baselines of a batch
under a corruption and a metric and returns the :class:`PatchingSetup` that every patching method
(this package's sweeps, :mod:`circuitfind.edge_patching`, :mod:`circuitfind.methods.discover`) builds on.
Then, by need:

- ``node_patching.py``: :func:`run_patched` and the sweeps over blocks, heads and MLP windows;
- ``path_patching.py``: :func:`path_patch` from sender heads to :class:`PathReceiver` inputs or the logits;
- ``detection.py``: :func:`detect`, the ``k``-standard-deviation rule that picks components, and
  :func:`select`, the same with a top-k or an absolute threshold;
- ``result.py``: :class:`PatchResult`, the values of a sweep with its baselines;
- ``suffix.py``: passes that start from cached activations and run only what a patch can change;
- ``memory.py``: working-memory budgets of a pass (used by edge patching).

Directions: ``denoise`` runs the corrupted input and patches in clean activations (does this
component *suffice*?); ``noise`` runs the clean input and patches in corrupted (or ablated)
activations (is it *necessary*?).
"""

from circuitfind.names import BLOCK_HOOKS, EMBEDDING_STAGE, hook_name
from circuitfind.patching.detection import check_k, detect, effect_sign, impossible_sign, select
from circuitfind.patching.node_patching import (
    patch_block,
    patch_heads,
    patch_mlp_windows,
    run_patched,
    window_layers,
    window_sum_baseline,
)
from circuitfind.patching.path_patching import LOGITS, PathReceiver, path_patch
from circuitfind.patching.result import PatchResult
from circuitfind.patching.setup import (
    DIRECTIONS,
    ENGINES,
    Direction,
    PatchingSetup,
    answer_logits,
    check_direction,
    prepare,
)

__all__ = [
    "BLOCK_HOOKS",
    "DIRECTIONS",
    "EMBEDDING_STAGE",
    "ENGINES",
    "LOGITS",
    "Direction",
    "PatchResult",
    "PatchingSetup",
    "PathReceiver",
    "answer_logits",
    "check_direction",
    "check_k",
    "detect",
    "select",
    "effect_sign",
    "impossible_sign",
    "hook_name",
    "patch_block",
    "patch_heads",
    "patch_mlp_windows",
    "path_patch",
    "prepare",
    "run_patched",
    "window_layers",
    "window_sum_baseline",
]
