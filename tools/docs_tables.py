"""Write the generated tables of README.md and BENCHMARKS.md from the results files.

    python tools/docs_tables.py            # rewrite every generated block in place
    python tools/docs_tables.py --check    # exit 1 when a block differs from the results
    python tools/docs_tables.py --print cifar_headline   # print one table

Which results go in which table is data, in ``tools/tables.yaml``: per table its results
files (names or globs under ``tools/results/``), its columns (format templates over each
result's fields) and the paragraph that reads it. A document holds a table between two
marker comments, ``<!-- table:NAME -->`` and ``<!-- /table -->``; everything between them
is rewritten. A results file that does not exist yet is skipped, so a table picks up a new
file (e.g. a ten-epoch run) the next time this command runs, and ``--check`` fails until
it has.

Rows come from three shapes of results file: a run summary (``compresscnn sweep``:
one object with ``job``, ``command``, ``date``, ``commit``...), a benchmark file
(``{"meta": {...}, "rows": [...]}``: each row with the meta's fields under ``meta.``, and
``date``/``commit``/``command`` taken from the meta where the row has none), or a list of
rows. Templates are ``{path:spec}``: ``path`` is a dotted path into the row
(``runs.0.ratios.onnxruntime.1.compressed_int8``) or a derived field (below), ``spec`` a
Python format spec; a missing or null field renders as ``—`` and so does the whole cell
when any field of it is missing.

Derived fields of every row: ``file`` (the results file's name), ``cmd`` (the command with
its ``--out DIR`` removed: the output folder of the machine it ran on), ``seed`` (from
``--set seed=N`` in the command, else 0), ``macs_ratio`` / ``params_ratio`` (baseline ÷
compressed, where both are recorded), ``macs_m`` (MACs in millions), ``dense_top1`` /
``behind_dense`` (only in tables with ``pair_dense``: the top-1 of the dense row of the same
table with equal values of the listed fields, and the difference to it).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "tools" / "tables.yaml"
MISSING = "—"
_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.\[\]-]*)(?::([^{}]*))?\}")
_BLOCK = re.compile(r"(<!-- table:([A-Za-z0-9_.-]+) -->\n)(.*?)(<!-- /table -->)", re.S)


class Missing(Exception):
    """A template field that the row does not have (or has as null)."""


def _get(row: dict[str, Any], path: str) -> Any:
    cur: Any = row
    for part in path.split("."):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and part.lstrip("-").isdigit() and -len(cur) <= int(part) < len(cur):
            cur = cur[int(part)]
        else:
            raise Missing(path)
    if cur is None:
        raise Missing(path)
    return cur


def _fmt(value: Any, spec: str) -> str:
    if spec == "int":          # thousands separator: 269,722
        return f"{int(value):,}"
    if spec == "M":            # millions with one decimal: 40.6 M
        return f"{value / 1e6:.1f} M"
    if spec == "x":            # a ratio: 2.00×
        return f"{value:.2f}×"
    return format(value, spec) if spec else str(value)


def render(template: str, row: dict[str, Any]) -> str:
    """``template`` with each ``{path:spec}`` filled from ``row``; ``—`` if a field is missing."""
    try:
        return _FIELD.sub(lambda m: _fmt(_get(row, m.group(1)), m.group(2) or ""), template)
    except Missing:
        return MISSING


# ---------------------------------------------------------------------------------- rows


def _derive(row: dict[str, Any], file: str) -> dict[str, Any]:
    row = dict(row)
    row["file"] = file
    cmd = row.get("command")
    if isinstance(cmd, str):
        row["cmd"] = re.sub(r" --out \S+", "", cmd)
        m = re.search(r"--set seed=(\d+)", cmd)
        row["seed"] = int(m.group(1)) if m else 0
    for k in ("macs", "params"):
        b, v = row.get(f"baseline_{k}"), row.get(k)
        if isinstance(b, (int, float)) and isinstance(v, (int, float)) and v:
            row[f"{k}_ratio"] = b / v
    if isinstance(row.get("macs"), (int, float)):
        row["macs_m"] = row["macs"] / 1e6
    return row


def load_rows(results: Path, entry: str | dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of one ``files`` entry of a table (none when its file does not exist)."""
    spec = {"file": entry} if isinstance(entry, str) else dict(entry)
    pattern = spec["file"] if spec["file"].endswith(".json") else spec["file"] + ".json"
    names = sorted(p.name for p in results.glob("*.json") if fnmatch.fnmatchcase(p.name, pattern))
    rows: list[dict[str, Any]] = []
    for name in names:
        data = json.loads((results / name).read_text())
        if isinstance(data, dict) and isinstance(data.get("rows"), list):
            meta = data.get("meta", {})
            raw = [{**{k: meta[k] for k in ("date", "commit", "command") if k in meta},
                    **r, "meta": meta} for r in data["rows"]]
        elif isinstance(data, list):
            raw = data
        else:
            raw = [data]
        for r in raw:
            r = _derive(r, name)
            where = spec.get("where", {})
            if any(r.get(k) != v for k, v in where.items()):
                continue
            for k in ("label", "result", "note"):
                if k in spec:
                    r[k] = spec[k]
            for k in ("date", "commit"):   # from tables.yaml only where the file has none
                if k in spec and r.get(k) is None:
                    r[k] = spec[k]
            if "command" in spec and r.get("cmd") is None:
                # a template over the row: the benchmark's command line for this row
                r["cmd"] = render(spec["command"], r)
            rows.append(r)
    return rows


