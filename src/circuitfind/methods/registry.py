"""The one table of discovery methods, and methods of a researcher's own.

Built-in methods are listed in :data:`BUILTIN` (name -> ``module:Class``). A method of your own is a
:class:`~circuitfind.methods.base.Method` subclass given by import path (``--algorithm
mypkg.mod:MyMethod``) or registered by an installed package under the entry-point group
:data:`ENTRY_POINT_GROUP` (``[project.entry-points."circuitfind.methods"] my_method =
"mypkg.mod:MyMethod"``). Everything that lists methods or their options (the commands' ``--help``
and choices, the sweep's config, option checks, cache keys, the report's method descriptions) reads
this module, so a method is declared once.
"""

from __future__ import annotations

import argparse
import importlib
import re
from functools import cache
from importlib.metadata import entry_points
from typing import Any, get_args

from pydantic import BaseModel, ConfigDict, ValidationError, create_model
from pydantic.fields import FieldInfo

from circuitfind.methods.base import Method, MethodOptions, OptionError, flag, one_line
from circuitfind.user_code import import_object, is_import_path, source_fingerprint

BUILTIN: dict[str, str] = {
    "acdc": "circuitfind.methods.acdc:ACDC",
    "eap": "circuitfind.methods.eap:EAP",
    "eap_ig": "circuitfind.methods.eap_ig:EAPIG",
    "eap_ig_act": "circuitfind.methods.eap_ig_act:EAPIGAct",
    "ifr": "circuitfind.methods.ifr:IFR",
    "edge_pruning": "circuitfind.methods.edge_pruning:EdgePruning",
    "ugs": "circuitfind.methods.ugs:UGS",
    "path_patching": "circuitfind.methods.iterative_path:PathPatching",
    "node": "circuitfind.methods.node:NodePatching",
    "atp": "circuitfind.methods.atp:AtP",
    "atp_star": "circuitfind.methods.atp:AtPStar",
}
ENTRY_POINT_GROUP = "circuitfind.methods"
_NAME = re.compile(r"[a-z][a-z0-9_]*")


class MethodError(ValueError):
    """A method name or import path that does not give a usable method."""


def _class(path: str) -> type[Method]:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


