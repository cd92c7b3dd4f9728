"""A Lark `grammar` (vLLM's test: no line has `::=`) is converted to xgrammar's EBNF: the converted grammar takes
what Lark's own parser takes (never more), and what is not converted is a 400 naming the field, line and
construct, where the request enters."""
import pytest

from pagedllm.server.errors import APIError
from pagedllm.server.protocol import CompletionRequest
from pagedllm.server.structured_fields import structured_outputs
from pagedllm.structured_output.grammar_spec import build_grammar
from pagedllm.structured_output.lark_ebnf import grammar_is_lark, lark_to_ebnf
from pagedllm.structured_output.params import StructuredOutputsParams as P
from structured_output_schemas import LARK_GRAMMARS, lark_accepts

xgr = pytest.importorskip("xgrammar")


def converted_accepts(grammar: str, text: str) -> bool:
    from xgrammar.testing import _is_grammar_accept_string
    return _is_grammar_accept_string(build_grammar(P(grammar=grammar)), text)


def test_lark_is_told_from_ebnf_as_vllm_does():
    assert grammar_is_lark("rule: 'abc'") and grammar_is_lark('start: "a"  // x ::= y')
    assert not grammar_is_lark("rule ::= 'abc'") and not grammar_is_lark('# Lark?\nroot ::= "a"')
    # EBNF goes to xgrammar as it is: its errors are EBNF's
    with pytest.raises(ValueError, match=r"grammar is invalid"):
        build_grammar(P(grammar="root ::= missing"))


def test_vllms_example_and_the_start_rule():
    assert lark_to_ebnf("rule: 'hello'") == 'root ::= rule\nrule ::= "hello"'
    assert lark_to_ebnf('a: "x"\nstart: a "y"').splitlines()[0] == "root ::= start"
    assert lark_to_ebnf('root: "x"') == 'root ::= "x"'


def test_the_corpus_compiles():
    from transformers import AutoTokenizer

    from pagedllm.config import DEMO_MODEL
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(AutoTokenizer.from_pretrained(DEMO_MODEL),
                                                                      vocab_size=512, stop_token_ids=[2]))
    for grammar in LARK_GRAMMARS.values():
        compiler.compile_grammar(build_grammar(P(grammar=grammar)))


# (grammar, texts): each text taken by the converted grammar exactly when Lark takes it
SAME_AS_LARK = [
    (LARK_GRAMMARS["sql"], ["SELECT * FROM users", "SELECT id FROM orders WHERE name = 7", "SELECT * FROM users ",
                            "SELECT id FROM orders WHERE name = 1234", "select * from users"]),
    (LARK_GRAMMARS["list"], ["[]", "[ab,-12,c,0]", "[ab,-12,c,0,d]", "[abcdef]", "[,]", "[-]"]),
    (LARK_GRAMMARS["switches"], ["a=oN", "a1=OFF;b=3;c_=on", "a=on;b=on;c=on;d=on", "A=on", "ab=2", "a=10"]),
    ('?start: sum\n?sum: product\n  | sum "+" product -> add\n  | sum "-" product\n'
     '?product: NUMBER | "(" sum ")"\nNUMBER: /[0-9]+(\\.[0-9]+)?/',
     ["1", "1+2", "(1.5-2)+3", "1+", "1.", "", "(1", "12.34"]),
    ('start: "a\\\\b" "\\x41" "\\u00e9" "a\\db" "\\t" "q\\"q" "\\U0001F600"',
     ['a\\bAéa\\db\tq"q😀', 'abAéadb\tq"q😀']),
    ("start: /a.b/", ["axb", "a\nb", "ab"]),
    ("start: /a.b/s", ["axb", "a\nb"]),
    ("start: /[]a]+/ /[^]b]/ /\\x41\\//", ["]a]cA/", "]]A/", "a]A/"]),
    ('start: ("x" | "y")~2..3 ["z"] "a".."c"+', ["xyb", "xyzabc", "xyxzc", "xc", "xyxyc", "xyd"]),
    ('start:\n  | "yes"\n  | "no"  # an empty first alternative\n', ["", "yes", "no", "yesno"]),
    ("start: A B\nA: /[a-z]+/\nB: /[a-z0-9]+/", ["ab", "a1", "a", "1"]),
    ('start: "ab"i "c"', ["AbC", "aBc", "ABc"]),
]


