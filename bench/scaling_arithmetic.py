"""Memory, FLOP and communication arithmetic behind README "Scaling out".

    python bench/scaling_arithmetic.py                # all of it (~30 s on a 2-core CPU)
    python bench/scaling_arithmetic.py --no-measure   # skip the real tiny-cpu steps on this CPU

Nothing here runs on a GPU. What each number is:

* parameters - COUNTED on the models the training loop builds (``dinor1.train.engine.build_model``,
  the same preset, prompt-encoder FFN size and freezing), built on the ``meta`` device (no weights
  are allocated).
* which parameters get a gradient - MEASURED with one real tiny-cpu training step (SFT) on this
  CPU; the module prefixes found there are applied to the large presets (same module tree).
* reference model - what ``dinor1.objectives.reference.ReferenceModel`` holds: a full copy of
  the policy built by ``type(policy)(config, settings)`` (default dtype fp32), on every worker,
  never partitioned. The parameters its forward actually uses are measured on ``meta``.
* activations - TRACED: the bytes of every tensor autograd saves for backward in one forward
  pass of the model at 800x1333 (saved_tensors_hooks on the ``meta`` device: an exact count for
  this code, no compute). Transient buffers are not in it. Checked against the same trace on
  real CPU tensors, and against the peak live allocations (torch.profiler, profile_memory) of
  real tiny-cpu SFT and GRQO steps on this CPU, whose peak/saved ratio sizes section 5.
* FLOPs - COUNTED by ``torch.utils.flop_counter`` over the same trace (matmul, conv, attention;
  grid_sample, elementwise ops and the Hungarian matcher are not counted: a lower bound).
* model states per worker - ARITHMETIC: textbook ZeRO (2+2+12 bytes per parameter in bf16,
  4+4+8 in fp32) and "as run": what DeepSpeed 0.19.8 allocates for the DeepSpeed config that
  ``dinor1.train.optim.deepspeed_config`` generates (read from DeepSpeed's source; the 5e8-element
  gradient bucket and ZeRO-3 keeping gathered weights until backward were checked on CPU with
  tiny-cpu, 1-2 gloo processes).
* communication and step time - ARITHMETIC (ring collectives) at stated bandwidths, next to a
  compute time ESTIMATED from the counted FLOPs at an assumed GPU throughput.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from scaling_trace import (
    BOXES,
    IMAGE,
    PROMPTS,
    build,
    count_parameters,
    measure_cpu,
    no_gradient_prefixes,
    trace,
)

GiB = 2**30
PRESETS = ("tiny-cpu", "swin-t", "swin-b", "swin-l")
BIG = ("swin-t", "swin-b", "swin-l")
WORKERS = (1, 8, 16, 64)
BUCKET = 500_000_000  # DeepSpeed's default reduce_bucket_size (elements); our config keeps it
LINKS_GBPS = (100, 400, 3200)  # per-node network: 100 Gb/s, 400 Gb/s (EFA-class), 3.2 Tb/s
GPU_MEMORY_GB = (40, 80, 141)  # A100-40GB, A100/H100-80GB, H200
# H100 SXM dense peaks (vendor figures). fp32: the project never enables TF32, and PyTorch's
# default keeps fp32 matmuls off the tensor cores, so fp32 runs at the plain FP32 peak.
PEAK_TFLOPS = {"bf16": 989.0, "fp32": 67.0}
MFU = (0.05, 0.30)  # assumed range of model-FLOP utilisation (NOT measured; see section 3)
BATCH_PER_GPU = 4  # data.batch_size in jobs/grqo.yaml
MEASURE_IMAGE = (384, 640)  # the real tiny-cpu steps on this CPU (kept small: seconds)
CPU_FP32_GFLOPS = 146.0  # 2-thread fp32 matmul on this machine (/work/shared/STACK_NOTES.md)


# ---------------------------------------------------------------------------- ZeRO arithmetic
def model_states(p: dict, precision: str, stage: int, n: int, as_run: bool) -> dict[str, float]:
    """Bytes per worker of weights, gradients, fp32 master weights, AdamW m+v, the DeepSpeed
    gradient bucket and GRQO's reference model.

    Textbook ZeRO: bf16 = 2 (weights) + 2 (grads) + 4 (fp32 master) + 8 (m, v) bytes per
    parameter; stage 1 partitions master + m + v, stage 2 also the grads, stage 3 everything.
    fp32 = 4 + 4 + 8 (the weights are the master copy).

    ``as_run`` adds what DeepSpeed 0.19.8 does with our generated config (no bucket sizes set):
    ZeRO-1/2 allocate a reduce bucket of 5e8 elements in the model dtype during backward and in
    fp32 keep a separate fp32 clone of their optimiser partition; ZeRO-3 keeps gathered
    parameters from forward to backward (stage3_max_reuse_distance 1e9 > model size), so its
    peak holds the whole model's weights.
    """
    total, train = p["total"], p["trainable"]
    w = 2 if precision == "bf16" else 4
    parts = {"weights": w * total, "grads": w * train,
             "fp32 master": 4 * train if precision == "bf16" else 0,
             "AdamW m+v": 8 * train, "DS bucket": 0,
             "reference (fp32)": 4 * total + p["buffer_bytes"]}
    if stage >= 1:
        parts["fp32 master"] /= n
        parts["AdamW m+v"] /= n
    if stage >= 2:
        parts["grads"] /= n
    if stage == 3:
        parts["weights"] /= n
    if as_run:
        if stage in (1, 2):
            parts["DS bucket"] = BUCKET * w
            if precision == "fp32":
                parts["fp32 master"] = 4 * train / n
        if stage == 3:
            parts["weights"] = w * total  # peak: gathered from forward until backward
    return parts


def comm_bytes(params: int, precision: str, stage: int, n: int) -> float:
    """Bytes each worker sends (= receives) per optimiser step, ring collectives:
    ZeRO-0/1/2 ~ 2 x P x (N-1)/N elements (all-reduce, or reduce-scatter of gradients plus
    all-gather of updated weights); ZeRO-3 ~ 3 x P x (N-1)/N (weights all-gathered in forward
    and again in backward, gradients reduce-scattered). Element size: the model dtype
    (DeepSpeed communicates in bf16 when bf16 is on)."""
    w = 2 if precision == "bf16" else 4
    return (3 if stage == 3 else 2) * params * w * (n - 1) / n


# -------------------------------------------------------------------------------------- main
def fmt_m(x: float) -> str:
    return f"{x / 1e6:7.1f} M"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-measure", action="store_true",
                    help="skip the real tiny-cpu SFT/GRQO steps on this CPU")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(1)  # tracing on meta does no arithmetic

    print("# dinor1 scaling arithmetic (bench/scaling_arithmetic.py)")
    print(f"torch {torch.__version__}; every number below is COUNTED, TRACED, MEASURED (on this "
          "CPU) or ARITHMETIC, as labelled; nothing was run on a GPU.\n")

    # --- parameters
    prefixes = no_gradient_prefixes()
    print("## 1. Parameters (COUNTED on meta-device models built by the training loop)")
    print("MEASURED (real tiny-cpu SFT step, visual prompts): trainable parameters with no "
          "gradient: " + ", ".join(f"{k} ({v:,})" for k, v in sorted(prefixes.items())))
    counts = {}
    print(f"\n{'preset':9} {'total':>10} {'trainable':>10} {'no grad*':>10} {'with grad':>10} "
          f"{'of which':>10} {'backbone':>10} {'VPE':>9}")
    print(f"{'':9} {'':>10} {'':>10} {'':>10} {'':>10} {'BERT':>10}")
    for preset in PRESETS:
        c = counts[preset] = count_parameters(build(preset), prefixes)
        print(f"{preset:9} {fmt_m(c['total']):>10} {fmt_m(c['trainable']):>10} "
              f"{fmt_m(c['no_grad']):>10} {fmt_m(c['with_grad']):>10} "
              f"{fmt_m(c['text_encoder']):>10} {fmt_m(c['backbone']):>10} {fmt_m(c['vpe']):>9}")
    print("* trainable (requires_grad) but never reached by the loss in visual-prompt training: "
          "the text encoder (BERT) and its projection. They still take gradient buffers, "
          "optimiser state and all-gather traffic under DeepSpeed.")

    # --- activations and FLOPs
    print(f"\n## 2. Activations and FLOPs per image at {IMAGE[0]}x{IMAGE[1]} (TRACED on meta)")
    print(f"Training forward of one batch: {PROMPTS} visual prompts, {BOXES} GT boxes per image, "
          "CDN on (num_dn_queries 100), 900 queries, 6+6 layers (the presets' sizes).")
    traces = {}
    for preset in BIG:
        traces[preset] = {"fp32": trace(preset, torch.float32),
                          "bf16": trace(preset, torch.bfloat16, flops=False)}
    header = f"{'preset':8} {'phase':48} {'fp32 GiB':>9} {'bf16 GiB':>9}"
    print(header)
    for preset in BIG:
        t32, t16 = traces[preset]["fp32"], traces[preset]["bf16"]
        for (name, b32), (_, b16) in zip(t32["phases"], t16["phases"]):
            print(f"{preset:8} {name:48} {b32 / GiB:9.2f} {b16 / GiB:9.2f}")
        print(f"{preset:8} {'TOTAL saved for backward, per image':48} "
              f"{t32['saved_per_image'] / GiB:9.2f} {t16['saved_per_image'] / GiB:9.2f}")
    print(f"\n{'preset':8} {'fwd TFLOP':>10} {'fwd+bwd':>9} {'+GRQO ref fwd':>14} "
          f"{'ref uses params':>16} {'ref holds':>10}")
    for preset in BIG:
        t = traces[preset]["fp32"]
        step = t["fwd_flops"] + t["bwd_flops"]
        print(f"{preset:8} {t['fwd_flops'] / 1e12:10.2f} {step / 1e12:9.2f} "
              f"{(step + t['ref_fwd_flops']) / 1e12:14.2f} {fmt_m(t['ref_params_used']):>16} "
              f"{fmt_m(counts[preset]['total']):>10}")
    print("FLOPs: matmul/conv/attention only (grid_sample, elementwise, matcher not counted). "
          "'ref uses params': what ReferenceModel's forward (backbone, VPE, feature enhancer, "
          "proposal head) touches; 'ref holds': the full fp32 copy it keeps on every worker.")
    print("bf16 note: the bf16 trace is a bf16-weights model (CDN reference boxes and pixels cast "
          "to bf16); training's deepspeed.precision=bf16 is fp32 weights + torch.autocast "
          "(bf16 activations, fp32 model states), see README 'Scaling out'.")

    factors = {"sft": 1.0, "grqo": 1.0}  # peak / saved-for-backward (1.0 with --no-measure)
    if not args.no_measure:
        h, w = MEASURE_IMAGE
        print(f"\n## 3. Check on this CPU (MEASURED, tiny-cpu, 1 image {h}x{w}, fp32)")
        m = measure_cpu(h, w)
        print(f"forward trace on the meta device {m['forward_trace_meta'] / 2**20:.1f} MiB; the "
              f"same forward on real CPU tensors {m['forward_trace_cpu'] / 2**20:.1f} MiB")
        for stage in ("sft", "grqo"):
            s = m[stage]
            print(f"real {stage:4} step (prompts, CDN, loss, matcher, backward): saved for "
                  f"backward {s['saved_bytes'] / 2**20:6.1f} MiB, peak live allocations "
                  f"{s['peak'] / 2**20:6.1f} MiB = {s['peak'] / s['saved_bytes']:.2f} x saved")
        factors = {k: m[k]["peak"] / m[k]["saved_bytes"] for k in factors}
        rate = m["step_flops"] / m["sft_seconds"] / 1e9
        print(f"SFT step {m['sft_seconds']:.1f} s for {m['step_flops'] / 1e9:.1f} counted GFLOP = "
              f"{rate:.1f} GFLOP/s, {rate / CPU_FP32_GFLOPS:.0%} of this CPU's fp32 matmul rate "
              f"({CPU_FP32_GFLOPS:.0f} GFLOP/s, STACK_NOTES): counted FLOPs are a small part of "
              "this model's work (grid_sample, elementwise, matcher), so FLOP-based step times "
              "below are optimistic. (This machine was shared with another job when measured.)")

    # --- model states
    print("\n## 4. Model states + reference per worker, GiB (ARITHMETIC)")
    print("Each cell: textbook ZeRO / as DeepSpeed 0.19.8 runs our generated config (peak). "
          "Reference = ReferenceModel's full fp32 copy, every worker, every stage (GRQO only).")
    for preset in BIG:
        p = counts[preset]
        print(f"\n{preset}: P = {p['total'] / 1e6:.1f} M, trainable {p['trainable'] / 1e6:.1f} M")
        print(f"{'prec':5} {'ZeRO':4} {'component':18} " + " ".join(f"{'N=' + str(n):>13}"
                                                                   for n in WORKERS))
        for precision in ("bf16", "fp32"):
            for stage in range(4):
                book = [model_states(p, precision, stage, n, False) for n in WORKERS]
                run = [model_states(p, precision, stage, n, True) for n in WORKERS]
                for key in book[0]:
                    if all(b[key] == 0 and r[key] == 0 for b, r in zip(book, run)):
                        continue
                    cells = " ".join(f"{b[key] / GiB:6.2f}/{r[key] / GiB:6.2f}"
                                     for b, r in zip(book, run))
                    print(f"{precision:5} {stage:4} {key:18} {cells}")
                cells = " ".join(f"{sum(b.values()) / GiB:6.2f}/{sum(r.values()) / GiB:6.2f}"
                                 for b, r in zip(book, run))
                print(f"{precision:5} {stage:4} {'TOTAL':18} {cells}")
    print("ZeRO-3 'as run' weights = peak (whole model gathered between forward and backward); at "
          "rest it is the textbook value plus tensors < 1e5 elements, which ZeRO-3 never "
          "partitions: " + ", ".join(f"{k} {counts[k]['zero3_persistent'] / 1e6:.1f} M"
                                     for k in BIG) + ".")

    # --- micro-batch that fits
    print(f"\n## 5. Images per GPU that fit at {IMAGE[0]}x{IMAGE[1]} (ARITHMETIC, ZeRO-2, N=8)")
    print("floor((0.9 x GPU memory - model states as run, peak - reference) / (saved bytes per "
          f"image x peak/saved)); peak/saved = {factors['sft']:.2f} for SFT, "
          f"{factors['grqo']:.2f} for GRQO (the reference's forward runs while the policy's graph "
          "is alive), as measured in section 3 on tiny-cpu (1.00 = not measured). Fragmentation "
          "and other DeepSpeed buffers are not in it: an upper bound; confirm on one GPU. "
          "ZeRO-0/3 change the counts by at most one image here.")
    print(f"{'preset':8} {'prec':5} " + " ".join(f"{str(g) + ' GB SFT/GRQO':>17}"
                                                 for g in GPU_MEMORY_GB))
    for preset in BIG:
        for precision in ("bf16", "fp32"):
            saved = traces[preset][precision]["saved_per_image"]
            fixed = sum(model_states(counts[preset], precision, 2, 8, True).values())
            cells = []
            for gb in GPU_MEMORY_GB:
                fit = [max(0, math.floor((0.9 * gb * 1e9 - fixed) / (saved * factors[k])))
                       for k in ("sft", "grqo")]
                cells.append(f"{fit[0]:>11} / {fit[1]:<3}")
            print(f"{preset:8} {precision:5} " + " ".join(cells))

    # --- communication
    print("\n## 6. Communication per optimiser step per worker (ARITHMETIC, ring collectives)")
    print("Per-node network traffic of a ring over nodes of 8 GPUs ~ the per-GPU volume, so "
          "seconds = bytes / per-node bandwidth. N=8 fits one node (NVLink, not the network).")
    print(f"{'preset':8} {'prec':5} {'ZeRO':6} {'params':>9} {'N':>3} {'GB/step':>8} "
          + " ".join(f"{str(b) + ' Gb/s':>11}" for b in LINKS_GBPS))
    for preset in BIG:
        p = counts[preset]
        for precision in ("bf16", "fp32"):
            for stage, label in ((2, "0/1/2"), (3, "3")):
                for which, params in (("all", p["trainable"]), ("w/ grad", p["with_grad"])):
                    if stage == 3 and which != "all":
                        continue
                    for n in (16, 64):
                        vol = comm_bytes(params, precision, stage, n)
                        secs = " ".join(f"{vol * 8 / (b * 1e9) * 1000:8.0f} ms"
                                        for b in LINKS_GBPS)
                        print(f"{preset:8} {precision:5} {label:6} {which:>9} {n:3} "
                              f"{vol / 1e9:8.2f} {secs}")
    print("'all' = every trainable parameter (as configured); 'w/ grad' = if the text encoder, "
          "which gets no gradient, were frozen (requires_grad False).")

    print("\n## 7. Compute per step and scaling efficiency (ESTIMATE: no GPU here)")
    print(f"t_compute = counted FLOPs of a GRQO step (policy fwd+bwd + reference fwd) x batch "
          f"{BATCH_PER_GPU} at {IMAGE[0]}x{IMAGE[1]} / (H100 peak x MFU); peak "
          f"{PEAK_TFLOPS['bf16']:.0f} TFLOP/s bf16, {PEAK_TFLOPS['fp32']:.0f} fp32 (TF32 off); "
          f"MFU {MFU[0]:.2f}-{MFU[1]:.2f} ASSUMED. Efficiency at N=16 (2 nodes) = t_compute / "
          "(t_compute + t_comm), communication not overlapped (DeepSpeed's default "
          "overlap_comm is off for ZeRO-1/2; on for ZeRO-3, where this is the worst case).")
    print(f"{'preset':8} {'prec':5} {'TFLOP':>6} {'t_compute s':>12} {'ZeRO':>5} "
          + " ".join(f"{'eff ' + str(b) + ' Gb/s':>15}" for b in LINKS_GBPS))
    for preset in BIG:
        t = traces[preset]["fp32"]
        flops = BATCH_PER_GPU * (t["fwd_flops"] + t["bwd_flops"] + t["ref_fwd_flops"])
        for precision in ("bf16", "fp32"):
            fast, slow = (flops / (PEAK_TFLOPS[precision] * 1e12 * m) for m in reversed(MFU))
            for stage in (2, 3):
                vol = comm_bytes(counts[preset]["trainable"], precision, stage, 16)
                effs = []
                for link in LINKS_GBPS:
                    comm = vol * 8 / (link * 1e9)
                    effs.append(f"{fast / (fast + comm):5.0%} -{slow / (slow + comm):5.0%}")
                print(f"{preset:8} {precision:5} {flops / 1e12:6.1f} {fast:5.2f}-{slow:<6.2f} "
                      f"{stage:>5} " + " ".join(f"{e:>15}" for e in effs))
    print("Throughput ~ N x batch / (t_compute + t_comm): near-linear while t_comm << t_compute. "
          "The first efficiency of each range is the fast-GPU (high MFU) case, the worst one.")

    print("\n## 8. Checkpoint size (ARITHMETIC; the byte counts match the files DeepSpeed wrote "
          "for tiny-cpu, ZeRO-0..3, fp32, 2 gloo workers)")
    print("DeepSpeed folder: weights in the model dtype + fp32 master, m, v (12 bytes per "
          "trainable parameter; fp32 ZeRO-0 keeps no master: 8) split over the ranks; plus "
          "reference.safetensors (fp32, 4 bytes per parameter) once GRQO has started.")
    print("ZeRO-3 writes the fp32 partitions only (no separate bf16/fp32 weight file, except "
          "the tensors it never partitions).")
    print(f"{'preset':8} {'bf16 ZeRO-1/2':>14} {'fp32 ZeRO-1/2':>14} {'ZeRO-3':>10} "
          f"{'fp32 ZeRO-0':>12} {'3 kept, bf16 Z2':>16}")
    for preset in BIG:
        p = counts[preset]
        ref = 4 * p["total"]
        bf16 = 2 * p["total"] + 12 * p["trainable"] + ref
        fp32 = 4 * p["total"] + 12 * p["trainable"] + ref
        zero3 = 12 * p["trainable"] + ref
        fp32_z0 = 4 * p["total"] + 8 * p["trainable"] + ref
        print(f"{preset:8} {bf16 / 1e9:11.1f} GB {fp32 / 1e9:11.1f} GB {zero3 / 1e9:7.1f} GB "
              f"{fp32_z0 / 1e9:9.1f} GB {3 * bf16 / 1e9:13.1f} GB")

    print(f"\n(finished in {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
