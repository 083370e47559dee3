"""``dinor1 serve``: a detector behind HTTP on Ray Serve.

One deployment, :class:`DetectorServer` (a FastAPI app): each replica holds a
:class:`~dinor1.api.Detector`; requests are checked one by one (a bad one is answered 4xx
without touching the others) and the good ones are batched with ``@serve.batch`` into
:meth:`~dinor1.api.Detector.detect_many` (run off the event loop, so requests keep arriving
while a batch computes).

Routes (``docs/serving.md``):

- ``POST /detect``: JSON (``dinor1.api.request_from_json``: ``image`` in base64, one of
  ``boxes`` [+ ``exemplar``], ``text``, ``prompts: "generic"``) or multipart form data (files
  ``image`` [, ``exemplar``]; fields ``boxes`` (JSON), ``text``, ``prompts``, ``threshold``,
  ``per_prompt``, ``top_k``) -> ``{"detections": [...], "model": ...}``; a bad request -> 400
  (413: too large) with ``{"error": "one line"}``.
- ``GET /healthz``: the replica answers; ``GET /ready``: the model it serves.
"""

# (no `from __future__ import annotations`: FastAPI reads the route parameters' annotations)
import asyncio
import json
import os
import sys
import time

from dinor1.api import TooLarge
from dinor1.errors import UserError

MAX_PIXELS = 40_000_000  # per image (a 6000 x 6000 photo fits)
MAX_BODY_BYTES = 64 * 2**20
APP_NAME = "dinor1"


def _deployment_class():
    """The Serve deployment (built on first use: importing this module imports no Ray)."""
    import python_multipart  # noqa: F401 - FastAPI parses form uploads with it: missing, say so here
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from ray import serve

    app = FastAPI(title="dinor1", docs_url=None, redoc_url=None)

    @serve.deployment(name="DetectorServer")
    @serve.ingress(app)
    class DetectorServer:
        def __init__(self, checkpoint: str, *, tracking_uri: str | None = None,
                     device: str = "auto", max_batch_size: int = 16,
                     batch_wait_ms: float = 5.0, max_pixels: int = MAX_PIXELS,
                     generic_prompts: str | None = None, short_side: int | None = None,
                     max_size: int | None = None):
            from dinor1.api import Detector, _load_prompts
            from dinor1.console import configure, is_verbose

            configure(is_verbose())
            self.detector = Detector.from_pretrained(checkpoint, device=device,
                                                     tracking_uri=tracking_uri,
                                                     short_side=short_side, max_size=max_size)
            self.generic = _load_prompts(generic_prompts) if generic_prompts else None
            self.max_pixels = max_pixels
            self.checkpoint = checkpoint
            self.batched.set_max_batch_size(max_batch_size)
            self.batched.set_batch_wait_timeout_s(batch_wait_ms / 1000)

        @app.get("/healthz")
        def healthz(self) -> dict:
            return {"status": "ok"}

        @app.get("/ready")
        def ready(self) -> dict:
            detector = self.detector
            return {"status": "ready", "model": self.checkpoint, "device": str(detector.device),
                    "pid": os.getpid(),
                    "resolution": [detector.short_side, detector.max_size],
                    "generic_prompts": list(self.generic.names) if self.generic else None}

        @app.post("/detect")
        async def detect(self, request: Request):
            started = time.perf_counter()
            try:
                parsed = await self._parse(request)
            except UserError as exc:
                status = 413 if isinstance(exc, TooLarge) else 400
                return JSONResponse({"error": " ".join(str(exc).split())}, status_code=status)
            detections = await self.batched(parsed)
            return {"detections": detections, "model": self.checkpoint,
                    "seconds": round(time.perf_counter() - started, 4)}

        async def _parse(self, request: Request):
            from dinor1.api import request_from_json

            length = request.headers.get("content-length")
            if length and length.isdigit() and int(length) > MAX_BODY_BYTES:
                raise TooLarge(f"request body of {int(length)} bytes is too large (at most "
                               f"{MAX_BODY_BYTES})")
            kind = request.headers.get("content-type", "")
            if kind.startswith("multipart/form-data"):
                payload = await _form_payload(request)
            else:
                body = await request.body()
                if len(body) > MAX_BODY_BYTES:
                    raise TooLarge(f"request body of {len(body)} bytes is too large")
                try:
                    payload = json.loads(body)
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise UserError(f"the body is not JSON ({exc}); send JSON or multipart "
                                    "form data") from exc
            return request_from_json(self.detector, payload, generic=self.generic,
                                     max_pixels=self.max_pixels)

        @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
        async def batched(self, requests: list) -> list[list[dict]]:
            return await asyncio.get_running_loop().run_in_executor(
                None, self.detector.detect_many, requests)

    return DetectorServer


