"""Structured output: constraints (params.py), their compilation off the step loop (compiler.py), and the
per-request matchers that fill each step's token bitmask (grammar.py). xgrammar is the grammar engine; it is
imported only when a request first uses a constraint."""