def _pair_dense(rows: list[dict[str, Any]], keys: list[str]) -> None:
    dense = {tuple(r.get(k) for k in keys): r for r in rows
             if r.get("params") is not None and r.get("params") == r.get("baseline_params")}
    for r in rows:
        d = dense.get(tuple(r.get(k) for k in keys))
        if d is not None and d is not r and r.get("top1") is not None:
            r["dense_top1"] = d["top1"]
            r["behind_dense"] = round(d["top1"] - r["top1"], 2)


def _sort_key(fields: list[str]):
    def key(r: dict[str, Any]) -> tuple:
        out = []
        for f in fields:
            v = r.get(f)
            out.append((v is None, v if isinstance(v, (int, float)) else str(v)))
        return tuple(out)
    return key


# -------------------------------------------------------------------------------- tables


def build_table(name: str, spec: dict[str, Any], results: Path) -> str:
    """The Markdown of one generated block: caption, table, reading paragraph."""
    rows: list[dict[str, Any]] = []
    for entry in spec["files"]:
        for r in load_rows(results, entry):
            r.setdefault("result", spec.get("result", ""))
            rows.append(r)
    if spec.get("pair_dense"):
        _pair_dense(rows, spec["pair_dense"])
    if spec.get("sort"):
        rows.sort(key=_sort_key(spec["sort"]))
    if spec.get("skip_dense"):
        rows = [r for r in rows if "dense_top1" in r or r.get("params") != r.get("baseline_params")]
    cols = spec["columns"]
    out: list[str] = []
    if spec.get("caption"):
        out += [spec["caption"].strip(), ""]
    out.append("| " + " | ".join(c["header"] for c in cols) + " |")
    out.append("|" + "|".join("---:" if c.get("align") == "right" else "---" for c in cols) + "|")
    for r in rows:
        cells = []
        for c in cols:
            # a row's own `result` (from tables.yaml) is itself a template
            tmpl = c["value"].replace("{result}", r.get("result", "")) if "{result}" in c["value"] else c["value"]
            cells.append(render(tmpl, r).replace("|", "\\|").replace("\n", " "))
        out.append("| " + " | ".join(cells) + " |")
    if not rows:
        out.append("| " + " | ".join(["(no results yet)"] + [""] * (len(cols) - 1)) + " |")
    if spec.get("reading"):
        out += ["", spec["reading"].strip()]
    return "\n".join(out) + "\n"


def load_config(path: Path = CONFIG) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def update_text(text: str, tables: dict[str, str], doc: str) -> str:
    def repl(m: re.Match) -> str:
        name = m.group(2)
        if name not in tables:
            raise SystemExit(f"{doc}: no table {name!r} in tools/tables.yaml")
        return m.group(1) + tables[name] + m.group(4)
    return _BLOCK.sub(repl, text)


def run(root: Path = ROOT, check: bool = False, config: Path | None = None) -> list[str]:
    """Rewrite (or with ``check`` only compare) the blocks; the names of stale documents."""
    cfg = load_config(config or root / "tools" / "tables.yaml")
    results = root / cfg.get("results", "tools/results")
    tables = {n: build_table(n, s, results) for n, s in cfg["tables"].items()}
    stale = []
    for doc in cfg["documents"]:
        p = root / doc
        old = p.read_text()
        found = {m.group(2) for m in _BLOCK.finditer(old)}
        want = {n for n, s in cfg["tables"].items() if doc in s.get("docs", [])}
        if want - found:
            raise SystemExit(f"{doc}: no marker for {sorted(want - found)} "
                             f"(add <!-- table:NAME --> and <!-- /table -->)")
        new = update_text(old, tables, doc)
        if new != old:
            stale.append(doc)
            if not check:
                p.write_text(new)
    return stale


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true",
                    help="change nothing; exit 1 if a generated block is out of date")
    ap.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this one)")
    ap.add_argument("--print", metavar="TABLE", help="print one table and exit")
    a = ap.parse_args(argv)
    if a.print:
        cfg = load_config(a.root / "tools" / "tables.yaml")
        sys.stdout.write(build_table(a.print, cfg["tables"][a.print],
                                     a.root / cfg.get("results", "tools/results")))
        return 0
    stale = run(a.root, check=a.check)
    if a.check and stale:
        print("out of date with tools/results/: " + ", ".join(stale)
              + "\nrun `python tools/docs_tables.py`", file=sys.stderr)
        return 1
    if not a.check:
        print("rewrote " + ", ".join(stale) if stale else "up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
