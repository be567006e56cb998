"""TensorProto <-> numpy for TF Serving's API, for the few dtypes this service exchanges.

TF Serving accepts a tensor either packed in ``tensor_content`` (little-endian bytes) or in the typed
repeated fields (``int_val`` for uint8/int32, ``float_val``, ``string_val``); clients use both, so decoding
accepts both. Encoding always packs numbers into ``tensor_content``, as ``tf.make_tensor_proto`` does.

The messages are ``service.protos.tfs``'s (TensorFlow's own classes are not imported; see that module).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
from numpy.typing import NDArray

from service.protos import tfs

#: numpy dtype for each DataType this module handles, and the repeated field that carries it unpacked.
_NUMERIC: dict[int, tuple[np.dtype, str]] = {
    tfs.DT_UINT8: (np.dtype("<u1"), "int_val"),
    tfs.DT_INT32: (np.dtype("<i4"), "int_val"),
    tfs.DT_INT64: (np.dtype("<i8"), "int64_val"),
    tfs.DT_FLOAT: (np.dtype("<f4"), "float_val"),
    tfs.DT_INT8: (np.dtype("<i1"), "int_val"),
    tfs.DT_INT16: (np.dtype("<i2"), "int_val"),
    tfs.DT_UINT32: (np.dtype("<u4"), "uint32_val"),
    tfs.DT_UINT64: (np.dtype("<u8"), "uint64_val"),
    tfs.DT_DOUBLE: (np.dtype("<f8"), "double_val"),
    tfs.DT_BOOL: (np.dtype("?"), "bool_val"),
}
#: The DataTypes :func:`from_numpy` writes (what this service sends); the others are only read.
_ENCODED = (tfs.DT_UINT8, tfs.DT_INT32, tfs.DT_INT64, tfs.DT_FLOAT)
#: Most elements :func:`to_numpy` decodes by default (2**26, 64 MiB of uint8).
MAX_ELEMENTS = 1 << 26
_BY_NUMPY = {_NUMERIC[k][0].newbyteorder("="): k for k in _ENCODED}


def dtype_name(dtype: int) -> str:
    """``DT_UINT8`` for the enum value (for error messages)."""
    return tfs.DataType.Name(dtype) if dtype in tfs.DataType.values() else f"dtype {dtype}"


def shape_of(tensor: Any) -> tuple[int, ...]:
    """The tensor's dims as a tuple (unknown rank gives ())."""
    return tuple(d.size for d in tensor.tensor_shape.dim)


class TensorDecodeError(ValueError):
    """The tensor's content does not match its dtype and shape; ``field`` is the TensorProto field at fault
    (the message names it too)."""

    def __init__(self, message: str, field: str = "tensor_content") -> None:
        super().__init__(message)
        self.field = field


def to_numpy(
    tensor: Any, max_elements: int = MAX_ELEMENTS, *, broadcast: bool = True
) -> NDArray[np.generic]:
    """Decode a numeric or DT_STRING TensorProto; raises TensorDecodeError when its content disagrees with its shape.

    Numbers come from ``tensor_content`` or the typed field (``float_val``, ``double_val``, ``int_val`` for
    int8/int16/uint8/int32, ``int64_val``, ``uint32_val``, ``uint64_val``, ``bool_val``); strings from
    ``string_val``, as an object array of bytes.

    Also when the shape holds more than ``max_elements`` (a broadcast single value would fill it all), and
    when an integer value does not fit the dtype (``int_val`` carries uint8 as int32; TF would wrap 300 to 44).
    ``broadcast=False`` refuses a single value for a larger shape, which TF Serving would broadcast.
    """
    if tensor.dtype == tfs.DT_STRING:
        dtype, field = np.dtype(object), "string_val"
    elif tensor.dtype in _NUMERIC:
        dtype, field = _NUMERIC[tensor.dtype]
    else:
        raise TensorDecodeError(f"unsupported dtype {dtype_name(tensor.dtype)}", "dtype")
    shape = shape_of(tensor)
    if any(d < 0 for d in shape):
        raise TensorDecodeError(f"negative dimension in shape {list(shape)}", "tensor_shape")
    count = math.prod(shape)  # Python ints: numpy's int64 product wraps around for enormous shapes
    if count > max_elements:
        raise TensorDecodeError(
            f"shape {list(shape)} has {count} elements, over the limit of {max_elements}", "tensor_shape"
        )
    if tensor.tensor_content and field != "string_val":
        if len(tensor.tensor_content) != count * dtype.itemsize:
            raise TensorDecodeError(
                f"tensor_content has {len(tensor.tensor_content)} bytes; shape {list(shape)} of "
                f"{dtype_name(tensor.dtype)} needs {count * dtype.itemsize}"
            )
        return np.frombuffer(tensor.tensor_content, dtype=dtype).reshape(shape)
    values = getattr(tensor, field)
    single = len(values) == 1 and count > 1  # TF Serving broadcasts a single value over the shape
    if single and not broadcast:
        raise TensorDecodeError(
            f"{field} has 1 value for shape {list(shape)}, which needs {count}; this server does not broadcast "
            "a single value (63 bytes would cost the work of the whole batch): send every value",
            field,
        )
    if len(values) != count and not single:
        raise TensorDecodeError(f"{field} has {len(values)} values; shape {list(shape)} needs {count}", field)
    if dtype.kind in "fbO":
        if dtype.kind == "O":
            array = np.empty(len(values), dtype=dtype)
            array[:] = list(values)  # element by element: bytes of any length stay bytes objects
        else:
            array = np.asarray(values, dtype=dtype)
        return np.full(shape, array[0], dtype=dtype) if single else array.reshape(shape)
    array = np.asarray(values, dtype=np.uint64 if dtype == np.dtype("<u8") else np.int64)
    if dtype.kind in "iu" and array.size:
        info = np.iinfo(dtype)
        bad = np.flatnonzero((array < info.min) | (array > info.max))
        if bad.size:
            j = int(bad[0])
            raise TensorDecodeError(
                f"{field}[{j}] is {array[j]}, outside {info.min}..{info.max} for {dtype_name(tensor.dtype)}",
                f"{field}[{j}]",
            )
    if single:
        return np.full(shape, array[0], dtype=dtype)
    return array.astype(dtype).reshape(shape)


