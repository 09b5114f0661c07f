"""The files of a Hugging Face model or adapter folder: which hold weights, which the tokenizer; and how
lorafuse creates and syncs files in the folders it writes."""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Weight files of any format: a merged model must carry none of the base's (they would be unmerged).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".ggml", ".h5", ".msgpack", ".onnx",
                   ".onnx_data", ".tflite", ".npz", ".ot", ".pkl", ".pickle", ".keras", ".nemo", ".mlmodel",
                   ".llamafile", ".zip", ".tar", ".tgz", ".gz")
WEIGHT_INDEXES = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|h5|msgpack)\.index\.json$")
# What a training run may have changed in the tokenizer: these adapter files win over the base's.
TOKENIZER_FILE = re.compile(
    r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\..*|merges\.txt|.*\.model|.*\.tiktoken"
    r"|chat_template\..*|preprocessor_config\.json|processor_config\.json)$"
)


def is_weight_file(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES) or bool(WEIGHT_INDEXES.match(name))


def not_a_file(path: str | os.PathLike) -> str | None:
    """None when `path` is a regular file, else what is there, to follow "is": "missing", "a FIFO, not a
    file", "a folder, not a file", "a circular link, not a file"... Decided by stat alone, since opening a FIFO
    waits for a writer: forever."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return f"a link to nothing ({os.readlink(path)})" if os.path.islink(path) else "missing"
    except OSError as e:
        return "a circular link, not a file" if e.errno == errno.ELOOP else f"unreadable ({e.strerror})"
    if stat.S_ISREG(mode):
        return None
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))
    return next((kind for test, kind in kinds if test(mode)), "a device") + ", not a file"


def identity_of(file: int | str | os.PathLike, follow: bool = False) -> tuple[int, int] | None:
    """(device, inode) of an open descriptor, or of what a path names: the link itself, or with `follow`
    where links lead (then a circular or unreadable path names nothing either). None where it names nothing."""
    try:
        st = os.fstat(file) if isinstance(file, int) else os.stat(file) if follow else os.lstat(file)
    except FileNotFoundError:
        return None
    except OSError:
        if follow:
            return None
        raise
    return st.st_dev, st.st_ino


def create_fd(path: Path) -> int:
    """A new file's descriptor, open for writing, whatever was at `path` unlinked first: never a link
    followed, nor a file truncated that another name shares (a link planted in the staging folder would
    otherwise turn a write into an overwrite of the file it names; O_EXCL fails on one made meanwhile)."""
    path.unlink(missing_ok=True)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)


def create(path: Path):
    """`create_fd` as a binary file object."""
    return open(create_fd(path), "wb")


def fsync_path(path: Path, follow: bool = True) -> None:
    """fsync a file or a folder (a folder's entries: the names of what was created or renamed in it);
    `follow=False` for a file in the staging folder, where no link is followed."""
    fd = os.open(path, os.O_RDONLY | (0 if follow else os.O_NOFOLLOW))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
