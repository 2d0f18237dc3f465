"""Configuration of the RETRO model (Borgeaud et al., 2022), of a training run and of an
evaluation.

One frozen dataclass describes the whole model: the decoder, the neighbour encoder and
where the two meet. A checkpoint stores `RetroConfig.to_dict()` beside the weights, so
`RetroConfig.from_dict(...)` rebuilds the exact model without guessing. `TrainArgs` holds
everything a training run depends on, `EvalArgs` how an evaluation scores (`retrodb train`
and `retrodb evaluate` make their options from them: `retrodb_model.options`). This
module imports neither torch nor the database, so the command line can read it cheaply.

Layer indices (`retro_layers`, `enc_cross_attn_layers`, `dec_enc_condition_layer`) are
1-based, as in the paper ("RETRO blocks at layers 6, 9 and 12").
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retrodb.errors import BadInputError

if TYPE_CHECKING:
    from retrodb.db import RetroDB

#: The ways the neighbour embeddings can enter the encoder (RetroConfig.enc_input).
ENC_INPUTS = ("raw", "scaled", "norm")
#: The overlap measures of the CCA overlap gate (RetroConfig.cca_overlap_gate).
OVERLAP_GATES = ("none", "run", "aligned", "shift")


def default_retro_layers(n_layers: int) -> tuple[int, ...]:
    """The decoder layers that get chunked cross-attention when none are given.

    The paper's rule is "every third layer from layer 6": (6, 9, 12) for 12 layers,
    (6, 9, ..., 30) for 32. A model with fewer than 6 layers has no layer 6, so the rule
    counts down in steps of 3 from the last layer instead: (2, 5) for 5 layers, (1, 4)
    for 4, (3,) for 3, (2,) for 2, (1,) for 1.
    """
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    if n_layers >= 6:
        return tuple(range(6, n_layers + 1, 3))
    return tuple(sorted(range(n_layers, 0, -3)))


@dataclass(frozen=True)
class RetroConfig:
    """Hyper-parameters of a RETRO model.

    Derived fields left at 0 / () (head_dim, retro_layers, enc_dim, enc_heads,
    dec_enc_condition_layer, neighbour_len) and enc_cross_attn_layers left at None are
    filled in by __post_init__, so every field of a built config holds its real value.
    """

    vocab_size: int
    # m: tokens per chunk. Retrieval happens once per chunk; neighbours hold 2m tokens.
    chunk_size: int = 64
    # decoder width d and depth
    dim: int = 896
    n_layers: int = 12
    n_heads: int = 16
    # width of one attention head; 0 -> dim // n_heads (dim must then divide evenly)
    head_dim: int = 0
    # feed-forward: SwiGLU with hidden width round_up(2/3 * ff_mult * dim, 32), which
    # keeps the parameter count of a GELU feed-forward of width ff_mult * dim
    ff_mult: float = 4.0
    # 1-based decoder layers that are RETRO blocks (attention, CCA, feed-forward);
    # () -> default_retro_layers(n_layers), i.e. (6, 9, 12) for 12 layers
    retro_layers: tuple[int, ...] = ()
    # neighbour encoder: width (0 -> dim), depth, heads (0 -> enc_dim // head_dim when
    # that divides, else 1)
    enc_dim: int = 0
    enc_layers: int = 2
    enc_heads: int = 0
    # 1-based encoder layers with cross-attention to the decoder activations of the chunk
    # that retrieved the neighbour; None -> every encoder layer, () -> none (unconditioned)
    enc_cross_attn_layers: tuple[int, ...] | None = None
    # the encoder is conditioned on the *input* activations of this 1-based decoder layer;
    # 0 -> retro_layers[0] (the paper: the first CCA layer's input). Must be <= it,
    # because the encoded neighbours are needed by the first CCA layer.
    dec_enc_condition_layer: int = 0
    # k: neighbours per chunk (2 in training; evaluation may pass more, see note below)
    num_neighbours: int = 2
    # r: tokens per neighbour (neighbour chunk + its continuation); 0 -> 2 * chunk_size
    neighbour_len: int = 0
    dropout: float = 0.0
    # rotary position embedding base (theta)
    rope_base: float = 10000.0
    # longest decoder sequence (sizes the rotary tables and the generation cache)
    max_seq_len: int = 2048
    # share the token embedding with the output head
    tie_embeddings: bool = True
    # token id that marks padding inside retrieved neighbours when no explicit mask is
    # given; None -> only negative ids (e.g. -1 for "no neighbour") are padding
    pad_id: int | None = None
    # a learned bias per CCA head and relative offset (key position - aligned query
    # position), added to the rotary scores: the content-independent positional term of
    # the paper's relative attention (Transformer-XL's v.R), which rotary alone lacks.
    # It lets CCA attend "one token after my counterpart" from the start, so copying
    # from a matching neighbour is learned in hundreds of steps instead of not at all.
    cca_position_bias: bool = True
    # how the neighbour tokens' embeddings enter the encoder: "raw" (as the decoder's
    # input, std 0.02 at init), "scaled" (times sqrt(dim)) or "norm" (an RMSNorm with a
    # learned gain). The encoder's residual stream starts from them; at width 384 raw
    # embeddings are drowned by the first layers' updates, so CCA's values carry almost
    # no token identity (share of output variance explained by the token id at init:
    # see tests/test_model.py), and copying a neighbour is not learnable.
    enc_input: str = "norm"
    # a learned "null" key per CCA head whose value is zero: a token whose neighbours do
    # not match its text can attend to nothing instead of averaging them into noise
    cca_null: bool = True
    # overlap gate (needs cca_null): every CCA score of a neighbour's keys gets a learned
    # per-head weight times the neighbour's overlap with the chunk that retrieved it, and
    # the null key starts ahead of neighbours without overlap: a model starts by attending
    # only to neighbours that share a long run of tokens with its text (which it can copy)
    # and learns where to move that threshold. "run": the longest common token run between
    # the chunk and the neighbour chunk, / m; "aligned": the same, counting only tokens at
    # the same offset in both (what CCA's position prior copies from); "shift": each
    # neighbour is first shifted so that its longest common run with the chunk sits at the
    # chunk's offsets (a near-duplicate at another offset becomes aligned), then "aligned"
    # (the default: on the Python docs it gains on held-out text where "aligned" only
    # breaks even; docs/results-model.md); "none": no gate
    cca_overlap_gate: str = "shift"
    # copy bias (needs cca_null): every CCA score of a token against neighbour key j gets
    # a learned per-head bias indexed by the length of the common token run that ends at
    # the token and at neighbour token j - 1 (retrodb_model.gate.copy_runs). The overlap
    # gate judges a neighbour once, by the chunk that retrieved it; the copy bias judges
    # it at every token, so a neighbour whose continuation parts from the text is dropped
    # there (the default: on held-out Python docs it quarters the worst overlap bucket's
    # cost and doubles the gain; docs/results-model.md, section 7)
    cca_copy_bias: bool = True
    # The model accepts any number of neighbours per chunk at run time (the encoder and
    # CCA are independent of k); num_neighbours is the training value and a check for data.

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"RetroConfig: {message}")

        def setd(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        need(self.vocab_size >= 2, f"vocab_size must be >= 2, got {self.vocab_size}")
        need(self.chunk_size >= 1, f"chunk_size must be >= 1, got {self.chunk_size}")
        need(self.dim >= 1 and self.n_layers >= 1, "dim and n_layers must be >= 1")
        need(self.n_heads >= 1, f"n_heads must be >= 1, got {self.n_heads}")
        if not self.head_dim:
            need(
                self.dim % self.n_heads == 0,
                f"dim {self.dim} is not divisible by n_heads {self.n_heads}; set head_dim",
            )
            setd("head_dim", self.dim // self.n_heads)
        need(
            self.head_dim >= 2 and self.head_dim % 2 == 0,
            f"head_dim must be even (rotary), got {self.head_dim}",
        )
        need(self.ff_mult > 0, f"ff_mult must be > 0, got {self.ff_mult}")

        retro = self.retro_layers
        retro = tuple(retro) if retro else default_retro_layers(self.n_layers)
        need(len(retro) >= 1, "retro_layers must name at least one layer")
        need(
            all(1 <= i <= self.n_layers for i in retro),
            f"retro_layers {retro} must lie in 1..n_layers={self.n_layers}",
        )
        need(len(set(retro)) == len(retro), f"retro_layers {retro} has duplicates")
        retro = tuple(sorted(retro))
        setd("retro_layers", retro)

        cond = self.dec_enc_condition_layer
        cond = cond or retro[0]
        need(
            1 <= cond <= retro[0],
            f"dec_enc_condition_layer {cond} must lie in 1..{retro[0]} (the first CCA "
            "layer needs the encoded neighbours)",
        )
        setd("dec_enc_condition_layer", cond)

        if not self.enc_dim:
            setd("enc_dim", self.dim)
        need(self.enc_layers >= 1, f"enc_layers must be >= 1, got {self.enc_layers}")
        if not self.enc_heads:
            heads = self.enc_dim // self.head_dim if self.enc_dim % self.head_dim == 0 else 0
            setd("enc_heads", heads if heads >= 1 else 1)
        need(
            self.enc_heads >= 1 and self.enc_dim % self.enc_heads == 0,
            f"enc_dim {self.enc_dim} must be divisible by enc_heads {self.enc_heads}",
        )
        need(
            (self.enc_dim // self.enc_heads) % 2 == 0,
            "encoder head width enc_dim // enc_heads must be even (rotary)",
        )
        eca = self.enc_cross_attn_layers
        eca = tuple(range(1, self.enc_layers + 1)) if eca is None else tuple(sorted(eca))
        need(
            all(1 <= i <= self.enc_layers for i in eca) and len(set(eca)) == len(eca),
            f"enc_cross_attn_layers {eca} must be distinct layers in 1..{self.enc_layers}",
        )
        setd("enc_cross_attn_layers", eca)

        need(
            self.enc_input in ENC_INPUTS,
            f"enc_input must be one of {ENC_INPUTS}, got {self.enc_input!r}",
        )
        need(
            self.cca_overlap_gate in OVERLAP_GATES,
            f"cca_overlap_gate must be one of {OVERLAP_GATES}, got {self.cca_overlap_gate!r}",
        )
        need(
            self.cca_null or self.cca_overlap_gate == "none",
            "cca_overlap_gate needs cca_null (the key a gated-out token attends to)",
        )
        need(
            self.cca_null or not self.cca_copy_bias,
            "cca_copy_bias needs cca_null (the key a token attends to when no neighbour "
            "follows its text)",
        )
        need(self.num_neighbours >= 1, f"num_neighbours must be >= 1, got {self.num_neighbours}")
        if not self.neighbour_len:
            setd("neighbour_len", 2 * self.chunk_size)
        need(self.neighbour_len >= 1, f"neighbour_len must be >= 1, got {self.neighbour_len}")
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        need(self.rope_base > 1.0, f"rope_base must be > 1, got {self.rope_base}")
        need(
            self.max_seq_len >= self.chunk_size,
            f"max_seq_len {self.max_seq_len} must be >= chunk_size {self.chunk_size}",
        )
        need(
            self.pad_id is None or 0 <= self.pad_id < self.vocab_size,
            f"pad_id {self.pad_id} must be None or a token id < vocab_size",
        )

    # ---- derived sizes -------------------------------------------------------------

    @property
    def ff_hidden(self) -> int:
        """Hidden width of the SwiGLU feed-forward (decoder and encoder use their own dim)."""
        return ff_hidden(self.dim, self.ff_mult)

    @property
    def enc_head_dim(self) -> int:
        return self.enc_dim // self.enc_heads

    # ---- (de)serialisation -----------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field (derived ones included, tuples as lists)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RetroConfig:
        """Inverse of to_dict; unknown keys are an error (a typo must not pass silently)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"RetroConfig.from_dict: unknown fields {unknown}")
        kwargs = dict(data)
        # written before CCA had a position bias: keep the model those weights belong to
        kwargs.setdefault("cca_position_bias", False)
        # written before the encoder input could be scaled or normalised
        kwargs.setdefault("enc_input", "raw")
        kwargs.setdefault("cca_null", False)
        kwargs.setdefault("cca_copy_bias", False)
        gate = kwargs.setdefault("cca_overlap_gate", "none")
        if isinstance(gate, bool):  # research checkpoints wrote a bool (True: "run")
            kwargs["cca_overlap_gate"] = "run" if gate else "none"
        for key in ("retro_layers", "enc_cross_attn_layers"):
            if kwargs.get(key) is not None:
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)

    def replace(self, **changes: Any) -> RetroConfig:
        """A copy with some fields changed. Derived fields keep their values; pass 0 / ()
        (None for enc_cross_attn_layers) to have one derived again, e.g.
        ``cfg.replace(n_layers=24, retro_layers=())``."""
        return dataclasses.replace(self, **changes)

    # ---- presets ---------------------------------------------------------------------

    @classmethod
    def preset(cls, name: str, vocab_size: int, **overrides: Any) -> RetroConfig:
        """A named configuration; keyword overrides win.

        - ``tiny``: tests. 4 layers of width 64, CCA at (2, 4), encoder width 32 (so the
          projection between decoder and encoder width is exercised), chunks of 8.
        - ``small``: trains on 2 CPU cores in minutes. 6 layers of width 384 (6 heads of
          64), CCA at (3, 6) - the "every third layer" spacing of the paper, which has no
          layer 6/9/12 pattern to follow at this depth - encoder 2 layers of width 384.
        - ``base``: the paper's smallest RETRO (172M): 12 layers, d = 896, 16 heads of 56,
          feed-forward 4d, CCA at (6, 9, 12), encoder 2 layers of width 896.
        """
        presets: dict[str, dict[str, Any]] = {
            "tiny": dict(
                chunk_size=8,
                dim=64,
                n_layers=4,
                n_heads=4,
                retro_layers=(2, 4),
                enc_dim=32,
                enc_heads=2,
                max_seq_len=256,
            ),
            "small": dict(
                chunk_size=64,
                dim=384,
                n_layers=6,
                n_heads=6,
                retro_layers=(3, 6),
                enc_dim=384,
                enc_heads=6,
                max_seq_len=2048,
            ),
            "base": dict(
                chunk_size=64,
                dim=896,
                n_layers=12,
                n_heads=16,
                retro_layers=(6, 9, 12),
                enc_dim=896,
                enc_heads=16,
                max_seq_len=2048,
            ),
        }
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(presets)}")
        kwargs = presets[name]
        kwargs.update(overrides)
        return cls(vocab_size=vocab_size, **kwargs)

    @classmethod
    def for_database(
        cls,
        db: RetroDB | str | Path,
        preset: str = "small",
        *,
        k: int = 2,
        seq_len: int | None = None,
        **overrides: Any,
    ) -> RetroConfig:
        """A preset sized to fit ``db``: its vocabulary and chunk size, ``k`` neighbours
        per chunk (the training value, unless ``num_neighbours`` is given; the model
        accepts any k at run time), and
        ``max_seq_len`` at least ``seq_len``. Other keyword overrides win over the
        preset; a ``chunk_size`` or ``vocab_size`` that contradicts the database raises
        :class:`retrodb.errors.MismatchError`.

        >>> cfg = RetroConfig.for_database("my.retrodb", "tiny", k=2)  # doctest: +SKIP
        """
        from retrodb.db import RetroDB
        from retrodb.errors import MismatchError

        rdb = db if isinstance(db, RetroDB) else RetroDB.open(db)
        fits = {
            "vocab_size": int(rdb.manifest.tokenizer["vocab_size"]),
            "chunk_size": int(rdb.chunk_size),
        }
        for name, value in fits.items():
            if name in overrides and overrides[name] != value:
                raise MismatchError(
                    f"{name} {overrides[name]} does not fit {rdb.path}, whose {name} is {value}"
                )
        overrides = {"num_neighbours": k, **overrides, "chunk_size": fits["chunk_size"]}
        config = cls.preset(preset, fits["vocab_size"], **overrides)
        if seq_len is not None and config.max_seq_len < seq_len:
            config = config.replace(max_seq_len=seq_len)
        return config


