"""Reads `torch.save` state dicts into NumPy without importing torch.

Published C2C fusers are torch zip archives of plain tensors. Reading them needs no torch install
(heavy on a TPU VM): the archive holds a pickle that references raw storage files, and only a few
global names may appear in it; anything else is refused, so an untrusted file cannot run code.
"""

from __future__ import annotations

import collections
import pickle
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _StorageType:
    def __init__(self, name: str):
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                    metadata=None):
    del requires_grad, backward_hooks, metadata
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[storage_offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride))
    return np.array(view)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    del requires_grad, backward_hooks
    return data


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """The tensors of a `torch.save`d state dict, as NumPy arrays (bf16 as `ml_dtypes.bfloat16`)."""
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{path} is not a torch zip checkpoint ({e})") from None
    with archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if not pickles:
            raise ValueError(f"{path} has no data.pkl: not a torch checkpoint")
        prefix = pickles[0][: -len("data.pkl")]

        class Unpickler(pickle.Unpickler):
            def find_class(self, module, name):
                if (module, name) == ("collections", "OrderedDict"):
                    return collections.OrderedDict
                if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                    return _rebuild_tensor
                if (module, name) == ("torch._utils", "_rebuild_parameter"):
                    return _rebuild_parameter
                if module == "torch" and name in _STORAGE_DTYPES:
                    return _StorageType(name)
                raise pickle.UnpicklingError(f"{path}: refusing to load {module}.{name}; expected plain tensors")

            def persistent_load(self, pid):
                kind, storage_type, key, _location, numel = pid
                if kind != "storage":
                    raise pickle.UnpicklingError(f"{path}: unsupported persistent id {kind!r}")
                raw = archive.read(f"{prefix}data/{key}")
                return np.frombuffer(raw, storage_type.dtype, count=numel)

        try:
            state = Unpickler(archive.open(pickles[0])).load()
        except (pickle.UnpicklingError, KeyError, EOFError, ValueError) as e:
            raise ValueError(f"{path} is corrupt or not a plain state dict ({e})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    return dict(state)
