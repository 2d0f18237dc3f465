"""retrodb.export and prepare_encoder's sources: ONNX matches PyTorch, int8 stays close,
the fp16 GPU model converts and agrees with fp32, an exported .onnx (pooled or plain
BertModel) works, bad sources fail cleanly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from retrodb.config import EncoderConfig
from retrodb.encoder import Encoder
from retrodb.encoder_prepare import prepare_encoder
from retrodb.errors import BadInputError, MismatchError, NotFoundError
from retrodb.export import attention_heads, convert_fp16

from .encoder_fixtures import make_tiny_bert

TEXTS = [
    "",
    "Hello world.",
    "Chunked cross-attention lets each chunk attend to the neighbours of the previous one.",
    "A frozen BERT turns each chunk into a key: a mean-pooled sentence embedding. " * 3,
    "retrieval " * 400,  # longer than max_length: truncated
]


def _pytorch_mean_pooled(checkpoint: Path, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """Reference: transformers' BertModel in eager PyTorch, mean pooled and normalised."""
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(checkpoint), local_files_only=True).eval()
    with torch.no_grad():
        feed = {k: torch.from_numpy(v) for k, v in inputs.items()}
        last = model(**feed).last_hidden_state  # (n, T, d)
        mask = feed["attention_mask"].unsqueeze(-1).float()
        pooled = (last * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        pooled = torch.nn.functional.normalize(pooled, dim=-1)
    return pooled.numpy()


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


def test_onnx_matches_pytorch(minilm_encoder: Encoder, minilm_checkpoint: Path) -> None:
    inputs = minilm_encoder.tokenize(TEXTS)
    assert inputs["input_ids"].shape[1] == 256  # the long text is truncated
    reference = _pytorch_mean_pooled(minilm_checkpoint, inputs)
    ours = minilm_encoder.encode(TEXTS)
    assert _cosines(ours, reference).min() >= 0.9999
    np.testing.assert_allclose(ours, reference, atol=1e-4)


def test_int8_stays_close_to_fp32(
    minilm_encoder: Encoder, minilm_int8_encoder_dir: Path, record_property
) -> None:
    int8 = Encoder.open(minilm_int8_encoder_dir)
    assert int8.quantize == "int8" and int8.dim == minilm_encoder.dim
    assert int8.fingerprint != minilm_encoder.fingerprint
    size8 = (minilm_int8_encoder_dir / "model.onnx").stat().st_size
    size32 = (minilm_encoder.directory / "model.onnx").stat().st_size
    assert size8 < size32 * 0.7  # the embedding table stays fp32
    cos = _cosines(int8.encode(TEXTS), minilm_encoder.encode(TEXTS))
    record_property("int8_cosine_min", float(cos.min()))
    record_property("int8_cosine_mean", float(cos.mean()))
    # Measured: mean 0.987, min 0.977 (the empty string; short texts suffer most).
    assert cos.mean() >= 0.98 and cos.min() >= 0.97


def test_int8_from_a_checkpoint_equals_int8_from_its_fp32_encoder_directory(
    tiny_bert_checkpoint: Path,
    tiny_encoder_dir: Path,
    tiny_encoder: Encoder,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Quantizing an fp32 encoder directory gives the encoder that exporting its checkpoint
    with int8 gives. The export itself is tested above (and made the tiny encoder): here
    it is replaced by a copy of its result, so that only what follows it runs."""
    from retrodb import export

    meta = json.loads((tiny_encoder_dir / "encoder.json").read_text())

    def exported(checkpoint: Path, out: Path, **_: object) -> dict[str, object]:
        assert checkpoint == tiny_bert_checkpoint
        shutil.copyfile(tiny_encoder_dir / "model.onnx", out)
        names = ("dim", "input_names", "output_name")
        return {**{k: meta[k] for k in names}, "max_position_embeddings": 512}

    monkeypatch.setattr(export, "export_bert_onnx", exported)
    int8 = EncoderConfig(quantize="int8")
    prepare_encoder(tiny_bert_checkpoint, tmp_path / "exported", config=int8)
    prepare_encoder(tiny_encoder_dir, tmp_path / "quantized", config=int8)
    a, b = Encoder.open(tmp_path / "exported"), Encoder.open(tmp_path / "quantized")
    assert a.quantize == b.quantize == "int8" and a.fingerprint == b.fingerprint
    assert a.settings == b.settings
    assert (tmp_path / "exported" / "model.onnx").read_bytes() == (
        tmp_path / "quantized" / "model.onnx"
    ).read_bytes()
    assert sorted(p.name for p in (tmp_path / "exported").iterdir()) == sorted(
        ("encoder.json", "model.onnx", "tokenizer.json")
    )  # the fp32 export is not kept
    assert _cosines(b.encode(TEXTS[1:]), tiny_encoder.encode(TEXTS[1:])).min() > 0.9
    # an int8 directory is never "de-quantized", and other settings must still match
    with pytest.raises(MismatchError, match="quantize='int8'"):
        prepare_encoder(tmp_path / "quantized", tmp_path / "back", config=EncoderConfig())
    with pytest.raises(MismatchError, match="max_length"):
        prepare_encoder(
            tiny_encoder_dir, tmp_path / "e3", config=EncoderConfig(max_length=64, quantize="int8")
        )
    assert not (tmp_path / "back").exists() and not (tmp_path / "e3").exists()


def test_exported_onnx_as_source(
    tiny_encoder_dir: Path, tiny_encoder: Encoder, tmp_path: Path
) -> None:
    loose = tmp_path / "loose"
    loose.mkdir()
    shutil.copyfile(tiny_encoder_dir / "model.onnx", loose / "exported.onnx")
    with pytest.raises(BadInputError, match="tokenizer.json"):
        prepare_encoder(loose / "exported.onnx", tmp_path / "e1", config=EncoderConfig())
    assert not (tmp_path / "e1").exists()
    shutil.copyfile(tiny_encoder_dir / "tokenizer.json", loose / "tokenizer.json")
    prepare_encoder(loose / "exported.onnx", tmp_path / "e2", config=EncoderConfig())
    enc = Encoder.open(tmp_path / "e2", threads=1)
    assert enc.dim == tiny_encoder.dim and enc.pooling_in_graph
    assert enc.settings["source"] == "exported.onnx"
    assert enc.fingerprint == tiny_encoder.fingerprint
    np.testing.assert_allclose(enc.encode(TEXTS), tiny_encoder.encode(TEXTS), atol=1e-6)


def _plain_bert_graph(pooled: Path, out: Path, dim: int) -> None:
    """The BERT of a pooled encoder graph as a plain BertModel export looks: inputs
    ``input_ids`` and ``attention_mask`` (token types all zero), one output
    ``last_hidden_state`` [b, t, d], dynamic axes; no pooling."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(pooled))
    last = [n for n in model.graph.node if n.op_type == "LayerNormalization"][-1].output[0]
    onnx.utils.extract_model(
        str(pooled), str(out), ["input_ids", "attention_mask", "token_type_ids"], [last]
    )
    plain = onnx.load(str(out))
    graph = plain.graph
    graph.input.remove(next(i for i in graph.input if i.name == "token_type_ids"))
    zeros = helper.make_node("Sub", ["input_ids", "input_ids"], ["token_type_ids"])
    graph.node.insert(0, zeros)
    graph.node.append(helper.make_node("Identity", [last], ["last_hidden_state"]))
    del graph.output[:]
    graph.output.append(
        helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["b", "t", dim])
    )
    onnx.checker.check_model(plain)
    onnx.save(plain, str(out))


def test_plain_bertmodel_onnx_is_pooled_in_numpy(
    tiny_encoder_dir: Path, tiny_encoder: Encoder, tmp_path: Path
) -> None:
    """A plain BertModel export (``last_hidden_state`` first, dynamic axes) is pooled here:
    the tiny encoder's BERT without its pooling gives the tiny encoder's keys."""
    onnx_path = tmp_path / "plain" / "bert.onnx"
    onnx_path.parent.mkdir()
    _plain_bert_graph(tiny_encoder_dir / "model.onnx", onnx_path, tiny_encoder.dim)
    shutil.copyfile(tiny_encoder_dir / "tokenizer.json", onnx_path.parent / "tokenizer.json")
    prepare_encoder(onnx_path, tmp_path / "enc", config=EncoderConfig())
    enc = Encoder.open(tmp_path / "enc", threads=1)
    assert enc.dim == 32 and not enc.pooling_in_graph
    assert enc.settings["input_names"] == ["input_ids", "attention_mask"]
    np.testing.assert_allclose(enc.encode(TEXTS), tiny_encoder.encode(TEXTS), atol=1e-5)


def test_vocab_txt_checkpoint_builds_the_same_tokenizer(
    tmp_path: Path, tiny_encoder: Encoder
) -> None:
    ckpt = make_tiny_bert(tmp_path / "ckpt", tokenizer_files=("vocab.txt", "tokenizer_config.json"))
    prepare_encoder(ckpt, tmp_path / "enc", config=EncoderConfig())
    enc = Encoder.open(tmp_path / "enc", threads=1)
    assert enc.settings["do_lower_case"] is True
    texts = [*TEXTS, "MiXeD CaSe, accents: café naïve; 中文 ok?"]
    ours, theirs = enc.tokenize(texts), tiny_encoder.tokenize(texts)
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name])
    # The same weights (seed 0) exported again give byte-identical models: fingerprints of
    # re-exported checkpoints can be compared.
    assert (tmp_path / "enc" / "model.onnx").read_bytes() == (
        tiny_encoder.directory / "model.onnx"
    ).read_bytes()


