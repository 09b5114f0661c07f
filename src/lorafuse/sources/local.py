"""A Hugging Face model folder on the local disk: config.json plus model.safetensors or shards."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import LorafuseError
from ..formats.folder import INDEX, SINGLE, not_a_file
from ..formats.jsonfile import read_json
from ..formats.safetensors import Header, TensorRef, read_header
from .remote import RemoteFile


@dataclass
class Checkpoint:
    folder: Path
    config: dict
    tensors: dict[str, TensorRef]  # in file order
    weight_files: list[Path]
    file_sizes: dict[str, int]  # weight file name -> bytes
    file_versions: dict[str, str]  # weight file name -> what changes when its content may have: see _version, or Hub commit
    remote: dict[str, RemoteFile]  # weight files not downloaded yet, by name

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def download_bytes(self) -> int:
        return sum(f.size for f in self.remote.values())


def open_model(folder: str | Path, remote: dict[str, RemoteFile] | None = None, commit: str | None = None) -> Checkpoint:
    """Read config.json and every safetensors header of a model folder; no tensor data is read.

    `remote`: shards of a Hub repo at `commit` not downloaded yet; their headers come by range requests."""
    folder = Path(folder)
    remote = remote or {}
    if not folder.is_dir():
        raise LorafuseError(f"base model folder {folder} does not exist")
    config = read_json(folder / "config.json", "base model")
    check_config(config, folder / "config.json")
    files, weight_map = _weight_files(folder, remote)
    pending = {f.path: f for f in remote.values()}
    for path in files:
        if path not in pending:
            check_inside(folder, path)
    headers = _headers(files, pending)
    tensors: dict[str, TensorRef] = {}
    for path in files:
        for name, ref in headers[path].tensors.items():
            if name in tensors:
                raise LorafuseError(f"tensor {name!r} appears in both {tensors[name].path.name} and {path.name}; the checkpoint is inconsistent")
            tensors[name] = ref
    if not tensors:
        raise LorafuseError(f"{folder} holds no tensors")
    for name, file in weight_map.items():
        if name not in tensors or tensors[name].path.name != PurePosixPath(file).name:
            raise LorafuseError(f"{INDEX} places {name} in {file}, but that file does not hold it; re-download the model")
    sizes = {p.name: pending[p].size if p in pending else p.stat().st_size for p in files}
    versions = {p.name: commit or _version(p) for p in files}
    return Checkpoint(folder, config, tensors, files, sizes, versions, remote)


def _version(path: Path) -> str:
    """What changes whenever a local file's content may have: mtime alone does not, since a file rewritten
    in place can have its mtime set back (os.utime, cp -p, rsync -t); its ctime cannot be set back, and a
    file replaced by another has another inode. Too big to hash on every run."""
    st = path.stat()
    return f"{st.st_ino}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def check_config(config: dict, path: Path) -> None:
    """The config.json fields lorafuse reads must have the types transformers writes: a wrong one
    would be misread (the string "false" is true) or fail deep inside the plan."""
    holders = [config] + [config[k] for k in ("text_config", "llm_config", "language_config") if isinstance(config.get(k), dict)]
    if not all(isinstance(h.get("tie_word_embeddings", False), bool) for h in holders):
        raise LorafuseError(f"{path}: tie_word_embeddings must be true or false; fix the config")
    if not isinstance(config.get("model_type", ""), str):
        raise LorafuseError(f"{path}: model_type must be a string; fix the config")
    quantization = config.get("quantization_config")
    if not quantization:
        return
    if not isinstance(quantization, dict) or not isinstance(quantization.get("quant_method"), str):
        raise LorafuseError(f"{path}: quantization_config must be an object naming its quant_method; fix the config")
    block = quantization.get("weight_block_size")
    if block is not None and not (isinstance(block, list) and len(block) == 2
                                  and all(type(b) is int and 0 < b < 2**31 for b in block)):
        raise LorafuseError(f"{path}: quantization_config.weight_block_size must be two positive integers or null; fix the config")
    skip = quantization.get("llm_int8_skip_modules")
    if skip is not None and not (isinstance(skip, list) and all(isinstance(m, str) for m in skip)):
        raise LorafuseError(f"{path}: quantization_config.llm_int8_skip_modules must list module names or be null; fix the config")


def _headers(files: list[Path], pending: dict[Path, RemoteFile]) -> dict[Path, Header]:
    """Every file's header; those of remote files are fetched a few at a time (each is a round trip)."""
    with ThreadPoolExecutor(8) as pool:
        fetched = dict(zip(pending, pool.map(lambda f: f.read_header(), pending.values())))
    return {path: fetched[path] if path in pending else read_header(path) for path in files}


def check_inside(folder: Path, path: Path) -> None:
    """A file of a model folder may be a link out of it only in the Hugging Face cache, and there only
    into its own repo's blobs/ folder, where huggingface_hub's snapshot links lead
    (models--org--name/snapshots/REV/FILE -> ../../blobs/HASH). Any other link out is refused: the
    cache may hold more than models (with HF_HUB_CACHE=$HF_HOME, the user's token), and whatever is
    followed is copied into OUT and uploaded with it."""
    real, root = path.resolve(), folder.resolve()
    if root in real.parents:
        return
    from .hub import cache_dir

    cache = cache_dir().resolve()
    parts = root.relative_to(cache).parts if cache in root.parents else ()
    if len(parts) > 1 and parts[1] == "snapshots" and real.parent == cache / parts[0] / "blobs":
        return
    raise LorafuseError(f"{path} links outside the model folder (to {real}); refusing to follow it: "
                        "copy the file into the folder, or keep the model in the Hugging Face cache")


def _weight_files(folder: Path, remote: dict[str, RemoteFile]) -> tuple[list[Path], dict[str, str]]:
    """The weight files, and the index's tensor -> file map (empty for a single file)."""
    index = folder / INDEX
    if _present(index):
        weight_map = read_json(index, "base model").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise LorafuseError(f"{index} has no weight_map; re-save the model")
        if not all(isinstance(name, str) for name in weight_map.values()):
            raise LorafuseError(f"{index}: weight_map must map tensor names to file names; re-save the model")
        names = list(dict.fromkeys(weight_map.values()))
        files = []
        for name in names:
            rel = PurePosixPath(name)
            if rel.is_absolute() or ".." in rel.parts or not name:
                raise LorafuseError(f"{index} names shard {name!r} outside the model folder; refusing to read it")
            if name in remote:
                files.append(remote[name].path)
                continue
            path = folder / rel
            if odd := not_a_file(path):
                raise LorafuseError(f"{index} names shard {name} but {path} is {odd}; download it again")
            files.append(path)
        return files, weight_map
    if SINGLE in remote:
        return [remote[SINGLE].path], {}
    if _present(folder / SINGLE):
        return [folder / SINGLE], {}
    if any(folder.glob("*.bin")) or any(folder.glob("*.pth")):
        raise LorafuseError(f"{folder} has only PyTorch pickle weights; convert the base to safetensors first (save_pretrained)")
    raise LorafuseError(f"{folder} has neither {SINGLE} nor {INDEX}; pass a Hugging Face model folder")


def _present(path: Path) -> bool:
    """Whether the model has this file: True for a regular file, False when nothing is there; anything
    else (a FIFO, a folder, a broken or circular link) is an error that says what it is."""
    odd = not_a_file(path)
    if odd not in (None, "missing"):
        raise LorafuseError(f"{path} is {odd}; download it again")
    return odd is None
