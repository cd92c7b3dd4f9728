"""A constraint as an xgrammar Grammar (placeholder until the API branch lands its full version)."""
import json

from pagedllm.structured_output.params import StructuredOutputsParams


def build_grammar(p: StructuredOutputsParams):
    import xgrammar as xgr
    ws = not p.disable_any_whitespace
    if p.json is not None:
        schema = p.json if isinstance(p.json, str) else json.dumps(p.json)
        return xgr.Grammar.from_json_schema(schema, any_whitespace=ws, strict_mode=p.disable_additional_properties)
    if p.json_object:
        return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=ws)
    if p.regex is not None:
        return xgr.Grammar.from_regex(p.regex)
    if p.choice is not None:
        return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(c) for c in p.choice))
    if p.grammar is not None:
        return xgr.Grammar.from_ebnf(p.grammar)
    tag = p.structural_tag if isinstance(p.structural_tag, str) else json.dumps(p.structural_tag)
    return xgr.Grammar.from_structural_tag(tag)
