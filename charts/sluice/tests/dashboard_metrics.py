#!/usr/bin/env python3
"""List every metric name the chart's Grafana dashboards query.

Prints one name per line, sorted and de-duplicated, e.g.

    envoy_cluster_upstream_rq_time_bucket
    envoy_cluster_upstream_rq_total
    ...

Histogram series keep the suffix they are queried with (`_bucket`), so the
list can be compared name for name with a /metrics scrape. The end-to-end test
of the proxy does exactly that: every name printed here must appear in a real
scrape, or a panel would stay empty.

Names come from each panel's `targets[].expr` (rows and collapsed rows
included) and from the dashboard's query variables (`label_values(metric,
label)`, `query_result(expr)`). Extraction is done by a small PromQL lexer,
not by regular expressions over the text: strings, label matchers, range and
subquery brackets, `by`/`without`/`on`/`ignoring`/`group_*` label lists,
function and aggregation names, keywords, numbers, durations and Grafana
variables are all skipped; a `{__name__="..."}` matcher counts as a name.

Options:
  --panels-only     ignore template variables
  --with-source     print "name<TAB>where it is used" instead
  --self-test       run the lexer against tricky expressions and exit
  --check-promql    also parse every expression with the promql-parser
                    package and fail if it does not parse or if its AST names
                    different metrics than the lexer found
  --lint            also check the dashboard's wiring: unique panel ids, every
                    query on the ${datasource} variable, the datasource and
                    `cluster` (envoy_cluster_name) variables present
Positional: dashboard JSON files (default: ../dashboards/*.json).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, Iterator

DASHBOARD_DIR = Path(__file__).resolve().parent.parent / "dashboards"

AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile", "limitk", "limit_ratio",
}
# Keywords that are never metric names where they stand.
KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "bool", "offset", "start", "end", "inf", "nan", "atan2",
}
# Keywords followed by a parenthesised list of label names.
LABEL_LIST_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}

# Grafana's built-in interval variables: stand-ins for a duration.
GRAFANA_INTERVAL = re.compile(r"\$(?:__(?:rate_interval|interval|range)(?:_ms|_s)?\b|\{__(?:rate_interval|interval|range)(?:_ms|_s)?\})")
GRAFANA_VAR = re.compile(r"\$(?:\{[^}]+\}|[A-Za-z_]\w*)|\[\[[^\]]+\]\]")

TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<comment>\#[^\n]*)
  | (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<duration>(?:\d+(?:ms|[smhdwy]))+(?![\w:]))
  | (?P<number>0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=,(){}\[\]@:])
    """,
    re.VERBOSE,
)


class PromQLLexError(ValueError):
    """The expression holds a character PromQL does not allow."""


def tokens(expr: str) -> list[tuple[str, str]]:
    """(kind, text) tokens of a PromQL expression, whitespace and comments dropped."""
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(expr):
        m = TOKEN.match(expr, pos)
        if not m:
            raise PromQLLexError(f"unexpected {expr[pos:pos + 20]!r} at {pos} in {expr!r}")
        kind = m.lastgroup or ""
        if kind not in ("ws", "comment"):
            out.append((kind, m.group()))
        pos = m.end()
    return out


def unquote(s: str) -> str:
    if s.startswith("`"):
        return s[1:-1]
    return bytes(s[1:-1], "utf-8").decode("unicode_escape")


def substitute_grafana(expr: str) -> str:
    """Replace Grafana variables outside strings so the text is plain PromQL."""
    parts = re.split(r"(\"(?:\\.|[^\"\\])*\"|'(?:\\.|[^'\\])*'|`[^`]*`)", expr)
    for i in range(0, len(parts), 2):
        parts[i] = GRAFANA_INTERVAL.sub("5m", parts[i])
        parts[i] = GRAFANA_VAR.sub("1", parts[i])
    return "".join(parts)


def metric_names(expr: str) -> set[str]:
    """Metric names selected by a PromQL expression (Grafana variables allowed)."""
    toks = tokens(substitute_grafana(expr))
    names: set[str] = set()
    i = 0
    while i < len(toks):
        kind, text = toks[i]
        nxt = toks[i + 1][1] if i + 1 < len(toks) else ""
        if text == "{":
            # Label matchers: only __name__="x" names a metric.
            j = i + 1
            while j < len(toks) and toks[j][1] != "}":
                if (
                    toks[j] == ("ident", "__name__")
                    and j + 2 < len(toks)
                    and toks[j + 1][1] == "="
                    and toks[j + 2][0] == "string"
                ):
                    names.add(unquote(toks[j + 2][1]))
                j += 1
            i = j + 1
            continue
        if text == "[":
            # Range or subquery: [5m], [1h:30s].
            while i < len(toks) and toks[i][1] != "]":
                i += 1
            i += 1
            continue
        if kind == "ident":
            low = text.lower()
            if low in LABEL_LIST_KEYWORDS and nxt == "(":
                depth = 0
                while i < len(toks):
                    if toks[i][1] == "(":
                        depth += 1
                    elif toks[i][1] == ")":
                        depth -= 1
                        if depth == 0:
                            break
                    i += 1
                i += 1
                continue
            if low in KEYWORDS or text in AGGREGATIONS or nxt == "(":
                i += 1
                continue
            names.add(text)
        i += 1
    return names