def test_missing_source_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="no-such-model"):
        prepare_encoder(tmp_path / "no-such-model", tmp_path / "enc", config=EncoderConfig())
    assert not (tmp_path / "enc").exists()


@pytest.mark.parametrize(
    ("files", "missing"),
    [
        ((), "config.json"),
        (("config.json",), "model.safetensors"),
        (("config.json", "model.safetensors"), "vocab.txt"),
    ],
)
def test_bogus_checkpoint_names_the_missing_file(
    tiny_bert_checkpoint: Path, tmp_path: Path, files: tuple[str, ...], missing: str
) -> None:
    bogus = tmp_path / "bogus"
    bogus.mkdir()
    (bogus / "README.md").write_text("not a model")
    for name in files:
        shutil.copyfile(tiny_bert_checkpoint / name, bogus / name)
    with pytest.raises(BadInputError, match=missing):
        prepare_encoder(bogus, tmp_path / "enc", config=EncoderConfig())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bogus"]  # no temp dir left


def test_unknown_file_type_is_bad_input(tmp_path: Path) -> None:
    (tmp_path / "model.bin").write_bytes(b"\0" * 16)
    with pytest.raises(BadInputError, match="model.bin"):
        prepare_encoder(tmp_path / "model.bin", tmp_path / "enc", config=EncoderConfig())