@pytest.mark.parametrize("grammar, texts", SAME_AS_LARK)
def test_the_converted_grammar_takes_what_lark_takes(grammar, texts):
    for text in texts:
        assert converted_accepts(grammar, text) == lark_accepts(grammar, text), (grammar, text)


def test_a_regex_class_takes_a_part_of_pythons_never_more():
    """\\d \\w \\s are ASCII (Python's take more of Unicode), as the `regex` field's: sound, not complete."""
    grammar = "start: /\\d+/ /\\w/ /\\s/"
    assert converted_accepts(grammar, "12a_ ") is False and lark_accepts(grammar, "12a_ ") is False
    assert converted_accepts(grammar, "12a ") and lark_accepts(grammar, "12a ")
    for text in ["١a ", "1é ", "1a\u2003"]:
        assert not converted_accepts(grammar, text) and lark_accepts(grammar, text), text


@pytest.mark.parametrize("grammar, construct", [
    ("%import common.WS\nstart: WS", "line 1: the directive %import is not supported"),
    ('start: "a"\n%ignore " "', "line 2: the directive %ignore is not supported"),
    ("%declare X\nstart: X", "the directive %declare"),
    ('_sep{x}: x\nstart: _sep{"a"}', "line 1: templates (_sep{...})"),
    ("start: /a/i", "the regex flag 'i' of /a/i"),
    ("start: /^a/", "the anchor '^'"),
    ("start: /\\bx/", "the escape \\b"),
    ("start: /\\D/", "the escape \\D"),
    ("start: /[^\\d]/", "\\d in a negated class"),
    ("start: /(?=a)b/", "the regex /(?=a)b/ is not supported: Regex parsing error at position 3: Lookahead"),
    ("start: /[z-a]/", "the regex /[z-a]/ is not supported"),
    ("start: a", "line 1: 'a' is used but not defined"),
    ('start: "a"\nstart: "b"', "line 2: 'start' is defined twice"),
    ('start: A\nA: b\nb: "x"', "line 2: a terminal cannot use the rule 'b'"),
    ('start: "a"\nroot: "b"', "a rule named 'root' that is not the start"),
    ("start: " + "(" * 60 + '"a"' + ")" * 60, "groups nested deeper than 50"),
    ('start: "ab".."c"', "a range needs two characters"),
    ('start: "a" ~ 3..2', "'~ 3..2' is not a repetition count"),
    ('start: "a" (', "expected ')'"),
    ('start: "\\xZZ"', "bad escape \\xZZ"),
    ('start: "a" @', "unexpected '@'"),
    ('root := "a"', "unexpected '='"),
])
def test_what_is_not_converted_is_refused_naming_the_construct(grammar, construct):
    with pytest.raises(ValueError) as e:
        build_grammar(P(grammar=grammar))
    message = str(e.value)
    assert message.startswith("SamplingParams.structured_outputs.grammar (read as Lark: no line has '::=') cannot be "
                              "converted to EBNF: ")
    assert construct in message, message


@pytest.mark.parametrize("fields, param, name", [
    ({"guided_grammar": "%import common.WS\nstart: WS"}, "guided_grammar", "guided_grammar"),
    ({"structured_outputs": {"grammar": "start: /^a/"}}, "structured_outputs", "structured_outputs.grammar"),
])
def test_the_server_answers_400_naming_the_field(fields, param, name):
    with pytest.raises(APIError) as e:
        structured_outputs(CompletionRequest(prompt="x", **fields))
    assert (e.value.status, e.value.param) == (400, param)
    assert e.value.message.startswith(f"{name} (read as Lark"), e.value.message


def test_the_server_takes_a_lark_grammar():
    params, name = structured_outputs(CompletionRequest(prompt="x", guided_grammar=LARK_GRAMMARS["sql"]))
    assert (params, name) == (P(grammar=LARK_GRAMMARS["sql"]), "guided_grammar")
