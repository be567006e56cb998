"""A STAND-IN for ``tensorflow_model_server``, for tests: the real TF Serving gRPC API over the real SavedModel.

The TF Serving binary is on no registry these machines reach, so tests run this instead. It is not a mock of
our gateway's expectations: it serves ``tensorflow.serving.PredictionService`` (Predict, GetModelMetadata)
and ``tensorflow.serving.ModelService`` (GetModelStatus) from the ``tensorflow-serving-api`` protos, loads
every version directory under a model base path with TensorFlow, and answers as TF Serving does:

- ``model_spec``: ``name``, ``version``, ``version_label`` (from ``version_labels``) and ``signature_name``
  are honoured; no version means the highest one;
- NOT_FOUND for an unknown model or version ("Servable not found for request: ...");
- INVALID_ARGUMENT for an unknown signature, input or output name, or a tensor of the wrong dtype or shape;
- GetModelMetadata returns the SavedModel's own ``signature_def`` map.

Tests can stop it and restart it on the same port, make it slow (``delay_s``), make it fail (``fail_code``),
and read what it saw: every request's model spec and the deadline its caller gave it (``seen``). Given
``credentials`` (``grpc.ssl_server_credentials``) it serves TLS, or mTLS when they require client
certificates, as ``tensorflow_model_server --ssl_config_file`` does.

Run by hand: ``python tests/tfserving_standin.py --model-base-path models/quickdraw --port 8500``.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

log = logging.getLogger("tfserving-standin")


@dataclass(frozen=True)
class Seen:
    """One Predict as the stand-in received it."""

    model: str
    version: int | None
    version_label: str | None
    signature: str
    batch: int
    #: The caller's deadline on this process's monotonic clock (None when it gave none).
    deadline_s: float | None
    arrived_s: float
    #: The request's output_filter (empty: every output).
    outputs: tuple[str, ...] = ()


class _Servable:
    def __init__(self, path: Path) -> None:
        import tensorflow as tf
        from tensorflow.core.protobuf import saved_model_pb2

        self.loaded = tf.saved_model.load(str(path))
        proto = saved_model_pb2.SavedModel()
        proto.ParseFromString((path / "saved_model.pb").read_bytes())
        self.signature_defs = proto.meta_graphs[0].signature_def
        # Warm up before the version is AVAILABLE, as TF Serving does with assets.extra/tf_serving_warmup_requests.
        for name, sig in self.signature_defs.items():
            if name.startswith("__") or set(sig.inputs) != {"image"}:
                continue
            for n in (1, 8):
                self.loaded.signatures[name](image=tf.zeros([n, 28, 28, 1], tf.uint8))


class TFServingStandIn:
    """See the module docstring. Use as a context manager, or start()/stop()/restart()."""

    def __init__(
        self,
        base_path: Path,
        model_name: str = "quickdraw",
        port: int = 0,
        version_labels: dict[str, int] | None = None,
        workers: int = 8,
        credentials: grpc.ServerCredentials | None = None,
    ) -> None:
        self.base_path = Path(base_path)
        self.model_name = model_name
        self.port = port
        self.version_labels = dict(version_labels or {})
        self.workers = workers
        self.credentials = credentials
        self.delay_s = 0.0
        self.fail_code: grpc.StatusCode | None = None
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._server: grpc.Server | None = None
        self.servables: dict[int, _Servable] = {}
        for d in sorted(self.base_path.iterdir()):
            if d.name.isdigit() and (d / "saved_model.pb").exists():
                self.servables[int(d.name)] = _Servable(d)
        if not self.servables:
            raise FileNotFoundError(f"no <version>/saved_model.pb under {self.base_path}")

    # --- lifecycle ---------------------------------------------------------------------------------------------
    @property
    def target(self) -> str:
        """host:port to dial."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> TFServingStandIn:
        """Serve on ``port`` (a free one the first time if 0; the same one on restart)."""
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=self.workers))
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(_Prediction(self), server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(_Models(self), server)
        address = f"127.0.0.1:{self.port}"
        if self.credentials is not None:
            bound = server.add_secure_port(address, self.credentials)
        else:
            bound = server.add_insecure_port(address)
        if bound == 0:
            raise OSError(f"stand-in could not bind 127.0.0.1:{self.port}")
        self.port = bound
        server.start()
        self._server = server
        return self

    def stop(self, grace_s: float | None = None) -> None:
        """Stop serving; in-flight calls are cut off (grace None), as when the process dies."""
        if self._server is not None:
            self._server.stop(grace_s).wait()
            self._server = None

    def restart(self) -> None:
        """Serve again on the same port."""
        self.stop()
        self.start()

    def __enter__(self) -> TFServingStandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- versions come and go, as TF Serving's file-system source makes them -------------------------------------
    def add_version(self, version: int, path: Path) -> None:
        """Load ``path`` as ``version`` and make it AVAILABLE (it becomes the default if highest)."""
        servable = _Servable(Path(path))
        with self._lock:
            self.servables = {**self.servables, version: servable}

    def remove_version(self, version: int) -> None:
        """Unload ``version`` (calls for it get NOT_FOUND from then on)."""
        with self._lock:
            self.servables = {v: s for v, s in self.servables.items() if v != version}

    # --- model_spec resolution, as TF Serving does it ------------------------------------------------------------
    def resolve(self, spec: Any, context: grpc.ServicerContext) -> tuple[int, _Servable]:
        """The version a model_spec names; aborts with TF Serving's codes."""
        if spec.name != self.model_name:
            context.abort(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Latest({spec.name})")
        choice = spec.WhichOneof("version_choice")
        if choice == "version_label":
            if spec.version_label not in self.version_labels:
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"Unrecognized servable version label: {spec.version_label}"
                )
            version = self.version_labels[spec.version_label]
        elif choice == "version":
            version = spec.version.value
        else:
            version = max(self.servables)
        if version not in self.servables:
            context.abort(
                grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Specific({spec.name}, {version})"
            )
        return version, self.servables[version]


def _deadline(context: grpc.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class _Prediction(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, standin: TFServingStandIn) -> None:
        self.s = standin

    def Predict(
        self, request: predict_pb2.PredictRequest, context: grpc.ServicerContext
    ) -> predict_pb2.PredictResponse:
        import tensorflow as tf

        s = self.s
        arrived, deadline = time.monotonic(), _deadline(context)
        version, servable = s.resolve(request.model_spec, context)
        spec = request.model_spec
        batch = request.inputs["image"].tensor_shape.dim[0].size if "image" in request.inputs else 0
        with s._lock:
            s.seen.append(
                Seen(spec.name, spec.version.value if spec.HasField("version") else None,
                     spec.version_label or None, spec.signature_name, batch, deadline, arrived,
                     tuple(request.output_filter))
            )  # fmt: skip
        if s.delay_s:
            time.sleep(s.delay_s)
        if s.fail_code is not None:
            context.abort(s.fail_code, "stand-in: injected failure")
        name = spec.signature_name or "serving_default"
        if name not in servable.signature_defs:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f'Serving signature key "{name}" not found.')
        sig = servable.signature_defs[name]
        if set(request.inputs) != set(sig.inputs):
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input keys {sorted(request.inputs)} do not match the signature's {sorted(sig.inputs)}",
            )
        feeds = {}
        for key, info in sig.inputs.items():
            tensor = request.inputs[key]
            if tensor.dtype != info.dtype:
                want = tf.dtypes.as_dtype(info.dtype).name
                got = tf.dtypes.as_dtype(tensor.dtype).name if tensor.dtype else "invalid"
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"Expects arg[0] to be {want} but {got} is provided")
            try:
                value = tf.make_ndarray(tensor)
            except Exception as exc:  # a tensor whose content disagrees with its shape
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"input {key!r}: {exc}")
            want_shape = [d.size for d in info.tensor_shape.dim]
            if len(value.shape) != len(want_shape) or any(
                w not in (-1, g) for w, g in zip(want_shape, value.shape, strict=True)
            ):
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"input {key!r} has shape {list(value.shape)}; the signature expects {want_shape}",
                )
            feeds[key] = tf.constant(value)
        wanted = list(request.output_filter) or list(sig.outputs)
        unknown = [o for o in wanted if o not in sig.outputs]
        if unknown:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"output tensor alias not found in signature: {unknown[0]}")
        outputs = servable.loaded.signatures[name](**feeds)
        resp = predict_pb2.PredictResponse()
        resp.model_spec.name = s.model_name
        resp.model_spec.version.value = version
        resp.model_spec.signature_name = name
        for key in wanted:
            resp.outputs[key].CopyFrom(tf.make_tensor_proto(np.asarray(outputs[key].numpy())))
        return resp

    def GetModelMetadata(
        self, request: get_model_metadata_pb2.GetModelMetadataRequest, context: grpc.ServicerContext
    ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        version, servable = self.s.resolve(request.model_spec, context)
        if list(request.metadata_field) != ["signature_def"]:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Metadata field signature_def is the only one supported")
        sigs = get_model_metadata_pb2.SignatureDefMap()
        for k, v in servable.signature_defs.items():
            if not k.startswith("__"):
                sigs.signature_def[k].CopyFrom(v)
        resp = get_model_metadata_pb2.GetModelMetadataResponse()
        resp.model_spec.name = self.s.model_name
        resp.model_spec.version.value = version
        resp.metadata["signature_def"].Pack(sigs)
        return resp


class _Models(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, standin: TFServingStandIn) -> None:
        self.s = standin

    def GetModelStatus(
        self, request: get_model_status_pb2.GetModelStatusRequest, context: grpc.ServicerContext
    ) -> get_model_status_pb2.GetModelStatusResponse:
        s = self.s
        spec = request.model_spec
        if spec.HasField("version") or spec.version_label:
            versions = [s.resolve(spec, context)[0]]
        else:
            if spec.name != s.model_name:
                context.abort(grpc.StatusCode.NOT_FOUND, f"Could not find any versions of model {spec.name}")
            versions = sorted(s.servables)
        resp = get_model_status_pb2.GetModelStatusResponse()
        for v in versions:
            resp.model_version_status.add(version=v, state=get_model_status_pb2.ModelVersionStatus.AVAILABLE)
        return resp


def main() -> None:
    """Serve a model base path until interrupted."""
    p = argparse.ArgumentParser(description="A stand-in for tensorflow_model_server (tests and local runs only).")
    p.add_argument("--model-base-path", type=Path, required=True, help="directory holding <version>/saved_model.pb")
    p.add_argument("--model-name", default="quickdraw", help="model name to serve (default: quickdraw)")
    p.add_argument("--port", type=int, default=8500, help="gRPC port (default: 8500, as TF Serving)")
    p.add_argument("--delay-ms", type=float, default=0.0, help="sleep this long in every Predict (a slow GPU)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO)
    with TFServingStandIn(args.model_base_path, args.model_name, args.port) as standin:
        standin.delay_s = args.delay_ms / 1000.0
        print(f"tfserving stand-in: {args.model_name} versions {sorted(standin.servables)} on {standin.target}",
              flush=True)  # fmt: skip
        threading.Event().wait()


if __name__ == "__main__":
    main()
