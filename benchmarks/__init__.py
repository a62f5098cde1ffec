"""Serving benchmarks: ``python -m benchmarks.run`` (all scenarios), ``.paired``, ``.swaps``.

Every benchmark process runs models with the server's TensorFlow settings
(``serving.tf_runtime.import_tensorflow_for_serving``). They are set here, on the package's
import, because that comes before any of its modules imports TensorFlow, whichever is run.
"""

import os

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
