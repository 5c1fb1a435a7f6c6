"""Catalog documents: what ``recsys catalog load`` accepts, and the snapshots training reads.

Items and users arrive as NDJSON from whoever owns the catalog, so the same leniency as
the weblog contract applies (integer ids become strings, a single category becomes a
list) and the same accounting: every line is either upserted into the document store
or quarantined to the lake with its reason, ``file:line`` and original bytes.

The ``item_catalog`` / ``user_profiles`` assets turn the store back into Parquet
snapshots (``catalog/items.parquet``, ``catalog/users.parquet``) so training reads a
versioned file rather than a live database.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, BinaryIO, Literal

import bson
import orjson
import polars as pl
from bson.errors import BSONError
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictStr, ValidationError

from recsys_serving.events.schema import Id, describe_error
from recsys_serving.lake import Lake, write_parquet
from recsys_serving.landing import SegmentWriter, list_sealed, quarantine_record
from recsys_serving.layout import (
    CATALOG_ITEMS_KEY,
    CATALOG_QUARANTINE_AREA,
    CATALOG_USERS_KEY,
    parse_rfc3339,
    utc_today,
)
from recsys_serving.stores.docstore import DocStore, UpsertResult

Kind = Literal["items", "users"]
KINDS: tuple[Kind, ...] = ("items", "users")
ID_FIELD: dict[Kind, str] = {"items": "item_id", "users": "user_id"}
ITEM_CORE_FIELDS = ("item_id", "title", "categories", "published_at")

ITEMS_SCHEMA: dict[str, pl.DataType] = {
    "item_id": pl.String(),
    "title": pl.String(),
    "categories": pl.List(pl.String()),
    "published_at": pl.Datetime("us", "UTC"),
    "attributes": pl.String(),
}
USERS_SCHEMA: dict[str, pl.DataType] = {"user_id": pl.String(), "attributes": pl.String()}

MAX_DOCUMENT_BYTES = 16 * 1024 * 1024  # MongoDB's document limit, enforced on both backends
MAX_ERRORS_LISTED = 100
LOAD_BATCH = 1000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def quarantine_area(kind: Kind) -> str:
    return f"{CATALOG_QUARANTINE_AREA}/{kind}"


# ------------------------------------------------------------------------ validation
def _categories(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str | int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list):
        raise ValueError("must be a list of strings (or one string)")
    out: list[str] = []
    for n, cat in enumerate(value):
        if isinstance(cat, int) and not isinstance(cat, bool):
            cat = str(cat)
        if not isinstance(cat, str) or not cat.strip():
            raise ValueError(f"element {n} must be a non-empty string")
        out.append(cat)
    return list(dict.fromkeys(out))


def parse_published_at(value: Any) -> datetime | None:
    """RFC 3339 with an offset (or a plain date, read as midnight UTC), or epoch seconds.

    Truncated to milliseconds: that is what BSON keeps, so both backends agree.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("must be an RFC 3339 string or epoch seconds, not a boolean")
    if isinstance(value, datetime):
        parsed = value if value.tzinfo else value.replace(tzinfo=UTC)
    elif isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError("epoch seconds must be finite")
        try:
            parsed = datetime.fromtimestamp(value, UTC)
        except (OverflowError, OSError, ValueError) as exc:
            raise ValueError(f"epoch seconds out of range: {value!r}") from exc
    elif isinstance(value, str):
        parsed = parse_rfc3339(value, date_only=True)
    else:
        raise ValueError("must be an RFC 3339 string or epoch seconds")
    parsed = parsed.astimezone(UTC)
    return parsed.replace(microsecond=parsed.microsecond // 1000 * 1000)


class ItemRecord(BaseModel):
    """One catalog item; fields beyond these are free attributes, kept as they are."""

    model_config = ConfigDict(extra="allow")

    item_id: Id
    title: StrictStr | None = None
    categories: Annotated[list[str], BeforeValidator(_categories)] = Field(default_factory=list)
    published_at: Annotated[datetime | None, BeforeValidator(parse_published_at)] = None


class UserRecord(BaseModel):
    """One user profile: an id and free attributes."""

    model_config = ConfigDict(extra="allow")

    user_id: Id


@dataclass(frozen=True, slots=True)
class Rejection:
    at: str
    code: str
    reason: str


class RecordError(ValueError):
    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _dollar_key(value: Any, path: str = "") -> str | None:
    """The first field name MongoDB would refuse (operators start with ``$``)."""
    if isinstance(value, dict):
        for key, sub in value.items():
            where = f"{path}.{key}" if path else key
            if key.startswith("$") or "\x00" in key:
                return where
            found = _dollar_key(sub, where)
            if found:
                return found
    elif isinstance(value, list):
        for n, sub in enumerate(value):
            found = _dollar_key(sub, f"{path}.{n}")
            if found:
                return found
    return None


def to_document(kind: Kind, obj: Any) -> dict[str, Any]:
    """The store document for one decoded JSON line, or :class:`RecordError`."""
    if not isinstance(obj, dict):
        what = "an item" if kind == "items" else "a user"
        got = "an array" if isinstance(obj, list) else type(obj).__name__
        raise RecordError("not_an_object", f"{what} must be a JSON object, got {got}")
    model = ItemRecord if kind == "items" else UserRecord
    try:
        record = model.model_validate(obj)
    except ValidationError as exc:
        raise RecordError("schema", describe_error(exc)) from exc
    id_field = ID_FIELD[kind]
    key = getattr(record, id_field)
    extra = dict(record.model_extra or {})
    if "_id" in extra and extra.pop("_id") != key:
        raise RecordError("schema", f"_id: must equal {id_field} (or be left out)")
    bad = _dollar_key(extra)
    if bad:
        raise RecordError("schema", f"{bad}: field names must not start with '$' or hold NUL")
    doc: dict[str, Any] = {id_field: key}
    if isinstance(record, ItemRecord):
        if record.title is not None:
            doc["title"] = record.title
        doc["categories"] = record.categories
        if record.published_at is not None:
            doc["published_at"] = record.published_at
    doc.update(extra)
    try:
        size = len(bson.encode(doc))
    except (BSONError, OverflowError, TypeError, ValueError) as exc:
        raise RecordError("unstorable", f"not storable as a MongoDB document: {exc}") from exc
    if size > MAX_DOCUMENT_BYTES:
        raise RecordError("too_large", f"document of {size:,} bytes exceeds 16 MiB")
    return doc


def decode_line(kind: Kind, raw: bytes) -> dict[str, Any]:
    """Bytes of one NDJSON line to a store document, or :class:`RecordError`."""
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise RecordError("too_large", f"line longer than {MAX_DOCUMENT_BYTES:,} bytes")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as uexc:
            raise RecordError("not_utf8", f"not valid UTF-8 (byte {uexc.start})") from exc
        pos = getattr(exc, "pos", None)
        if pos is not None and pos >= len(raw.rstrip()):
            raise RecordError(
                "truncated", f"truncated JSON (input ends at column {pos + 1})"
            ) from exc
        msg = str(exc).split(":")[0]
        raise RecordError(
            "invalid_json", f"malformed JSON: {msg} at column {(pos or 0) + 1}"
        ) from exc
    return to_document(kind, obj)


# --------------------------------------------------------------------------- loading
class CatalogFileError(Exception):
    """A file that cannot be read at all (the message names it)."""


@dataclass
class LoadReport:
    kind: Kind
    path: str
    read: int = 0
    rejected: int = 0
    stored: UpsertResult = field(default_factory=UpsertResult)
    reasons: Counter[str] = field(default_factory=Counter)
    errors: list[Rejection] = field(default_factory=list)
    file_error: str | None = None

    @property
    def accepted(self) -> int:
        return self.read - self.rejected

    def reject(self, rejection: Rejection) -> None:
        self.rejected += 1
        self.reasons[rejection.code] += 1
        if len(self.errors) < MAX_ERRORS_LISTED:
            self.errors.append(rejection)

    def describe(self) -> str:
        s = self.stored
        reasons = ", ".join(f"{k} {v:,}" for k, v in sorted(self.reasons.items()))
        return (
            f"{self.kind} {self.read:,} read: {s.inserted:,} inserted, {s.updated:,} updated, "
            f"{s.unchanged:,} unchanged, {self.rejected:,} rejected"
            + (f" ({reasons})" if reasons else "")
        )


def _open(path: Path) -> BinaryIO:
    fh = path.open("rb")
    if path.suffix == ".gz":
        return gzip.GzipFile(fileobj=fh)  # type: ignore[return-value]
    return fh


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with _open(path) as fh:
        for line_no, line in enumerate(fh, 1):
            raw = line.rstrip(b"\n").rstrip(b"\r")
            if raw.strip():
                yield line_no, raw


ProgressFn = Callable[[int, list[Rejection]], None]


def load_file(
    store: DocStore,
    lake: Lake,
    path: Path,
    kind: Kind,
    *,
    batch_size: int = LOAD_BATCH,
    on_progress: ProgressFn | None = None,
) -> LoadReport:
    """Upsert every valid line of an NDJSON file (``.gz`` ok); quarantine the others.

    Rejections are made durable before the batch they came with is upserted, so a crash
    can duplicate a quarantine record but never lose a line. A file that stops being
    readable midway (a cut-off gzip) keeps what was read and reports ``file_error``.
    """
    if not path.is_file():
        raise CatalogFileError(f"{path}: no such file")
    report = LoadReport(kind=kind, path=str(path))
    quarantine = SegmentWriter(lake, quarantine_area(kind))
    upsert = store.upsert_items if kind == "items" else store.upsert_users
    docs: list[dict[str, Any]] = []
    rejected: list[Rejection] = []
    quarantined: list[bytes] = []
    day = utc_today()
    pending = 0

    def flush() -> None:
        nonlocal pending
        if quarantined:
            quarantine.append({day: b"".join(quarantined)})
        if docs:
            report.stored += upsert(docs)
        if on_progress is not None:
            on_progress(pending, list(rejected))
        docs.clear()
        rejected.clear()
        quarantined.clear()
        pending = 0

    try:
        with store.batch():
            try:
                for line_no, raw in _lines(path):
                    report.read += 1
                    pending += 1
                    try:
                        docs.append(decode_line(kind, raw))
                    except RecordError as exc:
                        rej = Rejection(f"{path}:{line_no}", exc.code, exc.reason)
                        report.reject(rej)
                        rejected.append(rej)
                        quarantined.append(
                            quarantine_record(raw, exc.reason, exc.code, "catalog", rej.at)
                        )
                    if pending >= batch_size:
                        flush()
            except (OSError, EOFError, zlib.error) as exc:
                report.file_error = (
                    f"{path}: cannot read past line {report.read} ({exc}); the lines before "
                    "were loaded"
                )
            flush()
    finally:
        quarantine.close()
    return report


def quarantined_counts(lake: Lake) -> dict[Kind, int]:
    """Quarantined catalog lines per kind (every load appends; nothing is removed)."""
    return {
        kind: sum(
            lake.get_bytes(f.key).count(b"\n") for f in list_sealed(lake, quarantine_area(kind))
        )
        for kind in KINDS
    }


# ------------------------------------------------------------------------- snapshots
@dataclass
class Snapshot:
    key: str
    uri: str
    rows: int
    size_bytes: int
    content_hash: str
    category_counts: Counter[str] = field(default_factory=Counter)
    repaired: Counter[str] = field(default_factory=Counter)


def attributes_json(doc: Mapping[str, Any], core: Iterable[str]) -> str:
    """The free attributes as canonical JSON (sorted keys; datetimes as RFC 3339)."""
    skip = {"_id", *core}
    attrs = {k: v for k, v in doc.items() if k not in skip}
    return orjson.dumps(
        attrs,
        default=str,
        option=orjson.OPT_SORT_KEYS | orjson.OPT_NAIVE_UTC | orjson.OPT_UTC_Z,
    ).decode()


def _item_row(doc: Mapping[str, Any], repaired: Counter[str]) -> tuple[Any, ...]:
    # Documents written by `recsys catalog load` are already clean; a MongoDB filled by
    # other tools may hold anything, so each field is repaired or nulled and counted.
    item_id = doc.get("item_id", doc.get("_id"))
    if not isinstance(item_id, str):
        item_id = str(item_id)
        repaired["item_id"] += 1
    title = doc.get("title")
    if title is not None and not isinstance(title, str):
        title = str(title)
        repaired["title"] += 1
    try:
        categories = _categories(doc.get("categories"))
    except ValueError:
        categories = []
        repaired["categories"] += 1
    try:
        published = parse_published_at(doc.get("published_at"))
    except ValueError:
        published = None
        repaired["published_at"] += 1
    published_us = None if published is None else (published - _EPOCH) // _MICROSECOND
    return item_id, title, categories, published_us, attributes_json(doc, ITEM_CORE_FIELDS)


def _user_row(doc: Mapping[str, Any], repaired: Counter[str]) -> tuple[Any, ...]:
    user_id = doc.get("user_id", doc.get("_id"))
    if not isinstance(user_id, str):
        user_id = str(user_id)
        repaired["user_id"] += 1
    return user_id, attributes_json(doc, ("user_id",))


def _frame(rows: list[tuple[Any, ...]], schema: dict[str, pl.DataType]) -> pl.DataFrame:
    columns = list(zip(*rows, strict=True)) if rows else [() for _ in schema]
    data: dict[str, pl.Series] = {}
    for (name, dtype), values in zip(schema.items(), columns, strict=True):
        if isinstance(dtype, pl.Datetime):
            data[name] = pl.Series(name, values, dtype=pl.Int64).cast(pl.Datetime("us", "UTC"))
        else:
            data[name] = pl.Series(name, values, dtype=dtype)
    return pl.DataFrame(data)


def _write_snapshot(
    docs: Iterable[Mapping[str, Any]],
    lake: Lake,
    key: str,
    schema: dict[str, pl.DataType],
    to_row: Callable[[Mapping[str, Any], Counter[str]], tuple[Any, ...]],
    batch_size: int,
    categories_column: int | None = None,
) -> Snapshot:
    digest = hashlib.sha256()
    repaired: Counter[str] = Counter()
    categories: Counter[str] = Counter()
    frames: list[pl.DataFrame] = []
    rows: list[tuple[Any, ...]] = []
    for doc in docs:
        row = to_row(doc, repaired)
        digest.update(orjson.dumps(row))
        digest.update(b"\n")
        if categories_column is not None:
            categories.update(row[categories_column])
        rows.append(row)
        if len(rows) >= batch_size:
            frames.append(_frame(rows, schema))
            rows = []
    if rows or not frames:
        frames.append(_frame(rows, schema))
    df = pl.concat(frames, rechunk=False)
    size = write_parquet(lake, key, df)
    return Snapshot(
        key=key,
        uri=lake.uri_for(key),
        rows=df.height,
        size_bytes=size,
        content_hash=digest.hexdigest(),
        category_counts=categories,
        repaired=repaired,
    )


def write_items_snapshot(
    store: DocStore, lake: Lake, key: str = CATALOG_ITEMS_KEY, batch_size: int = 10_000
) -> Snapshot:
    """``catalog/items.parquet``: item_id, title, categories, published_at, attributes."""
    return _write_snapshot(
        store.iter_items(batch_size=batch_size),
        lake,
        key,
        ITEMS_SCHEMA,
        _item_row,
        batch_size,
        categories_column=list(ITEMS_SCHEMA).index("categories"),
    )


def write_users_snapshot(
    store: DocStore, lake: Lake, key: str = CATALOG_USERS_KEY, batch_size: int = 10_000
) -> Snapshot:
    """``catalog/users.parquet``: user_id, attributes."""
    return _write_snapshot(
        store.iter_users(batch_size=batch_size), lake, key, USERS_SCHEMA, _user_row, batch_size
    )


__all__ = [
    "ITEMS_SCHEMA",
    "USERS_SCHEMA",
    "CatalogFileError",
    "ItemRecord",
    "LoadReport",
    "Rejection",
    "Snapshot",
    "UserRecord",
    "load_file",
    "quarantined_counts",
    "to_document",
    "write_items_snapshot",
    "write_users_snapshot",
]
