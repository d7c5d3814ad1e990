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

from ..jsonable import attribution_json, comparison_json, error_json, evaluation_json, strict_json
from ..methods import default_methods, get, make_options
from ..report import compare_with_faithfulness
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


class CallParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    timeout_s: StrictFloat | StrictInt | None = Field(default=None, gt=0)


class Parameters(CallParameters):
    return_matrix: StrictBool = False


class ExplainBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    instances: list[Instance] = Field(min_length=1)
    parameters: Parameters = Field(default_factory=Parameters)


class CompareBody(BaseModel):
    """`:compare`, as `ex.compare` plus the seed's faithfulness at each k the text is long enough for."""

    model_config = ConfigDict(extra="forbid")
    text: StrictStr
    methods: list[StrictStr] | None = Field(default=None, min_length=1)
    target: StrictInt | StrictStr | None = None
    options: dict[str, dict] = Field(default_factory=dict)
    top_k: StrictInt = 3
    k_values: list[StrictInt] = Field(default_factory=lambda: [1, 3, 5])
    parameters: CallParameters = Field(default_factory=CallParameters)


class EvaluateBody(BaseModel):
    """`:evaluate` of one text, as `ex.evaluate` (k may be a fraction of the text's length)."""

    model_config = ConfigDict(extra="forbid")
    text: StrictStr
    methods: list[StrictStr] | None = Field(default=None, min_length=1)
    options: dict[str, dict] = Field(default_factory=dict)
    k_values: list[StrictInt | StrictFloat] = Field(default_factory=lambda: [1, 3, 5])
    curves: StrictBool = True
    curve_steps: StrictInt = 10
    deletion: StrictStr = "replacement"
    protect_target: StrictBool = True
    agreement_k: StrictInt = 3
    parameters: CallParameters = Field(default_factory=CallParameters)


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


def work_tokens(ex, text: str, method: str, options: dict) -> int:
    """The tokens one attribution's work computes (its clean pass and its method's items), or 0 where it
    is invalid (it is answered with its error, costing nothing)."""
    try:
        spec = get(method)
        opts = make_options(method, **options)
        p = dataclasses.replace(ex._prepare(0, text, None), target_id=0)  # the size does not depend on it
        if spec.check_text is not None:
            spec.check_text(p, opts)
        return len(p.input_ids) + sum(w.tokens for w in spec.expand(ex.context, p, opts))
    except (ValueError, TypeError):
        return 0


def _methods_of(body) -> list[str]:
    return list(body.methods) if body.methods is not None else default_methods()


