"""Run a callback right after a module has been imported (a post-import hook), without importing it.

Our plugin is loaded by ``import verl`` in every veRL process, but most of those processes (vLLM
servers, agent-loop and reward workers) never touch veRL's trainer. Registering our trainer mode
eagerly meant importing veRL's whole v1 trainer and engines (~1,500 modules, ~150 MB) in each of
them. Instead the plugin asks, through :func:`when_imported`, to register each name right after
veRL itself executes the module that holds the registry, i.e. before anything can look the name
up there. A module that is already imported gets its callbacks at once.

Mechanism: one finder at the front of ``sys.meta_path`` that answers only for watched module
names. It asks the other finders for the real spec and wraps the spec's loader so that
``exec_module`` runs the module's own code, puts the original loader back on the module
(``__loader__``, ``__spec__.loader``: nothing else sees the wrapper) and then runs the callbacks.
A callback never fails veRL's import: errors go to ``on_error`` (the plugin records them for
``verl-selflock doctor``) and the module is left importable.

Stdlib only and nothing from our package: this module is imported while ``import verl`` runs.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

__all__ = ["is_imported", "pending", "run_pending", "when_imported"]

Callback = Callable[[ModuleType], Any]
ErrorHandler = Callable[[str, BaseException], Any]

_LOCK = threading.RLock()
_HOOKS: dict[str, list[tuple[Callback, ErrorHandler | None]]] = {}
"""Module name -> callbacks still to run (removed once run)."""


def _initialized(module: ModuleType) -> bool:
    spec = getattr(module, "__spec__", None)
    return not getattr(spec, "_initializing", False)


def is_imported(name: str) -> bool:
    """Module ``name`` is in ``sys.modules`` and has finished executing."""
    module = sys.modules.get(name)
    return module is not None and _initialized(module)


def when_imported(name: str, callback: Callback, on_error: ErrorHandler | None = None) -> bool:
    """Call ``callback(module)`` once, right after module ``name`` has executed.

    Returns True when the module was already imported and the callback ran now, False when it is
    deferred until veRL (or anyone) imports ``name``.
    """
    _install()
    module = sys.modules.get(name)
    if module is not None and _initialized(module):
        _call(name, module, callback, on_error)
        return True
    with _LOCK:
        _HOOKS.setdefault(name, []).append((callback, on_error))
    return False


def pending() -> list[str]:
    """Names of the watched modules whose callbacks have not run yet."""
    with _LOCK:
        return sorted(name for name, hooks in _HOOKS.items() if hooks)


def run_pending() -> list[str]:
    """Run the callbacks of watched modules that are imported by now (e.g. imported before the
    finder was installed, or through a loader we could not wrap). Returns their names."""
    ran = []
    for name in pending():
        module = sys.modules.get(name)
        if module is not None and _initialized(module):
            _fire(name, module)
            ran.append(name)
    return ran


def _call(name: str, module: ModuleType, callback: Callback, on_error: ErrorHandler | None) -> None:
    try:
        callback(module)
    except Exception as err:  # noqa: BLE001  (never break the import of a veRL module)
        if on_error is not None:
            on_error(name, err)


def _fire(name: str, module: ModuleType) -> None:
    with _LOCK:
        hooks = _HOOKS.pop(name, [])
    for callback, on_error in hooks:
        _call(name, module, callback, on_error)


class _HookedLoader(importlib.abc.Loader):
    """The real loader, plus the callbacks of ``name`` after its ``exec_module``."""

    def __init__(self, name: str, loader: Any) -> None:
        self._name = name
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = self._loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        _fire(self._name, module)

    def __getattr__(self, attr: str) -> Any:  # get_source, get_resource_reader, is_package, ...
        return getattr(self._loader, attr)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Answers only for watched names, with the spec the other finders give and a hooked loader."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        with _LOCK:
            if not _HOOKS.get(fullname):
                return None
        for finder in sys.meta_path:
            if finder is self or isinstance(finder, _PostImportFinder):
                continue
            find_spec = getattr(finder, "find_spec", None)
            if find_spec is None:
                continue
            spec = find_spec(fullname, path, target)
            if spec is None:
                continue
            if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _HookedLoader(fullname, spec.loader)
            return spec
        return None


_FINDER = _PostImportFinder()


def _install() -> None:
    with _LOCK:
        if not any(isinstance(finder, _PostImportFinder) for finder in sys.meta_path):
            sys.meta_path.insert(0, _FINDER)
