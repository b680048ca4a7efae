"""The benchmark's outputs: targets read against the results, RESULTS.md, results.json and PNG plots.

Called by ``scripts/benchmark.py`` (``write_report``); pure functions of its ``results`` dict (and the
samples it kept for the figures), so the report can be rebuilt from a saved results.json (without plots).
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import numpy as np
import torch

CAUSES_FILE = Path(__file__).resolve().parents[1] / "benchmarks" / "causes.yaml"
NO_CAUSE = "no measured cause yet"
TARGET_TEACHER_NFE_2D = 64
TARGET_TEACHER_NFE_DIGITS = 32
ONE_NFE_PRECISION_METHODS = ("meanflow", "scd", "cd")  # "MeanFlow, sCM and consistency distillation"
DIGITS_ONE_NFE_METHODS = ("cd", "pd", "meanflow", "shortcut")  # issue 21: "each of cd, pd, meanflow and shortcut"
NOISE_LEVEL_RATIO = 0.5  # "not at noise level": W2 at 1 NFE <= this share of pure N(0, I) samples' W2
DATA_TITLES = {
    "checkerboard": "Checkerboard",
    "eight_gaussians": "Eight Gaussians",
    "digits": "Digits (8x8, class-conditional), UNet",
    "digits_dit": "Digits (8x8, class-conditional), DiT",
    "gmm": "Analytic mixture ring8 (data-free distillation)",
    "fromdata": "From data, no teacher: checkerboard from scratch",
}


def _kind(name: str, q: dict) -> str:
    """A quality entry's kind: "digits", "mixture" or "2d" (recorded by the run; inferred for older results)."""
    if "kind" in q:
        return q["kind"]
    return "digits" if name == "digits" else "mixture" if "data_std" in q else "2d"


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _seed_values(st: dict, key: str, nfe: int = 1) -> list:
    """``key`` at ``nfe`` of seed 0 and of every other seed (None where a seed failed or lacks it)."""
    others = [s for s in st.get("seeds") or [] if "missing" not in s]  # missing: not run (--reuse-only)
    return [_get(st, "nfe", nfe, key)] + [_get(s, "nfe", nfe, key) for s in others]


def _worst(st: dict | None, key: str, sense: str) -> tuple[float | None, str]:
    """The worse over the seeds of ``key`` at 1 NFE (the larger for a '<=' target, the smaller for '>='), and a note
    with every seed's value when there are several; None when a seed has no finite value."""
    if not st:
        return None, ""
    vals = _seed_values(st, key)
    note = f"seeds {' / '.join(_f(v) for v in vals)}, the worse" if len(vals) > 1 else ""
    if not all(_finite(v) for v in vals):
        return None, note
    return (max(vals) if sense == "<=" else min(vals)), note


def _why(q: dict, m: str) -> str:
    """Why method ``m`` has no value on a set: its failure, a failed seed, or not run."""
    if m in q.get("failed", {}):
        return q["failed"][m]
    errors = [
        f"seed {s['seed']}: {s['error']}" for s in q.get("students", {}).get(m, {}).get("seeds") or [] if "error" in s
    ]
    return "; ".join(errors) or ("method not run" if m not in q.get("students", {}) else "no finite value")


# --- targets ---------------------------------------------------------------------------------------


def _sets(meta: dict) -> str:
    """The config files of each set, as a clause."""
    sets = meta.get("sets") or {}
    return "; ".join(f"{d}: " + " + ".join(f"`{f}`" for f in files) for d, files in sets.items())


def _target(text: str, value: float | None, threshold: float, sense: str, note: str = "") -> dict:
    """One target: met when value <= threshold (sense '<=') or >= threshold ('>='); the margin is relative."""
    if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
        return {
            "target": text,
            "value": None,
            "threshold": threshold,
            "sense": sense,
            "met": None,
            "margin": f"not evaluated{': ' + note if note else ''}",
        }
    met = value <= threshold if sense == "<=" else value >= threshold
    rel = abs(value - threshold) / abs(threshold) if threshold else abs(value - threshold)
    margin = f"met, {rel:.0%} to spare" if met else f"missed by {rel:.0%}"
    return {
        "target": text,
        "value": float(value),
        "threshold": threshold,
        "sense": sense,
        "met": bool(met),
        "margin": margin + (f" ({note})" if note else ""),
    }


def _now() -> str:
    """The local date and minute, as the report prints when it was written."""
    return time.strftime("%Y-%m-%d %H:%M", time.localtime())


def load_causes(path: str | Path = CAUSES_FILE) -> list[tuple[re.Pattern, str]]:
    """The measured causes of missed targets: ``path`` is a YAML list of ``{match: regex, cause: text}``, read with
    ``yaml.safe_load`` (data only); [(compiled regex, cause)] in file order. A missing file gives []; a malformed one
    raises one ValueError naming the entry."""
    import yaml

    path = Path(path)
    if not path.is_file():
        return []
    try:
        entries = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a list of {{match, cause}} entries, got {type(entries).__name__}")
    out = []
    for i, e in enumerate(entries):
        if not (isinstance(e, dict) and set(e) == {"match", "cause"} and all(isinstance(v, str) for v in e.values())):
            raise ValueError(f"{path}: entry {i} must be {{match: <regex>, cause: <text>}} strings, got {e!r}")
        try:
            out.append((re.compile(e["match"]), " ".join(e["cause"].split())))
        except re.error as err:
            raise ValueError(f"{path}: entry {i}: bad regular expression {e['match']!r} ({err})") from None
    return out


def attach_causes(targets: list[dict], causes: list[tuple[re.Pattern, str]]) -> list[dict]:
    """Each missed target gets ``cause``: the first entry of ``causes`` whose regex is found in its text, else
    ``NO_CAUSE``; met and not evaluated targets (their margin says why) get none. Returns ``targets``."""
    for t in targets:
        if t["met"] is False:
            t["cause"] = next((c for rx, c in causes if rx.search(t["target"])), NO_CAUSE)
    return targets


