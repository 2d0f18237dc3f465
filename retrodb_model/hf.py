"""RETRO-fitting a pretrained decoder (the paper's Section 4.2): a Hugging Face checkpoint
folder or a ``.gguf`` file, loaded through transformers and frozen, with chunked
cross-attention after chosen layers and a neighbour encoder trained from scratch.

    base = load_base("SmolLM2-135M-Instruct.Q4_1.gguf")
    model = RetrofitModel(config_for_base(base, chunk_size=64, k=2), base)

The base is not re-implemented: its own forward runs, and hooks on its decoder layers do
the rest. A pre-hook on the conditioning layer encodes the neighbours of the chunks a call
completes, conditioned on that layer's input (as in :class:`~retrodb_model.model.RetroModel`);
a hook on each RETRO layer adds its CCA update to the layer's output. Every CCA's output
projection starts at zero, so at initialisation, and always with retrieval off, the model
*is* the base, logit for logit. The base's parameters never get a gradient and the
checkpoint stores only what was trained, with the base's path and fingerprint.

Supported: the Llama family (Llama, Mistral, Qwen2, Qwen3: SmolLM and TinyLlama are
Llama) and GPT-2 (:data:`SUPPORTED`).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retrodb.errors import BadInputError, MismatchError, NotFoundError
from retrodb.tokenizer import require_gguf
from retrodb_model.cache import Encoded, RetroCache
from retrodb_model.config import RetroConfig
from retrodb_model.kernels import IGNORE_INDEX, head_cross_entropy
from retrodb_model.model import (
    ChunkedCrossAttention,
    NeighbourEncoder,
    RetrievalParts,
    RetroModel,
    Rotary,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel

#: The ``model_type`` of the bases a retrofit accepts.
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gpt2")
#: The files of a base folder that its fingerprint covers (the weights and the shape).
_FINGERPRINTED = (".safetensors", ".bin", ".gguf")
#: The RetroConfig fields a base decides; --model may not change them.
BASE_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "head_dim")


def is_base_path(path: str | Path) -> bool:
    """Whether ``path`` is a pretrained base rather than a retrodb checkpoint: a ``.gguf``
    file, or a folder whose config.json is a Hugging Face one (it names a model_type)."""
    p = Path(path)
    if p.suffix == ".gguf":
        return True
    config = p / "config.json"
    if not (p.is_dir() and config.is_file()):
        return False
    try:
        return "model_type" in json.loads(config.read_text())
    except (OSError, json.JSONDecodeError):
        return False


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def base_fingerprint(path: str | Path) -> str:
    """``sha256:`` and a digest of the base's weights: of the file itself for a .gguf (what
    ``sha256sum`` prints), else of config.json and every weight file of the folder."""
    p = Path(path)
    if p.is_file():
        return "sha256:" + _sha256(p)
    files = [p / "config.json"] + sorted(
        f for f in p.iterdir() if f.is_file() and f.suffix in _FINGERPRINTED
    )
    lines = "".join(f"{f.name} {_sha256(f)}\n" for f in files)
    return "sha256:" + hashlib.sha256(lines.encode()).hexdigest()


def load_base(path: str | Path) -> PreTrainedModel:
    """The causal language model at ``path`` (a Hugging Face folder or a .gguf file, read
    from disk only), in fp32 and eval mode, every parameter frozen."""
    p = Path(path)
    if not p.exists():
        raise NotFoundError(f"{p}: base model not found")
    from transformers import AutoModelForCausalLM

    try:
        if p.suffix == ".gguf":
            require_gguf(p)
            model = AutoModelForCausalLM.from_pretrained(
                str(p.parent), gguf_file=p.name, local_files_only=True, dtype=torch.float32
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(
                str(p), local_files_only=True, dtype=torch.float32
            )
    except (OSError, ValueError, KeyError) as exc:
        raise BadInputError(f"{p}: cannot load a causal language model from it ({exc})") from exc
    kind = getattr(model.config, "model_type", None)
    if kind not in SUPPORTED:
        raise BadInputError(
            f"{p}: a {kind!r} model; a retrofit supports {', '.join(SUPPORTED)} bases"
        )
    model.eval()
    model.requires_grad_(False)
    return model


def base_info(
    path: str | Path, base: PreTrainedModel, tokenizer_fingerprint: str
) -> dict[str, Any]:
    """What a retrofit checkpoint records of its base (the ``base`` of its config.json)."""
    p = Path(path).resolve()
    return {
        "path": str(p),
        "sha256": base_fingerprint(p),
        "format": "gguf" if p.suffix == ".gguf" else "huggingface",
        "model_type": base.config.model_type,
        "parameters": sum(t.numel() for t in base.parameters()),
        "tokenizer_fingerprint": tokenizer_fingerprint,
    }


def decoder_layers(base: PreTrainedModel) -> nn.ModuleList:
    """The base's decoder layers, in order."""
    backbone = base.base_model
    for name in ("layers", "h"):
        layers = getattr(backbone, name, None)
        if isinstance(layers, nn.ModuleList) and len(layers) == base.config.num_hidden_layers:
            return layers
    raise BadInputError(f"cannot find the decoder layers of a {base.config.model_type} model")


