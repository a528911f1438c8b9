"""A text generator in the main process, served to environment worker processes, batched across callers.

τ²'s user simulator runs inside the env workers (τ²'s orchestrator calls it during `step`), while a local
model lives in the main process on the accelerators. `GenerationServer` bridges the two:

    with GenerationServer(generate_batch) as server:          # main process
        kwargs = {"user": "local:...", "addresses": {"local:...": server.endpoint}}
        ... EnvPool(factory, factory_kwargs=kwargs) ...         # workers call RemoteGenerate(endpoint)

* ``generate_batch(requests: list[list[dict]]) -> list[str]``: one reply per chat (OpenAI-style messages),
  called on the server's thread. Requests that arrive together are answered by one call: after a first
  request the server waits until every connected caller is waiting, or no new request came for
  ``window_s`` (at most ``max_wait_s`` in all). Env workers step their τ² episodes in threads when a user is
  served this way (`Tau2Env.concurrent_steps`), so one batch holds the user turns of all live conversations.
* `RemoteGenerate(endpoint)`: a picklable callable ``(messages) -> str`` for the workers; each thread opens
  its own connection (authenticated with the server's random key) on first use.

The generator runs while the main process waits for the env pool, so it never competes with the policy's
own sampling. Errors in ``generate_batch`` are sent back to every waiting caller and raised there (τ² then
ends that episode with ``user_error``); the server keeps serving.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing.connection as mpc
import os
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

Endpoint = tuple[str, bytes]  # (unix socket path, authkey)
GenerateBatch = Callable[[list[list[dict[str, Any]]]], list[str]]


class GenerationServer:
    """Serves ``generate_batch`` on a unix socket (see module docstring); a context manager."""

    def __init__(self, generate_batch: GenerateBatch, *, window_s: float = 0.05, max_wait_s: float = 1.0,
                 name: str = "user"):
        self.generate_batch = generate_batch
        self.window_s, self.max_wait_s, self.name = window_s, max_wait_s, name
        self._key = secrets.token_bytes(16)
        self._listener = mpc.Listener(family="AF_UNIX", authkey=self._key)
        self._conns: list[mpc.Connection] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.calls = 0  # generate_batch calls
        self.requests = 0  # chats answered
        self.max_batch = 0
        self._threads = [threading.Thread(target=self._accept, daemon=True, name=f"{name}-accept"),
                         threading.Thread(target=self._serve, daemon=True, name=f"{name}-serve")]
        for t in self._threads:
            t.start()

    @property
    def endpoint(self) -> Endpoint:
        return (self._listener.address, self._key)

    def stats(self) -> dict[str, float]:
        return {"calls": self.calls, "requests": self.requests, "max_batch": self.max_batch,
                "mean_batch": self.requests / self.calls if self.calls else 0.0}

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn = self._listener.accept()
            except (OSError, EOFError, mpc.AuthenticationError):
                if self._stop.is_set():
                    return
                continue
            with self._lock:
                self._conns.append(conn)

    def _live(self) -> list[mpc.Connection]:
        with self._lock:
            self._conns = [c for c in self._conns if not c.closed]
            return list(self._conns)

    def _receive(self, ready: list[Any], pending: dict[mpc.Connection, Any]) -> None:
        for c in ready:
            try:
                pending[c] = c.recv()
            except (EOFError, OSError):
                c.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            conns = self._live()
            if not conns:
                time.sleep(0.01)
                continue
            pending: dict[mpc.Connection, Any] = {}
            self._receive(mpc.wait(conns, timeout=0.1), pending)
            if not pending:
                continue
            t0 = time.monotonic()
            while time.monotonic() - t0 < self.max_wait_s:
                waiting = [c for c in self._live() if c not in pending]
                if not waiting:
                    break
                more = mpc.wait(waiting, timeout=self.window_s)
                if not more:
                    break
                self._receive(more, pending)
            self._answer(pending)

    def _answer(self, pending: dict[mpc.Connection, Any]) -> None:
        conns = list(pending)
        try:
            texts = list(self.generate_batch([pending[c] for c in conns]))
            if len(texts) != len(conns):
                raise RuntimeError(f"generate_batch returned {len(texts)} texts for {len(conns)} requests")
            replies = [("ok", t) for t in texts]
        except Exception as e:  # noqa: BLE001 - sent to the callers, whose episodes end with the error
            log.exception("%s server: generate_batch failed", self.name)
            replies = [("error", f"{type(e).__name__}: {e}")] * len(conns)
        self.calls += 1
        self.requests += len(conns)
        self.max_batch = max(self.max_batch, len(conns))
        for c, r in zip(conns, replies):
            try:
                c.send(r)
            except (OSError, ValueError):
                c.close()

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        address = self._listener.address
        try:  # wake the accept thread
            mpc.Client(address, family="AF_UNIX", authkey=self._key).close()
        except OSError:
            pass
        self._listener.close()
        for t in self._threads:
            t.join(2)
        for c in self._live():
            c.close()
        if isinstance(address, str) and os.path.exists(address):
            os.unlink(address)

    def __enter__(self) -> GenerationServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclasses.dataclass
class RemoteGenerate:
    """``(messages) -> str`` answered by a `GenerationServer` at `endpoint` (one connection per thread)."""

    endpoint: Endpoint

    def __post_init__(self) -> None:
        self._local = threading.local()

    def __getstate__(self) -> dict[str, Any]:
        return {"endpoint": self.endpoint}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.endpoint = tuple(state["endpoint"])  # type: ignore[assignment]
        self._local = threading.local()

    def __call__(self, messages: list[dict[str, Any]]) -> str:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            address, key = self.endpoint
            conn = self._local.conn = mpc.Client(address, family="AF_UNIX", authkey=key)
        conn.send(list(messages))
        status, payload = conn.recv()
        if status != "ok":
            raise RuntimeError(f"user model server: {payload}")
        return payload
