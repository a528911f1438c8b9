"""A fake GCS for tests: ``gs://BUCKET/KEY`` served from the local folder ``$RWML_FAKE_GCS/BUCKET/KEY``.

`install()` registers it where the code meets GCS, so everything above runs unchanged against it:
- fsspec's ``gcs`` / ``gs`` protocols (what `etils.epath` uses for ``gs://`` when TensorFlow is absent, and
  so `rwml_jax.storage` and orbax's metadata files): `FakeGCSFileSystem`, an object store without
  append (opening with "a" raises) and with directories that exist only through their objects;
- orbax's TensorStore kvstore for ``gs://`` paths (the arrays of a checkpoint): the ``file`` driver under
  the same root instead of the ``gcs`` driver; and its bucket query (hierarchical namespace: no).

The folder persists across processes, so a run killed in one process resumes in the next.

    python tests/fake_gcs.py ROOT -m rwml_jax.cli run ...   # a CLI run against the fake bucket
"""

from __future__ import annotations

import os
import runpy
import sys

from fsspec.implementations.local import LocalFileSystem

ENV = "RWML_FAKE_GCS"


class FakeGCSFileSystem(LocalFileSystem):
    protocol = ("gs", "gcs")
    root_marker = ""

    @classmethod
    def _strip_protocol(cls, path):
        path, root = str(path), os.environ[ENV]
        if path == root or path.startswith(root + "/"):  # already stripped
            return path.rstrip("/")
        for p in ("gs://", "gcs://"):
            if path.startswith(p):
                path = path[len(p):]
        path = path.lstrip("/")
        if path.startswith(root.lstrip("/") + "/"):  # an already stripped path that lost its leading slash
            return "/" + path.rstrip("/")
        return os.path.join(root, path).rstrip("/") if path else root

    def unstrip_protocol(self, name):
        root = os.environ[ENV]
        rel = os.path.relpath(name, root)
        return "gs://" + rel

    def open(self, path, mode="rb", **kw):
        if "a" in mode:
            raise OSError("GCS objects cannot be appended to")
        return super().open(path, mode, **kw)

    def _open(self, path, mode="rb", **kw):
        if "w" in mode:
            os.makedirs(os.path.dirname(self._strip_protocol(path)), exist_ok=True)  # no directories in GCS
        return super()._open(path, mode, **kw)


def install(root: str | None = None) -> None:
    """Serve gs:// from `root` (default: $RWML_FAKE_GCS) in this process."""
    import fsspec

    if root is not None:
        os.environ[ENV] = os.fspath(root)
    os.makedirs(os.environ[ENV], exist_ok=True)
    for name in ("gs", "gcs"):
        fsspec.register_implementation(name, FakeGCSFileSystem, clobber=True)
    from orbax.checkpoint._src.path import gcs_utils

    def kvstore(path: str) -> dict:
        return {"driver": "file", "path": FakeGCSFileSystem._strip_protocol(path)}

    gcs_utils.get_kvstore_for_gcs = kvstore
    gcs_utils.is_hierarchical_namespace_enabled = lambda path: False  # a flat bucket (orbax asks the GCS API)


if __name__ == "__main__":  # fake_gcs.py ROOT -m module args...
    install(sys.argv[1])
    if sys.argv[2] != "-m":
        raise SystemExit("usage: fake_gcs.py ROOT -m MODULE [ARGS...]")
    sys.argv = [sys.argv[3], *sys.argv[4:]]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
