"""Regenerate every table of every experiment record from its committed `results.json`.

    python experiments/tables.py            # rewrite the generated tables in place
    python experiments/tables.py --check    # exit 1 if any generated file is out of date
    python experiments/tables.py --root DIR # another copy of experiments/

For each `experiments/<name>/results.json` it renders each entry of `tables` as a Markdown
table, writes it to `experiments/<name>/tables/<table>.md`, and replaces the text between
`<!-- table:<table>:start -->` and `<!-- table:<table>:end -->` in
`experiments/<name>/README.md` (nothing outside the markers is touched). It also rewrites
the list between `<!-- index:start -->` and `<!-- index:end -->` in `experiments/README.md`.
The output depends on the JSON only (no clock, no environment), so a second run changes
nothing. Standard library only.

A table in `results.json` is `{"title", "code_version", "columns": [{"key", "label",
"format"}], "rows": [{key: value}]}`. A value is a number, a structured cell (see the
formats below), null (an empty cell), or a string, which is written as it is (labels, and
markers such as "–"). A row may also carry `code_version` (the run's, where it differs from
the table's), `equals_base` (the row is the base model: the run selected no pass; the
table's `equals_base_span` columns collapse into one "= base (...)" cell) and notes.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

MINUS = "\u2212"


def _signed(value: float, decimals: int) -> str:
    text = f"{abs(value):.{decimals}f}"
    negative = value < 0 or (value == 0 and math.copysign(1.0, value) < 0)
    return (MINUS if negative else "+") + text


def _plain(value: float, decimals: int) -> str:
    text = f"{abs(value):.{decimals}f}"
    return (MINUS + text) if value < 0 else text


def _g(value) -> str:
    if isinstance(value, bool):
        raise TypeError("a boolean is not a number")
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def _sci(value: float) -> str:
    mantissa, exponent = f"{value:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _fixed(decimals: int):
    def render(value) -> str:
        if isinstance(value, dict):
            if "mean" in value:
                return f"{_plain(value['mean'], decimals)} ± {_plain(value['sd'], decimals)}"
            if "start" in value:
                return f"{_plain(value['start'], decimals)} → {_plain(value['end'], decimals)}"
            if "min" in value:
                return f"{_plain(value['min'], decimals)}–{_plain(value['max'], decimals)}"
            raise ValueError(f"unknown structured value {value!r}")
        if isinstance(value, list):
            return ", ".join(_plain(v, decimals) for v in value)
        return _plain(value, decimals)

    return render


def _percent(decimals: int, signed: bool):
    def render(value) -> str:
        note = None
        if isinstance(value, dict):
            note = value.get("note")
            value = value["pct"]
        text = (_signed if signed else _plain)(value, decimals) + "%"
        return f"{text} ({note})" if note else text

    return render


def _imp(decimals: int):
    """Imp in percent: {"pct", "defined_terms_only"?, "note"?}, or a bare number."""

    def render(value) -> str:
        if not isinstance(value, dict):
            value = {"pct": value}
        pct = value["pct"]
        text = "0" if pct == 0 and math.copysign(1.0, pct) > 0 else _signed(pct, decimals) + "%"
        if value.get("defined_terms_only"):
            text += "\\*"
        if value.get("note"):
            text += f" ({value['note']})"
        return text

    return render


def _valid(value) -> str:
    """{"valid": bool, "test_hit_vs_base_pct"?: number}: "yes (97.8%)", "**no** (96.3%)"."""
    text = "yes" if value["valid"] else "**no**"
    if value.get("test_hit_vs_base_pct") is not None:
        text += f" ({_plain(value['test_hit_vs_base_pct'], 1)}%)"
    return text


def _controlled(value) -> str:
    """{"measure", "target", "deviation_pct"}: the held measure against ℓ̂ and its gap."""
    return (f"{_plain(value['measure'], 4)} vs {_plain(value['target'], 2)} "
            f"({_signed(value['deviation_pct'], 1)}%)")


def _epochs(value) -> str:
    return f"{value['run']} ({value['best']})"


def _interval(value) -> str:
    return f"[{_g(value['min'])}, {_g(value['max'])}]"


def _ci(value) -> str:
    """{"low", "high", "decimals", "unit"?}: a 95% interval as the README wrote it."""
    d, unit = value["decimals"], value.get("unit", "")
    return f"[{_signed(value['low'], d)}{unit}, {_signed(value['high'], d)}{unit}]"


def _gpct(value) -> str:
    return _g(value) + "%"


def _diff(value) -> str:
    """{"value", "decimals"}: a signed difference written to the README's precision."""
    return _signed(value["value"], value["decimals"])


