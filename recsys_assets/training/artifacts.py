"""What training assets hand to each other through the lake: npz files and JSON.

Each training asset writes its output under its run's directory,
``training/runs/<run>/<asset>/``, and the next one reads it back from there, so two
retrainings can never read each other's files, even if both ran at once. ``<run>`` is
the root run id of the Dagster run, so a re-execution from failure in the UI finds the
artifacts its parent run wrote. An asset materialized on its own (a subset of the graph
in the UI) reads the upstream assets its run did not produce from the run that last
produced each of them (``training/latest/<asset>.json``, written when an asset
succeeds): the hand-over is by run, never by whatever file happens to be there.

Outside a run scope (``run_scope``), e.g. a test calling a step function directly or
:func:`~recsys_assets.training.pipeline.train_bundle` without ``run=``, the keys are
the plain ``training/<asset>/<name>``. Arrays go to uncompressed ``.npz`` (fast to write
and read, no pickle); scalars and small dicts to a JSON member of the same file, so one
object is always one self-consistent file.
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import time
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from recsys_serving.lake import Lake, atomic_file
from recsys_serving.layout import TRAINING_PREFIX
from recsys_serving.model.state import Ragged

PREFIX = TRAINING_PREFIX
RUNS = f"{PREFIX}/runs"
LATEST = f"{PREFIX}/latest"
DONE = "_done.json"
KEEP_RUNS = 3  # newest run directories kept (re-execution from failure needs them)
_META = "__meta__"


@dataclass
class _Scope:
    lake: Lake
    run: str
    asset: str
    sources: dict[str, str] = field(default_factory=dict)

    def run_for(self, asset: str) -> str:
        """The run whose ``asset`` artifacts this step reads (its own run if it made them)."""
        if asset == self.asset:
            return self.run
        if asset not in self.sources:
            source = self.run
            if not self.lake.exists(f"{RUNS}/{self.run}/{asset}/{DONE}"):
                latest = _latest_run(self.lake, asset)
                source = latest if latest is not None else self.run
            self.sources[asset] = source
        return self.sources[asset]


_SCOPE: ContextVar[_Scope | None] = ContextVar("recsys_training_scope", default=None)


def key(asset: str, name: str) -> str:
    scope = _SCOPE.get()
    if scope is None:
        return f"{PREFIX}/{asset}/{name}"
    return f"{RUNS}/{scope.run_for(asset)}/{asset}/{name}"


def run_dir(run: str) -> str:
    return f"{RUNS}/{run}"


@contextmanager
def run_scope(lake: Lake, run: str, asset: str) -> Iterator[None]:
    """Within the block, ``key()`` names ``asset``'s outputs in ``run``'s directory; when
    the block succeeds the asset is marked done there and becomes the latest hand-over."""
    if not run or "/" in run:
        raise ValueError(f"invalid training run id {run!r}")
    token = _SCOPE.set(_Scope(lake, run, asset))
    try:
        yield
    finally:
        _SCOPE.reset(token)
    done = {"run": run, "asset": asset, "at": time.time()}
    put_json(lake, f"{RUNS}/{run}/{asset}/{DONE}", done)
    put_json(lake, f"{LATEST}/{asset}.json", done)


def _latest_run(lake: Lake, asset: str) -> str | None:
    try:
        run = orjson.loads(lake.get_bytes(f"{LATEST}/{asset}.json")).get("run")
    except FileNotFoundError:
        return None
    return str(run) if run else None


def prune_runs(lake: Lake, current: str, keep: int = KEEP_RUNS) -> list[str]:
    """Delete all but the ``keep`` newest run directories (by their newest file), never
    ``current`` nor a run that is the latest hand-over of some asset. Bounded growth:
    every retraining writes a whole set of intermediate artifacts."""
    newest: dict[str, float] = {}
    for obj in lake.list(f"{RUNS}/"):
        run = obj.key[len(RUNS) + 1 :].split("/", 1)[0]
        if run:
            newest[run] = max(newest.get(run, 0.0), obj.mtime)
    protected = {current}
    for obj in lake.list(f"{LATEST}/"):
        try:
            run = orjson.loads(lake.get_bytes(obj.key)).get("run")
        except (FileNotFoundError, orjson.JSONDecodeError):
            continue
        if run:
            protected.add(str(run))
    ordered = sorted(newest, key=lambda r: newest[r], reverse=True)
    removed = [r for r in ordered[keep:] if r not in protected]
    for run in removed:
        for obj in list(lake.list(f"{RUNS}/{run}/")):
            lake.delete(obj.key)
        local = lake.local_path(f"{RUNS}/{run}")
        if local is not None and local.exists():
            shutil.rmtree(local, ignore_errors=True)
    return removed


def pack_meta(meta: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {_META: np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)}


def unpack_meta(arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    return json.loads(arrays[_META].tobytes().decode()) if _META in arrays else {}


def pack_ragged(name: str, ragged: Ragged) -> dict[str, np.ndarray]:
    return {
        f"{name}.indptr": ragged.indptr,
        f"{name}.indices": ragged.indices,
        f"{name}.data": ragged.data,
    }


def unpack_ragged(name: str, arrays: Mapping[str, np.ndarray]) -> Ragged:
    return Ragged(arrays[f"{name}.indptr"], arrays[f"{name}.indices"], arrays[f"{name}.data"])


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    _savez_aligned(buffer, arrays)
    return buffer.getvalue()


_ALIGN = 64  # what .npy headers pad to (numpy's ARRAY_ALIGN)
_PAD_FIELD = 0x7270  # zip extra-field id of the padding (unregistered; readers skip it)


def _savez_aligned(fh: Any, arrays: Mapping[str, np.ndarray]) -> None:
    """``np.savez`` (uncompressed, zip64, a ``.npy`` member per array, read by
    ``np.load``) with every member's data on a 64-byte boundary of the file, so that
    :func:`_map_npz` can map it as is (a map at an odd offset gives unaligned arrays,
    which compiled code copies or handles slowly). The padding is an extra field of the
    member's local header, which zip readers skip."""
    with zipfile.ZipFile(fh, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, value in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED
            # Local header: 30 bytes, the name, our padding field, then the zip64 field
            # (20 bytes) zipfile appends with force_zip64; the .npy header is a
            # multiple of 64 bytes.
            before = fh.tell() + 30 + len(info.filename.encode()) + 20
            pad = -before % _ALIGN
            if 0 < pad < 4:  # an extra field is at least its 4-byte id and length
                pad += _ALIGN
            if pad:
                info.extra = struct.pack("<HH", _PAD_FIELD, pad - 4) + bytes(pad - 4)
            with zf.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)


