"""`retrodb train`, `retrodb evaluate`, `retrodb generate`: the RETRO model over a database."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from retrodb.db import RetroDB

from .common import fail, handle_errors, progress_bars

DirArg = Annotated[Path, typer.Argument(help="The checkpoint directory (from `retrodb train`).")]
DBArg = Annotated[Path, typer.Argument(help="Path of the database directory.")]


def _fmt(x: Any, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def _print_record(record: dict[str, Any]) -> None:
    if "note" in record:
        typer.echo(record["note"])
        return
    line = (
        f"step {record['step']:>6}  loss {_fmt(record['loss'])}  bpb {_fmt(record['bpb'])}  "
        f"lr {record['lr']:.2e}  {record['tokens_per_s']:,.0f} tok/s  "
        f"|g| {record['grad_norm']:.2f}"
    )
    if record.get("val_bpb") is not None:
        line += f"  val_loss {_fmt(record['val_loss'])}  val_bpb {_fmt(record['val_bpb'])}"
    typer.echo(line)


def train(
    db: DBArg,
    neighbours: Annotated[
        str, typer.Option("--neighbours", "-n", help="The neighbour set to train on.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint directory to write.")],
    preset: Annotated[
        str, typer.Option("--preset", help="Model size: tiny, small or base.")
    ] = "small",
    steps: Annotated[int, typer.Option("--steps", help="Optimizer steps in total.", min=1)] = 1000,
    seq_len: Annotated[
        int,
        typer.Option("--seq-len", help="Tokens per sequence (multiple of the chunk size).", min=1),
    ] = 512,
    batch_size: Annotated[
        int, typer.Option("--batch-size", "-b", help="Sequences per step (per process).", min=1)
    ] = 4,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate.")] = 6e-4,
    warmup: Annotated[
        int | None, typer.Option("--warmup", help="Warm-up steps (default 10% of steps, <= 100).")
    ] = None,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="AdamW decay.")] = 0.1,
    grad_clip: Annotated[
        float, typer.Option("--grad-clip", help="Gradient norm clip (0: off).")
    ] = 1.0,
    no_retrieval: Annotated[
        bool, typer.Option("--no-retrieval", help="Train a plain decoder (no neighbours).")
    ] = False,
    retrofit: Annotated[
        Path | None,
        typer.Option(
            "--retrofit",
            help="Start from this --no-retrieval checkpoint, frozen; train only CCA and the "
            "encoder.",
        ),
    ] = None,
    k: Annotated[
        int | None, typer.Option("-k", help="Neighbours per chunk (default: the set's k).", min=1)
    ] = None,
    dtype: Annotated[
        str, typer.Option("--dtype", help="fp32, or bf16 autocast (fast on CPUs with AMX).")
    ] = "fp32",
    eval_every: Annotated[
        int, typer.Option("--eval-every", help="Validate every N steps (0: at the end).", min=0)
    ] = 100,
    eval_batches: Annotated[
        int, typer.Option("--eval-batches", help="Validation batches per process.", min=1)
    ] = 20,
    log_every: Annotated[int, typer.Option("--log-every", help="Log every N steps.", min=1)] = 10,
    save_every: Annotated[
        int, typer.Option("--save-every", help="Checkpoint every N steps (and at the end).", min=0)
    ] = 500,
    val_fraction: Annotated[
        float, typer.Option("--val-fraction", help="Share of documents held out for validation.")
    ] = 0.05,
    seed: Annotated[int, typer.Option("--seed", help="Initialisation and data order.")] = 0,
    threads: Annotated[
        int | None, typer.Option("--threads", help="torch threads per process.", min=1)
    ] = None,
    model_overrides: Annotated[
        str | None,
        typer.Option("--model", help="RetroConfig overrides as JSON, e.g. '{\"dropout\": 0.1}'."),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the checkpoint in --out (if any).")
    ] = False,
) -> None:
    """Train a RETRO model on a neighbour set (AdamW, warm-up + cosine, checkpoints, resume).

    Under `torchrun --nproc_per_node N` it trains with DDP (gloo on CPU)."""
    from retrodb_model.train import TrainArgs
    from retrodb_model.train import train as run

    try:
        overrides = json.loads(model_overrides) if model_overrides else {}
    except json.JSONDecodeError as exc:
        fail(f"--model is not valid JSON: {exc.msg}")
    if not isinstance(overrides, dict):
        fail("--model must be a JSON object")
    try:
        args = TrainArgs(
            db=str(db),
            neighbours=neighbours,
            out=str(out),
            preset=preset,
            model=overrides,
            steps=steps,
            seq_len=seq_len,
            batch_size=batch_size,
            lr=lr,
            warmup=warmup,
            weight_decay=weight_decay,
            grad_clip=grad_clip,
            no_retrieval=no_retrieval,
            retrofit=str(retrofit) if retrofit else None,
            k=k,
            val_fraction=val_fraction,
            eval_every=eval_every,
            eval_batches=eval_batches,
            log_every=log_every,
            save_every=save_every,
            seed=seed,
            dtype=dtype,
            threads=threads,
            resume=resume,
        )
        state = run(args, log=_print_record)
    except ValueError as exc:  # invalid configuration values (RetroConfig, presets)
        if type(exc) is not ValueError:
            raise
        fail(str(exc))
    if state.get("history") and int(os.environ.get("RANK", "0")) == 0:
        last = state["history"][-1]
        if True:
            typer.echo(
                f"saved {out} at step {state['step']}: bpb {_fmt(last.get('bpb'))}, "
                f"val_bpb {_fmt(last.get('val_bpb'))}"
            )


def evaluate(
    directory: DirArg,
    db: DBArg,
    inputs: Annotated[
        list[str], typer.Argument(help="Held-out documents: folders, files, .jsonl.")
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Write the JSON here and the bpb(alpha) plot beside it (.png)."
        ),
    ] = None,
    k: Annotated[
        int | None,
        typer.Option("-k", help="Neighbours per chunk (default: the training k).", min=1),
    ] = None,
    seq_len: Annotated[
        int | None, typer.Option("--seq-len", help="Window length (default: the training one).")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1)] = 4,
    no_retrieval: Annotated[
        bool, typer.Option("--no-retrieval", help="Only evaluate without retrieval (no search).")
    ] = False,
    exclude_self: Annotated[
        bool,
        typer.Option(
            "--exclude-self",
            help="Never retrieve from a database document with the evaluated document's id.",
        ),
    ] = False,
    max_tokens: Annotated[
        int | None,
        typer.Option("--max-tokens", help="Score only the first N tokens of each document.", min=1),
    ] = None,
    threads: Annotated[int | None, typer.Option("--threads", min=1)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Bits per byte of held-out documents with retrieval on and off, and bpb(alpha)."""
    import torch

    from retrodb_model.checkpoint import load_model
    from retrodb_model.evaluate import evaluate as run
    from retrodb_model.evaluate import plot_alpha, read_documents

    if threads:
        torch.set_num_threads(threads)
    rdb = RetroDB.open(db, threads=threads)
    model, ckpt = load_model(directory, db=rdb)
    retrieval = not no_retrieval and ckpt.retrieval
    docs = read_documents(inputs)
    with progress_bars(quiet or as_json) as progress:
        res = run(
            model,
            rdb,
            docs,
            seq_len=seq_len or int(ckpt.train_args.get("seq_len", model.cfg.max_seq_len)),
            k=k,
            batch_size=batch_size,
            retrieval=retrieval,
            exclude_self=exclude_self,
            max_tokens=max_tokens,
            progress=progress,
        )
    res = {"checkpoint": str(directory), "step": ckpt.step, "inputs": list(inputs), **res}
    if not retrieval and ckpt.retrieval is False:
        res["note"] = "the model was trained with --no-retrieval"
    path = out if out is not None else Path(directory) / "evaluation.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1) + "\n")
    png = plot_alpha(
        res, path.with_suffix(".png"), title=f"{Path(directory).name} step {ckpt.step}"
    )
    if as_json:
        typer.echo(json.dumps(res, indent=1))
        return
    excluded = ", own documents excluded" if exclude_self else ""
    typer.echo(
        f"{res['documents']} documents, {res['tokens']:,} tokens, {res['bytes']:,} bytes "
        f"(windows of {res['seq_len']}, k={res['k']}{excluded})"
    )
    for mode, v in res["bpb"].items():
        typer.echo(f"  bpb {mode.replace('_', ' '):<13} {_fmt(v)}")
    table = res.get("bpb_alpha")
    if table:
        typer.echo("  bpb(alpha): chunks whose overlap with their neighbours is <= alpha")
        typer.echo(f"    {'alpha':>6} {'chunks':>7} {'share':>6} {'retrieval':>10} {'no retr.':>9}")
        for i, a in enumerate(table["alpha"]):
            typer.echo(
                f"    {a:>5g}% {table['chunks'][i]:>7} {100 * table['fraction'][i]:>5.1f}% "
                f"{_fmt(table['retrieval'][i]):>10} {_fmt(table['no_retrieval'][i]):>9}"
            )
    typer.echo(f"wrote {path}" + (f" and {png}" if png else ""))


