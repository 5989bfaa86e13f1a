"""The import-cycle check of `make lint` (tools/import_cycles.py) on packages made for the test:
a circle through a TYPE_CHECKING import is found, a layered package passes."""

from __future__ import annotations

import sys
from pathlib import Path

import grimp
import pytest

from tools.import_cycles import cycles


def make_package(root: Path, name: str, modules: dict[str, str]) -> None:
    package = root / name
    package.mkdir()
    (package / "__init__.py").write_text("")
    for module, source in modules.items():
        (package / f"{module}.py").write_text(source)


@pytest.fixture
def on_path(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith(("cyclic_pkg", "layered_pkg"))]:
        del sys.modules[name]


def test_a_circle_through_type_checking_is_found(on_path):
    make_package(on_path, "cyclic_pkg", {
        "low": (
            "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from cyclic_pkg import high\n"
        ),
        "mid": "from cyclic_pkg import low\n",
        "high": "from cyclic_pkg import mid\n",
        "apart": "import os\n",
    })
    graph = grimp.build_graph("cyclic_pkg", include_external_packages=False)
    assert cycles(graph, ("cyclic_pkg",)) == [
        ["cyclic_pkg.high", "cyclic_pkg.low", "cyclic_pkg.mid"]
    ]


def test_a_layered_package_passes(on_path):
    make_package(on_path, "layered_pkg", {
        "low": "import os\n",
        "mid": "from layered_pkg import low\n",
        "high": "from layered_pkg import low, mid\n",
    })
    graph = grimp.build_graph("layered_pkg", include_external_packages=False)
    assert cycles(graph, ("layered_pkg",)) == []
