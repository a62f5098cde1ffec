"""REST front end (aiohttp): TF Serving's ``/v1/models/...`` JSON API.

Only translation lives here: the URL -> ``core.ModelSpec`` and verb, the body -> a call the data
plane reads and answers (``serving.json_tensor``), ``ServingError`` -> HTTP status +
``{"error": ...}``; and each request's metrics. Behaviour is in ``serving.core``. The
``:predict`` verb shares a path segment with the model name, which aiohttp's ``{name}``
placeholders cannot split, so one route per method parses the tail with a regex.

Every request gets a JSON ``{"error": ...}`` unless it answers 200, whatever its path, method or
body, with TF Serving's status (docs/tf-serving-compat.md): routes that take everything the two
hot routes do not (``handle_other``) rather than a middleware, which every request would pay for.
Bodies are read up to ``MAX_BODY_BYTES`` (413 beyond) and gunzipped as TF Serving's HTTP server
does; requests aiohttp's HTTP parser rejects before any route (an unknown method token, broken
framing) keep its plain-text 400.
"""

from __future__ import annotations

import functools
import logging
import re
import time
import zlib
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

# TF Serving's path regexes (http_rest_api_util.cc), case-insensitive as theirs; the verb must
# then be lower case. A version is digits: "/versions/x" is no route at all, as there.
_PATH_RE = re.compile(
    r"^(?P<name>[^/:]+)"
    r"(?:/versions/(?P<version>[0-9]+)|/labels/(?P<label>[^/:]+))?"
    r"(?:(?P<metadata>/metadata)|:(?P<verb>[A-Za-z]+))?$",
    re.IGNORECASE,
)
# The largest body read, as the gRPC front end's receive limit; TF Serving sets none.
MAX_BODY_BYTES = 2**31 - 1
# The methods TF Serving's HTTP server (libevent) takes: any other is 501 before routing.
_SERVED_METHODS = frozenset({"GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH"})
_CORS_ORIGIN = re.compile("https?://")

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


def parse_version(digits: str) -> int:
    """The version of a URL (its digits); INVALID_ARGUMENT when it is not an int64."""
    value = int(digits)
    if value > 2**63 - 1:
        raise invalid(f"Failed to convert version: {digits} to numeric.")
    return value


@functools.lru_cache(maxsize=1024)  # clients repeat a few URLs
def _parse_tail(tail: str) -> tuple[ModelSpec, str | None, bool] | None:
    """``/v1/models/<tail>`` -> (model, verb, metadata?); None when it is malformed;
    INVALID_ARGUMENT for a version beyond int64."""
    match = _PATH_RE.match(tail)
    if match is None:
        return None
    version = parse_version(match["version"]) if match["version"] is not None else None
    model = ModelSpec(match["name"], version, match["label"])
    return model, match["verb"], match["metadata"] is not None


def _json_response(body: bytes, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, content_type="application/json")


class BodyTooLarge(ServingError):
    """A body over ``MAX_BODY_BYTES``: RESOURCE_EXHAUSTED, answered 413 (not the 429 of TF
    Serving's mapping, which tells a client to retry the same request later)."""

    def __init__(self) -> None:
        super().__init__(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"Request body larger than {MAX_BODY_BYTES} bytes",
        )


def error_response(e: ServingError) -> web.Response:
    if isinstance(e, BodyTooLarge):
        response = _json_response(json_bytes({"error": e.message}), 413)
        response.force_close()  # rather than read the rest of the body
        return response
    return _json_response(json_bytes({"error": e.message}), HTTP_STATUS.get(e.code, 500))


def _malformed(request: web.Request) -> ServingError:
    """TF Serving's answer to a request under ``/v1/`` that names no API."""
    return invalid(f"Malformed request: {request.method} {request.path}")


