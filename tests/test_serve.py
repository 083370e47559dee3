"""`dinor1 serve models:/NAME@ALIAS` (a model registered in a real `mlflow server`) on a real
local Ray Serve, with real HTTP requests: the detections `dinor1 predict` gives for the run
folder the model came from (JSON and multipart), concurrent clients batched with a corrupt image among
them, bad requests answered 4xx in one line (the replica stays up), and a replica killed by
PID replaced by Serve. One server for the module, stopped by SIGINT; its processes by PID."""

import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests
import torch
import yaml

from dinor1.model.dino_r1 import DinoR1
from dinor1.model.prompts import GenericPrompts
from tests.helpers import MlflowServer, free_port, left_running, subprocess_env, write_image

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    model = DinoR1.from_pretrained("tiny-cpu")
    model.save_pretrained(root / "run" / "final_model")
    (root / "run" / "resolved_config.yaml").write_text(yaml.safe_dump(
        {"data": {"eval_short_side": 96, "eval_max_size": 96}}))
    GenericPrompts(torch.randn(2, model.config.d_model), [3, 5], ["circle", "square"],
                   [1, 1]).save(root / "generic.safetensors")
    for name, (width, height), seed in [("a.jpg", (96, 80), 1), ("b.jpg", (120, 60), 2)]:
        write_image(root / name, width, height, seed=seed)
    return root


@pytest.fixture(scope="module")
def registered(files, tmp_path_factory):
    """The run's final model registered in a real `mlflow server` as served@champion."""
    import mlflow

    from dinor1.registry import log_model

    mlflow_server = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    try:
        client = mlflow.MlflowClient(mlflow_server.uri)
        run = client.create_run(client.create_experiment("serve-test"))
        client.set_terminated(run.info.run_id)
        log_model(str(files / "run" / "final_model"), run_id=run.info.run_id,
                  tracking_uri=mlflow_server.uri, register_as="served", alias="champion",
                  log=lambda line: None)
        yield mlflow_server.uri
    finally:
        mlflow_server.stop()


@pytest.fixture(scope="module")
def server(files, registered):
    """`dinor1 serve models:/served@champion` (the README's flow: train -> register -> serve)."""
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "dinor1"), "serve", "models:/served@champion", "--tracking-uri", registered,
         "--port", str(port), "--generic-prompts", str(files / "generic.safetensors"),
         "--max-batch-size", "8", "--cpus-per-replica", "0.5"],
        env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    lines = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, "".join(lines)[-3000:]
            assert time.monotonic() < deadline, "not ready in 180 s:\n" + "".join(lines)[-3000:]
            try:  # (a busy machine: the proxy may take a while to answer)
                if requests.get(f"{url}/ready", timeout=30).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(1)
        yield url
    finally:
        pids = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)] \
            if proc.poll() is None else []
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert proc.returncode == 0, "".join(lines)[-3000:]
    deadline = time.monotonic() + 30
    while left_running(pids) and time.monotonic() < deadline:
        time.sleep(1)
    assert not left_running(pids)
    out = "".join(lines)
    assert f"[serve] models:/served@champion at {url}/detect" in out and "Traceback" not in out


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def _post(url, payload) -> requests.Response:
    return requests.post(f"{url}/detect", json=payload, timeout=60)


def test_json_and_multipart_give_what_dinor1_predict_gives(server, files, tmp_path):
    from dinor1.cli import main

    out = tmp_path / "p.json"
    assert main(["predict", "--checkpoint", str(files / "run"), "--image", str(files / "a.jpg"),
                 "--box", "10,10,40,30:car", "--box", "5,40,30,78:person", "--json", str(out),
                 "--out", str(tmp_path / "p.png")]) == 0
    expected = [(d["label"], d["score"], d["box_xyxy"])
                for d in json.loads(out.read_text())["detections"]]
    assert expected
    boxes = [[10, 10, 40, 30, "car"], [5, 40, 30, 78, "person"]]
    as_json = _post(server, {"image": _b64(files / "a.jpg"), "boxes": boxes})
    with open(files / "a.jpg", "rb") as image:
        as_form = requests.post(f"{server}/detect", files={"image": image},
                                data={"boxes": json.dumps(boxes)}, timeout=60)
    for response in (as_json, as_form):
        assert response.status_code == 200, response.text
        assert [(d["label"], d["score"], d["box_xyxy"])
                for d in response.json()["detections"]] == expected


