"""The test process of ``compat.upstream_tests`` (run as a script, not imported): runs the named
tests of TF Serving's ``tensorflow_model_server_test.py`` as its ``__main__`` does
(``tf.test.main``, i.e. absltest), and appends one JSON line per test start and end to the
events file, flushed at once, so that the parent sees each result as it comes and can tell which
test a hang or crash happened in.

``python upstream_child.py TEST_FILE GRPC_SOCKET_PATH EVENTS_FILE TEST_NAME...``

The test module's UDS path (``GRPC_SOCKET_PATH``, the same constant in the test and its base)
is set to the one given, so that runs side by side do not take each other's socket; and
TensorFlow's ``flags`` module gets back an attribute one test reads (``_flags_module_with_os``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
import traceback
import unittest

TEST_CLASS = "TensorflowModelServerTest"


class _EventResult(unittest.TextTestResult):
    def __init__(self, stream, descriptions: bool, verbosity: int, events) -> None:
        super().__init__(stream, descriptions, verbosity)
        self._events = events
        self._started = time.monotonic()

    def startTest(self, test: unittest.TestCase) -> None:
        self._started = time.monotonic()
        self._emit({"event": "start", "test": _name(test)})
        super().startTest(test)

    def addSuccess(self, test: unittest.TestCase) -> None:
        super().addSuccess(test)
        self._end(test, "passed", "")

    def addFailure(self, test: unittest.TestCase, err) -> None:
        super().addFailure(test, err)
        self._end(test, "failed", _describe(err[1]))

    def addError(self, test: unittest.TestCase, err) -> None:
        super().addError(test, err)
        self._end(test, "error", _describe(err[1]))

    def addSkip(self, test: unittest.TestCase, reason: str) -> None:
        super().addSkip(test, reason)
        self._end(test, "skipped", reason)

    def _end(self, test: unittest.TestCase, outcome: str, detail: str) -> None:
        seconds = time.monotonic() - self._started
        end = {"event": "end", "test": _name(test), "outcome": outcome, "seconds": seconds}
        self._emit(dict(end, detail=detail))

    def _emit(self, event: dict) -> None:
        self._events.write(json.dumps(event) + "\n")
        self._events.flush()


class _EventRunner(unittest.TextTestRunner):
    def __init__(self, events_path: str) -> None:
        super().__init__(verbosity=2)
        self._events_path = events_path

    def _makeResult(self) -> unittest.TextTestResult:
        events = open(self._events_path, "a", buffering=1)
        return _EventResult(self.stream, self.descriptions, self.verbosity, events)


def _name(test: unittest.TestCase) -> str:
    return test.id().rsplit(".", 1)[-1]


def _describe(error: BaseException) -> str:
    """One line: a gRPC error as its status code and details, anything else as its last line."""
    code, details = getattr(error, "code", None), getattr(error, "details", None)
    if callable(code) and callable(details):
        return f"RpcError {code().name}: {details()}"
    return traceback.format_exception_only(type(error), error)[-1].strip()


def _flags_module_with_os() -> None:
    """``test_tf_text`` reads ``flags.os.environ`` from ``tensorflow.python.platform.flags``,
    which stopped importing ``os`` in later TensorFlow releases; put it back, so the test checks
    the server rather than that import."""
    from tensorflow.python.platform import flags

    if not hasattr(flags, "os"):
        flags.os = os


def main() -> None:
    test_file, socket_path, events_path, *names = sys.argv[1:]
    _flags_module_with_os()
    spec = importlib.util.spec_from_file_location("tensorflow_model_server_test", test_file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    module.GRPC_SOCKET_PATH = socket_path
    module.tensorflow_model_server_test_base.GRPC_SOCKET_PATH = socket_path

    from absl.testing import absltest

    module.tf.enable_eager_execution()  # what the test file's __main__ does first
    sys.argv = [test_file, *(f"{TEST_CLASS}.{name}" for name in names)]
    absltest.main(module=module, testRunner=_EventRunner(events_path))


if __name__ == "__main__":
    main()