def variable_expressions(query: str) -> list[str]:
    """PromQL inside a Grafana Prometheus variable query."""
    q = query.strip()
    m = re.fullmatch(r"label_values\((.*)\)", q, re.S)
    if m:
        inner = m.group(1)
        # label_values(label) names no metric; label_values(expr, label) does.
        depth, split = 0, -1
        for idx, ch in enumerate(inner):
            if ch in "({[":
                depth += 1
            elif ch in ")}]":
                depth -= 1
            elif ch == "," and depth == 0:
                split = idx
        return [inner[:split]] if split >= 0 else []
    m = re.fullmatch(r"query_result\((.*)\)", q, re.S)
    if m:
        return [m.group(1)]
    if re.fullmatch(r"(label_names|metrics)\(.*\)", q, re.S):
        return []
    return [q]


def walk_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in panels:
        yield p
        yield from walk_panels(p.get("panels") or [])


def expressions(dashboard: dict[str, Any], panels_only: bool) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every query of a dashboard."""
    for p in walk_panels(dashboard.get("panels") or []):
        for t in p.get("targets") or []:
            expr = t.get("expr")
            if isinstance(expr, str) and expr.strip():
                yield f"panel {p.get('id')} {p.get('title')!r} {t.get('refId', '')}", expr
    if panels_only:
        return
    for v in (dashboard.get("templating") or {}).get("list") or []:
        if v.get("type") != "query":
            continue
        q = v.get("query")
        if isinstance(q, dict):
            q = q.get("query")
        if isinstance(q, str):
            for expr in variable_expressions(q):
                yield f"variable ${v.get('name')}", expr


def promql_names(expr: str) -> set[str]:
    """Metric names per the promql-parser AST (raises on a parse error)."""
    import promql_parser

    found: set[str] = set()

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                found.add(node.name)
            for m in node.matchers.matchers:
                if m.name == "__name__" and str(m.op) in ("MatchOp.Equal", "="):
                    found.add(m.value)
        return True

    promql_parser.walk(promql_parser.parse(substitute_grafana(expr)), visit)
    return found


def lint(dashboard: dict[str, Any]) -> list[str]:
    """Wiring mistakes that leave panels empty or tied to one Grafana's datasource."""
    problems: list[str] = []
    variables = {v.get("name"): v for v in (dashboard.get("templating") or {}).get("list") or []}
    ds_var = variables.get("datasource")
    if not ds_var or ds_var.get("type") != "datasource" or ds_var.get("query") != "prometheus":
        problems.append("no `datasource` variable of type datasource for prometheus")
    cluster = variables.get("cluster")
    if not cluster or "envoy_cluster_name" not in json.dumps(cluster.get("query")):
        problems.append("no `cluster` variable over envoy_cluster_name")
    for name, v in variables.items():
        if v.get("type") == "query" and (v.get("datasource") or {}).get("uid") != "${datasource}":
            problems.append(f"variable ${name} does not query the ${{datasource}} variable")
    ids: dict[Any, str] = {}
    for p in walk_panels(dashboard.get("panels") or []):
        title = p.get("title")
        if p.get("id") in ids:
            problems.append(f"panel id {p.get('id')} used by {ids[p.get('id')]!r} and {title!r}")
        ids[p.get("id")] = title
        if "gridPos" not in p:
            problems.append(f"panel {title!r} has no gridPos")
        if p.get("type") == "row":
            continue
        targets = p.get("targets") or []
        if not targets:
            problems.append(f"panel {title!r} has no query")
        for t in [p] + targets:
            uid = (t.get("datasource") or {}).get("uid")
            if uid != "${datasource}":
                problems.append(f"panel {title!r} uses datasource {uid!r}, not ${{datasource}}")
        for t in targets:
            expr = t.get("expr", "")
            if "$cluster" not in expr and "envoy_cluster_name" in expr:
                problems.append(f"panel {title!r} queries clusters without the $cluster filter")
    return problems