def generate(
    directory: DirArg,
    db: DBArg,
    prompt: Annotated[str, typer.Argument(help="The prompt ('-' reads it from stdin).")],
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="New tokens.", min=0)] = 128,
    temperature: Annotated[
        float, typer.Option("--temperature", "-t", help="0: greedy.", min=0.0)
    ] = 0.8,
    top_p: Annotated[
        float, typer.Option("--top-p", help="Nucleus sampling mass.", min=0.0, max=1.0)
    ] = 0.95,
    seed: Annotated[int, typer.Option("--seed", help="Sampling seed.")] = 0,
    no_retrieval: Annotated[
        bool, typer.Option("--no-retrieval", help="Generate without retrieval.")
    ] = False,
    k: Annotated[int | None, typer.Option("-k", help="Neighbours per chunk.", min=1)] = None,
    show_neighbours: Annotated[
        bool,
        typer.Option("--show-neighbours", help="Print every retrieval (chunk, documents, text)."),
    ] = False,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Recompute every step (slow; for checking).")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    threads: Annotated[int | None, typer.Option("--threads", min=1)] = None,
) -> None:
    """Continue PROMPT, retrieving k neighbours after every completed chunk."""
    import torch

    from retrodb_model.checkpoint import load_model
    from retrodb_model.generate import generate as run

    if threads:
        torch.set_num_threads(threads)
    if prompt == "-":
        prompt = sys.stdin.read()
    rdb = RetroDB.open(db, threads=threads)
    model, ckpt = load_model(directory, db=rdb)
    stream = not as_json and not show_neighbours
    tok = rdb.tokenizer
    assert tok is not None  # RetroDB refuses to open without one
    shown: list[int] = list(tok.encode([prompt])[0])
    if stream:
        typer.echo(tok.decode(shown), nl=False)

    def on_token(t: int) -> None:  # print the text as it grows
        before = tok.decode(shown)
        shown.append(t)
        typer.echo(tok.decode(shown)[len(before) :], nl=False)

    res = run(
        model,
        rdb,
        prompt,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        retrieval=not no_retrieval,
        k=k,
        use_cache=not no_cache,
        on_token=on_token if stream else None,
    )
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "prompt": res.prompt,
                    "text": res.text,
                    "tokens": len(res.tokens),
                    "seconds": res.seconds,
                    "retrieval_seconds": res.retrieval_seconds,
                    "tokens_per_s": None if math.isnan(res.tokens_per_s) else res.tokens_per_s,
                    "retrievals": [r.__dict__ for r in res.retrievals],
                },
                indent=1,
            )
        )
        return
    if stream:
        typer.echo("")
    else:
        typer.echo(res.prompt + res.text)
    if show_neighbours:
        for r in res.retrievals:
            typer.echo(typer.style(f"\n[chunk {r.chunk}] {r.chunk_text!r}", bold=True))
            for rank, (key, doc, text) in enumerate(zip(r.keys, r.docs, r.texts, strict=True), 1):
                if key < 0:
                    continue
                snippet = text.replace("\n", " ")[:160]
                typer.echo(f"  {rank}. {doc} key {key}: {snippet}")
    typer.echo(
        typer.style(
            f"\n{len(res.tokens)} tokens in {res.seconds:.2f}s ({res.tokens_per_s:.1f} tok/s after "
            f"the prompt), retrieval {res.retrieval_seconds:.2f}s "
            f"({100 * res.retrieval_share:.0f}%), {len(res.retrievals)} retrievals",
            dim=True,
        ),
        err=True,
    )


def register(app: typer.Typer) -> None:
    """Add `train`, `evaluate` and `generate` to ``app``."""
    app.command(name="train")(handle_errors(train))
    app.command(name="evaluate")(handle_errors(evaluate))
    app.command(name="generate")(handle_errors(generate))
