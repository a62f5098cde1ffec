"""REST front end (aiohttp): TF Serving's ``/v1/models/...`` JSON API.

Only translation lives here: URL -> (name, version), JSON rows/columns <-> numpy, ServingError ->
HTTP status + ``{"error": ...}``. Behaviour is in ``serving.core``. The ``:predict`` verb shares a
path segment with the model name, which aiohttp's ``{name}`` placeholders cannot split, so one
catch-all route parses the tail with a regex. JSON decoding needs the signature's dtypes, so it is
done inside the data plane's worker thread against the routed version (see ``predict_sync``).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
from typing import Any

import grpc
import numpy as np
from aiohttp import web
from google.protobuf import json_format

from serving.core import DataPlane, parse_version
from serving.errors import ServingError, invalid
from serving.servable import SignatureInfo, TensorInfo

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


def _json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(body, separators=(",", ":")), status=status,
                        content_type="application/json")


def error_response(e: ServingError) -> web.Response:
    return _json_response({"error": e.message}, HTTP_STATUS.get(e.code, 500))


# -- JSON <-> numpy ----------------------------------------------------------------------------


def _strings(value: Any, alias: str) -> Any:
    """Leaves of a JSON value for a string tensor -> bytes (``{"b64": ...}`` decoded)."""
    if isinstance(value, list):
        return [_strings(v, alias) for v in value]
    if isinstance(value, dict):
        if set(value) == {"b64"} and isinstance(value["b64"], str):
            try:
                return base64.b64decode(value["b64"], validate=True)
            except ValueError:
                raise invalid(f'Input "{alias}": invalid base64 value') from None
        raise invalid(f'Input "{alias}": unexpected JSON object in a string tensor')
    if isinstance(value, str):
        return value.encode("utf-8")
    raise invalid(f'Input "{alias}" expects strings but got {type(value).__name__}')


def to_array(info: TensorInfo, value: Any) -> np.ndarray:
    """A JSON value -> numpy array of the signature's dtype; INVALID_ARGUMENT naming the input."""
    try:
        if info.is_string():
            return np.array(_strings(value, info.alias), dtype=object)
        if _contains_b64(value):
            raise invalid(f'Input "{info.alias}" expects dtype {info.dtype_name}, got b64 data')
        return np.asarray(value, dtype=info.dtype)
    except ServingError:
        raise
    except (ValueError, TypeError, OverflowError) as e:
        raise invalid(
            f'Input "{info.alias}" cannot be converted to a {info.dtype_name} tensor: {e}'
        ) from None


def _contains_b64(value: Any) -> bool:
    if isinstance(value, dict):
        return True
    if isinstance(value, list):
        return any(_contains_b64(v) for v in value[:1])
    return False


def decode_instances(sig: SignatureInfo, instances: Any) -> dict[str, np.ndarray]:
    """Row format: one entry per example; a named-input object per row when needed."""
    if not isinstance(instances, list):
        raise invalid("'instances' must be a JSON array")
    if not instances:
        raise invalid("'instances' is empty")
    names = list(sig.inputs)
    objects = all(isinstance(i, dict) and not (set(i) == {"b64"}) for i in instances)
    if len(names) == 1 and not objects:
        return {names[0]: to_array(sig.inputs[names[0]], instances)}
    if not objects:
        raise invalid("instances must be JSON objects keyed by input name when the signature "
                      f"has {len(names)} inputs")
    keys = set(instances[0])
    for row in instances:
        if set(row) != keys:
            raise invalid("all instances must have the same named inputs")
    inputs: dict[str, np.ndarray] = {}
    for key in keys:
        info = sig.inputs.get(key)
        if info is None:
            raise invalid(f"input size does not match signature: unknown input \"{key}\" "
                          f"(signature inputs: {', '.join(sorted(sig.inputs))})")
        inputs[key] = to_array(info, [row[key] for row in instances])
    return inputs


def decode_columns(sig: SignatureInfo, columns: Any) -> dict[str, np.ndarray]:
    """Columnar format: the tensor itself (one input) or an object keyed by input name."""
    names = list(sig.inputs)
    if isinstance(columns, dict) and not set(columns) == {"b64"}:
        inputs: dict[str, np.ndarray] = {}
        for key, value in columns.items():
            info = sig.inputs.get(key)
            if info is None:
                raise invalid(f"input size does not match signature: unknown input \"{key}\" "
                              f"(signature inputs: {', '.join(sorted(sig.inputs))})")
            inputs[key] = to_array(info, value)
        return inputs
    if len(names) != 1:
        raise invalid(f"'inputs' must be an object keyed by input name when the signature has "
                      f"{len(names)} inputs")
    return {names[0]: to_array(sig.inputs[names[0]], columns)}


def _json_value(alias: str, array: np.ndarray) -> Any:
    if array.dtype == object or array.dtype.kind == "S":
        binary = alias.endswith("_bytes")

        def leaf(b: Any) -> Any:
            if isinstance(b, bytes):
                if not binary:
                    try:
                        return b.decode("utf-8")
                    except UnicodeDecodeError:
                        pass
                return {"b64": base64.b64encode(b).decode("ascii")}
            return b

        return np.vectorize(leaf, otypes=[object])(array).tolist() if array.size else array.tolist()
    return array.tolist()


def encode_rows(outputs: dict[str, np.ndarray]) -> list[Any]:
    """``predictions``: one entry per example; the bare value when there is a single output."""
    if len(outputs) == 1:
        (alias, value), = outputs.items()
        if value.ndim == 0:
            raise invalid(f"output {alias} is a scalar; use the columnar format")
        return _json_value(alias, value)
    sizes = {alias: (v.shape[0] if v.ndim else None) for alias, v in outputs.items()}
    batch = set(sizes.values())
    if len(batch) != 1 or None in batch:
        raise invalid("outputs have inconsistent batch sizes (use the columnar 'inputs' format): "
                      + ", ".join(f"{a}={s}" for a, s in sorted(sizes.items())))
    columns = {alias: _json_value(alias, v) for alias, v in outputs.items()}
    return [{alias: columns[alias][i] for alias in columns} for i in range(batch.pop())]


