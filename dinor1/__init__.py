"""dinor1: DINO-R1 (Grounding DINO + visual prompts + GRQO) on Ray, DeepSpeed and MLflow.

``from dinor1 import Detector``: a trained model as a detector (``dinor1/api.py``); imported on
first use, so that ``import dinor1`` (and the CLI's start) stays light."""

__version__ = "0.1.0"
__all__ = ["Detector", "__version__"]


def __getattr__(name: str):
    if name == "Detector":
        from dinor1.api import Detector

        return Detector
    raise AttributeError(f"module 'dinor1' has no attribute {name!r}")
