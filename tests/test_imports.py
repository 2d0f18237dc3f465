"""Import orders that used to crash the process (issue 10, item 1), each in a child process.

USearch's wheel bundles a private libstdc++ whose C++ locale facet ids are shared with the
system libstdc++ (STB_GNU_UNIQUE symbols); when USearch is loaded first, onnxruntime then
crashed with SIGSEGV on import. retrodb-cxx-runtime.pth (installed with retrodb) and
retrodb.index load the system libstdc++ globally first; docs/reliability.md explains it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from retrodb import RetroDB

from .conftest import SMALL


def _run(code: str, *, no_site: bool = False) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter of this environment. With ``no_site`` the child
    skips site-packages' .pth files (so no start-up hook runs) but sees this sys.path."""
    argv = [sys.executable]
    if no_site:
        argv.append("-S")
        code = f"import sys; sys.path[:] = {json.dumps(sys.path)}; {code}"
    proc = subprocess.run(
        [*argv, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    return proc


def _explain(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}; stderr tail:\n{proc.stderr[-2000:]}"


@pytest.mark.parametrize(
    "code",
    [
        "import usearch.index; import onnxruntime",
        "import zarr; import usearch.index; import onnxruntime",
        "import numpy; import usearch.index; import onnxruntime",
        "import onnxruntime; import usearch.index",
        "import retrodb; import usearch.index; import onnxruntime",
    ],
)
def test_import_orders_do_not_crash(code: str) -> None:
    proc = _run(code)
    assert proc.returncode == 0, _explain(proc)


def test_usearch_first_then_retrodb_search(tmp_path: Path, corpus_dir: Path, tiny_encoder_dir):
    db = RetroDB.build(tmp_path / "db", [corpus_dir], config=SMALL, encoder=tiny_encoder_dir)
    del db
    code = (
        "import usearch.index; import retrodb; "
        f"db = retrodb.open({str(tmp_path / 'db')!r}, threads=1); "
        "r = db.search(['how do I open a file?', 'sorting a list'], k=2); "
        "print(r.keys.shape)"
    )
    proc = _run(code)
    assert proc.returncode == 0, _explain(proc)
    assert proc.stdout.strip().splitlines()[-1] == "(2, 2)"


def test_retrodb_first_needs_no_startup_hook() -> None:
    """retrodb.index shares the C++ runtime itself, so importing retrodb first is enough."""
    proc = _run("import retrodb; import usearch.index; import onnxruntime", no_site=True)
    assert proc.returncode == 0, _explain(proc)


def test_usearch_first_without_hook_is_a_clear_error_not_a_crash() -> None:
    """Without the start-up hook, USearch imported first has numbered the facets: retrodb
    refuses to import (naming the cause) instead of letting onnxruntime crash."""
    proc = _run("import usearch.index; import retrodb", no_site=True)
    assert proc.returncode == 1, _explain(proc)
    assert "CxxRuntimeClashError" in proc.stderr
    assert "usearch" in proc.stderr and "retrodb-cxx-runtime.pth" in proc.stderr
