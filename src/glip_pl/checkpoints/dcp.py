"""Reading ``torch.distributed.checkpoint`` (DCP) directories — FSDP2's sharded checkpoints — without running code
from them.

torch's ``FileSystemReader`` unpickles ``.metadata`` with plain ``pickle.load``, and its default load planner reads
every non-tensor entry (the optimizer's hyper-parameters) with ``torch.load(weights_only=False)``: a downloaded
checkpoint directory could run code. ``read_dcp_metadata`` unpickles ``.metadata`` with an allow-list of the classes
a checkpoint's metadata is made of; ``check_dcp_checkpoint`` also loads every non-tensor entry with
``weights_only=True``. ``GLIPFSDP2Strategy`` checks a directory before resuming from it; ``read_dcp_checkpoint``
(``glip-pl consolidate``) reads the weights through ``safe_dcp_reader``.
"""

from __future__ import annotations

from pathlib import Path

import torch

_DCP_SAFE = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
             ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("pathlib", "PosixPath"),
             ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath")}


def is_dcp_checkpoint(path) -> bool:
    return (Path(path) / ".metadata").is_file()


def read_dcp_metadata(path):
    """The ``.metadata`` of a DCP directory, unpickled with an allow-list (``pickle.UnpicklingError`` naming the file
    and the class otherwise)."""
    import pickle

    class _Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            ok = (module, name) in _DCP_SAFE or module == "torch.distributed.checkpoint.metadata" or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
            if not ok:
                raise pickle.UnpicklingError(f"{path}/.metadata names {module}.{name}, which a checkpoint's "
                                             "metadata never holds: refusing to load it")
            return super().find_class(module, name)

    with open(Path(path) / ".metadata", "rb") as f:
        return _Unpickler(f).load()


def check_dcp_checkpoint(path) -> None:
    """Refuse a DCP directory that torch.distributed.checkpoint would unpickle unsafely: its ``.metadata`` (plain
    ``pickle.load`` in torch) must pass the allow-list, and every non-tensor entry (optimizer hyper-parameters:
    floats, strings, tuples), which torch loads with ``torch.load(weights_only=False)``, must load with
    ``weights_only=True``. Called before a resume reads the directory."""
    import io

    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    md = read_dcp_metadata(path)
    for key, entry in md.state_dict_metadata.items():
        if not isinstance(entry, BytesStorageMetadata):
            continue
        info = md.storage_data[MetadataIndex(key)]
        if info.transform_descriptors:
            raise ValueError(f"{path}: entry {key!r} is stored with transforms {info.transform_descriptors}, "
                             "which glip_pl does not read")
        with open(Path(path) / info.relative_path, "rb") as f:
            f.seek(info.offset)
            data = f.read(info.length)
        try:
            torch.load(io.BytesIO(data), weights_only=True)
        except Exception as e:
            raise ValueError(f"{path}/{info.relative_path}: entry {key!r} does not load safely "
                             f"(torch.load weights_only=True: {type(e).__name__}: {e})") from None


def safe_dcp_reader(path):
    """A ``FileSystemReader`` of ``path`` whose ``.metadata`` goes through :func:`read_dcp_metadata`."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class _Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            md = read_dcp_metadata(path)
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    return _Reader(path)


def read_dcp_checkpoint(path) -> tuple:
    """(state dict of the weights, Lightning's ``meta.pt`` dict) of an FSDP2 checkpoint directory of any number of
    ranks. Only the weights are read, not the optimizer state; ``meta.pt`` with ``torch.load(weights_only=True)``."""
    import io

    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    class _Planner(_EmptyStateDictLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:  # the default unpickles anything
            raise ValueError(f"{path}: non-tensor entry {read_item.dest_index.fqn!r} among the weights")

    path = Path(path)
    if not is_dcp_checkpoint(path):
        raise FileNotFoundError(f"{path}: not a torch.distributed.checkpoint directory (no .metadata file)")
    meta_path = path / "meta.pt"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: missing (Lightning writes it beside the shards: step, hyper-parameters)")
    read_dcp_metadata(path)  # a refused .metadata: one clear error here, not torch's wrapped and logged one
    meta = torch.load(meta_path, map_location="cpu", weights_only=True)
    loaded: dict = {}
    _load_state_dict(loaded, storage_reader=safe_dcp_reader(path), planner=_Planner(keys={"state_dict"}),
                     no_dist=True)
    sd = loaded.get("state_dict")
    if not sd:
        raise ValueError(f"{path}: no 'state_dict' entry in the checkpoint (keys {sorted(loaded)[:5]})")
    return sd, meta