async def _form_payload(request) -> dict:
    """Multipart form data -> the JSON request's keys (files stay bytes)."""
    form = await request.form()
    payload = {}
    for key, value in form.multi_items():
        if hasattr(value, "read"):  # an uploaded file
            payload[key] = await value.read()
        elif key == "boxes":
            try:
                payload[key] = json.loads(value)
            except json.JSONDecodeError as exc:
                raise UserError(f"boxes: not JSON ({exc})") from exc
        elif key in ("threshold",):
            payload[key] = _number(key, value, float)
        elif key in ("per_prompt", "top_k"):
            payload[key] = _number(key, value, int)
        else:
            payload[key] = value
    return payload


def _number(key: str, value: str, kind):
    try:
        return kind(value)
    except ValueError as exc:
        raise UserError(f"{key}: {value!r} is not a number") from exc


def quiet_serve() -> None:
    """Serve's INFO lines in this process (app deploying, deleting) off unless verbose."""
    import logging

    from dinor1.console import is_verbose

    if not is_verbose():
        logging.getLogger("ray.serve").setLevel(logging.WARNING)


def build_app(checkpoint: str, *, tracking_uri: str | None = None, device: str = "auto",
              replicas: int = 1, min_replicas: int | None = None,
              max_replicas: int | None = None, max_batch_size: int = 16,
              batch_wait_ms: float = 5.0, cpus_per_replica: float = 1.0,
              max_pixels: int = MAX_PIXELS, generic_prompts: str | None = None,
              short_side: int | None = None, max_size: int | None = None):
    """The Serve application (bind it with ``serve.run``)."""
    import ray

    gpus = 1 if device.startswith("cuda") or (
        device == "auto" and ray.is_initialized() and ray.cluster_resources().get("GPU")) else 0
    from dinor1.console import is_verbose

    verbose = is_verbose()
    options = {"ray_actor_options": {"num_cpus": cpus_per_replica, "num_gpus": gpus},
               # (the replicas' INFO logs and access log stay in Ray's log files unless verbose)
               "logging_config": {"log_level": "INFO" if verbose else "WARNING",
                                  "enable_access_log": verbose},
               # a replica handles several requests at once: they are what a batch is made of
               "max_ongoing_requests": max(2 * max_batch_size, 8)}
    if min_replicas is not None or max_replicas is not None:
        options["autoscaling_config"] = {
            "min_replicas": min_replicas or 1, "max_replicas": max_replicas or min_replicas or 1,
            "target_ongoing_requests": max_batch_size}
    else:
        options["num_replicas"] = replicas
    return _deployment_class().options(**options).bind(
        checkpoint, tracking_uri=tracking_uri, device=device, max_batch_size=max_batch_size,
        batch_wait_ms=batch_wait_ms, max_pixels=max_pixels, generic_prompts=generic_prompts,
        short_side=short_side, max_size=max_size)


def serve_forever(args) -> int:
    """``dinor1 serve``: start (or join) Ray, run the app on ``--host:--port``, wait for
    Ctrl-C (or SIGTERM), then take the app down."""
    import signal

    from dinor1.eval.evaluate import resolve_checkpoint
    from dinor1.train.launch import start_or_join_ray

    resolve_checkpoint(args.checkpoint, args.tracking_uri)  # a bad name fails here, in one line
    started_here = start_or_join_ray(args.address)
    from ray import serve

    from dinor1.console import is_verbose

    quiet_serve()

    serve.start(http_options={"host": args.host, "port": args.port},
                logging_config={"log_level": "INFO" if is_verbose() else "WARNING"})
    app = build_app(args.checkpoint, tracking_uri=args.tracking_uri, device=args.device,
                    replicas=args.replicas, min_replicas=args.min_replicas,
                    max_replicas=args.max_replicas, max_batch_size=args.max_batch_size,
                    batch_wait_ms=args.batch_wait_ms, cpus_per_replica=args.cpus_per_replica,
                    generic_prompts=args.generic_prompts, short_side=args.short_side,
                    max_size=args.max_size)
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://{args.host}:{args.port}"
    print(f"[serve] {args.checkpoint} at {url}/detect (health {url}/healthz, {url}/ready); "
          f"Ctrl-C stops it", flush=True)
    print(f"[serve] try: curl -s {url}/detect -F image=@photo.jpg -F 'text=cat . dog'",
          flush=True)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    try:
        while not stopping:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    print("[serve] stopping", file=sys.stderr, flush=True)
    serve.delete(APP_NAME)
    if started_here:
        serve.shutdown()
        import ray

        ray.shutdown()
    return 0
