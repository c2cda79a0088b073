"""Any OpenAI-compatible `/v1/chat/completions` endpoint: a vLLM server (`vllm serve ...`) or a hosted API.

Requests of a batch run on a thread pool of `concurrency` workers (that bounds the requests in
flight), each with `timeout_s` per connect/read. 429, 5xx, timeouts, dropped connections and
unreadable bodies are retried up to `http_retries` times with exponential backoff and full jitter,
honouring Retry-After; any other 4xx is final at once (retrying a bad request cannot help). A request
that still fails becomes a result with finish_reason "error" and a readable `error`; only a server
that cannot be reached at all for a whole batch raises EngineError.

The API key is read from the environment variable named by `api_key_env` at each request and sent as
a Bearer token. It is never stored on the engine (so it is in no repr or pickle), and every error
text is passed through a redaction before it leaves this module: of the key, and of any bearer token
or Authorization / api-key value a server echoes back (even a piece of one), always before a body is
cut short for the message. Ray/Beam workers need
that variable in their own environment (e.g. Ray `runtime_env={"env_vars": ...}`).

Message contents are data. The server renders them with its model's chat template and tokenizes the
result with special tokens on, so item text holding `<|im_end|><|im_start|>system` would open a turn
there exactly as it would in the transformers and vLLM engines. Those engines defuse the strings their
tokenizer treats as special (`defuse_special_tokens`); the server's tokenizer cannot be read from
here, so this engine defuses, the same way, every chat-template marker of the common model families
(`CHAT_TEMPLATE_MARKERS`) and anything shaped like one (`<|...|>`, `<｜...｜>`).
"""

from __future__ import annotations

import email.utils
import json
import logging
import os
import random
import re
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from recaug.core.config import EngineConfig
from recaug.pipelines.engines.base import FINISH_ERROR, FINISH_LENGTH, FINISH_STOP, Engine, EngineError, GenerationRequest, GenerationResult, defuse_special_tokens, finish_at_sentences

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({408, 409, 425, 429}) | frozenset(range(500, 600))
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 30.0
RETRY_AFTER_CAP_S = 120.0  # a server asking for longer than this is treated as down for this attempt
_ERROR_BODY_CHARS = 300
_SCHEMA_NAME = re.compile(r"[^A-Za-z0-9_-]+")
# an echoed credential: "Bearer <token>", or the value after an Authorization / api-key name
_CREDENTIAL = re.compile(
    r"(?i)(\b(?:proxy-)?(?:authorization|x-api-key|api[-_]key)[\"']?\s*[:=]\s*[\"']?(?:(?:bearer|basic|token)\s+)?"
    r"|\bbearer\s+)(?!\[REDACTED\]|(?:bearer|basic|token)\b)[^\s\"',;}<>]{6,}"
)
_SECRET_WORDS = frozenset({"key", "apikey", "token", "accesstoken", "secret", "password", "passwd", "pwd", "sig",
                           "signature", "auth", "authorization", "credential", "credentials"})
_LIFECYCLE_LOCK = threading.Lock()  # load() / close() of any engine in this process
sleep = time.sleep  # module-level so tests can record the backoff instead of waiting it out

# Chat-template markers that a served model's tokenizer reads as control tokens wherever they appear:
# ChatML (Qwen, SmolLM, ...), Llama 2/3, Mistral, Gemma, Phi, DeepSeek, harmony, generic BOS/EOS/PAD.
# Markers shaped like <|...|> or <｜...｜> (fullwidth bars) are found in the text whatever their name.
CHAT_TEMPLATE_MARKERS = (
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
    "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>",
    "<s>", "</s>", "<unk>", "<pad>", "<bos>", "<eos>", "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>",
    "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]",
    "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "<start_of_turn>", "<end_of_turn>", "<think>", "</think>",
    "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
)
_MARKER_SHAPES = re.compile(r"<\|[^\s|<>]{1,64}\|>|<｜[^\s｜<>]{1,64}｜>")


def chat_template_markers(messages) -> tuple[str, ...]:
    """The markers to defuse in these messages: the known ones and every `<|...|>`-shaped string in
    them, longest first (as `special_token_texts` orders a tokenizer's)."""
    found = set(CHAT_TEMPLATE_MARKERS)
    for m in messages:
        found.update(_MARKER_SHAPES.findall(m.get("content", "") or ""))
    return tuple(sorted(found, key=lambda t: (-len(t), t)))


def chat_completions_url(base_url: str) -> str:
    """`http://host:8000`, `.../v1` or the full `.../v1/chat/completions` all work."""
    url = base_url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    if url.endswith("/v1"):
        return url + "/chat/completions"
    return url + "/v1/chat/completions"


