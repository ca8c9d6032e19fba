"""Results: every figure's samples per system, summarised (median, min-max, ratio to
pgqueue), written as ``latest.json`` and a Markdown table ``latest.md``."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.measure import Sample


@dataclass
class Figure:
    key: str
    title: str
    unit: str
    better: str  # "higher" or "lower"
    group: str
    samples: dict[str, list[Sample]] = field(default_factory=dict)
    settings: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, system: str, sample: Sample) -> None:
        self.samples.setdefault(system, []).append(sample)
        setting = sample.extra.get("setting")
        if setting:
            self.settings[system] = str(setting)

    def values(self, system: str) -> list[float]:
        return [
            s.value
            for s in self.samples.get(system, [])
            if s.value is not None and "error" not in s.extra
        ]

    def errors(self, system: str) -> list[str]:
        return [str(s.extra["error"]) for s in self.samples.get(system, []) if "error" in s.extra]

    def summary(self, system: str, baseline: str = "pgqueue") -> dict[str, Any] | None:
        values = self.values(system)
        if not values:
            return None
        median = statistics.median(values)
        base = self.values(baseline)
        ratio = None
        if base and statistics.median(base):
            ratio = median / statistics.median(base)
        return {
            "median": median,
            "min": min(values),
            "max": max(values),
            "n": len(values),
            "ratio_to_pgqueue": ratio,
        }


@dataclass
class Report:
    machine: dict[str, Any]
    options: dict[str, Any]
    systems: list[str]
    titles: dict[str, str]
    versions: dict[str, dict[str, str]]
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    command: str = ""
    started_at: str = ""
    seconds: float = 0.0

    def figure(self, key: str, title: str, unit: str, better: str, group: str) -> Figure:
        for fig in self.figures:
            if fig.key == key:
                return fig
        fig = Figure(key, title, unit, better, group)
        self.figures.append(fig)
        return fig

    # --- output ---------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "command": self.command,
            "started_at": self.started_at,
            "seconds": self.seconds,
            "machine": self.machine,
            "options": self.options,
            "versions": self.versions,
            "notes": self.notes,
            "targets": self.targets,
            "figures": [
                {
                    "key": f.key,
                    "title": f.title,
                    "unit": f.unit,
                    "better": f.better,
                    "group": f.group,
                    "settings": f.settings,
                    "notes": f.notes,
                    "summary": {s: f.summary(s) for s in self.systems if s in f.samples},
                    "samples": {
                        s: [asdict(x) for x in samples] for s, samples in f.samples.items()
                    },
                }
                for f in self.figures
            ],
        }

    def write(self, folder: Path) -> tuple[Path, Path]:
        folder.mkdir(parents=True, exist_ok=True)
        json_path = folder / "latest.json"
        md_path = folder / "latest.md"
        tmp = json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1, default=str) + "\n")
        tmp.replace(json_path)
        tmp = md_path.with_suffix(".md.tmp")
        tmp.write_text(self.markdown())
        tmp.replace(md_path)
        return md_path, json_path

    def markdown(self) -> str:
        out: list[str] = []
        out.append("# pgqueue benchmark: latest run\n")
        out.append(f"Command: `{self.command}`  ")
        out.append(f"Started {self.started_at}, took {self.seconds / 60:.1f} min.\n")
        out.append(
            "Each cell: median (min\u2013max) over the repetitions, and \u00d7ratio to pgqueue's"
            " median. Systems were interleaved (the order rotates every repetition), each in"
            " its own database on the same server. Absolute numbers drift on a shared"
            " machine; compare ratios.\n"
        )
        out.append(self._machine_md())
        if self.targets:
            out.append("## Targets of issue 5, as measured in this run\n")
            out.extend(f"- {t}" for t in self.targets)
            out.append("")
        groups: list[str] = []
        for fig in self.figures:
            if fig.group not in groups:
                groups.append(fig.group)
        for group in groups:
            figs = [f for f in self.figures if f.group == group]
            systems = [s for s in self.systems if any(s in f.samples for f in figs)]
            out.append(f"\n## {group}\n")
            out.append("| figure | " + " | ".join(self.titles[s] for s in systems) + " |")
            out.append("| --- | " + " | ".join("---" for _ in systems) + " |")
            for fig in figs:
                cells = [self._cell(fig, s) for s in systems]
                arrow = "↑" if fig.better == "higher" else "↓"
                out.append(
                    f"| {fig.title} ({fig.unit}, {arrow} better) | " + " | ".join(cells) + " |"
                )
            details = [f for f in figs if f.settings or f.notes]
            if details:
                out.append("")
                for fig in details:
                    if fig.settings:
                        shown = "; ".join(
                            f"{self.titles.get(s, s)}: `{v}`" for s, v in fig.settings.items()
                        )
                        out.append(f"- {fig.title}: {shown}")
                    for note in fig.notes:
                        out.append(f"- {fig.title}: {note}")
        extra = self._extras_md()
        if extra:
            out.append(extra)
        if self.notes:
            out.append("\n## Notes\n")
            out.extend(f"- {n}" for n in self.notes)
        out.append(self._versions_md())
        return "\n".join(out) + "\n"

    def _cell(self, fig: Figure, system: str) -> str:
        summary = fig.summary(system)
        errors = fig.errors(system)
        if summary is None:
            if errors:
                return "failed: " + errors[0][:80].replace("|", "/")
            return "\u2013"
        text = f"{_num(summary['median'])} ({_num(summary['min'])}\u2013{_num(summary['max'])})"
        ratio = summary["ratio_to_pgqueue"]
        if ratio is not None and system != "pgqueue":
            text += f" \u00d7{ratio:.2f}"
        if errors:
            text += f" ({len(errors)} failed)"
        return text

    def _machine_md(self) -> str:
        m = self.machine
        lines = ["## Machine\n"]
        lines.append(
            f"- {m.get('cores')} cores ({m.get('cpu', '?')}), {m.get('memory_gib', '?')} GiB"
            f" memory, load average at start {m.get('load_at_start')}, at end"
            f" {m.get('load_at_end')}"
        )
        pg = m.get("postgres", {})
        lines.append(f"- {pg.get('version', '?')}")
        settings = pg.get("settings", {})
        if settings:
            lines.append(
                "- settings: "
                + ", ".join(f"{k}={v}" for k, v in settings.items() if k != "server_version")
            )
        lines.append(f"- Redis {m.get('redis', '?')}; Python {m.get('python')}")
        lines.append(f"- pgqueue at commit {m.get('pgqueue_commit', '?')}")
        return "\n".join(lines) + "\n"

    def _extras_md(self) -> str:
        """Detail tables: latency percentiles, sustained windows, footprint, RSS."""
        out: list[str] = []
        for fig in self.figures:
            if fig.key == "sustained_p50":
                out.append(f"\n### {fig.title}: percentiles (median over repetitions)\n")
                out.append("| system | p50 ms | p95 ms | p99 ms | max ms | extra |")
                out.append("| --- | --- | --- | --- | --- | --- |")
                for s in self.systems:
                    samples = [x for x in fig.samples.get(s, []) if "p50_ms" in x.extra]
                    if not samples:
                        continue
                    med = {
                        k: statistics.median(float(x.extra[k]) for x in samples)
                        for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms")
                    }
                    achieved = statistics.median(float(x.extra["achieved_rate"]) for x in samples)
                    depth = max(int(x.extra.get("backlog_max") or 0) for x in samples)
                    end = max(int(x.extra.get("backlog_end") or 0) for x in samples)
                    extra = f"achieved {_num(achieved)}/s, backlog max {depth}, at end {end}"
                    out.append(
                        f"| {self.titles[s]} | {med['p50_ms']:.2f} | {med['p95_ms']:.2f} |"
                        f" {med['p99_ms']:.2f} | {med['max_ms']:.1f} | {extra} |"
                    )
                out.append("\nOver time (last repetition): p50 / p99 ms, max backlog per window\n")
                for s in self.systems:
                    samples = [x for x in fig.samples.get(s, []) if "windows" in x.extra]
                    if not samples:
                        continue
                    windows = samples[-1].extra["windows"]
                    cells = [
                        f"{w['from_s']:.0f}s: {_num(w['p50_ms'])}/{_num(w['p99_ms'])}"
                        f" [{w['backlog_max']}]"
                        for w in windows
                    ]
                    out.append(f"- {self.titles[s]}: " + ", ".join(cells))
            if fig.key == "footprint":
                out.append(f"\n### {fig.title}\n")
                out.append("| system | table | heap MiB | index MiB | live tuples | dead tuples |")
                out.append("| --- | --- | --- | --- | --- | --- |")
                for s in self.systems:
                    for sample in fig.samples.get(s, [])[-1:]:
                        for table, row in sample.extra.get("tables", {}).items():
                            out.append(
                                f"| {self.titles[s]} | {table} | {row['heap_bytes'] / 2**20:.1f} |"
                                f" {row['index_bytes'] / 2**20:.1f} | {row['live_tuples']} |"
                                f" {row['dead_tuples']} |"
                            )
        return "\n".join(out)

    def _versions_md(self) -> str:
        lines = ["\n## Versions\n"]
        for system, versions in self.versions.items():
            shown = ", ".join(f"{k} {v}" for k, v in versions.items())
            lines.append(f"- {self.titles.get(system, system)}: {shown}")
        return "\n".join(lines)


def _num(value: Any) -> str:
    if value is None:
        return "\u2013"
    v = float(value)
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"
