"""``quickdraw.v1``: the public API's generated code under the server's import path.

The code itself lives in the client distribution (``clients/python``, package ``quickdraw_client.v1``, written
by ``make protos``), so that backend teams can install it without the server. These names are the very same
module objects (one copy of the code, one registration of ``quickdraw/v1/classifier.proto`` in protobuf's
descriptor pool), so ``from quickdraw.v1 import classifier_pb2`` and ``import quickdraw.v1.classifier_pb2`` keep
working and give the classes ``quickdraw_client`` uses.
"""

import sys

from quickdraw_client.v1 import classifier_pb2, classifier_pb2_grpc

sys.modules[f"{__name__}.classifier_pb2"] = classifier_pb2
sys.modules[f"{__name__}.classifier_pb2_grpc"] = classifier_pb2_grpc

__all__ = ["classifier_pb2", "classifier_pb2_grpc"]