COST_LIMITS = {"mlp": 1.8, "dit": 2.2}  # issue 23: MeanFlow (every pair s != t) and sCD, x a flow-matching step
CTM_COST_LIMIT = 3.0  # issue 23: CTM, x a flow-matching step


def _cost_targets(cost: dict, net: str) -> list[dict]:
    """Step-cost targets on ``net``: MeanFlow (the larger of its configured and every-pair-s != t rows) and sCD within
    ``COST_LIMITS[net]`` of a flow-matching step, CTM within ``CTM_COST_LIMIT``."""
    ratio = lambda m: _get(cost, net, "steps", m, "ratio")  # noqa: E731
    configured, worst = ratio("meanflow"), ratio("meanflow (every pair s != t)")
    known = [r for r in (configured, worst) if r is not None]
    detail = f"; as configured {configured:.2f}, every pair s != t {worst:.2f}; the larger" if len(known) == 2 else ""
    limit = COST_LIMITS[net]
    rows = [
        (f"a MeanFlow step <= {limit}x", f"[ratio{detail}]", max(known, default=None), limit),
        (f"an sCD step <= {limit}x", "[ratio]", ratio("scd"), limit),
        (f"a CTM step <= {CTM_COST_LIMIT}x", "[ratio]", ratio("ctm"), CTM_COST_LIMIT),
    ]
    missing = "cost table skipped" if not cost else "not run"
    return [
        _target(
            f"cost: {what} a flow-matching step ({net.upper()}) {how}", v, lim, "<=", "" if v is not None else missing
        )
        for what, how, v, lim in rows
    ]


def _best_target(values: dict, ref: float | None, threshold: float, found, missing: str, note: str) -> dict:
    """The '<=' target on the best (smallest) of ``values`` {method: value} as a ratio to ``ref``: ``found(m, value)``
    words it; without a value or a ``ref`` it is ``missing``, not evaluated, with ``note``."""
    if values and ref:
        m = min(values, key=values.get)
        return _target(found(m, values[m]), values[m] / ref, threshold, "<=")
    return _target(missing, None, threshold, "<=", note)


def _fd_ratio(name: str, m: str, nfe: str, factor: float, teacher: str, v, ref, seeds: str, note: str) -> dict:
    """The target '{name}: {m} FD at {nfe} <= {factor}x {teacher}': one student's FD as a ratio to the teacher's."""
    text = f"{name}: {m} FD at {nfe} <= {factor}x {teacher} [ratio{'; ' + seeds if seeds else ''}]"
    return _target(text, v / ref if _finite(v) and ref else None, factor, "<=", note)


def _occupied(who: str, share: float, precision, seeds: str, note: str = "") -> dict:
    """The target '{who} at 1 NFE puts >= {share} of its samples on occupied cells' (the precision)."""
    text = f"{who} at 1 NFE puts >= {share:.2f} of its samples on occupied cells" + (f" [{seeds}]" if seeds else "")
    return _target(text, precision, share, ">=", note)


def _ran(L: list[str], title: str, part: dict | None, what: str) -> dict | None:
    """Open the report section ``title``: the part's results when it ran, else None after a 'Not run' line."""
    L += [f"## {title}", ""]
    if part and part.get("available"):
        return part
    L += [f"Not run: {(part or {}).get('reason', f'no {what} result')}.", ""]
    return None


def _get(d: dict, *keys):
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k, d.get(str(k)) if not isinstance(k, str) else None)
    return d


