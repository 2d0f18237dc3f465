"""A local Hugging Face BERT checkpoint -> ONNX, and int8 quantization of the result.

This is the only module of ``retrodb`` that uses PyTorch and transformers, and it imports
them inside its functions: ``import retrodb.export`` stays cheap and torch-free until an
export actually runs. Nothing here touches the network: models load with
``local_files_only=True`` and the Hugging Face offline switches are set before
transformers is imported.

The exported graph takes ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the
model has them), all int64 ``[batch, seq]``, and returns one output, ``sentence_embedding``
float32 ``[batch, dim]``: the last hidden state mean-pooled over the attention mask
(not normalised; normalisation is a runtime setting of the encoder).
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

from .errors import BadInputError

#: Name of the pooled output of graphs exported here.
POOLED_OUTPUT = "sentence_embedding"

#: Weight files of a checkpoint, in order of preference.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _offline() -> None:
    """Make sure huggingface_hub / transformers never reach for the network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def export_bert_onnx(checkpoint: Path, out: Path, *, opset: int = 17) -> dict[str, Any]:
    """Export the BERT checkpoint directory ``checkpoint`` to the ONNX file ``out``.

    The export runs in a child Python process that imports torch before anything else:
    usearch (imported by ``retrodb``) bundles its own C++ runtime, and when it is loaded
    before torch, TorchScript tracing of BERT never finishes (checked with usearch 2.26 and
    torch 2.13). The child also keeps the model's memory out of this process.

    The checkpoint must hold ``config.json`` and ``model.safetensors`` (or
    ``pytorch_model.bin``); it is loaded with ``AutoModel`` from local files only, in eval
    mode with eager attention, and exported with the TorchScript exporter
    (``dynamo=False``) at ``opset`` with dynamic batch and sequence axes. Mean pooling over
    the attention mask is part of the graph.

    Returns ``{"dim", "input_names", "output_name", "max_position_embeddings"}``.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    _check_checkpoint(checkpoint)
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    env.update(HF_HUB_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error")
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    code = "import torch, sys; from retrodb.export import _child; sys.exit(_child(sys.argv[1:]))"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(checkpoint), str(out), str(opset)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    lines = proc.stdout.strip().splitlines()
    try:
        reply: dict[str, Any] = json.loads(lines[-1]) if lines else {}
    except ValueError:
        reply = {}
    if proc.returncode == 0 and "dim" in reply:
        return reply
    if "error" in reply:
        raise BadInputError(reply["error"])
    tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
    raise BadInputError(f"{checkpoint}: ONNX export failed (exit {proc.returncode}): {tail}")


def _check_checkpoint(checkpoint: Path) -> None:
    """BadInputError naming the first file a BERT checkpoint directory lacks."""
    if not (checkpoint / "config.json").is_file():
        raise BadInputError(f"{checkpoint}: not a BERT checkpoint (config.json is missing)")
    if not any((checkpoint / w).is_file() for w in WEIGHT_FILES):
        raise BadInputError(
            f"{checkpoint}: not a BERT checkpoint ({' or '.join(WEIGHT_FILES)} is missing)"
        )


def _child(argv: list[str]) -> int:
    """Entry point of the export child process: one JSON line on stdout, the reply."""
    checkpoint, out, opset = Path(argv[0]), Path(argv[1]), int(argv[2])
    try:
        info = _export_in_process(checkpoint, out, opset=opset)
    except BadInputError as e:
        sys.stdout.write(json.dumps({"error": str(e)}) + "\n")
        return 2
    sys.stdout.write(json.dumps(info) + "\n")
    return 0


def _export_in_process(checkpoint: Path, out: Path, *, opset: int) -> dict[str, Any]:
    """The export itself (see :func:`export_bert_onnx`); torch must be imported before usearch."""
    _offline()
    import torch
    from transformers import AutoModel

    _check_checkpoint(checkpoint)
    try:
        model = AutoModel.from_pretrained(
            str(checkpoint), local_files_only=True, attn_implementation="eager"
        )
    except (OSError, ValueError, KeyError) as e:
        raise BadInputError(f"{checkpoint}: cannot load the checkpoint: {e}") from e
    model.eval()
    hidden = int(model.config.hidden_size)
    takes_types = "token_type_ids" in inspect.signature(model.forward).parameters
    input_names = ["input_ids", "attention_mask"] + (["token_type_ids"] if takes_types else [])

    class MeanPooled(torch.nn.Module):
        """BERT followed by mean pooling over the attention mask."""

        def __init__(self, bert: torch.nn.Module) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            kwargs = dict(zip(input_names, inputs, strict=True))
            # Positions 0..T-1 from the input's shape (BERT's default), passed explicitly so
            # the graph does not depend on the model's stored position buffer.
            seq = kwargs["input_ids"].shape[1]
            kwargs["position_ids"] = torch.arange(seq, device=inputs[0].device).unsqueeze(0)
            last = self.bert(**kwargs).last_hidden_state  # (B, T, d)
            mask = kwargs["attention_mask"].unsqueeze(-1).to(last.dtype)  # (B, T, 1)
            summed = (last * mask).sum(dim=1)  # (B, d)
            return summed / mask.sum(dim=1).clamp(min=1e-9)

    wrapper = MeanPooled(model).eval()
    # Two rows of different lengths, so that nothing about padding is baked in as a constant.
    ids = torch.tensor([[101, 7592, 2088, 102], [101, 7592, 102, 0]], dtype=torch.long)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.long)
    args: tuple[torch.Tensor, ...] = (ids, mask)
    if takes_types:
        args = (*args, torch.zeros_like(ids))
    axes = {name: {0: "batch", 1: "sequence"} for name in input_names}
    axes[POOLED_OUTPUT] = {0: "batch"}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            args,
            str(out),
            input_names=input_names,
            output_names=[POOLED_OUTPUT],
            dynamic_axes=axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    return {
        "dim": hidden,
        "input_names": input_names,
        "output_name": POOLED_OUTPUT,
        "max_position_embeddings": int(getattr(model.config, "max_position_embeddings", 0)),
    }


def quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic int8 quantization of the fp32 ONNX model ``src`` into ``dst``.

    The weight matrices of MatMul nodes are quantized per output channel
    (``per_channel=True``), which keeps the pooled vectors much closer to fp32 than
    per-tensor scales; their activations are quantized at run time. Embedding tables and
    the attention's activation-by-activation products stay fp32. ``src`` is left unchanged.
    """
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The quantizer logs advice through the root logger; the library stays quiet.
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(
                str(src),
                str(dst),
                per_channel=True,
                weight_type=QuantType.QInt8,
                # Only the weight matrices: quantizing the attention's activation-by-activation
                # products (and the embedding tables) costs accuracy and, here, speed.
                op_types_to_quantize=["MatMul"],
                extra_options={"MatMulConstBOnly": True},
            )
    finally:
        logging.disable(previous)


