"""The versioned weight store: group masses that rank 0 publishes and every loader reads.

Built on ``torch.distributed``'s key-value stores, always under a
:class:`~torch.distributed.PrefixStore` so that our keys never meet torch's:

- ``tcp``: a TCPStore, every trainer and every DataLoader worker process a client: under
  torchrun the one its agent hosts at ``MASTER_ADDR:MASTER_PORT``; without, one that the
  trainer hosts on a free local port (:meth:`StoreSpec.for_loader`).
- ``hash``: a HashStore, for one process (a ``num_workers=0`` loader beside the trainer).

Layout, under the prefix: ``masses/<v>`` holds the whole payload of version ``v`` (JSON,
written once, never modified), and ``version`` is the pointer to the latest version. A
payload is written before the pointer is advanced, so a reader that sees pointer ``v``
always finds a complete payload ``v``: no reader sees a torn write.
"""

from __future__ import annotations

import dataclasses
import json
import operator
import os
import socket
import time
from datetime import timedelta
from typing import Literal, Mapping, get_args

import numpy as np
import torch.distributed as dist
from torch.utils.data import get_worker_info

from morec_rec.errors import MorecError

_VERSION_KEY = "version"
_PROBE_INTERVAL_S = 0.1

StoreKind = Literal["tcp", "hash"]

#: prefix -> (pid of the creating process, its HashStore).
_HASH_STORES: dict[str, tuple[int, dist.HashStore]] = {}


@dataclasses.dataclass(frozen=True)
class StoreSpec:
    """A picklable address of a store: passed to DataLoader workers, each of which connects itself.

    ``owner_pid`` is the process that made the spec; it only matters for ``hash``, whose
    store cannot be reached from any other process.
    """

    kind: StoreKind
    host: str = ""
    port: int = 0
    prefix: str = "morec"
    timeout_s: float = 30.0
    owner_pid: int = dataclasses.field(default_factory=os.getpid, compare=False)

    def __post_init__(self) -> None:
        kinds = get_args(StoreKind)
        if self.kind not in kinds:
            raise MorecError(f"weight store kind {self.kind!r} is not one of {', '.join(kinds)}")
        if self.kind == "tcp" and not (self.host and 0 < self.port < 2**16):
            raise MorecError(f"weight store tcp://{self.host}:{self.port} needs a host and a port")
        if not self.timeout_s > 0:
            raise MorecError(f"weight store timeout must be positive, got {self.timeout_s} s")

    @classmethod
    def from_env(cls, timeout_s: float = 30.0) -> StoreSpec:
        """The store of this job: ``tcp`` at ``MASTER_ADDR:MASTER_PORT`` if set, else ``hash``.

        Under torchrun the agent hosts that TCPStore before the trainers start, and keeps
        it across restarts of the worker group, so the prefix names the restart
        (``morec/attempt_<TORCHELASTIC_RESTART_COUNT>``): a restarted job starts at version 0
        rather than reading the versions of the failed attempt. Without an agent store
        (``TORCHELASTIC_USE_AGENT_STORE`` not ``True``), rank 0's ``init_process_group``
        hosts it, and connecting waits for it up to ``timeout_s``.
        """
        host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if not (host and port):
            return cls(kind="hash", timeout_s=timeout_s)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        return cls(kind="tcp", host=host, port=int(port), prefix=f"morec/attempt_{attempt}",
                   timeout_s=timeout_s)

    @classmethod
    def for_loader(cls, num_workers: int, timeout_s: float = 30.0,
                   ) -> tuple[StoreSpec, dist.TCPStore | None]:
        """:meth:`from_env`, except that a process outside torchrun whose loader has worker
        processes (which a ``hash`` store cannot reach) hosts a TCPStore on a free local
        port. Returns the spec and that server: keep it referenced while loaders run."""
        spec = cls.from_env(timeout_s)
        if spec.kind != "hash" or num_workers == 0:
            return spec, None
        server = dist.TCPStore("127.0.0.1", 0, is_master=True,
                               timeout=timedelta(seconds=timeout_s))
        return cls(kind="tcp", host="127.0.0.1", port=server.port, timeout_s=timeout_s), server

    def connect(self) -> dist.Store:
        """A :class:`~torch.distributed.PrefixStore` over the store this spec names.

        Blocks up to ``timeout_s`` for a ``tcp`` store to accept connections; store
        operations that wait (``get`` of a missing key) also time out after ``timeout_s``.
        ``hash`` returns the same process-local HashStore for the same prefix every time.
        """
        if self.kind == "tcp":
            store = _tcp_client(self.host, self.port, self.timeout_s)
        else:
            store = _hash_store(self.prefix, self.owner_pid, self.timeout_s)
        return dist.PrefixStore(self.prefix, store)