def scoring_tokens(ex, body: CompareBody | EvaluateBody) -> int:
    """The work of `:compare` / `:evaluate`: each method's attribution, then the scoring perturbations
    (two per k, and two curves of curve_steps + 1 points each), every one a sequence of the text's
    length (an upper bound: the clean prefix of each is reused)."""
    methods = _methods_of(body)
    try:
        n = len(ex._prepare(0, body.text, None).input_ids)
    except (ValueError, TypeError):
        return 0
    perturbations = 2 * len(body.k_values) + (2 * (body.curve_steps + 1) if getattr(body, "curves", False) else 0)
    return sum(work_tokens(ex, body.text, m, body.options.get(m, {})) + perturbations * n for m in methods)


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
        # the Explainer is its owner's again: direct calls after the server stopped still run
        ex.loop.closed = False
        if ex.loop.observer is metrics:
            ex.loop.observer = None

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

    async def serve_call(name: str, request: Request, schema, tokens_of, run, methods_of):
        """One POST: 404 for another model, the body read and validated against `schema`, its work
        (`tokens_of(body)`) admitted or refused, then `run(body)` on a worker thread under the
        deadline, watching for the client's disconnect. `run` -> (JSON answer, per-method answers
        for the metrics); a ValueError or TypeError it raises is the request's fault: 422."""
        start = time.monotonic()
        try:
            if name != model_name:
                raise HTTPError(404, "ModelNotFound", f"no model {name!r}; this server serves {model_name!r}")
            body = await _read_body(request, max_body_bytes, schema)
            if isinstance(body, ExplainBody) and len(body.instances) > max_instances:
                raise HTTPError(413, "TooManyInstances", f"{len(body.instances)} instances; at most {max_instances}")
            tokens = tokens_of(body)
            admission.admit(tokens)
        except HTTPError as err:
            metrics.request(_outcome(err.status), time.monotonic() - start)
            return error(err.status, err.kind, str(err), err.headers)
        seconds = body.parameters.timeout_s or timeout_s
        try:
            result, outcome = await _run_watching_client(request, lambda: run(body), seconds, workers, serial)
        except (ValueError, TypeError) as err:
            metrics.request("invalid", time.monotonic() - start, methods_of(body))
            return JSONResponse(error_json(err), status_code=422)
        finally:
            admission.release(tokens)
        answer, per_method = result if result is not None else (None, None)
        if per_method is not None and outcome == "ok":
            if all("error" in a for a in per_method):
                outcome = "failed"
        metrics.request(outcome, time.monotonic() - start, methods_of(body), per_method)
        if outcome == "timeout":
            return error(504, "DeadlineExceeded", f"the request did not finish within {seconds} s; its work was purged")
        if outcome == "cancelled":
            return error(499, "ClientClosedRequest", "the client disconnected")
        return answer

    @app.post("/v1/models/{name}:explain")
    async def explain(name: str, request: Request):
        def run(body):
            answers = explain_instances(ex, body)
            return {"model_name": model_name, "explanations": answers}, answers

        return await serve_call(
            name,
            request,
            ExplainBody,
            lambda body: sum(work_tokens(ex, i.text, i.method, i.options) for i in body.instances),
            run,
            lambda body: [i.method for i in body.instances],
        )

    @app.post("/v1/models/{name}:compare")
    async def compare(name: str, request: Request):
        def run(body):
            comparison, faith = compare_with_faithfulness(
                ex, body.text, _methods_of(body), body.k_values, target=body.target, top_k=body.top_k,
                options=body.options,
            )  # fmt: skip
            return {"model_name": model_name, **comparison_json(comparison, faith)}, [{}] * len(comparison.attributions)

        return await serve_call(name, request, CompareBody, lambda b: scoring_tokens(ex, b), run, _methods_of)

    @app.post("/v1/models/{name}:evaluate")
    async def evaluate(name: str, request: Request):
        def run(body):
            methods = _methods_of(body)
            ev = ex.evaluate(
                body.text, methods, k_values=body.k_values, curves=body.curves, curve_steps=body.curve_steps,
                deletion=body.deletion, protect_target=body.protect_target, agreement_k=body.agreement_k,
                method_options=body.options,
            )  # fmt: skip
            failed = {f.method for f in ev.failures}
            if not ev.per_text:  # every method failed on the text: the request's fault (an empty text, ...)
                first = ev.failures[0].error
                raise ValueError(f"the text could not be evaluated: {first}")
            per_method = [error_json(ValueError(m)) if m in failed else {} for m in methods]
            return {"model_name": model_name, **evaluation_json(ev, methods)}, per_method

        return await serve_call(name, request, EvaluateBody, lambda b: scoring_tokens(ex, b), run, _methods_of)

    return app


def _outcome(status: int) -> str:
    return {429: "overloaded", 504: "timeout"}.get(status, "invalid")


async def _read_body(request, max_body_bytes: int, schema=None):
    schema = schema or ExplainBody
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
        return schema.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise HTTPError(422, "ValidationError", f"{where}: {first['msg']}") from err


async def _run_watching_client(request, work, seconds: float, workers, serial=None):
    """Run `work()` on a worker thread under a scope with the deadline; a client that disconnects
    cancels the scope (its queued work leaves the loop). -> (its result, outcome); None on a timeout
    or a cancel. What else `work` raises propagates."""
    scope = call_scope.CallScope(seconds)

    def scoped():
        with call_scope.using(scope), serial if serial is not None else contextlib.nullcontext():
            return work()

    task = asyncio.get_running_loop().run_in_executor(workers, scoped)
    while not task.done():
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if not done and await request.is_disconnected():
            scope.cancel()
    try:
        return task.result(), "ok"
    except call_scope.DeadlineExceeded:
        return None, "timeout"
    except call_scope.CallCancelled:
        return None, "cancelled"
