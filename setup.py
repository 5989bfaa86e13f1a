"""mqttd's build hook: the hot-path modules compiled with mypyc, the pure-Python ones as the
fallback (docs/COMPILED.md). Everything else about the package is in pyproject.toml.

``pip install .`` and ``pip install -e .`` compile ``mqttd.build_info.COMPILED_MODULES`` into
extension modules (installed next to their ``.py`` files, which stay as the fallback and for
tracebacks) when mypyc and a C compiler work. Nothing is compiled when the environment has
``MQTTD_PURE_PYTHON=1`` at install time, and a failed compilation (no C compiler, no Python
headers, a type error mypyc refuses) prints a warning and installs pure Python: an install
never fails because of the compiled build.

An editable install builds the extension modules in place, next to the ``.py`` files, where
they win on import: every build first removes the ones an earlier build left there, and
records a hash of each compiled source (``mqttd/_compiled.json``) so that the module
``mqttd.build_info`` can tell when a source was edited after the build.
"""

from __future__ import annotations

import glob
import json
import os
import runpy
import sys
import traceback
import warnings

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
INFO = runpy.run_path(os.path.join(HERE, "mqttd", "build_info.py"))
MODULES: tuple[str, ...] = INFO["COMPILED_MODULES"]
GROUP = "mqttd._native"  # the shared library of the group: mqttd/_native__mypyc.*.so
# Stands for the compiled modules until build_ext runs mypyc (only a build needs it, not the
# metadata steps): with it the distribution has extension modules (a platform wheel).
PLACEHOLDER = Extension("mqttd._native__mypyc", sources=[])


def pure_requested() -> bool:
    return os.environ.get("MQTTD_PURE_PYTHON", "").strip().lower() not in ("", "0", "no", "false")


def warn(message: str) -> None:
    message = f"mqttd: {message}; installing the pure-Python build"
    print(f"\n{'*' * 78}\n{message}\n{'*' * 78}\n", file=sys.stderr, flush=True)
    # pip shows the backend's output only with -v, but a UserWarning always (pip >= 25.1)
    warnings.warn(message, UserWarning, stacklevel=2)


def remove_compiled(root: str) -> None:
    """Remove the extension modules and the hash file of a build under ``root`` (the directory
    holding ``mqttd``): left in the source tree they would shadow the ``.py`` files."""
    patterns = ("mqttd/**/*.so", "mqttd/**/*.pyd", "mqttd/_compiled.json", "*__mypyc.*.so")
    for pattern in patterns:
        for path in glob.glob(os.path.join(root, pattern), recursive=True):
            os.remove(path)


def write_hashes(root: str) -> None:
    from mypy.version import __version__ as mypy_version

    hashes = {m: INFO["source_hash"](INFO["source_path"](m, HERE)) for m in MODULES}
    os.makedirs(os.path.join(root, "mqttd"), exist_ok=True)
    with open(os.path.join(root, "mqttd", INFO["HASHES_FILE"]), "w") as f:
        json.dump({"mypy": mypy_version, "modules": hashes}, f, indent=1, sort_keys=True)
        f.write("\n")


def mypyc_extensions() -> list[Extension]:
    """The compiled modules as extensions (mypyc checks the types and writes the C code into
    build/), or none, with a warning, when mypyc cannot do it."""
    try:
        from mypyc.build import mypycify

        paths = [os.path.relpath(INFO["source_path"](m, HERE)) for m in MODULES]
        # opt_level 3: mypyc's default; group_name keeps the shared library inside mqttd
        return list(mypycify(paths, opt_level="3", group_name=GROUP))
    except (Exception, SystemExit):  # mypyc reports type errors with sys.exit
        traceback.print_exc()
        warn("mypyc could not compile the hot-path modules; pip install -v shows why")
        return []


class BuildPy(build_py):
    def run(self) -> None:
        remove_compiled(HERE)  # whatever this build makes, no old extension module remains
        super().run()


class BuildExt(build_ext):
    extensions: list[Extension]

    def run(self) -> None:
        if self.extensions == [PLACEHOLDER]:
            # mypyc runs here, not in finalize_options: the metadata steps finalize build_ext
            # too (for the manifest) and need not pay for its type check and code generation.
            # The command is initialized and finalized again, for the real extensions.
            self.distribution.ext_modules = mypyc_extensions()
            editable_mode, inplace = self.editable_mode, self.inplace
            cmd = self.distribution.reinitialize_command("build_ext")  # (this object, today)
            cmd.editable_mode, cmd.inplace = editable_mode, inplace  # type: ignore[attr-defined]
            cmd.ensure_finalized()
            if cmd is not self:
                cmd.run()
                return
        if not self.extensions:
            return
        try:
            super().run()
        except Exception as exc:  # no compiler, no Python.h, a link error: stay pure Python
            traceback.print_exc()
            warn(f"compiling the mypyc modules failed ({type(exc).__name__}: {str(exc)[:160]}); "
                 "pip install -v shows why")
            remove_compiled(self.build_lib)  # no partial set of extension modules
            remove_compiled(HERE)
            self.extensions = []
            return
        write_hashes(HERE if self.inplace else self.build_lib)

    def get_outputs(self) -> list[str]:
        return super().get_outputs() if self.extensions != [PLACEHOLDER] else []


if pure_requested():
    print("mqttd: MQTTD_PURE_PYTHON is set: installing the pure-Python build", file=sys.stderr)
    EXT_MODULES: list[Extension] = []
else:
    EXT_MODULES = [PLACEHOLDER]

setup(ext_modules=EXT_MODULES, cmdclass={"build_py": BuildPy, "build_ext": BuildExt})
