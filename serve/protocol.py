"""OpenAI's request and response shapes, mapped to and from the runtime's.

A request body becomes a `Plan` (prompt token ids, a GenerationConfig, how to answer)
before any response starts, so every bad value gets OpenAI's error JSON and a 4xx
status. An `Answer` turns the Steps of one generation into the response body or
into server-sent-event chunks.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, Callable

from edgellama.runtime.errors import BadArgumentError, ContextOverflowError
from edgellama.runtime.generate import GenerationConfig, Step
from edgellama.runtime.model import Model, make_config

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}  # runtime -> OpenAI
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
# Chat without max_tokens: OpenAI allows the rest of the context, but each generation's
# KV cache is allocated for prompt + max_tokens up front, so the default is capped.
CHAT_DEFAULT_MAX_TOKENS = 2048
MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 16
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class APIError(Exception):
    """An error answered as OpenAI's {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(param: str | None, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass(frozen=True)
class Plan:
    chat: bool  # /v1/chat/completions, else /v1/completions
    prompt_ids: list[int]
    config: GenerationConfig
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with usage
    top_logprobs: int | None  # None: no logprobs; k: the chosen token's and the k most likely


# --- requests -----------------------------------------------------------------------------


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"We could not parse the JSON body of your request ({exc}); send a JSON object") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def plan_chat(body: dict, model: Model, model_id: str) -> Plan:
    check_model(body, model_id)
    messages = _messages(body.get("messages"))
    try:
        ids = model.render_chat(messages)
    except BadArgumentError as exc:
        raise invalid("messages", str(exc)) from None
    logprobs = _bool(body, "logprobs")
    k = _int(body, "top_logprobs", 0, lambda v: 0 <= v <= MAX_TOP_LOGPROBS, f"between 0 and {MAX_TOP_LOGPROBS}")
    if k and not logprobs:
        raise invalid("top_logprobs", "top_logprobs needs logprobs set to true")
    return _plan(True, body, model, ids, "messages", k if logprobs else None, default_max=CHAT_DEFAULT_MAX_TOKENS)


def plan_completion(body: dict, model: Model, model_id: str) -> Plan:
    check_model(body, model_id)
    ids = _prompt_ids(body.get("prompt"), model)
    k = _int(body, "logprobs", None, lambda v: 0 <= v <= MAX_TOP_LOGPROBS, f"between 0 and {MAX_TOP_LOGPROBS}")
    return _plan(False, body, model, ids, "prompt", k, default_max=COMPLETION_DEFAULT_MAX_TOKENS)


def check_model(body: dict, model_id: str) -> None:
    """`model` may be left out (one model is served); if given, it must name it."""
    name = body.get("model")
    if name is not None and name != model_id:
        raise APIError(404, f"The model {name!r} does not exist; this server serves {model_id!r}",
                       param="model", code="model_not_found")


