"""Request body -> validated `SamplingParams` (with its `Constraint`): every user-input check lives here.

Everything raises `APIError` (HTTP 400 with the field named) so a route never sees half-valid input.
"""
from __future__ import annotations

import json
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from jaxserve.sampling.params import Constraint, SamplingParams
from jaxserve.server.errors import bad_request, truncate, validation_error_to_api_error
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
        raise validation_error_to_api_error(exc) from None


def _stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    for s in stops:
        if len(s) > MAX_STOP_CHARS:
            raise bad_request(f"stop strings may be at most {MAX_STOP_CHARS} characters", param="stop")
    # OpenAI accepts "" in a stop list and ignores it.
    return tuple(s for s in stops if s)


def _logit_bias(bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    if not bias:
        return ()
    pairs: list[tuple[int, float]] = []
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise bad_request(f"logit_bias keys must be token ids, got {truncate(key)!r}", param="logit_bias") from None
        pairs.append((token, float(value)))
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
    )


def validated(params: SamplingParams, vocab_size: int) -> SamplingParams:
    try:
        params.validate(vocab_size)
    except ValueError as exc:
        # validate() names the field first ("top_p must be ..."): use it as the param.
        field_name = str(exc).split(" ", 1)[0]
        raise bad_request(str(exc), param=field_name if field_name.isidentifier() else None) from None
    return params


def chat_sampling_params(
    req: ChatCompletionRequest, constraint: Constraint | None, vocab_size: int
) -> SamplingParams:
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs requires logprobs to be true", param="top_logprobs")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    params = SamplingParams(
        **_common(req),
        max_tokens=max_tokens,
        logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        constraint=constraint,
    )
    return validated(params, vocab_size)


def completion_sampling_params(req: CompletionRequest, vocab_size: int) -> SamplingParams:
    if req.suffix:
        raise bad_request("suffix is not supported: this server does not do fill-in-the-middle", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request("best_of is not supported (only best_of == n)", param="best_of")
    if req.echo and req.logprobs is not None:
        raise bad_request("echo with logprobs is not supported (prompt logprobs are not computed)", param="echo")
    constraint = response_constraint(req.response_format, req.regex, req.json_schema)
    params = SamplingParams(**_common(req), max_tokens=req.max_tokens, logprobs=req.logprobs, constraint=constraint)
    return validated(params, vocab_size)


def native_sampling_params(sp: NativeSamplingParams, logprobs: int | None, vocab_size: int) -> SamplingParams:
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
        logprobs=logprobs,
        constraint=constraint,
    )
    return validated(params, vocab_size)


def check_context(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int) -> None:
    """OpenAI's wording for a request that cannot fit the context window."""
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
        return
    if num_prompt_tokens + max_tokens > max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the prompt, {max_tokens} in the "
            f"completion). Please reduce the length of the prompt or the completion.",
            param="max_tokens",
            code="context_length_exceeded",
        )


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


