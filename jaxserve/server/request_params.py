"""Request body -> validated `SamplingParams` (with its `Constraint`): every user-input check lives here.

Everything raises `APIError` (HTTP 400 with the field named) so a route never sees half-valid input.
"""
from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from typing import Any, Mapping, Sequence, TypeVar

from pydantic import BaseModel, ValidationError

from jaxserve.sampling.params import MAX_LOGIT_BIAS_ENTRIES, Constraint, SamplingParams
from jaxserve.server.errors import APIError, bad_request, truncate, validation_error_to_api_error
from jaxserve.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    NamedToolChoice,
    NativeSamplingParams,
    ResponseFormatJsonObject,
    ResponseFormatJsonSchema,
    Tool,
)

RequestT = TypeVar("RequestT", bound=BaseModel)

# A stop string longer than this is almost certainly hostile; matching it is checked every step.
MAX_STOP_CHARS = 1024


def parse_body(model: type[RequestT], raw: bytes) -> RequestT:
    if not raw.strip():
        raise bad_request("request body is empty; expected a JSON object", code="invalid_json")
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise _field_named(validation_error_to_api_error(exc), model, exc) from None


def _field_named(err: APIError, model: type[BaseModel], exc: ValidationError) -> APIError:
    """Name the client's field in `param`, not pydantic's location inside it.

    pydantic's location continues into union members and scalar containers ("prompt.list[int].0",
    "stop_token_ids.3", "logit_bias.12"); `param` keeps the path through objects only ("messages.0.role",
    "sampling_params.top_k") and the message says where inside the field the bad value is.
    """
    if err.param is None:
        return err
    loc = exc.errors(include_url=False, include_input=False)[0].get("loc", ())
    param = field_path(model, loc)
    if not param or param == err.param:
        return err
    message = err.message
    if message.startswith(f"{err.param}: "):
        detail, more = message[len(err.param) + 2:], ""
        if detail.endswith(" more error(s))") and " (and " in detail:
            detail, more = detail.rsplit(" (and ", 1)
            more = " (and " + more
        message = f"{param}: {detail} (at {err.param}){more}"
    return bad_request(message, param=param, code=err.code)


def field_path(model: type[BaseModel], loc: Sequence[int | str]) -> str:
    """The prefix of a pydantic error location that names fields of models (and indices into lists of models)."""
    parts: list[str] = []
    current: type[BaseModel] | None = model
    i = 0
    while current is not None and i < len(loc):
        key = loc[i]
        fields = {f.alias or name: f for name, f in current.model_fields.items()}
        if not isinstance(key, str) or key not in fields:
            break
        parts.append(key)
        i += 1
        current, is_list = _model_in(fields[key].annotation)
        if current is not None and is_list:
            if i >= len(loc) or not isinstance(loc[i], int):
                break
            parts.append(str(loc[i]))
            i += 1
    return ".".join(parts)


