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
import os
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

    The checkpoint must hold ``config.json`` and ``model.safetensors`` (or
    ``pytorch_model.bin``); it is loaded with ``AutoModel`` from local files only, in eval
    mode with eager attention, and exported with the TorchScript exporter
    (``dynamo=False``) at ``opset`` with dynamic batch and sequence axes. Mean pooling over
    the attention mask is part of the graph.

    Returns ``{"dim", "input_names", "output_name", "max_position_embeddings"}``.
    """
    _offline()
    import torch
    from transformers import AutoModel

    checkpoint = Path(checkpoint)
    if not (checkpoint / "config.json").is_file():
        raise BadInputError(f"{checkpoint}: not a BERT checkpoint (config.json is missing)")
    if not any((checkpoint / w).is_file() for w in WEIGHT_FILES):
        raise BadInputError(
            f"{checkpoint}: not a BERT checkpoint ({' or '.join(WEIGHT_FILES)} is missing)"
        )
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
    out = Path(out)
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
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

    Weights are quantized per output channel (``per_channel=True``), which keeps the
    pooled vectors much closer to fp32 than per-tensor scales; activations are quantized
    at run time. ``src`` is left unchanged.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(
            str(src),
            str(dst),
            per_channel=True,
            weight_type=QuantType.QInt8,
        )