#: Version of :func:`convert_fp16`'s recipe; part of the key under which converted models
#: are cached, so a changed recipe never reuses an old conversion.
FP16_RECIPE = 1

#: Normalisation ops whose output is a layer's hidden state; pooling follows the last one.
_NORM_OPS = ("LayerNormalization", "SkipLayerNormalization", "EmbedLayerNormalization")


def attention_heads(model: Any, hidden_size: int) -> int | None:
    """The number of attention heads of the BERT graph ``model`` (an ``onnx.ModelProto``).

    Read from the shapes its attention reshapes to: ``[batch, seq, heads, head_dim]``, where
    transformers writes ``heads`` as -1 (inferred) and ``head_dim`` as a constant, as a
    Concat of constants or as one 4-element initializer. None when no such reshape is found.
    """
    from collections import Counter

    from onnx import numpy_helper

    consts: dict[str, list[int]] = {}
    for init in model.graph.initializer:
        if init.data_type == 7 and len(init.dims) <= 1:  # int64 vectors
            consts[init.name] = numpy_helper.to_array(init).reshape(-1).tolist()
    producer: dict[str, Any] = {}
    for node in model.graph.node:
        for out in node.output:
            producer[out] = node
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type == 7:
                    consts[node.output[0]] = numpy_helper.to_array(attr.t).reshape(-1).tolist()
    found: Counter[int] = Counter()
    for node in model.graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2:
            continue
        shape: list[int] | None = consts.get(node.input[1])
        source = producer.get(node.input[1])
        if shape is None and source is not None and source.op_type == "Concat":
            parts = [consts.get(name) for name in source.input]
            if len(parts) == 4 and parts[2] is not None and parts[3] is not None:
                shape = [0, 0, *parts[2], *parts[3]]
        if shape is None or len(shape) != 4:
            continue
        heads, head_dim = shape[2], shape[3]
        if heads > 0 and head_dim > 0 and heads * head_dim == hidden_size:
            found[heads] += 1
        elif heads == -1 and head_dim > 0 and hidden_size % head_dim == 0:
            found[hidden_size // head_dim] += 1
    return found.most_common(1)[0][0] if found else None


def convert_fp16(src: Path, *, hidden_size: int, num_heads: int | None = None) -> bytes:
    """The fp32 BERT graph ``src`` made into an fp16 graph for GPUs; returns the model bytes.

    ONNX Runtime's transformer optimizer fuses the BERT subgraphs (Attention,
    SkipLayerNormalization, BiasGelu) with its Python fusions only (``opt_level=0``: no
    session, so the result does not depend on which ONNX Runtime build or device is
    present), then the graph is converted to float16. Inputs and outputs keep their types
    (int64 in, float32 out), and the mean pooling after the last layer normalisation stays
    float32, so that summing long sequences cannot overflow float16. ``num_heads`` defaults
    to :func:`attention_heads`; when it cannot be found, attention is left unfused (slower,
    same result). ``src`` is left unchanged. BadInputError if ``src`` cannot be converted.
    """
    import logging

    import onnx

    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # the optimizer logs advice; the library stays quiet
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from onnxruntime.transformers import optimizer

            try:
                proto = onnx.load(str(src))
            except Exception as e:  # onnx raises DecodeError and friends
                raise BadInputError(f"{src}: cannot read the ONNX model: {e}") from e
            heads = num_heads or attention_heads(proto, hidden_size) or 0
            model = optimizer.optimize_model(
                proto,
                model_type="bert",
                num_heads=heads,
                hidden_size=hidden_size if heads else 0,
                opt_level=0,
                use_gpu=True,
            )
            graph = model.model.graph
            for i, node in enumerate(graph.node):
                if not node.name:
                    node.name = f"{node.op_type}_{i}"
            model.convert_float_to_float16(
                keep_io_types=True, node_block_list=_pooling_nodes(graph)
            )
            return bytes(model.model.SerializeToString())
    except BadInputError:
        raise
    except Exception as e:  # the optimizer raises whatever its graph walk meets
        raise BadInputError(f"{src}: cannot convert the model to float16: {e}") from e
    finally:
        logging.disable(previous)


def _pooling_nodes(graph: Any) -> list[str]:
    """Names of the nodes that the graph's last normalisation (the last hidden state) does
    not depend on: the pooling and its mask arithmetic."""
    last = None
    for node in graph.node:  # ONNX graphs are stored in topological order
        if node.op_type in _NORM_OPS:
            last = node
    if last is None:
        return []
    producer = {out: node for node in graph.node for out in node.output}
    needed: set[str] = set()
    todo = [last]
    while todo:
        node = todo.pop()
        if node.name in needed:
            continue
        needed.add(node.name)
        todo.extend(producer[name] for name in node.input if name in producer)
    return [node.name for node in graph.node if node.name not in needed]
