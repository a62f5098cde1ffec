"""Runs TF Serving's own model-server tests and its MNIST tutorial client against our server.

TF Serving's code and test data are read from a checkout at run time (by default the mirrored
git directory's HEAD, see ``compat.checkout``) and never kept in this repository:

- ``python -m compat.upstream_tests``: ``model_servers/tensorflow_model_server_test.py`` with
  ``python -m serving`` standing in for the ``tensorflow_model_server`` binary, one line per test;
- ``python -m compat.tutorial_client``: ``example/mnist_client.py`` against a version our pipeline
  exported, printing its ``Inference error rate``.

docs/tf-serving-compat.md says what they check and how to read their results.
"""
