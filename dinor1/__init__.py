"""dinor1: DINO-R1 (Grounding DINO + visual prompts + GRQO) on Ray, DeepSpeed and MLflow."""

__version__ = "0.1.0"