def test_every_prompt_mode_over_http(server, files):
    image = _b64(files / "a.jpg")
    for payload, labels in [
            ({"text": "circle . square"}, {"circle", "square"}),
            ({"prompts": "generic"}, {"circle", "square"}),
            ({"boxes": [[100, 5, 119, 59]], "exemplar": _b64(files / "b.jpg")}, {"object"})]:
        response = _post(server, {"image": image, "threshold": 0.0, "top_k": 4, **payload})
        assert response.status_code == 200, response.text
        found = response.json()["detections"]
        assert len(found) == 4 and {d["label"] for d in found} <= labels
    generic = _post(server, {"image": image, "prompts": "generic"}).json()["detections"]
    assert {d["category_id"] for d in generic} <= {3, 5}  # the prompts' own category ids


def test_concurrent_clients_with_a_corrupt_image_among_them(server, files):
    """16 clients at once: 12 good requests (two image sizes, two prompt modes) each get what
    it gets alone; the 4 with a corrupt image get a 400 naming it; nothing else is touched."""
    good = [{"image": _b64(files / name), "text": text, "threshold": 0.0, "top_k": 5}
            for name in ("a.jpg", "b.jpg") for text in ("circle", "square . circle", "x")]
    good += [{"image": _b64(files / "a.jpg"), "boxes": [[5, 5, 30 + i, 40]]} for i in range(6)]
    alone = [_post(server, payload).json()["detections"] for payload in good]
    corrupt = {"image": base64.b64encode(b"\xff\xd8\xff\xe0 not really a jpeg").decode(),
               "text": "circle"}
    payloads = good + [corrupt] * 4
    results: list = [None] * len(payloads)

    def client(i):
        results[i] = _post(server, payloads[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(payloads))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for i, response in enumerate(results[:len(good)]):
        assert response.status_code == 200, response.text
        assert response.json()["detections"] == alone[i]
    for response in results[len(good):]:
        assert response.status_code == 400
        assert response.json()["error"].startswith("image is not a readable image")


def _huge_jpeg() -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8000, 6000)).save(buffer, "JPEG", quality=10)
    return base64.b64encode(buffer.getvalue()).decode()


BAD = [
    ({"image": "bm90IGFuIGltYWdl", "text": "cat"}, 400, "image is not a readable image"),
    ({"image": "%%%", "text": "cat"}, 400, "image: not valid base64"),
    ({"text": "cat"}, 400, "image: missing"),
    ({"image": "A", "boxes": [[1, 1, 500, 5]]}, 400, "lies outside the image"),
    ({"image": "A", "prompts": "everything"}, 400, "prompts: 'everything' is not a prompt mode"),
    ({"image": "A", "text": "cat", "mode": "x"}, 400, "unknown key 'mode'"),
    ({"image": "A"}, 400, "give one prompt mode"),
    ({"image": "A", "text": "cat", "top_k": "many"}, 400, "top_k: 'many' is not a number"),
    ({"image": "A", "boxes": [[1, 2, 3]]}, 400, "box 1 [1, 2, 3]: expected x0,y0,x1,y1"),
    ({"image": "HUGE", "text": "cat"}, 413, "is too large (at most 40000000 pixels)"),
]


def test_bad_requests_are_4xx_in_one_line_and_the_replica_stays(server, files):
    image = _b64(files / "a.jpg")
    before = requests.get(f"{server}/ready", timeout=10).json()["pid"]
    for payload, status, message in BAD:
        payload = dict(payload)
        if payload.get("image") == "A":
            payload["image"] = image
        elif payload.get("image") == "HUGE":
            payload["image"] = _huge_jpeg()
        response = _post(server, payload)
        assert response.status_code == status, (payload.keys(), response.text)
        error = response.json()["error"]
        assert message in error and "\n" not in error, error
    not_json = requests.post(f"{server}/detect", data=b"{not json", timeout=30)
    assert not_json.status_code == 400 and "the body is not JSON" in not_json.json()["error"]
    assert requests.get(f"{server}/ready", timeout=10).json()["pid"] == before
    assert _post(server, {"image": image, "text": "cat"}).status_code == 200


def test_a_killed_replica_is_replaced(server, files):
    pid = requests.get(f"{server}/ready", timeout=10).json()["pid"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while True:
        assert time.monotonic() < deadline, "no new replica within 120 s"
        try:
            response = requests.get(f"{server}/ready", timeout=10)
            if response.status_code == 200 and response.json()["pid"] != pid:
                break
        except requests.RequestException:
            pass
        time.sleep(1)
    response = _post(server, {"image": _b64(files / "a.jpg"), "text": "circle"})
    assert response.status_code == 200 and response.json()["detections"]
