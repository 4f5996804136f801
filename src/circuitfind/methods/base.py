"""What a discovery method is: its name, paper, typed options, what it needs and what it returns.

A method is a subclass of :class:`Method` registered in :mod:`circuitfind.methods.registry` (or given
by import path, ``--algorithm mypkg.mod:MyMethod``, or an installed package's ``circuitfind.methods``
entry point). Its options are a pydantic model (:class:`MethodOptions`): each field is one option,
with its default, bounds and help text, and the command line's ``--flag`` is the field's name with
dashes (``top_k`` is ``--top-k``). Options that several methods share (``top_k``) are one field of
one mixin class, so no option is defined twice.

A method's :meth:`Method.find` takes a :class:`~circuitfind.patching.PatchingSetup`, a direction and
its options, and returns a :class:`Found`: the circuit, and per-prompt edge scores where the method
gives them. :func:`circuitfind.methods.discover.discover` checks the options, runs the method and
measures the circuit's faithfulness.

This module imports no torch: the commands read the options and traits of every method for their
``--help`` without loading a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

if TYPE_CHECKING:
    import torch

    from circuitfind.circuits.circuit import Circuit
    from circuitfind.patching.setup import PatchingSetup

Direction = Literal["noise", "denoise"]

# The default metric of a task without wrong answers (logit_diff needs one): the log-probability of the
# correct answers, whose gradient does not vanish at the clean run either.
FALLBACK_METRIC = "logprob"


class MethodOptions(BaseModel):
    """A method's options: one pydantic field per option (default, bounds, ``description`` as help)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class TopK(MethodOptions):
    top_k: int = Field(20, ge=1, strict=True, description="edges kept in the circuit (its top-|score| edges)")


class IGSteps(MethodOptions):
    # 1,000 is 200x the default: 100,000 steps ran until killed (a hostile or mistyped value).
    ig_steps: int = Field(5, ge=1, le=1000, strict=True, description="integrated-gradient steps")


class PruneSteps(MethodOptions):
    # 500x the default, hours on a CPU; 10**9 steps would run for years.
    prune_steps: int = Field(200, ge=1, le=100_000, strict=True, description="mask optimisation steps")


def flag(field: str) -> str:
    """The command line's option for an options field: ``top_k`` is ``--top-k``."""
    return "--" + field.replace("_", "-")


class OptionError(ValueError):
    """An option's value is out of its bounds or of the wrong type (one line naming the option)."""


def one_line(err: ValidationError) -> str:
    """A pydantic error as one line per field, each naming the command line's option."""
    parts = []
    for e in err.errors():
        name = flag(str(e["loc"][0])) if e.get("loc") else "option"
        ctx = e.get("ctx") or {}
        kind = e["type"]
        if kind == "greater_than_equal":
            rule = f"must be >= {ctx['ge']}"
        elif kind == "greater_than":
            rule = f"must be > {ctx['gt']}"
        elif kind == "less_than_equal":
            rule = f"must be at most {ctx['le']:,}"
        elif kind == "finite_number":
            rule = "must be finite"
        elif kind.startswith("int_"):
            rule = "must be a whole number"
        elif kind.startswith("float_"):
            rule = "must be a number"
        else:
            rule = e["msg"].lower()
        parts.append(f"{name} {rule} (got {e.get('input')!r})")
    return "; ".join(parts)


@dataclass
class Found:
    """What :meth:`Method.find` returns: the circuit, and per-prompt edge scores ``[n_edges, prompts]``
    when asked for and the method gives them (``Method.per_prompt``)."""

    circuit: Circuit
    per_prompt: torch.Tensor | None = None


class Method:
    """A circuit discovery method. Subclasses set the class attributes and implement :meth:`find`.

    * ``name``: the name on the command line and in setting names (letters, digits, ``_``);
    * ``paper``: the paper the method's definition comes from;
    * ``summary``: one line for ``--help`` and the report;
    * ``Options``: its :class:`MethodOptions` subclass;
    * ``needs_corruption``: whether the circuit depends on the corrupted run (IFR: no, the corruption
      only measures faithfulness);
    * ``gradients``: whether it backpropagates through the model;
    * ``directions``: the patching directions it runs in;
    * ``score``: ``exact`` (patched runs), ``estimated`` (first-order or learned estimates) or ``none``;
    * ``returns``: ``scores`` (every edge scored, the circuit is the top k), ``circuit`` (a search's
      circuit only) or ``both`` (a circuit and scores of the edges it evaluated);
    * ``per_prompt``: whether it can give per-prompt edge scores (bootstrap intervals);
    * ``ranks_every_edge``: whether its scores rank every edge, so a faithfulness curve applies;
    * ``default_metric``: the metric the commands use when ``--metric`` is not given. ``logit_diff``
      (Wang et al. 2022) unless the method's paper says otherwise: its gradient does not vanish at the
      clean run, where KL's does (KL is 0 there, its minimum), so first-order methods that linearise
      at the clean run (EAP, AtP, noising) score every edge 0 under ``kl``. A task whose prompts lack a
      wrong answer falls back to :data:`FALLBACK_METRIC` (:func:`circuitfind.methods.discover.default_metric`).
    """

    name: ClassVar[str]
    paper: ClassVar[str]
    summary: ClassVar[str]
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    needs_corruption: ClassVar[bool] = True
    gradients: ClassVar[bool] = False
    directions: ClassVar[tuple[str, ...]] = ("noise", "denoise")
    score: ClassVar[Literal["exact", "estimated", "none"]] = "exact"
    returns: ClassVar[Literal["scores", "circuit", "both"]] = "scores"
    per_prompt: ClassVar[bool] = False
    ranks_every_edge: ClassVar[bool] = True
    default_metric: ClassVar[str] = "logit_diff"

    def find(self, setup: PatchingSetup, direction: Direction, options: Any, per_prompt: bool = False) -> Found:
        raise NotImplementedError

    @classmethod
    def keeps_top_k(cls) -> bool:
        """Whether ``--top-k`` bounds the circuit's size."""
        return "top_k" in cls.Options.model_fields

    @classmethod
    def options(cls, values: dict[str, Any] | MethodOptions | None = None) -> MethodOptions:
        """This method's options from ``values`` (names of other methods' options are left out);
        :class:`OptionError` names the command line's option of a bad value."""
        if isinstance(values, cls.Options):
            return values
        if isinstance(values, MethodOptions):
            values = values.model_dump()
        own = {k: v for k, v in (values or {}).items() if k in cls.Options.model_fields}
        try:
            return cls.Options(**own)
        except ValidationError as err:
            raise OptionError(one_line(err)) from None

    @classmethod
    def check_direction(cls, direction: str) -> None:
        if direction not in ("noise", "denoise"):
            raise ValueError(f"unknown direction {direction!r}; choose from noise, denoise")
        if direction not in cls.directions:
            raise ValueError(f"{cls.name} runs in the {' and '.join(cls.directions)} direction only, not {direction!r}")