def from_numpy(array: NDArray[np.generic]) -> Any:
    """Encode a numeric array (uint8, int32, int64, float32) or an array of str/bytes (DT_STRING)."""
    shape = tfs.TensorShapeProto(dim=[tfs.TensorShapeProto.Dim(size=d) for d in array.shape])
    if array.dtype.kind in "US" or array.dtype == object:
        return tfs.TensorProto(
            dtype=tfs.DT_STRING,
            tensor_shape=shape,
            string_val=[v.encode() if isinstance(v, str) else bytes(v) for v in array.reshape(-1)],
        )
    dt = _BY_NUMPY.get(array.dtype.newbyteorder("="))
    if dt is None:
        raise TypeError(f"cannot encode numpy dtype {array.dtype}")
    content = np.ascontiguousarray(array, dtype=_NUMERIC[dt][0]).tobytes()
    return tfs.TensorProto(dtype=dt, tensor_shape=shape, tensor_content=content)


def write_uint8(tensor: Any, array: NDArray[np.uint8]) -> None:
    """Write a uint8 array into an empty TensorProto in place: what :func:`from_numpy` gives, without building a
    tensor to copy (a Predict request's input, once per backend call)."""
    tensor.dtype = tfs.DT_UINT8
    dims = tensor.tensor_shape.dim
    for d in array.shape:
        dims.add(size=d)
    tensor.tensor_content = np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def exact(tensor: Any, dtype: int, shape: tuple[int, ...]) -> NDArray[np.generic] | None:
    """A tensor of exactly this ``dtype`` and ``shape``, decoded, when its values are in ``tensor_content`` or
    in a typed field of that very type (``float_val`` for DT_FLOAT, ``int_val`` for DT_INT32, ...: nothing to
    range-check); None for anything else (decode that with :func:`to_numpy`, which says what is wrong). TF
    Serving's answers are such tensors (typed fields, as its ``AsProtoField``): this is their cheap path."""
    if tensor.dtype != dtype or dtype not in _EXACT_FIELDS:
        return None
    if tensor.tensor_shape != _shape_proto(shape):  # one comparison in C, not a wrapper per dim (~0.6 us)
        return None
    np_dtype, field = _NUMERIC[dtype]
    count = math.prod(shape)
    content = tensor.tensor_content
    if content:
        if len(content) != count * np_dtype.itemsize:
            return None
        return np.frombuffer(content, dtype=np_dtype).reshape(shape)
    values = getattr(tensor, field)
    return np.fromiter(values, np_dtype, count).reshape(shape) if len(values) == count else None


@functools.lru_cache(maxsize=1024)
def _shape_proto(shape: tuple[int, ...]) -> Any:
    """The TensorShapeProto of ``shape`` as serializers write it (dims unnamed, rank known), to compare with; never
    modified. A tensor whose shape says more (dim names, ``unknown_rank``) is left to :func:`to_numpy`, which reads the
    dims alone, as :func:`exact` did."""
    return tfs.TensorShapeProto(dim=[tfs.TensorShapeProto.Dim(size=d) for d in shape])


#: The DataTypes whose typed field holds exactly their values (``int_val`` also carries narrower integers, which
#: :func:`to_numpy` range-checks).
_EXACT_FIELDS = frozenset({tfs.DT_FLOAT, tfs.DT_DOUBLE, tfs.DT_INT32, tfs.DT_INT64, tfs.DT_UINT32, tfs.DT_UINT64,
                           tfs.DT_BOOL})
