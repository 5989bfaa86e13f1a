"""Which build of mqttd runs: the hot-path modules compiled with mypyc, or pure Python.

``setup.py`` compiles :data:`COMPILED_MODULES` with mypyc when it can (``pip install .`` or
``pip install -e .`` with a working C compiler, unless ``MQTTD_PURE_PYTHON=1``), and keeps
them interpreted otherwise; the ``.py`` files are always installed too. An extension module
wins over a ``.py`` file of the same name on import, so an editable install whose ``.py`` was
edited after the build would still run the old compiled code: the build records a hash of
each compiled source (:data:`HASHES_FILE`, next to this file) and :func:`stale` names the
modules whose source no longer matches (``make`` rebuilds them, the test suite refuses to run
with any).

Standard library only, and runnable as a file (``python mqttd/build_info.py --sources``
prints the compiled modules' source files, for the Makefile), so that ``setup.py`` can read
the list without importing mqttd. ``python -m mqttd.build_info`` says which build runs.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
import json
import os
import sys

#: The modules compiled with mypyc, chosen by instruction counts (docs/COMPILED.md): the
#: decoder, the wire primitives (with the 3.1.1 PUBLISH encoder), the 5.0 properties and
#: acks, topic validation, the topic trie and the router. ``mqttd.codec.packets`` (frozen
#: attrs classes with ClassVar, ``__class__`` assignment) stays interpreted, and so does
#: ``mqttd.outqueue``: compiled, its hold + next took 10,750 instructions instead of 8,502
#: (its attrs classes and the interpreted Delivery cost more from native code).
COMPILED_MODULES: tuple[str, ...] = (
    "mqttd.codec.wire",
    "mqttd.codec.decoder",
    "mqttd.codec.decoder5",
    "mqttd.codec.properties",
    "mqttd.codec.acks",
    "mqttd.topics",
    "mqttd.trie",
    "mqttd.router",
)

#: Written by the build next to this file: {"mypy": version, "modules": {name: sha256}}.
HASHES_FILE = "_compiled.json"

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def source_path(module: str, root: str | None = None) -> str:
    """The ``.py`` file of ``module`` under ``root`` (the directory holding ``mqttd``; by
    default the one this module is in)."""
    return os.path.join(root or _ROOT, *module.split(".")) + ".py"


def source_hash(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def is_compiled(module: str) -> bool:
    """Whether ``module`` (imported if need be) was loaded from an extension module."""
    origin = getattr(importlib.import_module(module), "__file__", None) or ""
    return origin.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def compiled() -> list[str]:
    """The modules of :data:`COMPILED_MODULES` that run compiled in this process."""
    return [module for module in COMPILED_MODULES if is_compiled(module)]


def stale() -> list[str]:
    """The compiled modules whose ``.py`` changed since they were built (or that have no
    recorded hash): the extension module runs, not the source you see."""
    modules = compiled()
    if not modules:
        return []
    try:
        with open(os.path.join(_ROOT, "mqttd", HASHES_FILE)) as f:
            hashes = json.load(f)["modules"]
    except (OSError, ValueError, KeyError, TypeError):
        return modules
    out = []
    for module in modules:
        try:
            current = source_hash(source_path(module))
        except OSError:
            continue  # no source installed: nothing to disagree with
        if hashes.get(module) != current:
            out.append(module)
    return out


def describe() -> str:
    """One line: ``compiled (mypyc): 9 of 9 modules`` or ``pure Python``, and any stale
    module."""
    modules = compiled()
    if not modules:
        return "pure Python"
    text = f"compiled (mypyc): {len(modules)} of {len(COMPILED_MODULES)} modules"
    old = stale()
    if old:
        text += f"; STALE, source changed since the build: {', '.join(old)}"
    return text


def _main(argv: list[str]) -> int:
    if argv == ["--sources"]:  # as a file, without importing mqttd: for the Makefile
        print(" ".join(os.path.relpath(source_path(m)) for m in COMPILED_MODULES))
        return 0
    if argv:
        print("usage: python mqttd/build_info.py --sources | python -m mqttd.build_info",
              file=sys.stderr)
        return 2
    print(f"mqttd build: {describe()}")
    if not compiled() and os.environ.get("MQTTD_PURE_PYTHON", "") in ("", "0"):
        print("mqttd build: WARNING: the modules were not compiled (no C compiler? `pip install "
              "-v -e .` shows why); the pure-Python build works, only slower", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