async def read_body(request: web.Request) -> bytes:
    """The body, gunzipped when its ``Content-Encoding`` is gzip (as TF Serving's HTTP server
    does; any other encoding is read as it is). ``BodyTooLarge`` over ``MAX_BODY_BYTES``,
    decided from ``Content-Length`` before reading when there is one; INVALID_ARGUMENT when it
    cannot be read (broken chunks, a gzip body that is not)."""
    if (request.content_length or 0) > MAX_BODY_BYTES:
        raise BodyTooLarge()
    try:
        data = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise BodyTooLarge() from None
    except web.RequestPayloadError as e:
        raise invalid(f"Failed to read the request body: {e}") from None
    if request.headers.get("Content-Encoding", "").lower() != "gzip":
        return data
    gunzip = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        data = gunzip.decompress(data, MAX_BODY_BYTES)
    except zlib.error as e:
        raise invalid(f"Failed to uncompress the gzipped body: {e}") from None
    if gunzip.unconsumed_tail:
        raise BodyTooLarge()
    if not gunzip.eof:
        raise invalid("Failed to uncompress the gzipped body: it is cut short")
    return data


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

    def app(self, cors: bool = False) -> web.Application:
        """The routes; ``cors`` (``--rest_api_enable_cors_support``) adds TF Serving's CORS
        headers to every ``/v1/`` response. A CORS preflight (OPTIONS) is answered either way
        (``handle_other``), as TF Serving does."""
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_route("GET", "/v1/models/{tail:.+}", self.handle_get)
        app.router.add_route("POST", "/v1/models/{tail:.+}", self.handle_post)
        # Looked up after any route with a fixed prefix (the two above, the metrics page):
        app.router.add_route("*", "/{v1:(?i:v1)}/{models:(?i:models)}/{tail:.+}", self.handle_v1)
        app.router.add_route("*", "/{path:.*}", self.handle_other)
        if cors:
            app.on_response_prepare.append(_add_cors_headers)
        return app

    async def handle_v1(self, request: web.Request) -> web.Response:
        """``/v1/models/<tail>`` in another case or by another method."""
        if request.method == "GET":
            return await self.handle_get(request)
        if request.method == "POST":
            return await self.handle_post(request)
        return await self.handle_other(request)

    async def handle_other(self, request: web.Request) -> web.Response:
        """A request no API route takes, answered as TF Serving's HTTP server and handler answer
        it: a method libevent does not take, 501; a path outside ``/v1/``, 404; a CORS
        preflight, 200 with an http(s) ``Origin``, else FAILED_PRECONDITION; ``GET /v1/models``,
        its "Missing model name"; anything else, INVALID_ARGUMENT "Malformed request"."""
        method, path = request.method, request.path
        if method not in _SERVED_METHODS:
            error = ServingError(grpc.StatusCode.UNIMPLEMENTED, f"Method not implemented: {method}")
        elif path[:4].lower() != "/v1/":
            error = ServingError(grpc.StatusCode.NOT_FOUND, f"Not found: {method} {path}")
        elif method == "OPTIONS":
            if _CORS_ORIGIN.search(request.headers.get("Origin", "")):
                return web.Response()
            error = ServingError(
                grpc.StatusCode.FAILED_PRECONDITION, "Origin header is missing in CORS preflight"
            )
        elif method == "GET" and path.lower() == "/v1/models":
            error = invalid("Missing model name in request.")
        else:
            error = _malformed(request)
        return error_response(error)

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
            data = await read_body(request)
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
    """``(model, verb, metadata?)`` of ``/v1/models/<tail>``; INVALID_ARGUMENT when it is
    malformed."""
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


# TF Serving's CORS headers (http_rest_api_util.cc AddCORSHeaders).
CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "POST, GET",
    "Access-Control-Allow-Headers": "Content-Type",
}


async def _add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    if request.path.startswith("/v1/"):  # the API's paths, not the metrics page
        response.headers.update(CORS_HEADERS)


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
    cors: bool = False,
) -> web.AppRunner:
    """Start the REST server; returns the runner (``await runner.cleanup()`` to stop).

    ``prometheus_path`` (from ``--monitoring_config_file``) adds the metrics page, as TF Serving
    serves it on the REST port; ``cors``: ``RestApi.app``.
    """
    app = RestApi(data_plane, timeout_ms).app(cors)
    if prometheus_path:
        app.router.add_routes([_prometheus_route(prometheus_path, data_plane.metrics_page)])
    # auto_decompress off: read_body gunzips as TF Serving does, where aiohttp would answer a
    # corrupt compressed body from its parser, in plain text, or take encodings TF Serving does not
    runner = web.AppRunner(app, access_log=None, handle_signals=False, auto_decompress=False)
    await runner.setup()
    site = web.TCPSite(runner, address, port, reuse_port=True)  # shared by the worker processes
    await site.start()
    log.info("REST server listening on %s:%d", address, port)
    return runner
