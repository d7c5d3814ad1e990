"""The explanation server: a FastAPI app over one Explainer and its engine loop (KServe v1, JSON only).

    GET  /v1/models                 [{"name", "ready"}]
    GET  /v1/models/{name}          {"name", "ready"}
    GET  /health                    200 while the loop takes requests, 503 once it is closed
    GET  /metrics                   Prometheus text
    POST /v1/models/{name}:explain  {"instances": [{"text", "method", "target", "options", "return_matrix"}],
                                     "parameters": {"timeout_s", "return_matrix"}}
                                    -> {"model_name", "explanations": [attribution | {"error": ...}, ...]}

Each HTTP request runs on a worker thread as ordinary `Explainer.attribute` calls (instances grouped by
method, options and target), so the work of every in-flight request, from every connection, meets in
the one engine loop and shares its batches; the loop caps what one caller takes of a batch while others
wait. A request's deadline (`timeout_s`) and its client's disconnect cancel its calls (their queued work
leaves the loop). Admission: a request's work is counted in tokens before anything is queued; over
`max_queued_tokens` in flight it is answered 429 at once (413 if it could never fit). Errors are
`{"error": {"type", "message"}}` with a 4xx/5xx status, never a stack trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..jsonable import attribution_json, error_json, strict_json
from ..methods import get, make_options
from ..runtime import scope as call_scope
from .metrics import ServerMetrics

DISCONNECT_POLL_S = 0.05


class Instance(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: StrictStr
    method: StrictStr = "leave_one_out"
    target: StrictInt | StrictStr | None = None
    options: dict = Field(default_factory=dict)
    return_matrix: StrictBool = False


class Parameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    timeout_s: StrictFloat | StrictInt | None = Field(default=None, gt=0)
    return_matrix: StrictBool = False


class ExplainBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    instances: list[Instance] = Field(min_length=1)
    parameters: Parameters = Field(default_factory=Parameters)


class HTTPError(Exception):
    def __init__(self, status: int, kind: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.kind, self.headers = status, kind, headers or {}


class Admission:
    """Tokens of admitted work not yet finished; a request is admitted only if it fits under the bound."""

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self.reserved = 0
        self._lock = threading.Lock()

    def admit(self, tokens: int) -> None:
        if tokens > self.max_tokens:
            raise HTTPError(
                413,
                "RequestTooLarge",
                f"the request needs {tokens} tokens of work; at most {self.max_tokens} are admitted",
            )
        with self._lock:
            if self.reserved + tokens > self.max_tokens:
                message = f"{self.reserved} tokens of work in flight; {tokens} more would pass {self.max_tokens}"
                raise HTTPError(429, "Overloaded", message, {"Retry-After": "1"})
            self.reserved += tokens

    def release(self, tokens: int) -> None:
        with self._lock:
            self.reserved -= tokens


def work_tokens(ex, instance: Instance) -> int:
    """The tokens an instance's work computes (its clean pass and its method's items), or 0 where the
    instance is invalid (it is answered with its error, costing nothing)."""
    try:
        spec = get(instance.method)
        opts = make_options(instance.method, **instance.options)
        p = dataclasses.replace(ex._prepare(0, instance.text, None), target_id=0)  # the size does not depend on it
        if spec.check_text is not None:
            spec.check_text(p, opts)
        return len(p.input_ids) + sum(w.tokens for w in spec.expand(ex.context, p, opts))
    except (ValueError, TypeError):
        return 0


def explain_instances(ex, body: ExplainBody) -> list[dict]:
    """Every instance's answer, in order; instances with equal method, options and target are one call."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, inst in enumerate(body.instances):
        key = (inst.method, json.dumps(strict_json(inst.options), sort_keys=True, default=repr), inst.target)
        groups[key].append(i)
    answers: list[dict | None] = [None] * len(body.instances)
    for (method, _, target), indices in groups.items():
        options = body.instances[indices[0]].options
        try:
            results = ex.attribute([body.instances[i].text for i in indices], method, target=target, **options)
        except (ValueError, TypeError) as err:  # a bad method or option: every instance of the group
            for i in indices:
                answers[i] = error_json(err)
            continue
        for i, result in zip(indices, results, strict=True):
            matrix = body.instances[i].return_matrix or body.parameters.return_matrix
            answers[i] = attribution_json(result, matrix) if result else error_json(result.error)
    return answers


