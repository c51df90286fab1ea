"""A run's output folder: one run at a time, and the housekeeping done at start under that lock.

All three scripts wrap their run in `claim(args.output_dir, enabled=rank == 0)` once the flags
and the data are checked, before anything is written there (args.json, TensorBoard, log.txt,
checkpoints):

* the folder is checked first: an `--output_dir` that is a file, or a folder that cannot be
  created or written, is a `OutputDirError` naming the folder and the cause;
* an exclusive `flock` on `<output_dir>/.lock` is held for the whole run and released on return
  and on exceptions. The lock file says who holds it (host, pid, SLURM job, start time); a second
  run into the same folder is refused (`FolderBusyError`) with that holder named. A requeued SLURM
  job whose previous holder is the same SLURM job (NFS keeps the locks of a dead node for a short
  while) waits for it, up to `REQUEUE_WAIT_S`. Where the filesystem cannot lock, a warning is
  logged once per folder and the run goes on unlocked;
* once the lock is held, the temporary files that killed writes left behind (`save_atomic`'s
  `.checkpoint-*.pth.*.tmp`, `save_args`'s `.args.json.tmp<pid>`) are removed.

`--output_dir ''` (nothing saved) takes no lock.
"""
from __future__ import annotations

import datetime
import errno
import json
import logging
import os
import re
import socket
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import UserError

try:
    import fcntl
except ImportError:  # not POSIX: no locking, the run goes on with a warning
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("umae")

LOCK_NAME = ".lock"
REQUEUE_WAIT_S = 120.0  # how long a requeued SLURM job waits for its own previous holder
POLL_S = 5.0
UNLOCKED_MIN_AGE_S = 3600.0  # without a lock, only temporary files this old are taken as stale

# The temporary files of killed writes: checkpoint.save_atomic's mkstemp names
# (`.checkpoint-<epoch|last>.pth.<random>.tmp`) and runtime.save_args's `.args.json.tmp<pid>`.
STALE_TEMP_RE = re.compile(r"^\.checkpoint-[^/]*\.pth\.[A-Za-z0-9_]+\.tmp$|^\.args\.json\.tmp\d+$")

_warned_unlockable: set[str] = set()


class OutputDirError(UserError):
    """`--output_dir` is a file, or a folder that cannot be created or written."""


class FolderBusyError(UserError):
    """Another run holds the output folder's lock."""


def slurm_job(env: Mapping[str, str] | None = None) -> str | None:
    """This process's SLURM job: `SLURM_JOB_ID`, with `SLURM_ARRAY_JOB_ID`_`SLURM_ARRAY_TASK_ID`
    for an array task (both stay the same when SLURM requeues the job); None outside SLURM."""
    env = os.environ if env is None else env
    job = env.get("SLURM_JOB_ID") or None
    array, task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{job} (array {array}_{task})" if job else f"{array}_{task}"
    return job


