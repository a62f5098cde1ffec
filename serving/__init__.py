"""A TF Serving-compatible model server (gRPC + REST), see docs/tf-serving-compat.md.

Modules are split like TF Serving. The supervisor process: ``flags`` (command line),
``model_config`` (the model list), ``source`` (versions on disk), ``manager`` (version lifecycle),
``workers`` (the worker processes), ``server`` (wiring). Each worker process: ``worker``,
``routing`` (what it serves), ``servable`` (one loaded version), ``core`` (the data plane both
front ends call), ``jobs`` (event loop or thread pool), ``batching``, ``grpc_frontend`` /
``rest_frontend``. Between them: ``ipc``.
``client`` is the MNIST test client. Importing this package must stay cheap: TensorFlow is
imported lazily.
"""
