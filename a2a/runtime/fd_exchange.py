"""POSIX file-descriptor exchange between the ranks of one host, over AF_UNIX sockets.

A file descriptor only means something inside its process; to share one, the kernel must copy it
into the receiver (SCM_RIGHTS ancillary data on a Unix socket). `exchange_fds(bootstrap, fd)`
sends this rank's `fd` to every peer and returns every rank's descriptor as a local one:

    agree on a random job id (rank 0's), gather every rank's pid      (bootstrap)
    listen on the abstract socket "a2a-fds-<job id>-<rank>"           (no file, gone on close)
    allgather every rank's bind status; any failed: all raise         (bootstrap)
    connect to each peer in turn, check who listens                   (SO_PEERCRED)
        then send "<job id>:<rank>" + the fd                          (SCM_RIGHTS)
    allgather every rank's send status; any failed: all raise         (bootstrap)
    accept until one fd from every peer has arrived

Every rank makes the same bootstrap calls whatever happens to its own steps: a step's failure is
caught, reported in the status allgather that follows it, then raised on every rank. A collective
that only the succeeding ranks entered (a barrier) would pair with the failed rank's next one (its
caller's error report) and let the others go on, e.g. send to whoever holds the failed name.

Abstract socket names are visible to every process of the network namespace (/proc/net/unix), so
both ends check the other. Who may deliver: a connection is accepted only from the same uid
(SO_PEERCRED) whose pid is the pid the bootstrap gathered for the rank it claims, with this job's
id. Anything else is refused (closed, along with any fd it carried) and the wait goes on;
refusals are named if the wait then times out. Who may receive: a sender reads SO_PEERCRED of its
connected socket (the process that created the listener) and sends only if that is the same uid
and the pid gathered for the peer rank; otherwise it raises without sending. Needs no ptrace
permission (unlike pidfd_getfd), only one host, one network namespace (abstract socket names live
there) and one pid namespace (pids are compared as seen from this process).

Every socket is closed before `exchange_fds` returns or raises. The returned descriptors belong to
the caller (close them once imported); on failure, descriptors received so far are closed.
"""

from __future__ import annotations

import os
import secrets
import socket
import struct
import time
from dataclasses import dataclass, field

from a2a.runtime.bootstrap import Bootstrap

DEFAULT_TIMEOUT_S = 60.0
_MESSAGE_LIMIT = 256  # bytes: "<16 hex digits>:<rank>"
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_REPORT_LIMIT = 2000  # bytes of one rank's error in a status allgather


def agree_job_id(bootstrap: Bootstrap) -> str:
    """A random id (16 hex digits) that every rank of this world gets, drawn by rank 0."""
    return bootstrap.allgather_bytes(secrets.token_hex(8).encode())[0].decode()


def socket_name(job_id: str, rank: int) -> bytes:
    """Abstract-namespace address (leading NUL) where `rank` of job `job_id` listens."""
    return f"\0a2a-fds-{job_id}-{rank}".encode()