def _tcp_client(host: str, port: int, timeout_s: float) -> dist.TCPStore:
    # TCPStore's own connect retries overrun its timeout by 40-100%, and log a stack
    # trace per try; waiting for the port to listen first keeps the stated deadline.
    unreachable = f"weight store tcp://{host}:{port} not reachable within {timeout_s:g} s"
    _wait_until_listening(host, port, timeout_s, unreachable)
    try:
        return dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s))
    except dist.DistError as error:
        raise MorecError(f"{unreachable}: {error}") from error


def _wait_until_listening(host: str, port: int, timeout_s: float, unreachable: str) -> None:
    """Returns once ``host:port`` accepts a TCP connection; MorecError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), max(deadline - time.monotonic(), 0.01)):
                return
        except OSError as error:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise MorecError(f"{unreachable}: {error}") from error
            time.sleep(min(_PROBE_INTERVAL_S, remaining))


def _hash_store(prefix: str, owner_pid: int, timeout_s: float) -> dist.HashStore:
    pid = os.getpid()
    creator = _HASH_STORES[prefix][0] if prefix in _HASH_STORES else pid
    if pid != owner_pid or pid != creator or get_worker_info() is not None:
        raise MorecError(
            f"a 'hash' weight store works within the one process that made it, and pid {pid} "
            "is another one (a DataLoader worker?): use a 'tcp' store when the "
            "DataLoader has num_workers > 0"
        )
    if prefix not in _HASH_STORES:
        _HASH_STORES[prefix] = (pid, dist.HashStore())
    store = _HASH_STORES[prefix][1]
    store.set_timeout(timedelta(seconds=timeout_s))
    return store


@dataclasses.dataclass(frozen=True)
class Masses:
    """One published version of the group masses.

    ``values`` maps objective name -> float64 masses as published (finite, non-negative,
    positive sum; rank 0 publishes them normalised). The arrays are read-only.
    """

    version: int  # 0 = nothing published yet
    effective_from: int  # the loader batch index from which these masses apply
    values: dict[str, np.ndarray]


_NOTHING = Masses(version=0, effective_from=0, values={})


class WeightStore:
    """Versioned group masses over a ``torch.distributed`` store; one writer, many readers.

    Bound to the process that made it: a DataLoader worker connects its own from a
    :class:`StoreSpec` (a TCPStore client copied by ``fork`` would share its socket).
    Payloads are immutable, so versions once read are cached.
    """

    def __init__(self, store: dist.Store) -> None:
        self._raw = store
        self._pid = os.getpid()
        self._cache: dict[int, Masses] = {}
        self._pointer_seen = False

    @classmethod
    def connect(cls, spec: StoreSpec) -> WeightStore:
        """A WeightStore over ``spec.connect()`` (blocking as that does)."""
        return cls(spec.connect())

    @property
    def _store(self) -> dist.Store:
        if os.getpid() != self._pid:
            raise MorecError(
                "a WeightStore cannot cross into another process: pass its StoreSpec and "
                "call WeightStore.connect there"
            )
        return self._raw

    def publish(self, values: Mapping[str, np.ndarray], effective_from: int) -> int:
        """Publishes a new version and returns it (1, 2, ...). Only one writer is expected.

        Raises MorecError, before writing anything, for invalid masses, an empty
        ``values``, or ``effective_from`` below zero or below that of the latest version.
        """
        checked = _checked_values(values)
        effective_from = operator.index(effective_from)
        if effective_from < 0:
            raise MorecError(f"effective_from must be a batch index >= 0, got {effective_from}")
        latest = self.read()
        if effective_from < latest.effective_from:
            raise MorecError(
                f"effective_from {effective_from} is before batch {latest.effective_from}, "
                f"from which version {latest.version} applies"
            )
        masses = Masses(latest.version + 1, effective_from, checked)
        payload = _encode(masses)
        # compare_set keeps payloads write-once even if a second writer races this one.
        if self._store.compare_set(_payload_key(masses.version), "", payload) != payload:
            raise MorecError(f"weight version {masses.version} was already written by "
                             "another writer (or an earlier run using this store)")
        if self._store.add(_VERSION_KEY, 1) != masses.version:
            raise MorecError("another writer is publishing to this weight store")
        self._cache[masses.version] = masses
        return masses.version

    def latest_version(self) -> int:
        """The latest published version, 0 if none. Never blocks, never writes.

        (Readers may poll it: ``check`` rather than ``add(key, 0)``, which would count as a
        write.)
        """
        if not self._pointer_seen:
            if not self._store.check([_VERSION_KEY]):
                return 0
            self._pointer_seen = True  # keys are never deleted: no more check round trips
        return int(self._store.get(_VERSION_KEY))

    def read(self, version: int | None = None) -> Masses:
        """Version ``version`` (the latest by default); the empty Masses of version 0 if none."""
        latest = self.latest_version()
        version = latest if version is None else version
        if version == 0:
            return _NOTHING
        if not 0 < version <= latest:
            raise MorecError(f"weight version {version} is not published (latest is {latest})")
        if version not in self._cache:
            self._cache[version] = _decode(self._store.get(_payload_key(version)))
        return self._cache[version]

    def history(self) -> list[Masses]:
        """Every published version, oldest first, fetching the uncached ones in one round trip."""
        latest = self.latest_version()
        missing = [v for v in range(1, latest + 1) if v not in self._cache]
        if missing:
            payloads = self._store.multi_get([_payload_key(v) for v in missing])
            self._cache.update((v, _decode(p)) for v, p in zip(missing, payloads))
        return [self._cache[v] for v in range(1, latest + 1)]


def publish_and_sync(store: WeightStore, values: Mapping[str, np.ndarray],
                     effective_from: int) -> int:
    """Publishes on rank 0 and returns the new version on every rank.

    With an initialised process group this is a collective (a broadcast from rank 0): all
    ranks call it, ``values`` matter only on rank 0, and when rank 0 fails every rank
    raises. Without one it simply publishes.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return store.publish(values, effective_from)
    outcome: list[int | str | None] = [None]
    failure: Exception | None = None
    if dist.get_rank() == 0:
        try:
            outcome[0] = store.publish(values, effective_from)
        except Exception as error:  # any failure: the other ranks must not hang
            failure = error
            outcome[0] = f"{type(error).__name__}: {error}"
    dist.broadcast_object_list(outcome, src=0)
    if failure is not None:
        raise failure
    if isinstance(outcome[0], str):
        raise MorecError(f"rank 0 failed to publish group masses: {outcome[0]}")
    return int(outcome[0])


