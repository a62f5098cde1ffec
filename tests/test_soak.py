"""The soak benchmark's 30-second variant (``benchmarks/soak.py``): gRPC and REST load while a
new version arrives every 5 s and one worker is SIGKILLed. Only requests in flight on the killed
worker may fail, the last version is the one served, and neither the server's memory nor its
open file descriptors grow without bound."""

from __future__ import annotations

import pytest

from benchmarks.soak import soak
from tests import saved_models
from tests.servers import MixedLoad

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_a_30_second_soak_fails_only_requests_in_flight_on_the_killed_worker(tmp_path):
    source = saved_models.make_template(tmp_path / "template", 3)
    result = soak(source, tmp_path, duration_s=30, version_every_s=5, kill_every_s=15)
    assert len(result.versions) >= 5 and len(result.kills) == 1
    assert result.requests > 100
    assert result.failed_not_in_flight == 0, result.first_errors
    assert result.failed <= 2 * MixedLoad.CLIENTS, result.first_errors  # see test_serving_heal
    assert result.last_version_served == result.versions[-1][1]
    # Each new version replaced the last (latest 1): memory stays that of one version.
    assert result.rss_growth < 0.25, result.samples
    assert result.fd_growth < 16, result.samples  # client connections come and go
    assert result.supervisor_fd_growth <= 1, result.samples  # a dead worker's pipe, handle closed