def _remaining(deadline: float, what: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError(what)
    return left


def _peer_credentials(sock: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a connected AF_UNIX socket (SO_PEERCRED).

    For the connecting side this is the process that created the listener, as of its listen().
    """
    pid, uid, _ = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return pid, uid


def send_fd(job_id: str, peer_rank: int, my_rank: int, fd: int, deadline: float, *, peer_pid: int) -> None:
    """Connect to `peer_rank`'s listener and hand it `fd`, tagged with this job and rank.

    Sends only if the listener belongs to `peer_pid` (the pid gathered for `peer_rank`) and this
    process's uid; otherwise raises `RuntimeError` and the fd is never sent.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.settimeout(_remaining(deadline, "deadline passed before connecting"))
            sock.connect(socket_name(job_id, peer_rank))
            pid, uid = _peer_credentials(sock)
        except (OSError, TimeoutError) as exc:
            raise RuntimeError(
                f"rank {my_rank} could not send its fd to rank {peer_rank} of job {job_id}: {exc!r} "
                "(is the peer on this host and in this network namespace, and still alive?)"
            ) from exc
        # Any local process can bind a peer's name first (abstract names are public): check who
        # listens before handing over the memory handle.
        if pid != peer_pid or uid != os.getuid():
            raise RuntimeError(
                f"rank {my_rank} refused to send its fd to rank {peer_rank} of job {job_id}: expected the "
                f"listener of pid {peer_pid}, uid {os.getuid()}, found pid {pid}, uid {uid} "
                "(another process holds the rank's socket name)"
            )
        try:
            socket.send_fds(sock, [f"{job_id}:{my_rank}".encode()], [fd])
        except (OSError, TimeoutError) as exc:
            raise RuntimeError(
                f"rank {my_rank} could not send its fd to rank {peer_rank} of job {job_id}: {exc!r} "
                "(is the peer still alive?)"
            ) from exc


@dataclass
class FdListener:
    """Rank `rank`'s listening socket for job `job_id`; `pids[r]` is rank r's process id.

    Use as a context manager (closes the socket). `refused` lists why connections were refused.
    """

    job_id: str
    rank: int
    pids: list[int]
    refused: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not 0 <= self.rank < len(self.pids):
            raise ValueError(f"rank must be in [0, {len(self.pids)}), got {self.rank}")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.bind(socket_name(self.job_id, self.rank))
            self._sock.listen(max(len(self.pids), 8))
        except OSError:
            self._sock.close()
            raise

    def __enter__(self) -> FdListener:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def accept_fd(self, deadline: float) -> tuple[int, int]:
        """Wait for the next acceptable delivery; returns (sender rank, received fd)."""
        while True:
            self._sock.settimeout(_remaining(deadline, "deadline passed while accepting"))
            conn, _ = self._sock.accept()
            with conn:
                delivered = self._receive(conn, deadline)
            if delivered is not None:
                return delivered

    def _receive(self, conn: socket.socket, deadline: float) -> tuple[int, int] | None:
        pid, uid = _peer_credentials(conn)
        if uid != os.getuid():
            return self._refuse(f"pid {pid}: uid {uid} is not this process's uid {os.getuid()}", [])
        if pid not in self.pids:
            return self._refuse(f"pid {pid}: not a rank of job {self.job_id} (pids {self.pids})", [])
        conn.settimeout(_remaining(deadline, "deadline passed while receiving"))
        message, fds, _, _ = socket.recv_fds(conn, _MESSAGE_LIMIT, 1)
        while chunk := conn.recv(_MESSAGE_LIMIT):  # the sender closes after one message
            message += chunk
            if len(message) > _MESSAGE_LIMIT:
                return self._refuse(f"pid {pid}: message longer than {_MESSAGE_LIMIT} bytes", fds)
        job_id, _, rank_text = message.decode(errors="replace").partition(":")
        if job_id != self.job_id or not rank_text.isdigit() or len(fds) != 1:
            return self._refuse(f"pid {pid}: malformed delivery {message[:64]!r} with {len(fds)} fd(s)", fds)
        sender = int(rank_text)
        if not 0 <= sender < len(self.pids) or sender == self.rank or self.pids[sender] != pid:
            return self._refuse(f"pid {pid}: claims rank {sender}, whose pid is not {pid}", fds)
        return sender, fds[0]

    def _refuse(self, reason: str, fds: list[int]) -> None:
        for fd in fds:
            os.close(fd)
        self.refused.append(reason)


def _agree_on_status(bootstrap: Bootstrap, error: BaseException | None, job_id: str, what: str) -> None:
    """Allgather every rank's status for step `what` (collective); raise on every rank if any failed.

    Every rank calls this whether its step succeeded or not, so the failed ranks and the others
    stay in the same collective.
    """
    report = b"" if error is None else repr(error).encode()[:_REPORT_LIMIT]
    failed = {r: item.decode(errors="replace") for r, item in enumerate(bootstrap.allgather_bytes(report)) if item}
    if failed:
        details = "; ".join(f"rank {r}: {message}" for r, message in failed.items())
        raise RuntimeError(
            f"rank {bootstrap.rank} stops the fd exchange of job {job_id}: rank(s) {sorted(failed)} {what}: {details}"
        ) from error


def exchange_fds(bootstrap: Bootstrap, fd: int, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> list[int]:
    """Every rank's `fd` as a descriptor of this process, indexed by rank (collective).

    Entry `bootstrap.rank` is `fd` itself; the others are new descriptors the caller must close.
    Raises `RuntimeError` on every rank, naming the rank(s) and the cause, when a rank could not
    listen (e.g. another process holds its socket name) or could not send (e.g. the listener is
    not the peer's process); then nothing is sent or the peers drop what they received. Raises it
    naming the missing peer(s) when not every peer delivered within `timeout_s` seconds.
    """
    if isinstance(fd, bool) or not isinstance(fd, int) or fd < 0:
        raise ValueError(f"fd must be a non-negative int, got {fd!r}")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    os.fstat(fd)  # a closed fd fails here, before any peer waits for it
    rank, world_size = bootstrap.rank, bootstrap.world_size
    if world_size == 1:
        return [fd]
    job_id = agree_job_id(bootstrap)
    pids = bootstrap.allgather_int(os.getpid())
    received: dict[int, int] = {}
    deadline = time.monotonic() + timeout_s
    listener: FdListener | None = None
    error: Exception | None = None
    try:
        try:
            listener = FdListener(job_id, rank, pids)
        except Exception as exc:  # noqa: BLE001 - raised on every rank by the status allgather below
            error = exc
        # Every listener is bound before anyone connects, and no one connects if any bind failed.
        _agree_on_status(bootstrap, error, job_id, "could not listen on their socket names (held by another process?)")
        assert listener is not None
        try:
            for step in range(1, world_size):
                peer = (rank + step) % world_size
                send_fd(job_id, peer, rank, fd, deadline, peer_pid=pids[peer])
        except Exception as exc:  # noqa: BLE001 - raised on every rank by the status allgather below
            error = exc
        # Sends complete without an accept (the listeners' backlog holds them), so a failed send
        # fails every rank now instead of leaving its peers to wait out the deadline.
        _agree_on_status(bootstrap, error, job_id, "could not send their fds")
        while len(received) < world_size - 1:
            try:
                sender, peer_fd = listener.accept_fd(deadline)
            except (TimeoutError, OSError) as exc:
                missing = sorted(set(range(world_size)) - set(received) - {rank})
                refused = f"; refused: {listener.refused}" if listener.refused else ""
                raise RuntimeError(
                    f"rank {rank} got no fd from rank(s) {missing} of job {job_id} within {timeout_s:g} s "
                    f"({exc!r}){refused}"
                ) from exc
            if sender in received:
                os.close(peer_fd)
                raise RuntimeError(f"rank {rank} got two fds from rank {sender} of job {job_id}")
            received[sender] = peer_fd
    except BaseException:
        for peer_fd in received.values():
            os.close(peer_fd)
        raise
    finally:
        # Closing the listener also drops connections not accepted yet, and the fds they carry.
        if listener is not None:
            listener.close()
    return [fd if r == rank else received[r] for r in range(world_size)]