def config_for_base(
    base: PreTrainedModel,
    *,
    chunk_size: int,
    k: int,
    pad_id: int | None = None,
    **overrides: Any,
) -> RetroConfig:
    """The RetroConfig of a retrofit of ``base``: the base decides the vocabulary, width,
    depth and heads (CCA uses the base's head shape); RETRO layers default to the paper's
    spacing (every third layer from layer 6). ``overrides`` (``--model KEY=VALUE``) set the
    retrieval modules: retro_layers, enc_dim, enc_layers, cca_overlap_gate, ..."""
    c = base.config
    dim, heads = int(c.hidden_size), int(c.num_attention_heads)
    shape = {
        "vocab_size": int(c.vocab_size),
        "dim": dim,
        "n_layers": int(c.num_hidden_layers),
        "n_heads": heads,
        "head_dim": int(getattr(c, "head_dim", None) or dim // heads),
    }
    for name, value in shape.items():
        if name in overrides and overrides[name] != value:
            raise BadInputError(f"--model {name}={overrides[name]}: the base's {name} is {value}")
    positions = getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None)
    fields: dict[str, Any] = {
        "chunk_size": chunk_size,
        "num_neighbours": k,
        "max_seq_len": int(positions or 2048),
        "tie_embeddings": bool(getattr(c, "tie_word_embeddings", False)),
        "pad_id": pad_id,
        **overrides,
        **shape,
    }
    return RetroConfig(**fields)


@dataclass
class RetrofitCache(RetroCache):
    """A :class:`RetroCache` whose self-attention keys and values are the base's own
    cache (``past``, a transformers ``DynamicCache``); the CCA part is unchanged."""

    past: Any = None


@dataclass
class _Call:
    """What the hooks of one forward need: the call's tokens and neighbours, the cache,
    the first position, and the neighbours encoded by the conditioning layer's pre-hook."""

    tokens: Tensor
    retrieved: Tensor
    mask: Tensor | None
    cache: RetroCache | None
    start: int
    n_tokens: int
    encoded: Encoded | None = None