def evaluate_targets(results: dict) -> list[dict]:
    """The issue's targets, each with its measured value, threshold, met / not and margin."""
    out: list[dict] = []
    q = results.get("quality", {})
    cb = q.get("checkerboard")
    if cb:
        ref = _get(cb, "teacher", "heun", TARGET_TEACHER_NFE_2D, "w2")
        for m, st in cb["students"].items():
            w2 = _get(st, "nfe", 2, "w2")
            out.append(
                _target(
                    f"checkerboard: {m} W2 at 2 NFE <= 1.25x the teacher's (Heun, 64 NFE) [ratio]",
                    w2 / ref if (w2 is not None and ref) else None,
                    1.25,
                    "<=",
                )
            )
        for m in ONE_NFE_PRECISION_METHODS:
            prec, seeds = _worst(cb["students"].get(m), "precision", ">=")
            out.append(_occupied(f"checkerboard: {m}", 0.90, prec, seeds, _why(cb, m) if prec is None else ""))
    for name, gmm in q.items():  # every mixture set (an exact flow map: ``data_std`` is recorded)
        if "data_std" not in gmm:
            continue
        from flowmap.objectives import sampler_defaults

        label = "mixture" if name == "gmm" else f"mixture {name}"
        std = gmm["data_std"]
        rmse = {m: {k: _get(st, "nfe", k, "rmse") for k in (1, 2, 4)} for m, st in gmm["students"].items()}
        one = {m: _worst(st, "rmse", "<=") for m, st in gmm["students"].items()}  # the worse seed at 1 NFE
        best = {m: v for m, (v, _) in one.items() if v is not None}
        out.append(
            _best_target(
                best,
                std,
                0.02,
                lambda m, v: (
                    f"{label}: best 1-NFE flow-map RMSE ({m}: {v:.4f}) <= 2% of the data std ({std:.3f}) "
                    f"[RMSE / std{'; ' + one[m][1] if one[m][1] else ''}]"
                ),
                f"{label}: best 1-NFE flow-map RMSE <= 2% of the data std",
                "no student",
            )
        )
        for m in sorted(gmm["students"]) + sorted(set(gmm.get("failed", {})) - set(gmm["students"])):
            r1, seeds = one.get(m, (None, ""))
            out.append(
                _target(
                    f"{label}: {m} 1-NFE flow-map RMSE <= 5% of the data std "
                    f"[RMSE / std{'; ' + seeds if seeds else ''}]",
                    None if r1 is None else r1 / std,
                    0.05,
                    "<=",
                    _why(gmm, m) if r1 is None else "",
                )
            )
            if m in rmse and sampler_defaults(m)["gamma"] == 0.0 and None not in rmse[m].values():
                worst = max(rmse[m][2] / rmse[m][1], rmse[m][4] / rmse[m][2])
                out.append(
                    _target(
                        f"{label}: {m} (jumps along its grid) does not get worse from 1 to 2 to 4 NFE "
                        f"[largest ratio of consecutive RMSEs; 1/2/4 NFE: "
                        f"{rmse[m][1] / std:.3f}/{rmse[m][2] / std:.3f}/{rmse[m][4] / std:.3f} of std]",
                        worst,
                        1.0,
                        "<=",
                    )
                )
    for name, dg in q.items():
        if _kind(name, dg) == "digits":
            out += _digits_targets(name, dg)
    for name, fd in q.items():
        if fd.get("teacher_free"):
            out += _from_data_targets(name, fd)
    cost = results.get("cost", {})
    for net in ("mlp", "dit"):
        out += _cost_targets(cost, net)
    for net in ("mlp", "dit"):
        r = _get(cost, net, "throughput", "student 1 NFE", "vs_raw_forward")
        out.append(
            _target(
                f"cost: 1-NFE sampling >= 0.95x the raw forward's throughput ({net.upper()}) [ratio]",
                r,
                0.95,
                ">=",
                "" if r is not None else "cost table skipped",
            )
        )
    peer = results.get("peer", {})
    reason = peer.get("reason", "peer not run")
    same = (
        f"; with our schedule on torchcfm's loop {peer['same_schedule_step_ratio']:.3f}"
        if peer.get("same_schedule_step_ratio") is not None
        else ""
    )
    out.append(
        _target(
            f"peer: our flow-matching step no slower than torchcfm's [time ratio ours / torchcfm{same}]",
            peer.get("step_ratio"),
            1.0,
            "<=",
            "" if peer.get("available") else reason,
        )
    )
    same = ""
    if peer.get("same_schedule_w2_ratio") is not None:
        se = peer.get("same_schedule_w2_diff_se")
        same = (
            f"; with our schedule on torchcfm's loop {peer['same_schedule_w2_ratio']:.3f}, paired difference "
            f"{_d(peer['same_schedule_w2_diff'])}" + (f" +- {_d(se, False)}" if se is not None else "")
        )
    out.append(
        _target(
            f"peer: our final W2 no worse than torchcfm's [W2 ratio ours / torchcfm{same}]",
            peer.get("w2_ratio"),
            1.0,
            "<=",
            "" if peer.get("available") else reason,
        )
    )
    return out


def _digits_targets(name: str, dg: dict) -> list[dict]:
    """Issue 21's digits targets on one digits set (UNet or DiT), as ratios to the teacher's FD (Heun, 32 NFE): every
    method FD at 2 NFE <= 1.5x, FD at 1 NFE <= 2.5x, class accuracy at 1 NFE >= 0.90; the best student and each of
    cd, pd, meanflow and shortcut FD at 1 NFE <= 1.3x. 1-NFE values are the worse of the seeds."""
    out: list[dict] = []
    ref = _get(dg, "teacher", "heun", TARGET_TEACHER_NFE_DIGITS, "fd")
    ref = ref if _finite(ref) and ref > 0 else None
    teacher = f"the teacher's at {TARGET_TEACHER_NFE_DIGITS} NFE (Heun, {_f(ref)})"
    fds = {m: _get(st, "nfe", 2, "fd") for m, st in dg["students"].items()}
    fds = {m: v for m, v in fds.items() if _finite(v)}
    out.append(
        _best_target(
            fds,
            ref,
            1.5,
            lambda m, v: f"{name}: best student's FD at 2 NFE ({m}: {v:.3f}) <= 1.5x {teacher} [ratio]",
            f"{name}: best student's FD at 2 NFE <= 1.5x {teacher}",
            "no student or teacher",
        )
    )
    fd1 = {m: _worst(st, "fd", "<=") for m, st in dg["students"].items()}
    best = {m: v for m, (v, _) in fd1.items() if v is not None}
    out.append(
        _best_target(
            best,
            ref,
            1.3,
            lambda m, v: (
                f"{name}: best student's FD at 1 NFE ({m}: {v:.3f}) <= 1.3x {teacher} "
                f"[ratio{'; ' + fd1[m][1] if fd1[m][1] else ''}]"
            ),
            f"{name}: best student's FD at 1 NFE <= 1.3x {teacher}",
            "no student",
        )
    )
    for m in DIGITS_ONE_NFE_METHODS:
        v, seeds = fd1.get(m, (None, ""))
        out.append(_fd_ratio(name, m, "1 NFE", 1.3, teacher, v, ref, seeds, _why(dg, m) if v is None else ""))
    for m in sorted(dg["students"]) + sorted(set(dg.get("failed", {})) - set(dg["students"])):
        st = dg["students"].get(m)
        fd2 = _get(st, "nfe", 2, "fd") if st else None
        out.append(_fd_ratio(name, m, "2 NFE", 1.5, teacher, fd2, ref, "", _why(dg, m) if st is None else ""))
        v, seeds = fd1.get(m, (None, ""))
        out.append(_fd_ratio(name, m, "1 NFE", 2.5, teacher, v, ref, seeds, _why(dg, m) if v is None else ""))
        acc, seeds = _worst(st, "class_acc", ">=")
        out.append(
            _target(
                f"{name}: {m} class accuracy at 1 NFE >= 0.90{' [' + seeds + ']' if seeds else ''}",
                acc,
                0.90,
                ">=",
                _why(dg, m) if acc is None else "",
            )
        )
    return out


