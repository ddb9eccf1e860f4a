"""Swap functions of an installed trainer for ours, and back (private).

A trainer module that did `from pkg.utils import f` holds its own reference to `f`: replacing
`pkg.utils.f` alone does not reach it. `Patcher.patch` therefore replaces the attribute in the
defining modules, then every attribute of every already-imported module of the trainer's
package that *is* one of the originals (by identity). Modules imported later read the patched
defining module, and so bind ours: `unpatch` sweeps the package's modules again and puts the
original back wherever one of ours is bound. Function registries (a dict attribute of such a
module, e.g. verl's advantage estimators) have their entries swapped the same way. Objects built
before the patch (e.g. an engine that stored the function on `self`) keep the original: patch
before building the trainer.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable


class Patcher:
    """Patches one trainer package; `unpatch` restores exactly what `patch` replaced."""

    def __init__(self, package: str, targets: dict[str, dict[str, Callable]]):
        """`targets`: defining module name -> {attribute name: replacement}."""
        self.package = package
        self.targets = targets
        self._saved: list[tuple[object, str, object]] = []
        self._originals: dict[int, tuple[Callable, object]] = {}  # id(ours) -> (ours, original)

    @property
    def patched(self) -> bool:
        return bool(self._saved)

    def patch(self) -> list[str]:
        """Replace the targets; returns the `module.attr` names replaced. Idempotent."""
        if self._saved:
            return self.replaced()
        swap: dict[int, Callable] = {}
        for mod_name, attrs in self.targets.items():
            try:
                module = importlib.import_module(mod_name)
            except ImportError as e:
                if mod_name == next(iter(self.targets)):
                    raise ImportError(
                        f"pg_kernels.integrations: cannot import {mod_name} ({e}); is "
                        f"{self.package} installed with its dependencies?"
                    ) from e
                continue  # an optional module of the trainer (e.g. needs triton)
            for attr, ours in attrs.items():
                if not hasattr(module, attr):
                    continue
                original = getattr(module, attr)
                swap[id(original)] = ours
                self._originals[id(ours)] = (ours, original)
                self._set(module, attr, ours)
        for holder, key, value in self._bindings():
            ours = swap.get(id(value))
            if ours is not None and value is not ours:
                self._set(holder, key, ours)
        return self.replaced()

    def _bindings(self):
        """(holder, key, value) of every attribute of the imported modules of the trainer's
        package, and of every entry of their dict attributes (registries of functions, e.g.
        verl's estimators)."""
        prefix = self.package + "."
        for name, module in list(sys.modules.items()):
            if module is None or not (name == self.package or name.startswith(prefix)):
                continue
            for attr, value in list(vars(module).items()):
                yield module, attr, value
                if isinstance(value, dict):
                    for key, entry in list(value.items()):
                        yield value, key, entry

    @staticmethod
    def _put(holder: object, key: str, value: object) -> None:
        if isinstance(holder, dict):
            holder[key] = value
        else:
            setattr(holder, key, value)

    def _set(self, holder: object, key: str, value: object) -> None:
        current = holder[key] if isinstance(holder, dict) else getattr(holder, key)
        self._saved.append((holder, key, current))
        self._put(holder, key, value)

    def replaced(self) -> list[str]:
        return [
            f"{m.__name__}.{a}" if not isinstance(m, dict) else f"[{a!r}] of a registry"
            for m, a, _ in self._saved
        ]

    def unpatch(self) -> None:
        """Put every replaced attribute and registry entry back (in reverse order), then every
        binding of ours made since (a module imported while patched). A no-op when not
        patched."""
        while self._saved:
            self._put(*self._saved.pop())
        for holder, key, value in self._bindings():
            entry = self._originals.get(id(value))
            if entry is not None and entry[0] is value:  # one of ours, not a reused id
                self._put(holder, key, entry[1])
        self._originals.clear()
