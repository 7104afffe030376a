"""jurassiglip: text-guided segmentation with DINOv3 vision and SigLIP2 text tokens.

Importing the package turns off the telemetry of the libraries it drives
(MLflow, Hugging Face): the default pipeline never touches the network, and
MLflow reads its switch when it is first imported, so it must be set here.
"""

import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

__version__ = "0.1.0"
