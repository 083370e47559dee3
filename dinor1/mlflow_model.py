"""The MLflow model of a dinor1 detector, as MLflow's "models from code" file:
``dinor1/registry.py`` logs it with the model, MLflow runs it when it loads the model (nothing
is pickled). The ``python_function`` flavour: rows of ``request`` (JSON, as the HTTP endpoint
takes) -> rows of ``detections`` (JSON)."""

import json
import warnings

import mlflow

warnings.filterwarnings("ignore", message=".*type hints to the `predict` method",
                        category=UserWarning)  # (JSON strings in and out: nothing to infer)


class DinoR1Detector(mlflow.pyfunc.PythonModel):
    """Loads the model directory (``context.artifacts["model"]``) and any generic prompts."""

    def load_context(self, context):
        from dinor1.api import Detector
        from dinor1.model.prompts import GenericPrompts

        config = context.model_config or {}
        self.detector = Detector.from_pretrained(context.artifacts["model"],
                                                 device=config.get("device", "auto"))
        path = context.artifacts.get("generic_prompts")
        self.generic = GenericPrompts.load(path) if path else None

    def predict(self, context, model_input, params=None):
        import pandas as pd

        from dinor1.api import request_from_json

        rows = model_input["request"] if hasattr(model_input, "columns") else model_input
        max_pixels = (params or {}).get("max_pixels")
        requests = [request_from_json(self.detector, json.loads(row) if isinstance(row, str)
                                      else row, generic=self.generic, max_pixels=max_pixels)
                    for row in list(rows)]
        found = self.detector.detect_many(requests)
        return pd.DataFrame({"detections": [json.dumps(d) for d in found]})


mlflow.models.set_model(DinoR1Detector())
