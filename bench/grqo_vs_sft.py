"""GRQO vs SFT at equal steps, over several seeds (a benchmark, not a test).

For each seed: the demo's SFT prefix, then an SFT branch and a GRQO branch from its checkpoint
(dinor1/demo.py), each evaluated with generic visual prompts on the synthetic val split. Prints
per-seed AP/AP50 on seen and novel classes, their mean and std per recipe, and GRQO - SFT.

    python bench/grqo_vs_sft.py                     # 3 seeds, the demo's recipe (~25 min, 2 CPUs)
    python bench/grqo_vs_sft.py --seeds 0 1 --prefix-epochs 2 --branch-epochs 1 grqo.alpha=0.1
    python bench/grqo_vs_sft.py --variant pg grqo.form=policy_gradient --variant a1 grqo.alpha=1

Extra ``key=value`` arguments override jobs/demo.yaml for every run (both recipes). Each
``--variant NAME key=value[,key=value...]`` adds one more GRQO branch from the same SFT prefix
(so variants cost one branch each, not a whole comparison) and is reported against SFT too.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


KEYS = ("AP", "AP50", "seen/AP", "seen/AP50", "novel/AP", "novel/AP50")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--prefix-epochs", type=int, default=3)
    parser.add_argument("--branch-epochs", type=int, default=2)
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--variant", nargs=2, action="append", default=[],
                        metavar=("NAME", "KEY=VALUE[,...]"),
                        help="an extra GRQO branch with these overrides")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from dinor1.data.prepare import synthesize
    from dinor1.demo import run_recipes

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="dinor1-grqo-vs-sft-"))
    shards = synthesize(str(work), num_train=args.num_train, num_val=200, num_support=100,
                        workers=os.cpu_count() or 1)
    started = time.time()
    variants = {name: tuple(spec.split(",")) for name, spec in args.variant}
    results = []
    for seed in args.seeds:
        results.append(run_recipes(shards, work / "runs", seed=seed,
                                   prefix_epochs=args.prefix_epochs,
                                   branch_epochs=args.branch_epochs,
                                   overrides=tuple(args.overrides), started=started,
                                   variants=variants))
    print(f"\nGRQO vs SFT: tiny-cpu, {args.prefix_epochs} epochs SFT prefix + "
          f"{args.branch_epochs} epochs per branch, seeds {args.seeds}, overrides "
          f"{args.overrides or 'none'}; {(time.time() - started) / 60:.1f} min")
    for recipe in ["grqo", *variants]:
        label = "GRQO" if recipe == "grqo" else f"GRQO {recipe} ({','.join(variants[recipe])})"
        print(f"\n{label} vs SFT")
        print(f"{'metric':<11} {'seed':>4} {'SFT':>7} {'GRQO':>7} {'GRQO-SFT':>9}")
        for key in KEYS:
            name = f"eval/generic/{key}"
            sft = [r.metrics["sft"][name] for r in results]
            grqo = [r.metrics[recipe][name] for r in results]
            for r, a, b in zip(results, sft, grqo):
                print(f"{key:<11} {r.seed:>4} {a:7.3f} {b:7.3f} {b - a:+9.3f}")
            diff = [b - a for a, b in zip(sft, grqo)]
            print(f"{key:<11} mean {statistics.mean(sft):7.3f} {statistics.mean(grqo):7.3f} "
                  f"{statistics.mean(diff):+9.3f}   (std SFT {spread(sft):.3f}, GRQO "
                  f"{spread(grqo):.3f}, diff {spread(diff):.3f})")
    print(f"MLflow: {results[0].tracking_uri} (experiment {results[0].experiment})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
