"""Small on-disk datasets built by tests (no downloads)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def write_image(path: Path, width: int, height: int, seed: int, fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def make_coco(root: Path, num_images: int = 8, width: int = 64, height: int = 48,
              categories=((1, "cat"), (2, "dog"), (5, "bird"))) -> tuple[Path, Path, dict]:
    """A clean COCO dataset: images/ + instances.json; every image has 1-3 valid boxes."""
    images, anns = [], []
    rng = np.random.default_rng(0)
    for i in range(1, num_images + 1):
        write_image(root / "images" / f"{i:04d}.jpg", width, height, seed=i)
        images.append({"id": i, "file_name": f"{i:04d}.jpg", "width": width, "height": height})
        for _ in range(1 + i % 3):
            w, h = float(rng.integers(4, 20)), float(rng.integers(4, 20))
            x, y = float(rng.integers(0, width - 20)), float(rng.integers(0, height - 20))
            anns.append({"id": len(anns) + 1, "image_id": i, "bbox": [x, y, w, h],
                         "category_id": int(categories[len(anns) % len(categories)][0]),
                         "iscrowd": 0, "area": w * h})
    data = {"images": images, "annotations": anns,
            "categories": [{"id": c, "name": n} for c, n in categories]}
    ann_path = root / "instances.json"
    ann_path.write_text(json.dumps(data))
    return ann_path, root / "images", data


def read_shard_samples(shard_dir: Path) -> dict[int, dict]:
    """image_id -> sample JSON for every sample in a shard folder (plain tarfile reader)."""
    out = {}
    for shard in sorted(shard_dir.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    sample = json.loads(tar.extractfile(member).read())
                    out[sample["image_id"]] = sample
    return out


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for servers tests start)."""
    from dinor1.local_cluster import free_port as _free_port

    return _free_port()


def wait_http(url: str, seconds: float = 60) -> None:
    """Poll ``url`` until it answers (a server a test started is up) or raise TimeoutError."""
    from dinor1.local_cluster import wait_http as _wait_http

    if not _wait_http(url, seconds):
        raise TimeoutError(url)


def subprocess_env(**extra: str) -> dict:
    """Environment for the project's commands run by tests: this venv first on PATH, loopback
    Ray without auth tokens, no MLflow telemetry or job-execution workers."""
    import os
    import sys
    from pathlib import Path

    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled",
                MLFLOW_DISABLE_TELEMETRY="true", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
                **extra)


def tiny_model(path: Path) -> Path:
    """A random-init tiny-cpu model (seed 0) saved at ``path`` (a ``from_pretrained`` dir)."""
    import torch

    from dinor1.model.dino_r1 import DinoR1

    torch.manual_seed(0)
    DinoR1.from_pretrained("tiny-cpu").save_pretrained(path)
    return path


def synthetic_train_shards(root: Path, num_train: int, samples_per_shard: int) -> Path:
    """``root/shards``: the synthetic dataset's train split (96 px) written as shards."""
    from dinor1.data_pipelines.converters import load_coco
    from dinor1.data_pipelines.shard_writer import write_shards
    from dinor1.data_pipelines.synthetic import SyntheticConfig, generate_synthetic_coco

    ann = generate_synthetic_coco(root / "coco", SyntheticConfig(
        image_size=96, num_train=num_train, num_val=1, num_support=1))["train"]
    write_shards(load_coco(ann, root / "coco" / "images" / "train"), root / "shards",
                 samples_per_shard=samples_per_shard, progress=False)
    return root / "shards"


class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1 (sqlite + artifact folder under ``root``) that a
    test can stop and start again on the same port (an outage). Stopped by PID."""

    def __init__(self, root: Path, port: int | None = None):
        self.root, self.port = Path(root), port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self, seconds: float = 60) -> MlflowServer:
        import subprocess
        import sys

        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
             "--port", str(self.port), "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
             "--artifacts-destination", str(self.root / "server-artifacts"), "--workers", "1"],
            env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_http(f"{self.uri}/health", seconds)
        return self

    def stop(self) -> None:
        import signal

        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the parent stops its workers
            self.proc.wait(timeout=30)
        self.proc = None


def tiny_step_batch(device="cpu") -> dict:
    """A 2-image collated batch (64 px, 3 boxes of 2 categories) for one training step."""
    import torch

    g = torch.Generator().manual_seed(0)
    batch = {
        "pixel_values": torch.randn(2, 3, 64, 64, generator=g),
        "pixel_mask": torch.ones(2, 64, 64, dtype=torch.long),
        "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.2],
                               [0.5, 0.5, 0.4, 0.4]]),
        "class_labels": torch.tensor([4, 9, 9]),
        "num_boxes": torch.tensor([2, 1]),
    }
    return {k: v.to(device) for k, v in batch.items()}


def left_running(pids: list[int]) -> list[str]:
    """What is still running of ``pids`` (zombies aside): pid, status, command line."""
    import psutil

    left = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            if proc.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{pid} {proc.status()} {' '.join(proc.cmdline())[:120]}")
        except psutil.NoSuchProcess:
            pass
    return left
