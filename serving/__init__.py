"""A TF Serving-compatible model server (gRPC + REST), see docs/tf-serving-compat.md.

Modules are split like TF Serving: ``flags`` (command line), ``source`` (versions on disk),
``servable`` (one loaded version), ``manager`` (version lifecycle), ``core`` (the data plane both
front ends call), ``grpc_frontend`` / ``rest_frontend``, ``server`` (wiring), ``client`` (MNIST
test client). Importing this package must stay cheap: TensorFlow is imported lazily.
"""