def url_credential(url: str) -> str | None:
    """What in a URL looks like a credential (user:password@, a key or token query parameter), or None."""
    parts = urllib.parse.urlsplit(url)
    if parts.username or parts.password:
        return "user:password@ before the host"
    for name, _ in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        words = re.split(r"[-_.]", name.lower())
        if _SECRET_WORDS.intersection(words + ["".join(words)]):
            return f"the query parameter {name!r}"
    return None


def response_format(schema: dict[str, Any]) -> dict[str, Any]:
    """OpenAI structured outputs (also what vLLM's server accepts): a named, strict JSON schema."""
    name = _SCHEMA_NAME.sub("_", str(schema.get("title") or "response")).strip("_")[:64] or "response"
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds (either delta-seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def backoff_delay(retry_number: int, retry_after: float | None = None) -> float:
    """Full-jitter exponential backoff; a server's Retry-After is a floor, not a suggestion."""
    delay = random.uniform(0.0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * (2 ** retry_number)))
    if retry_after is not None:
        delay = max(delay, min(retry_after, RETRY_AFTER_CAP_S))
    return delay


class _Attempt(Exception):
    """One failed attempt: `retryable` says whether another try may succeed."""

    def __init__(self, message: str, retryable: bool, retry_after: float | None = None, unreachable: bool = False):
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after
        self.unreachable = unreachable


