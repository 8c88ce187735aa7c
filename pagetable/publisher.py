"""Publishing KV-event batches over ZeroMQ, as vLLM's engines publish theirs.

`ZmqEventPublisher` sends each `pagetable.events.KVEventBatch` on a PUB socket as the
three frames a vLLM consumer reads::

    (topic, seq.to_bytes(8, "big"), encode_batch(batch))

with ``seq`` counting 0, 1, 2, ... per publisher.  It keeps the last ``buffer_steps``
payloads, and, given a ``replay_endpoint``, answers on a ROUTER socket a request
``(client_id, b"", start_seq)`` (``start_seq`` 8 bytes big-endian) with one message
``(client_id, b"", topic, seq, payload)`` per buffered batch with ``seq >= start_seq``
and then the end marker ``(client_id, b"", b"", END_SEQ, b"")``.  A DEALER client
sends ``(b"", start_seq)`` and receives the replies without the client id; a REQ
socket takes only one reply per request, so it sees only the first.

Encoding and sending happen on a background thread, as in vLLM, so that `publish`
costs the engine step no more than a queue put.  `NullEventPublisher` takes batches
and sends nothing.

Importing this module imports neither pyzmq nor msgspec; constructing a
`ZmqEventPublisher` needs both (``pip install 'pagetable[events]'``).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from typing import TYPE_CHECKING, Any

from pagetable import events as _events
from pagetable.events import KVEventBatch

if TYPE_CHECKING:
    from types import TracebackType

__all__ = [
    "EventPublisher",
    "NullEventPublisher",
    "ZmqEventPublisher",
    "offset_endpoint_port",
]

_log = logging.getLogger(__name__)

# What the background thread takes from the queue to know it is done.
_STOP = object()


def _check_int(value: object, name: str, low: int) -> int:
    if type(value) is not int:
        if isinstance(value, bool) or not hasattr(type(value), "__index__"):
            raise TypeError(f"{name} must be an int, not {type(value).__name__} ({value!r})")
        value = value.__index__()  # type: ignore[attr-defined]
    if value < low:  # type: ignore[operator]
        raise ValueError(f"{name} must be at least {low}, got {value}")
    return value  # type: ignore[return-value]


def _check_endpoint(value: object, name: str) -> str:
    if type(value) is not str:
        raise TypeError(f"{name} must be a str, not {type(value).__name__} ({value!r})")
    if "://" not in value:
        raise ValueError(
            f"{name} must be a ZeroMQ address such as 'tcp://*:5557', "
            f"'ipc:///tmp/kv' or 'inproc://kv', got {value!r}"
        )
    if value.startswith("tcp://"):
        _split_tcp(value, name)
    return value


def _split_tcp(endpoint: str, name: str) -> tuple[str, int]:
    """``tcp://host:port`` as (``tcp://host``, port)."""
    base, _, port = endpoint.rpartition(":")
    if base == "tcp" or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{name} must end in a port 0..65535, as 'tcp://*:5557'; got {endpoint!r}")
    return base, int(port)


def offset_endpoint_port(
    endpoint: str | None, data_parallel_rank: int, name: str = "endpoint"
) -> str | None:
    """The address data-parallel rank ``data_parallel_rank`` uses, as vLLM derives it.

    Each rank publishes on its own address: a TCP port is offset by the rank, an
    ``inproc`` name gains the suffix ``_dp<rank>``.  Rank 0, ``None`` and TCP port 0
    (an OS-chosen port) are left as they are.

    Parameters
    ----------
    endpoint : str or None
        The address configured, as for rank 0.
    data_parallel_rank : int
        The rank, at least 0.
    name : str, optional
        The argument's name, for messages.

    Returns
    -------
    str or None

    Raises
    ------
    ValueError
        A rank above 0 with an address that is neither ``tcp://`` nor ``inproc://``
        (vLLM refuses these too), or a port that the offset takes past 65535.
    """
    rank = _check_int(data_parallel_rank, "data_parallel_rank", 0)
    if endpoint is None:
        return None
    endpoint = _check_endpoint(endpoint, name)
    if rank == 0:
        return endpoint
    if endpoint.startswith("inproc://"):
        return f"{endpoint}_dp{rank}"
    if endpoint.startswith("tcp://"):
        base, port = _split_tcp(endpoint, name)
        if port == 0:
            return endpoint
        if port + rank > 65535:
            raise ValueError(
                f"{name} {endpoint!r} offset by data_parallel_rank {rank} is past port 65535"
            )
        return f"{base}:{port + rank}"
    raise ValueError(
        f"{name} must be tcp:// or inproc:// when data_parallel_rank > 0 "
        f"(each rank needs its own address), got {endpoint!r}"
    )


