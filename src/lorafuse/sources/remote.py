"""Hub weight files not on the local disk yet: planned from their headers, downloaded as the stream needs them.

A merge from a repo id needs the shards the cache lacks. Rather than fetching them all before the first
byte is merged, lorafuse reads each missing shard's header with HTTP range requests (a few kB), plans the
whole merge from the headers, and has huggingface_hub download each shard when the stream gets near it,
one at a time, on a background thread. By default the shards land in the Hugging Face cache, as
`hf download` would put them. With --low-disk they go to a scratch folder in the merge's staging folder
instead and are deleted as soon as the stream is done with them, so the disk needs room for about one
input shard besides the output; the cache is never touched.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

from ..errors import LorafuseError
from ..formats.safetensors import Header, parse_header

PREFIX_BYTES = 100_000  # the first range request: the header of any ordinary shard fits


class RemoteFile:
    """One weight file of a repo at a commit, to be downloaded to `path`: into the cache snapshot, or
    into `scratch` (low disk), where it is deleted once merged."""

    def __init__(self, repo_id: str, filename: str, commit: str, path: Path, scratch: Path | None) -> None:
        self.repo_id, self.filename, self.commit, self.path, self.scratch = repo_id, filename, commit, path, scratch
        self.size: int | None = None
        self._prefix = b""
        self._header_bytes = b""

    def read_header(self) -> Header:
        """The file's header, validated like a local one, from one or two range requests."""
        self._prefix, self.size = self._get(0, PREFIX_BYTES - 1)
        parts = []  # the length, then the JSON: kept to check the download against

        def read(offset: int, n: int) -> bytes:
            parts.append(self.read(offset, n))
            return parts[-1]

        header = parse_header(self.path, self.size, read, remote=self)
        self._header_bytes = b"".join(parts)
        return header

    def read(self, offset: int, n: int) -> bytes:
        """Bytes [offset, offset + n), from the first request's bytes when they hold them."""
        if n == 0 or offset + n <= len(self._prefix):
            return self._prefix[offset:offset + n]
        return self._get(offset, offset + n - 1)[0]

    def download(self) -> None:
        """Fetch the file with huggingface_hub and check it is the file that was planned."""
        from huggingface_hub import hf_hub_download

        from .hub_calls import call_hub

        where = {"local_dir": self.scratch} if self.scratch is not None else {}
        got = Path(call_hub(lambda: hf_hub_download(self.repo_id, self.filename, revision=self.commit, **where),
                            self.repo_id, self.commit, "base model", downloading=[self.filename]))
        with open(got, "rb") as f:
            same = got.stat().st_size == self.size and f.read(len(self._header_bytes)) == self._header_bytes
        if not same:
            raise LorafuseError(f"{self.filename} of {self.repo_id}@{self.commit[:7]} as downloaded differs from "
                                "the file that was planned; run again")

    def delete(self) -> None:
        """Remove a scratch download (never a file in the cache)."""
        if self.scratch is not None:
            self.path.unlink(missing_ok=True)

    def _get(self, start: int, end: int) -> tuple[bytes, int]:
        """(bytes start..end, the file's size) by an HTTP range request. Streamed, so that a server that
        ignores the range is caught before it sends a whole shard."""
        from huggingface_hub import constants, hf_hub_url
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        from .hub_calls import call_hub, hub_timeout

        url = hf_hub_url(self.repo_id, self.filename, revision=self.commit)

        def get() -> tuple[bytes, str]:
            headers = {**build_hf_headers(), "Range": f"bytes={start}-{end}"}
            with get_session().stream("GET", url, headers=headers, follow_redirects=True, timeout=hub_timeout()) as response:
                if response.status_code >= 400:
                    response.read()
                    hf_raise_for_status(response)
                if response.status_code != 206:
                    raise LorafuseError(f"{constants.ENDPOINT} answered a range request for {self.filename} with the "
                                        "whole file; lorafuse plans from shard headers and needs range requests, as the "
                                        "Hub answers them: check HF_ENDPOINT")
                return response.read(), response.headers.get("Content-Range", "")

        data, content_range = call_hub(get, self.repo_id, self.commit, "base model")
        total = content_range.rpartition("/")[2]
        if not total.isdigit():
            raise LorafuseError(f"the Hub answered a range request for {self.filename} without the file's size; "
                                "check HF_ENDPOINT")
        return data, int(total)