@cache
def _installed() -> dict[str, str]:
    """Methods registered by installed packages under :data:`ENTRY_POINT_GROUP` (name -> ``module:Class``)."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name not in BUILTIN}


def names() -> tuple[str, ...]:
    """The built-in methods' names, then the installed packages' (entry points)."""
    return (*BUILTIN, *sorted(_installed()))


def builtin() -> dict[str, type[Method]]:
    """Every built-in method class, by name."""
    return {name: _class(path) for name, path in BUILTIN.items()}


def default_metrics_help() -> str:
    """The built-in methods' default metrics, for ``--metric``'s help: ``kl for acdc; logit_diff for ...``."""
    from circuitfind.methods.base import FALLBACK_METRIC

    by_metric: dict[str, list[str]] = {}
    for name, method in builtin().items():
        by_metric.setdefault(method.default_metric, []).append(name)
    parts = [f"{metric} for {', '.join(methods)}" for metric, methods in by_metric.items()]
    return (
        f"{'; '.join(parts)}; {FALLBACK_METRIC} where a prompt has no wrong answer; "
        "a method of your own: its default_metric"
    )


def check_class(obj: Any, where: str) -> type[Method]:
    """``obj`` must be a :class:`Method` subclass with a plain ``name`` that no built-in method has, a
    ``paper``, a ``summary``, an ``Options`` class of :class:`MethodOptions` and a ``find``."""
    if not (isinstance(obj, type) and issubclass(obj, Method)):
        what = "a class" if isinstance(obj, type) else f"an object of type {type(obj).__name__}"
        raise MethodError(f"method {where!r} is {what}, not a subclass of circuitfind.methods.base.Method")
    for attr in ("name", "paper", "summary"):
        if not isinstance(getattr(obj, attr, None), str):
            raise MethodError(f"method {where!r} must set the class attribute {attr!r} (a string)")
    if not _NAME.fullmatch(obj.name):
        raise MethodError(f"method {where!r}: its name {obj.name!r} must be lower-case letters, digits and '_'")
    if obj.name in BUILTIN:  # its circuits would be labelled as the built-in method's in files and reports
        raise MethodError(f"method {where!r}: its name {obj.name!r} is taken by a built-in method")
    if not (isinstance(obj.Options, type) and issubclass(obj.Options, MethodOptions)):
        raise MethodError(f"method {where!r}: its Options must be a subclass of circuitfind.methods.base.MethodOptions")
    if obj.find is Method.find:
        raise MethodError(f"method {where!r} does not implement find()")
    return obj


def get_method(spec: str) -> type[Method]:
    """A method class from a built-in name, an installed package's entry-point name, or an import path
    ``package.module:Class``; :class:`MethodError` names what is wrong in one line."""
    if not isinstance(spec, str):
        raise MethodError(f"a method is named by a string, got {type(spec).__name__}")
    if spec in BUILTIN:
        return _class(BUILTIN[spec])
    if spec in _installed():
        return check_class(import_object(_installed()[spec], "method", MethodError), spec)
    if is_import_path(spec):
        return check_class(import_object(spec, "method", MethodError), spec)
    raise MethodError(f"unknown algorithm {spec!r}; choose from {', '.join(names())}, or give package.module:Class")


def method_fingerprint(spec: str) -> str | None:
    """A hash of an import-path method's source (its module and the user's modules it imports), for
    cache keys; ``None`` for built-in methods (the package's code fingerprint covers them)."""
    if spec in BUILTIN:
        return None
    path = _installed().get(spec, spec)
    return source_fingerprint(path.partition(":")[0]) if is_import_path(path) else None


@cache
def option_fields() -> dict[str, FieldInfo]:
    """Every built-in method's options, one field each: a name that two options classes define must be the
    same field (one mixin class), so no option is defined twice."""
    fields: dict[str, FieldInfo] = {}
    owner: dict[str, type] = {}
    for method in builtin().values():
        for cls in method.Options.__mro__:
            for name in getattr(cls, "__annotations__", {}):
                if name not in method.Options.model_fields:
                    continue
                if name in owner and owner[name] is not cls:
                    raise TypeError(f"option {name!r} is defined by both {owner[name].__name__} and {cls.__name__}")
                owner[name] = cls
                fields[name] = method.Options.model_fields[name]
    return fields


def option_users() -> dict[str, list[str]]:
    """Which built-in methods read each option (for ``--help``)."""
    users: dict[str, list[str]] = {name: [] for name in option_fields()}
    for name, method in builtin().items():
        for field in method.Options.model_fields:
            users[field].append(name)
    return users


@cache
def all_options() -> type[BaseModel]:
    """A pydantic model with every built-in option as a field (the sweep's config inherits it)."""
    fields: dict[str, Any] = {name: (info.annotation, info) for name, info in option_fields().items()}
    return create_model("MethodOptionFields", __config__=ConfigDict(extra="forbid"), **fields)


def check_values(values: dict[str, Any]) -> None:
    """Every option value given, whether or not the chosen method reads it (a given option is never
    ignored silently); :class:`~circuitfind.methods.base.OptionError` names the command line's option."""
    try:
        all_options()(**{k: v for k, v in values.items() if k in option_fields()})
    except ValidationError as err:
        raise OptionError(one_line(err)) from None


def value_type(annotation: Any) -> Any:
    """The value type of an option's annotation: ``int`` of ``int | None`` (``None``: the default only)."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    return args[0] if len(args) == 1 else annotation


def add_arguments(parser: argparse.ArgumentParser | Any, defaults: Any = None) -> None:
    """The methods' options on a command line (``discover``, ``sweep``, ``checkpoints``): one ``--flag``
    per option field, its aliases, type, default (``defaults``' value where given) and help, which
    names the methods that read it."""
    users = option_users()
    for name, info in option_fields().items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        aliases = [str(a) for a in extra.get("aliases", [])]  # type: ignore[union-attr]
        default = getattr(defaults, name, info.default)
        parser.add_argument(
            flag(name),
            *aliases,
            dest=name,
            type=value_type(info.annotation),  # int or float (of an optional option too)
            default=default,
            help=f"{info.description} ({', '.join(users[name])}; default: {default})",
        )
