"""grammar_spec: each constraint as an xgrammar Grammar (what the engine compiles), and the ValueError naming the
field for a constraint that cannot be one, where the request enters (no tokenizer, no engine)."""
import json
import re

import pytest

from pagedllm.engine.input_processor import InputProcessor
from pagedllm.sampling_params import SamplingParams
from pagedllm.structured_output.grammar_spec import (build_grammar, choice_ebnf, json_safe_lengths,
                                                    no_additional_properties)
from pagedllm.structured_output.params import StructuredOutputsParams as P
from structured_output_schemas import CHOICES, GRAMMARS, REGEXES, SCHEMAS

xgr = pytest.importorskip("xgrammar")


@pytest.fixture(scope="module")
def compiler():
    from transformers import AutoTokenizer

    from pagedllm.config import DEMO_MODEL
    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    return xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tok, vocab_size=512, stop_token_ids=[2]))


def accepts(compiler, p: P, text: str) -> bool:
    """Whether the grammar of p takes exactly text (all of it, and may end there)."""
    matcher = xgr.GrammarMatcher(compiler.compile_grammar(build_grammar(p)))
    # The stop token (2) is accepted only where the grammar may end.
    return matcher.accept_string(text) and matcher.accept_token(2)


def test_the_whole_corpus_builds():
    for schema in SCHEMAS.values():
        build_grammar(P(json=schema))
        build_grammar(P(json=json.dumps(schema), disable_any_whitespace=True, disable_additional_properties=True))
    for rx in REGEXES.values():
        build_grammar(P(regex=rx))
    for choices in CHOICES.values():
        build_grammar(P(choice=choices))
    for g in GRAMMARS.values():
        build_grammar(P(grammar=g))


def test_choices_are_escaped_literals(compiler):
    tricky = CHOICES["tricky"] + ["", "a|b", "root ::= x", "\\n"]
    assert choice_ebnf(['a"b']) == 'root ::= "a\\"b"'
    p = P(choice=tricky)
    for c in tricky:
        assert accepts(compiler, p, c), c
    for other in ['say "hi', "backslash", "two\\nlines", "two", "日本", "x"]:
        assert not accepts(compiler, p, other), other


def test_a_control_character_before_a_hex_digit_stays_itself(compiler):
    r""""\n3" was written \x0a3, which xgrammar reads as one escape: U+0A3, "£" in place of "\n3"."""
    p = P(choice=["\n3", "a\tBc"])
    assert accepts(compiler, p, "\n3") and accepts(compiler, p, "a\tBc")
    assert not accepts(compiler, p, "£")


def test_json_object_is_an_object_not_any_value(compiler):
    p = P(json_object=True)
    assert accepts(compiler, p, '{"a": [1, {"b": null}]}')
    assert accepts(compiler, p, "{}")
    for value in ("[1]", "1", '"s"', "null"):
        assert not accepts(compiler, p, value), value


def test_disable_any_whitespace(compiler):
    schema = SCHEMAS["flat_object"]
    loose, compact = P(json=schema), P(json=schema, disable_any_whitespace=True)
    spaced = '{\n  "name" : "ab",\n  "age": 3\n}'
    assert accepts(compiler, loose, spaced)
    assert not accepts(compiler, compact, spaced)
    assert accepts(compiler, compact, '{"name": "ab", "age": 3}')