def _payload_key(version: int) -> str:
    return f"masses/{version}"


def _checked_values(values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    if not values:
        raise MorecError("no group masses to publish")
    return {name: _checked_masses(name, masses) for name, masses in values.items()}


def _checked_masses(name: str, masses: np.ndarray) -> np.ndarray:
    """``masses`` as a read-only float64 copy; MorecError naming ``name`` if invalid."""
    if not (isinstance(name, str) and name):
        raise MorecError(f"objective names must be non-empty strings, got {name!r}")
    try:
        array = np.asarray(masses)
        problem = _masses_problem(array)
    except (TypeError, ValueError) as error:
        problem = f"not a numeric vector ({error})"
    if problem:
        raise MorecError(f"group masses of objective {name!r}: {problem}")
    array = array.astype(np.float64)
    array.flags.writeable = False
    return array


def _masses_problem(array: np.ndarray) -> str | None:
    if array.dtype.kind not in "iuf":
        return f"expected real numbers, got dtype {array.dtype}"
    if array.ndim != 1:
        return f"expected a 1-D vector, got shape {array.shape}"
    if array.size == 0:
        return "empty vector"
    for bad, what in ((~np.isfinite(array), "non-finite"), (array < 0, "negative")):
        if bad.any():
            group = int(np.argmax(bad))
            return f"{what} mass {array[group]} at group {group}"
    if array.sum() <= 0:
        return "masses sum to 0"
    return None


def _encode(masses: Masses) -> bytes:
    # repr-based JSON floats round-trip float64 exactly.
    return json.dumps({
        "version": masses.version,
        "effective_from": masses.effective_from,
        "values": {name: array.tolist() for name, array in masses.values.items()},
    }, allow_nan=False, separators=(",", ":")).encode()


def _decode(payload: bytes) -> Masses:
    raw = json.loads(payload)
    values = {name: np.array(v, dtype=np.float64) for name, v in raw["values"].items()}
    for array in values.values():
        array.flags.writeable = False
    return Masses(raw["version"], raw["effective_from"], values)
