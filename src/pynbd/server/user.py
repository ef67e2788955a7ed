"""Load a backend written by the user: ``MODULE:NAME`` or ``FILE.py:NAME``.

``NAME`` (dotted for nested attributes) is a callable — usually a
:class:`~pynbd.server.backend.Backend` or
:class:`~pynbd.server.backend.AsyncBackend` subclass, or a factory function — called
with the ``KEY=VALUE`` arguments as keyword arguments (values are strings) and
returning a backend. The interface and an example are in :mod:`.backend`.

A spec names a file when the part before the last colon ends in ``.py`` or contains a
``/``; the file is loaded as a module named ``pynbd_user_<stem>``. Otherwise it is a
module name, imported as usual (from ``sys.path``: the current directory under
``python -m pynbd``, else ``PYTHONPATH``).
"""

from __future__ import annotations

import importlib
import importlib.util
import keyword
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .backend import AnyBackend, AsyncBackend, Backend

__all__ = ["load_backend", "load_factory", "parse_arguments"]


def parse_arguments(args: Sequence[str]) -> dict[str, str]:
    """``["size=1M", "name=x"]`` -> ``{"size": "1M", "name": "x"}``.

    Raises:
        ValueError: an argument is not ``KEY=VALUE`` with KEY a Python identifier, or a
            key is repeated.
    """
    out: dict[str, str] = {}
    for arg in args:
        key, eq, value = arg.partition("=")
        if not eq or not key.isidentifier() or keyword.iskeyword(key):
            raise ValueError(f"backend argument {arg!r} is not KEY=VALUE")
        if key in out:
            raise ValueError(f"backend argument {key!r} is given twice")
        out[key] = value
    return out


def load_factory(spec: str) -> Callable[..., Any]:
    """The callable that ``MODULE:NAME`` or ``FILE.py:NAME`` names.

    Raises:
        ValueError: the spec is malformed, or the module, file or name cannot be found
            or loaded (the cause is chained).
    """
    where, colon, name = spec.rpartition(":")
    if not colon or not where or not name:
        raise ValueError(f"{spec!r} is not MODULE:NAME or FILE.py:NAME")
    if not all(part.isidentifier() for part in name.split(".")):
        raise ValueError(f"{name!r} in {spec!r} is not a Python name")
    module = _load_file(where) if where.endswith(".py") or "/" in where else _import(where)
    obj: Any = module
    for part in name.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"{where} has no {name!r}") from None
    if not callable(obj):
        raise ValueError(f"{spec} is not a class or function")
    return obj  # type: ignore[no-any-return]


def load_backend(spec: str, args: Sequence[str] | Mapping[str, str] = ()) -> AnyBackend:
    """Load ``spec`` (see :func:`load_factory`) and call it with ``args``.

    Args:
        spec: ``MODULE:NAME`` or ``FILE.py:NAME``.
        args: ``KEY=VALUE`` strings, or a mapping, passed as keyword arguments.

    Returns:
        The backend the callable returned.

    Raises:
        ValueError: the spec or an argument is malformed, loading failed, the call
            failed (its exception is chained), or it returned something that is not a
            Backend or AsyncBackend.
    """
    kwargs = dict(args) if isinstance(args, Mapping) else parse_arguments(args)
    factory = load_factory(spec)
    shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    try:
        backend = factory(**kwargs)
    except Exception as exc:
        raise ValueError(f"{spec}({shown}) failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(backend, Backend | AsyncBackend):
        raise ValueError(
            f"{spec}({shown}) returned {type(backend).__name__}, not a Backend or AsyncBackend"
        )
    return backend


def _import(name: str) -> Any:
    if not all(part.isidentifier() for part in name.split(".")):
        raise ValueError(f"{name!r} is not a module name (a file must end in .py)")
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and name.startswith(exc.name):
            raise ValueError(
                f"no module named {name!r} (put its directory in PYTHONPATH, "
                "or give the file: PATH.py:NAME)"
            ) from exc
        raise ValueError(f"cannot import {name}: {exc}") from exc
    except Exception as exc:
        raise ValueError(f"cannot import {name}: {type(exc).__name__}: {exc}") from exc


def _load_file(path: str) -> Any:
    if not os.path.isfile(path):
        raise ValueError(f"no such file: {path}")
    stem = os.path.splitext(os.path.basename(path))[0]
    name = "pynbd_user_" + "".join(c if c.isalnum() else "_" for c in stem)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    # Registered first, as import does: dataclasses and pickle look modules up.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise ValueError(f"cannot load {path}: {type(exc).__name__}: {exc}") from exc
    return module