def put_arrays(lake: Lake, object_key: str, arrays: Mapping[str, np.ndarray]) -> int:
    """Write arrays as one ``.npz``; returns its size in bytes.

    A local lake gets the file written in place (temporary name, fsync, rename), never
    as one bytes object: at 100M events ``prepared.npz`` is gigabytes, and a copy in
    memory would double the step's peak.
    """
    path = lake.local_path(object_key)
    if path is None:
        data = npz_bytes(arrays)
        lake.put_bytes(object_key, data)
        return len(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, sync_dir=False) as fh:
        _savez_aligned(fh, arrays)
        size = fh.tell()
    return size


# Members of a local npz at least this large are memory-mapped rather than read.
MMAP_MIN_BYTES = 1 << 20


def get_arrays(lake: Lake, object_key: str) -> dict[str, np.ndarray]:
    """The arrays of one ``.npz``. From a local lake, members of ``MMAP_MIN_BYTES`` or
    more are copy-on-write memory maps of the file: a step pays memory only for the
    pages it reads (at 100M events ``prepared.npz`` is 2.8 GB, and ``candidate_index``
    needs its vocabulary alone), and those pages are the kernel's to drop and re-read
    rather than the process's own. Writing to such an array changes this process's copy
    only, as with a read array; replacing the file (``put_arrays`` renames a new one
    in) leaves existing maps on the old contents."""
    path = lake.local_path(object_key)
    try:
        if path is not None:
            return _map_npz(path)
        with np.load(io.BytesIO(lake.get_bytes(object_key)), allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except FileNotFoundError as exc:
        asset = _asset_of(object_key)
        raise FileNotFoundError(
            f"{object_key} is missing from the lake: materialize the {asset!r} asset first"
        ) from exc


def _map_npz(path: Path) -> dict[str, np.ndarray]:
    """``np.load`` of an npz, large stored (uncompressed) members memory-mapped in place.

    ``np.load(mmap_mode=...)`` maps ``.npy`` files only; an npz member written by
    ``np.savez`` is a plain ``.npy`` stored at an offset of the zip file, so it is
    mapped at that offset after its ``.npy`` header."""
    out: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(path) as archive, path.open("rb") as fh:
        for info in archive.infolist():
            name = info.filename.removesuffix(".npy")
            if info.compress_type != zipfile.ZIP_STORED or info.file_size < MMAP_MIN_BYTES:
                with archive.open(info) as member:
                    out[name] = np.lib.format.read_array(member, allow_pickle=False)
                continue
            fh.seek(info.header_offset)
            local = fh.read(30)  # zip local file header: fixed part
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            fh.seek(info.header_offset + 30 + name_len + extra_len)
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
            else:  # a header format this code does not parse: read it instead
                with archive.open(info) as member:
                    out[name] = np.lib.format.read_array(member, allow_pickle=False)
                continue
            if dtype.hasobject:
                raise ValueError(f"{path}: {info.filename} holds Python objects (pickled)")
            mapped = np.memmap(
                path,
                dtype=dtype,
                mode="c",
                offset=fh.tell(),
                shape=shape,
                order="F" if fortran else "C",
            )
            array = np.asarray(mapped)  # a plain ndarray view; it keeps the map open
            if not array.flags.aligned:  # written by other code: read it instead
                with archive.open(info) as member:
                    array = np.lib.format.read_array(member, allow_pickle=False)
            out[name] = array
    return out


def _asset_of(object_key: str) -> str:
    parts = object_key.split("/")
    if object_key.startswith(f"{RUNS}/") and len(parts) >= 5:
        return parts[3]  # training/runs/<run>/<asset>/<name>
    return parts[1] if len(parts) >= 3 else object_key


def put_json(lake: Lake, object_key: str, value: Any) -> None:
    lake.put_bytes(
        object_key,
        orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY),
    )


def get_json(lake: Lake, object_key: str) -> Any:
    try:
        return orjson.loads(lake.get_bytes(object_key))
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"{object_key} is missing from the lake: materialize its asset first"
        ) from exc
