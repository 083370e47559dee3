"""Serving speed: ``dinor1 serve``'s latency (p50/p99) and images/s at 1, 4 and 16 concurrent
HTTP clients, and the ratio of served images/s to the same model's batched forward in one
process (``Detector.detect_many`` on batches of ``--max-batch-size``), measured in one run on
one model (a random-init tiny-cpu unless given) and one image size.

    dinor1 bench serve [--checkpoint DIR] [--image-size 128] [--requests 64]
"""

from __future__ import annotations

import base64
import io
import statistics
import tempfile
import threading
import time
from pathlib import Path


def _image(size: int, seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _load(url: str, payloads: list[dict], count: int, per_client: int
          ) -> tuple[list[float], float]:
    """``count`` clients, each sending ``per_client`` requests one after another: the latency
    of each, and the seconds for all."""
    import requests

    latencies: list[float] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        with requests.Session() as session:
            for i in range(per_client):
                sent = time.perf_counter()
                session.post(url, json=payloads[(index + i) % len(payloads)],
                             timeout=300).raise_for_status()
                with lock:
                    latencies.append(time.perf_counter() - sent)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(count)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, time.perf_counter() - started


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run_serve_benchmark(*, checkpoint: str | None = None, image_size: int = 128,
                        requests_per_level: int = 64, clients: tuple[int, ...] = (1, 4, 16),
                        max_batch_size: int = 16, batch_wait_ms: float = 5.0,
                        work_dir: str | None = None) -> dict:
    import requests
    import torch
    from ray import serve

    from dinor1.api import Detector
    from dinor1.local_cluster import free_port
    from dinor1.serve import APP_NAME, build_app, quiet_serve
    from dinor1.train.launch import start_or_join_ray

    work = Path(work_dir or tempfile.mkdtemp(prefix="dinor1-bench-serve-"))
    if checkpoint is None:
        from dinor1.model.dino_r1 import DinoR1

        torch.manual_seed(0)
        checkpoint = str(work / "model")
        DinoR1.from_pretrained("tiny-cpu").save_pretrained(checkpoint)
    images = [_image(image_size, seed) for seed in range(8)]
    payloads = [{"image": base64.b64encode(image).decode(), "text": "circle . square"}
                for image in images]

    # the same model, batched, in this process (the ceiling serving is compared with)
    detector = Detector.from_pretrained(checkpoint, device="cpu", short_side=image_size,
                                        max_size=image_size)
    batch = [detector.request(image, text="circle . square") for image in images]
    batch = (batch * (max_batch_size // len(batch) + 1))[:max_batch_size]
    detector.detect_many(batch)  # warm-up
    rounds = max(2, requests_per_level // max_batch_size)
    started = time.perf_counter()
    for _ in range(rounds):
        detector.detect_many(batch)
    direct = rounds * len(batch) / (time.perf_counter() - started)
    del detector

    started_here = start_or_join_ray(None)
    quiet_serve()
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port},
                logging_config={"log_level": "WARNING"})
    # the replica may use every core, as the direct forward did (Ray gives an actor as many
    # torch threads as CPUs it asked for)
    serve.run(build_app(checkpoint, device="cpu", max_batch_size=max_batch_size,
                        batch_wait_ms=batch_wait_ms, cpus_per_replica=float(_cores()),
                        short_side=image_size, max_size=image_size),
              name=APP_NAME, route_prefix="/")
    url = f"http://127.0.0.1:{port}/detect"
    results = {"direct_images_per_s": direct, "levels": {}}
    try:
        with requests.Session() as session:  # warm-up
            for payload in payloads:
                session.post(url, json=payload, timeout=120).raise_for_status()
        for count in clients:
            latencies, seconds = _load(url, payloads, count, max(1, requests_per_level // count))
            level = {"images_per_s": len(latencies) / seconds,
                     "p50_ms": 1000 * statistics.median(latencies),
                     "p99_ms": 1000 * _percentile(latencies, 0.99),
                     "requests": len(latencies)}
            level["ratio_to_direct"] = level["images_per_s"] / direct
            results["levels"][count] = level
    finally:
        serve.delete(APP_NAME)
        if started_here:
            serve.shutdown()
            import ray

            ray.shutdown()
    print(f"[bench serve] {checkpoint}, {image_size} px images, text prompts, max batch "
          f"{max_batch_size}, one replica ({_cores()} CPUs) on a {_cores()}-core machine")
    print(f"  direct detect_many in one process: {direct:.1f} images/s")
    print("  clients  images/s  p50 ms  p99 ms  served/direct")
    for count, level in results["levels"].items():
        print(f"  {count:>7}  {level['images_per_s']:>8.1f}  {level['p50_ms']:>6.0f}  "
              f"{level['p99_ms']:>6.0f}  {level['ratio_to_direct']:>13.2f}")
    return results


def _cores() -> int:
    import os

    return os.cpu_count() or 1
