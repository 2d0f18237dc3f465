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