def _import_zmq() -> Any:
    try:
        import zmq
    except ModuleNotFoundError as exc:
        if exc.name != "zmq":
            raise
        raise ModuleNotFoundError(
            "ZmqEventPublisher needs pyzmq: pip install 'pagetable[events]'", name="zmq"
        ) from exc
    return zmq


class EventPublisher:
    """What every publisher offers: `publish`, `shutdown`, and use in a ``with`` block.

    Parameters
    ----------
    data_parallel_rank : int, optional
        The rank written into each batch whose ``data_parallel_rank`` is ``None``.
    """

    def __init__(self, data_parallel_rank: int = 0) -> None:
        self._data_parallel_rank = _check_int(data_parallel_rank, "data_parallel_rank", 0)
        self._closed = False

    @property
    def data_parallel_rank(self) -> int:
        """The rank this publisher writes into batches that carry none."""
        return self._data_parallel_rank

    @property
    def closed(self) -> bool:
        """Whether `shutdown` has been called."""
        return self._closed

    def _accept(self, batch: object) -> KVEventBatch:
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} is shut down; no more batches")
        if type(batch) is not KVEventBatch:
            raise TypeError(f"batch must be a KVEventBatch, not {type(batch).__name__}")
        if batch.data_parallel_rank is None:
            batch.data_parallel_rank = self._data_parallel_rank
        return batch

    def publish(self, batch: KVEventBatch) -> None:
        """Take ``batch`` for publishing.

        Parameters
        ----------
        batch : KVEventBatch
            Its ``data_parallel_rank`` is set to the publisher's when ``None``.

        Raises
        ------
        TypeError
            ``batch`` is not a `KVEventBatch`.
        RuntimeError
            The publisher is shut down.
        """
        self._accept(batch)

    def shutdown(self) -> None:
        """Stop taking batches; calling it again does nothing."""
        self._closed = True

    def __enter__(self) -> EventPublisher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.shutdown()


class NullEventPublisher(EventPublisher):
    """A publisher that sends nothing: what an engine uses with events off.

    `publish` still checks its argument and refuses batches after `shutdown`, so code
    that runs against it runs the same against `ZmqEventPublisher`.
    """

    def __enter__(self) -> NullEventPublisher:
        return self


