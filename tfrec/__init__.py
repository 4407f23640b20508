"""tfrec: TensorFlow/Keras search and recommendation models, from raw events to gRPC.

TFRS and hub.KerasLayer need Keras 2 (tf_keras); setting TF_USE_LEGACY_KERAS before
TensorFlow is imported makes `tf.keras` resolve to it everywhere in the process.
"""

import os as _os

_os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

# Native logs TensorFlow's C++ runtime and gRPC print on their own (INFO notes about
# CUDA, CPU features, ...) are noise to a user; both read these only once, when their
# libraries load, so the defaults go here, before any import of them. A value the user
# set wins; QUIET_LOG_ENV_SET names the ones set here, which `tfrec -v` lifts again.
QUIET_LOG_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2", "GRPC_VERBOSITY": "ERROR"}
QUIET_LOG_ENV_SET = tuple(name for name in QUIET_LOG_ENV if name not in _os.environ)
_os.environ.update({name: QUIET_LOG_ENV[name] for name in QUIET_LOG_ENV_SET})

__version__ = "0.1.0"