def _model_in(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """(M, is_list) when `annotation` is M, M | None, list[M] or list[M] | None for one model M; else (None, _)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            return None, False
        annotation, args = rest[0], typing.get_args(rest[0])
    if typing.get_origin(annotation) is list and len(args) == 1:
        inner = args[0]
        return (inner, True) if isinstance(inner, type) and issubclass(inner, BaseModel) else (None, False)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    return None, False


def _stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    for s in stops:
        if len(s) > MAX_STOP_CHARS:
            raise bad_request(f"stop strings may be at most {MAX_STOP_CHARS} characters", param="stop")
    # OpenAI accepts "" in a stop list and ignores it.
    return tuple(s for s in stops if s)


# A logit_bias key is a token id in decimal ASCII (int() would also take " 5", "5_0" and non-ASCII digits).
# 20 digits hold any int64: longer keys cannot be a token id and are not worth converting.
_TOKEN_KEY = re.compile(r"-?[0-9]{1,20}")


def _logit_bias(bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    if not bias:
        return ()
    if len(bias) > MAX_LOGIT_BIAS_ENTRIES:
        raise bad_request(
            f"logit_bias may hold at most {MAX_LOGIT_BIAS_ENTRIES} entries, got {len(bias)}", param="logit_bias"
        )
    pairs: list[tuple[int, float]] = []
    for key, value in bias.items():
        if not _TOKEN_KEY.fullmatch(key):
            raise bad_request(f"logit_bias keys must be token ids, got {truncate(key)!r}", param="logit_bias")
        pairs.append((int(key), float(value)))
    return tuple(pairs)


def _schema_text(schema: object, param: str) -> str:
    if schema is None:
        raise bad_request("response_format.json_schema.schema is required", param=param)
    return json.dumps(schema)


def response_constraint(
    response_format: object, regex: str | None, json_schema: str | None
) -> Constraint | None:
    """The output constraint asked for by `response_format`, `regex` or `json_schema` (at most one)."""
    chosen: list[tuple[str, Constraint]] = []
    if isinstance(response_format, ResponseFormatJsonObject):
        chosen.append(("response_format", Constraint("json_object")))
    elif isinstance(response_format, ResponseFormatJsonSchema):
        spec = _schema_text(response_format.json_schema.schema_, "response_format.json_schema.schema")
        chosen.append(("response_format", Constraint("json_schema", spec)))
    if regex is not None:
        if not regex:
            raise bad_request("regex must be a non-empty pattern", param="regex")
        chosen.append(("regex", Constraint("regex", regex)))
    if json_schema is not None:
        try:
            json.loads(json_schema)
        except ValueError as exc:
            raise bad_request(f"json_schema is not valid JSON: {exc}", param="json_schema") from None
        chosen.append(("json_schema", Constraint("json_schema", json_schema)))
    if len(chosen) > 1:
        names = ", ".join(name for name, _ in chosen)
        raise bad_request(f"only one output constraint may be given, got {names}", param=chosen[1][0])
    return chosen[0][1] if chosen else None


def tool_call_constraint(
    tools: list[Tool], tool_choice: str | NamedToolChoice, parallel_tool_calls: bool
) -> tuple[Constraint, str | None]:
    """Constraint for tool_choice "required" or a named function.

    Named: the output is the function's arguments object (returns its name). Required: the output is a JSON
    array of `{"name", "parameters"}` calls (one or more, or exactly one without parallel calls).
    """
    by_name = {t.function.name: t for t in tools}
    if isinstance(tool_choice, NamedToolChoice):
        name = tool_choice.function.name
        if name not in by_name:
            raise bad_request(f"tool_choice names function {truncate(name)!r}, which is not in tools", param="tool_choice")
        params = by_name[name].function.parameters or {"type": "object"}
        return Constraint("json_schema", json.dumps(params)), name
    one_call = {
        "anyOf": [
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "enum": [t.function.name]},
                    "parameters": t.function.parameters or {"type": "object"},
                },
                "required": ["name", "parameters"],
            }
            for t in tools
        ]
    }
    schema = {"type": "array", "items": one_call, "minItems": 1}
    if not parallel_tool_calls:
        schema["maxItems"] = 1
    return Constraint("json_schema", json.dumps(schema)), None


def _common(req: ChatCompletionRequest | CompletionRequest) -> dict:
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed when stream is true", param="stream_options")
    return dict(
        n=req.n,
        min_tokens=req.min_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=-1 if req.top_k is None else req.top_k,
        min_p=0.0 if req.min_p is None else req.min_p,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        logit_bias=_logit_bias(req.logit_bias),
        seed=req.seed,
        stop=_stop_strings(req.stop),
        stop_token_ids=tuple(req.stop_token_ids or ()),
        ignore_eos=req.ignore_eos,
        skip_special_tokens=req.skip_special_tokens,
        no_stop_trim=req.no_stop_trim,
        cache_salt=req.cache_salt,
    )


_PARAMS_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams)) | {"top_logprobs"}

# How each route's body spells the SamplingParams fields whose name differs (validate() calls
# SamplingParams.logprobs "top_logprobs", the chat spelling).
COMPLETION_NAMES: Mapping[str, str] = {"top_logprobs": "logprobs"}
NATIVE_NAMES: Mapping[str, str] = {
    **{name: f"sampling_params.{name}" for name in _PARAMS_FIELDS},
    "max_tokens": "sampling_params.max_new_tokens",
    "min_tokens": "sampling_params.min_new_tokens",
    "top_logprobs": "top_logprobs_num",
}


def validated(params: SamplingParams, vocab_size: int, names: Mapping[str, str] | None = None) -> SamplingParams:
    """`params` after `SamplingParams.validate`; a ValueError becomes a 400 whose `param` is the field as the
    client spelled it (`names` maps SamplingParams field names to the route's, default the same)."""
    try:
        params.validate(vocab_size)
    except ValueError as exc:
        # validate() names the field first ("top_p must be ..."): use it as the param.
        message = str(exc)
        field_name = message.split(" ", 1)[0]
        if names:
            # Rename every field the message mentions ("min_tokens (5) must not exceed max_tokens (3)"); only
            # names with an underscore, so a bare "n" or "stop" in the prose is left alone.
            mentioned = sorted((k for k in names if "_" in k and k in message), key=len, reverse=True)
            if mentioned:
                pattern = r"\b(" + "|".join(map(re.escape, mentioned)) + r")\b"
                message = re.sub(pattern, lambda m: names[m.group(1)], message)
            if field_name in names:
                field_name = names[field_name]
                message = field_name + message[message.index(" "):]
        param = field_name if field_name in _PARAMS_FIELDS or (names and field_name in names.values()) else None
        raise bad_request(message, param=param) from None
    return params


def chat_sampling_params(
    req: ChatCompletionRequest, constraint: Constraint | None, vocab_size: int
) -> SamplingParams:
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs requires logprobs to be true", param="top_logprobs")
    names: dict[str, str] = {}
    max_tokens = req.max_tokens
    if req.max_completion_tokens is not None:
        # max_completion_tokens wins; a max_tokens beside it is unused but must still be a valid value.
        if req.max_tokens is not None and req.max_tokens < 1:
            raise bad_request(f"max_tokens must be an integer >= 1, got {truncate(req.max_tokens)}", param="max_tokens")
        max_tokens, names["max_tokens"] = req.max_completion_tokens, "max_completion_tokens"
    params = SamplingParams(
        **_common(req),
        max_tokens=max_tokens,
        logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        constraint=constraint,
    )
    return validated(params, vocab_size, names)


def completion_sampling_params(req: CompletionRequest, vocab_size: int) -> SamplingParams:
    if req.suffix:
        raise bad_request("suffix is not supported: this server does not do fill-in-the-middle", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request("best_of is not supported (only best_of == n)", param="best_of")
    constraint = response_constraint(req.response_format, req.regex, req.json_schema)
    # echo + logprobs scores the prompt too (lm-evaluation-harness: max_tokens 0 scores it alone).
    prompt_logprobs = req.logprobs if req.echo else None
    params = SamplingParams(**_common(req), max_tokens=req.max_tokens, logprobs=req.logprobs, constraint=constraint,
                            prompt_logprobs=prompt_logprobs)
    return validated(params, vocab_size, COMPLETION_NAMES)


def native_sampling_params(sp: NativeSamplingParams, logprobs: int | None, vocab_size: int,
                           prompt_logprobs: int | None = None) -> SamplingParams:
    constraint = response_constraint(None, sp.regex, sp.json_schema)
    params = SamplingParams(
        n=sp.n,
        max_tokens=sp.max_new_tokens,
        min_tokens=sp.min_new_tokens,
        temperature=sp.temperature,
        top_p=sp.top_p,
        top_k=sp.top_k,
        min_p=sp.min_p,
        presence_penalty=sp.presence_penalty,
        frequency_penalty=sp.frequency_penalty,
        repetition_penalty=sp.repetition_penalty,
        seed=sp.seed,
        stop=_stop_strings(sp.stop),
        stop_token_ids=tuple(sp.stop_token_ids or ()),
        ignore_eos=sp.ignore_eos,
        skip_special_tokens=sp.skip_special_tokens,
        no_stop_trim=sp.no_stop_trim,
        cache_salt=sp.cache_salt,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        constraint=constraint,
    )
    return validated(params, vocab_size, NATIVE_NAMES)


def check_context(
    num_prompt_tokens: int,
    max_tokens: int | None,
    max_model_len: int,
    *,
    min_tokens: int = 0,
    max_tokens_param: str = "max_tokens",
    min_tokens_param: str = "min_tokens",
) -> None:
    """OpenAI's wording for a request that cannot fit the context window. The `*_param` names are the
    route's spelling ("max_completion_tokens", "sampling_params.max_new_tokens")."""
    if num_prompt_tokens == 0:
        raise bad_request("the prompt is empty (0 tokens)", param="prompt")
    if max_tokens is None:
        if num_prompt_tokens >= max_model_len:
            raise bad_request(
                f"This model's maximum context length is {max_model_len} tokens. However, your prompt has "
                f"{num_prompt_tokens} tokens, which leaves no room for a completion. Please reduce the length "
                f"of the prompt.",
                param="messages",
                code="context_length_exceeded",
            )
        # With max_tokens set, min_tokens <= max_tokens is checked by validate(); without it the context is
        # the cap, and a min_tokens beyond it could never be met.
        if min_tokens > max_model_len - num_prompt_tokens:
            raise bad_request(
                f"{min_tokens_param} ({_digits(min_tokens)}) exceeds the {max_model_len - num_prompt_tokens} "
                f"tokens left in this model's context of {max_model_len} tokens after the prompt's "
                f"{num_prompt_tokens}",
                param=min_tokens_param,
                code="context_length_exceeded",
            )
        return
    if num_prompt_tokens + max_tokens > max_model_len:
        total, asked = _digits(num_prompt_tokens + max_tokens), _digits(max_tokens)
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{total} tokens ({num_prompt_tokens} in the prompt, {asked} in the "
            f"completion). Please reduce the length of the prompt or the completion.",
            param=max_tokens_param,
            code="context_length_exceeded",
        )


def _digits(n: int) -> str:
    """An integer for a message: a JSON integer may have thousands of digits."""
    text = str(n)
    return text if len(text) <= 24 else f"{text[:12]}...({len(text)} digits)"


def max_prompt_chars(max_model_len: int) -> int:
    """Prompt text longer than this cannot fit the context whatever the tokenizer; reject before tokenizing.

    No tokenizer of the Llama family has tokens near 64 characters on average, so this never rejects a
    prompt that would fit, while a 10 MB string costs nothing to refuse.
    """
    return max_model_len * 64


def check_prompt_chars(num_chars: int, max_model_len: int, param: str) -> None:
    if num_chars > max_prompt_chars(max_model_len):
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens and the prompt has {num_chars} "
            f"characters, far more than fit. Please reduce the length of the prompt.",
            param=param,
            code="context_length_exceeded",
        )


