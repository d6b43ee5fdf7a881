"""Turning rounds into medians, ratios, a markdown table, JSON and a chart."""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Round:
    """One measured round of one proxy on one workload."""

    index: int
    ok: bool
    error: str | None = None
    rps: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    requests: int | None = None
    duration_s: float | None = None
    proxy_cpu_s: float | None = None
    cpu_per_10k: float | None = None
    idle_rss_mib: float | None = None
    peak_rss_mib: float | None = None
    backend_cpu_per_10k: float | None = None
    #: Requests through the proxy in the warm-up and the measured run.
    proxied_requests: int | None = None
    #: Tracing workloads: what the OTLP sink received from the proxy during the round.
    trace_exports: int | None = None
    trace_spans: int | None = None
    #: CPU seconds the sink spent on them (on the load generator's CPU).
    trace_sink_cpu_s: float | None = None

    @property
    def spans_per_100(self) -> float | None:
        if self.trace_spans is None or not self.proxied_requests:
            return None
        return 100 * self.trace_spans / self.proxied_requests


@dataclass
class Row:
    """All rounds of one proxy ("sluice", "envoy" or "direct") on one workload."""

    workload: str
    proxy: str
    command: str = ""
    #: Set when the proxy could not run this workload at all (not built, exits, no bootstrap).
    unavailable: str | None = None
    rounds: list[Round] = field(default_factory=list)

    @property
    def ok_rounds(self) -> list[Round]:
        return [r for r in self.rounds if r.ok]

    @property
    def failed_rounds(self) -> list[Round]:
        return [r for r in self.rounds if not r.ok]

    def median(self, metric: str) -> float | None:
        values = [getattr(r, metric) for r in self.ok_rounds if getattr(r, metric) is not None]
        return statistics.median(values) if values else None

    def usable(self) -> bool:
        return not self.unavailable and bool(self.ok_rounds)

    def spread(self, metric: str) -> float | None:
        """Half the min-max range relative to the median (a rough noise figure)."""
        values = [getattr(r, metric) for r in self.ok_rounds if getattr(r, metric) is not None]
        med = self.median(metric)
        if len(values) < 2 or not med:
            return None
        return (max(values) - min(values)) / 2 / med


#: (metric, column title, format)
COLUMNS = [
    ("rps", "req/s", "{:,.0f}"),
    ("p50_ms", "p50 ms", "{:.2f}"),
    ("p99_ms", "p99 ms", "{:.2f}"),
    ("cpu_per_10k", "proxy CPU s / 10k req", "{:.3f}"),
    ("idle_rss_mib", "idle RSS MiB", "{:.1f}"),
    ("peak_rss_mib", "peak RSS MiB", "{:.1f}"),
    ("backend_cpu_per_10k", "backend CPU s / 10k req", "{:.3f}"),
]


@dataclass(frozen=True)
class Ratio:
    metric: str
    title: str
    #: Target for Sluice/Envoy (issue 8), or None.
    target: float | None
    higher_is_better: bool
    #: Only for these workloads (None = all).
    workloads: tuple[str, ...] | None = None


RATIOS = [
    Ratio("rps", "req/s", 1.5, True),
    Ratio("cpu_per_10k", "CPU per request", 0.6, False),
    Ratio("p50_ms", "p50", None, False),
    Ratio("p99_ms", "p99", 1.0, False),
    Ratio("idle_rss_mib", "idle RSS", 0.25, False),
    Ratio("peak_rss_mib", "peak RSS", 0.25, False, ("routes-10k",)),
]


def ratio(rows: dict[str, Row], metric: str) -> float | None:
    sluice, envoy = rows.get("sluice"), rows.get("envoy")
    if not sluice or not envoy:
        return None
    a, b = sluice.median(metric), envoy.median(metric)
    if a is None or not b:
        return None
    return a / b


def _fmt(fmt: str, value: float | None) -> str:
    return "—" if value is None else fmt.format(value)