def encode_columns(outputs: dict[str, np.ndarray]) -> Any:
    if len(outputs) == 1:
        (alias, value), = outputs.items()
        return _json_value(alias, value)
    return {alias: _json_value(alias, v) for alias, v in outputs.items()}


# -- handlers ----------------------------------------------------------------------------------


class RestApi:
    """The aiohttp handlers over a DataPlane."""

    def __init__(self, data_plane: DataPlane, timeout_ms: int) -> None:
        self.data_plane = data_plane
        self.timeout_s = timeout_ms / 1000.0 if timeout_ms > 0 else None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 31)
        app.router.add_route("GET", "/v1/models/{tail:.+}", self.handle_get)
        app.router.add_route("POST", "/v1/models/{tail:.+}", self.handle_post)
        return app

    @staticmethod
    def _route(request: web.Request) -> tuple[str, int | None, re.Match[str]]:
        match = _PATH_RE.match(request.match_info["tail"])
        if match is None:
            raise ServingError(grpc.StatusCode.NOT_FOUND,
                               f"Malformed request: {request.method} {request.path}")
        if match["label"] is not None:
            raise invalid(f"Unrecognized servable version label: {match['label']}")
        version = parse_version(match["version"]) if match["version"] is not None else None
        return match["name"], version, match

    async def handle_get(self, request: web.Request) -> web.Response:
        try:
            name, version, match = self._route(request)
            if match["verb"] is not None:
                raise ServingError(grpc.StatusCode.NOT_FOUND,
                                   f"Malformed request: GET {request.path}")
            if match["metadata"]:
                return _json_response(self._metadata(name, version))
            statuses = self.data_plane.model_status(name, version)
            return _json_response({"model_version_status": [
                {"version": str(s.version), "state": s.state.name,
                 "status": {"error_code": s.error_code.name, "error_message": s.error_message}}
                for s in statuses
            ]})
        except ServingError as e:
            return error_response(e)

    def _metadata(self, name: str, version: int | None) -> dict[str, Any]:
        from tensorflow_serving.apis import get_model_metadata_pb2

        metadata = self.data_plane.model_metadata(name, version)
        sig_map = get_model_metadata_pb2.SignatureDefMap()
        for key, sig in metadata.signature_defs.items():
            sig_map.signature_def[key].CopyFrom(sig)
        return {
            "model_spec": {"name": name, "signature_name": "", "version": str(metadata.version)},
            "metadata": {"signature_def": json_format.MessageToDict(
                sig_map, preserving_proto_field_name=True)},
        }

    async def handle_post(self, request: web.Request) -> web.Response:
        try:
            name, version, match = self._route(request)
            verb = match["verb"]
            if match["metadata"] or verb is None:
                raise ServingError(grpc.StatusCode.NOT_FOUND,
                                   f"Malformed request: POST {request.path}")
            if verb in ("classify", "regress"):
                raise ServingError(grpc.StatusCode.UNIMPLEMENTED,
                                   f"{verb} is not implemented by this server yet")
            if verb != "predict":
                raise ServingError(grpc.StatusCode.NOT_FOUND,
                                   f"Malformed request: POST {request.path}")
            body = self._parse_body(await request.text())
            coro = self._predict(name, version, body)
            if self.timeout_s is not None:
                try:
                    return await asyncio.wait_for(coro, self.timeout_s)
                except asyncio.TimeoutError:
                    raise ServingError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                       "Deadline exceeded") from None
            return await coro
        except ServingError as e:
            return error_response(e)
        except Exception as e:  # noqa: BLE001
            log.exception("REST %s %s failed", request.method, request.path)
            return _json_response({"error": f"{type(e).__name__}: {e}"}, 500)

    @staticmethod
    def _parse_body(text: str) -> dict[str, Any]:
        try:
            body = json.loads(text)
        except ValueError as e:
            raise invalid(f"JSON Parse error: {e}") from None
        if not isinstance(body, dict):
            raise invalid("JSON Value is not an object")
        return body

    async def _predict(self, name: str, version: int | None, body: dict[str, Any]) -> web.Response:
        signature_name = body.get("signature_name", "")
        if not isinstance(signature_name, str):
            raise invalid("'signature_name' must be a string")
        has_rows, has_cols = "instances" in body, "inputs" in body
        if has_rows == has_cols:
            raise invalid("Missing 'inputs' or 'instances' key" if not has_rows else
                          "Not both 'inputs' and 'instances' may be specified")
        if has_rows:
            def decode(sig: SignatureInfo) -> dict[str, np.ndarray]:
                return decode_instances(sig, body["instances"])
        else:
            def decode(sig: SignatureInfo) -> dict[str, np.ndarray]:
                return decode_columns(sig, body["inputs"])
        result = await self.data_plane.predict(name, version, signature_name, decode)
        if has_rows:
            return _json_response({"predictions": encode_rows(result.outputs)})
        return _json_response({"outputs": encode_columns(result.outputs)})


async def start_rest_server(data_plane: DataPlane, address: str, port: int,
                            timeout_ms: int) -> web.AppRunner:
    """Start the REST server; returns the runner (``await runner.cleanup()`` to stop)."""
    runner = web.AppRunner(RestApi(data_plane, timeout_ms).app(), access_log=None,
                           handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, address, port)
    await site.start()
    log.info("REST server listening on %s:%d", address, port)
    return runner
