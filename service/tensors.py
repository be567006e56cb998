"""TensorProto <-> numpy for TF Serving's API, for the few dtypes this service exchanges.

TF Serving accepts a tensor either packed in ``tensor_content`` (little-endian bytes) or in the typed
repeated fields (``int_val`` for uint8/int32, ``float_val``, ``string_val``); clients use both, so decoding
accepts both. Encoding always packs numbers into ``tensor_content``, as ``tf.make_tensor_proto`` does.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

#: numpy dtype for each DataType this module handles, and the repeated field that carries it unpacked.
_NUMERIC: dict[int, tuple[np.dtype, str]] = {
    types_pb2.DT_UINT8: (np.dtype("<u1"), "int_val"),
    types_pb2.DT_INT32: (np.dtype("<i4"), "int_val"),
    types_pb2.DT_INT64: (np.dtype("<i8"), "int64_val"),
    types_pb2.DT_FLOAT: (np.dtype("<f4"), "float_val"),
}
#: Most elements :func:`to_numpy` decodes by default (2**26, 64 MiB of uint8).
MAX_ELEMENTS = 1 << 26
_BY_NUMPY = {np.dtype(v[0]).newbyteorder("="): k for k, v in _NUMERIC.items()}


def dtype_name(dtype: int) -> str:
    """``DT_UINT8`` for the enum value (for error messages)."""
    return types_pb2.DataType.Name(dtype) if dtype in types_pb2.DataType.values() else f"dtype {dtype}"


def shape_of(tensor: tensor_pb2.TensorProto) -> tuple[int, ...]:
    """The tensor's dims as a tuple (unknown rank gives ())."""
    return tuple(d.size for d in tensor.tensor_shape.dim)


class TensorDecodeError(ValueError):
    """The tensor's content does not match its dtype and shape; ``field`` is the TensorProto field at fault
    (the message names it too)."""

    def __init__(self, message: str, field: str = "tensor_content") -> None:
        super().__init__(message)
        self.field = field


def to_numpy(
    tensor: tensor_pb2.TensorProto, max_elements: int = MAX_ELEMENTS, *, broadcast: bool = True
) -> NDArray[np.generic]:
    """Decode a numeric TensorProto; raises TensorDecodeError when its content disagrees with its shape.

    Also when the shape holds more than ``max_elements`` (a broadcast single value would fill it all), and
    when an integer value does not fit the dtype (``int_val`` carries uint8 as int32; TF would wrap 300 to 44).
    ``broadcast=False`` refuses a single value for a larger shape, which TF Serving would broadcast.
    """
    if tensor.dtype not in _NUMERIC:
        raise TensorDecodeError(f"unsupported dtype {dtype_name(tensor.dtype)}", "dtype")
    dtype, field = _NUMERIC[tensor.dtype]
    shape = shape_of(tensor)
    if any(d < 0 for d in shape):
        raise TensorDecodeError(f"negative dimension in shape {list(shape)}", "tensor_shape")
    count = math.prod(shape)  # Python ints: numpy's int64 product wraps around for enormous shapes
    if count > max_elements:
        raise TensorDecodeError(
            f"shape {list(shape)} has {count} elements, over the limit of {max_elements}", "tensor_shape"
        )
    if tensor.tensor_content:
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
    array = np.asarray(values, dtype=np.float32 if dtype.kind == "f" else np.int64)
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


def from_numpy(array: NDArray[np.generic]) -> tensor_pb2.TensorProto:
    """Encode a numeric array (uint8, int32, int64, float32) or an array of str/bytes (DT_STRING)."""
    shape = tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in array.shape])
    if array.dtype.kind in "US" or array.dtype == object:
        return tensor_pb2.TensorProto(
            dtype=types_pb2.DT_STRING,
            tensor_shape=shape,
            string_val=[v.encode() if isinstance(v, str) else bytes(v) for v in array.reshape(-1)],
        )
    dt = _BY_NUMPY.get(array.dtype.newbyteorder("="))
    if dt is None:
        raise TypeError(f"cannot encode numpy dtype {array.dtype}")
    content = np.ascontiguousarray(array, dtype=_NUMERIC[dt][0]).tobytes()
    return tensor_pb2.TensorProto(dtype=dt, tensor_shape=shape, tensor_content=content)
