"""Swap functions of an installed trainer for ours, and back (private).

A trainer module that did `from pkg.utils import f` holds its own reference to `f`: replacing
`pkg.utils.f` alone does not reach it. `Patcher.patch` therefore replaces the attribute in the
defining modules, then every attribute of every already-imported module of the trainer's
package that *is* one of the originals (by identity). Modules imported later read the patched
defining module. Function registries (a dict attribute of such a module, e.g. verl's
advantage estimators) have their entries swapped the same way. Objects built before the patch
(e.g. an engine that stored the function on `self`) keep the original: patch before building
the trainer.
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
                self._set(module, attr, ours)
        prefix = self.package + "."
        for name, module in list(sys.modules.items()):
            if module is None or not (name == self.package or name.startswith(prefix)):
                continue
            for attr, value in list(vars(module).items()):
                ours = swap.get(id(value))
                if ours is not None and value is not ours:
                    self._set(module, attr, ours)
                elif isinstance(value, dict):  # a registry of functions (verl's estimators)
                    for key, entry in list(value.items()):
                        ours = swap.get(id(entry))
                        if ours is not None and entry is not ours:
                            self._saved.append((value, key, entry))
                            value[key] = ours
        return self.replaced()

    def _set(self, module: object, attr: str, value: object) -> None:
        self._saved.append((module, attr, getattr(module, attr)))
        setattr(module, attr, value)

    def replaced(self) -> list[str]:
        return [
            f"{m.__name__}.{a}" if not isinstance(m, dict) else f"[{a!r}] of a registry"
            for m, a, _ in self._saved
        ]

    def unpatch(self) -> None:
        """Put every replaced attribute and registry entry back (in reverse order). A no-op when
        not patched."""
        while self._saved:
            holder, key, original = self._saved.pop()
            if isinstance(holder, dict):
                holder[key] = original
            else:
                setattr(holder, key, original)