def test_disable_additional_properties():
    schema = {"type": "object", "properties": {"properties": {"type": "object"}, "a": {
        "type": "array", "items": {"type": "object", "additionalProperties": True}}}}
    closed = no_additional_properties(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["properties"]["additionalProperties"] is False   # a property's name, not a keyword
    assert closed["properties"]["a"]["items"]["additionalProperties"] is True   # set by the user: kept
    assert "additionalProperties" not in schema                                  # the user's schema is not changed


def test_bounded_strings_stay_valid_json(compiler):
    """xgrammar 0.2.9 lets raw control characters and non-UTF-8 bytes into strings with maxLength; build_grammar
    keeps them out."""
    schema = {"type": "string", "minLength": 1, "maxLength": 3}
    assert not accepts(compiler, P(json=schema), '"a\x01"')
    for raw in (b'"\xed\xa0\x80"', b'"\xe0\x80\x80"'):   # a surrogate, an overlong NUL: not UTF-8 text
        assert not accepts(compiler, P(json=schema), raw)
    assert accepts(compiler, P(json=schema), '"日本"')
    assert accepts(compiler, P(json=schema), '"abc"')
    assert not accepts(compiler, P(json=schema), '"abcd"')
    assert json_safe_lengths({"type": "string", "pattern": "x"}) == {"type": "string", "pattern": "x"}


def test_bounded_strings_of_a_type_list_stay_valid_json(compiler):
    """{"type": ["string", "null"], "maxLength": n} (an optional bounded string) took a raw control character, as
    a plain "string" did before build_grammar bounded it."""
    for types in (["string", "null"], ["string"], ["integer", "string"]):
        schema = {"type": types, "minLength": 1, "maxLength": 2}
        assert not accepts(compiler, P(json=schema), '"\x01"')
        assert accepts(compiler, P(json=schema), '"ab"')
        assert not accepts(compiler, P(json=schema), '"abc"') and not accepts(compiler, P(json=schema), '""')
    assert accepts(compiler, P(json={"type": ["string", "null"], "maxLength": 2}), "null")
    assert accepts(compiler, P(json={"type": ["integer", "string"], "maxLength": 2}), "123")


@pytest.mark.parametrize("p, field", [
    (P(json='{"type": "objec"}'), "json"), (P(json="{"), "json"), (P(json="[1]"), "json"),
    (P(json={"type": "string", "pattern": "(("}), "json"), (P(regex="a(b"), "regex"),
    (P(grammar="root ::= undefined_rule"), "grammar"), (P(grammar="no rules"), "grammar"),
    (P(structural_tag={"type": "nope"}), "structural_tag"), (P(structural_tag="{"), "structural_tag")])
def test_invalid_constraint_is_a_value_error_naming_the_field(p, field):
    with pytest.raises(ValueError, match=rf"^SamplingParams\.structured_outputs\.{field} ") as e:
        build_grammar(p)
    assert "/project/" not in str(e.value)   # xgrammar's log prefix is cut


def test_structural_tag_formats():
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}}
    build_grammar(P(structural_tag={"structures": [{"begin": "<f>", "schema": schema, "end": "</f>"}],
                                    "triggers": ["<f>"]}))   # vLLM's older format
    build_grammar(P(structural_tag={"type": "structural_tag", "format": {
        "type": "tag", "begin": "<f>", "content": {"type": "json_schema", "json_schema": schema}, "end": "</f>"}}))


def test_input_processor_refuses_a_bad_constraint_before_queueing():
    # a tokenizer (unused on token ids)
    processor = InputProcessor(object(), set(), 512, 64, 16, 64, True, max_logprobs=20)
    good = SamplingParams(max_tokens=4, structured_outputs={"regex": "[0-9]+"})
    assert processor.process("a", [1, 2, 3], good).core_requests
    bad = SamplingParams(max_tokens=4, structured_outputs={"regex": "[0-9"})
    with pytest.raises(ValueError, match=r"structured_outputs\.regex is invalid"):
        processor.process("b", [1, 2, 3], bad)


UNENFORCED_CASES = {   # schema, an instance that breaks it
    "not": ({"not": {"type": "boolean"}}, "true"),
    "if": ({"if": {"type": "integer"}, "then": {"minimum": 5}}, "3"),
    "uniqueItems": ({"type": "array", "items": {"enum": [1, 2]}, "uniqueItems": True}, "[2, 2]"),
    "contains": ({"type": "array", "items": {"type": "integer"}, "contains": {"const": 5}}, "[1]"),
    "dependentRequired": ({"type": "object", "additionalProperties": True, "dependentRequired": {"a": ["b"]}},
                          '{"a": 1}'),
    "dependentSchemas": ({"type": "object", "additionalProperties": True,
                          "dependentSchemas": {"a": {"required": ["b"]}}}, '{"a": 1}'),
    "multipleOf": ({"type": "integer", "multipleOf": 7, "minimum": 1}, "50000"),
    "format 'iri'": ({"type": "string", "format": "iri"}, '"a b{"'),
    "'$ref' beside": ({"$defs": {"x": {"type": "integer"}}, "$ref": "#/$defs/x", "minimum": 5}, "3"),
}


def test_all_of_is_merged_then_enforced(compiler):
    """allOf (which xgrammar ignores) folded into its schema: [integer, minimum 5] refuses 3 and takes 7; a
    pydantic-style property allOf [$ref] with a description follows the definition; parts that clash refuse."""
    p = P(json={"allOf": [{"type": "integer"}, {"minimum": 5}]})
    assert not accepts(compiler, p, "3") and accepts(compiler, p, "7")
    ref = P(json={"$defs": {"X": {"type": "integer"}}, "type": "object", "required": ["a"],
                  "properties": {"a": {"allOf": [{"$ref": "#/$defs/X"}], "description": "an X"}}},
            disable_any_whitespace=True)
    assert accepts(compiler, ref, '{"a": 1}') and not accepts(compiler, ref, '{"a": "s"}')
    with pytest.raises(ValueError, match="allOf gives 'type' two values"):
        build_grammar(P(json={"allOf": [{"type": "string"}, {"type": "integer"}]}))
    assert accepts(compiler, P(json={"type": "integer", "multipleOf": 7}), "49")   # alone, it is enforced
    assert accepts(compiler, P(json={"type": "string", "format": "password"}), '"x"')   # an annotation


