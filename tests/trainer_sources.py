"""Load single module files of an RL trainer (verl, TRL, OpenRLHF) without its dependencies.

tests/test_integrations.py compares pg_kernels.integrations with the trainers' own functions.
Importing those packages the normal way pulls in ray, transformers, tensordict, deepspeed, ...
(minutes to install, GBs), none of which the compared functions use. Instead:

- the trainers are installed without dependencies into a folder that is NOT on sys.path
  (`.ci/setup.sh`: `pip install --no-deps --target .venv/trainers -r requirements-trainers.txt`;
  verl and OpenRLHF wheels ship top-level `tests` and `scripts` packages that must not shadow
  anything), found through `PGK_TRAINERS_DIR` or `<sys.prefix>/trainers`;
- the trainer's packages are registered as empty packages (their `__init__` files, which import
  everything, do not run), so that `import verl.utils.torch_functional` executes only that
  file and the submodules it imports;
- a missing third-party module the file imports at its top (transformers, tensordict, ...) is a
  stub whose attributes are permissive dummies and whose `is_*_available()` return False,
  while the files load only; a function that imports a missing module lazily (OpenRLHF's
  flash-attn path) therefore takes its fallback.

`TrainerSources.load` returns the modules; `close` removes the trainer's modules and the stubs
from sys.modules.
"""

from __future__ import annotations

import ast
import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import os
import sys
import types
from pathlib import Path

PINS = {"verl": "0.9.1", "trl": "1.16.0", "openrlhf": "0.11.2"}
INSTALL = "pip install --no-deps --target .venv/trainers -r requirements-trainers.txt"


class _Anything:
    """A stand-in for any class or value of a stubbed module: accepts any use at import time."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _Anything()

    def __getattr__(self, name):
        return _Anything()


class _StubModule(types.ModuleType):
    def __init__(self, name: str):
        super().__init__(name)
        self.__path__ = []

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        if name.startswith("is_") and name.endswith("_available"):
            value = lambda *args, **kwargs: False  # noqa: E731
        else:
            value = type(name, (_Anything,), {})
        setattr(self, name, value)
        return value


class _StubFinder:
    """Meta-path finder answering every import under `roots` with a stub module."""

    def __init__(self, roots: set[str]):
        self.roots = roots

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _StubModule(spec.name)

    def exec_module(self, module):
        pass


def trainers_dir() -> Path:
    return Path(os.environ.get("PGK_TRAINERS_DIR", Path(sys.prefix) / "trainers"))


def missing_reason(package: str) -> str | None:
    """Why `package` at its pinned version cannot be loaded from trainers_dir(); None if it can."""
    root = trainers_dir()
    want = PINS[package]
    if not (root / package).is_dir():
        return f"{package} {want} not installed in {root} ({INSTALL})"
    dists = [d for d in importlib.metadata.distributions(path=[str(root)]) if d.name == package]
    found = dists[0].version if dists else None
    if found != want:
        return f"{package} {found} in {root}, the tests pin {want} ({INSTALL})"
    return None


class TrainerSources:
    """Loads modules of one trainer package from trainers_dir(), see the module docstring."""

    def __init__(self, package: str, *, stubs: tuple[str, ...], keep_missing: tuple[str, ...]):
        """`stubs`: third-party roots to stub when not importable; `keep_missing`: roots that
        must stay missing after loading (lazy imports inside the compared functions)."""
        self.package = package
        self.root = trainers_dir() / package
        self.stub_roots = {
            r
            for r in stubs
            if isinstance(sys.modules.get(r), _StubModule) or importlib.util.find_spec(r) is None
        }
        self.keep_missing = keep_missing
        self._before = set(sys.modules)

    def _package(self, name: str) -> None:
        if name in sys.modules:
            return
        parts = name.split(".")
        module = types.ModuleType(name)
        module.__path__ = [str(self.root.joinpath(*parts[1:]))]
        sys.modules[name] = module
        if len(parts) > 1:
            setattr(sys.modules[".".join(parts[:-1])], parts[-1], module)

    def load(self, *names: str) -> list[types.ModuleType]:
        finder = _StubFinder(self.stub_roots)
        sys.meta_path.append(finder)
        try:
            modules = []
            for name in names:
                parts = name.split(".")
                for i in range(1, len(parts)):
                    self._package(".".join(parts[:i]))
                modules.append(importlib.import_module(name))
        finally:
            sys.meta_path.remove(finder)
        for name, module in list(sys.modules.items()):
            if isinstance(module, _StubModule) and name.split(".")[0] in self.keep_missing:
                del sys.modules[name]
        return modules

    def functions(self, relpath: str, names: tuple[str, ...], namespace: dict) -> dict:
        """The top-level functions `names` of one source file, compiled in `namespace` (for a
        file whose imports are too entangled to load, e.g. verl's core_algos)."""
        source = (self.root / relpath).read_text()
        tree = ast.parse(source)
        nodes = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names]
        if {n.name for n in nodes} != set(names):
            raise LookupError(f"{relpath}: functions {names} not all found")
        code = compile(ast.Module(body=nodes, type_ignores=[]), str(self.root / relpath), "exec")
        exec(code, namespace)  # noqa: S102 - the trainer's own source, pinned version
        return {n: namespace[n] for n in names}

    def close(self) -> None:
        """Remove the trainer's modules and the stubs (never other modules imported meanwhile:
        re-importing e.g. a torch module that registers ops would fail)."""
        for name, module in list(sys.modules.items()):
            if name in self._before:
                continue
            if name.split(".")[0] == self.package or isinstance(module, _StubModule):
                del sys.modules[name]
