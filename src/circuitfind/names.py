"""The vocabulary of circuitfind: node names of the edge graph and TransformerLens hook names,
formatted *and* parsed here only.

Nodes (senders and the components receivers feed):

- ``input``: the embeddings (the residual stream entering block 0);
- ``a{l}.{h}``: attention head ``h`` of layer ``l``;
- ``a{l}.g{g}``: key/value group ``g`` of layer ``l`` (grouped-query attention; its heads share k and v);
- ``m{l}``: the MLP of layer ``l``;
- ``logits``: the final residual stream.

Receivers (the inputs edges end at): ``a{l}.{h}<q>`` / ``<k>`` / ``<v>`` (a head's q, k, v input),
``a{l}.g{g}<k>`` / ``<v>`` (a group's shared k, v input), ``a{l}.{h}`` (a merged q/k/v input),
``m{l}`` and ``logits``.

Hooks: :func:`hook_name` gives TransformerLens hook names (``blocks.{l}.hook_resid_pre``,
``blocks.{l}.attn.hook_z``, ...), :func:`parse_hook` reads them back.

Edge masks follow one convention everywhere, documented in :mod:`circuitfind.edge_patching`:
1 = keep (the receiver sees the base run's value), 0 = patch (it sees the source run's value).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

INPUT, LOGITS = "input", "logits"
QKV = ("q", "k", "v")

EMBEDDING_STAGE = ("hook_embed", "hook_pos_embed")  # hooks below block 0: their effect is in its residual input
BLOCK_HOOKS = {
    "resid_pre": "hook_resid_pre",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
    "resid_post": "hook_resid_post",
}
_ATTN_HOOKS = ("z", "result", "pattern")
_INPUT_HOOKS = ("q_input", "k_input", "v_input", "mlp_in")


# -- nodes ------------------------------------------------------------------------------------
def head_name(layer: int, head: int) -> str:
    return f"a{layer}.{head}"


def mlp_name(layer: int) -> str:
    return f"m{layer}"


def kv_group_name(layer: int, group: int) -> str:
    """A grouped-query attention key/value group, e.g. ``a1.g0`` (its heads share k and v)."""
    return f"a{layer}.g{group}"


def attention_layer_name(layer: int) -> str:
    """All heads of layer ``layer`` drawn as one node (``a1.*``): the collapsed view of a drawing, not a graph node."""
    return f"a{layer}.*"


def receiver_node(node: str, which: str) -> str:
    """Name of a head's (or group's) q/k/v input node, e.g. ``a1.2<q>``."""
    return f"{node}<{which}>"


_NODE = re.compile(r"a(\d+)\.(\d+)|a(\d+)\.g(\d+)|m(\d+)")
_RECEIVER = re.compile(r"(.+)<([qkv])>")


@dataclass(frozen=True)
class Node:
    """A parsed node or receiver name: ``kind`` is ``input``, ``head``, ``group``, ``mlp`` or
    ``logits``; ``index`` the head or group (-1 otherwise); ``input`` the q/k/v input of a receiver
    name (``None`` for the node itself). ``input`` has layer -1, ``logits`` layer ``None``."""

    kind: str
    layer: int | None
    index: int = -1
    input: str | None = None


def parse_node(name: str) -> Node:
    """Read a node or receiver name (see the module docstring); ``ValueError`` for anything else."""
    which = None
    match = _RECEIVER.fullmatch(name)
    if match:
        name, which = match.group(1), match.group(2)
    if name == INPUT and which is None:
        return Node("input", -1)
    if name == LOGITS and which is None:
        return Node("logits", None)
    m = _NODE.fullmatch(name)
    if m is None or (which is not None and m.group(5) is not None):
        raise ValueError(f"not a node name: {name if which is None else receiver_node(name, which)!r}")
    if m.group(1) is not None:
        return Node("head", int(m.group(1)), int(m.group(2)), which)
    if m.group(3) is not None:
        return Node("group", int(m.group(3)), int(m.group(4)), which)
    return Node("mlp", int(m.group(5)))


def is_head(name: str) -> bool:
    """Whether ``name`` is an attention head's node (``a{l}.{h}``)."""
    match = _NODE.fullmatch(name)
    return match is not None and match.group(1) is not None


def head_sort_key(name: str) -> tuple[int, int]:
    """``(layer, head)`` of a head's node name, for sorting heads in model order."""
    node = parse_node(name)
    if node.kind != "head" or node.input is not None:
        raise ValueError(f"not a head: {name!r}")
    return node.layer, node.index


# -- hooks ------------------------------------------------------------------------------------
def hook_name(layer: int, what: str) -> str:
    """TransformerLens hook names: ``resid_pre``, ``attn_out``, ``mlp_out``, ``resid_post``, ``z``, ``q_input``, ``mlp_in``, ..."""
    if what in BLOCK_HOOKS:
        return f"blocks.{layer}.{BLOCK_HOOKS[what]}"
    if what in _ATTN_HOOKS:
        return f"blocks.{layer}.attn.hook_{what}"
    if what in _INPUT_HOOKS:
        return f"blocks.{layer}.hook_{what}"
    raise ValueError(f"unknown activation {what!r}")


_HOOK = re.compile(r"blocks\.(\d+)\.(?:attn\.)?hook_(\w+)")


def parse_hook(name: str) -> tuple[int, str] | None:
    """``(layer, what)`` of a block hook name made by :func:`hook_name` (``None`` for any other
    name, e.g. the embedding stage's)."""
    match = _HOOK.fullmatch(name)
    if match is None:
        return None
    layer, what = int(match.group(1)), match.group(2)
    return (layer, what) if hook_name(layer, what) == name else None
