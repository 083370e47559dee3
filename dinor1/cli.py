"""The ``dinor1`` command line. Errors are one line naming the bad key/file; ``--debug`` shows
the traceback."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from dinor1.errors import UserError

VERBOSE_HELP = ("also show what Ray, Ray Data, Ray Train, DeepSpeed, MLflow and transformers "
                "print (their progress bars, INFO logs and warnings), and the resolved config")


def _verbose_flag(parser) -> None:
    """``--verbose`` after the command too (``dinor1 demo --verbose``)."""
    parser.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                        help=VERBOSE_HELP)


def _add_data_commands(sub) -> None:
    data = sub.add_parser("data", help="datasets -> shards, and shard inspection")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")

    synth = dsub.add_parser(
        "synth",
        help="generate the synthetic visual-prompt dataset (COCO format) and its shards",
        description="Writes OUT/coco (images + instances JSON per split: train, val, support) "
        "and, unless --no-shards, OUT/shards/<split> (WebDataset shards + manifest).",
    )
    synth.add_argument("out", help="output folder")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--image-size", type=int, default=128)
    synth.add_argument("--num-train", type=int, default=2000)
    synth.add_argument("--num-val", type=int, default=200)
    synth.add_argument("--num-support", type=int, default=100)
    synth.add_argument("--num-categories", type=int, default=8)
    synth.add_argument("--num-novel", type=int, default=2)
    synth.add_argument("--max-objects", type=int, default=6)
    synth.add_argument("--num-test", type=int, default=0,
                       help="images of a held-out test split like val (default: none)")
    synth.add_argument("--long-tail", type=float, default=0.0, metavar="EXPONENT",
                       help="train class frequency ~ (rank + 1) ** -EXPONENT, categories "
                       "labelled rare/common/frequent for APr/APc/APf (default 0: uniform)")
    synth.add_argument("--num-hard-distractors", type=int, default=0,
                       help="unlabelled objects of a (shape, colour) pair no category has, per "
                       "image at most (default 0)")
    synth.add_argument("--samples-per-shard", type=int, default=500)
    synth.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    synth.add_argument("--no-shards", action="store_true", help="write the COCO dataset only")

    conv = dsub.add_parser(
        "convert",
        help="convert a dataset to WebDataset shards",
        description="Restartable: a second run skips shards already complete (checked against "
        "manifest.json). Bad inputs are skipped or clipped, counted, and reported at the end.",
    )
    conv.add_argument("format", choices=["coco", "objects365", "lvis", "odinw", "odvg"])
    conv.add_argument("--out", required=True, help="output shard folder")
    conv.add_argument("--annotations", help="instances JSON (coco/objects365/lvis) or JSONL (odvg)")
    conv.add_argument("--images", help="folder the image file names are relative to")
    conv.add_argument("--root", help="odinw: the folder holding all ODinW datasets")
    conv.add_argument("--label-map", help="odvg: JSON {label: name} for detection records")
    conv.add_argument("--split", help="split name for the manifest")
    conv.add_argument("--samples-per-shard", type=int, default=1000)
    conv.add_argument("--workers", type=int, default=os.cpu_count() or 1)

    insp = dsub.add_parser(
        "inspect",
        help="counts, checksums, category histogram and a PNG grid of a shard set",
        description="SHARD_DIR may be a local folder or an s3://, gs:// or file:// URI.",
    )
    insp.add_argument("shard_dir")
    insp.add_argument("--grid", help="PNG path for a grid of random samples with boxes drawn "
                      "(default: SHARD_DIR/inspect_grid.png for local folders)")
    insp.add_argument("--samples", type=int, default=16, help="samples in the grid")
    insp.add_argument("--seed", type=int, default=0)
    insp.add_argument("--json", action="store_true", help="print the report as JSON")


def _add_bench_commands(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks that print ratios measured in one run")
    bsub = bench.add_subparsers(dest="bench_command", required=True, metavar="COMMAND")
    data = bsub.add_parser(
        "data",
        help="Ray Data pipeline vs a single-process PIL loop (or, --peer, a torch DataLoader) "
        "over the same shards",
        description="Prints samples/s of both and the ratio per core used; with --peer, the "
        "ray / dataloader ratio.",
    )
    data.add_argument("--shards", help="shard folder (default: a synthetic set made here)")
    data.add_argument("--num-images", type=int, default=2000)
    data.add_argument("--image-size", type=int, default=384)
    data.add_argument("--num-cpus", type=int, default=os.cpu_count() or 1)
    data.add_argument("--batch-size", type=int, default=16)
    data.add_argument("--repeats", type=int, default=2)
    data.add_argument("--work-dir", default=None)
    data.add_argument("--peer", action="store_true",
                      help="compare with a torch DataLoader of --num-cpus worker processes "
                      "reading, decoding and collating the same shards with the same code")
    model = bsub.add_parser("model", help="forward+backward time per step of a model preset")
    model.add_argument("--preset", default="tiny-cpu")
    model.add_argument("--batch-size", type=int, default=4)
    model.add_argument("--image-size", type=int, default=128)
    model.add_argument("--steps", type=int, default=20)
    model.add_argument("--device", default="cpu", help="cpu or cuda")
    model.add_argument("--bf16", action="store_true", help="bf16 autocast (as deepspeed bf16)")
    model.add_argument("--compare", choices=["compile", "channels_last"], default=None,
                       help="also time the same steps with this speed option; print the ratio")
    model.add_argument("--compile-backend", default="inductor")
    steps = bsub.add_parser("train", help="SFT vs GRQO step time and data-wait fraction, one run")
    steps.add_argument("--steps", type=int, default=40, help="steps per stage")
    steps.add_argument("--work-dir", default=None)
    steps.add_argument("overrides", nargs="*", metavar="key=value")
    _add_training_bench_commands(bsub)


def _add_serving_commands(sub) -> None:
    """dinor1 serve and dinor1 export (what comes after training)."""
    srv = sub.add_parser(
        "serve", help="a model behind HTTP on Ray Serve (POST /detect; docs/serving.md)",
        description="Serves CHECKPOINT (a model directory, run folder, preset, or "
        "models:/NAME/VERSION, models:/NAME@ALIAS) until Ctrl-C. Requests are batched.")
    _verbose_flag(srv)
    srv.add_argument("checkpoint")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--replicas", type=int, default=1, help="a fixed number of replicas")
    srv.add_argument("--min-replicas", type=int, default=None,
                     help="with --max-replicas: autoscaling replicas")
    srv.add_argument("--max-replicas", type=int, default=None)
    srv.add_argument("--device", default="auto", help="cpu, cuda, or auto (default)")
    srv.add_argument("--cpus-per-replica", type=float, default=1.0)
    srv.add_argument("--max-batch-size", type=int, default=16)
    srv.add_argument("--batch-wait-ms", type=float, default=5.0,
                     help="how long a batch waits for more requests")
    srv.add_argument("--short-side", type=int, default=None,
                     help="resize images to this short side (default: the training run's "
                     "evaluation resolution, else 800)")
    srv.add_argument("--max-size", type=int, default=None, help="... and at most this long side")
    srv.add_argument("--generic-prompts", default=None,
                     help="a generic prompts file served for prompts: generic")
    srv.add_argument("--tracking-uri", default=None,
                     help="MLflow for models:/ URIs (default: MLFLOW_TRACKING_URI)")
    srv.add_argument("--address", default=None, help="a Ray cluster to join")
    exp = sub.add_parser("export", help="the inference graph as ONNX (dinor1/export.py)")
    esub = exp.add_subparsers(dest="export_command", required=True, metavar="FORMAT")
    onnx = esub.add_parser(
        "onnx", help="image + a fixed number of visual prompt embeddings -> scores, boxes",
        description="Exports the detection graph for a fixed batch, image size and prompt count "
        "with torch's dynamo exporter and checks it with onnxruntime against PyTorch.")
    _verbose_flag(onnx)
    onnx.add_argument("checkpoint", help="model directory, run folder, preset, or models:/...")
    onnx.add_argument("--out", required=True, help="the .onnx file to write")
    onnx.add_argument("--height", type=int, default=800)
    onnx.add_argument("--width", type=int, default=800)
    onnx.add_argument("--prompts", type=int, default=1, help="visual prompts per image")
    onnx.add_argument("--batch", type=int, default=1)
    onnx.add_argument("--no-check", action="store_true", help="skip the onnxruntime check")


def _add_training_bench_commands(bsub) -> None:
    over = bsub.add_parser(
        "overhead", help="Ray Train + DeepSpeed (1 worker) vs a plain PyTorch loop, one run")
    over.add_argument("--steps", type=int, default=40)
    over.add_argument("--image-size", type=int, default=128)
    over.add_argument("--work-dir", default=None)
    over.add_argument("overrides", nargs="*", metavar="key=value")
    ev = bsub.add_parser(
        "eval", help="dinor1 eval images/s and scoring share, pycocotools vs faster-coco-eval")
    ev.add_argument("--num-images", type=int, default=300)
    ev.add_argument("--checkpoint", default=None, help="default: a random-init tiny-cpu model")
    ev.add_argument("--work-dir", default=None)
    ev.add_argument("overrides", nargs="*", metavar="key=value")
    sv = bsub.add_parser(
        "serve", help="dinor1 serve: p50/p99 latency and images/s at 1, 4, 16 clients, and "
        "the ratio to the same model's batched forward in one process")
    sv.add_argument("--checkpoint", default=None, help="default: a random-init tiny-cpu model")
    sv.add_argument("--image-size", type=int, default=128)
    sv.add_argument("--requests", type=int, default=64, help="requests per client count")
    sv.add_argument("--max-batch-size", type=int, default=16)
    sv.add_argument("--work-dir", default=None)
    mem = bsub.add_parser(
        "memory", help="per-worker peak memory and optimizer state, ZeRO-0/2/3 at 2 workers")
    mem.add_argument("--steps", type=int, default=6)
    mem.add_argument("--image-size", type=int, default=128)
    mem.add_argument("--work-dir", default=None)
    mem.add_argument("overrides", nargs="*", metavar="key=value",
                     help="e.g. model.init=swin-t for a model whose optimizer state dominates")


def _add_job_arguments(parser) -> None:
    """JOB, key=value overrides and --address: what every job-running command takes."""
    parser.add_argument("config", metavar="JOB",
                        help="job YAML path (jobs/demo.yaml) or packaged job name (demo, grqo)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--address", default=None,
                        help="Ray cluster address (default: RAY_ADDRESS or a new local Ray)")


def _add_eval_commands(sub) -> None:
    from dinor1.compare import add_compare_parser

    ev = sub.add_parser(
        "eval",
        help="score a checkpoint on evaluation shards (Ray Data batch inference + pycocotools)",
        description="JOB is a job YAML or a packaged job's name; its data and eval sections "
        "apply. checkpoint=PATH is short for eval.checkpoint=PATH (a model directory, a training "
        "run folder, a Hugging Face checkpoint, or a preset). Other overrides are dotted keys, e.g. "
        "eval.prompt_modes=[generic,text] eval.max_images=100. Metrics go to a new MLflow run "
        "linked to the training run; artifacts to eval.out_dir.",
    )
    _add_job_arguments(ev)
    _verbose_flag(ev)
    ev.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    pred = sub.add_parser(
        "predict",
        help="detect prompted objects in one image; writes a PNG and a JSON",
        description="Prompts are boxes (--box, repeatable; in the image itself or in --exemplar)"
        " or class names (--text 'cat . dog'). Boxes sharing a label are averaged into one "
        "prompt.",
    )
    _verbose_flag(pred)
    pred.add_argument("--checkpoint", required=True,
                      help="model directory, training run folder, HF checkpoint, or preset")
    pred.add_argument("--image", required=True)
    pred.add_argument("--box", action="append", default=[], metavar="X0,Y0,X1,Y1[:LABEL]",
                      help="prompt box in pixels of the exemplar image (default: --image)")
    pred.add_argument("--exemplar", help="image the --box prompts are drawn in")
    pred.add_argument("--text", help="class names separated by '.'")
    pred.add_argument("--out", help="PNG path (default: IMAGE_dinor1.png)")
    pred.add_argument("--json", help="JSON path (default: IMAGE_dinor1.json)")
    pred.add_argument("--per-prompt", type=int, default=None, metavar="K",
                      help="keep the K best boxes of each prompt that score at least half "
                      "its best, duplicates (IoU > 0.5 with a better one, or 3/4 inside it) "
                      "left out (the default, K=5)")
    pred.add_argument("--threshold", type=float, default=None, metavar="T",
                      help="keep every box scoring at least T instead (for a model with "
                      "calibrated scores)")
    pred.add_argument("--top-k", type=int, default=100,
                      help="candidate (query, prompt) pairs considered")
    pred.add_argument("--device", default="auto",
                      help="cpu, cuda, cuda:N, or auto (the GPU when there is one)")
    pred.add_argument("--short-side", type=int, default=None,
                      help="resize the image to this short side (default: as the training "
                      "run evaluated, from its resolved_config.yaml; else 800)")
    pred.add_argument("--max-size", type=int, default=None,
                      help="... and at most this long side (default: likewise; else 1333)")
    add_compare_parser(sub)
    _add_sweep_parser(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dinor1",
        description="DINO-R1 (Grounding DINO + visual prompts + GRQO) on Ray, DeepSpeed, MLflow.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_data_commands(sub)
    _add_bench_commands(sub)
    train = sub.add_parser(
        "train",
        help="train DINO-R1 with Ray Train + DeepSpeed, tracked in MLflow",
        description="JOB is a job YAML path or the name of a packaged job (demo, sft, grqo: "
        "the files of jobs/); key=value overrides use dotted keys, "
        "e.g. data.batch_size=8 deepspeed.zero_stage=3. Unknown keys and bad values fail "
        "before anything starts.",
    )
    _add_job_arguments(train)
    _verbose_flag(train)
    train.add_argument("--check", action="store_true",
                       help="validate and print the resolved config, then exit")
    submit = sub.add_parser(
        "submit",
        help="submit a training job to a running Ray cluster (Ray's job API), with the job "
        "file's runtime_env: section as its runtime environment",
        description="Validates JOB and its key=value overrides here, then submits "
        "`python -m dinor1.cli train JOB ...` with the job's runtime_env (working_dir, "
        "env_vars, pip/uv, ...) to the cluster's job API. Relative local paths of the job "
        "(shards, run folder) are made absolute.")
    _add_job_arguments(submit)
    submit.add_argument("--wait", action="store_true",
                        help="follow the job's logs and exit with its status (0 = SUCCEEDED)")
    submit.add_argument("--submission-id", default=None,
                        help="the job's id (default: dinor1-<run name>-<time>)")
    submit.add_argument("--dry-run", action="store_true",
                        help="print the equivalent `ray job submit` command and exit")
    for action in submit._actions:
        if action.dest == "address":
            action.help = ("the cluster's job API, e.g. http://127.0.0.1:8265 (default: "
                           "RAY_API_SERVER_ADDRESS, RAY_ADDRESS, else http://127.0.0.1:8265)")
    _add_eval_commands(sub)
    from dinor1.local_cluster import add_cluster_parser

    add_cluster_parser(sub)
    _add_serving_commands(sub)
    ml = sub.add_parser("mlflow", help="MLflow helpers")
    msub = ml.add_subparsers(dest="mlflow_command", required=True, metavar="COMMAND")
    sync = msub.add_parser(
        "sync", help="send what a training run kept while its MLflow server was unreachable",
        description="PATH is a spool file or a folder of them (a run's mlflow_spool/, named by "
        "the training log when the server was still down at the end).")
    sync.add_argument("path", metavar="PATH")
    sync.add_argument("--tracking-uri", default=None,
                      help="default: the URI the run logged to (stored in the spool file)")
    demo = sub.add_parser(
        "demo",
        help="the embedded default end to end: synthetic data -> shards -> SFT prefix, then "
        "an SFT and a GRQO branch (2 DeepSpeed workers on a local Ray) -> eval -> compare",
    )
    _verbose_flag(demo)
    demo.add_argument("--out", default="demo_output")
    demo.add_argument("--num-train", type=int, default=2000)
    demo.add_argument("overrides", nargs="*", metavar="key=value",
                      help="overrides of jobs/demo.yaml, e.g. stages.max_steps_per_epoch=20")
    return parser


def cmd_data(args) -> int:
    if args.data_command == "synth":
        from dinor1.data.prepare import synthesize

        synthesize(
            args.out,
            seed=args.seed,
            image_size=args.image_size,
            num_train=args.num_train,
            num_val=args.num_val,
            num_support=args.num_support,
            num_categories=args.num_categories,
            num_novel=args.num_novel,
            max_objects=args.max_objects,
            num_test=args.num_test,
            long_tail=args.long_tail,
            num_hard_distractors=args.num_hard_distractors,
            samples_per_shard=args.samples_per_shard,
            workers=args.workers,
            shards=not args.no_shards,
        )
        return 0
    if args.data_command == "convert":
        from dinor1.data.prepare import convert

        convert(args)
        return 0
    from dinor1.data.inspect import format_inspect_report, inspect_shards

    grid = args.grid
    if grid is None and "://" not in args.shard_dir:
        grid = str(Path(args.shard_dir) / "inspect_grid.png")
    report = inspect_shards(args.shard_dir, grid_path=grid, grid_samples=args.samples,
                            seed=args.seed)
    print(json.dumps(report, indent=1) if args.json else format_inspect_report(report))
    return 1 if report["checksum_failures"] else 0


def cmd_bench(args) -> int:
    if args.bench_command == "train":
        from dinor1.bench.train_steps import run_train_benchmark

        run_train_benchmark(steps=args.steps, work_dir=args.work_dir,
                            overrides=tuple(args.overrides))
        return 0
    if args.bench_command in ("overhead", "memory"):
        from dinor1.bench import train_overhead

        run = (train_overhead.run_overhead_benchmark if args.bench_command == "overhead"
               else train_overhead.run_memory_benchmark)
        run(steps=args.steps, image_size=args.image_size, work_dir=args.work_dir,
            overrides=(f"data.train_short_sides=[{args.image_size}]",
                       f"data.train_max_size={args.image_size}", *args.overrides))
        return 0
    if args.bench_command == "eval":
        from dinor1.bench.eval_speed import run_eval_benchmark

        run_eval_benchmark(num_images=args.num_images, checkpoint=args.checkpoint,
                           work_dir=args.work_dir, overrides=tuple(args.overrides))
        return 0
    if args.bench_command == "serve":
        from dinor1.bench.serve_speed import run_serve_benchmark

        run_serve_benchmark(checkpoint=args.checkpoint, image_size=args.image_size,
                            requests_per_level=args.requests, max_batch_size=args.max_batch_size,
                            work_dir=args.work_dir)
        return 0
    if args.bench_command == "model":
        from dinor1.bench.model_step import run_model_benchmark

        run_model_benchmark(preset=args.preset, batch_size=args.batch_size,
                            image_size=args.image_size, steps=args.steps, device=args.device,
                            bf16=args.bf16, compare=args.compare,
                            compile_backend=args.compile_backend)
        return 0
    from dinor1.bench.data_peer import run_peer_benchmark
    from dinor1.bench.data_throughput import DataBenchOptions, run_data_benchmark

    run = run_peer_benchmark if args.peer else run_data_benchmark
    run(DataBenchOptions(shards=args.shards, num_images=args.num_images,
                         image_size=args.image_size, num_cpus=args.num_cpus,
                         batch_size=args.batch_size, repeats=args.repeats,
                         work_dir=args.work_dir))
    return 0


def _add_sweep_parser(sub) -> None:
    """Register ``sweep`` on an argparse subparsers object."""
    sw = sub.add_parser(
        "sweep", help="a Ray Tune search over a job's settings (trials = dinor1 train runs)",
        description="SWEEP is a sweep YAML (see jobs/sweeps/). Trials are training runs under "
        "one MLflow parent run, scored with dinor1 eval; running it again resumes an "
        "interrupted sweep. Then: dinor1 compare --experiment E --sweep NAME.")
    sw.add_argument("sweep", help="the sweep YAML")
    sw.add_argument("--address", default=None,
                    help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    sw.add_argument("overrides", nargs="*", metavar="key=value",
                    help="more overrides of every run of the sweep (e.g. smaller runs)")


def cmd_sweep(args) -> int:
    from dinor1.compare import compare_sweep
    from dinor1.sweep import run_sweep

    outcome = run_sweep(args.sweep, ray_address=args.address,
                        extra_overrides=tuple(args.overrides))
    table = compare_sweep(outcome.experiment, outcome.name, tracking_uri=outcome.tracking_uri,
                          out_dir=outcome.folder / "compare")
    print(table.as_text())
    print(f"\nwrote {table.markdown} and {table.png}")
    print(f"MLflow: run {outcome.name} in experiment {outcome.experiment} at "
          f"{outcome.tracking_uri}")
    return 0 if all(t["status"] != "failed" for t in outcome.trials) else 1


def cmd_train(args) -> int:
    import yaml

    from dinor1.config import load_train_config
    from dinor1.jobs_index import resolve_job

    cfg = load_train_config(resolve_job(args.config), args.overrides)
    if args.check:
        print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        return 0
    from ray.train import TrainingFailedError

    from dinor1.train.launch import run_training

    try:
        result = run_training(cfg, ray_address=args.address)
    except TrainingFailedError as exc:  # the workers' root cause, on one line
        if args.debug:
            raise
        print(f"dinor1: training failed: {str(exc).strip().splitlines()[-1].strip()}",
              file=sys.stderr)
        return 1
    return 0 if result.error is None else 1


def cmd_export(args) -> int:
    from dinor1.eval.evaluate import load_model, resolve_checkpoint
    from dinor1.export import check_onnx, export_onnx, exported_files

    model = load_model(resolve_checkpoint(args.checkpoint))
    shape = {"height": args.height, "width": args.width, "prompts": args.prompts,
             "batch": args.batch}
    path = export_onnx(model, args.out, **shape)
    files, size = exported_files(path)
    print(f"[export] {' + '.join(str(f) for f in files)} ({size / 2**20:.1f} MiB): inputs "
          f"pixel_values "
          f"[{args.batch}, 3, {args.height}, {args.width}], pixel_mask, prompts [{args.batch}, "
          f"{args.prompts}, {model.config.d_model}]; outputs scores, boxes")
    if not args.no_check:
        print(f"[export] onnxruntime vs PyTorch: max |difference| "
              f"{check_onnx(model, path, **shape):.2e}")
    return 0


def cmd_serve(args) -> int:
    from dinor1.serve import serve_forever

    return serve_forever(args)


def cmd_submit(args) -> int:
    from dinor1.submit import submit

    return submit(args)


def cmd_eval(args) -> int:
    from dinor1.config import load_train_config
    from dinor1.jobs_index import resolve_job

    overrides = [f"eval.{o}" if o.startswith("checkpoint=") else o for o in args.overrides]
    cfg = load_train_config(resolve_job(args.config), overrides, require_train_shards=False)
    if args.address:
        import ray

        ray.init(address=args.address, configure_logging=False)
    from dinor1.eval.job import evaluate_job

    outcome = evaluate_job(cfg, log_mlflow=not args.no_mlflow)
    for mode, result in outcome.modes.items():
        print(f"\n== {mode} prompts: {outcome.num_images} images, "
              f"{outcome.num_skipped} skipped ==")
        print(result.score.summary)
        keys = [k for k in result.metrics if k.count("/") >= 3]
        if keys:
            print("  ".join(f"{k.split('/', 2)[2]} {result.metrics[k]:.3f}" for k in keys))
    print(f"\nartifacts: {outcome.out_dir}")
    if outcome.run_id:
        print(f"MLflow run: {outcome.run_id}")
    return 0


def cmd_predict(args) -> int:
    from dinor1.predict import PER_PROMPT, parse_box, predict_image

    if args.threshold is not None and args.per_prompt is not None:
        raise UserError("give --per-prompt or --threshold, not both")
    payload = predict_image(
        args.checkpoint, args.image, boxes=[parse_box(b) for b in args.box],
        exemplar_path=args.exemplar, text=args.text, out_png=args.out, out_json=args.json,
        threshold=args.threshold, top_k=args.top_k,
        per_prompt=PER_PROMPT if args.per_prompt is None else args.per_prompt,
        short_side=args.short_side, max_size=args.max_size, device=args.device)
    for det in payload["detections"]:
        box = ", ".join(f"{v:.1f}" for v in det["box_xyxy"])
        print(f"{det['label']:<20} {det['score']:.3f}  [{box}]")
    rule = (f"score >= {args.threshold}" if args.threshold is not None
            else f"best {payload['per_prompt']} per prompt")
    print(f"{len(payload['detections'])} detections ({rule}); wrote "
          f"{' and '.join(payload['files'])}")
    return 0


def cmd_demo(args) -> int:
    from dinor1.demo import demo

    demo(args.out, num_train=args.num_train, overrides=tuple(args.overrides))
    return 0


def cmd_mlflow(args) -> int:
    from dinor1.train.mlflow_writer import spool_files, sync_spool

    path = Path(args.path).expanduser()
    if not path.exists():
        raise UserError(f"{path}: no such spool file or folder")
    files = spool_files(path)
    if not files:
        print(f"dinor1: nothing to sync in {path}", file=sys.stderr)
    for spool in files:
        try:
            run_id, count = sync_spool(spool, args.tracking_uri)
        except (UserError, ValueError):
            raise
        except Exception as exc:  # noqa: BLE001 - MLflow/requests raise many types
            raise UserError(f"{spool}: not sent ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:300]}); the file is kept") from exc
        print(f"dinor1: {spool.name}: {count} records sent to MLflow run {run_id}",
              file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also follow an option (`train JOB.yaml --address A k=v`), which
    # argparse alone leaves unparsed
    if extra and (not isinstance(getattr(args, "overrides", None), list)
                  or any(e.startswith("-") or "=" not in e for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    from dinor1.console import configure

    configure(verbose=args.verbose)  # before Ray, DeepSpeed or MLflow is imported
    from dinor1.compare import cmd_compare
    from dinor1.local_cluster import cmd_cluster

    handlers = {"data": cmd_data, "bench": cmd_bench, "train": cmd_train, "demo": cmd_demo,
                "submit": cmd_submit,
                "eval": cmd_eval, "predict": cmd_predict, "serve": cmd_serve,
                "export": cmd_export, "compare": cmd_compare, "sweep": cmd_sweep,
                "cluster": cmd_cluster, "mlflow": cmd_mlflow}
    try:
        return handlers[args.command](args)
    except (UserError, FileNotFoundError, ValueError) as exc:
        if args.debug:
            raise
        print(f"dinor1: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dinor1: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
