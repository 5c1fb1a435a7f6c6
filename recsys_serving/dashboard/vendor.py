"""The charting library the page loads: Vega, Vega-Lite and vega-embed in one script,
bundled by ``vl-convert-python`` (no CDN: the page must work without internet).

``vl_convert.javascript_bundle()`` runs a JavaScript bundler for about 4 s *holding the
GIL*: inside a serving worker that would stall every request, and uvicorn's supervisor
kills a worker that misses its 5 s health ping. So the bundle is built once in a child
process (``python -m recsys_serving.dashboard.vendor OUT``) into a cache file named after
the vl-convert version, shared by every worker and kept across restarts; workers only
read it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from importlib.metadata import version
from pathlib import Path

from filelock import FileLock

BUILD_TIMEOUT_SECONDS = 180.0


class VendorBuildError(RuntimeError):
    """The bundle could not be built (the message carries the child's error output)."""


def bundle_path(cache_dir: Path) -> Path:
    return cache_dir / f"vega-embed-{version('vl-convert-python')}.js"


def ensure_bundle(cache_dir: Path) -> Path:
    """The cached bundle, built first if missing (one builder at a time per cache)."""
    target = bundle_path(cache_dir)
    if target.exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock", timeout=BUILD_TIMEOUT_SECONDS):
        if target.exists():  # another worker built it while we waited
            return target
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        try:
            done = subprocess.run(
                [sys.executable, "-m", __name__, str(tmp)],
                capture_output=True,
                text=True,
                timeout=BUILD_TIMEOUT_SECONDS,
                check=False,
            )
            if done.returncode != 0 or not tmp.exists():
                raise VendorBuildError(
                    f"building the Vega bundle failed ({done.returncode}): {done.stderr[-2000:]}"
                )
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return target


def library_versions() -> dict[str, str]:
    import vl_convert

    return {
        "vega": vl_convert.get_vega_version(),
        "vega_lite": vl_convert.get_vegalite_versions()[-1],
        "vega_embed": vl_convert.get_vega_embed_version(),
    }


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m recsys_serving.dashboard.vendor OUTPUT.js", file=sys.stderr)
        return 2
    import vl_convert

    out = Path(argv[0])
    with open(out, "w", encoding="utf-8") as handle:
        handle.write(vl_convert.javascript_bundle())
        handle.flush()
        os.fsync(handle.fileno())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