def create_app(
    ex,
    model_name: str,
    *,
    max_queued_tokens: int = 200_000,
    timeout_s: float = 60.0,
    api_key: str | None = None,
    max_body_bytes: int = 1 << 20,
    max_instances: int = 256,
    max_concurrent: int = 64,
    one_at_a_time: bool = False,
):
    """The FastAPI app serving `ex` as `model_name`. `max_concurrent`: requests whose calls wait on
    the loop at once (each holds a thread while it waits; asyncio's default pool of cpu_count + 4
    threads would cap batching across requests at 6 on this 2-core machine); admitted requests beyond
    it wait for a thread. `one_at_a_time`: requests run one after another (no batching across
    requests: the baseline the load benchmark compares with)."""
    if isinstance(max_concurrent, bool) or not isinstance(max_concurrent, int) or max_concurrent < 1:
        raise ValueError(f"max_concurrent must be an int >= 1, got {max_concurrent!r}")
    workers: ThreadPoolExecutor | None = None

    @contextlib.asynccontextmanager
    async def lifespan(app):
        nonlocal workers
        ex.loop.closed = False  # the server owns the loop while it runs (an Explainer may serve again)
        workers = ThreadPoolExecutor(max_workers=max_concurrent, thread_name_prefix="explain")
        yield
        ex.loop.close()  # shutdown: the in-flight requests have finished (uvicorn's graceful period)
        workers.shutdown(wait=True)

    def authenticate(request: Request) -> None:
        """The bearer token, where one is set (not for /health: probes carry none). A dependency, not
        a middleware: Starlette's HTTP middleware hides a client's disconnect from the endpoint."""
        if api_key is not None and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                raise HTTPError(401, "Unauthorized", "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})

    app = FastAPI(
        title="attribution-engine",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=lifespan,
        dependencies=[Depends(authenticate)],
    )
    metrics = ServerMetrics(ex)
    ex.loop.observer = metrics
    admission = Admission(max_queued_tokens)
    serial = threading.Lock() if one_at_a_time else None
    app.state.explainer, app.state.metrics, app.state.admission = ex, metrics, admission

    def error(status: int, kind: str, message: str, headers: dict | None = None):
        return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status, headers=headers)

    @app.exception_handler(HTTPError)
    async def our_error(request, exc):
        return error(exc.status, exc.kind, str(exc), exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        return error(exc.status_code, "HTTPError", str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        return error(422, "ValidationError", str(exc.errors()[0].get("msg", "invalid request")))

    @app.exception_handler(Exception)
    async def internal_error(request, exc):  # never a stack trace in a response
        return error(500, type(exc).__name__, "internal error")

    def model_entry():
        return {"name": model_name, "ready": not ex.loop.closed}

    @app.get("/v1/models")
    async def models():
        return {"models": [model_entry()]}

    @app.get("/v1/models/{name}")
    async def model(name: str):
        if name != model_name:
            return error(404, "ModelNotFound", f"no model {name!r}; this server serves {model_name!r}")
        return model_entry()

    @app.get("/health")
    async def health():
        if ex.loop.closed:
            return error(503, "Unavailable", "the engine loop is closed")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics_text():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.post("/v1/models/{name}:explain")
    async def explain(name: str, request: Request):
        start = time.monotonic()
        try:
            if name != model_name:
                raise HTTPError(404, "ModelNotFound", f"no model {name!r}; this server serves {model_name!r}")
            body = await _read_body(request, max_body_bytes)
            if len(body.instances) > max_instances:
                raise HTTPError(413, "TooManyInstances", f"{len(body.instances)} instances; at most {max_instances}")
            tokens = sum(work_tokens(ex, inst) for inst in body.instances)
            admission.admit(tokens)
        except HTTPError as err:
            metrics.request(_outcome(err.status), time.monotonic() - start)
            return error(err.status, err.kind, str(err), err.headers)
        try:
            seconds = body.parameters.timeout_s or timeout_s
            answers, outcome = await _run_watching_client(request, ex, body, seconds, workers, serial)
        finally:
            admission.release(tokens)
        metrics.request(outcome, time.monotonic() - start, body.instances, answers)
        if outcome == "timeout":
            return error(504, "DeadlineExceeded", f"the request did not finish within {seconds} s; its work was purged")
        if outcome == "cancelled":
            return error(499, "ClientClosedRequest", "the client disconnected")
        return {"model_name": model_name, "explanations": answers}

    return app


def _outcome(status: int) -> str:
    return {429: "overloaded", 504: "timeout"}.get(status, "invalid")


async def _read_body(request, max_body_bytes: int) -> ExplainBody:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
        raise HTTPError(413, "BodyTooLarge", f"the body has {declared} bytes; at most {max_body_bytes}")
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > max_body_bytes:
            raise HTTPError(413, "BodyTooLarge", f"the body has more than {max_body_bytes} bytes")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HTTPError(400, "MalformedJSON", f"the body is not JSON: {err}") from err
    try:
        return ExplainBody.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise HTTPError(422, "ValidationError", f"{where}: {first['msg']}") from err


async def _run_watching_client(request, ex, body: ExplainBody, seconds: float, workers, serial=None):
    """Run the instances on a worker thread under a scope with the deadline; a client that disconnects
    cancels the scope (its queued work leaves the loop). -> (answers, outcome)."""
    scope = call_scope.CallScope(seconds)

    def work():
        with call_scope.using(scope), serial if serial is not None else contextlib.nullcontext():
            return explain_instances(ex, body)

    task = asyncio.get_running_loop().run_in_executor(workers, work)
    while not task.done():
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if not done and await request.is_disconnected():
            scope.cancel()
    try:
        answers = task.result()
    except call_scope.DeadlineExceeded:
        return None, "timeout"
    except call_scope.CallCancelled:
        return None, "cancelled"
    if any("error" in a for a in answers):
        return answers, "ok" if not all("error" in a for a in answers) else "failed"
    return answers, "ok"