def default_lr(dim: int) -> float:
    """The peak AdamW learning rate for a model of decoder width ``dim``:
    3e-3 * (64 / dim) ** 0.6, at most 3e-3: 3e-3 at width 64 (tiny), 1.0e-3 at 384
    (small), 6.2e-4 at 896 (base). Wider matrices take smaller Adam steps. On the copy
    task with the raw encoder input and no overlap gate, width 384 learned nothing at
    3e-3 and copied at 3e-4; with the defaults (RMSNorm input, null key and gate) it
    copies at both 3e-3 and 1e-3 (scripts/research/copy_task.py, docs/model.md). 1e-3 is
    the rate of the small preset's results on the Python docs (docs/results-model.md)."""
    return 3e-3 * min(1.0, (64 / dim) ** 0.6)


def ff_hidden(dim: int, ff_mult: float, multiple_of: int = 32) -> int:
    """SwiGLU hidden width: 2/3 of ff_mult * dim, rounded up to a multiple of 32."""
    hidden = int(2 * ff_mult * dim / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass(frozen=True)
class TrainArgs:
    """Everything a training run depends on; stored in the checkpoint's config.json."""

    db: str
    """The database directory."""
    neighbours: str
    """The neighbour set to train on (``retrodb neighbours DB NAME``)."""
    out: str
    """The checkpoint directory."""
    preset: str = "small"
    """Model size: tiny, small or base (see RetroConfig.preset)."""
    model: dict[str, Any] = field(default_factory=dict)
    """Overrides of the preset's RetroConfig fields."""
    steps: int = 1000
    """Optimizer steps in total (a resumed run continues up to this)."""
    seq_len: int = 512
    """Tokens per training sequence (a multiple of the chunk size)."""
    batch_size: int = 4
    """Sequences per step and process."""
    lr: float | None = None
    """Peak learning rate (default by the model's width, default_lr: tiny 3e-3, small
    1.0e-3, base 6.2e-4; recorded in the checkpoint when the run starts)."""
    min_lr_ratio: float = 0.1
    """The cosine decays to lr * min_lr_ratio at the last step."""
    warmup: int | None = None
    """Linear warm-up steps (default: 10 % of steps, at most 100)."""
    weight_decay: float = 0.1
    """AdamW weight decay (on weight matrices only)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""
    no_retrieval: bool = False
    """Train without neighbours: a plain decoder (the baseline, and a retrofit base)."""
    retrofit: str | None = None
    """The decoder to RETRO-fit (frozen; only CCA and the neighbour encoder train): a
    checkpoint trained with --no-retrieval, or a pretrained model: a Hugging Face
    checkpoint folder or a .gguf file (Llama family or GPT-2; a .gguf needs retrodb[hf]),
    whose tokenizer the database must use (retrodb build --tokenizer BASE). --model
    retro_layers=[24,27,30] chooses the layers CCA follows (default: every third from 6)."""
    distractors: float = 0.0
    """Share of training sequences (0 <= P < 1) given the neighbours of another sequence in
    the batch and trained to predict as the model does with retrieval off (the KL divergence
    from its own no-retrieval prediction, held fixed; for a RETRO-fit, the frozen base's)
    instead of the next tokens: neighbours with nothing to copy must then change nothing,
    rather than teach the model the corpus's style (a RETRO-fit of a pretrained decoder: 0.8)."""
    k: int | None = None
    """Neighbours per chunk (default: all the neighbour set has)."""
    val_fraction: float = 0.05
    """Share of documents held out for validation (a stable hash of each id)."""
    split_seed: int = 0
    """Seed of the train/validation split of the documents."""
    eval_every: int = 100
    """Validate every this many steps (0: only at the end)."""
    eval_batches: int = 20
    """Validation batches per process."""
    log_every: int = 10
    """Log every this many steps."""
    save_every: int = 500
    """Checkpoint every this many steps (and always at the end)."""
    seed: int = 0
    """Seed of the initial weights and of the data order."""
    dtype: str = "fp32"
    """fp32, or bf16 (CPU/GPU autocast for forward and loss; weights stay fp32)."""
    threads: int | None = None
    """torch threads per process (default: $RETRODB_THREADS when set, else the cores this
    process may use (CPU affinity and cgroup quota) minus the 1-minute load average,
    rounded, divided among the local processes; at least 1)."""
    workers: int = 0
    """DataLoader worker processes that fetch batches (0: the training process does; a
    batch is a memory-mapped gather of well under a millisecond)."""
    resume: bool = False
    """Continue from the checkpoint in out (start afresh if there is none)."""

    def __post_init__(self) -> None:
        if self.steps <= 0:
            raise BadInputError(f"steps must be positive, got {self.steps}")
        if self.batch_size <= 0 or self.seq_len <= 0:
            raise BadInputError("batch_size and seq_len must be positive")
        if self.dtype not in ("fp32", "bf16"):
            raise BadInputError(f"dtype must be fp32 or bf16, got {self.dtype!r}")
        if self.no_retrieval and self.retrofit:
            raise BadInputError("--retrofit trains retrieval: it cannot be --no-retrieval")
        if (self.lr is not None and self.lr <= 0) or not 0 <= self.min_lr_ratio <= 1:
            raise BadInputError("lr must be positive and min_lr_ratio in [0, 1]")
        if self.workers < 0 or (self.threads is not None and self.threads < 1):
            raise BadInputError("workers must be >= 0 and threads >= 1")
        if self.log_every < 1 or self.eval_batches < 1 or (self.k is not None and self.k < 1):
            raise BadInputError("log_every, eval_batches and k must be >= 1")
        if self.eval_every < 0 or self.save_every < 0:
            raise BadInputError("eval_every and save_every must be >= 0 (0: only at the end)")
        if not 0 <= self.val_fraction < 1:
            raise BadInputError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0 <= self.distractors < 1:
            raise BadInputError(f"distractors must be in [0, 1), got {self.distractors}")
        if self.distractors and self.no_retrieval:
            raise BadInputError("--distractors trains retrieval: it cannot be --no-retrieval")
        if self.distractors and self.batch_size < 2:
            raise BadInputError(
                "--distractors takes the neighbours of another sequence in the batch: "
                "it needs --batch-size 2 or more"
            )
        object.__setattr__(self, "betas", (float(self.betas[0]), float(self.betas[1])))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainArgs:
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {key: v for key, v in d.items() if key in names}
        if "betas" in kw:
            kw["betas"] = tuple(kw["betas"])
        return cls(**kw)

    @property
    def warmup_steps(self) -> int:
        return self.warmup if self.warmup is not None else max(1, min(100, self.steps // 10))


#: What "retrieval never hurts" asks of an evaluation (bits per byte): retrieval on at most
#: ``overall`` above off; in every bpb(alpha) bucket up to 50 %, at most ``bucket`` above;
#: shuffled neighbours at most ``shuffled`` below off (they must not help).
NEVER_HURT = {"overall": 0.002, "bucket": 0.003, "shuffled": 0.002}
#: The overlap floors ``retrodb calibrate`` tries by default.
FLOORS = (0.0, 0.25, 0.5, 0.75)
#: The null boosts that `retrodb calibrate` tries by default (with every floor).
BOOSTS = (0.0, 1.0, 2.0, 3.0, 4.0)
#: The copy floors (min_run) that `retrodb calibrate` tries by default (with every pair).
MIN_RUNS = (0, 2)


def check_null_boost(boost: float | None) -> None:
    """Refuse a null boost that is not a finite number >= 0 (None: the default)."""
    if boost is not None and not (math.isfinite(boost) and boost >= 0):
        raise BadInputError(f"null_boost must be a finite number >= 0, got {boost}")


#: The longest common run the copy bias counts (`retrodb_model.gate.copy_runs`); longer
#: runs are this long.
COPY_RUN_MAX = 16


def check_min_run(n: int | None) -> None:
    """Refuse a copy floor that is not a whole number of tokens from 0 to COPY_RUN_MAX
    (None: the default)."""
    if n is not None and (
        isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= COPY_RUN_MAX
    ):
        raise BadInputError(f"min_run must be a whole number from 0 to {COPY_RUN_MAX}, got {n!r}")


@dataclass(frozen=True)
class EvalArgs:
    """How an evaluation scores documents; `retrodb evaluate` makes its options from it.
    The defaults that say "the training" come from the checkpoint (a bare model: its
    num_neighbours and max_seq_len)."""

    k: int | None = None
    """Neighbours per chunk (default: the training k)."""
    seq_len: int | None = None
    """Window length (default: the training one)."""
    batch_size: int = 4
    """Windows per forward pass."""
    no_retrieval: bool = False
    """Only evaluate without retrieval (no search)."""
    exclude_self: bool = False
    """Never retrieve from a database document with the evaluated document's id."""
    max_tokens: int | None = None
    """Score only the first N tokens of each document."""
    rerank: str = "none"
    """How the k neighbours are chosen: none (the k nearest keys) or overlap (the k of
    more dense candidates that share the longest token run with the chunk)."""
    fetch: int | None = None
    """With rerank overlap: dense candidates searched per kept neighbour (default 4)."""
    shuffle_seed: int = 0
    """Seed of the shuffled neighbours."""
    shuffle_any_chunk: bool = False
    """Shuffled neighbours may be those of any other chunk, of the same document too (by
    default each chunk gets those of a chunk of another document: after `retrodb add`, a
    document's own chunks are its neighbours, and text of the same document is no
    control)."""
    min_overlap: float | None = None
    """The overlap floor A: a neighbour sharing a token run of fewer than A x the chunk's
    tokens becomes the null neighbour (default: the checkpoint's retrieval.json, else 0)."""
    null_boost: float | None = None
    """Added to the score of CCA's null key (RetrievalParts.set_null_boost): more caution
    with every neighbour (default: the checkpoint's retrieval.json, else 0)."""
    min_run: int | None = None
    """The copy floor (RetrievalParts.set_min_run): a token attends to a neighbour only
    where the text has followed it for this many tokens (default: the checkpoint's
    retrieval.json, else 0: off)."""

    def __post_init__(self) -> None:
        from retrodb.rerank import resolve_fetch  # checks rerank and fetch together

        if self.min_overlap is not None and not 0.0 <= self.min_overlap <= 1.0:
            raise BadInputError(f"min_overlap must be between 0 and 1, got {self.min_overlap}")
        check_null_boost(self.null_boost)
        check_min_run(self.min_run)

        for name in ("k", "seq_len", "max_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise BadInputError(f"{name} must be >= 1, got {value}")
        if self.batch_size < 1:
            raise BadInputError(f"batch_size must be >= 1, got {self.batch_size}")
        resolve_fetch(self.rerank, self.fetch)
