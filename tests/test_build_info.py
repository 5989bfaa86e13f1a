"""The build reports itself: compiled (mypyc) or pure Python (mqttd.build_info).

CI runs the suite twice and says which build each run must be: MQTTD_EXPECT_COMPILED=1 (every
module of COMPILED_MODULES an extension module, built from the source in the tree) or
MQTTD_EXPECT_PURE=1 (none). Without either, only the report's consistency is checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mqttd import build_info
from mqttd.__main__ import main

ROOT = Path(__file__).resolve().parent.parent


def test_the_build_is_the_expected_one():
    compiled = build_info.compiled()
    if os.environ.get("MQTTD_EXPECT_COMPILED") == "1":
        assert compiled == list(build_info.COMPILED_MODULES)
        assert build_info.stale() == []
        n = len(compiled)
        assert build_info.describe() == f"compiled (mypyc): {n} of {n} modules"
    if os.environ.get("MQTTD_EXPECT_PURE") == "1":
        assert compiled == []
        assert build_info.describe() == "pure Python"
    for module in build_info.COMPILED_MODULES:
        assert build_info.is_compiled(module) == (module in compiled)
        assert Path(build_info.source_path(module)).is_file()
    assert (build_info.describe() == "pure Python") == (not compiled)


def test_version_says_which_build(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    out = capsys.readouterr().out
    assert out.startswith("mqttd ") and f"({build_info.describe()})" in out


def test_a_source_edited_after_the_build_is_stale(tmp_path, monkeypatch):
    compiled = build_info.compiled()
    if not compiled:
        assert build_info.stale() == []  # nothing compiled, nothing stale
        return
    # a copy of the recorded hashes with one of them changed, read in place of the real file
    real = Path(build_info._ROOT, "mqttd", build_info.HASHES_FILE)
    recorded = json.loads(real.read_text())
    recorded["modules"][compiled[0]] = "0" * 64
    fake_root = tmp_path / "root"
    (fake_root / "mqttd").mkdir(parents=True)
    (fake_root / "mqttd" / build_info.HASHES_FILE).write_text(json.dumps(recorded))
    for module in build_info.COMPILED_MODULES:  # the sources, as they are
        target = Path(build_info.source_path(module, str(fake_root)))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(Path(build_info.source_path(module)).read_bytes())
    monkeypatch.setattr(build_info, "_ROOT", str(fake_root))
    assert build_info.stale() == [compiled[0]]
    assert "STALE" in build_info.describe() and compiled[0] in build_info.describe()
    (fake_root / "mqttd" / build_info.HASHES_FILE).unlink()
    assert build_info.stale() == compiled  # no record: none can be trusted


def test_the_makefile_gets_the_sources_of_the_compiled_modules():
    out = subprocess.run(
        [sys.executable, "mqttd/build_info.py", "--sources"], cwd=ROOT, capture_output=True,
        text=True, check=True,
    ).stdout.split()
    assert out == [
        str(Path(build_info.source_path(m)).relative_to(ROOT)) for m in build_info.COMPILED_MODULES
    ]
