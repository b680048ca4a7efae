"""Two benchmark runs side by side: each student's headline figures in an older and a newer ``results.json``.

    python scripts/compare_results.py benchmarks/before/results.json benchmarks/results.json > table.md

For every set both runs hold, one Markdown table: a row per method, the older and newer figure at each NFE (W2 on 2-D
sets, flow-map RMSE as a share of the data's std on the mixtures, FD on digits), the newer run's other seeds at 1 NFE,
and the ratio new / old at 1 NFE. Methods in one run only are listed as such. Reads JSON only: nothing runs.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from flowmap.guard import ScriptParser, main_guard  # noqa: E402

NFES = ("1", "2", "4")


def headline(q: dict) -> tuple[str, float]:
    """The figure a set is judged by (its key in a student's per-NFE row) and the scale it is shown in."""
    if "data_std" in q:
        return "rmse", 100.0 / float(q["data_std"])  # % of the data's std
    if "fd" in (q.get("floor") or {}):
        return "fd", 1.0
    return "w2", 1.0


def _cell(v, scale: float) -> str:
    return "-" if not isinstance(v, (int, float)) or not math.isfinite(v) else f"{v * scale:.3g}"


def compare_set(name: str, old: dict, new: dict) -> list[str]:
    """Markdown lines of one set's table (older -> newer figure per NFE, newer seeds, ratio at 1 NFE)."""
    key, scale = headline(new)
    unit = "% of std" if key == "rmse" else key.upper()
    lines = [
        f"### {name} ({key}, {unit})",
        "",
        "| method | "
        + " | ".join(f"{n} NFE old -> new" for n in NFES)
        + " | new, other seeds (1 NFE) | new / old (1 NFE) |",
        "|---" * (len(NFES) + 3) + "|",
    ]
    old_st, new_st = old.get("students", {}), new.get("students", {})
    for m in sorted(set(old_st) | set(new_st)):
        if m not in old_st or m not in new_st:
            lines.append(f"| {m} | only in the {'newer' if m in new_st else 'older'} run |" + " |" * (len(NFES) + 1))
            continue
        a, b = old_st[m].get("nfe", {}), new_st[m].get("nfe", {})
        cells = [f"{_cell(a.get(n, {}).get(key), scale)} -> {_cell(b.get(n, {}).get(key), scale)}" for n in NFES]
        seeds = [s.get("nfe", {}).get("1", {}).get(key) for s in new_st[m].get("seeds") or []]
        one_a, one_b = a.get("1", {}).get(key), b.get("1", {}).get(key)
        ratio = f"{one_b / one_a:.2f}" if one_a and one_b is not None else "-"
        lines.append(
            f"| {m} | " + " | ".join(cells) + f" | {', '.join(_cell(s, scale) for s in seeds) or '-'} | {ratio} |"
        )
    return lines + [""]


def compare(old: dict, new: dict) -> str:
    """The whole comparison as Markdown: one table per set present in both runs."""
    lines = [
        "Older run: "
        + str(old.get("meta", {}).get("code", "?"))
        + f", newer run: {new.get('meta', {}).get('code', '?')}.",
        "",
    ]
    for name in new.get("quality", {}):
        if name in old.get("quality", {}):
            lines += compare_set(name, old["quality"][name], new["quality"][name])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = ScriptParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", type=Path, help="the older results.json")
    parser.add_argument("new", type=Path, help="the newer results.json")
    args = parser.parse_args(argv)
    runs = []
    for p in (args.old, args.new):
        try:
            runs.append(json.loads(p.read_text()))
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{p}: not a readable results.json ({err})") from None
        if not isinstance(runs[-1], dict) or "quality" not in runs[-1]:
            raise ValueError(f"{p}: not a benchmark results.json (no 'quality')")
    print(compare(*runs))


if __name__ == "__main__":
    main_guard(main)