@pytest.mark.parametrize("schema, text", [
    ({"allOf": [{"type": "integer"}, False]}, "1"),                       # allOf with false matches nothing
    ({"type": "string", "anyOf": [False, {"maxLength": 2}]}, '"abcd"'),   # false took the siblings: any string
])
def test_a_false_part_is_never_read_as_the_schema_beside_it(compiler, schema, text):
    """A false schema (no instance) in allOf was dropped, and an anyOf branch of false became the keywords folded
    into it: text that violates the schema was taken. Now the grammar refuses it, or xgrammar refuses false."""
    try:
        assert not accepts(compiler, P(json=schema), text)
    except ValueError as e:
        assert "false" in str(e)


DROPPED_CASES = {   # schema, an instance that breaks it, the refusal's words: xgrammar 0.2.9 drops the keyword
    "oneOf": ({"oneOf": [{"enum": ["a", "b"]}, {"enum": ["b", "c"]}]}, '"b"', "'oneOf' whose branches may overlap"),
    "required": ({"type": "object", "required": ["zz"]}, "{}", "'required' naming a property not in"),
    "required beside properties": ({"type": "object", "properties": {"a": {"type": "integer"}},
                                    "required": ["a", "zz"], "additionalProperties": True}, '{"a": 1}',
                                   "'required' naming a property not in"),
    "dependencies": ({"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": True,
                      "dependencies": {"a": ["b"]}}, '{"a": 1}', "'dependencies'"),
    "maxLength beside pattern": ({"type": "string", "pattern": "^[a-z]+$", "maxLength": 3}, '"abcd"',
                                 "'maxLength' beside 'pattern'"),
    "minLength beside format": ({"type": "string", "format": "email", "minLength": 20}, '"a@b.co"',
                                "'minLength' beside 'pattern' or 'format'"),
    "lookahead": ({"type": "string", "pattern": "^(?=.{0,3}$)[a-z]+$"}, '"abcd"', "(lookaround or a group flag)"),
    "maxLength without type": ({"maxLength": 2}, '"abc"', "'maxLength' without 'type'"),
    "minimum without type": ({"minimum": 5}, "3", "'minimum' without 'type'"),
    "maxLength beside enum": ({"type": "string", "enum": ["a", "bb"], "maxLength": 1}, '"bb"',
                              "'maxLength' beside 'enum'"),
    "type beside enum": ({"type": "string", "enum": ["a", 1]}, "1", "'type' beside an 'enum'"),
}


# schema, an instance that breaks it, the refusal's words: UNENFORCED's keywords and the dropped ones
REFUSED_CASES = {**{k: (schema, bad, k) for k, (schema, bad) in UNENFORCED_CASES.items()}, **DROPPED_CASES}


@pytest.mark.parametrize("keyword", list(REFUSED_CASES))
def test_what_xgrammar_would_not_enforce_is_refused(compiler, keyword):
    """Each keyword xgrammar takes without enforcing it, or drops: its grammar, built directly, lets a violating
    instance through (if a newer xgrammar enforces one, this fails: drop it from UNENFORCED or _refuse_dropped);
    ours refuses the schema, naming what and where it is."""
    schema, bad, words = REFUSED_CASES[keyword]
    direct = xgr.GrammarMatcher(compiler.compile_grammar(xgr.Grammar.from_json_schema(schema, any_whitespace=False)))
    assert direct.accept_string(bad) and direct.accept_token(2), "xgrammar enforces it now"
    nested = {"type": "object", "properties": {"field": schema}, "required": ["field"]}
    with pytest.raises(ValueError, match=re.escape(words) + ".* at #/properties/field is not enforced"):
        build_grammar(P(json=nested))


def test_keywords_beside_any_of_go_into_its_branches_and_disjoint_one_of_stays(compiler):
    """{"type": "string", "maxLength": 1, "anyOf": [...]}: xgrammar read the branches alone (it took "ab" and 5);
    the siblings folded into each branch are enforced. A oneOf whose branches cannot overlap (types, a
    discriminator's consts, pydantic's $refs) is built, and is exact as anyOf."""
    p = P(json={"type": "string", "maxLength": 1, "anyOf": [{"type": "string"}, {"minLength": 0}]})
    assert accepts(compiler, p, '"a"') and not accepts(compiler, p, '"ab"') and not accepts(compiler, p, "5")
    union = {"$defs": {"Cat": {"type": "object", "properties": {"kind": {"const": "cat"}, "lives": {"type": "integer"}},
                               "required": ["kind", "lives"]},
                       "Dog": {"type": "object", "properties": {"kind": {"const": "dog"}, "good": {"type": "boolean"}},
                               "required": ["kind", "good"]}},
             "oneOf": [{"$ref": "#/$defs/Cat"}, {"$ref": "#/$defs/Dog"}],
             "discriminator": {"propertyName": "kind"}}
    assert accepts(compiler, P(json=union, disable_any_whitespace=True), '{"kind": "dog", "good": true}')
    assert accepts(compiler, P(json={"oneOf": [{"type": "integer"}, {"type": "string"}]}), '"x"')
    assert accepts(compiler, P(json={"type": "object", "propertyNames": {"maxLength": 1}}), "{}")