class ZmqEventPublisher(EventPublisher):
    """Publishes KV-event batches on a ZeroMQ PUB socket, with replay of recent ones.

    Parameters
    ----------
    endpoint : str, optional
        The PUB socket's address, for rank 0 (see `offset_endpoint_port` for the
        others).  It is bound when it has a wildcard host (``tcp://*:5557``), a
        ``::`` host, TCP port 0, or is ``ipc://`` or ``inproc://``; otherwise it is
        connected to (a proxy's XSUB, say), as vLLM decides.
    replay_endpoint : str, optional
        The ROUTER socket's address, always bound; ``None`` serves no replay.
    buffer_steps : int, optional
        How many of the latest batches replay can send again; at least 0.
    hwm : int, optional
        The PUB socket's high-water mark: messages queued per subscriber before
        ZeroMQ drops new ones (0: no limit).
    max_queue_size : int, optional
        Batches `publish` may queue for the background thread before it blocks
        (0: no limit).
    topic : str, optional
        The first frame of every message; subscribers filter on its prefix.
    data_parallel_rank : int, optional
        This engine's rank: offsets the addresses and fills ``data_parallel_rank``
        in batches that carry none.

    Raises
    ------
    TypeError, ValueError
        An argument of the wrong type or value, or an address ZeroMQ refuses.
    OSError
        An address ZeroMQ cannot bind or connect (in use, say).
    ModuleNotFoundError
        pyzmq or msgspec is not installed.

    Notes
    -----
    A published batch is encoded later, on the background thread: do not change it
    after `publish`.  Sequence numbers count the batches sent; a batch that cannot be
    encoded (an attribute set to something MessagePack cannot carry) is logged and
    dropped without taking a number, so subscribers never see a gap that replay
    cannot fill.  The sockets belong to the background thread, which closes them when
    it ends; the ZeroMQ context is the process's shared one and is left open.

    ``endpoint`` and ``replay_endpoint`` report the addresses as bound, so that with
    port 0 a test or a sidecar learns the port (``tcp://*:0`` reports
    ``tcp://0.0.0.0:<port>``, where vLLM reports its node's IP instead).
    """

    SHUTDOWN_TIMEOUT: float = 1.0
    """Seconds `shutdown` waits for queued batches to be sent, and again for the
    background thread to end."""

    END_SEQ: bytes = (-1).to_bytes(8, "big", signed=True)
    """The sequence frame of the message that ends a replay."""

    POLL_INTERVAL: float = 0.05
    """Seconds the idle background thread waits for a batch before it looks for
    replay requests again: the longest a request waits while nothing is published."""

    def __init__(
        self,
        endpoint: str = "tcp://*:5557",
        replay_endpoint: str | None = None,
        buffer_steps: int = 10_000,
        hwm: int = 100_000,
        max_queue_size: int = 100_000,
        topic: str = "",
        data_parallel_rank: int = 0,
    ) -> None:
        super().__init__(data_parallel_rank)
        rank = self._data_parallel_rank
        endpoint = _check_endpoint(endpoint, "endpoint")
        if replay_endpoint is not None:
            replay_endpoint = _check_endpoint(replay_endpoint, "replay_endpoint")
        buffer_steps = _check_int(buffer_steps, "buffer_steps", 0)
        hwm = _check_int(hwm, "hwm", 0)
        max_queue_size = _check_int(max_queue_size, "max_queue_size", 0)
        if type(topic) is not str:
            raise TypeError(f"topic must be a str, not {type(topic).__name__} ({topic!r})")
        own_endpoint = offset_endpoint_port(endpoint, rank, "endpoint")
        own_replay = offset_endpoint_port(replay_endpoint, rank, "replay_endpoint")
        assert own_endpoint is not None
        zmq = _import_zmq()
        _events._wire()  # msgspec, now rather than on the thread
        # pyzmq's annotations make a socket from Context.instance() a Never; the
        # sockets are private, typed Any.
        self._zmq = zmq
        context = zmq.Context.instance()
        self._pub: Any = context.socket(zmq.PUB)
        self._replay: Any = None
        try:
            self._pub.setsockopt(zmq.SNDHWM, hwm)
            if _is_bind_address(own_endpoint):
                self._endpoint = self._bind(self._pub, own_endpoint, "endpoint")
            else:
                self._attach(self._pub.connect, own_endpoint, "endpoint")
                self._endpoint = own_endpoint
            self._replay_endpoint: str | None = None
            if own_replay is not None:
                self._replay = context.socket(zmq.ROUTER)
                # ZeroMQ credits a reader only every HWM/2 messages, so a sender can
                # count up to HWM/2 stale ones: twice a full replay plus its marker
                # always fits.
                self._replay.setsockopt(zmq.SNDHWM, 2 * (buffer_steps + 1))
                self._replay_endpoint = self._bind(self._replay, own_replay, "replay_endpoint")
        except BaseException:
            self._pub.close(linger=0)
            if self._replay is not None:
                self._replay.close(linger=0)
            raise

        self._topic = topic
        self._topic_bytes = topic.encode("utf-8")
        self._queue: queue.Queue[object] = queue.Queue(maxsize=max_queue_size)
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._next_seq = 0
        # Set when shutdown gives up waiting: the thread stops without draining.
        self._abandon = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._run, name="pagetable-kv-event-publisher", daemon=True
        )
        self._thread.start()

    # ------------------------------------------------------------------ properties

    @property
    def endpoint(self) -> str:
        """The PUB socket's address: as bound (port 0 resolved), or as connected."""
        return self._endpoint

    @property
    def replay_endpoint(self) -> str | None:
        """The ROUTER socket's address as bound, or ``None`` without replay."""
        return self._replay_endpoint

    @property
    def topic(self) -> str:
        """The first frame of every message published."""
        return self._topic

    # ------------------------------------------------------------------ public

    def publish(self, batch: KVEventBatch) -> None:
        """Queue ``batch`` for the background thread to encode and send.

        Parameters
        ----------
        batch : KVEventBatch
            Its ``data_parallel_rank`` is set to the publisher's when ``None``.  Do
            not change it afterwards: it is encoded later.

        Raises
        ------
        TypeError
            ``batch`` is not a `KVEventBatch`.
        RuntimeError
            The publisher is shut down, or its thread has stopped (the ZeroMQ context
            was terminated).

        Notes
        -----
        Blocks while ``max_queue_size`` batches wait, as vLLM's does.
        """
        with self._lock:
            batch = self._accept(batch)
            if not self._thread.is_alive():
                raise RuntimeError("the publisher's thread has stopped; no more batches")
            self._queue.put(batch)

    def shutdown(self) -> None:
        """Send what is queued (waiting up to `SHUTDOWN_TIMEOUT`), then close.

        Batches published before the call are sent unless the thread cannot send them
        in time; the sockets then close, leaving ZeroMQ up to `SHUTDOWN_TIMEOUT` more
        to deliver what it holds.  Calling it again does nothing.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._queue.put(_STOP, timeout=self.SHUTDOWN_TIMEOUT)
        except queue.Full:
            self._abandon = True
        self._thread.join(self.SHUTDOWN_TIMEOUT)
        if self._thread.is_alive():
            self._abandon = True
            self._thread.join(self.SHUTDOWN_TIMEOUT)
            _log.warning(
                "KV event publisher: shut down with %d batches unsent", self._queue.qsize()
            )

    def __enter__(self) -> ZmqEventPublisher:
        return self

    # ------------------------------------------------------------------ sockets

    def _attach(self, method: Any, address: str, name: str) -> None:
        zmq = self._zmq
        try:
            method(address)
        except zmq.ZMQError as exc:
            if exc.errno in (zmq.EINVAL, zmq.EPROTONOSUPPORT, zmq.ENOCOMPATPROTO):
                raise ValueError(
                    f"{name} {address!r} is not an address ZeroMQ takes: {exc}"
                ) from None
            raise OSError(exc.errno, f"cannot use {name} {address!r}: {exc}") from None

    def _bind(self, socket: Any, address: str, name: str) -> str:
        if address.startswith("tcp://") and ("[" in address or "::" in address):
            socket.setsockopt(self._zmq.IPV6, 1)
        self._attach(socket.bind, address, name)
        return str(socket.getsockopt_string(self._zmq.LAST_ENDPOINT))

    # ------------------------------------------------------------------ thread

    def _run(self) -> None:
        """The background thread: send queued batches, answer replay requests."""
        encode = _events.encode_batch
        terminated = self._zmq.ContextTerminated
        try:
            while not self._abandon:
                try:
                    if self._replay is not None and self._replay.poll(0):
                        self._serve_replay()
                except terminated:
                    raise
                except Exception:
                    _log.exception("KV event publisher: replay request failed")
                try:
                    batch = self._queue.get(timeout=self.POLL_INTERVAL)
                except queue.Empty:
                    continue
                if batch is _STOP:
                    break
                try:
                    payload = encode(batch)  # type: ignore[arg-type]
                except Exception:
                    _log.exception("KV event publisher: dropped a batch it cannot encode")
                    continue
                seq = self._next_seq
                self._next_seq = seq + 1
                try:
                    self._pub.send_multipart((self._topic_bytes, seq.to_bytes(8, "big"), payload))
                except terminated:
                    raise
                except Exception:
                    # Still kept for replay, so a subscriber can ask for it again.
                    _log.exception("KV event publisher: sending batch %d failed", seq)
                self._buffer.append((seq, payload))
        except terminated:
            # Someone terminated the process's shared context: nothing can be sent
            # again, and publish says so from now on.
            _log.error("KV event publisher: the ZeroMQ context was terminated; stopped")
        finally:
            linger = int(self.SHUTDOWN_TIMEOUT * 1000)
            self._pub.close(linger=linger)
            if self._replay is not None:
                self._replay.close(linger=linger)

    def _serve_replay(self) -> None:
        """Answer one replay request, if it is well formed."""
        assert self._replay is not None
        frames = self._replay.recv_multipart()
        if len(frames) != 3:
            _log.warning("KV event publisher: ignored a replay request of %d frames", len(frames))
            return
        client_id, _, start = frames
        start_seq = int.from_bytes(start, "big")
        send = self._replay.send_multipart
        for seq, payload in self._buffer:
            if seq >= start_seq:
                send((client_id, b"", self._topic_bytes, seq.to_bytes(8, "big"), payload))
        send((client_id, b"", b"", self.END_SEQ, b""))


def _is_bind_address(address: str) -> bool:
    """vLLM's rule (a wildcard or ``::`` host, ipc, inproc), and TCP port 0."""
    if "*" in address or "::" in address or address.startswith(("ipc://", "inproc://")):
        return True
    if address.startswith("tcp://"):
        return _split_tcp(address, "endpoint")[1] == 0
    return False
