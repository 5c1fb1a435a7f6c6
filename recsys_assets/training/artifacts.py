"""What training assets hand to each other through the lake: npz files and JSON.

Each training asset writes its output under ``training/<asset>/`` and the next one
reads it back, so a run can be resumed from any asset (re-materialize one asset in
the UI and everything downstream reads the new version). Arrays go to uncompressed
``.npz`` (fast to write and read, no pickle); scalars and small dicts to a JSON
member of the same file, so one object is always one self-consistent file.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import orjson

from recsys_serving.lake import Lake
from recsys_serving.model.state import Ragged

PREFIX = "training"
_META = "__meta__"


def key(asset: str, name: str) -> str:
    return f"{PREFIX}/{asset}/{name}"


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
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def put_arrays(lake: Lake, object_key: str, arrays: Mapping[str, np.ndarray]) -> int:
    data = npz_bytes(arrays)
    lake.put_bytes(object_key, data)
    return len(data)


def get_arrays(lake: Lake, object_key: str) -> dict[str, np.ndarray]:
    path = lake.local_path(object_key)
    source: Any = path if path is not None else io.BytesIO(lake.get_bytes(object_key))
    try:
        with np.load(source, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except FileNotFoundError as exc:
        asset = object_key.split("/")[1] if object_key.count("/") >= 2 else object_key
        raise FileNotFoundError(
            f"{object_key} is missing from the lake: materialize the {asset!r} asset first"
        ) from exc


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
