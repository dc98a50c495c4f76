"""One run owns an output: `<output>/_lease` names it (run id, host, pid, heartbeat).

Two runs on one `--output` would render the same rows and fold the same index under each other. A run takes the
lease before it writes anything; a second run exits 2 naming the owner. A lease whose owner is gone is taken over,
with a log line: on the same host when its pid is gone (or is a newer process that reused it), elsewhere when its
heartbeat (renewed every HEARTBEAT_S) is older than STALE_AFTER_S.

Taking it is a compare-and-swap, so two runs that find the output free (or the same stale lease) cannot both win:
locally a hard link that fails if the lease exists, and a stale one is replaced only under an exclusive lock
(`<output>/_lease.lock`, flock) after reading it again: still the version that was judged stale; on S3 a conditional
PUT (`If-None-Match: *` to create, `If-Match: <etag>` to take over a stale one). A store that offers neither gets a
plain write, read back: the last writer owns it, the other sees so and exits 2.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass

import psutil

from skyreels_batch import storage
from skyreels_batch.config import JobRefused

HEARTBEAT_S = 30.0
STALE_AFTER_S = 120.0
# S3's answers to a conditional PUT that another writer got in before.
LOST_RACE = ("PreconditionFailed", "ConditionalRequestConflict")


class OutputTaken(JobRefused):
    """Another run owns the output."""


@dataclass(frozen=True)
class Owner:
    run: str
    host: str
    pid: int
    started: float  # wall clock, seconds since the epoch
    heartbeat: float

    def gone(self, now: float) -> str | None:
        """Why this owner is gone, or None while it may still run."""
        if self.host == socket.gethostname():
            try:
                process = psutil.Process(self.pid)
            except psutil.NoSuchProcess:
                return f"its process {self.pid} on this host is gone"
            if process.create_time() > self.started + 1:
                return f"its process {self.pid} on this host is gone (the pid belongs to a newer process)"
            return None
        if now - self.heartbeat > STALE_AFTER_S:
            return f"no heartbeat from {self.host} for {now - self.heartbeat:.0f} s"
        return None

    def describe(self, now: float) -> str:
        return f"run {self.run} (host {self.host}, pid {self.pid}, last heartbeat {now - self.heartbeat:.0f} s ago)"


def lease_uri(output: str) -> str:
    return storage.join(output, "_lease")


class Lease:
    """The lease of one run on one output: `take()` or raise OutputTaken; renewed on a thread; `release()`."""

    def __init__(self, output: str, run: str, *, log: Callable[[str], None], on_lost: Callable[[], None]) -> None:
        self.uri = lease_uri(output)
        self.output = output
        now = time.time()
        self.owner = Owner(run, socket.gethostname(), os.getpid(), now, now)
        self.log = log
        self.on_lost = on_lost
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None

    def __enter__(self) -> Lease:
        return self.take()

    def __exit__(self, *_: object) -> None:
        self.release()

    def take(self) -> Lease:
        current = _read(self.uri)
        if current is None:
            won = _create(self.uri, self._text())
        else:
            owner, etag = current
            why = owner.gone(time.time())
            if why is None:
                raise OutputTaken(
                    f"--output {self.output} is in use by {owner.describe(time.time())}: one run per output"
                )
            self.log(f"taking over the lease of {self.output} from run {owner.run} (host {owner.host}): {why}")
            won = _swap(self.uri, self._text(), etag)
        holder = _read(self.uri)
        if not won or holder is None or holder[0].run != self.owner.run:
            who = holder[0].describe(time.time()) if holder else "another run"
            raise OutputTaken(f"--output {self.output} was taken by {who} at the same moment: one run per output")
        self.thread = threading.Thread(target=self._renew, name="output-lease", daemon=True)
        self.thread.start()
        return self

    def release(self) -> None:
        self.stopped.set()
        if self.thread is not None:
            self.thread.join()
        holder = _read(self.uri)
        if holder is not None and holder[0].run == self.owner.run:
            storage.remove_files([self.uri])

    def _renew(self) -> None:
        while not self.stopped.wait(HEARTBEAT_S):
            try:
                holder = _read(self.uri)
                ours = holder is not None and holder[0].run == self.owner.run
                if ours and _swap(self.uri, self._beat(), holder[1]):
                    continue
                holder = _read(self.uri)
            except Exception as error:  # noqa: BLE001 - a store's hiccup: the next beat tries again
                self.log(f"the lease's heartbeat failed (the next one tries again): {error}")
                continue
            who = holder[0].describe(time.time()) if holder else "nobody"
            self.log(f"lost the lease of {self.output} (now held by {who}): stopping")
            self.on_lost()
            return

    def _beat(self) -> bytes:
        return self._text(heartbeat=time.time())

    def _text(self, heartbeat: float | None = None) -> bytes:
        owner = self.owner if heartbeat is None else Owner(**{**asdict(self.owner), "heartbeat": heartbeat})
        return json.dumps(asdict(owner)).encode()


def _read(uri: str) -> tuple[Owner, str | None] | None:
    """The lease's owner and its version (an S3 ETag; locally a hash of its bytes), or None without a lease."""
    fs, path = storage.filesystem(uri)
    try:
        if storage.is_local(fs):
            text = fs.cat_file(path)
            etag = _version(text)
        else:
            etag = fs.info(path).get("ETag")
            text = fs.cat_file(path)
        owner = Owner(**json.loads(text))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as error:  # not a lease this version wrote: nobody can tell whether it is live
        raise OutputTaken(f"{uri} is unreadable ({error}): remove it if no run uses this output") from None
    finally:
        fs.invalidate_cache(path)
    return owner, etag


