"""Scoring feature rows with the bundle's LightGBM ranker, natively compiled when possible.

``Ranker`` runs LightGBM's own predictor: always available, but for a request's few
hundred rows most of its time goes to the Python and C-API layers around the trees.
``compile_ranker`` turns the same model file into native code with lleaves (LLVM via
llvmlite, no system compiler): the trees become branches in one function that scores
a row block in a few microseconds per tree pass, several times cheaper per request.

Compiling takes seconds, so it happens once per ranker and host. The code is kept in
the process (a model loaded again reuses it) and its object file is cached under
``cache_dir``, keyed by the ranker file's SHA-256, the compiler versions and the CPU
(it is built for the host's instruction set): written to a temporary file and renamed
into place, with a checksum file beside it that is checked before loading (a damaged
object file is recompiled, never loaded). A file lock lets the workers of one host
share one compilation.

Any failure (lleaves or llvmlite missing, a compile error, scores that differ from
LightGBM's) raises :class:`RankerCompileError` with a ``reason``; the caller keeps the
LightGBM ranker, logs it and counts it.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from recsys_serving.lake import atomic_file

# Largest |compiled - LightGBM| score accepted: the trees are the same, only the order
# in which their outputs are summed differs (a few ulp of a double).
MAX_SCORE_DIFFERENCE = 1e-9
_ENTRY = "forest_root"
# Compiled rankers of this process by ranker checksum and host (a model loaded again,
# or the same ranker in two bundles, reuses its code): the most recent few.
KEEP_LOADED = 8
_LOADED: OrderedDict[str, CompiledRanker] = OrderedDict()
_LOADED_LOCK = threading.Lock()
_ENTRY_TYPE = ctypes.CFUNCTYPE(
    None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32
)


class RankerCompileError(Exception):
    """The ranker could not be compiled; ``reason`` is the metric label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Ranker:
    """A LightGBM booster scoring feature rows (higher is better)."""

    kind = "lightgbm"

    def __init__(self, booster: Any, threads: int = 1) -> None:
        self.booster = booster
        self.threads = threads

    @classmethod
    def load(cls, path: Path, threads: int = 1) -> Ranker:
        import lightgbm as lgb

        return cls(lgb.Booster(model_file=str(path)), threads)

    def score(self, features: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        if features.shape[0] == 0:
            return np.empty(0, dtype=np.float64)
        return np.asarray(
            self.booster.predict(features, num_threads=self.threads, validate_features=False),
            dtype=np.float64,
        )


@dataclass(frozen=True)
class Blend:
    """A linear blend of retrieval scores (feature columns): the order the ranker must
    beat, what ranks when it does not (the ranker gate in training), and the tie-break
    of ranker scores otherwise, so no two items are ever ordered by id alone.

    The weights are chosen on validation queries in training (``fit_blend``) and travel
    in the bundle manifest (``ranking.blend``); scoring reads feature columns by name,
    so the blend sees exactly the features the ranker sees.
    """

    features: tuple[str, ...]
    weights: tuple[float, ...]

    def __post_init__(self) -> None:
        from recsys_serving.model.features import FEATURE_NAMES

        unknown = [f for f in self.features if f not in FEATURE_NAMES]
        if unknown or len(self.features) != len(self.weights) or not self.features:
            raise ValueError(f"bad blend: features {self.features!r}, weights {self.weights!r}")

    @property
    def columns(self) -> list[int]:
        from recsys_serving.model.features import FEATURE_NAMES

        return [FEATURE_NAMES.index(f) for f in self.features]

    @cached_property
    def _arrays(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
        """(columns, weights) as arrays, built once: every request scores with them."""
        return np.asarray(self.columns, dtype=np.int64), np.asarray(self.weights, np.float64)

    def score(self, features: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        if features.shape[0] == 0:
            return np.empty(0, dtype=np.float64)
        columns, weights = self._arrays
        return features[:, columns].astype(np.float64) @ weights

    def as_dict(self) -> dict[str, Any]:
        return {"features": list(self.features), "weights": [float(w) for w in self.weights]}

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> Blend:
        return cls(tuple(value["features"]), tuple(float(w) for w in value["weights"]))


# The tie-break of a model without a validated blend (older manifests, tests that
# build a Recommender by hand): history scores first, then ALS, then popularity.
DEFAULT_BLEND = Blend(
    ("ease_rel", "knn_history_rel", "als_cosine", "item_log_pop_decayed"),
    (1.0, 0.5, 0.5, 0.01),
)
# Ranker scores equal to this many decimals are ties (broken by the blend).
TIE_DECIMALS = 6


class BlendRanker:
    """Ranks by the validated blend: what a bundle serves when its LightGBM ranker did
    not beat the blend on validation (manifest ``ranking.mode == "blend"``)."""

    kind = "blend"
    # Nothing to compile: the model manager's compile step keeps it as it is.
    cached = True

    def __init__(self, blend: Blend) -> None:
        self.blend = blend

    def score(self, features: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        return self.blend.score(features)


def ranked_order(
    scores: npt.NDArray[np.float64], tie: npt.NDArray[np.float64], items: npt.NDArray[np.int64]
) -> npt.NDArray[np.int64]:
    """Positions by ranker score (to :data:`TIE_DECIMALS`) desc, then blend score desc;
    the item row decides only between items equal in both."""
    return np.lexsort((items, -tie, -np.round(scores, TIE_DECIMALS))).astype(np.int64)


class CompiledRanker:
    """The same model as native code: ``score`` gives LightGBM's scores (to within
    :data:`MAX_SCORE_DIFFERENCE`) at a fraction of the cost. Thread-safe: the compiled
    function only reads its input and writes its own output array."""

    kind = "compiled"

    def __init__(self, model: Any, n_features: int, cached: bool) -> None:
        self._model = model  # owns the execution engine that holds the code
        self._entry = _ENTRY_TYPE(model._execution_engine.get_function_address(_ENTRY))
        self.n_features = n_features
        self.cached = cached  # loaded from the cache rather than compiled now

    def score(self, features: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        n = features.shape[0]
        if features.ndim != 2 or features.shape[1] != self.n_features:
            raise ValueError(f"features must be (n, {self.n_features}), got {features.shape}")
        out = np.empty(n, dtype=np.float64)
        if n:
            rows = np.ascontiguousarray(features, dtype=np.float64)
            self._entry(rows.ctypes.data, out.ctypes.data, 0, n)
        return out


def host_fingerprint() -> str:
    """What compiled code depends on besides the model: compiler versions and the CPU."""
    from importlib.metadata import version

    import llvmlite.binding as llvm

    try:
        features = llvm.get_host_cpu_features().flatten()
    except RuntimeError:  # LLVM cannot tell on some hosts
        features = ""
    parts = (version("lleaves"), version("llvmlite"), llvm.get_host_cpu_name(), features)
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def compile_ranker(
    ranker_file: Path,
    cache_dir: Path | None,
    reference: Ranker,
    check_rows: npt.NDArray[np.float32],
    ranker_sha256: str | None = None,
) -> CompiledRanker:
    """Compile ``ranker_file`` (or load it from ``cache_dir``) and check it scores
    ``check_rows`` like ``reference``; :class:`RankerCompileError` otherwise."""
    try:
        import lleaves
    except ImportError as exc:
        raise RankerCompileError("unavailable", f"lleaves is not installed ({exc})") from exc
    try:
        digest = ranker_sha256 or hashlib.sha256(ranker_file.read_bytes()).hexdigest()
        key = f"{digest}-{host_fingerprint()}"
        with _LOADED_LOCK:
            compiled = _LOADED.get(key)
            if compiled is None:
                model = lleaves.Model(model_file=str(ranker_file))
                cached = False
                if cache_dir is None:
                    model.compile()
                else:
                    cached = _compile_cached(model, cache_dir, key)
                compiled = CompiledRanker(model, int(model.num_feature()), cached)
            _LOADED[key] = compiled
            _LOADED.move_to_end(key)
            while len(_LOADED) > KEEP_LOADED:
                _LOADED.popitem(last=False)
    except RankerCompileError:
        raise
    except Exception as exc:
        raise RankerCompileError("compile_error", f"{type(exc).__name__}: {exc}") from exc
    if compiled.n_features != check_rows.shape[1]:
        raise RankerCompileError(
            "mismatch",
            f"{ranker_file}: the model has {compiled.n_features} features, "
            f"the feature rows {check_rows.shape[1]}",
        )
    expected = reference.score(check_rows)
    got = compiled.score(check_rows)
    worst = float(np.max(np.abs(got - expected))) if expected.size else 0.0
    if not np.isfinite(worst) or worst > MAX_SCORE_DIFFERENCE:
        raise RankerCompileError(
            "mismatch",
            f"{ranker_file}: compiled scores differ from LightGBM's by up to {worst:.3g}",
        )
    return compiled


def _compile_cached(model: Any, cache_dir: Path, key: str) -> bool:
    """Load the object code from the cache, or compile it into the cache; True when it
    came from the cache."""
    from filelock import FileLock

    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / f"{key}.o"
    checksum = cache_dir / f"{key}.sha256"
    with FileLock(str(cache_dir / f"{key}.lock")):
        if _intact(target, checksum):
            model.compile(cache=str(target))
            return True
        # Missing, partial or damaged: compile into a temporary file, then rename.
        fd, tmp_name = tempfile.mkstemp(prefix=f".{key}.", suffix=".o", dir=cache_dir)
        os.close(fd)
        tmp = Path(tmp_name)
        tmp.unlink()  # lleaves writes the object file only where none exists
        try:
            model.compile(cache=str(tmp))
            data = tmp.read_bytes()
            with tmp.open("rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, target)
            with atomic_file(checksum, sync_dir=False) as out:
                out.write(hashlib.sha256(data).hexdigest().encode() + b"\n")
        finally:
            tmp.unlink(missing_ok=True)
    return False


def _intact(target: Path, checksum: Path) -> bool:
    if not (target.exists() and checksum.exists()):
        return False
    return hashlib.sha256(target.read_bytes()).hexdigest() == checksum.read_text().strip()
