"""Where run files live and who writes them: local folders or buckets, process 0, the compilation cache.

Paths. Every run file (work_dir, stage outputs, checkpoints, metrics, exported models) goes through
`as_path`: a local path becomes a `pathlib.Path`, a URL (``gs://bucket/run``, ``s3://...``) an
`etils.epath.Path` (the path type orbax uses), served by fsspec (``gcsfs`` / ``s3fs``) or TensorFlow's
gfile. `check_location` refuses a URL whose scheme nothing here can serve, with the package to install,
instead of letting ``gs://b/x`` become a local folder named ``gs:``. Object stores have no rename and
no append: `rwml_jax.train.stage_io` writes whole objects there (a single PUT is atomic) and rewrites an
appended JSONL object.

Model folders (Hugging Face safetensors) are read by libraries that want local files: `local_copy`
downloads a remote folder once into this host's cache (`cache_dir`), `upload_dir` copies a folder written
locally to the bucket.

Processes. In a multi-process run (a TPU pod slice, a GPU cluster) every process runs the same program;
`is_writer()` (process 0) is the only one that writes shared files, metrics, plots and progress bars, and
`sync(name)` is a barrier every process passes before reading what the writer wrote. The work_dir of a
multi-process run must be one all hosts see: a bucket or a shared file system (NFS, Filestore).

Compilation cache. `enable_compilation_cache(path)` points JAX's persistent compilation cache at a folder
(``<work_dir>/.jax_cache`` by default, `rwml_jax.train.runtime`), so a rerun, a resumed run or a sweep point
loads its XLA executables instead of compiling them again.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# URL scheme -> (fsspec protocol epath asks for, the pip package that provides it)
SCHEMES: dict[str, tuple[str, str]] = {"gs": ("gcs", "gcsfs"), "s3": ("s3", "s3fs")}
CACHE_ENV = "RWML_CACHE_DIR"


class StorageError(ValueError):
    """A location no backend here can serve (unknown URL scheme, backend package not installed)."""


def url_scheme(path: Any) -> str | None:
    """"gs" for "gs://bucket/x", None for a local path."""
    m = _URL.match(os.fspath(path)) if isinstance(path, (str, os.PathLike)) else None
    return m.group(1).lower() if m else None


def is_remote(path: Any) -> bool:
    return url_scheme(path) is not None


def _backend_available(scheme: str) -> bool:
    protocol, _ = SCHEMES[scheme]
    if scheme == "gs" and importlib.util.find_spec("tensorflow") is not None:
        return True  # epath prefers TensorFlow's gfile for gs:// when it is installed
    try:
        import fsspec

        fsspec.get_filesystem_class(protocol)
        return True
    except (ImportError, ValueError):
        return False


def check_location(path: Any, what: str = "path") -> None:
    """Raise StorageError when `path` is a URL that cannot be served here (message names the fix)."""
    scheme = url_scheme(path)
    if scheme is None:
        return
    if scheme not in SCHEMES:
        raise StorageError(f"{what}={os.fspath(path)!r}: URL scheme {scheme}:// is not supported; use a local "
                           f"path or one of {', '.join(s + '://' for s in SCHEMES)}")
    if not _backend_available(scheme):
        package = SCHEMES[scheme][1]
        raise StorageError(f"{what}={os.fspath(path)!r}: {scheme}:// needs the {package} package, which is not "
                           f"installed here: pip install {package} (or pip install -e '.[tpu]')")


def as_path(path: Any, what: str = "path") -> Any:
    """A `pathlib.Path` (local) or `etils.epath.Path` (URL, checked by `check_location`)."""
    if not is_remote(path):
        return path if isinstance(path, Path) else Path(os.fspath(path)).expanduser()
    check_location(path, what)
    from etils import epath

    return epath.Path(os.fspath(path))


def file_size(path: Any) -> int:
    """Bytes of a file, local or remote."""
    st = path.stat()
    return int(getattr(st, "st_size", getattr(st, "length", 0)))


# ------------------------------------------------------------------------------------------------
# Processes
# ------------------------------------------------------------------------------------------------
def process_index() -> int:
    """This process's index (0 when JAX is not even imported: nothing can be distributed then)."""
    if "jax" not in sys.modules:
        return 0
    import jax

    return jax.process_index()


def is_writer() -> bool:
    """True on the one process that writes shared files, metrics, plots and progress bars (process 0)."""
    return process_index() == 0


def sync(name: str) -> None:
    """A barrier across processes (a no-op with one): everyone has passed `name` when it returns."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# ------------------------------------------------------------------------------------------------
# Model folders between a bucket and this host
# ------------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """This host's cache: $RWML_CACHE_DIR, else ~/.cache/rwml_jax."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "rwml_jax").expanduser()


def local_copy(path: Any) -> str:
    """A local folder with the content of `path`: `path` itself when local, else a copy in this host's
    cache, downloaded again only when the remote listing (names and sizes, kept in the copy's
    ``.complete`` marker) changed."""
    if not is_remote(path):
        return os.fspath(path)
    src = as_path(path)
    rel = os.fspath(src).split("://", 1)[1].strip("/")
    dest = cache_dir() / "remote" / url_scheme(path) / rel
    listing = "\n".join(sorted(_listing(src)))
    marker = dest / ".complete"
    if marker.exists() and marker.read_text() == listing:
        return os.fspath(dest)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    _copy_tree(src, tmp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    marker.write_text(listing)
    return os.fspath(dest)


def _listing(src: Any, prefix: str = "") -> list[str]:
    out = []
    for child in src.iterdir():
        if child.is_dir():
            out += _listing(child, f"{prefix}{child.name}/")
        else:
            out.append(f"{prefix}{child.name} {file_size(child)}")
    return out


def _copy_tree(src: Any, dest: Any) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for child in src.iterdir():
        target = dest / child.name
        if child.is_dir():
            _copy_tree(child, target)
        else:
            target.write_bytes(child.read_bytes())


def upload_dir(local: str | os.PathLike, remote: Any) -> None:
    """Copy the local folder `local` into `remote` (a URL or a path), file by file."""
    _copy_tree(Path(local), as_path(remote))


# ------------------------------------------------------------------------------------------------
# JAX persistent compilation cache
# ------------------------------------------------------------------------------------------------
def enable_compilation_cache(path: Any) -> str | None:
    """Point JAX's persistent compilation cache at `path` (local or a bucket); "" / None turns nothing on.

    Every executable that compiles in over a second is stored; the next process with the same program,
    shapes, devices and JAX version loads it instead. Returns the folder in use."""
    if not path:
        return None
    import jax

    path = os.fspath(path)
    if not is_remote(path):
        Path(path).mkdir(parents=True, exist_ok=True)
    else:
        check_location(path, "compilation cache")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    log.info("JAX compilation cache: %s", path)
    return path