def _verdict(r: Ratio, value: float) -> str:
    if r.target is None:
        return ""
    met = value >= r.target if r.higher_is_better else value <= r.target
    return " ✅" if met else " ❌"


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(meta: dict, workloads: list[dict], table: dict[str, dict[str, Row]]) -> str:
    """``workloads``: name, description, config and command (per proxy) of each workload run."""
    m, s = meta["machine"], meta["settings"]
    v = meta["versions"]
    lines = [
        "# Sluice vs Envoy: load test results",
        "",
        f"- **Date:** {meta['date']}",
        f"- **Command:** `{meta['command']}`",
        f"- **Machine:** {m.get('cpu_model', '?')}, {m.get('cpus', '?')} CPUs"
        + (f" ({m['hypervisor']} VM)" if m.get("hypervisor") else "")
        + f", {m.get('memory', '?')} RAM, Linux {m.get('kernel', '?')}",
        "- **Versions:** "
        + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- **Method:** one worker per proxy (`sluice run --workers 1`, `envoy --concurrency 1`)"
        f" pinned to CPU {s['proxy_cpu']}; load generator and backend"
        f" (`echo_backend --fixed-body {s['body_bytes']}`) on CPU {s['load_cpu']}"
        + ("" if s["pinned"] else " (**pinning disabled**)")
        + f". Rounds alternate {' → '.join(s['proxies'])}; {s['rounds']} round(s) of"
        f" {s['duration_s']} s after a {s['warmup_s']} s warm-up, each with a fresh proxy"
        " process. Figures are medians over the rounds; ± is half the req/s range.",
        "",
        "## Results",
        "",
        "| workload | target | " + " | ".join(c[1] for c in COLUMNS) + " | rounds ok |",
        "|---|---|" + "---:|" * len(COLUMNS) + "---:|",
    ]
    notes: list[str] = []
    for w in workloads:
        for proxy, row in table[w["name"]].items():
            cells = [w["name"], proxy]
            if row.unavailable:
                cells.append(f"**{proxy} not available:** {_escape(row.unavailable)}")
                cells += [""] * (len(COLUMNS) - 1)
                cells.append("0")
            elif not row.ok_rounds:
                first = row.failed_rounds[0].error if row.failed_rounds else "no rounds"
                cells.append(f"**FAILED:** {_escape(first or '')}")
                cells += [""] * (len(COLUMNS) - 1)
                cells.append(f"0/{len(row.rounds)}")
            else:
                for metric, _title, fmt in COLUMNS:
                    text = _fmt(fmt, row.median(metric))
                    spread = row.spread(metric) if metric == "rps" else None
                    if spread is not None:
                        text += f" ±{spread:.0%}"
                    cells.append(text)
                cells.append(f"{len(row.ok_rounds)}/{len(row.rounds)}")
                for r in row.failed_rounds:
                    notes.append(f"{w['name']} / {proxy} round {r.index}: {r.error}")
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Sluice / Envoy", ""]
    lines.append(
        "| workload | "
        + " | ".join(
            r.title + (f" (target {'≥' if r.higher_is_better else '≤'} {r.target})" if r.target else "")
            for r in RATIOS
        )
        + " |"
    )
    lines.append("|---|" + "---:|" * len(RATIOS))
    for w in workloads:
        rows = table[w["name"]]
        cells = [w["name"]]
        for r in RATIOS:
            value = ratio(rows, r.metric)
            if value is None:
                cells.append("—")
            elif r.workloads is not None and w["name"] not in r.workloads:
                cells.append(f"{value:.2f}")
            else:
                cells.append(f"{value:.2f}{_verdict(r, value)}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Peak RSS has a target only for `routes-10k`. — means a side has no data.",
        "",
        "![Sluice/Envoy ratios per workload](ratios.png)",
        "",
    ]
    lines += baseline_section(workloads, table)
    lines += [
        "## Workloads",
        "",
        "| workload | config | what | load command (through the proxy) |",
        "|---|---|---|---|",
    ]
    for w in workloads:
        lines.append(
            f"| {w['name']} | `{w['config']}` | {_escape(w['description'])} | `{_escape(w['command'])}` |"
        )
    lines += [
        "",
        "## How the figures are taken",
        "",
        "- **req/s, p50, p99:** wrk `--latency` (HdrHistogram); h2load prints no percentiles, so"
        " it logs every request (`--log-file`) and p50/p99 are computed from those durations."
        " Any non-2xx (wrk: non-2xx/3xx) response or socket error fails the round.",
        "- **proxy CPU s / 10k req:** utime + stime of the proxy process (all threads) from"
        " `/proc/<pid>/stat`, over the measured run, per 10,000 completed requests.",
        "- **idle RSS:** `VmRSS` after start-up, the sanity request and the warm-up, before the"
        " measured run. **peak RSS:** `VmHWM` after the measured run.",
        "- **direct:** the load generator talks straight to the backend: the floor for each"
        " workload (its p50/p99 and the backend's CPU are what any proxy adds to).",
        "- Before measuring, one request through each target must reach `bench-backend`"
        " (HTTP 200 and the backend's JSON, or for gRPC `grpc-status: 0` and the echoed"
        " message).",
    ]
    if notes:
        lines += ["", "## Failed rounds", ""] + [f"- {_escape(n)}" for n in notes]
    lines += ["", NOTES_BEGIN, NOTES_PLACEHOLDER, NOTES_END, ""]
    return "\n".join(lines)