def test_max_length_beyond_the_model_is_bad_input(
    tiny_bert_checkpoint: Path, tmp_path: Path
) -> None:
    with pytest.raises(BadInputError, match="max_position_embeddings"):
        prepare_encoder(
            tiny_bert_checkpoint, tmp_path / "enc", config=EncoderConfig(max_length=1024)
        )


def _run_fp16(model: bytes, enc: Encoder, texts: list[str]) -> np.ndarray:
    """The converted model on ONNX Runtime's CPU provider (which has fp16 kernels)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
    out = session.run(None, enc.tokenize(texts))[0]
    assert out.dtype == np.float32 and out.shape == (len(texts), enc.dim)
    return out


def test_fp16_conversion_of_the_tiny_model(tiny_encoder: Encoder) -> None:
    import onnx

    src = tiny_encoder.directory / "model.onnx"
    assert attention_heads(onnx.load(str(src)), tiny_encoder.dim) == 2
    before = src.read_bytes()
    model = onnx.load_from_string(convert_fp16(src, hidden_size=tiny_encoder.dim))
    assert src.read_bytes() == before
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Attention") == 2 and ops.count("SkipLayerNormalization") == 4
    float_inits = {i.data_type for i in model.graph.initializer if i.data_type in (1, 10)}
    assert float_inits == {onnx.TensorProto.FLOAT16}
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [onnx.TensorProto.INT64] * 3
    assert [o.type.tensor_type.elem_type for o in model.graph.output] == [onnx.TensorProto.FLOAT]
    # The mean pooling runs in float32: its ReduceSum and Div are fed by casts to float.
    produced = {out: node for node in model.graph.node for out in node.output}
    div = next(n for n in model.graph.node if n.output[0] == "sentence_embedding")
    reduce_sum = produced[div.input[0]]
    mul = produced[reduce_sum.input[0]]
    feeds = [produced[name] for name in mul.input]
    assert all(f.op_type == "Cast" and f.attribute[0].i == onnx.TensorProto.FLOAT for f in feeds)
    ours = _run_fp16(model.SerializeToString(), tiny_encoder, TEXTS)
    ours /= np.linalg.norm(ours, axis=1, keepdims=True)
    assert _cosines(ours, tiny_encoder.encode(TEXTS)).min() >= 0.999


def test_fp16_conversion_without_known_heads_still_works(
    tiny_encoder: Encoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnx

    import retrodb.export

    monkeypatch.setattr(retrodb.export, "attention_heads", lambda model, hidden: None)
    model = convert_fp16(tiny_encoder.directory / "model.onnx", hidden_size=tiny_encoder.dim)
    assert "Attention" not in [n.op_type for n in onnx.load_from_string(model).graph.node]
    ours = _run_fp16(model, tiny_encoder, TEXTS)
    ours /= np.linalg.norm(ours, axis=1, keepdims=True)
    assert _cosines(ours, tiny_encoder.encode(TEXTS)).min() >= 0.999


def test_fp16_conversion_of_garbage_is_bad_input(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"\x07" * 64)
    with pytest.raises(BadInputError, match="model.onnx"):
        convert_fp16(tmp_path / "model.onnx", hidden_size=32)


@pytest.mark.slow
def test_fp16_minilm_agrees_with_fp32(minilm_encoder: Encoder, record_property) -> None:
    """On the CPU provider; the same check on CUDA is tests/test_encoder.py's gpu test."""
    import onnx

    src = minilm_encoder.directory / "model.onnx"
    assert attention_heads(onnx.load(str(src)), 384) == 12
    ours = _run_fp16(convert_fp16(src, hidden_size=384), minilm_encoder, TEXTS)
    ours /= np.linalg.norm(ours, axis=1, keepdims=True)
    cos = _cosines(ours, minilm_encoder.encode(TEXTS))
    record_property("fp16_cpu_cosine_min", float(cos.min()))
    assert cos.min() >= 0.999
