"""The server's structured output fields (response_format, structured_outputs, guided_*) as
SamplingParams.structured_outputs, and their 400s naming the field, without a server."""
import pytest

from pagedllm.server.errors import APIError
from pagedllm.server.protocol import ChatCompletionRequest, CompletionRequest
from pagedllm.server.structured_fields import constraint_field
from pagedllm.structured_output.params import StructuredOutputsParams as P

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def params(**fields):
    req = CompletionRequest(prompt="x", **fields)
    return req.to_sampling_params(8, None).structured_outputs, constraint_field(req)


def chat_params(**fields):
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], **fields)
    return req.to_sampling_params(8, None).structured_outputs, constraint_field(req)


def refused(**fields) -> APIError:
    with pytest.raises(APIError) as e:
        params(**fields)
    assert e.value.status == 400
    return e.value


@pytest.mark.parametrize("make", [params, chat_params])
def test_each_field_maps_to_one_constraint(make):
    assert make() == (None, None)
    assert make(response_format={"type": "text"}) == (None, None)
    assert make(response_format={"type": "json_object"}) == (P(json_object=True), "response_format")
    rf = {"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA, "strict": True, "description": "d"}}
    assert make(response_format=rf) == (P(json=SCHEMA), "response_format")
    assert make(structured_outputs={"regex": "[0-9]+", "disable_fallback": True}) == (P(regex="[0-9]+"),
                                                                                        "structured_outputs")
    so = {"json": SCHEMA, "disable_any_whitespace": True, "disable_additional_properties": True}
    assert make(structured_outputs=so)[0] == P(**so)
    assert make(guided_json=SCHEMA, guided_decoding_backend="xgrammar") == (P(json=SCHEMA), "guided_json")
    assert make(guided_regex="a+", guided_decoding_backend="auto") == (P(regex="a+"), "guided_regex")
    assert make(guided_choice=["x", "y"]) == (P(choice=["x", "y"]), "guided_choice")
    assert make(guided_grammar='root ::= "a"') == (P(grammar='root ::= "a"'), "guided_grammar")


def test_structural_tag_response_format():
    tag = {"type": "structural_tag", "structures": [{"begin": "<f>", "schema": SCHEMA, "end": "</f>"}],
           "triggers": ["<f>"]}
    so, field = params(response_format=tag)
    assert field == "response_format" and so.kind == "structural_tag"


def test_two_constraints_are_a_400_naming_both():
    e = refused(response_format={"type": "json_object"}, guided_regex="a")
    assert "response_format" in e.message and "guided_regex" in e.message and e.param == "response_format"
    e = refused(structured_outputs={"regex": "a", "choice": ["b"]})
    assert e.param == "structured_outputs" and "regex, choice" in e.message
    e = refused(response_format={"type": "json_object"}, structured_outputs={"regex": "a"})
    assert "response_format, structured_outputs" in e.message and e.param == "response_format"


@pytest.mark.parametrize("make", [params, chat_params])
def test_response_format_and_structured_outputs_of_one_kind_merge_as_vllms(make):
    """vLLM's structured_outputs_from_response_format: response_format's constraint replaces structured_outputs'
    of the same kind, whose options stay. Both at once was a 400 here."""
    rf = {"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA}}
    so = {"json": {"type": "boolean"}, "disable_any_whitespace": True}
    assert make(response_format=rf, structured_outputs=so) == (P(json=SCHEMA, disable_any_whitespace=True),
                                                               "response_format")
    assert make(response_format={"type": "json_object"}, structured_outputs={"json_object": True}) == (
        P(json_object=True), "response_format")


@pytest.mark.parametrize("fields, param, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "objec"}}}},
     "response_format", "response_format.json_schema.schema is invalid"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n"}}}, "response_format",
     "response_format.json_schema.schema must be"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {}, "strict": "yes"}}},
     "response_format", "strict must be bool"),
    # a schema refused by pagedllm's own checks named "response_format.json", which no client sends
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {"not": {}}}}},
     "response_format", "response_format.json_schema.schema: 'not' at # is not enforced"),
    ({"response_format": {"type": "xml"}}, "response_format", "response_format.type must be"),
    ({"response_format": {"schema": {}}}, "response_format", "response_format.type is required"),
    ({"response_format": {"type": "json_object", "extra": 1}}, "response_format", "unknown field 'extra'"),
    ({"guided_json": '{"type": "objec"}'}, "guided_json", "guided_json is invalid"),
    ({"guided_regex": "(("}, "guided_regex", "guided_regex is invalid"),
    ({"guided_grammar": "root ::= nothing"}, "guided_grammar", "guided_grammar is invalid"),
    ({"guided_choice": []}, "guided_choice", "non-empty list"),
    ({"structured_outputs": {"grammar": "x ::="}}, "structured_outputs", "structured_outputs.grammar is invalid"),
    ({"structured_outputs": {"jsn": {}}}, "structured_outputs", "unknown field 'jsn'"),
    # json_object false is set, never "off" (vLLM 0.26 refuses it): alone, and beside another kind
    ({"structured_outputs": {"json_object": False}}, "structured_outputs",
     "structured_outputs.json_object must be True if set; omit structured_outputs"),
    ({"structured_outputs": {"regex": "a", "json_object": False}}, "structured_outputs",
     "exactly one of json, regex, choice, grammar, json_object, structural_tag; got regex, json_object"),
    ({"structured_outputs": {"regex": "a", "whitespace_pattern": " *"}}, "structured_outputs",
     "whitespace_pattern must be null"),
    ({"guided_decoding_backend": "outlines", "guided_regex": "a"}, "guided_decoding_backend", "outlines"),
    # "false" read as true made the JSON compact: the flags are booleans or refused
    ({"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": "false"}}, "structured_outputs",
     "structured_outputs.disable_any_whitespace must be bool"),
    ({"structured_outputs": {"json": SCHEMA, "disable_additional_properties": 1}}, "structured_outputs",
     "structured_outputs.disable_additional_properties must be bool"),
    ({"guided_whitespace_pattern": "[ ]?", "guided_json": SCHEMA}, "guided_whitespace_pattern", "xgrammar"),
])
def test_bad_constraints_are_400s_naming_the_field(fields, param, words):
    e = refused(**fields)
    assert e.param == param and words in e.message, e.message
    assert "SamplingParams" not in e.message