def baseline_section(workloads: list[dict], table: dict[str, dict[str, Row]]) -> list[str]:
    """Each proxy on a workload that adds a feature (tracing) against itself on the workload
    without it, when both ran: what the feature costs that proxy."""
    rows = []
    for w in workloads:
        base = w.get("baseline")
        if not base or base not in table or w["name"] not in table:
            continue
        for proxy, row in table[w["name"]].items():
            other = table[base].get(proxy)
            if not other or not row.usable() or not other.usable():
                continue
            cells = [w["name"], base, proxy]
            for metric, fmt in (("rps", "{:,.0f}"), ("p99_ms", "{:.2f}"), ("cpu_per_10k", "{:.3f}")):
                a, b = row.median(metric), other.median(metric)
                rel = f" ({a / b:.2f}×)" if a is not None and b else ""
                cells.append(f"{_fmt(fmt, a)} vs {_fmt(fmt, b)}{rel}")
            spans = row.median("spans_per_100")
            cells.append(_fmt("{:.2f}", spans))
            rows.append("| " + " | ".join(cells) + " |")
    if not rows:
        return []
    return [
        "## Against the baseline workload",
        "",
        "The same proxy with and without the feature (medians; the ratio is feature /"
        " baseline). Traced spans per 100 requests: spans the OTLP sink received per request"
        " through the proxy (warm-up and measured run); both proxies send a server and a client"
        " span per sampled request, so 1 % sampling gives about 2.",
        "",
        "| workload | baseline | proxy | req/s | p99 ms | proxy CPU s / 10k req |"
        " traced spans / 100 req |",
        "|---|---|---|---:|---:|---:|---:|",
        *rows,
        "",
    ]


NOTES_BEGIN = "<!-- notes:begin (kept by --publish) -->"
NOTES_END = "<!-- notes:end -->"
NOTES_PLACEHOLDER = (
    "## Analysis\n\nWhere a target is missed: by how much, and where the time goes (profile"
    " summary). Edit this section in `benches/RESULTS.md`; `--publish` keeps it."
)


def carry_notes(new_text: str, old_text: str) -> str:
    """Keeps the hand-written notes section of a previously published RESULTS.md."""
    pattern = re.compile(re.escape(NOTES_BEGIN) + r".*?" + re.escape(NOTES_END), re.S)
    old = pattern.search(old_text)
    if not old:
        return new_text
    return pattern.sub(lambda _m: old.group(0), new_text, count=1)


def to_json(meta: dict, workloads: list[dict], table: dict[str, dict[str, Row]]) -> str:
    data = {
        "meta": meta,
        "workloads": workloads,
        "results": {
            w: {
                proxy: {
                    **{k: val for k, val in asdict(row).items() if k != "rounds"},
                    "medians": {c[0]: row.median(c[0]) for c in COLUMNS},
                    "rounds": [asdict(r) for r in row.rounds],
                }
                for proxy, row in rows.items()
            }
            for w, rows in table.items()
        },
        "ratios_sluice_over_envoy": {
            w: {r.metric: ratio(rows, r.metric) for r in RATIOS} for w, rows in table.items()
        },
    }
    return json.dumps(data, indent=2)


def chart(path: Path, table: dict[str, dict[str, Row]]) -> None:
    """Grouped bars of Sluice/Envoy per workload and metric, on a log scale around 1."""
    import matplotlib  # noqa: PLC0415 (optional dependency)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    workloads = list(table)
    fig, ax = plt.subplots(figsize=(10, 5), dpi=100)
    width = 0.8 / len(RATIOS)
    any_bar = False
    for i, r in enumerate(RATIOS):
        xs, ys = [], []
        for j, w in enumerate(workloads):
            value = ratio(table[w], r.metric)
            if value is not None and value > 0:
                xs.append(j + (i - (len(RATIOS) - 1) / 2) * width)
                ys.append(value)
        if not ys:
            continue
        any_bar = True
        bars = ax.bar(xs, ys, width, label=r.title + (" ↑" if r.higher_is_better else " ↓"))
        ax.bar_label(bars, labels=[f"{y:.2f}" for y in ys], fontsize=7, rotation=90, padding=2)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(workloads)), workloads)
    ax.set_xlim(-0.5, len(workloads) - 0.5)
    ax.set_ylabel("Sluice / Envoy (log scale)")
    ax.set_title("Sluice relative to Envoy, one worker each (↑ higher is better, ↓ lower is better)")
    if any_bar:
        ax.set_yscale("log")
        low, high = ax.get_ylim()
        ax.set_ylim(low, high * 3)  # room for the value labels above the tallest bar
        ax.legend(fontsize=8, ncol=3, loc="upper left")
    else:
        ax.text(
            0.5, 0.5, "no workload has both Sluice and Envoy figures",
            transform=ax.transAxes, ha="center", va="center",
        )
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
