"""20 coding chat prompts for the speculative decoding benchmark (spec_decode_cpu.py).

"write": write a short function from a description (the answer is new text: a draft model can guess it, prompt
lookup has little to copy). "edit": a 20-40 line snippet to return whole with one small change (the answer repeats
the prompt: what prompt lookup, the ngram method, is for).
"""

SYSTEM = {"role": "system", "content": "You are a helpful coding assistant. Answer with code only."}

WRITE_TASKS = [
    "Write a Python function `is_palindrome(s)` that ignores case and non-alphanumeric characters.",
    ("Write a JavaScript function `debounce(fn, ms)` that delays calls to fn until ms milliseconds have passed "
     "without a new call."),
    "Write a Python function `flatten(nested)` that flattens an arbitrarily nested list of lists into one list.",
    "Write a JavaScript function `chunk(array, size)` that splits an array into arrays of at most `size` items.",
    ("Write a Python function `word_counts(text)` that returns a dict mapping each lowercase word to how often "
     "it occurs."),
    ("Write a Python function `binary_search(items, target)` that returns the index of target in a sorted list, "
     "or -1."),
    "Write a JavaScript function `deepEqual(a, b)` that compares two plain objects or arrays recursively.",
    "Write a Python function `parse_duration(s)` that turns strings like '1h30m' or '45s' into a number of seconds.",
    "Write a JavaScript function `groupBy(items, keyFn)` that returns an object mapping each key to its items.",
    ("Write a Python class `LRUCache` with `get(key)` and `put(key, value)` and a fixed capacity, using "
     "collections.OrderedDict."),
]

_INVENTORY = '''\
class Inventory:
    def __init__(self):
        self.items = {}

    def add(self, name, qty):
        if qty <= 0:
            raise ValueError("qty must be positive")
        self.items[name] = self.items.get(name, 0) + qty

    def remove(self, name, qty):
        have = self.items.get(name, 0)
        if qty > have:
            raise ValueError(f"only {have} of {name} left")
        if qty == have:
            del self.items[name]
        else:
            self.items[name] = have - qty

    def count(self, name):
        return self.items.get(name, 0)

    def total(self):
        return sum(self.items.values())

    def names(self):
        return sorted(self.items)
'''

_MOVING_AVERAGE = '''\
def moving_average(values, window):
    if window <= 0:
        raise ValueError("window must be positive")
    result = []
    total = 0.0
    for i in range(len(values)):
        total += values[i]
        if i >= window:
            total -= values[i - window]
        if i >= window:
            result.append(total / window)
    return result


def main():
    data = [3, 5, 7, 2, 8, 10, 11, 65, 72, 81, 99, 100, 150]
    for w in (2, 3, 4):
        avg = moving_average(data, w)
        print(f"window {w}: {len(avg)} values")
        print(", ".join(f"{x:.2f}" for x in avg))


if __name__ == "__main__":
    main()
'''

_TODO_JS = '''\
class TodoList {
  constructor() {
    this.items = [];
    this.nextId = 1;
  }

  add(text) {
    const item = { id: this.nextId++, text, done: false };
    this.items.push(item);
    return item;
  }

  toggle(id) {
    const item = this.items.find((it) => it.id === id);
    if (!item) {
      throw new Error(`no item ${id}`);
    }
    item.done = !item.done;
  }

  remove(id) {
    this.items = this.items.filter((it) => it.id !== id);
  }

  pending() {
    return this.items.filter((it) => !it.done);
  }
}

module.exports = { TodoList };
'''

_CSV_STATS = '''\
import csv
import statistics


def load_rows(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader)


def column_stats(rows, column):
    vals = [float(r[column]) for r in rows if r[column] != ""]
    if not vals:
        return None
    return {
        "count": len(vals),
        "mean": statistics.mean(vals),
        "median": statistics.median(vals),
        "min": min(vals),
        "max": max(vals),
    }


def report(path, columns):
    rows = load_rows(path)
    for column in columns:
        stats = column_stats(rows, column)
        if stats is None:
            print(f"{column}: no data")
            continue
        print(f"{column}: mean {stats['mean']:.3f} over {stats['count']} rows")
'''

_PAGINATE_JS = '''\
function paginate(items, page, perPage) {
  const totalPages = Math.ceil(items.length / perPage);
  if (page < 1 || page > totalPages) {
    return { items: [], page, totalPages };
  }
  const start = page * perPage;
  const end = start + perPage;
  return {
    items: items.slice(start, end),
    page,
    totalPages,
  };
}

function pageLinks(page, totalPages) {
  const links = [];
  for (let p = 1; p <= totalPages; p++) {
    links.push({ page: p, current: p === page });
  }
  return links;
}

module.exports = { paginate, pageLinks };
'''

