from google.rpc import status_pb2 as _status_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Bitmap(_message.Message):
    __slots__ = ("pixels",)
    PIXELS_FIELD_NUMBER: _ClassVar[int]
    pixels: bytes
    def __init__(self, pixels: _Optional[bytes] = ...) -> None: ...

class EncodedImage(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class Stroke(_message.Message):
    __slots__ = ("x", "y", "t_ms")
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    T_MS_FIELD_NUMBER: _ClassVar[int]
    x: _containers.RepeatedScalarFieldContainer[float]
    y: _containers.RepeatedScalarFieldContainer[float]
    t_ms: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, x: _Optional[_Iterable[float]] = ..., y: _Optional[_Iterable[float]] = ..., t_ms: _Optional[_Iterable[float]] = ...) -> None: ...

class Strokes(_message.Message):
    __slots__ = ("strokes", "coordinates")
    class Coordinates(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        COORDINATES_UNSPECIFIED: _ClassVar[Strokes.Coordinates]
        SIMPLIFIED: _ClassVar[Strokes.Coordinates]
        RAW: _ClassVar[Strokes.Coordinates]
    COORDINATES_UNSPECIFIED: Strokes.Coordinates
    SIMPLIFIED: Strokes.Coordinates
    RAW: Strokes.Coordinates
    STROKES_FIELD_NUMBER: _ClassVar[int]
    COORDINATES_FIELD_NUMBER: _ClassVar[int]
    strokes: _containers.RepeatedCompositeFieldContainer[Stroke]
    coordinates: Strokes.Coordinates
    def __init__(self, strokes: _Optional[_Iterable[_Union[Stroke, _Mapping]]] = ..., coordinates: _Optional[_Union[Strokes.Coordinates, str]] = ...) -> None: ...

class Drawing(_message.Message):
    __slots__ = ("bitmap", "image", "strokes")
    BITMAP_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    STROKES_FIELD_NUMBER: _ClassVar[int]
    bitmap: Bitmap
    image: EncodedImage
    strokes: Strokes
    def __init__(self, bitmap: _Optional[_Union[Bitmap, _Mapping]] = ..., image: _Optional[_Union[EncodedImage, _Mapping]] = ..., strokes: _Optional[_Union[Strokes, _Mapping]] = ...) -> None: ...

class ModelSpec(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class ClassifyRequest(_message.Message):
    __slots__ = ("drawings", "top_k", "model")
    DRAWINGS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    drawings: _containers.RepeatedCompositeFieldContainer[Drawing]
    top_k: int
    model: ModelSpec
    def __init__(self, drawings: _Optional[_Iterable[_Union[Drawing, _Mapping]]] = ..., top_k: _Optional[int] = ..., model: _Optional[_Union[ModelSpec, _Mapping]] = ...) -> None: ...

class ScoredLabel(_message.Message):
    __slots__ = ("label", "score", "index")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    label: str
    score: float
    index: int
    def __init__(self, label: _Optional[str] = ..., score: _Optional[float] = ..., index: _Optional[int] = ...) -> None: ...

class OutOfClass(_message.Message):
    __slots__ = ("known", "score", "threshold")
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    known: bool
    score: float
    threshold: float
    def __init__(self, known: _Optional[bool] = ..., score: _Optional[float] = ..., threshold: _Optional[float] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("top", "out_of_class")
    TOP_FIELD_NUMBER: _ClassVar[int]
    OUT_OF_CLASS_FIELD_NUMBER: _ClassVar[int]
    top: _containers.RepeatedCompositeFieldContainer[ScoredLabel]
    out_of_class: OutOfClass
    def __init__(self, top: _Optional[_Iterable[_Union[ScoredLabel, _Mapping]]] = ..., out_of_class: _Optional[_Union[OutOfClass, _Mapping]] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("predictions", "model_name", "model_version")
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    model_name: str
    model_version: int
    def __init__(self, predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., model_name: _Optional[str] = ..., model_version: _Optional[int] = ...) -> None: ...

class ClassifyStreamRequest(_message.Message):
    __slots__ = ("id", "request")
    ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    id: str
    request: ClassifyRequest
    def __init__(self, id: _Optional[str] = ..., request: _Optional[_Union[ClassifyRequest, _Mapping]] = ...) -> None: ...

class ClassifyStreamResponse(_message.Message):
    __slots__ = ("id", "response", "error")
    ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    id: str
    response: ClassifyResponse
    error: _status_pb2.Status
    def __init__(self, id: _Optional[str] = ..., response: _Optional[_Union[ClassifyResponse, _Mapping]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_drawings_per_request", "max_top_k", "max_strokes", "max_points", "max_raw_coordinate", "max_image_bytes", "max_image_pixels", "max_message_bytes")
    MAX_DRAWINGS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_TOP_K_FIELD_NUMBER: _ClassVar[int]
    MAX_STROKES_FIELD_NUMBER: _ClassVar[int]
    MAX_POINTS_FIELD_NUMBER: _ClassVar[int]
    MAX_RAW_COORDINATE_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    max_drawings_per_request: int
    max_top_k: int
    max_strokes: int
    max_points: int
    max_raw_coordinate: float
    max_image_bytes: int
    max_image_pixels: int
    max_message_bytes: int
    def __init__(self, max_drawings_per_request: _Optional[int] = ..., max_top_k: _Optional[int] = ..., max_strokes: _Optional[int] = ..., max_points: _Optional[int] = ..., max_raw_coordinate: _Optional[float] = ..., max_image_bytes: _Optional[int] = ..., max_image_pixels: _Optional[int] = ..., max_message_bytes: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "versions", "default_version", "labels", "input_kinds", "limits", "backend", "out_of_class")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_VERSION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    INPUT_KINDS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    OUT_OF_CLASS_FIELD_NUMBER: _ClassVar[int]
    name: str
    versions: _containers.RepeatedScalarFieldContainer[int]
    default_version: int
    labels: _containers.RepeatedScalarFieldContainer[str]
    input_kinds: _containers.RepeatedScalarFieldContainer[str]
    limits: Limits
    backend: str
    out_of_class: OutOfClassInfo
    def __init__(self, name: _Optional[str] = ..., versions: _Optional[_Iterable[int]] = ..., default_version: _Optional[int] = ..., labels: _Optional[_Iterable[str]] = ..., input_kinds: _Optional[_Iterable[str]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., backend: _Optional[str] = ..., out_of_class: _Optional[_Union[OutOfClassInfo, _Mapping]] = ...) -> None: ...

class OutOfClassInfo(_message.Message):
    __slots__ = ("score", "threshold", "method", "known_kept", "measured_on")
    SCORE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    KNOWN_KEPT_FIELD_NUMBER: _ClassVar[int]
    MEASURED_ON_FIELD_NUMBER: _ClassVar[int]
    score: str
    threshold: float
    method: str
    known_kept: float
    measured_on: str
    def __init__(self, score: _Optional[str] = ..., threshold: _Optional[float] = ..., method: _Optional[str] = ..., known_kept: _Optional[float] = ..., measured_on: _Optional[str] = ...) -> None: ...
