"""doodle: the drawing library shared by the trainer and the gateway.

It reads and writes every Quick, Draw! format, turns raw strokes into simplified ones as Google does,
renders strokes to Google's 28x28 bitmaps and decodes PNG/JPEG to the same convention, so that the
model sees the same pixels in training and in production. It depends on numpy and Pillow only: no
TensorFlow, no gRPC.
"""

from doodle.drawing import BITMAP_PIXELS, BITMAP_SIDE, Bitmap, Drawing, Stroke, strokes_from_google
from doodle.errors import DoodleError, DrawingFormatError, EmptyDrawingError, ImageDecodeError
from doodle.image import ImageLimits, decode_image
from doodle.normalize import simplify, simplify_strokes
from doodle.raster import drawing_to_bitmap, flat_strokes_to_bitmap, rasterize

__all__ = [
    "BITMAP_PIXELS",
    "BITMAP_SIDE",
    "Bitmap",
    "DoodleError",
    "Drawing",
    "DrawingFormatError",
    "EmptyDrawingError",
    "ImageDecodeError",
    "ImageLimits",
    "Stroke",
    "decode_image",
    "drawing_to_bitmap",
    "flat_strokes_to_bitmap",
    "rasterize",
    "simplify",
    "simplify_strokes",
    "strokes_from_google",
]
