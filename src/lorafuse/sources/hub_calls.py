"""Calling the Hugging Face Hub: its timeouts, its cache folder, and its exceptions as one-line errors.

Both the resolution of repo ids (hub.py) and the range reads and downloads of base shards during a merge
(remote.py) call the Hub through here.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import LorafuseError


def call_hub(fn, repo_id: str, rev: str, what: str, *, label: str | None = None, downloading: list[str] | None = None):
    """Run a huggingface_hub call, turning its exceptions into one-line LorafuseErrors."""
    try:
        return fn()
    except LorafuseError:
        raise
    except Exception as e:
        error, why = _hub_error(e, repo_id, rev, what)
        if why is not None:
            files = f"downloading {_few(downloading)} failed" if downloading else "the Hub call failed"
            raise LorafuseError(f"{label or f'{what} {repo_id}@{rev}'}: {files}: {why}") from None
        raise error from None


def cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_timeout() -> float:
    """Seconds to wait for a Hub API answer (huggingface_hub's own session waits for ever): HF_HUB_ETAG_TIMEOUT, at least 10."""
    from huggingface_hub import constants

    return float(max(getattr(constants, "HF_HUB_ETAG_TIMEOUT", 10) or 10, 10))


# -- errors ----------------------------------------------------------------------------------------

class _Fallback(LorafuseError):
    """An error after which the cache may still serve the repo (not found, gated, refused): huggingface_hub
    itself falls back to the cache then, and so do we; raised only if the cache cannot serve."""


def _hub_error(e: Exception, repo_id: str, rev: str, what: str) -> tuple[LorafuseError, str | None]:
    """(error to raise, reason the Hub is unreachable or None). Unreachable means: use the cache instead."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    endpoint = constants.ENDPOINT
    token = _has_token()
    if isinstance(e, OfflineModeIsEnabled):
        why = "HF_HUB_OFFLINE is set; run once online or unset HF_HUB_OFFLINE"
        return LorafuseError(why), why
    if isinstance(e, RevisionNotFoundError):
        return LorafuseError(f"{what} {repo_id} has no revision {rev!r}; pass a branch, tag or commit of the repo, "
                             f"e.g. {repo_id}@main"), None
    if isinstance(e, GatedRepoError):
        fix = ("the account of HF_TOKEN has not been granted access yet; accept the conditions there with that account"
               if token else "set HF_TOKEN (or run `hf auth login`) with the account that accepted them")
        return _Fallback(f"{what} {repo_id} is gated: accept its conditions at {endpoint}/{repo_id} and {fix}"), None
    if isinstance(e, RepositoryNotFoundError):
        fix = ("check the name, and that the token in HF_TOKEN may read it" if token else
               "check the name, or set HF_TOKEN (or run `hf auth login`) if it is private")
        return _Fallback(f"{what} {repo_id}: no such folder, and no model repo {repo_id} on the Hub ({endpoint}); {fix}"), None
    if isinstance(e, HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        message = _first_line(getattr(e, "server_message", None) or str(e))
        if status is not None and (status >= 500 or status in (408, 429)):
            why = f"the Hub ({endpoint}) answered {status}; run again later"
            return LorafuseError(why), why
        if status == 401:
            return _Fallback(f"{what} {repo_id}: the Hub refused the token ({message}); set a valid HF_TOKEN or unset it"), None
        if status == 403:
            return _Fallback(f"{what} {repo_id}: the token may not read this repo ({message}); use a token with read access"), None
        return LorafuseError(f"{what} {repo_id}@{rev}: the Hub ({endpoint}) answered {status} ({message}); "
                             "check the repo id and HF_ENDPOINT"), None
    if _is_network_error(e):
        why = (f"the Hub ({endpoint}) cannot be reached ({type(e).__name__}: {_first_line(str(e))}); "
               "check the network, proxy or HF_ENDPOINT and run again")
        return LorafuseError(why), why
    if isinstance(e, OSError):  # writing the cache: disk full, permissions
        return LorafuseError(f"{what} {repo_id}: cannot write to the Hugging Face cache {cache_dir()} ({e}); "
                             "free some space or point HF_HUB_CACHE at another disk"), None
    raise e


def _is_network_error(e: BaseException) -> bool:
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    from huggingface_hub.errors import LocalEntryNotFoundError

    if isinstance(e, LocalEntryNotFoundError):  # huggingface_hub: the Hub failed and the cache cannot serve
        return True
    return any(c.__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "requests", "urllib3")
               for c in type(e).__mro__)


def _has_token() -> bool:
    try:
        from huggingface_hub import get_token

        return bool(get_token())
    except Exception:
        return False


def _first_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    line = lines[0] if lines else ""
    return line if len(line) <= 200 else line[:197] + "..."


def _few(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
