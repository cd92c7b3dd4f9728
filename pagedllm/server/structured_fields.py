"""The request fields that constrain the output (OpenAI's response_format, vLLM's structured_outputs and its
older guided_* fields) as one StructuredOutputsParams, and the name of the field that set it.

At most one of them may carry a constraint; each is checked here (its shape) and its constraint is turned into
an xgrammar grammar once (grammar_spec.validate), so a bad schema, regex or grammar is a 400 naming the field
the client sent, before the request is queued.
"""
import dataclasses
import json
from typing import Any

from pagedllm.server.errors import APIError, shorten
from pagedllm.structured_output.grammar_spec import validate
from pagedllm.structured_output.params import StructuredOutputsParams

GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
BACKENDS = ("xgrammar", "auto")   # xgrammar is the one grammar engine; "auto" chooses it


def structured_outputs(req) -> tuple[StructuredOutputsParams | None, str | None]:
    """(the constraint, the field that set it) of a completions or chat request; (None, None) without one.
    Raises APIError(400) naming the field."""
    _check_options(req)
    given = list(_sources(req))
    if not given:
        return None, None
    built = [(name, _built(name, builder)) for name, builder in given]
    if [name for name, _ in built] == ["response_format", "structured_outputs"] \
            and built[0][1].kind == built[1][1].kind:
        # vLLM's structured_outputs_from_response_format: response_format's constraint over structured_outputs'
        # of the same kind, whose options (disable_any_whitespace, ...) stay
        kind = built[0][1].kind
        built = [("response_format", dataclasses.replace(built[1][1], **{kind: getattr(built[0][1], kind)}))]
    if len(built) > 1:
        names = ", ".join(name for name, _ in built)
        raise APIError(400, f"only one structured output constraint may be set per request (response_format and "
                            f"structured_outputs of one kind merge, as vLLM's); got {names}",
                       built[0][0], "invalid_value")
    name, params = built[0]
    try:
        validate(params)
    except ValueError as e:
        raise _refused(e, name) from e
    return params, name


def _built(name: str, builder) -> StructuredOutputsParams:
    try:
        return builder()
    except ValueError as e:
        raise _refused(e, name) from e


def checked_constraint(params):
    """params, its constraint (a tool call's schema too) parsed now: InputProcessor's check then finds it
    remembered, so no parse runs on the event loop."""
    if params.structured_outputs is not None:
        validate(params.structured_outputs)
    return params


def constraint_field(req) -> str | None:
    """The field that set the request's constraint (the param of a 400 from the engine's compile)."""
    return next((name for name, _ in _sources(req)), None)


def _refused(e: ValueError, name: str) -> APIError:
    return APIError(400, shorten(_rename(str(e), name), 1000), name, "invalid_value")


def _rename(message: str, name: str) -> str:
    """A message about SamplingParams.structured_outputs[.kind] as one about the field the client sent."""
    prefix = "SamplingParams.structured_outputs"
    if name in GUIDED:
        return message.replace(f"{prefix}.{GUIDED[name]}", name)
    if name == "response_format":
        # ".json:": grammar_spec's own refusals ("...json: 'not' at # is not enforced")
        for kind, path in ((".json_schema", ".json_schema"), (".json ", ".json_schema.schema "),
                           (".json:", ".json_schema.schema:"),
                           (".json_object", ""), (".structural_tag", "")):
            message = message.replace(prefix + kind, name + path)
    return message.replace(prefix, name)


def _sources(req):
    """(field, a function that builds its StructuredOutputsParams) for each constraint field the request set."""
    rf = req.response_format
    if rf is not None and rf.get("type") != "text":
        yield "response_format", lambda: _from_response_format(rf)
    if req.structured_outputs is not None:
        yield "structured_outputs", lambda: _from_structured_outputs(req.structured_outputs)
    for name, kind in GUIDED.items():
        value = getattr(req, name)
        if value is not None:
            yield name, lambda kind=kind, value=value: StructuredOutputsParams(**{kind: value})


def _check_options(req):
    backend = req.guided_decoding_backend
    if backend is not None and backend not in BACKENDS:
        raise APIError(400, f"guided_decoding_backend must be one of {', '.join(BACKENDS)} (xgrammar is the only "
                            f"grammar engine), got {shorten(repr(backend))}", "guided_decoding_backend",
                       "invalid_value")
    if req.guided_whitespace_pattern is not None:
        raise APIError(400, "guided_whitespace_pattern is not supported (xgrammar takes no whitespace pattern; "
                            "structured_outputs.disable_any_whitespace allows single spaces only)",
                       "guided_whitespace_pattern", "unsupported_parameter")
    rf = req.response_format
    if rf is not None and not isinstance(rf.get("type"), str):
        raise APIError(400, "response_format.type is required: text, json_object, json_schema or structural_tag",
                       "response_format", "invalid_value")


def _from_response_format(rf: dict[str, Any]) -> StructuredOutputsParams:
    kind = rf["type"]
    if kind == "json_object":
        _only_keys(rf, ("type",), "response_format")
        return StructuredOutputsParams(json_object=True)
    if kind == "json_schema":
        _only_keys(rf, ("type", "json_schema"), "response_format")
        return StructuredOutputsParams(json=_json_schema(rf.get("json_schema")))
    if kind == "structural_tag":   # vLLM's: xgrammar's format ("format") or the older structures + triggers
        return StructuredOutputsParams(structural_tag=json.dumps(rf))
    raise ValueError(f"SamplingParams.structured_outputs.type must be text, json_object, json_schema or "
                     f"structural_tag, got {shorten(repr(kind))}")


def _json_schema(spec) -> dict:
    """OpenAI's {"name", "schema", "strict", "description"}: the schema; name and description are labels, and
    the schema is always enforced exactly (strict true or false: xgrammar's strict mode)."""
    where = "SamplingParams.structured_outputs.json_schema"
    if not isinstance(spec, dict):
        raise ValueError(f"{where} must be an object with a schema, got {type(spec).__name__}")
    _only_keys(spec, ("name", "schema", "strict", "description"), "response_format.json_schema")
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise ValueError(f"{where}.schema must be a JSON schema object, got {type(schema).__name__}")
    for key, types in (("name", str), ("description", str), ("strict", bool)):
        if spec.get(key) is not None and not isinstance(spec[key], types):
            raise ValueError(f"{where}.{key} must be {types.__name__}, got {type(spec[key]).__name__}")
    return schema


def _from_structured_outputs(value: dict[str, Any]) -> StructuredOutputsParams:
    value = dict(value)
    if value.pop("whitespace_pattern", None) is not None:
        raise ValueError("SamplingParams.structured_outputs.whitespace_pattern must be null (xgrammar takes no "
                         "whitespace pattern; disable_any_whitespace allows single spaces only), got a pattern")
    fallback = value.pop("disable_fallback", None)   # no other backend to fall back to: always honoured
    if fallback is not None and not isinstance(fallback, bool):
        raise ValueError(f"SamplingParams.structured_outputs.disable_fallback must be bool, "
                         f"got {type(fallback).__name__}")
    return StructuredOutputsParams.from_dict(value)


def _only_keys(spec: dict, allowed: tuple[str, ...], where: str):
    unknown = [k for k in spec if k not in allowed]
    if unknown:
        raise ValueError(f"{where} has unknown field {shorten(repr(unknown[0]))} "
                         f"(known: {', '.join(allowed)})")
