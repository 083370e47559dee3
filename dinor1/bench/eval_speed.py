"""Evaluation speed: images/s of ``dinor1 eval`` end to end and the share of its time spent
scoring, with pycocotools and with faster-coco-eval, measured in one run on the same
predictions' model and shards (a synthetic val split; a random-init model unless given).

    dinor1 bench eval --num-images 300 [--checkpoint DIR]
"""

from __future__ import annotations

import tempfile
from pathlib import Path


def run_eval_benchmark(*, num_images: int = 300, image_size: int = 128,
                       checkpoint: str | None = None, work_dir: str | None = None,
                       overrides: tuple[str, ...] = ()) -> dict:
    from dinor1.config import load_train_config
    from dinor1.data.prepare import synthesize
    from dinor1.eval.job import evaluate_job
    from dinor1.jobs_index import packaged_job

    work = Path(work_dir or tempfile.mkdtemp(prefix="dinor1-bench-eval-"))
    dirs = synthesize(str(work / "data"), image_size=image_size, num_train=1, num_val=num_images,
                      num_support=64, workers=2)
    if checkpoint is None:
        from dinor1.model.dino_r1 import DinoR1

        checkpoint = str(work / "model")
        DinoR1.from_pretrained("tiny-cpu").save_pretrained(checkpoint)
    job = packaged_job("demo")
    results = {}
    for backend in ("pycocotools", "faster_coco_eval"):
        cfg = load_train_config(job, [
            f"eval.checkpoint={checkpoint}", f"eval.shards={dirs['val']}",
            f"eval.support_shards={dirs['support']}", f"eval.backend={backend}",
            f"eval.out_dir={work / backend}", f"checkpointing.storage_path={work / 'runs'}",
            f"data.eval_short_side={image_size}", f"data.eval_max_size={image_size}",
            *overrides], require_train_shards=False)
        outcome = evaluate_job(cfg, log_mlflow=False)
        results[backend] = {"images_per_s": outcome.images_per_s,
                            "scoring_fraction": outcome.metrics["eval/scoring_fraction"],
                            "AP": outcome.metrics["eval/generic/AP"]}
    print(f"dinor1 eval, {num_images} images of {image_size} px, generic prompts, "
          f"{cfg.eval.num_actors} actor(s):")
    for backend, r in results.items():
        print(f"  {backend:17s} {r['images_per_s']:7.1f} images/s   scoring share "
              f"{r['scoring_fraction']:.2f}   AP {r['AP']:.4f}")
    ratio = results["faster_coco_eval"]["images_per_s"] / results["pycocotools"]["images_per_s"]
    print(f"  faster-coco-eval / pycocotools images/s: {ratio:.2f}")
    return results
