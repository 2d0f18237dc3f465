"""Shared by tests/test_reliability.py and benchmarks/soak.py: run ``add`` in a child
process, kill it (SIGKILL at a random moment or at a named failpoint), and check that the
database is at the old or the new generation with nothing lost.

Children import only retrodb (no torch), so each costs about a second. The tests run many
children through a :class:`ForkServer` instead: one child imports retrodb once and forks
a fresh process per run (a kill or a crash still ends only that process), about ten
times cheaper per run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Child: open the database, say "ready", add the inputs, say "done".
ADD_CHILD = """
import sys
import retrodb
db = retrodb.RetroDB.open(sys.argv[1], threads=1)
print("ready", flush=True)
if sys.argv[2] == "--compact":
    db.compact()
else:
    db.add(sys.argv[2:])
print("done", flush=True)
"""

#: Child: query in a loop (fresh opens and refreshes) until the stop file appears, checking
#: that every generation it sees is whole; prints "gen N" once it has checked generation N
#: (a handshake for the writer), and writes {"generations", "queries"} as JSON at the end.
READER_CHILD = """
import json, sys, time
from pathlib import Path
import numpy as np
import retrodb

db_path, stop, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
seen, reported, queries = set(), set(), 0
db = retrodb.RetroDB.open(db_path, threads=1)
while not stop.exists():
    if queries % 3 == 0:
        db = retrodb.RetroDB.open(db_path, threads=1)   # a fresh open
    else:
        db.refresh()
    gen = db.generation
    seen.add(gen)
    dead = set(db.manifest.tombstones)
    ids = [i for s in db.segments for i in s.ids if i not in dead]
    # Batches are added whole: a generation holding part of one would be a partial commit.
    trials = {}
    for i in ids:
        trials.setdefault(i.split("-")[0], set()).add(i)
    for t, docs in trials.items():
        assert t == "t0000" or len(docs) == 4, (gen, t, sorted(docs))
    assert db.info()["documents"] == len(ids)
    res = db.search(["alpha beta files lock"], k=4)
    keys = res.keys.ravel()
    assert (keys >= 0).all(), (gen, keys)
    assert not db.deleted_mask(keys).any()
    got = db.key_documents(keys)
    assert all(g in set(ids) for g in got), (gen, got)
    r = db.retrieve(res.keys)
    assert r.mask[..., 0].all()
    db.decode(keys)
    queries += 1
    if gen not in reported:
        reported.add(gen)
        print(f"gen {gen}", flush=True)
out.write_text(json.dumps({"generations": sorted(seen), "queries": queries}))
"""

WORDS = (
    "alpha beta gamma delta files open read write lock thread queue sort key list regex "
    "match group socket server client request header body json parse encode decode"
).split()


@dataclass
class Outcome:
    returncode: int
    killed: bool
    """Ended by SIGKILL (a failpoint or the harness)."""
    output: str
    seconds: float = 0.0
    """From the child's "ready" to its exit."""


def child_env(failpoint: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RETRODB_FAILPOINT", None)
    if failpoint:
        env["RETRODB_FAILPOINT"] = failpoint
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def start_child(
    code: str,
    *argv: object,
    failpoint: str | None = None,
    stdin: int | None = None,
    stdout: int | None = None,
    stderr: int | None = None,
) -> subprocess.Popen[str]:
    """Start ``python -c code argv...`` (text mode, from the repository root, importing this
    tree's retrodb: :func:`child_env`); ``stdin``, ``stdout``, ``stderr`` as for Popen."""
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, argv)],
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        text=True,
        env=child_env(failpoint),
        cwd=ROOT,
    )


#: The fork server: import retrodb, say "ready", then for each request line (JSON: code,
#: argv, failpoint, out, err) fork; the fork arms the failpoints, sends its stdout and
#: stderr to the files named, runs the code as ``__main__`` and exits with its status; the
#: server answers {"returncode"} (negative: the signal that ended the fork).
FORK_SERVER = """
import json, os, sys, traceback
import retrodb
from retrodb import failpoints
print("ready", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        status = 0
        try:
            for fd, name in ((1, req["out"]), (2, req["err"])):
                os.dup2(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            failpoints.configure(req["failpoint"])
            sys.argv = ["-c", *req["argv"]]
            exec(compile(req["code"], "<child>", "exec"), {"__name__": "__main__"})
        except SystemExit as exc:
            if isinstance(exc.code, int) or exc.code is None:
                status = exc.code or 0
            else:
                print(exc.code, file=sys.stderr)
                status = 1
        except BaseException:
            traceback.print_exc()
            status = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    _, wait_status = os.waitpid(pid, 0)
    print(json.dumps({"returncode": os.waitstatus_to_exitcode(wait_status)}), flush=True)
"""


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


