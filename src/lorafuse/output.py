"""The staging folder and the atomic finish: where a merge writes, one merge at a time, and how the
finished folder becomes OUT (what goes into it is the sinks' business: lorafuse.sinks).

The output is assembled in a hidden staging folder next to OUT and renamed into place only when
complete, so OUT is either absent, the previous folder (with --force), or the finished merge.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

from .errors import LorafuseError
from .formats.folder import create, fsync_path, identity_of
from .formats.jsonfile import read_json
from .manifest import MANIFEST
from .plan import work_path
from .units import human_size


MARKER = ".lorafuse-staging"  # written into the staging folder right after it is made: lorafuse's own
PARTIAL = ".partial"  # a file being written in the staging folder ends so until it is complete


def staging_folder(out: Path) -> Path:
    return work_path(out, "partial")


def make_staging(staging: Path) -> None:
    """Create the staging folder (kept if it is there: a resumed run's) and mark it as lorafuse's, so
    that only a folder proven to be lorafuse's is ever cleared (see `claim_staging`)."""
    staging.mkdir(exist_ok=True)
    if not os.path.lexists(staging / MARKER):
        create(staging / MARKER).close()


def claim_staging(out: Path) -> None:
    """Under the lock, before anything is deleted: refuse a staging folder lorafuse cannot prove it made
    (one with no marker and something in it: a user's own folder at the reserved name, or one of a
    lorafuse too old to mark it, whose ledger could not match anyway), and an old OUT left by a --force
    merge that stopped between its two renames (it may be the only copy of that OUT)."""
    staging, old = staging_folder(out), work_path(out, "old")
    if os.path.lexists(old):
        raise LorafuseError(f"{old} is in lorafuse's way: it may hold an earlier {out} that a --force merge was "
                            "replacing when it stopped; move it back or delete it")
    if staging.is_dir() and not staging.is_symlink() and not regular_file(staging / MARKER):
        try:
            held = sorted(p.name for p in staging.iterdir())
        except OSError as e:
            raise LorafuseError(f"cannot read {staging}: {e.strerror}; move it away and run again") from None
        if held:
            shown = ", ".join(held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
            raise LorafuseError(f"{staging} is not a staging folder of this lorafuse (it holds {shown}); lorafuse "
                                f"keeps its work for {out} there: move it away (or delete it) and run again")


def clear(folder: Path, keep: set[str] | None = None) -> None:
    """Delete `folder`, or with `keep` everything in it but those names and the marker, without following
    any link in it; the marker goes last, so a folder left half cleared is still known as lorafuse's.
    What cannot be deleted stops the merge: ignored, it would be written through or carried into OUT."""
    if not os.path.lexists(folder):
        return
    try:
        if folder.is_symlink():
            raise OSError(errno.ENOTDIR, "it is a symbolic link, not lorafuse's folder")
        for path in folder.iterdir():
            if path.name == MARKER or (keep is not None and path.name in keep):
                continue
            if path.is_dir() and not path.is_symlink():
                _refuse_mounts(path)
                shutil.rmtree(path)
            else:
                path.unlink()
        if keep is None:
            (folder / MARKER).unlink(missing_ok=True)
            folder.rmdir()
    except OSError as e:
        raise LorafuseError(f"cannot clear {folder}: {e.strerror or e}; remove it by hand") from None


def _refuse_mounts(folder: Path) -> None:
    """rmtree goes into a file system mounted below the folder it deletes: what is mounted there is not ours."""
    mounts = mount_points()
    for inside, folders, _ in os.walk(folder):
        for name in folders:
            if is_mount_point(os.path.join(inside, name), mounts):
                raise OSError(errno.EXDEV, f"{os.path.join(inside, name)} is a mount point")


def mount_points() -> set[str]:
    """The mount points the kernel lists for this process (Linux); empty where it lists none. A bind mount
    of a folder of the same file system has the device of its parent, so os.path.ismount misses it."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError:
        return set()
    # the fifth field; a space, tab, newline or backslash in it is written as an octal escape (\040)
    return {re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
            for line in lines if len(line.split()) > 4}


def is_mount_point(path: str | Path, mounts: set[str] | None = None) -> bool:
    return os.path.ismount(path) or os.path.realpath(path) in (mount_points() if mounts is None else mounts)


def regular_file(path: Path) -> bool:
    """A regular file itself (not a link to one)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


@contextlib.contextmanager
def exclusive(out: Path):
    """One merge at a time into OUT: a second would wipe the first's staging folder. A lock file next to
    OUT is flock'ed: the kernel drops the lock when its holder dies, so a killed merge never blocks the
    next. The holder deletes the file when it is done (while still holding it, so as to leave nothing
    behind); a merge that opened the file just before may then lock that deleted file, while a third
    locks a new one. So a lock counts only if the path still names the very file locked, checked after
    locking, and otherwise it is tried again: the path changes only in the hands of a holder, so two
    merges cannot both see their own file there."""
    lock_path = work_path(out, "lock")
    while True:
        try:  # O_NONBLOCK: opening a FIFO for writing would wait for a reader for ever
            fd = os.open(lock_path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError as e:  # a folder, a link or a FIFO there: not lorafuse's
            why = "it is a FIFO" if e.errno == errno.ENXIO else e.strerror
            raise LorafuseError(f"cannot create the lock file {lock_path}: {why}; remove what is there") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a device, or a FIFO with a reader
            os.close(fd)
            raise LorafuseError(f"{lock_path} is not a regular file (a FIFO or a device?), so it is not lorafuse's "
                                "lock file; remove it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LorafuseError(f"another lorafuse merge is writing {out}; wait for it to finish") from None
        if identity_of(lock_path) == identity_of(fd):
            break
        os.close(fd)
    try:
        yield
    finally:
        lock_path.unlink(missing_ok=True)
        os.close(fd)


def check_target(out: Path, force: bool) -> tuple[int, int, int] | None:
    """Refuse an OUT that cannot be written, or replaced safely; returns the state of the folder at OUT
    that --force replaces (None if there is none): the final step replaces that folder, unchanged, and
    nothing else.
    --force replaces only what lorafuse can tell is its own or holds nothing: an earlier merge (its manifest
    is there) or an empty folder. Anything else may be the user's work (a folder of models, an input given
    as OUT, `lorafuse merge BASE ADAPTER` with OUT left out), so it is refused even with --force, and --force
    is suggested only where it would be taken."""
    if out.is_symlink():
        raise LorafuseError(f"output path {out} is a symbolic link (to {os.readlink(out)}); lorafuse replaces OUT as a "
                            "whole: name a folder, not a link")
    if out.exists() and not out.is_dir():
        raise LorafuseError(f"output path {out} exists and is not a folder; choose another output folder")
    if out.is_dir() and is_mount_point(out):  # cannot be renamed or swapped, and its disk is not the staging folder's
        raise LorafuseError(f"output folder {out} is a mount point, which lorafuse cannot replace (it moves the "
                            "finished merge into place by renaming); name a new folder inside it or elsewhere")
    if out.is_dir():
        try:
            held = sorted(p.name for p in out.iterdir())
        except OSError as e:
            raise LorafuseError(f"cannot read the output folder {out}: {e.strerror}; choose another output folder") from None
        adapter = "adapter_config.json" in held
        if (adapter or "config.json" in held) and MANIFEST not in held:
            raise LorafuseError(f"output folder {out} holds {'an adapter' if adapter else 'a model'} that lorafuse did "
                                "not write: is it an input? OUT is the last path (lorafuse merge [BASE] ADAPTER OUT), "
                                "a new folder or an earlier merge; choose another output folder")
        if held and MANIFEST not in held:
            shown = ", ".join(held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
            raise LorafuseError(f"output folder {out} holds {shown}, and is not an earlier lorafuse merge (it has no "
                                f"{MANIFEST}), so lorafuse will not replace it, even with --force; remove it by hand "
                                "or choose another output folder")
        if held and (extra := _not_merged(out, held)):
            raise LorafuseError(f"output folder {out} is an earlier merge, but {extra} is not one of the files its "
                                f"{MANIFEST} lists (something added since?), so lorafuse will not replace it, even "
                                "with --force; move what you added elsewhere, or choose another output folder")
        if not force:
            what = "an earlier merge" if held else "an empty folder"
            raise LorafuseError(f"output folder {out} already exists ({what}); choose another or pass --force to replace it")
    for kind in ("partial", "old"):
        path = work_path(out, kind)
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            raise LorafuseError(f"{path} is in lorafuse's way (a link or a file where it keeps its work for {out}); "
                                "move it away or choose another output folder")
    parent = out.absolute().parent
    if not parent.is_dir():
        raise LorafuseError(f"the parent folder of {out} does not exist; create it first")
    try:  # a real probe: root passes access() checks on folders it cannot write (read-only mounts)
        os.rmdir(tempfile.mkdtemp(prefix=".lorafuse-probe-", dir=parent))
    except OSError as e:
        why = "it is on a read-only file system" if e.errno == errno.EROFS else e.strerror.lower()
        raise LorafuseError(f"cannot write to {parent}: {why}; choose another output folder") from None
    return folder_state(out)


def _not_merged(out: Path, held: list[str]) -> str | None:
    """The first entry of an earlier merge's folder that its manifest does not list as a regular file, or
    None: --force deletes the whole folder, so everything in it must be lorafuse's own."""
    try:
        listed = read_json(out / MANIFEST, "output").get("files")
    except LorafuseError:
        return MANIFEST
    listed = listed if isinstance(listed, dict) else {}
    return next((name for name in held if name != MANIFEST and (name not in listed or not regular_file(out / name))),
                None)


def folder_state(path: Path) -> tuple[int, int, int] | None:
    """(device, inode, ctime) of a folder, None if there is none: what --force may replace. The inode alone
    is not enough, since a file system reuses a deleted folder's inode for the next one made; the ctime
    changes with every entry added, removed or renamed in it, and with its own renaming."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_ctime_ns


def move_into_place(staging: Path, out: Path, keep_until_renamed: Path | None, replacing: tuple[int, int, int] | None,
            written: set[str]) -> None:
    """Make the staged folder durable, then move it into place in one step that cannot destroy anything
    but the folder `replacing` identifies (the OUT that --force was given for, found when the merge
    started): a move that fails if anything is at OUT, or an atomic exchange with that folder. Whatever
    else is at OUT by now (made meanwhile by another program or by hand) is left alone, and so is the
    finished merge, in the staging folder. A staging folder holding anything but the regular files
    `written` by the merge (and the ledger and marker) is refused: it would be published as part of OUT.
    The resume ledger and the marker go last, so an interruption before the move can still resume."""
    check_staged(staging, out, written | {MARKER} | ({keep_until_renamed.name} if keep_until_renamed else set()))
    for path in staging.iterdir():
        if path != keep_until_renamed:
            fsync_path(path, follow=False)
    staged = identity_of(staging)
    if keep_until_renamed:
        keep_until_renamed.unlink(missing_ok=True)
    (staging / MARKER).unlink()
    try:
        fsync_path(staging)
        if replacing is not None and os.path.lexists(out):
            _replace(staging, out, replacing)
        elif not rename_noreplace(staging, out):
            raise LorafuseError(f"{out} appeared while merging (another program?) and is left as it is; the "
                                f"finished merge is in {staging}: move {out} away, or pass --force to replace it, "
                                "and run the same command again")
    except BaseException:  # Ctrl-C included: a finished merge left staged is marked again, to be moved by a rerun
        if identity_of(staging) == staged:
            make_staging(staging)
        raise
    fsync_path(out.absolute().parent)


def check_staged(staging: Path, out: Path, allowed: set[str]) -> None:
    """Refuse a staging folder that holds anything but regular files of the `allowed` names: it is about
    to be published as OUT."""
    for path in staging.iterdir():
        if path.name not in allowed or not regular_file(path):
            raise LorafuseError(f"{path} is not a file this merge wrote, and it would be published in {out}; "
                                "move it away and run the same command again")


def _replace(staging: Path, out: Path, replacing: tuple[int, int, int]) -> None:
    """Swap the staged folder with OUT, then delete the old OUT: in one atomic exchange where the OS has
    one, else in two renames (between which an interruption puts the old OUT back). What is at OUT is
    deleted only if it is the folder found there at the start."""
    changed = LorafuseError(f"{out} was replaced or changed while merging (another program?) and is left as it is; "
                            f"the finished merge is in {staging}: run the same command again to replace it")
    if folder_state(out) != replacing:  # the move changes the ctime: after it, only (device, inode) can be compared
        raise changed
    if _renameat2(staging, out, RENAME_EXCHANGE):  # the staging path now holds what was at OUT
        if identity_of(staging) != replacing[:2]:
            _renameat2(staging, out, RENAME_EXCHANGE)  # swap it back, as the same exchange just did
            raise changed
        _delete_replaced(staging, out)
        return
    old = work_path(out, "old")  # claim_staging refused one left from before: this one is this merge's
    os.rename(out, old)
    try:
        if identity_of(old) != replacing[:2]:
            raise changed
        os.rename(staging, out)
    except BaseException:  # Ctrl-C included
        if not os.path.lexists(out):
            os.rename(old, out)
        raise
    _delete_replaced(old, out)


def _delete_replaced(folder: Path, out: Path) -> None:
    """Delete the old OUT, moved aside; the new one is in place whatever happens here."""
    try:
        clear(folder)
    except LorafuseError as e:
        raise LorafuseError(f"{out} is complete, but the folder it replaced is not deleted: {e}") from None


RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


def rename_noreplace(src: Path, dst: Path) -> bool:
    """Rename src to dst unless something is at dst (False then). Where renameat2 is missing, a rename after
    a check: in the gap between the two only an empty folder made at dst could be replaced."""
    if _renameat2(src, dst, RENAME_NOREPLACE):
        return True
    if ctypes.get_errno() == errno.EEXIST or os.path.lexists(dst):
        return False
    try:
        os.rename(src, dst)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            return False
        raise
    return True


def _renameat2(a: Path, b: Path, flags: int) -> bool:
    """Linux renameat2; False (with errno set) where it fails, or the OS or file system lacks it."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        ctypes.set_errno(errno.ENOSYS)
        return False
    at_fdcwd = -100
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), flags) == 0


def disk_error(e: OSError, folder: Path) -> LorafuseError:
    """An OS error while writing the output folder's staging copy, as a user-facing message."""
    if e.errno == errno.ENOSPC:
        kept = sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and not p.name.endswith(PARTIAL)) \
            if folder.is_dir() else 0
        return LorafuseError(f"the disk holding {folder.parent} is full; free space and run the same command again"
                             + (f": it goes on from the {human_size(kept)} finished in {folder}" if kept else ""))
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return LorafuseError(f"cannot write to {folder.parent}: {e.strerror}; choose another output folder")
    return LorafuseError(f"I/O error while writing the output: {e.strerror or e}")


GGUF_MAGIC = b"GGUF"


def check_file_target(out: Path, force: bool) -> bool:
    """Refuse an OUT file that cannot be written or replaced safely; True if --force replaces one. --force
    replaces only a GGUF file (its magic says so): anything else may be the user's."""
    if out.is_symlink():
        raise LorafuseError(f"output path {out} is a symbolic link (to {os.readlink(out)}); name a file, not a link")
    if not os.path.lexists(out):
        return False
    if not out.is_file():
        raise LorafuseError(f"output path {out} exists and is not a file; choose another output file")
    if not force:
        raise LorafuseError(f"output file {out} already exists; pass --force to replace it, or choose another name")
    with open(out, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise LorafuseError(f"output file {out} is not a GGUF file, so lorafuse will not replace it, even with "
                                "--force; remove it by hand or choose another name")
    return True


def move_file_into_place(made: Path, out: Path, replacing: bool) -> None:
    """Make the finished file durable and give it OUT's name: atomically, over the file --force replaces,
    or only where nothing is (a file that appeared at OUT meanwhile is left alone)."""
    fsync_path(made)
    if replacing:
        os.replace(made, out)
    elif not rename_noreplace(made, out):
        raise LorafuseError(f"{out} was created by something else during the merge; the finished file stays in "
                            f"{made.parent}: move it yourself, or run again with --force")
    fsync_path(out.parent)