class HTTPEngine(Engine):
    kind = "http"
    supports_json_schema = True

    def __init__(self, cfg: EngineConfig):
        if not cfg.base_url:
            raise EngineError(
                "engine.kind 'http' needs engine.base_url, e.g. http://localhost:8000/v1 for `vllm serve` "
                "or https://api.openai.com/v1 for a hosted API"
            )
        credential = url_credential(cfg.base_url)
        if credential:
            raise EngineError(
                f"engine.base_url carries a credential ({credential}); the URL is written to manifests, reports and "
                f"error messages, so put the key in the environment variable named by engine.api_key_env "
                f"(now {cfg.api_key_env!r}) instead: it is sent as a Bearer token"
            )
        self.cfg = cfg
        self.url = chat_completions_url(cfg.base_url)
        # built by load(): the engine a runner ships holds its config only (no sessions, no pool, never a key)
        self._pool: ThreadPoolExecutor | None = None
        self._local: threading.local | None = None  # one requests.Session per worker thread

    def __repr__(self) -> str:
        return f"HTTPEngine(url={self.url!r}, model={self.cfg.model!r}, api_key_env={self.cfg.api_key_env!r})"

    @property
    def model_id(self) -> str:
        return f"{self.cfg.model}@{self.cfg.revision}"

    # --- lifecycle ----------------------------------------------------------------------------------

    def load_model(self) -> Engine:
        return self.loaded_copy()  # pool and sessions live on the copy; this engine stays its config

    def load(self) -> None:
        with _LIFECYCLE_LOCK:
            if self._pool is None:
                self._local = threading.local()
                self._pool = ThreadPoolExecutor(max_workers=self.cfg.concurrency, thread_name_prefix="recaug-http")

    def close(self) -> None:
        with _LIFECYCLE_LOCK:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    def _session(self):
        session = getattr(self._local, "session", None)
        if session is None:
            import requests

            session = requests.Session()
            self._local.session = session
        return session

    # --- secrets ------------------------------------------------------------------------------------

    def _api_key(self) -> str | None:
        if not self.cfg.api_key_env:
            return None
        return os.environ.get(self.cfg.api_key_env) or None

    def _redact(self, text: str) -> str:
        """The key, and any bearer token or Authorization value a server echoes (even a piece of one)."""
        key = self._api_key()
        if key:
            text = text.replace(key, "[REDACTED]")
        return _CREDENTIAL.sub(lambda m: m.group(1) + "[REDACTED]", text)

    # --- generation -----------------------------------------------------------------------------------

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        if not requests:
            return []
        self.load()
        assert self._pool is not None
        outcomes = list(self._pool.map(self._run_one, requests))
        results = [r for r, _ in outcomes]
        if all(unreachable for _, unreachable in outcomes):
            raise EngineError(
                f"cannot reach {self.url} after {self.cfg.http_retries + 1} attempts per request: {results[0].error}; "
                "check engine.base_url and that the server is running"
            )
        return finish_at_sentences(requests, results)

    def body(self, request: GenerationRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.cfg.model,
            # data must stay data on the server too: chat-template markers in contents are defused
            "messages": defuse_special_tokens(request.messages, chat_template_markers(request.messages)),
            "max_tokens": request.max_new_tokens,
            "temperature": self.cfg.temperature,
            "top_p": self.cfg.top_p,
            "seed": self.cfg.seed,
        }
        if request.json_schema is not None:
            body["response_format"] = response_format(request.json_schema)
        return body

    def _run_one(self, request: GenerationRequest) -> tuple[GenerationResult, bool]:
        """(result, unreachable): never raises; the flag says the server could not be reached at all."""
        started = time.perf_counter()
        attempts = self.cfg.http_retries + 1
        failure: _Attempt | None = None
        for attempt in range(attempts):
            try:
                result = self._attempt(request)
                result.latency_s = time.perf_counter() - started
                result.extra["attempts"] = attempt + 1
                return result, False
            except Exception as raised:  # one request's failure is its result, never the batch's exception
                failure = raised if isinstance(raised, _Attempt) else _Attempt(
                    self._redact(f"unexpected {type(raised).__name__}: {raised}"), retryable=False)
                if not failure.retryable or attempt == attempts - 1:
                    break
                delay = backoff_delay(attempt, failure.retry_after)
                log.warning("%s (request %s, attempt %d/%d); retrying in %.1f s",
                            failure, request.key[:12], attempt + 1, attempts, delay)
                sleep(delay)
        assert failure is not None
        tries = attempt + 1
        error = f"{failure} (after {tries} attempt{'s' if tries > 1 else ''})"
        return (
            GenerationResult(request.key, "", 0, 0, FINISH_ERROR, time.perf_counter() - started, error=error,
                             extra={"attempts": tries}),
            failure.unreachable,
        )

    def _attempt(self, request: GenerationRequest) -> GenerationResult:
        import requests

        headers = {"Content-Type": "application/json"}
        key = self._api_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        try:
            resp = self._session().post(self.url, json=self.body(request), headers=headers,
                                        timeout=(self.cfg.timeout_s, self.cfg.timeout_s))
        except requests.Timeout:
            raise _Attempt(f"no answer from {self.url} within {self.cfg.timeout_s:g} s", retryable=True) from None
        except requests.ConnectionError as exc:
            raise _Attempt(self._redact(f"cannot connect to {self.url}: {type(exc).__name__}"), retryable=True,
                           unreachable=True) from None
        except requests.RequestException as exc:
            raise _Attempt(self._redact(f"request to {self.url} failed: {type(exc).__name__}: {exc}"),
                           retryable=False) from None
        if resp.status_code != 200:
            # redact the whole body before cutting it: a cut through the key would leave a piece unredacted
            snippet = self._redact(resp.text).strip()[:_ERROR_BODY_CHARS]
            message = f"HTTP {resp.status_code} from {self.url}: {snippet or resp.reason}"
            retryable = resp.status_code in RETRY_STATUSES
            raise _Attempt(message, retryable=retryable,
                           retry_after=parse_retry_after(resp.headers.get("Retry-After")) if retryable else None)
        return self._parse(request, resp.text)

    def _parse(self, request: GenerationRequest, raw: str) -> GenerationResult:
        try:
            payload = json.loads(raw)
        except ValueError:
            snippet = self._redact(raw).strip()[:80]
            raise _Attempt(f"the response from {self.url} is not JSON (starts with {snippet!r})", retryable=True) from None
        choices = payload.get("choices") if isinstance(payload, dict) else None
        if not choices or not isinstance(choices, list) or not isinstance(choices[0], dict):
            raise _Attempt(f"the response from {self.url} has no choices", retryable=True)
        choice = choices[0]
        content = (choice.get("message") or {}).get("content")
        if content is None:
            raise _Attempt(f"the response from {self.url} has no message content (refusal or tool call?)",
                           retryable=False)
        raw_finish = choice.get("finish_reason")
        usage = payload.get("usage") or {}
        extra: dict[str, Any] = {"finish_reason_raw": raw_finish}
        input_tokens, output_tokens = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if not isinstance(input_tokens, int) or not isinstance(output_tokens, int):
            # a server without usage: estimate, and say so
            input_tokens = sum(self.count_tokens([m.get("content", "") for m in request.messages]))
            output_tokens = self.count_tokens([content])[0] if content else 0
            extra["usage_estimated"] = True
        return GenerationResult(
            key=request.key,
            text=content,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            finish_reason=FINISH_LENGTH if raw_finish == "length" else FINISH_STOP,
            latency_s=0.0,
            extra=extra,
        )
