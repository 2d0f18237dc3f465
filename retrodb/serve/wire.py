"""The bodies `retrodb serve` and its client exchange: JSON, or MessagePack for arrays.

Both forms carry the same objects. In JSON an array is a nested list; in MessagePack
(``Content-Type: application/msgpack``, and ``Accept: application/msgpack`` for the
answer) an array is a map ``{"nd": dtype, "shape": [...], "data": raw bytes}`` in
little-endian order, so a batch of 1,024 x 128 int64 tokens travels as 1 MB of bytes
instead of 3-4 MB of decimal text. Each side reads whichever form it is sent.
"""

from __future__ import annotations

import json
from typing import Any

import msgpack
import numpy as np

from ..errors import BadInputError

JSON = "application/json"
MSGPACK = "application/msgpack"
# dtypes an array may have on the wire (anything else is refused, not interpreted)
_DTYPES = {"<i8", "<i4", "<i2", "<u2", "<u4", "<f4", "<f8", "|b1", "|u1", "|i1"}


def _pack_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        a = np.ascontiguousarray(obj)
        a = a.astype(a.dtype.newbyteorder("<")) if a.dtype.byteorder == ">" else a
        return {"nd": a.dtype.str, "shape": list(a.shape), "data": a.tobytes()}
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot send {type(obj).__name__}")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray | np.generic):
        return obj.tolist()
    raise TypeError(f"cannot send {type(obj).__name__}")


def dumps(obj: Any, content_type: str) -> bytes:
    """``obj`` (dicts, lists, numbers, strings, NumPy arrays) as a body of ``content_type``."""
    if content_type == MSGPACK:
        return msgpack.packb(obj, default=_pack_default, use_bin_type=True)
    return json.dumps(obj, default=_json_default, ensure_ascii=False).encode()


def loads(body: bytes, content_type: str | None) -> Any:
    """A body read back; :class:`BadInputError` with a one-line reason when it is not
    well-formed. MessagePack arrays come back as NumPy arrays."""
    kind = (content_type or JSON).split(";")[0].strip().lower()
    try:
        if kind == MSGPACK:
            return msgpack.unpackb(body, raw=False, object_hook=_unpack_array)
        if kind in (JSON, "", "text/plain"):
            return json.loads(body or b"null")
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise BadInputError(f"malformed {kind or 'JSON'} body: {exc}") from exc
    raise BadInputError(f"unsupported content type {kind!r} (send {JSON} or {MSGPACK})")


def _unpack_array(obj: dict[str, Any]) -> Any:
    if set(obj) != {"nd", "shape", "data"}:
        return obj
    dtype, shape, data = obj["nd"], obj["shape"], obj["data"]
    if dtype not in _DTYPES or not isinstance(data, bytes) or not isinstance(shape, list):
        raise ValueError(f"bad array {dtype!r} of shape {shape!r}")
    a = np.frombuffer(data, dtype=np.dtype(dtype))
    try:
        return a.reshape(shape)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"array of {a.size} items cannot have shape {shape}") from exc


def array(value: Any, name: str, *, dtype: Any, ndim: int | None = None) -> np.ndarray:
    """Field ``name`` of a request as an array of ``dtype`` (a nested list or a MessagePack
    array); :class:`BadInputError` naming the field when it is not one."""
    if value is None:
        raise BadInputError(f"missing field {name!r}")
    try:
        a = np.asarray(value)
    except ValueError as exc:  # ragged nested lists
        raise BadInputError(f"field {name!r}: {exc}") from exc
    if a.size and a.dtype.kind not in "biuf":
        raise BadInputError(f"field {name!r} must be a rectangular array of numbers")
    out = a.astype(dtype)
    if out.dtype.kind in "iu" and a.dtype.kind == "f" and not np.array_equal(a, out):
        raise BadInputError(f"field {name!r} must hold integers")
    if ndim is not None and out.ndim != ndim:
        raise BadInputError(f"field {name!r} must be {ndim}-D, got shape {list(out.shape)}")
    return out


__all__ = ["JSON", "MSGPACK", "array", "dumps", "loads"]