def _plan(chat: bool, body: dict, model: Model, ids: list[int], prompt_param: str,
          top_logprobs: int | None, default_max: int) -> Plan:
    _reject_unsupported(body)
    max_new = _max_new(body, model, len(ids), prompt_param, default_max)
    stream = _bool(body, "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise invalid("stream_options", "stream_options must be an object")
    try:
        config = make_config(max_new_tokens=max_new, stop=_stops(body.get("stop")),
                             show_probs=0 if top_logprobs is None else max(1, top_logprobs), **_sampling(body))
    except BadArgumentError as exc:  # whatever the runtime checks beyond the ranges below
        raise invalid(None, str(exc)) from None
    include_usage = stream and options.get("include_usage") is True
    return Plan(chat, ids, config, stream, include_usage, top_logprobs)


def _max_new(body: dict, model: Model, n_prompt: int, prompt_param: str, default_max: int) -> int:
    """max_completion_tokens (the current name) wins over max_tokens (the old one); the
    prompt plus what is asked for must fit the context."""
    asked = None
    for name in ("max_completion_tokens", "max_tokens"):
        asked = _int(body, name, None, lambda v: v >= 1, "at least 1")
        if asked is not None:
            break
    room = model.context_length - n_prompt
    if room < 1 or (asked or 0) > room:
        wanted = n_prompt + (asked or 1)
        raise invalid(prompt_param if asked is None or room < 1 else name,
                      f"This model's maximum context length is {model.context_length} tokens. However, you "
                      f"requested {wanted} tokens ({n_prompt} in the {prompt_param}, {wanted - n_prompt} in the "
                      f"completion). Please reduce the length of the {prompt_param} or completion.",
                      code="context_length_exceeded")
    return asked or min(default_max, room)


# OpenAI's fields (and llama.cpp's / vLLM's top_k, min_p, repetition_penalty) -> SamplingParams.
_SAMPLING: dict[str, tuple[Callable[[float], bool], str]] = {
    "temperature": (lambda v: 0 <= v <= 2, "between 0 and 2"),
    "top_p": (lambda v: 0 < v <= 1, "greater than 0 and at most 1"),
    "presence_penalty": (lambda v: -2 <= v <= 2, "between -2 and 2"),
    "frequency_penalty": (lambda v: -2 <= v <= 2, "between -2 and 2"),
    "min_p": (lambda v: 0 <= v < 1, "at least 0 and below 1"),
    "repetition_penalty": (lambda v: v > 0, "greater than 0"),
}
_DEFAULTS = {"temperature": 1.0}  # OpenAI samples at temperature 1 unless told otherwise


def _sampling(body: dict) -> dict:
    out = {}
    for name, (ok, allowed) in _SAMPLING.items():
        value = _number(body, name, _DEFAULTS.get(name), ok, allowed)
        if value is not None:
            out[name] = value
    top_k = _int(body, "top_k", None, lambda v: v >= 0, "at least 0 (0 = off)")
    if top_k is not None:
        out["top_k"] = top_k
    seed = _int(body, "seed", None, lambda v: 0 <= v < 2**64, "between 0 and 2**64 - 1")
    if seed is not None:
        out["seed"] = seed
    return out


def _stops(stop: Any) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or any(not isinstance(s, str) or not s for s in stops):
        raise invalid("stop", f"stop must be a non-empty string or a list of them, got {stop!r:.80}")
    if len(stops) > MAX_STOP_STRINGS:
        raise invalid("stop", f"stop holds {len(stops)} strings; at most {MAX_STOP_STRINGS} are allowed")
    return tuple(stops)


# Fields whose non-default values would change the answer in ways not served here.
_UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "n": lambda v: v in (None, 1),
    "best_of": lambda v: v in (None, 1),
    "echo": lambda v: v in (None, False),
    "suffix": lambda v: v in (None, ""),
    "logit_bias": lambda v: not v,
    "tools": lambda v: not v,
    "functions": lambda v: not v,
    "tool_choice": lambda v: v in (None, "none"),
    "function_call": lambda v: v in (None, "none"),
    "response_format": lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
}


def _reject_unsupported(body: dict) -> None:
    for name, is_default in _UNSUPPORTED.items():
        if not is_default(body.get(name)):
            raise invalid(name, f"{name}={body[name]!r:.80} is not supported by this server; leave it out",
                          code="unsupported_parameter")


def _messages(messages: Any) -> list[dict]:
    """OpenAI messages -> [{"role", "content": str}] for the chat template: text parts
    are joined, "developer" is a system message, tool turns are refused."""
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "messages must be a non-empty list of {role, content} objects",
                      code="missing_required_parameter" if messages is None else "invalid_value")
    out = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ROLES:
            raise invalid(f"messages[{i}].role", f"messages[{i}]: role must be one of {', '.join(ROLES)}, "
                                                 f"got {role!r:.40}")
        out.append({"role": ROLES[role], "content": _content(m.get("content"), i, role)})
    return out


def _content(content: Any, i: int, role: str) -> str:
    if isinstance(content, str):
        return content
    if content is None and role == "assistant":
        return ""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise invalid(f"messages[{i}].content",
                  f"messages[{i}].content must be a string or a list of text parts ({{\"type\": \"text\", "
                  f"\"text\": ...}}); images, audio and files are not supported")