def _from_data_targets(name: str, fd: dict) -> list[dict]:
    """Issue 21's from-data targets (checkerboard, no teacher, from scratch): the best method (lowest W2 at 1 NFE)
    W2 <= 0.15 and precision >= 0.90; every method precision >= 0.80 and not at noise level (W2 <= 0.5x the W2 of
    pure N(0, I) samples, measured in the run). All at 1 NFE, the worse of the seeds."""
    out: list[dict] = []
    noise = _get(fd, "noise", "w2")
    noise = noise if _finite(noise) and noise > 0 else None
    w2 = {m: _worst(st, "w2", "<=") for m, st in fd["students"].items()}
    best = {m: v for m, (v, _) in w2.items() if v is not None}
    if best:
        m = min(best, key=best.get)
        prec, seeds = _worst(fd["students"][m], "precision", ">=")
        out.append(
            _target(
                f"{name}: best teacher-free method's W2 at 1 NFE ({m}) <= 0.15"
                + (f" [{w2[m][1]}]" if w2[m][1] else ""),
                best[m],
                0.15,
                "<=",
            )
        )
        out.append(_occupied(f"{name}: best teacher-free method ({m})", 0.90, prec, seeds))
    else:
        for text, thr, sense in (("W2 at 1 NFE <= 0.15", 0.15, "<="), ("precision at 1 NFE >= 0.90", 0.90, ">=")):
            out.append(_target(f"{name}: best teacher-free method's {text}", None, thr, sense, "no student"))
    for m in sorted(fd["students"]) + sorted(set(fd.get("failed", {})) - set(fd["students"])):
        st = fd["students"].get(m)
        prec, seeds = _worst(st, "precision", ">=")
        out.append(_occupied(f"{name}: {m}", 0.80, prec, seeds, _why(fd, m) if prec is None else ""))
        v, seeds = w2.get(m, (None, ""))
        out.append(
            _target(
                f"{name}: {m} not at noise level: W2 at 1 NFE <= {NOISE_LEVEL_RATIO}x the W2 of N(0, I) samples "
                f"({_f(noise)}) [ratio{'; ' + seeds if seeds else ''}]",
                v / noise if v is not None and noise else None,
                NOISE_LEVEL_RATIO,
                "<=",
                _why(fd, m) if v is None else "",
            )
        )
    return out


# --- markdown --------------------------------------------------------------------------------------


def _d(v: float, sign: bool = True) -> str:
    """A difference or its standard error: 4 decimals, or 2 significant digits when smaller than 1e-3."""
    if v != 0 and abs(v) < 1e-3:
        return f"{v:+.1e}" if sign else f"{v:.1e}"
    return f"{v:+.4f}" if sign else f"{v:.4f}"


def _f(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e4):
            return f"{v:.2e}"
        return f"{v:.{digits}g}"
    return str(v)


def _cell(kind: str, m: dict | None) -> str:
    """One table cell of the main metric(s) of a data set of ``kind`` (``_kind``)."""
    if not m:
        return "-"
    if kind == "2d":
        return f"{_f(m.get('w2'))} / {_f(m.get('precision'), 3)}"
    if kind == "mixture":
        return f"{_f(m.get('rmse'))} / {_f(m.get('w2'))}"
    acc = m.get("class_acc")
    return f"{_f(m.get('fd'))} / {_f(m.get('kid'), 3)}" + (f" ({acc:.2f})" if acc is not None else "")


# the 1-NFE numbers shown for every seed, per kind of set: (metric, column label)
HEADLINE = {
    "digits": (("fd", "FD"), ("class_acc", "class accuracy")),
    "mixture": (("rmse", "RMSE"),),
    "2d": (("w2", "W2"), ("precision", "precision")),
}


def _seed_cell(st: dict, key: str) -> str:
    """``key`` at 1 NFE for every seed, "a / b" (a failed seed: "failed")."""
    digits = 3 if key in ("precision", "class_acc") else 4
    cells = [_f(_get(st, "nfe", 1, key), digits)]
    cells += [
        "failed" if "error" in s else "not run" if "missing" in s else _f(_get(s, "nfe", 1, key), digits)
        for s in st.get("seeds") or []
    ]
    return " / ".join(cells)


CELL_LEGEND = {
    "checkerboard": "exact W2 to fresh data (lower is better) / share of samples on occupied cells (higher is better)",
    "eight_gaussians": "exact W2 to fresh data / share of samples within 4 std of a centre",
    "fromdata": "exact W2 to fresh data (lower is better) / share of samples on occupied cells (higher is better)",
    "gmm": "flow-map RMSE of X(eps, 1, 0) against the exact map on the same eps "
    "(n/a for re-noising samplers above 1 NFE) / exact W2 to fresh mixture samples",
    "digits": "FD / KID against the train split's features "
    "(class accuracy of the samples: share the classifier assigns to the requested label). "
    "The floor has only the 359 test images, so its FD carries a larger small-sample bias than the models' (FD falls "
    "as N grows); KID is unbiased and compares across sample sizes",
}


def code_note(results: dict) -> str:
    """Which teachers and students were trained under another version of the training code (``flowmap/`` and
    ``teachers/``; reused from the cache, which is keyed on configs) than the one that wrote the report."""
    code = results.get("meta", {}).get("code")
    if code is None:
        return "Training code fingerprint: not recorded."
    other = []
    for name, q in results.get("quality", {}).items():
        if "teacher_code" in q and q["teacher_code"] != code:
            what = "flow-matching init net" if "data_std" in q else "teacher"
            other.append(f"{name} {what} ({q['teacher_code'] or 'unrecorded'})")
        other += [
            f"{name}/{m} ({st.get('code') or 'unrecorded'})"
            for m, st in q.get("students", {}).items()
            if "code" in st and st["code"] != code
        ]
        other += [
            f"{name}/{m} seed {s['seed']} ({s.get('code') or 'unrecorded'})"
            for m, st in q.get("students", {}).items()
            for s in st.get("seeds") or []
            if "code" in s and s["code"] != code
        ]
    if not other:
        return (
            f"Training code fingerprint {code} (`flowmap/`, `teachers/`): "
            "every teacher and student here was trained under it."
        )
    return (
        f"Training code fingerprint {code} (`flowmap/`, `teachers/`). "
        "**Trained under other code** (reused from the cache, "
        f"which is keyed on configs; `--fresh` retrains): {', '.join(other)}."
    )


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _nfe_keys(d: dict) -> list[int]:
    return sorted(int(k) for k in d)


