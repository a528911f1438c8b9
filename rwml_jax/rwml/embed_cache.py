"""Realised-state embeddings, computed once per dataset and cached in memory and on disk.

The RL loop embeds only the G predictions per prompt; the realised next states of a triplet dataset
are fixed, so `EmbeddingCache.embed(texts)` looks each text up by the SHA-256 of its UTF-8 bytes and
embeds only the misses (one batched call), then stores them.

On disk the cache lives beside the dataset (`EmbeddingCache.beside(dataset_path, embedder)`):

    <dataset dir>/<dataset file name>.embcache/<embedder identity>/
        meta.json               embedder name, identity, dim, prompt
        shard-<time>-<pid>-<n>.npz   keys [m, 16] uint8 (first 16 bytes of SHA-256), vectors [m, dim] float32

The embedder identity (`Embedder.identity`: weights fingerprint, config, pooling, max length,
dtype) and the prompt select the folder, so a different model or setting never reads stale vectors.
New vectors are appended as a new shard written to a temporary name and renamed into place: a crash
never corrupts what is already there and concurrent writers never overwrite each other's shards.
`compact()` merges shards into one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from rwml_jax import storage

log = logging.getLogger(__name__)

KEY_BYTES = 16


def text_key(text: str) -> bytes:
    """Cache key of a text: the first 16 bytes of SHA-256 over its UTF-8 encoding."""
    return hashlib.sha256(text.encode("utf-8")).digest()[:KEY_BYTES]


class EmbeddingCache:
    """Text -> embedding vector for one embedder (and prompt); behaves like the embedder (`embed`).

    embedder: an `Embedder` (anything with `embed`, `dim`, `identity`, `name`).
    directory: the on-disk folder for this dataset (None = memory only); the embedder-specific
      subfolder is created inside it.
    prompt: the raw text prefix used for every call (default: none; see `Embedder.embed`).
    """

    def __init__(self, embedder: Any, directory: str | os.PathLike | None = None, *, prompt: str | None = None):
        self.embedder = embedder
        self.prompt = prompt
        ident = str(getattr(embedder, "identity", "") or "")
        if not ident:
            raise ValueError("the embedder has no identity: build it with rwml_jax.models.load_embedder")
        if prompt:
            ident += "-" + hashlib.sha256(prompt.encode()).hexdigest()[:8]
        self.identity = ident
        self.dim = int(embedder.dim)
        self._mem: dict[bytes, np.ndarray] = {}
        self._seq = 0
        self.hits = 0
        self.misses = 0
        self.path: str | None = None
        # only the writer process adds files (the others read what is there and keep the rest in memory)
        self._writes = storage.is_writer()
        if directory is not None:
            self.path = os.path.join(os.fspath(directory), ident)
            os.makedirs(self.path, exist_ok=True)
            self._check_meta()
            self._load()

    @classmethod
    def beside(cls, dataset_path: str | os.PathLike, embedder: Any, **kw: Any) -> "EmbeddingCache":
        """A cache stored next to the dataset file: ``<dataset_path>.embcache/<identity>/`` (for a dataset in
        a bucket, under the same path in this host's cache, `storage.cache_dir`)."""
        dataset_path = os.fspath(dataset_path)
        if storage.is_remote(dataset_path):
            dataset_path = os.fspath(storage.cache_dir() / "embcache" / dataset_path.split("://", 1)[1].strip("/"))
        return cls(embedder, dataset_path.rstrip(os.sep) + ".embcache", **kw)

    # -- disk ---------------------------------------------------------------------------------------
    def _check_meta(self) -> None:
        assert self.path is not None
        meta_path = os.path.join(self.path, "meta.json")
        meta = {"embedder": getattr(self.embedder, "name", ""), "identity": self.identity, "dim": self.dim,
                "prompt": self.prompt or ""}
        if os.path.isfile(meta_path):
            with open(meta_path) as f:
                old = json.load(f)
            if old.get("identity") != self.identity or old.get("dim") != self.dim:
                raise ValueError(f"{meta_path} belongs to embedder {old.get('identity')} (dim {old.get('dim')}); "
                                 f"this one is {self.identity} (dim {self.dim})")
            return
        if not self._writes:
            return
        tmp = f"{meta_path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=2)
        os.replace(tmp, meta_path)

    def _shards(self) -> list[str]:
        assert self.path is not None
        return sorted(os.path.join(self.path, f) for f in os.listdir(self.path)
                      if f.startswith("shard-") and f.endswith(".npz"))

    def _load(self) -> None:
        for shard in self._shards():
            try:
                with np.load(shard) as z:
                    keys, vecs = z["keys"], z["vectors"]
            except Exception as e:  # a foreign or damaged file: skip it, never delete it
                log.warning("embedding cache: cannot read %s (%s); ignoring it", shard, e)
                continue
            if vecs.ndim != 2 or vecs.shape[1] != self.dim or keys.shape != (vecs.shape[0], KEY_BYTES):
                log.warning("embedding cache: %s has keys %s / vectors %s, expected dim %d; ignoring it",
                            shard, keys.shape, vecs.shape, self.dim)
                continue
            for k, v in zip(keys, vecs):
                self._mem[k.tobytes()] = v
        if self._mem:
            log.info("embedding cache %s: %d vectors loaded", self.path, len(self._mem))

    def _write_shard(self, keys: list[bytes], vecs: np.ndarray, name: str | None = None) -> str:
        assert self.path is not None
        if not self._writes:
            return ""
        self._seq += 1
        name = name or f"shard-{time.time_ns():020d}-{os.getpid()}-{self._seq}.npz"
        final = os.path.join(self.path, name)
        tmp = final + ".tmp"
        key_arr = np.frombuffer(b"".join(keys), np.uint8).reshape(len(keys), KEY_BYTES)
        with open(tmp, "wb") as f:
            np.savez(f, keys=key_arr, vectors=np.asarray(vecs, np.float32))
        os.replace(tmp, final)
        return final

    def compact(self) -> None:
        """Merge all shards into one (written before the old shards are removed)."""
        if self.path is None or not self._writes:
            return
        old = self._shards()
        if len(old) <= 1:
            return
        keys = list(self._mem)
        self._write_shard(keys, np.stack([self._mem[k] for k in keys]) if keys else np.zeros((0, self.dim)))
        for shard in old:
            os.remove(shard)

    # -- lookups ------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._mem)

    def __contains__(self, text: str) -> bool:
        return text_key(text) in self._mem

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Vectors [n, dim] for `texts` (cached ones looked up, the rest embedded and stored)."""
        if isinstance(texts, str):
            raise TypeError("embed() takes a list of strings, not a single string")
        texts = list(texts)
        keys = [text_key(t) for t in texts]
        missing: dict[bytes, str] = {}
        for k, t in zip(keys, texts):
            if k not in self._mem and k not in missing:
                missing[k] = t
        self.hits += len(texts) - len(missing)  # texts served without a new embedding
        self.misses += len(missing)
        if missing:
            new_keys = list(missing)
            kw = {"prompt": self.prompt} if self.prompt else {}
            vecs = np.asarray(self.embedder.embed([missing[k] for k in new_keys], **kw), np.float32)
            for k, v in zip(new_keys, vecs):
                self._mem[k] = v
            if self.path is not None:
                self._write_shard(new_keys, vecs)
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return np.stack([self._mem[k] for k in keys])

    def warm(self, texts: Sequence[str]) -> int:
        """Embed and store every text not cached yet; returns how many were new."""
        before = len(self._mem)
        self.embed(list(dict.fromkeys(texts)))
        return len(self._mem) - before

    @property
    def name(self) -> str:
        return getattr(self.embedder, "name", "")
