from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from retrodb.errors import (
    CorruptError,
    FormatVersionError,
    LockedError,
    NotADatabaseError,
    NotFoundError,
)
from retrodb.storage import (
    Manifest,
    SegmentMeta,
    Storage,
    open_raw_array,
    read_strings,
    write_array,
)


def test_arrays_are_plain_zarr_and_memory_mappable(tmp_path) -> None:
    data = np.arange(40, dtype=np.uint16).reshape(10, 4)
    write_array(tmp_path / "g", "tokens", data)
    write_array(
        tmp_path / "g", "zeros", np.zeros(7, dtype=np.int32)
    )  # all fill value: still written
    write_array(tmp_path / "g", "docs/ids", np.array(["a", "bé"], dtype=object))
    assert np.array_equal(zarr.open(str(tmp_path / "g" / "tokens"), mode="r")[...], data)
    mm = open_raw_array(tmp_path / "g" / "tokens", dtype=np.dtype(np.uint16), shape=(10, 4))
    assert isinstance(mm, np.memmap) and np.array_equal(mm, data)
    assert open_raw_array(tmp_path / "g" / "zeros").tolist() == [0] * 7
    assert read_strings(tmp_path / "g" / "docs" / "ids") == ["a", "bé"]


def test_raw_array_damage_is_a_typed_error(tmp_path) -> None:
    write_array(tmp_path / "g", "t", np.ones((8, 2), dtype=np.int64))
    chunk = tmp_path / "g" / "t" / "c" / "0" / "0"
    with pytest.raises(CorruptError, match="shape"):
        open_raw_array(tmp_path / "g" / "t", shape=(9, 2))
    chunk.write_bytes(chunk.read_bytes()[:-3])
    with pytest.raises(CorruptError, match=str(chunk)):
        open_raw_array(tmp_path / "g" / "t")
    (tmp_path / "g" / "t" / "zarr.json").write_text("{broken")
    with pytest.raises(CorruptError, match="zarr.json"):
        open_raw_array(tmp_path / "g" / "t")


def _manifest(gen: int) -> Manifest:
    seg = SegmentMeta(name="000001-ab", first_key=0, chunks=3, documents=1, tokens=100, files={})
    return Manifest(
        generation=gen,
        config={},
        tokenizer={"fingerprint": "x"},
        encoder={},
        next_key=3,
        segments=(seg,),
    )


def test_commit_swaps_current_and_round_trips(tmp_path) -> None:
    st = Storage(tmp_path)
    st.init_layout()
    st.commit(_manifest(1))
    st.commit(_manifest(2))
    assert (tmp_path / "CURRENT").read_text().strip() == "000002.json"
    m = st.read_manifest()
    assert m.generation == 2 and m.segments[0].name == "000001-ab"


def test_unknown_format_version_and_not_a_database(tmp_path) -> None:
    st = Storage(tmp_path)
    st.init_layout()
    st.commit(_manifest(1))
    p = tmp_path / "manifests" / "000001.json"
    d = json.loads(p.read_text())
    d["format_version"] = 99
    p.write_text(json.dumps(d))
    with pytest.raises(FormatVersionError, match="99"):
        st.read_manifest()
    with pytest.raises(NotFoundError):
        Storage(tmp_path / "nope").check_exists()
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(NotADatabaseError, match="is a file"):
        Storage(f).check_exists()
    with pytest.raises(NotADatabaseError, match="CURRENT"):
        Storage(tmp_path / "segments").check_exists()


def test_second_writer_fails_at_once(tmp_path) -> None:
    st = Storage(tmp_path)
    with st.writer_lock():
        with pytest.raises(LockedError, match="another writer"):
            with Storage(tmp_path).writer_lock():
                pass
    with st.writer_lock():  # released
        pass


def test_leftovers_of_an_interrupted_writer(tmp_path) -> None:
    st = Storage(tmp_path)
    st.init_layout()
    st.commit(_manifest(1))
    (tmp_path / "segments" / "000001-ab").mkdir()
    (tmp_path / "segments" / ".tmp-000002-cd").mkdir()
    (tmp_path / "segments" / "000002-ef").mkdir()
    (tmp_path / "manifests" / "000002.json").write_text("{}")
    left = {p.name for p in st.leftovers(st.read_manifest())}
    assert left == {".tmp-000002-cd", "000002-ef", "000002.json"}
    st.remove_leftovers(st.read_manifest())
    assert (tmp_path / "segments" / "000001-ab").exists()
    assert not st.leftovers(st.read_manifest())