def holder_record(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """What the lock file says about its holder."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": slurm_job(env),
            "start": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def describe_holder(record: Mapping[str, Any] | None) -> str:
    if not record:
        return "a run that has not written its name in the lock file"
    parts = [f"host {record.get('host', '?')}", f"pid {record.get('pid', '?')}"]
    if record.get("slurm_job"):
        parts.append(f"SLURM job {record['slurm_job']}")
    parts.append(f"started {record.get('start', '?')}")
    return ", ".join(parts)


def read_holder(lock_path: str | os.PathLike) -> dict[str, Any] | None:
    """The holder record in a lock file, or None when it holds none (being written, or foreign)."""
    try:
        record = json.loads(Path(lock_path).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def check_output_dir(output_dir: str | os.PathLike) -> Path:
    """Create `output_dir` if needed; `OutputDirError` (naming the folder and the cause) when it
    is a file or cannot be created. Writability is checked by opening the lock file."""
    folder = Path(output_dir)
    if folder.exists() and not folder.is_dir():
        raise OutputDirError(f"--output_dir {folder}: exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputDirError(f"--output_dir {folder}: cannot create the folder ({_reason(err)})") from None
    return folder


def _reason(err: OSError) -> str:
    return err.strerror or (os.strerror(err.errno) if err.errno else str(err))


def remove_stale_temp_files(output_dir: str | os.PathLike, min_age_s: float = 0.0) -> list[Path]:
    """Remove the temporary files killed writes left in `output_dir` (only names matching
    `STALE_TEMP_RE`, at least `min_age_s` old); returns those removed. Call it holding the lock:
    no other run is writing there then."""
    removed, size = [], 0
    now = time.time()
    for path in Path(output_dir).iterdir():
        if not STALE_TEMP_RE.match(path.name):
            continue
        try:
            st = path.lstat()
            if min_age_s and now - st.st_mtime < min_age_s:
                continue
            path.unlink()
        except OSError:
            continue
        removed.append(path)
        size += st.st_size
    if removed:
        log.info("removed %d temporary file%s of killed writes from %s (%.1f MB)", len(removed),
                 "s" if len(removed) != 1 else "", output_dir, size / 1e6)
    return removed


class RunFolder:
    """The exclusive claim of one output folder, as a context manager (see the module's doc).

    `enabled=False` (ranks other than 0) and an empty `output_dir` do nothing. `wait_s`,
    `poll_s`, `sleep`, `clock` and `env` are injectable for tests (defaults: the module's
    `REQUEUE_WAIT_S`, `POLL_S`, `time.sleep`, `time.monotonic`, `os.environ`)."""

    def __init__(
        self,
        output_dir: str | os.PathLike | None,
        *,
        enabled: bool = True,
        wait_s: float | None = None,
        poll_s: float | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.folder = Path(output_dir) if output_dir else None
        self.enabled = enabled and self.folder is not None
        self.wait_s, self.poll_s = wait_s, poll_s
        self.sleep, self.clock, self.env = sleep, clock, env
        self.fd: int | None = None
        self.locked = False

    @property
    def lock_path(self) -> Path:
        assert self.folder is not None
        return self.folder / LOCK_NAME

    def __enter__(self) -> RunFolder:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        if not self.enabled or self.fd is not None:
            return
        folder = check_output_dir(self.folder)
        try:
            self.fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise OutputDirError(f"--output_dir {folder}: cannot write there ({_reason(err)})") from None
        try:
            self.locked = self._lock()
            if self.locked:
                record = json.dumps(holder_record(self.env)) + "\n"
                os.ftruncate(self.fd, 0)
                os.pwrite(self.fd, record.encode(), 0)
                os.fsync(self.fd)  # readers on other NFS clients see who holds it
            remove_stale_temp_files(folder, 0.0 if self.locked else UNLOCKED_MIN_AGE_S)
        except BaseException:
            self.release()
            raise

    def _lock(self) -> bool:
        """Take the lock (True), or find that the filesystem cannot lock (False, warned once);
        `FolderBusyError` while another run holds it."""
        if fcntl is None:
            return self._unlockable("this platform has no fcntl")
        deadline = None
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                pass
            except OSError as err:
                if err.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                    pass
                else:
                    return self._unlockable(_reason(err))
            holder = read_holder(self.lock_path)
            own_job = slurm_job(self.env)
            same_job = own_job is not None and holder is not None and holder.get("slurm_job") == own_job
            wait_s = REQUEUE_WAIT_S if self.wait_s is None else self.wait_s
            if same_job:
                now = self.clock()
                if deadline is None:
                    deadline = now + wait_s
                    log.warning("%s is held by %s, this SLURM job before its requeue: waiting up to %.0f s "
                                "for its lock to go", self.folder, describe_holder(holder), wait_s)
                if now < deadline:
                    self.sleep(POLL_S if self.poll_s is None else self.poll_s)
                    continue
            waited = f" (waited {wait_s:.0f} s for it: same SLURM job)" if same_job else ""
            raise FolderBusyError(
                f"--output_dir {self.folder} is in use by another run: {describe_holder(holder)}{waited}; "
                f"give this run another --output_dir, or, if no such run is alive, delete {self.lock_path}")

    def _unlockable(self, reason: str) -> bool:
        key = str(self.folder.resolve())
        if key not in _warned_unlockable:
            _warned_unlockable.add(key)
            log.warning("cannot lock %s (%s): going on without a lock; make sure no other run writes "
                        "into this folder", self.lock_path, reason)
        return False

    def release(self) -> None:
        """Release the lock (idempotent); the lock file stays, emptied of its holder's name."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            if self.locked:
                try:
                    os.ftruncate(fd, 0)
                except OSError:
                    pass
                try:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                except OSError:
                    pass
        finally:
            self.locked = False
            os.close(fd)


def claim(output_dir: str | os.PathLike | None, *, enabled: bool = True, **kwargs: Any) -> RunFolder:
    """`with claim(args.output_dir, enabled=rt.is_main): ...` around a run (see `RunFolder`)."""
    return RunFolder(output_dir, enabled=enabled, **kwargs)