class RetrofitModel(RetrievalParts):
    """A frozen pretrained decoder with RETRO's neighbour encoder and chunked
    cross-attention. ``cfg`` (:func:`config_for_base`) holds the base's shape and the
    retrieval modules' settings; its decoder-only fields (ff_mult for the decoder,
    tie_embeddings) describe nothing that is trained. ``info``: what the checkpoint records
    of the base (:func:`base_info`)."""

    def __init__(
        self, cfg: RetroConfig, base: PreTrainedModel, *, info: dict[str, Any] | None = None
    ) -> None:
        super().__init__()
        got = config_for_base(base, chunk_size=cfg.chunk_size, k=cfg.num_neighbours)
        for name in BASE_FIELDS:
            if getattr(cfg, name) != getattr(got, name):
                ours, theirs = getattr(cfg, name), getattr(got, name)
                raise MismatchError(f"the retrofit's {name} is {ours}, its base's {theirs}")
        self.cfg, self.info = cfg, dict(info or {})
        self.base = base.eval()
        self.base.requires_grad_(False)
        self.encoder = NeighbourEncoder(cfg)
        self.cca = nn.ModuleDict({str(i): ChunkedCrossAttention(cfg) for i in cfg.retro_layers})
        self.rope = Rotary(cfg.head_dim, max(cfg.neighbour_len, 2 * cfg.chunk_size), cfg.rope_base)
        for module in (self.encoder, self.cca):
            module.apply(RetroModel._init_weights)
        for name, p in self.encoder.named_parameters():
            if name.endswith(("proj.weight", "down.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.enc_layers))
        for cca in self._ccas():  # at initialisation the model is its base
            nn.init.zeros_(cca.attn.proj.weight)
        forward = inspect.signature(base.base_model.forward).parameters
        self._cache_kw = "cache" if "cache" in forward else "past_key_values"
        self._call: _Call | None = None
        layers = decoder_layers(base)
        condition = layers[cfg.dec_enc_condition_layer - 1]
        condition.register_forward_pre_hook(self._condition, with_kwargs=True)
        for i in cfg.retro_layers:
            layers[i - 1].register_forward_hook(functools.partial(self._add_cca, i - 1))

    # ---- parameters ---------------------------------------------------------------------

    def embed_neighbours(self, ids: Tensor) -> Tensor:
        return self.base.get_input_embeddings()(ids)

    def _ccas(self) -> list[ChunkedCrossAttention]:
        return [cast(ChunkedCrossAttention, c) for c in self.cca.values()]

    def retrieval_modules(self) -> list[nn.Module]:
        return [self.encoder, *self.cca.values()]

    def checkpoint_tensors(self) -> dict[str, Tensor]:
        """What a checkpoint stores: the trained modules only (never the base)."""
        return {k: t for k, t in self.state_dict().items() if not k.startswith("base.")}

    def load_checkpoint_tensors(self, tensors: dict[str, Tensor], *, where: str) -> None:
        missing, unexpected = self.load_state_dict(tensors, strict=False)
        missing = [key for key in missing if not key.startswith("base.")]
        if missing or unexpected:
            raise MismatchError(
                f"{where}: weights do not fit the configuration (missing {missing[:3]}, "
                f"unexpected {unexpected[:3]})"
            )

    def freeze_for_retrofit(self) -> tuple[int, int]:
        """(trainable, total) parameter counts; only the retrieval modules train."""
        params = {id(p): p for p in self.parameters()}.values()
        trainable = sum(p.numel() for p in params if p.requires_grad)
        return trainable, sum(p.numel() for p in params)

    def train(self, mode: bool = True) -> RetrofitModel:
        """Train mode for the retrieval modules; the frozen base stays in eval mode."""
        super().train(mode)
        self.base.eval()
        return self

    def _head(self, h: Tensor, targets: Tensor | None) -> tuple[Tensor, Tensor | None]:
        head = self.base.get_output_embeddings()
        if targets is None:
            return head(h), None
        if getattr(head, "bias", None) is None:
            return head_cross_entropy(h, head.weight, targets)
        logits = head(h)
        loss = F.cross_entropy(
            logits.float().view(-1, logits.shape[-1]),
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
        )
        return logits, loss

    # ---- forward ------------------------------------------------------------------------

    def forward(
        self,
        tokens: Tensor,
        retrieved: Tensor | None = None,
        retrieved_mask: Tensor | None = None,
        targets: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """As :meth:`RetroModel.forward`: logits (B, T, V), and the mean loss in nats over
        the targets that are not -100 when targets are given. ``retrieved`` None: the
        base alone."""
        if targets is not None and targets.shape != tokens.shape:
            raise ValueError(f"targets {tuple(targets.shape)} != tokens {tuple(tokens.shape)}")
        return self._head(self._decode(tokens, retrieved, retrieved_mask, cache=None), targets)

    def new_cache(
        self,
        batch_size: int,
        *,
        retrieval: bool = True,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> RetrofitCache:
        """An empty cache for :meth:`forward_step`: the base's own key/value cache and the
        CCA cache. ``device`` and ``dtype`` are the base's (the base's cache follows it)."""
        from transformers import DynamicCache

        cfg = self.cfg
        max_len = cfg.max_seq_len if max_len is None else max_len
        if not 1 <= max_len <= cfg.max_seq_len:
            raise ValueError(f"max_len {max_len} must lie in 1..max_seq_len={cfg.max_seq_len}")
        try:
            past = DynamicCache(config=self.base.config)
        except TypeError:  # transformers releases whose DynamicCache takes no config
            past = DynamicCache()
        return RetrofitCache(batch_size, max_len, cfg.chunk_size, retrieval, [], [], past=past)

    @torch.no_grad()
    def forward_step(
        self,
        tokens: Tensor,
        cache: RetroCache,
        retrieved: Tensor | None = None,
        retrieved_mask: Tensor | None = None,
    ) -> Tensor:
        """As :meth:`RetroModel.forward_step`: logits (B, t, V) of t more tokens."""
        return self._head(self._decode(tokens, retrieved, retrieved_mask, cache=cache), None)[0]

    def _decode(
        self,
        tokens: Tensor,
        retrieved: Tensor | None,
        retrieved_mask: Tensor | None,
        cache: RetroCache | None,
    ) -> Tensor:
        """The base's final (normalised) states (B, T, D), with CCA when neighbours come."""
        retrieved = self._check_inputs(tokens, retrieved, retrieved_mask, cache)
        start, T = (0 if cache is None else cache.pos), tokens.shape[1]
        kwargs: dict[str, Any] = {"use_cache": cache is not None}
        if cache is not None:
            kwargs[self._cache_kw] = getattr(cache, "past", None)
        if retrieved is not None:
            self._call = _Call(tokens, retrieved, retrieved_mask, cache, start, T)
        try:
            out = self.base.base_model(input_ids=tokens, **kwargs)
        finally:
            self._call = None
        if cache is not None:
            cache.advance(tokens)
        return out.last_hidden_state

    # ---- the hooks ----------------------------------------------------------------------

    def _condition(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Pre-hook of the conditioning layer: encode the new chunks' neighbours."""
        call = self._call
        if call is not None:
            x = args[0] if args else kwargs["hidden_states"]  # (B, T, D)
            call.encoded = self._encode_new_chunks(
                x, call.tokens, call.retrieved, call.mask, call.cache
            )

    def _add_cca(self, layer: int, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        """Hook of RETRO layer ``layer`` (0-based): its output plus the CCA update."""
        call = self._call
        if call is None:
            return None
        cca = cast(ChunkedCrossAttention, self.cca[str(layer + 1)])
        inputs = self._cca_inputs(layer, cca, call.encoded, call.cache, call.tokens, call.start)
        if inputs is None:
            return None
        h = output[0] if isinstance(output, tuple) else output  # (B, T, D)
        h = h + cca(
            h,
            inputs.keys,
            inputs.values,
            inputs.valid,
            self.rope,
            start=call.start,
            first_chunk=inputs.first_chunk,
            overlap=inputs.overlap,
            text=inputs.text,
            neighbour_tokens=inputs.tokens,
        )
        return (h, *output[1:]) if isinstance(output, tuple) else h


__all__ = [
    "SUPPORTED",
    "RetrofitCache",
    "RetrofitModel",
    "base_fingerprint",
    "base_info",
    "config_for_base",
    "decoder_layers",
    "is_base_path",
    "load_base",
]