class Downloads:
    """Download the remote files a sequence of jobs reads, in the order the jobs need them, one at a time
    on a background thread, ahead of the jobs.

    `needs[i]` are the remote files job i reads. A file's uses are grouped into runs of nearby jobs; with
    `hold` set (low disk), at most `hold` downloaded files exist at once, and each is deleted when the
    last job of its run is done (read again much later, it is downloaded again). `hold` must be at least
    `min_hold(needs)`, the most runs that overlap, or the jobs would wait for ever.
    """

    GAP = 8  # jobs between two uses of a file that still count as one run

    def __init__(self, needs: list[list[RemoteFile]], hold: int | None = None,
                 before_delete: Callable[[RemoteFile], None] | None = None) -> None:
        self.runs = _runs(needs, self.GAP)
        self.hold = None if hold is None else max(hold, min_hold(needs))  # fewer would wait for ever
        self._before_delete = before_delete
        self._run_of: dict[tuple[int, int], int] = {}  # (job, file id) -> run index
        for r, (file, jobs) in enumerate(self.runs):
            for job in jobs:
                self._run_of[(job, id(file))] = r
        self._needs = needs
        self._left = [len(jobs) for _, jobs in self.runs]  # jobs of each run not done yet
        self._ready = [False] * len(self.runs)
        self._released = [False] * len(self.runs)
        latest: dict[int, int] = {}
        self._previous: list[int | None] = []  # the same file's previous run, deleted before this one fetches
        for r, (file, _) in enumerate(self.runs):
            self._previous.append(latest.get(id(file)))
            latest[id(file)] = r
        self._held = 0
        self._error: BaseException | None = None
        self._stop = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._fetch, name="lorafuse-download", daemon=True)
        self._thread.start()

    def wait(self, job: int) -> None:
        """Block until every file job `job` reads is downloaded."""
        wanted = [self._run_of[(job, id(f))] for f in self._needs[job]]
        with self._cond:
            self._cond.wait_for(lambda: self._error is not None or all(self._ready[r] for r in wanted))
            if self._error is not None:
                raise self._error

    def done(self, job: int) -> None:
        """Job `job` no longer needs its files: delete those whose run is over (low disk)."""
        for file in self._needs[job]:
            r = self._run_of[(job, id(file))]
            with self._cond:
                self._left[r] -= 1
                if self._left[r] or self.hold is None:
                    continue
            if self._before_delete:
                self._before_delete(file)
            file.delete()
            with self._cond:
                self._held -= 1
                self._released[r] = True
                self._cond.notify_all()

    def abort(self, error: BaseException) -> None:
        """A job failed: jobs waiting for files get `error` too, and nothing more is fetched."""
        with self._cond:
            self._error = self._error or error
            self._stop = True
            self._cond.notify_all()

    def close(self) -> None:
        """Stop fetching. After a failure or Ctrl-C a download in flight is not waited for: huggingface_hub
        keeps what it has (`.incomplete`) for the next run, and the daemon thread ends with the process."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=1)

    def _fetch(self) -> None:
        try:
            for r, (file, _) in enumerate(self.runs):
                before = self._previous[r]
                with self._cond:
                    self._cond.wait_for(lambda: self._stop or self.hold is None
                                        or (self._held < self.hold and (before is None or self._released[before])))
                    if self._stop:
                        return
                    self._held += 1
                if not file.path.is_file():
                    file.download()
                with self._cond:
                    self._ready[r] = True
                    self._cond.notify_all()
        except BaseException as e:  # handed to the jobs waiting for it
            with self._cond:
                self._error = e
                self._cond.notify_all()


def _runs(needs: list[list[RemoteFile]], gap: int) -> list[tuple[RemoteFile, list[int]]]:
    """(file, its jobs) for each run of uses of a file, in the order of the runs' first jobs."""
    runs: list[tuple[RemoteFile, list[int]]] = []
    open_run: dict[int, int] = {}  # file id -> index of its latest run
    for job, files in enumerate(needs):
        for file in dict.fromkeys(files):
            r = open_run.get(id(file))
            if r is not None and job - runs[r][1][-1] <= gap:
                runs[r][1].append(job)
            else:
                open_run[id(file)] = len(runs)
                runs.append((file, [job]))
    return runs


def min_hold(needs: list[list[RemoteFile]]) -> int:
    """The most runs in use at once: how many downloaded files a low-disk merge must be able to keep."""
    events = sorted((jobs[0], jobs[-1]) for _, jobs in _runs(needs, Downloads.GAP))
    ends: list[int] = []
    most = 0
    for start, end in events:
        ends = [e for e in ends if e >= start] + [end]
        most = max(most, len(ends))
    return max(most, 1)
