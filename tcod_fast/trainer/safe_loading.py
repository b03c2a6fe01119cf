"""Reading run files back as data, never as code.

Run folders travel (copied between machines, shared, downloaded with a paper), so a file in
one may not be what this project wrote. Python's pickle runs whatever a file names, so every
pickle-based file the project reads is read through an allow-list instead:

* ``torch.save`` files (single-file checkpoints, a sharded checkpoint's ``meta.pt``):
  ``torch.load(weights_only=True)``, which builds tensors and plain containers only. Before
  that, :func:`torch.serialization.get_unsafe_globals_in_checkpoint` lists what else the file
  names (without running it), so a foreign object is refused by name, with one line, rather
  than mistaken for a torn write. NumPy arrays are also allowed, because checkpoints that
  store NumPy's RNG state as an array hold them (:mod:`tcod_fast.trainer.rng_state` now
  stores it as a tensor).
* PyTorch Distributed Checkpoint (DCP) folders: DCP itself unpickles ``.metadata`` with
  plain ``pickle.load`` and non-tensor entries with ``torch.load(weights_only=False)``.
  :class:`SafeFileSystemReader` reads ``.metadata`` with an unpickler that builds only DCP's
  own metadata records, and :class:`SafeLoadPlanner` loads the other entries with
  ``weights_only=True``.
* Hugging Face model folders: weights are read by ``transformers``, which reads
  ``*.safetensors`` (no code) and ``*.bin`` with ``weights_only=True``;
  :func:`check_model_folder` refuses a weights file naming anything else before that, by
  name, and remote code is never trusted.

Configs are YAML read with ``yaml.safe_load``, metrics are JSON lines, and tokenizers are
JSON: none of them can name code.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.serialization import get_unsafe_globals_in_checkpoint

from tcod_fast.errors import UserError

__all__ = [
    "SafeFileSystemReader",
    "SafeLoadPlanner",
    "UnsafeFileError",
    "check_model_folder",
    "check_torch_file",
    "load_torch_file",
    "read_dcp_metadata",
]

#: NumPy's array reconstruction, as ``torch`` lists it for an allow-list (numeric arrays only;
#: their element types must be allowed too).
_NUMPY_ARRAY_GLOBALS = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, *(
    type(np.dtype(name)) for name in ("uint32", "int64", "float64", "float32", "bool")
)]  # fmt: skip
_MODEL_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


class UnsafeFileError(UserError):
    """A file the project reads back names an object it never writes (code, possibly)."""


def _refusal(path: Path, what: str, names: list[str]) -> UnsafeFileError:
    kinds = ", ".join(sorted(set(names)))
    noun = "an object of type" if len(set(names)) == 1 else "objects of types"
    return UnsafeFileError(f"{what} {path} holds {noun} {kinds}, which a {what} never contains; nothing of it was run")


def _allowed_names() -> set[str]:
    return {f"{item.__module__}.{item.__qualname__}" for item in _NUMPY_ARRAY_GLOBALS}


def check_torch_file(path: str | Path, *, what: str = "checkpoint") -> None:
    """Refuse (:class:`UnsafeFileError`) a ``torch.save`` file that names anything outside
    ``weights_only``'s types and NumPy arrays; nothing in it is run to find out. A torn or
    non-``torch.save`` file raises what torch raises for it."""
    path = Path(path)
    foreign = [name for name in get_unsafe_globals_in_checkpoint(str(path)) if name not in _allowed_names()]
    if foreign:
        raise _refusal(path, what, foreign)


def load_torch_file(path: str | Path, *, what: str = "checkpoint") -> Any:
    """``torch.load`` of a file the project wrote, as data only (on CPU): see
    :func:`check_torch_file`; then ``weights_only=True`` with NumPy arrays allowed."""
    check_torch_file(path, what=what)
    with torch.serialization.safe_globals(_NUMPY_ARRAY_GLOBALS):
        return torch.load(Path(path), map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------------------
# DCP
# --------------------------------------------------------------------------------------
def _dcp_metadata_classes() -> dict[tuple[str, str], Any]:
    import pathlib

    from torch.distributed.checkpoint import filesystem, metadata

    allowed: dict[tuple[str, str], Any] = {}
    for module in (metadata, filesystem):
        for name, value in vars(module).items():
            if isinstance(value, type) and value.__module__ == module.__name__:
                allowed[(module.__name__, name)] = value
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    for name in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"):
        allowed[("pathlib", name)] = getattr(pathlib, name)
    allowed[("collections", "OrderedDict")] = __import__("collections").OrderedDict
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata records, torch dtypes, sizes and layouts, and paths; refuses
    anything else before it is created."""

    def __init__(self, file, path: Path):
        super().__init__(file)
        self._path = path
        self._allowed = _dcp_metadata_classes()

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._allowed:
            return self._allowed[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        raise _refusal(self._path, "checkpoint", [f"{module}.{name}"])


def read_dcp_metadata(folder: str | Path):
    """The ``.metadata`` record of the DCP folder ``folder``, read as data only."""
    path = Path(folder) / ".metadata"
    with open(path, "rb") as handle:
        return _MetadataUnpickler(handle, path).load()


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader, reading ``.metadata`` through :func:`read_dcp_metadata`."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        from torch.distributed.checkpoint.metadata import StorageMeta

        if kwargs.get("rank") is not None:  # per-rank metadata files: not written by this project
            raise UserError(f"checkpoint {self.path} has per-process metadata files, which this project never writes")
        metadata = read_dcp_metadata(self.path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, which loads non-tensor entries (optimiser hyper-parameters)
    with ``torch.load(weights_only=False)``: each entry is first loaded with
    ``weights_only=True``, so the same bytes reach DCP only once they are known to name
    nothing but plain data."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        data = value.getvalue()
        try:
            torch.load(io.BytesIO(data), weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UnsafeFileError(
                f"checkpoint entry {read_item.dest_index.fqn} holds an object a checkpoint never contains "
                f"({' '.join(str(exc).split())[:200]}); nothing of it was run"
            ) from None
        super().load_bytes(read_item, io.BytesIO(data))


# --------------------------------------------------------------------------------------
# Hugging Face model folders
# --------------------------------------------------------------------------------------
def check_model_folder(folder: str | Path, *, what: str = "model folder") -> None:
    """Refuse (:class:`UnsafeFileError`) a model folder whose pickle-based weights files name
    anything but tensors and plain containers; ``*.safetensors`` hold no code."""
    folder = Path(folder)
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if path.suffix not in _MODEL_WEIGHT_SUFFIXES or not path.is_file():
            continue
        try:
            foreign = get_unsafe_globals_in_checkpoint(str(path))
        except Exception as exc:  # not a zip-format torch.save file: transformers' own reading refuses it
            raise UserError(f"{what} {folder}: weights file {path.name} cannot be read ({type(exc).__name__})") from None
        if foreign:
            raise _refusal(path, "weights file", foreign)