def _create(uri: str, text: bytes) -> bool:
    """Write the lease only if there is none; whether this call wrote it."""
    fs, path = storage.filesystem(uri)
    if storage.is_local(fs):
        fs.makedirs(fs._parent(path), exist_ok=True)
        staging = f"{path}.{uuid.uuid4().hex}.partial"
        with open(staging, "wb") as file:
            file.write(text)
        try:
            os.link(staging, path)  # fails if the lease exists: create-only, whole
        except FileExistsError:
            return False
        finally:
            os.remove(staging)
        return True
    return _conditional_put(fs, path, text, {"mode": "create"})


def _swap(uri: str, text: bytes, etag: str | None) -> bool:
    """Write the lease only if it is still the version read (`etag`): a stale one taken over, or our own renewed;
    whether this call wrote it. Never a moment with no lease, in which a starting run could take it."""
    fs, path = storage.filesystem(uri)
    if not storage.is_local(fs):
        return _conditional_put(fs, path, text, {"IfMatch": etag} if etag else {})
    # Read again under the lock: a run that read the same stale lease and replaced it first changed its bytes.
    # (Renaming the stale one away is no compare-and-swap: a slower run would rename away the winner's lease.)
    with storage.local_lock(f"{path}.lock"):
        try:
            with open(path, "rb") as file:
                if _version(file.read()) != etag:
                    return False
        except FileNotFoundError:
            return False
        storage.write_bytes_atomic(uri, text)
    return True


def _version(text: bytes) -> str:
    return hashlib.sha256(text).hexdigest()


def _conditional_put(fs, path: str, text: bytes, condition: dict) -> bool:
    """A PUT with S3's conditions where the store offers them (s3fs), else a plain one (read back by the caller)."""
    if "s3" not in fs.protocol:
        fs.pipe_file(path, text)
        return True
    try:
        fs.pipe_file(path, text, **condition)
    except (FileExistsError, OSError) as error:
        response = getattr(error.__cause__, "response", None) or {}
        if isinstance(error, FileExistsError) or response.get("Error", {}).get("Code") in LOST_RACE:
            return False
        raise
    finally:
        fs.invalidate_cache(path)
    return True
