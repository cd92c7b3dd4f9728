"""JSON schemas for structured-output benchmarks: an answer under any of them can run to its max_tokens
(unbounded strings and arrays), so constrained and plain runs generate the same number of tokens."""

RUN_ON_SCHEMAS = [
    {"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"]},
    {"type": "array", "items": {"type": "string"}},
    {"type": "object", "properties": {"name": {"type": "string"}, "bio": {"type": "string"}},
     "required": ["name", "bio"]},
    {"type": "object", "properties": {"id": {"type": "integer"}, "text": {"type": "string"}},
     "required": ["id", "text"]},
    {"type": "string", "pattern": "^[a-z ]+$"},
    {"type": "object", "properties": {"summary": {"type": "string"}, "score": {"type": "number"}},
     "required": ["summary", "score"]},
    {"type": "object", "properties": {"lines": {"type": "array", "items": {"type": "string"}}},
     "required": ["lines"]},
    {"type": "object", "properties": {"title": {"type": "string", "pattern": "^[A-Za-z ,.]+$"},
                                      "body": {"type": "string"}}, "required": ["title", "body"]},
]