def _signed_fixed(decimals: int):
    return lambda value: _signed(value, decimals)


FORMATS = {
    "text": str,
    "g": _g,
    "sci": _sci,
    "f1": _fixed(1),
    "f2": _fixed(2),
    "f3": _fixed(3),
    "f4": _fixed(4),
    "sf4": _signed_fixed(4),
    "sf3": _signed_fixed(3),
    "pct0": _percent(0, signed=False),
    "pct1": _percent(1, signed=False),
    "spct1": _percent(1, signed=True),
    "spct2": _percent(2, signed=True),
    "imp1": _imp(1),
    "imp2": _imp(2),
    "valid": _valid,
    "controlled": _controlled,
    "epochs": _epochs,
    "interval": _interval,
    "ci": _ci,
    "gpct": _gpct,
    "diff": _diff,
}


def render_cell(value, fmt: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return FORMATS[fmt](value)


def render_table(table: dict) -> str:
    columns = table["columns"]
    span = table.get("equals_base_span", [])
    out = ["| " + " | ".join(c["label"] for c in columns) + " |",
           "|" + "---|" * len(columns)]
    for row in table["rows"]:
        cells = []
        for column in columns:
            key = column["key"]
            if row.get("equals_base") and key in span:
                first = key == span[0]
                cells.append(f"= base ({row['equals_base']})" if first else "")
            else:
                cells.append(render_cell(row.get(key), column["format"]))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def _replace_between(text: str, start: str, end: str, body: str, where: Path) -> str:
    pattern = re.compile(re.escape(start) + r"\n.*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"tables.py: error: {where}: markers {start} ... {end} not found")
    return pattern.sub(lambda _: f"{start}\n{body}{end}", text, count=1)


def index_lines(root: Path) -> str:
    lines = []
    for results in sorted(root.glob("*/results.json")):
        record = json.loads(results.read_text(encoding="utf-8"))
        name = results.parent.name
        lines.append(f"- [`{name}/`]({name}/README.md): {record['question']} "
                     f"(code version {record['code_version']}; "
                     f"{len(record['tables'])} table{'s' if len(record['tables']) != 1 else ''})")
    return "\n".join(lines) + "\n"


def generate(root: Path) -> dict[Path, str]:
    """Every generated file's path and its text, from the JSON alone."""
    files: dict[Path, str] = {}
    for results in sorted(root.glob("*/results.json")):
        record_dir = results.parent
        record = json.loads(results.read_text(encoding="utf-8"))
        readme_path = record_dir / "README.md"
        readme = readme_path.read_text(encoding="utf-8")
        for name, table in record["tables"].items():
            body = render_table(table)
            files[record_dir / "tables" / f"{name}.md"] = body
            readme = _replace_between(readme, f"<!-- table:{name}:start -->",
                                      f"<!-- table:{name}:end -->", body, readme_path)
        files[readme_path] = readme
    index_path = root / "README.md"
    files[index_path] = _replace_between(index_path.read_text(encoding="utf-8"),
                                         "<!-- index:start -->", "<!-- index:end -->",
                                         index_lines(root), index_path)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if a generated file differs")
    args = parser.parse_args(argv)
    stale = []
    for path, text in generate(args.root).items():
        old = path.read_text(encoding="utf-8") if path.exists() else None
        if old == text:
            continue
        stale.append(path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    if args.check and stale:
        for path in stale:
            print(f"out of date: {path}", file=sys.stderr)
        return 1
    if not args.check:
        print(f"tables.py: {len(stale)} file(s) rewritten under {args.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
