"""Publish a merged model to the Hugging Face Hub: shards as they are done, one commit at the end.

It wraps any sink: it hears of each weight file the sink finishes (`shard_done`, from the executor's
on_shard_done), and commits the staged folder the sink and the manifest filled (`finish`).
Each shard is pre-uploaded (LFS) as soon as the executor reports it complete, on one background thread,
so uploading overlaps merging; the repo only changes when `finish` sends a single commit holding every
file of the output (shards, config, tokenizer, index, model card, manifest): nobody sees a half-merged repo.
Run again after an interruption, the Hub's LFS batch answer skips every object it already holds.
With `delete_uploaded`, a shard's local file is removed once the Hub holds it: the commit only needs its
sha256 and size, which the pre-upload recorded.
"""

from __future__ import annotations

import os
import queue
import threading
from pathlib import Path

from ..errors import LorafuseError
from ..output import PARTIAL


class HubPublisher:
    def __init__(self, repo_id: str, *, private: bool = False, revision: str | None = None,
                 commit_message: str | None = None, token: str | None = None, delete_uploaded: bool = False,
                 endpoint: str | None = None):
        self.repo_id = repo_id
        self.private = private
        self.revision = revision
        self.commit_message = commit_message or "Upload merged model with lorafuse"
        self.token = token
        self.delete_uploaded = delete_uploaded
        self.endpoint = endpoint
        self.api = None
        self._ops: dict[str, tuple] = {}  # path_in_repo -> (CommitOperationAdd, local path, (size, mtime_ns) or None)
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> HubPublisher:
        """Create the repo (if missing) and the branch (if asked and missing), before any merging."""
        from huggingface_hub import HfApi

        self.api = HfApi(endpoint=self.endpoint, token=self.token)
        with self._hub_errors("create the repo"):
            self.api.create_repo(self.repo_id, private=self.private, exist_ok=True, repo_type="model")
            if self.revision is not None:
                self.api.create_branch(self.repo_id, branch=self.revision, exist_ok=True)
        self._thread = threading.Thread(target=self._worker, name="lorafuse-hub-upload", daemon=True)
        self._thread.start()
        return self

    def shard_done(self, path: Path, path_in_repo: str | None = None, sha256: str | None = None) -> None:
        """Queue the finished file `path` for pre-upload now; returns at once (thread-safe).

        `sha256` (hex), when the caller already hashed the file, saves hashing it again."""
        self._raise_pending()
        if self._thread is None:
            raise RuntimeError("HubPublisher.start() was not called")
        name = path_in_repo or Path(path).name
        with self._lock:
            adopted = name in self._ops and self._ops[name][1] is None
        if not adopted:
            self._queue.put((Path(path), name, sha256))

    def adopt(self, path_in_repo: str, sha256: str, size: int) -> bool:
        """Commit a file an earlier, interrupted run uploaded and then deleted locally (--low-disk), if the
        Hub still holds it: an LFS batch request answers without an upload action for objects it has."""
        from huggingface_hub import CommitOperationAdd
        from huggingface_hub.lfs import UploadInfo, post_lfs_batch_info

        info = UploadInfo(sha256=bytes.fromhex(sha256), size=size, sample=b"")
        with self._hub_errors(f"check {path_in_repo}"):
            actions, errors, _ = post_lfs_batch_info([info], token=self.token, repo_type="model", repo_id=self.repo_id,
                                                     revision=self.revision, endpoint=self.endpoint)
        if errors or len(actions) != 1 or actions[0].get("actions"):
            return False
        op = CommitOperationAdd(path_in_repo=path_in_repo, path_or_fileobj=b"")
        op.upload_info, op._upload_mode, op._is_uploaded = info, "lfs", True
        with self._lock:
            self._ops[path_in_repo] = (op, None, None)
        return True

    def wait(self) -> None:
        """Block until every queued shard is pre-uploaded; raise the first upload error."""
        self._queue.join()
        self._raise_pending()

    def finish(self, folder: Path, skip: set[str] = frozenset()) -> str:
        """Commit every file under `folder` but those named in `skip` (and the pre-uploaded shards deleted
        from it) in one commit. Returns the commit URL."""
        from huggingface_hub import CommitOperationAdd

        self.wait()
        self._stop_worker()
        folder = Path(folder)
        operations = {}
        for path in sorted(folder.rglob("*")):
            if not path.is_file() or path.name.endswith(PARTIAL) or path.name in skip:
                continue
            name = path.relative_to(folder).as_posix()
            with self._lock:
                known = self._ops.get(name)
            if known is not None and known[2] == _stamp(path):
                known[0].path_or_fileobj = str(path)  # unchanged since, maybe moved (staging folder -> OUT)
                operations[name] = known[0]  # pre-uploaded
            else:
                operations[name] = CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))
        with self._lock:
            for name, (op, local, stamp) in self._ops.items():
                if name not in operations and stamp is None:  # pre-uploaded, then its local file deleted
                    operations[name] = op
        if not operations:
            raise LorafuseError(f"nothing to push: {folder} holds no files")
        with self._hub_errors("commit"):
            info = self.api.create_commit(self.repo_id, list(operations.values()), commit_message=self.commit_message,
                                          revision=self.revision, repo_type="model")
        return info.commit_url

    def close(self) -> None:
        """Stop the upload thread without committing (after a failed merge): the repo is left unchanged."""
        self._stop_worker()

    # -- the upload thread --------------------------------------------------------------------------
    def _worker(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is None:
                    self._preupload(*item)
            except BaseException as e:  # kept for the caller's thread
                self._error = e
            finally:
                self._queue.task_done()

    def _preupload(self, path: Path, name: str, sha256: str | None) -> None:
        from huggingface_hub import CommitOperationAdd

        stamp = _stamp(path)
        op = CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))
        if sha256 is not None:
            op.upload_info.sha256 = bytes.fromhex(sha256)
        with self._hub_errors(f"upload {name}"):
            self.api.preupload_lfs_files(self.repo_id, additions=[op], revision=self.revision, repo_type="model",
                                         free_memory=False)
        if self.delete_uploaded and op._upload_mode == "lfs" and op._is_uploaded:
            # The commit refers to an LFS object by sha256 and size only: the local file is no longer needed.
            op.upload_info.sha256  # computed by now; make sure nothing needs the file later
            path.unlink()
            stamp = None
        with self._lock:
            self._ops[name] = (op, path, stamp)

    def _stop_worker(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._thread = None

    def _raise_pending(self) -> None:
        error = self._error
        if error is not None:
            self._error = None
            if isinstance(error, LorafuseError):
                raise error
            raise LorafuseError(f"pushing to {self.repo_id} failed: {_one_line(error)}") from error

    def _hub_errors(self, doing: str):
        return _HubErrors(self, doing)


class _HubErrors:
    """Turn huggingface_hub and network errors into one-line LorafuseErrors that say what to do."""

    def __init__(self, publisher: HubPublisher, doing: str):
        self.p, self.doing = publisher, doing

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if error is None or isinstance(error, LorafuseError) or not isinstance(error, Exception):
            return False
        from huggingface_hub.errors import (HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError,
                                            RevisionNotFoundError)

        repo = self.p.repo_id
        where = f"cannot {self.doing} on the Hugging Face Hub ({repo})"
        status = getattr(getattr(error, "response", None), "status_code", None)
        if isinstance(error, OfflineModeIsEnabled):
            message = f"{where}: HF_HUB_OFFLINE is set; unset it to push to the Hub"
        elif isinstance(error, RevisionNotFoundError):
            message = f"{where}: branch {self.p.revision} does not exist; check --revision"
        elif status in (401, 403) or (isinstance(error, RepositoryNotFoundError) and status == 401):
            message = (f"{where}: not authorized (HTTP {status}); log in with `hf auth login` or set HF_TOKEN "
                       f"to a token with write access to {repo}")
        elif isinstance(error, RepositoryNotFoundError):
            message = (f"{where}: repository not found; check the repo id, and that your token can write to "
                       f"its namespace (`hf auth login` or HF_TOKEN)")
        elif isinstance(error, HfHubHTTPError):
            message = f"{where}: the Hub answered HTTP {status}: {_one_line(error)}; run the same command again later"
        elif isinstance(error, OSError) or type(error).__module__.startswith(("httpx", "httpcore", "requests")):
            message = (f"{where}: network error ({_one_line(error)}); check your connection or HF_ENDPOINT and run "
                       "the same command again: what the Hub already holds is not uploaded again")
        else:
            message = f"{where}: {type(error).__name__}: {_one_line(error)}"
        raise LorafuseError(message) from error


def _stamp(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:300] or type(error).__name__