def _prompt_ids(prompt: Any, model: Model) -> list[int]:
    """A string, a list of one string, a list of token ids, or a list of one such list."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = model.encode(prompt)
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        bad = [t for t in prompt if not 0 <= t < model.vocab_size]
        if bad:
            raise invalid("prompt", f"prompt token id {bad[0]} is outside the vocabulary (0..{model.vocab_size - 1})")
        ids = list(prompt)
    elif isinstance(prompt, list):
        raise invalid("prompt", "only one prompt per request is supported; send a string or a list of token ids")
    else:
        raise invalid("prompt", f"prompt must be a string or a list of token ids, got {prompt!r:.80}",
                      code="missing_required_parameter" if prompt is None else "invalid_value")
    if not ids:
        raise invalid("prompt", "the prompt is empty; give at least one token of text")
    return ids


def _bool(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise invalid(name, f"{name} must be true or false, got {value!r:.40}", code="invalid_type")
    return bool(value)


def _number(body: dict, name: str, default: float | None, ok: Callable[[float], bool], allowed: str) -> float | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise invalid(name, f"{name} must be a number, got {value!r:.40}", code="invalid_type")
    if not ok(value):
        raise invalid(name, f"{name} must be {allowed}, got {value!r}")
    return float(value)


def _int(body: dict, name: str, default: int | None, ok: Callable[[int], bool], allowed: str) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise invalid(name, f"{name} must be an integer, got {value!r:.40}", code="invalid_type")
    if not ok(value):
        raise invalid(name, f"{name} must be {allowed}, got {value!r}")
    return int(value)


def error_for(exc: Exception) -> APIError:
    """The runtime's user-facing errors as API errors (anything else is a server bug)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, (BadArgumentError, ContextOverflowError)):
        return APIError(400, str(exc))
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")


# --- responses ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Done:
    """How one generation ended (runtime finish reason) and its token counts."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV came from the prompt cache, not a prefill

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


class Answer:
    """Builds one request's response from the Steps it is fed: a whole body (`body`) or
    server-sent-event chunks (`head`, each `feed`, `tail`)."""

    def __init__(self, plan: Plan, model: Model, model_id: str):
        self.plan, self.model, self.model_id = plan, model, model_id
        self.id = ("chatcmpl-" if plan.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if plan.chat else "text_completion"
        self.pieces: list[str] = []
        self.tokens: list[dict] = []  # one logprob entry per generated token (with logprobs)
        self.offsets: list[int] = []  # where each token's text starts in the joined token texts

    # ---- streaming ----
    def head(self) -> list[dict]:
        """Chat streams open with the assistant's role."""
        return [self._chunk({"role": "assistant", "content": ""})] if self.plan.chat else []

    def feed(self, step: Step) -> dict | None:
        """Record a step; the chunk that carries it (None: nothing to send yet)."""
        self.pieces.append(step.text)
        scored = self.plan.top_logprobs is not None and step.token_id is not None
        if scored:
            self.offsets.append(self.offsets[-1] + len(self.tokens[-1]["token"]) if self.tokens else 0)
            self.tokens.append(self._logprob(step))
        if not step.text and not scored:
            return None
        return self._chunk({"content": step.text}, self._logprobs(len(self.tokens) - 1) if scored else None)

    def tail(self, done: Done) -> list[dict]:
        chunks = [self._chunk({}, finish=FINISH_REASONS[done.finish_reason])]
        if self.plan.include_usage:
            chunks.append({**self._envelope(), "choices": [], "usage": done.usage()})
        return chunks

    def _chunk(self, delta: dict, logprobs: dict | None = None, finish: str | None = None) -> dict:
        if self.plan.chat:
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta.get("content", ""), "logprobs": logprobs, "finish_reason": finish}
        return {**self._envelope(), "choices": [choice]}

    def _envelope(self) -> dict:
        kind = self.object + ".chunk" if self.plan.chat else self.object
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model_id}

    # ---- whole ----
    def body(self, done: Done) -> dict:
        text, finish = "".join(self.pieces), FINISH_REASONS[done.finish_reason]
        logprobs = self._logprobs(0) if self.plan.top_logprobs is not None else None
        if self.plan.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                      "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model_id,
                "choices": [choice], "usage": done.usage()}

    # ---- logprobs ----
    def _logprob(self, step: Step) -> dict:
        """One token under the distribution `--show-probs` shows (softmax of the raw logits)."""
        top = (step.top or [])[: self.plan.top_logprobs]
        return {**self._token(step.token_id, step.prob), "top_logprobs": [self._token(t, p) for t, p in top]}

    def _token(self, token_id: int, prob: float) -> dict:
        text = self.model.tokenizer.decode([token_id], skip_special_tokens=False)
        return {"token": text, "logprob": math.log(prob) if prob > 0 else -9999.0, "bytes": list(text.encode())}

    def _logprobs(self, start: int) -> dict:
        """Tokens from `start` on. Chat: {"content": entries}; completions: parallel lists."""
        entries = self.tokens[start:]
        if self.plan.chat:
            return {"content": entries, "refusal": None}
        return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
                "text_offset": self.offsets[start:]}