_TOKENIZER = '''\
import re

TOKEN_RE = re.compile(r"\\s*(?:(\\d+\\.?\\d*)|(.))")


def tokenize(expr):
    tokens = []
    for number, op in TOKEN_RE.findall(expr):
        if number:
            tokens.append(("num", float(number)))
        elif op in "+-*/()":
            tokens.append(("op", op))
        elif op.strip():
            raise SyntaxError(f"unexpected character {op!r}")
    return tokens


def evaluate(tokens):
    stack = []
    for kind, value in tokens:
        if kind == "num":
            stack.append(value)
        elif value == "+":
            b, a = stack.pop(), stack.pop()
            stack.append(a + b)
        elif value == "*":
            b, a = stack.pop(), stack.pop()
            stack.append(a * b)
    return stack[-1]
'''

_RETRY = '''\
import random
import time


def retry(fn, attempts=3, base_delay=0.5, exceptions=(Exception,)):
    last_error = None
    for attempt in range(attempts):
        try:
            return fn()
        except exceptions as e:
            last_error = e
            delay = base_delay * (2 ** attempt)
            delay += random.uniform(0, delay / 2)
            time.sleep(delay)
    raise last_error


def flaky():
    if random.random() < 0.7:
        raise ConnectionError("network down")
    return "ok"


if __name__ == "__main__":
    print(retry(flaky, attempts=5, base_delay=0.1))
'''

_MATRIX = '''\
def make_matrix(rows, cols, fill=0):
    return [[fill for _ in range(cols)] for _ in range(rows)]


def transpose(m):
    rows, cols = len(m), len(m[0])
    t = make_matrix(cols, rows)
    for i in range(rows):
        for j in range(cols):
            t[j][i] = m[i][j]
    return t


def matmul(a, b):
    n, k, m = len(a), len(b), len(b[0])
    if len(a[0]) != k:
        raise ValueError("shapes do not match")
    out = make_matrix(n, m)
    for i in range(n):
        for j in range(m):
            s = 0
            for p in range(k):
                s += a[i][p] * b[p][j]
            out[i][j] = s
    return out
'''

_FETCH_JS = '''\
async function fetchUsers(baseUrl, ids) {
  const results = [];
  for (const id of ids) {
    const res = await fetch(`${baseUrl}/users/${id}`);
    if (!res.ok) {
      results.push({ id, error: res.status });
      continue;
    }
    const data = await res.json();
    results.push({ id, name: data.name, email: data.email });
  }
  return results;
}

function summarize(results) {
  const ok = results.filter((r) => !r.error);
  const failed = results.filter((r) => r.error);
  return {
    ok: ok.length,
    failed: failed.length,
    names: ok.map((r) => r.name),
  };
}

module.exports = { fetchUsers, summarize };
'''

_GRID = '''\
from collections import deque


def neighbors(grid, r, c):
    for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        nr, nc = r + dr, c + dc
        if 0 <= nr < len(grid) and 0 <= nc < len(grid[0]) and grid[nr][nc] != "#":
            yield nr, nc


def shortest_path(grid, start, goal):
    queue = deque([(start, 0)])
    seen = {start}
    while queue:
        (r, c), d = queue.popleft()
        if (r, c) == goal:
            return d
        for nxt in neighbors(grid, r, c):
            if nxt not in seen:
                seen.add(nxt)
                queue.append((nxt, d + 1))
    return -1


GRID = ["..#.", "..#.", "....", "#..."]
print(shortest_path(GRID, (0, 0), (0, 3)))
'''

EDIT_TASKS = [
    (_INVENTORY, "Rename the attribute `items` to `stock` everywhere."),
    (_MOVING_AVERAGE, "Fix the off-by-one: the average of the first full window (i == window - 1) is missing."),
    (_TODO_JS, "Add a JSDoc comment above the `add` method."),
    (_CSV_STATS, "Add a docstring to `column_stats`."),
    (_PAGINATE_JS, "Fix the off-by-one: pages are numbered from 1, so the start index is wrong."),
    (_TOKENIZER, "Make `evaluate` also handle the '-' operator, like '+'."),
    (_RETRY, "Rename the parameter `attempts` to `max_attempts` everywhere."),
    (_MATRIX, "Add a docstring to `matmul`."),
    (_FETCH_JS, "Rename the function `summarize` to `summarizeResults` everywhere."),
    (_GRID, "Rename the variable `seen` to `visited`."),
]


def _edit_prompt(code: str, change: str) -> str:
    return f"{change} Return the whole code with only that change.\n\n```\n{code}```"


PROMPTS = ([{"kind": "write", "messages": [SYSTEM, {"role": "user", "content": t}]} for t in WRITE_TASKS]
           + [{"kind": "edit", "messages": [SYSTEM, {"role": "user", "content": _edit_prompt(code, change)}]}
              for code, change in EDIT_TASKS])
