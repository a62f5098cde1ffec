"""The Prefect event that says a batch of training data has landed.

``python -m tasks.data add`` calls ``emit_data_landed(digest, name, rows)`` once it has accepted a
batch; the ``on-new-data`` deployment's trigger in ``prefect.yaml`` matches this event and starts a
run (one per landing window: batches landing together train once).

The event is ``DATA_LANDED`` about the resource ``f"{SPAN_RESOURCE_PREFIX}{digest}"`` (named
``name``), with payload ``{"rows": rows}``. It is sent to the Prefect API at ``PREFECT_API_URL``
over the events websocket, and ``emit_data_landed`` returns only once the connection has been
closed cleanly after it (the server has read everything sent before the close), so a CLI that
exits right after does not lose it. An API that cannot be reached is an ``EventNotDelivered``
naming the URL, raised within seconds, never a silent drop.

Free of TensorFlow, and Prefect is imported only when an event is sent: importing this module is
instant.
"""

from __future__ import annotations

DATA_LANDED = "train-and-serve.data.landed"
SPAN_RESOURCE_PREFIX = "train-and-serve.data.span."
# How many times the events client reconnects before giving up (each attempt after the third
# waits 1 s): an unreachable API fails in about 2 s instead of Prefect's default ~8 s.
RECONNECTION_ATTEMPTS = 3


class EventNotDelivered(RuntimeError):
    """The event could not be sent to the Prefect API; the message names the URL."""


def span_resource_id(digest: str) -> str:
    return f"{SPAN_RESOURCE_PREFIX}{digest}"


def emit_data_landed(digest: str, name: str, rows: int, api_url: str | None = None) -> None:
    """Sends ``DATA_LANDED`` for the batch ``digest`` (``name``, ``rows`` rows) to the Prefect API
    (``api_url``, by default the ``PREFECT_API_URL`` setting) and waits until it is delivered."""
    from prefect.events import Event
    from prefect.settings import PREFECT_API_URL

    url = api_url or PREFECT_API_URL.value()
    if not url:
        raise EventNotDelivered(
            f"cannot send {DATA_LANDED}: PREFECT_API_URL is not set (the local stack's is "
            "http://127.0.0.1:4200/api)"
        )
    event = Event(
        event=DATA_LANDED,
        resource={"prefect.resource.id": span_resource_id(digest), "prefect.resource.name": name},
        payload={"rows": rows},
    )
    try:
        _run(_send(event, url))
    except Exception as error:
        raise EventNotDelivered(
            f"could not send {DATA_LANDED} for {name} to the Prefect API at {url}: "
            f"{type(error).__name__}: {error}"
        ) from error


async def _send(event, url: str) -> None:
    from prefect.events.clients import PrefectEventsClient

    # Exiting the client closes the websocket with a close handshake: the server has read every
    # frame sent before its answer to our close.
    async with PrefectEventsClient(
        api_url=url, reconnection_attempts=RECONNECTION_ATTEMPTS
    ) as client:
        await client.emit(event)


def _run(coroutine) -> None:
    """``asyncio.run``, in a thread of its own when this thread already runs an event loop."""
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(coroutine)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(asyncio.run, coroutine).result()
