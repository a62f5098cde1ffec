"""REST front end (aiohttp): TF Serving's ``/v1/models/...`` JSON API.

Only translation lives here: the URL -> ``core.ModelSpec`` and verb, the body -> a call the data
plane reads and answers (``serving.json_tensor``), ``ServingError`` -> HTTP status +
``{"error": ...}``; and each request's metrics. Behaviour is in ``serving.core``. The
``:predict`` verb shares a path segment with the model name, which aiohttp's ``{name}``
placeholders cannot split, so one catch-all route parses the tail with a regex.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from typing import Any, Awaitable, Callable

import grpc
from aiohttp import web
from google.protobuf import json_format

from serving import metrics
from serving.core import DataPlane, ModelSpec
from serving.deadlines import Deadlines
from serving.errors import ServingError, invalid
from serving.json_tensor import ExamplesBody, PredictBody, json_bytes

log = logging.getLogger("serving.rest")

_PATH_RE = re.compile(
    r"^(?P<name>[^/:]+)"
    r"(?:/versions/(?P<version>[^/:]+)|/labels/(?P<label>[^/:]+))?"
    r"(?:(?P<metadata>/metadata)|:(?P<verb>[A-Za-z]+))?$"
)

HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.UNIMPLEMENTED: 501,
}

# TF Serving's API name of each POST verb (the metrics' ``API`` label).
_VERB_APIS = {"predict": "Predict", "classify": "Classify", "regress": "Regress"}


def parse_version(text: str) -> int:
    """A version from a URL; INVALID_ARGUMENT when it is not an int64."""
    try:
        value = int(text)
    except ValueError:
        raise invalid(f"Invalid version: {text}") from None
    if value < 0 or value > 2**63 - 1:
        raise invalid(f"Invalid version: {text}")
    return value


@functools.lru_cache(maxsize=1024)  # clients repeat a few URLs
def _parse_tail(tail: str) -> tuple[ModelSpec, str | None, bool] | None:
    """``/v1/models/<tail>`` -> (model, verb, metadata?); None when it is malformed;
    INVALID_ARGUMENT for a version that is not an int64."""
    match = _PATH_RE.match(tail)
    if match is None:
        return None
    version = parse_version(match["version"]) if match["version"] is not None else None
    model = ModelSpec(match["name"], version, match["label"])
    return model, match["verb"], match["metadata"] is not None


def _json_response(body: bytes, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, content_type="application/json")


def error_response(e: ServingError) -> web.Response:
    return _json_response(json_bytes({"error": e.message}), HTTP_STATUS.get(e.code, 500))


def _malformed(request: web.Request) -> ServingError:
    return ServingError(
        grpc.StatusCode.NOT_FOUND, f"Malformed request: {request.method} {request.path}"
    )


class RestApi:
    """The aiohttp handlers over a DataPlane."""

    def __init__(self, data_plane: DataPlane, timeout_ms: int) -> None:
        self.data_plane = data_plane
        self.deadlines = Deadlines(timeout_ms / 1000.0 if timeout_ms > 0 else None)
        # verb -> (model, body) -> the answer's body
        self.verbs: dict[str, Callable[[ModelSpec, bytes], Awaitable[bytes]]] = {
            "predict": lambda model, data: data_plane.predict(model, len(data), PredictBody(data)),
            "classify": lambda model, data: data_plane.classify(
                model, len(data), ExamplesBody(data)
            ),
            "regress": lambda model, data: data_plane.regress(model, len(data), ExamplesBody(data)),
        }

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 31)
        app.router.add_route("GET", "/v1/models/{tail:.+}", self.handle_get)
        app.router.add_route("POST", "/v1/models/{tail:.+}", self.handle_post)
        return app

    async def handle_get(self, request: web.Request) -> web.Response:
        """Model status, or ``/metadata``."""
        start = time.perf_counter()
        try:
            model, verb, metadata = _parse(request)
            if verb is not None:
                raise _malformed(request)
        except ServingError as e:
            return error_response(e)
        api = "GetModelMetadata" if metadata else "GetModelStatus"
        try:
            body = await (self._metadata(model) if metadata else self._status(model))
        except Exception as e:  # noqa: BLE001 -- answered, and counted, by its code
            return _failed(model, api, e, start)
        metrics.observe_request(model.name, api, "REST", grpc.StatusCode.OK, start)
        return _json_response(body)

    async def handle_post(self, request: web.Request) -> web.Response:
        """``:predict``, ``:classify``, ``:regress``."""
        start = time.perf_counter()
        try:
            model, verb, metadata = _parse(request)
            run = self.verbs.get(verb or "")
            if metadata or run is None:
                raise _malformed(request)
        except ServingError as e:
            return error_response(e)
        api = _VERB_APIS[verb]
        try:
            data = await request.read()
            body = await self.deadlines.run(run(model, data))
        except Exception as e:  # noqa: BLE001 -- answered, and counted, by its code
            return _failed(model, api, e, start)
        metrics.observe_request(model.name, api, "REST", grpc.StatusCode.OK, start)
        return _json_response(body)

    async def _status(self, model: ModelSpec) -> bytes:
        statuses = await self.data_plane.model_status(model)
        return json_bytes(
            {
                "model_version_status": [
                    {
                        "version": str(s.version),
                        "state": s.state.name,
                        "status": {
                            "error_code": s.error_code.name,
                            "error_message": s.error_message,
                        },
                    }
                    for s in statuses
                ]
            }
        )

    async def _metadata(self, model: ModelSpec) -> bytes:
        """GetModelMetadataResponse as TF Serving prints it (http_rest_api_util's ToJsonString):
        its model_spec and the unpacked SignatureDefMap, proto field names, every field without
        presence printed at its default (``"signature_name": ""``, ``"dim": []``, ...)."""
        from tensorflow_serving.apis import get_model_metadata_pb2, model_pb2

        metadata = await self.data_plane.model_metadata(model)
        spec = model_pb2.ModelSpec(name=model.name)
        spec.version.value = metadata.version
        sig_map = get_model_metadata_pb2.SignatureDefMap()
        for key, sig in metadata.signature_defs.items():
            sig_map.signature_def[key].CopyFrom(sig)
        return json_bytes(
            {
                "model_spec": _proto_json(spec),
                "metadata": {"signature_def": _proto_json(sig_map)},
            }
        )


def _proto_json(message: Any) -> Any:
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _parse(request: web.Request) -> tuple[ModelSpec, str | None, bool]:
    """``(model, verb, metadata?)`` of ``/v1/models/<tail>``; NOT_FOUND when it is malformed."""
    parsed = _parse_tail(request.match_info["tail"])
    if parsed is None:
        raise _malformed(request)
    return parsed


def _failed(model: ModelSpec, api: str, error: Exception, start: float) -> web.Response:
    """The response to a request naming ``model`` and ``api`` that failed: TF Serving's status and
    ``{"error": ...}`` for a ``ServingError``, 500 for a bug; counted and timed by its code."""
    if isinstance(error, ServingError):
        code, response = error.code, error_response(error)
    else:
        log.exception("REST %s of model %s failed", api, model.name, exc_info=error)
        code = grpc.StatusCode.INTERNAL
        response = _json_response(json_bytes({"error": f"{type(error).__name__}: {error}"}), 500)
    metrics.observe_request(model.name, api, "REST", code, start)
    return response


def _prometheus_route(path: str, page: Callable[[], Awaitable[str]]) -> web.RouteDef:
    """The scrape endpoint; ``page`` gathers the text from every worker process."""

    async def handler(request: web.Request) -> web.Response:
        body = (await page()).encode()
        return web.Response(body=body, headers={"Content-Type": metrics.CONTENT_TYPE})

    return web.get(path, handler)


async def start_rest_server(
    data_plane: DataPlane,
    address: str,
    port: int,
    timeout_ms: int,
    *,
    prometheus_path: str | None = None,
) -> web.AppRunner:
    """Start the REST server; returns the runner (``await runner.cleanup()`` to stop).

    ``prometheus_path`` (from ``--monitoring_config_file``) adds the metrics page, as TF Serving
    serves it on the REST port.
    """
    app = RestApi(data_plane, timeout_ms).app()
    if prometheus_path:
        app.router.add_routes([_prometheus_route(prometheus_path, data_plane.metrics_page)])
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, address, port, reuse_port=True)  # shared by the worker processes
    await site.start()
    log.info("REST server listening on %s:%d", address, port)
    return runner
