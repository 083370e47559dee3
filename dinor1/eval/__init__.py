"""Evaluation: inference over shards, COCO / LVIS / ODinW scoring, reports and artifacts."""
