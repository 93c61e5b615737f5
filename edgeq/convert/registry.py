"""The format registry, host side: every module of ``edgeq.convert`` that declares
``BACKEND = FormatBackend(...)`` builds one artifact format. A format is those two modules and nothing else:
this one, and its device runtime ``edgeq.device.runtimes.<name>``, whose module list is the list of format
names (``edgeq.names``); tests/test_convert_formats.py checks that the two sides name the same formats. The
capability table, the extras to check and the tool versions all come from the backends.

Backend modules import their heavy libraries inside ``build``, so finding them stays cheap.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil

from edgeq.convert.base import Capability, FormatBackend
from edgeq.names import format_names


@functools.cache
def backends() -> dict[str, FormatBackend]:
    """Format name -> its backend."""
    import edgeq.convert as package

    found: dict[str, FormatBackend] = {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        backend = getattr(module, "BACKEND", None)
        if isinstance(backend, FormatBackend):
            found[backend.name] = backend
    return found


def backend(name: str) -> FormatBackend:
    """The backend for format ``name``; KeyError when there is none."""
    return backends()[name]


def capabilities() -> tuple[Capability, ...]:
    """Every buildable (format, precision), formats by name."""
    return tuple(cap for name in format_names() if name in backends() for cap in backends()[name].capabilities)


def tool_distributions() -> dict[str, tuple[str, ...]]:
    """tool_versions key -> the distributions that provide it (first installed wins), over all formats."""
    merged: dict[str, tuple[str, ...]] = {}
    for b in backends().values():
        merged.update(b.tools)
    return merged