def _row(d: dict, nfe: int):
    return d.get(nfe, d.get(str(nfe)))


def _grouped(rows: list[str], prefix: str) -> list[str]:
    """The "set/method" rows as "sets: methods" groups, the sets that share one list of methods together."""
    by_set: dict[str, list[str]] = {}
    for row in rows:
        where, _, method = row.partition("/")
        by_set.setdefault(where, []).append(method)
    groups: dict[tuple[str, ...], list[str]] = {}
    for where, methods in by_set.items():
        groups.setdefault(tuple(methods), []).append(where)
    return [f"{prefix}{', '.join(sets)}: {', '.join(methods)}" for methods, sets in groups.items()]


def markdown(results: dict, targets: list[dict]) -> str:
    meta = results["meta"]
    L: list[str] = ["# flowmap benchmark", ""]
    when = meta.get("written") or _now()
    scale = f", steps x {meta['scale']}" if meta.get("scale", 1.0) != 1.0 else ""
    L.append(
        f"Written by `scripts/benchmark.py` ({meta['budget']} budget{scale}) on {when}: "
        f"{meta['machine']}, {meta['cpu_count']} cores, "
        f"{meta['threads']} torch thread(s), device {meta['device']}, torch {meta['torch']}, Python {meta['python']}; "
        f"load average {meta.get('load_average_start')} at the start, {meta.get('load_average_end')} at the end; "
        f"{meta.get('seconds', 0) / 60:.1f} min in all."
    )
    if meta.get("jobs", 1) > 1:
        L.append("")
        L.append(
            f"Teachers and students were trained in {meta['jobs']} worker processes of one torch thread each (`--jobs "
            f"{meta['jobs']}`; step times marked *worker* ran side by side with another training), then evaluated here."
        )
    L.append("")
    for part, run in (meta.get("carried") or {}).items():  # a part this run skipped, kept from an earlier run
        L += [f"The {part} table below comes from the run of {run}: this run skipped it.", ""]
    kept = meta.get("kept") or {}
    if kept:  # --keep-others: rows of the methods this run did not train, from an earlier run
        parts = _grouped(kept.get("quality", []), "") + _grouped(kept.get("cost", []), "cost ")
        L += [
            f"Kept from the runs of {kept['from']} (`--keep-others`: this run trained and timed only "
            f"{', '.join(meta['methods'])}; the plots are kept with them): {'; '.join(parts) or 'nothing'}.",
            "",
        ]
    if meta["budget"] == "quick":
        L += [
            "> **Quick smoke run.** Tiny nets and budgets: every table is filled so the pipeline is checked, "
            "but these numbers say nothing about the methods. Run `python scripts/benchmark.py` for the real ones.",
            "",
        ]
    L += [
        "Every student trains the recipe a user runs with `scripts/distill.py`: the set's data and model configs "
        f"({_sets(meta)}) composed with `configs/distill/<method>.yaml` and its override for the set, if any "
        "(`flowmap.recipe.compose`; objective, net, batch, learning rate, warm-up, cosine decay, AdamW, EMA "
        "half-life, gradient clipping, for the data config's `trainer.max_steps`"
        + (f" times {meta['scale']:g}" if meta.get("scale", 1.0) != 1.0 else "")
        + "), through `flowmap.training.TrainLoop` with the Lightning modules' semantics, and is evaluated with its "
        "EMA weights, as users export them. It starts from the teacher's weights when the recipe says so "
        "(`init_from_teacher`, or unset and the same net); the mixture's exact teacher has no weights, so its "
        "students start from a flow-matching net trained on the mixture's own samples. Seeds are fixed. "
        "Students sample with "
        "`flowmap.sampling.sample` on a uniform grid; consistency-type students (which learn only jumps to t = 0: "
        "cd, ict, ect, scd, sct) re-noise between steps (gamma = 1, multistep consistency sampling), the others jump "
        "along the grid (gamma = 0).",
        "",
    ]
    n_seeds = int(meta.get("seeds", 1))
    if n_seeds > 1:
        L += [
            f"Seeds: every student is trained {n_seeds} times, seed 0 and {n_seeds - 1} other seed(s) (the init of its "
            "parts not copied from the teacher, the objective's own parts, data batches, times and noises; the teacher "
            "is the same). Seed 0 is evaluated at every NFE, the others at 1 NFE: the 1-NFE headline columns show "
            "every seed (seed 0 / seed 1 ...). **Targets read at 1 NFE take the worse of the seeds** (the larger "
            "error, the smaller precision or accuracy), so a 1-NFE target is met only when every seed meets it; "
            "targets at 2 NFE and above read seed 0.",
            "",
        ]
    else:
        L += ["Seeds: one per student (`--seeds 1`); the targets read it.", ""]
    L += [code_note(results), ""]
    L.append(f"Methods run: {', '.join(meta['methods']) or 'none'}.")
    for m, why in meta.get("skipped_methods", {}).items():
        L.append(f"- skipped `{m}`: {why}")
    for name, q in results["quality"].items():
        for m, why in q.get("failed", {}).items():
            L.append(f"- `{m}` failed on {name}: {why}")
    if "features" in meta:
        L += [
            "",
            f"Digit features: {meta['features']}. FD and KID values in these features are not comparable with "
            "Inception FID / KID.",
        ]
    L += ["", "## Targets", ""]
    L += _table(
        ["target", "value", "threshold", "met", "margin", "cause (when not met)"],
        [
            [
                t["target"],
                _f(t["value"]),
                f"{t['sense']} {t['threshold']}",
                {True: "yes", False: "**no**", None: "-"}[t["met"]],
                t["margin"],
                t.get("cause", "").replace("|", "\\|"),
            ]
            for t in targets
        ],
    )
    n_met = sum(t["met"] is True for t in targets)
    n_eval = sum(t["met"] is not None for t in targets)
    L += ["", f"{n_met} of {n_eval} evaluated targets met."]

    L += ["", "## Quality per NFE", ""]
    for name, q in results["quality"].items():
        kind = _kind(name, q)
        legend = CELL_LEGEND.get(name) or CELL_LEGEND[{"digits": "digits", "mixture": "gmm"}.get(kind, "checkerboard")]
        L += [f"### {DATA_TITLES.get(name, name)}", "", f"Cells: {legend}.", ""]
        if name in meta.get("teacher_configs", {}):
            L += [
                f"The teacher trains with the trainer semantics of `{meta['teacher_configs'][name]}` (rate, decay, "
                "clipping, the exported EMA; its warm-up as the same share of the run; the net is the model config's), "
                "for the benchmark's teacher steps.",
                "",
            ]
        if q.get("teacher_free"):
            suffix = meta.get("teacher_free", {}).get(name, "_fromdata")
            L += [
                f"No teacher: every method with a `configs/distill/<method>{suffix}.yaml` trains that config from "
                "scratch (its `trainer.max_steps` and batch are the budget"
                + (f", steps x {meta['scale']:g}" if meta.get("scale", 1.0) != 1.0 else "")
                + "), composed after the set's data and model configs, as `scripts/distill.py` without `--teacher` "
                "does.",
                "",
            ]
        fl = q["floor"]
        L.append(
            f"Models are evaluated on {q.get('n_eval')} samples against {fl.get('n_ref')} reference samples; "
            "the data-vs-data "
            f"floor compares {fl.get('n')} other data samples with the same reference: {_cell(kind, fl)}."
            + (f" Data std (per coordinate, RMS): {q['data_std']:.4f}." if "data_std" in q else "")
        )
        if q.get("noise"):
            L.append(
                f"Noise level: {q['noise'].get('n')} samples of N(0, I), scored the same way: "
                f"{_cell(kind, q['noise'])} "
                f"(a method is at noise level when its 1-NFE W2 is above {NOISE_LEVEL_RATIO}x this W2)."
            )
        L.append("")
        if q["teacher"]:
            nfes = sorted({n for s in q["teacher"].values() for n in _nfe_keys(s)})
            rows = [
                [f"teacher, {solver}"] + [_cell(kind, _row(q["teacher"][solver], n)) for n in nfes]
                for solver in ("euler", "heun")
            ]
            L += _table(["teacher \\ NFE", *map(str, nfes)], rows)
            L.append("")
            what = "Flow-matching init net" if "data_std" in q else "Teacher"
            L.append(f"{what}: {_f(q.get('teacher_seconds'), 3)} s of training.")
            L.append("")
        rows = []
        n_seeds = max([1] + [1 + len(st.get("seeds") or []) for st in q["students"].values()])
        headline = HEADLINE.get(kind, ()) if n_seeds > 1 else ()
        for m, st in q["students"].items():
            per = st["seconds"] / max(1, st["steps"])
            rows.append(
                [m]
                + [_cell(kind, _row(st["nfe"], n)) for n in _nfe_keys(st["nfe"])]
                + [_seed_cell(st, key) for key, _ in headline]
                + [
                    str(st["steps"]),
                    f"{per * 1e3:.1f}" + (" (cached)" if st.get("cached") else " (worker)" if st.get("worker") else ""),
                ]
            )
        if rows:
            seeds = " / ".join(str(k) for k in range(n_seeds))
            L += _table(
                [
                    "student \\ NFE",
                    *map(str, sorted(_nfe_keys(next(iter(q["students"].values()))["nfe"]))),
                    *[f"1-NFE {label}, seeds {seeds}" for _, label in headline],
                    "steps",
                    "ms / step (wall)",
                ],
                rows,
            )
        else:
            L.append("No student finished on this data set.")
        L.append("")
        notes = [
            f"`{m}`: init {st.get('init', '?')}; {st.get('config_source') or 'benchmark defaults'}"
            + (f"; sampler gamma {st['sampler_gamma']}" if st.get("sampler_gamma") else "")
            for m, st in q["students"].items()
        ]
        if notes:
            L += ["<details><summary>students' initialization and hyperparameter sources</summary>", ""]
            L += [f"- {n}" for n in notes] + ["", "</details>", ""]

    L += ["## Training cost", ""]
    cost = results.get("cost") or {}
    if not cost:
        L += ["Skipped.", ""]
    else:
        L += [
            f"Seconds per training step (objective, backward, clipping, Adam, EMA target), medians over interleaved "
            f"repeats in one process, and the ratio to a plain flow-matching step on the same net and batch. "
            f"Peak memory: {meta['memory_method']}, of one step after warm-up, in MiB.",
            "",
        ]
        for net, c in cost.items():
            L.append(
                f"**{net.upper()}** ({c['params']:,} parameters, batch {c['batch']}, config `{json.dumps(c['net'])}`)"
            )
            L.append("")
            rows = []
            for m, r in c["steps"].items():
                if "error" in r:
                    rows.append([m, "failed", "-", "-", r["error"]])
                else:
                    rows.append([m, f"{r['step_s'] * 1e3:.2f}", f"{r['ratio']:.2f}", _f(r.get("peak_mib"), 3), ""])
            L += _table(["objective", "ms / step", "x flow matching", "peak MiB", "note"], rows)
            L.append("")
        L += ["### Sampling throughput", ""]
        rows = []
        for net, c in cost.items():
            tp = c["throughput"]
            rows.append(
                [
                    net.upper(),
                    str(c["throughput_batch"]),
                    f"{tp['raw forward']['samples_per_s']:.4g}",
                    f"{tp['student 1 NFE']['samples_per_s']:.4g} ({tp['student 1 NFE']['vs_raw_forward']:.2f}x)",
                    f"{tp['teacher 64 NFE']['samples_per_s']:.4g}",
                    f"{tp['student 1 NFE']['vs_teacher_64']:.1f}x",
                ]
            )
        L += _table(
            [
                "net",
                "batch",
                "raw forward (samples/s)",
                "student 1 NFE (x raw)",
                "teacher 64 NFE Euler",
                "1 NFE speed-up over teacher",
            ],
            rows,
        )
        L.append("")
    peer = _ran(L, "Peer: flow-matching teacher against torchcfm", results.get("peer"), "peer")
    if peer is not None:
        trainers = peer.get("trainers", ["ours", "torchcfm"])
        L += [
            f"torchcfm {peer['version']} `ConditionalFlowMatcher(sigma=0)` "
            "(its x_t = t x1 + (1 - t) x0 with x0 = data, x1 = noise is our linear path) "
            "against our `DenoisingLoss` (uniform times), on the same MLP (same init), "
            f"{peer['data']} batches ({peer['batch']}), {peer['steps']} steps, peak learning rate "
            f"{peer.get('lr', float('nan')):g} and gradient clipping at 1, timed in blocks of alternating order. "
            "Trainers: `ours` is `flowmap.training.TrainLoop` as this benchmark trains its teachers "
            f"(Adam on the fused kernel, half-cosine decay of the rate to {peer.get('lr_final', float('nan')):g}); "
            "`torchcfm` is torchcfm's documented loop (`torch.optim.Adam` at a constant rate); "
            "`torchcfm, our schedule` is that loop with our rate schedule, so ours against it compares the "
            "implementations alone (loss arithmetic, optimizer kernel). "
            f"W2 of 64-NFE Heun samples, the mean over {peer.get('seeds', 1)} seed(s) "
            "(init, data and noise; one run's W2 moves by tens of percent with the seed); "
            "within a seed all trainers draw the same times and noises at every step (common random numbers).",
            "",
        ]
        L += _table(
            ["trainer", "ms / step", "final W2 (mean)", "W2 per seed", "final loss"],
            [
                [
                    n,
                    f"{peer[n]['step_s'] * 1e3:.2f}",
                    _f(peer[n]["w2"]),
                    ", ".join(_f(w) for w in peer[n].get("w2_per_seed", [peer[n]["w2"]])),
                    _f(peer[n]["final_loss"]),
                ]
                for n in trainers
            ],
        )
        L.append("")
        for key, other in (("", "torchcfm"), ("same_schedule_", "torchcfm, our schedule")):
            if peer.get(f"{key}step_ratio") is None:
                continue
            line = f"Ours / `{other}`: time {peer[f'{key}step_ratio']:.3f}, W2 {peer[f'{key}w2_ratio']:.3f}"
            d, se = peer.get(f"{key}w2_diff"), peer.get(f"{key}w2_diff_se")
            if d is not None and se is not None:  # a standard error needs two seeds or more
                line += (
                    f"; W2 difference paired by seed {_d(d)} +- {_d(se, False)} "
                    f"(standard error over {peer.get('seeds', 1)} "
                    f"seeds; {'within' if abs(d) <= 2 * se else 'outside'} two standard errors of zero)"
                )
            elif d is not None:
                line += f"; W2 difference {_d(d)} (one seed: no standard error)"
            L.append(line + ".")
        L.append("")
    st = _ran(L, "Streaming: webdataset shards against memory", results.get("streaming"), "streaming")
    if st is not None:
        L += [
            f"{st['data']}: {st['count']} samples in {st['shards']} shards, batch {st['batch_size']}, "
            f"{st['num_batches']} batches "
            "per measurement (worker start-up included).",
            "",
        ]
        rows = [["memory (TensorDataset)", f"{st['memory']:.4g}", "1.00"]]
        rows += [
            [f"shards, {w} worker{'s' if w > 1 else ''}", f"{st[f'shards_w{w}']:.4g}", f"{st[f'ratio_w{w}']:.3f}"]
            for w in (1, 2)
            if f"shards_w{w}" in st
        ]
        L += _table(["source", "samples / s", "x memory"], rows)
        L += [
            "",
            "Tiny decoded samples make memory the upper bound; shards pay tar parsing and PNG decoding per sample, "
            "which worker processes hide once the model step costs more than the decode.",
            "",
        ]
    plots = results.get("plots", [])
    if plots:
        L += ["## Plots", ""] + [f"- [{p}]({p})" for p in plots] + [""]
    return "\n".join(L)