SELF_TESTS: list[tuple[str, set[str]]] = [
    ("up", {"up"}),
    ('sum by (le, envoy_cluster_name) (rate(x_bucket{envoy_cluster_name=~"$cluster"}[$__rate_interval]))', {"x_bucket"}),
    ("histogram_quantile(0.99, sum(rate(a_bucket[5m])) by (le))", {"a_bucket"}),
    ('sum without (instance) (a) / on (job) group_left (node) b', {"a", "b"}),
    ('a{label="by (x) sum(b)"} unless ignoring(le) c offset 1h30m', {"a", "c"}),
    ('{__name__="named_metric", job="x"} + {__name__=~"regex.*"}', {"named_metric"}),
    ('label_replace(m1, "dst", "$1", "src", "(.*)")', {"m1"}),
    ("max_over_time(rate(m2[5m])[1h:1m]) > bool 0.5e3", {"m2"}),
    ("topk(5, m3) or vector(0) and on() m4 @ start()", {"m3", "m4"}),
    ("# a comment naming not_a_metric\nm5 * -1 + Inf - NaN", {"m5"}),
    ("(sum by (c) (rate(e{k='5'}[$__rate_interval])) or sum by (c) (rate(t[5m])) * 0) / sum by (c) (rate(t[5m]))", {"e", "t"}),
    ("ns:recording_rule:rate5m", {"ns:recording_rule:rate5m"}),
    ("count_values(\"v\", m6) > ${threshold}", {"m6"}),
]


def self_test() -> int:
    failed = 0
    for expr, want in SELF_TESTS:
        got = metric_names(expr)
        if got != want:
            failed += 1
            print(f"FAIL {expr!r}: got {sorted(got)}, want {sorted(want)}")
    for q, want_exprs in [
        ('label_values(m{a="1,2"}, lbl)', ['m{a="1,2"}']),
        ("label_values(lbl)", []),
        ("query_result(topk(3, m))", ["topk(3, m)"]),
    ]:
        got_exprs = variable_expressions(q)
        if got_exprs != want_exprs:
            failed += 1
            print(f"FAIL variable {q!r}: got {got_exprs}, want {want_exprs}")
    total = len(SELF_TESTS) + 3
    try:
        import promql_parser  # noqa: F401
    except ImportError:
        print("note: promql-parser not installed; expectations not cross-checked with a PromQL parser")
    else:
        # The expectations themselves must agree with a real PromQL parser.
        for expr, want in SELF_TESTS:
            total += 1
            try:
                got = promql_names(expr)
            except Exception as e:  # the parser raises its own error types
                got = {f"<parse error: {e}>"}
            if got != want:
                failed += 1
                print(f"FAIL parser cross-check {expr!r}: parser {sorted(got)}, want {sorted(want)}")
    print(f"dashboard_metrics self-test: {total - failed} passed, {failed} failed")
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    flags = {a for a in argv if a.startswith("--")}
    known = {"--panels-only", "--with-source", "--self-test", "--check-promql", "--lint"}
    if flags - known:
        print(f"unknown option(s): {sorted(flags - known)}\n{__doc__}", file=sys.stderr)
        return 2
    if "--self-test" in flags:
        return self_test()
    files = [Path(a) for a in argv if not a.startswith("--")] or sorted(DASHBOARD_DIR.glob("*.json"))
    if not files:
        print(f"no dashboards found in {DASHBOARD_DIR}", file=sys.stderr)
        return 1

    uses: dict[str, list[str]] = {}
    errors: list[str] = []
    for f in files:
        dashboard = json.loads(f.read_text())
        if "--lint" in flags:
            errors.extend(f"{f.name}: {e}" for e in lint(dashboard))
        for where, expr in expressions(dashboard, "--panels-only" in flags):
            try:
                names = metric_names(expr)
            except PromQLLexError as e:
                errors.append(f"{f.name}: {where}: {e}")
                continue
            if not names:
                errors.append(f"{f.name}: {where}: names no metric: {expr!r}")
            if "--check-promql" in flags:
                try:
                    ast_names = promql_names(expr)
                except Exception as e:  # the parser raises its own error types
                    errors.append(f"{f.name}: {where}: does not parse as PromQL: {e}")
                else:
                    if ast_names != names:
                        errors.append(
                            f"{f.name}: {where}: lexer found {sorted(names)}, "
                            f"PromQL parser found {sorted(ast_names)}"
                        )
            for n in names:
                uses.setdefault(n, []).append(f"{f.name}: {where}")

    for e in errors:
        print(f"ERROR {e}", file=sys.stderr)
    for name in sorted(uses):
        if "--with-source" in flags:
            print(f"{name}\t{'; '.join(uses[name])}")
        else:
            print(name)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