class ForkServer:
    """Runs child scripts in forks of one child that has imported retrodb (see
    :data:`FORK_SERVER`): each run is its own process, as with ``python -c``, without paying
    for the interpreter and the imports every time. Use as a context manager."""

    def __init__(self) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="retrodb-forks-"))
        self._runs = 0
        self._proc = start_child(FORK_SERVER, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self._proc.stdout is not None
        first = self._proc.stdout.readline()
        if first.strip() != "ready":
            self.close()
            raise RuntimeError(f"the fork server did not start: {first!r}")

    def run(self, code: str, argv: list[str], *, failpoint: str | None = None) -> Run:
        """Run ``code`` with ``sys.argv[1:] = argv`` in a fresh fork; wait for its end."""
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._runs += 1
        out, err = self._dir / f"{self._runs}.out", self._dir / f"{self._runs}.err"
        req = {"code": code, "argv": argv, "failpoint": failpoint, "out": str(out), "err": str(err)}
        self._proc.stdin.write(json.dumps(req) + "\n")
        self._proc.stdin.flush()
        reply = self._proc.stdout.readline()
        if not reply:
            raise RuntimeError(f"the fork server died (exit {self._proc.wait()})")
        return Run(json.loads(reply)["returncode"], out.read_text(), err.read_text())

    def close(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> ForkServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_add(
    db: Path,
    inputs: list[Path],
    *,
    failpoint: str | None = None,
    kill_after: float | None = None,
    timeout: float = 120,
    forks: ForkServer | None = None,
) -> Outcome:
    """Run ``add`` in a child; SIGKILL it ``kill_after`` seconds after it is ready. With
    ``forks`` (and no ``kill_after``) the child is a fork of that server."""
    if forks is not None and kill_after is None:
        t = time.perf_counter()
        run = forks.run(ADD_CHILD, [str(db), *map(str, inputs)], failpoint=failpoint)
        return Outcome(
            run.returncode,
            run.returncode == -signal.SIGKILL,
            run.stdout + run.stderr,
            time.perf_counter() - t,
        )
    proc = start_child(
        ADD_CHILD,
        db,
        *inputs,
        failpoint=failpoint,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()
    ready = time.perf_counter()
    if kill_after is not None and first.startswith("ready"):
        time.sleep(kill_after)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    try:
        rest, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        rest, _ = proc.communicate()
    return Outcome(
        proc.returncode,
        proc.returncode == -signal.SIGKILL,
        first + (rest or ""),
        time.perf_counter() - ready,
    )


def write_batch(
    root: Path, trial: int, *, docs: int = 4, words: int = 300
) -> tuple[Path, set[str]]:
    """A folder of ``docs`` documents with ids unique to ``trial``."""
    import random

    rng = random.Random(trial)
    folder = root / f"batch-{trial:04d}"
    folder.mkdir(parents=True)
    ids = set()
    for d in range(docs):
        name = f"t{trial:04d}-d{d}.txt"
        text = " ".join(rng.choice(WORDS) for _ in range(words))
        (folder / name).write_text(f"trial {trial} document {d}. {text}\n", encoding="utf-8")
        ids.add(name)
    return folder, ids


def live_ids(db_path: Path) -> tuple[int, set[str]]:
    """Generation and live document ids of the committed database."""
    import retrodb

    db = retrodb.RetroDB.open(db_path)
    dead = set(db.manifest.tombstones)
    return db.generation, {i for s in db.segments for i in s.ids if i not in dead}


def check_after_trial(
    db_path: Path, before: set[str], new: set[str], *, verify: bool = True
) -> tuple[int, bool, list[str]]:
    """Open the database after a trial: returns ``(generation, committed, problems)``.

    ``committed``: the new documents are all there; problems: documents lost, a partial
    add (some new documents only), or a failed verify."""
    import retrodb

    problems: list[str] = []
    gen, ids = live_ids(db_path)
    lost = before - ids
    if lost:
        problems.append(f"lost {len(lost)} committed documents: {sorted(lost)[:3]}")
    got_new = ids & new
    if got_new and got_new != new:
        problems.append(f"partial add: {len(got_new)} of {len(new)} new documents")
    if ids - before - new:
        problems.append(f"unexpected documents {sorted(ids - before - new)[:3]}")
    if verify:
        rep = retrodb.RetroDB.open(db_path).verify()
        if not rep["ok"]:
            problems += [f"verify: {p}" for p in rep["problems"]]
    return gen, got_new == new, problems