# --- json ------------------------------------------------------------------------------------------


def _clean(x):
    """JSON-safe: non-finite floats -> None, tuple keys / int keys -> strings."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, (np.floating, np.integer)):
        return _clean(x.item())
    return x


# --- plots -----------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _scatter(ax, x, title: str, lim: float) -> None:
    x = x.float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    x = x[np.isfinite(x).all(1)]
    ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.5, linewidths=0)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=8)


def scatter_grid(path: Path, sm: dict, lim: float) -> None:
    """Rows: data | teacher (Euler 64, Heun 64), then each student at 1 / 2 / 4 NFE."""
    plt = _plt()
    students = sm["students"]
    fig, axes = plt.subplots(1 + len(students), 3, figsize=(7.5, 2.5 * (1 + len(students))), squeeze=False)
    _scatter(axes[0, 0], sm["data"], "data", lim)
    if sm["teacher"]:
        _scatter(axes[0, 1], sm["teacher"][("euler", 64)], "teacher, Euler 64 NFE", lim)
        _scatter(axes[0, 2], sm["teacher"][("heun", 64)], "teacher, Heun 64 NFE", lim)
    else:  # no teacher: the input noise
        _scatter(axes[0, 1], sm["noise"], "N(0, I) noise (no teacher)", lim)
        axes[0, 2].axis("off")
    for i, (m, per) in enumerate(students.items(), start=1):
        for j, nfe in enumerate((1, 2, 4)):
            _scatter(axes[i, j], per[nfe], f"{m}, {nfe} NFE", lim)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def trajectory_grid(path: Path, trajectories: dict, lim: float) -> None:
    plt = _plt()
    n = len(trajectories)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, traj) in zip(axes.flat, trajectories.items()):
        tr = traj.float().numpy()
        ax.axis("on")
        paths = (
            np.concatenate([tr, np.full((1, *tr.shape[1:]), np.nan)]).transpose(1, 0, 2).reshape(-1, 2)
        )  # one NaN-separated line
        ax.plot(paths[:, 0], paths[:, 1], color="0.6", lw=0.4, alpha=0.5)
        ax.scatter(tr[0, :, 0], tr[0, :, 1], s=2, c="tab:blue")
        ax.scatter(tr[-1, :, 0], tr[-1, :, 1], s=2, c="tab:red")
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(title + " (blue t=1, red t=0)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def digit_grid(path: Path, sm: dict) -> None:
    """Rows: data | teacher (Heun 64) | each student at 1 and 2 NFE; 4 samples per class, one class per column."""
    from flowmap.plotting import image_grid

    plt = _plt()
    panels = {"data (train split)": sm["data"][:40], "teacher, Heun 64 NFE": sm["teacher"][("heun", 64)][:40]}
    for m, per in sm["students"].items():
        panels[f"{m}, 1 NFE"] = per[1][:40]
        panels[f"{m}, 2 NFE"] = per[2][:40]
    cols = 4
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 1.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, x) in zip(axes.flat, panels.items()):
        g = image_grid(x.clamp(-1, 1), nrow=10)
        ax.imshow(g[..., 0], cmap="gray", interpolation="nearest", vmin=0, vmax=255)
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def quality_curves(path: Path, name: str, q: dict, key: str) -> None:
    """Metric ``key`` against NFE (log-log): teacher (Euler, Heun), each student, the data-vs-data floor."""
    from flowmap.plotting import save_curves

    curves = {}
    for solver in ("euler", "heun"):
        if solver not in q["teacher"]:
            continue
        pts = [(n, _row(q["teacher"][solver], n).get(key)) for n in _nfe_keys(q["teacher"][solver])]
        pts = [(n, v) for n, v in pts if v is not None and math.isfinite(v) and v > 0]
        if pts:
            curves[f"teacher ({solver})"] = tuple(zip(*pts))
    for m, st in q["students"].items():
        pts = [(n, _row(st["nfe"], n).get(key)) for n in _nfe_keys(st["nfe"])]
        pts = [(n, v) for n, v in pts if v is not None and math.isfinite(v) and v > 0]
        if pts:
            curves[m] = tuple(zip(*pts))
    floor = q["floor"].get(key)
    if floor and math.isfinite(floor) and floor > 0:
        curves["data vs data"] = ((1, 64), (floor, floor))
    noise = (q.get("noise") or {}).get(key)
    if noise and math.isfinite(noise) and noise > 0:
        curves["N(0, I) noise"] = ((1, 64), (noise, noise))
    label = {"w2": "exact W2 to data", "rmse": "flow-map RMSE (1 -> 0)", "fd": "FD (digit-classifier features)"}[key]
    save_curves(path, curves, "NFE", label, logy=True, logx=True)


def loss_curves(path: Path, q: dict) -> None:
    """Small multiples: the teacher's and each student's training loss (moving average over 5% of the steps)."""
    plt = _plt()
    series = {}
    if q.get("teacher_losses"):
        series["teacher (flow matching)"] = q["teacher_losses"]
    for m, st in q["students"].items():
        series[m] = st["losses"]
    if not series:
        return
    cols = min(3, len(series))
    rows = math.ceil(len(series) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, ys) in zip(axes.flat, series.items()):
        ax.axis("on")
        y = np.asarray(ys, dtype=np.float64)
        k = max(1, len(y) // 20)
        smooth = np.convolve(y, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(len(smooth)) + k - 1, smooth, lw=1)
        if (smooth > 0).all():
            ax.set_yscale("log")
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("step", fontsize=7)
        ax.tick_params(which="both", labelsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_plots(samples: dict, results: dict, out: Path) -> list[str]:
    files = []
    lims = {"checkerboard": 2.5, "eight_gaussians": 2.5, "gmm": 3.0}
    for name, sm in samples.items():
        q = results["quality"][name]
        kind = _kind(name, q)
        lim = lims.get(name, 2.5 if kind == "2d" else 3.0)
        if kind == "digits":
            p = out / f"samples_{name}.png"
            digit_grid(p, sm)
            files.append(p.name)
        else:
            p = out / f"scatter_{name}.png"
            scatter_grid(p, sm, lim)
            files.append(p.name)
            if sm["trajectories"]:
                p = out / f"trajectories_{name}.png"
                trajectory_grid(p, sm["trajectories"], lim)
                files.append(p.name)
        for i, key in enumerate({"2d": ["w2"], "digits": ["fd"]}.get(kind, ["rmse", "w2"])):
            p = out / (f"quality_vs_nfe_{name}.png" if i == 0 else f"quality_vs_nfe_{name}_{key}.png")
            quality_curves(p, name, q, key)
            files.append(p.name)
        p = out / f"loss_{name}.png"
        loss_curves(p, q)
        if p.exists():
            files.append(p.name)
    return files


def write_report(results: dict, samples: dict, out: str | Path, plots: bool = True) -> Path:
    """Write plots, results.json (with the evaluated targets) and RESULTS.md into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results["plots"] = write_plots(samples, results, out) if plots else results.get("plots", [])
    results["meta"].setdefault("written", _now())  # a re-render keeps the run's date
    results["targets"] = attach_causes(evaluate_targets(results), load_causes())
    (out / "results.json").write_text(json.dumps(_clean(results), indent=1, allow_nan=False))
    (out / "RESULTS.md").write_text(markdown(results, results["targets"]))
    return out / "RESULTS.md"
