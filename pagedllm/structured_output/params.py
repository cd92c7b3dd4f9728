"""What a request constrains its output to (vLLM's StructuredOutputsParams: exactly one constraint)."""
import json
from dataclasses import dataclass, fields

KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass
class StructuredOutputsParams:
    json: str | dict | None = None            # a JSON schema (a dict or its JSON text)
    regex: str | None = None                  # the whole output full-matches it
    choice: list[str] | None = None           # the output is one of these strings
    grammar: str | None = None                # EBNF (GBNF-style), `root` first; or Lark (no line has `::=`)
    json_object: bool | None = None           # any JSON object
    structural_tag: str | dict | None = None  # xgrammar's structural tag (JSON text or dict)
    disable_any_whitespace: bool = False      # JSON: no whitespace between tokens but single spaces
    disable_additional_properties: bool = False   # JSON schema: additionalProperties false where unset
    whitespace_pattern: str | None = None     # vLLM's: only None (xgrammar takes no whitespace pattern)

    def __post_init__(self):
        # json_object False is set (vLLM counts it), never "off": beside another kind it is a second one, and
        # alone it is refused by name (vLLM 0.26 refuses it as a request is checked)
        given = [k for k in KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("SamplingParams.structured_outputs must set exactly one of "
                             f"{', '.join(KINDS)}; got {', '.join(given) or 'none'}")
        _check_type(self)
        if self.json_object is False:
            raise ValueError("SamplingParams.structured_outputs.json_object must be True if set; omit "
                             "structured_outputs to have no constraint")
        if self.whitespace_pattern is not None:
            raise ValueError("SamplingParams.structured_outputs.whitespace_pattern must be None: xgrammar, the "
                             "grammar engine here, takes no whitespace pattern (disable_any_whitespace allows "
                             "single spaces only)")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) is not None)

    def key(self) -> tuple[str, str]:
        """(kind, canonical text): what the compile cache is keyed by (equal constraints compile once)."""
        kind = self.kind
        value = getattr(self, kind)
        if kind in ("json", "structural_tag"):
            text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
            if kind == "json" and self.disable_additional_properties:
                kind += ":no_additional"
            if kind.startswith("json") and self.disable_any_whitespace:
                kind += ":compact"
            return kind, text
        if kind == "choice":
            return kind, json.dumps(value)
        if kind == "json_object":
            return kind + (":compact" if self.disable_any_whitespace else ""), ""
        return kind, value

    @classmethod
    def from_dict(cls, value: "dict | StructuredOutputsParams") -> "StructuredOutputsParams":
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"SamplingParams.structured_outputs must be a dict or StructuredOutputsParams, "
                             f"got {type(value).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = [k for k in value if k not in names]
        if unknown:
            raise ValueError(f"SamplingParams.structured_outputs has unknown field {unknown[0]!r} "
                             f"(known: {', '.join(sorted(names))})")
        return cls(**value)


def _check_type(p: StructuredOutputsParams):
    checks = {"json": (str, dict), "regex": (str,), "grammar": (str,), "structural_tag": (str, dict),
              "json_object": (bool,),
              # flags read by truth: "false" would have made the JSON compact
              "disable_any_whitespace": (bool,), "disable_additional_properties": (bool,)}
    for name, types in checks.items():
        v = getattr(p, name)
        if v is not None and not isinstance(v, types):
            raise ValueError(f"SamplingParams.structured_outputs.{name} must be "
                             f"{' or '.join(t.__name__ for t in types)}, got {type(v).__name__}")
    if p.choice is not None and not (isinstance(p.choice, list) and p.choice
                                     and all(isinstance(c, str) for c in p.choice)):
        raise ValueError("SamplingParams.structured_outputs.choice must be a non-empty list of strings")
    for name in ("regex", "grammar"):
        if getattr(p, name) == "":
            raise ValueError(f"SamplingParams.structured_outputs.{name} must not be empty")
