"""Two finished studies side by side: does a re-run with other seeds replicate? (`gqa-t5x compare-studies`).

A study's own re-run views (`claims.rerun_views`) are halves of one run. This
module compares two whole runs of the same settings, such as the committed
study and a run from scratch with other uptraining seeds and another
pre-training seed, from their `reproduction.json` files alone.

For every quantity both runs report with a 95% interval (each claim's primary
and supporting contrasts, the beyond-paper cells, the kept optimizer state,
the loss gaps per number of kv heads, the uptraining saving) a row holds
both estimates and their difference, and says whether the two are
*consistent*: |a - b| <= sqrt(h_a^2 + h_b^2), h the half-width of each
interval, i.e. the 95% interval of an independent difference holds 0 (two
numbers without an interval, such as a ratio of mean times, are not judged). The two
runs score the same held-out examples, so they are not independent in the
articles; the rule then overstates the difference's spread: it can miss a
real difference, it does not invent one. A claim *replicates* when both runs
give it the same verdict.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

def load(path: str | Path) -> dict:
    """A study's results: `reproduction.json`, a folder holding it, or a study OUTPUT (its report/).

    Raises:
      ValueError: naming the path when no `reproduction.json` is found or it is not a study's.
    """
    path = Path(path)
    candidates = [path] if path.suffix == ".json" else [path / "reproduction.json",
                                                         path / "report" / "reproduction.json"]
    for candidate in candidates:
        if candidate.is_file():
            try:
                results = json.loads(candidate.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{candidate} is not JSON ({e}).") from e
            if not isinstance(results, dict) or "claims" not in results or "settings" not in results:
                raise ValueError(f"{candidate} is not a study's reproduction.json (no 'claims' or 'settings').")
            results["_path"] = str(candidate)
            return results
    raise ValueError(f"{path}: no reproduction.json there (looked for {', '.join(map(str, candidates))}); "
                     "pass a study's OUTPUT, its report folder or the file.")


def check_comparable(first: dict, second: dict) -> None:
    """Raises ValueError naming every setting in which the two studies differ (or a reduced run)."""
    if bool(first.get("reduced_run")) != bool(second.get("reduced_run")):
        raise ValueError("one study is a reduced run and the other is not: compare runs of one preset.")
    differ = sorted(k for k in set(first["settings"]) | set(second["settings"])
                    if first["settings"].get(k) != second["settings"].get(k))
    if differ:
        detail = "; ".join(f"{k}: {first['settings'].get(k)!r} vs {second['settings'].get(k)!r}" for k in differ)
        raise ValueError(f"the studies' settings differ in {', '.join(differ)} ({detail}): a replication compares "
                         "runs of the same design; rerun one with the other's settings.")


def _pretrain_seeds(results: dict) -> list[int]:
    return sorted({s["pretrain_seed"] for s in results.get("sessions", []) if "pretrain_seed" in s})


def _half(interval: dict | None) -> float | None:
    if not interval or interval.get("low") is None or interval.get("high") is None:
        return None
    return (interval["high"] - interval["low"]) / 2


def compare_values(a: float | None, ia: dict | None, b: float | None, ib: dict | None) -> dict:
    """The two estimates, their difference and whether they are consistent (see the module docstring)."""
    row: dict[str, Any] = {"first": a, "first_interval": ia, "second": b, "second_interval": ib,
                           "difference": None, "allowed": None, "consistent": None}
    if a is None or b is None:
        return row
    row["difference"] = a - b
    ha, hb = _half(ia), _half(ib)
    if ha is not None and hb is not None and (ha > 0 or hb > 0):  # two exact numbers (no interval): not judged
        row["allowed"] = math.hypot(ha, hb)
        row["consistent"] = bool(abs(a - b) <= row["allowed"])
    return row


def _interval_of(entry: dict | None) -> tuple[float | None, dict | None]:
    """(estimate, interval) of a contrast entry ({'estimate', 'interval'}) or an interval ({'mean', ...})."""
    if not entry:
        return None, None
    if "estimate" in entry:
        return entry["estimate"], entry.get("interval")
    return entry.get("mean"), entry


def _by(items: list[dict], key) -> dict:
    return {key(item): item for item in items or []}


def _verdict_row(mine: dict, theirs: dict | None) -> dict:
    """A claim's or finding's verdict in both runs; it replicates when they are equal."""
    return {"id": mine["id"], "statement": mine["statement"], "first": mine["verdict"],
            "second": theirs["verdict"] if theirs else None,
            "replicates": bool(theirs is not None and theirs["verdict"] == mine["verdict"])}


def _claim_rows(first: dict, second: dict) -> tuple[list[dict], list[dict]]:
    verdicts, rows = [], []
    other = _by(second.get("claims", []), lambda c: c["id"])
    for c in first.get("claims", []):
        d = other.get(c["id"])
        verdicts.append(_verdict_row(c, d))
        if not d:
            continue
        parts = [(c.get("primary"), d.get("primary"), "primary")]
        theirs = _by(d.get("supporting", []), lambda s: s["name"])
        parts += [(s, theirs.get(s["name"]), "supporting") for s in c.get("supporting", [])]
        for mine, yours, role in parts:
            if not mine or not yours:
                continue
            rows.append({"section": f"{c['id']} ({role})", "name": mine["name"],
                         **compare_values(*_interval_of(mine), *_interval_of(yours))})
    return verdicts, rows


def _beyond_rows(first: dict, second: dict) -> tuple[list[dict], list[dict]]:
    verdicts, rows = [], []
    other = _by(second.get("beyond_paper", []), lambda b: b["id"])
    for b in first.get("beyond_paper", []):
        d = other.get(b["id"])
        verdicts.append(_verdict_row(b, d))
        theirs = _by(d.get("cells", []) if d else [], lambda cell: cell["name"])
        for cell in b.get("cells", []):
            if cell["name"] in theirs:
                rows.append({"section": b["id"], "name": cell["name"],
                             **compare_values(*_interval_of(cell), *_interval_of(theirs[cell["name"]]))})
    return verdicts, rows


def _other_rows(first: dict, second: dict) -> list[dict]:
    rows = []
    curves = [(r.get("pretraining") or {}).get("curve") or [] for r in (first, second)]
    if curves[0] and curves[1] and curves[0][-1]["step"] == curves[1][-1]["step"]:
        rows.append({"section": "pre-training", "name": f"held-out loss at step {curves[0][-1]['step']} (one model each)",
                     **compare_values(curves[0][-1].get("wikipedia_loss"), None,
                                      curves[1][-1].get("wikipedia_loss"), None)})
    cells = _by((second.get("recipe_2x2") or {}).get("cells", []), lambda c: (c["optimizer_state"], c["data"]))
    for c in (first.get("recipe_2x2") or {}).get("cells", []):
        d = cells.get((c["optimizer_state"], c["data"]))
        if d and c.get("minus_loss_at_P") and d.get("minus_loss_at_P"):
            rows.append({"section": "recipe 2x2", "name": f"MHA continued - loss at P [optimizer state "
                                                          f"{c['optimizer_state']}, data {c['data']}]",
                         **compare_values(*_interval_of(c["minus_loss_at_P"]), *_interval_of(d["minus_loss_at_P"]))})
    kept = _by(second.get("kept_optimizer_state", []), lambda k: k["name"] + k["variant"] + str(k["alpha"]))
    for k in first.get("kept_optimizer_state", []):
        d = kept.get(k["name"] + k["variant"] + str(k["alpha"]))
        if d:
            rows.append({"section": "kept optimizer state", "name": f"{k['name']} [{k['variant']}, alpha={k['alpha']}]",
                         **compare_values(*_interval_of(k["interval"]), *_interval_of(d["interval"]))})
    groups = _by(second.get("groups", []), lambda g: g["kv_heads"])
    for g in first.get("groups", []):
        d = groups.get(g["kv_heads"])
        if d and g.get("gap_to_mha") and d.get("gap_to_mha"):
            rows.append({"section": "groups", "name": f"gap to MHA of {g['variant']} (mean, uptrained)",
                         **compare_values(*_interval_of(g["gap_to_mha"]), *_interval_of(d["gap_to_mha"]))})
    saving = _by(second.get("uptraining_saving", []), lambda s: (s["variant"], s["method"]))
    for s in first.get("uptraining_saving", []):
        d = saving.get((s["variant"], s["method"]))
        if d and s.get("alpha") is not None and d.get("alpha") is not None:
            ia = {"low": s["interval"][0], "high": s["interval"][1]} if s.get("interval") else None
            ib = {"low": d["interval"][0], "high": d["interval"][1]} if d.get("interval") else None
            rows.append({"section": "uptraining saving",
                         "name": f"alpha at which {s['method']} reaches mean's loss at {s['target_alpha']} "
                                 f"[{s['variant']}]", **compare_values(s["alpha"], ia, d["alpha"], ib)})
    return rows


def compare(first: dict, second: dict) -> dict:
    """Compares two studies' results (`load`'s dicts); raises ValueError if their settings differ."""
    check_comparable(first, second)
    claim_verdicts, claim_rows = _claim_rows(first, second)
    beyond_verdicts, beyond_rows = _beyond_rows(first, second)
    rows = claim_rows + beyond_rows + _other_rows(first, second)
    seeds = (list(first.get("seeds", [])), list(second.get("seeds", [])))
    pretrain = (_pretrain_seeds(first), _pretrain_seeds(second))
    shared = sorted(set(seeds[0]) & set(seeds[1]))
    if shared and pretrain[0] == pretrain[1]:
        independence = (f"the runs share uptraining seeds {shared} and the pre-training seed: where those agree, "
                        "this is a determinism check, not a replication")
    elif shared:
        independence = (f"the runs share uptraining seeds {shared} but not the pre-training: every model differs")
    else:
        independence = "no uptraining seed is shared" + ("" if pretrain[0] == pretrain[1] else
                                                          ", and the pre-training seeds differ")
    judged = [r for r in rows if r["consistent"] is not None]
    return {"first": {"path": first.get("_path"), "command": first.get("command"), "seeds": seeds[0],
                      "pretrain_seeds": pretrain[0], "wall_time_s": first.get("wall_time_s")},
            "second": {"path": second.get("_path"), "command": second.get("command"), "seeds": seeds[1],
                       "pretrain_seeds": pretrain[1], "wall_time_s": second.get("wall_time_s")},
            "stage_wall_time_s": {stage: [first.get("stage_wall_time_s", {}).get(stage),
                                          second.get("stage_wall_time_s", {}).get(stage)]
                                  for stage in sorted({*first.get("stage_wall_time_s", {}),
                                                       *second.get("stage_wall_time_s", {})})},
            "independence": independence,
            "claims": claim_verdicts, "beyond_paper": beyond_verdicts, "rows": rows,
            "summary": {"claims_replicated": sum(v["replicates"] for v in claim_verdicts),
                        "claims": len(claim_verdicts),
                        "beyond_replicated": sum(v["replicates"] for v in beyond_verdicts),
                        "beyond": len(beyond_verdicts),
                        "consistent": sum(r["consistent"] for r in judged), "compared": len(judged),
                        "inconsistent": [f"{r['section']}: {r['name']}" for r in judged if not r["consistent"]],
                        "opposite_sign": [f"{r['section']}: {r['name']}" for r in rows if r["difference"] is not None
                                          and r["first"] * r["second"] < 0]}}


def _n(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def _iv(x: float | None, interval: dict | None) -> str:
    if x is None:
        return "-"
    if not interval or interval.get("low") is None:
        return _n(x)
    return f"{_n(x)} [{_n(interval['low'])}, {_n(interval['high'])}]"


def markdown(result: dict) -> str:
    """The comparison as a markdown page."""
    a, b, s = result["first"], result["second"], result["summary"]
    lines = ["# Replication: two runs of the study", "",
             f"- first: `{a['command']}` (uptraining seeds {a['seeds']}, pre-training seed "
             f"{', '.join(map(str, a['pretrain_seeds']))}; {_n((a['wall_time_s'] or 0) / 60)} min in all sessions)",
             f"- second: `{b['command']}` (uptraining seeds {b['seeds']}, pre-training seed "
             f"{', '.join(map(str, b['pretrain_seeds']))}; {_n((b['wall_time_s'] or 0) / 60)} min in all sessions)",
             f"- independence: {result['independence']}; both score the same held-out examples.", "",
             f"**{s['claims_replicated']} of {s['claims']} claims** and **{s['beyond_replicated']} of {s['beyond']} "
             f"beyond-paper findings** get the same verdict in both runs; **{s['consistent']} of {s['compared']} "
             "quantities** are consistent (the 95% interval of their difference, taken as independent, holds 0; "
             "the runs share the held-out articles, so this rule can miss a difference but does not invent one).", ""]
    if s["inconsistent"]:
        lines += ["Not consistent: " + "; ".join(s["inconsistent"]) + ".", ""]
    lines += [("Opposite signs in the two runs: " + "; ".join(s["opposite_sign"]) + ".") if s["opposite_sign"]
              else "Every quantity has the same sign in both runs.", ""]
    if result["stage_wall_time_s"]:
        lines += ["Stage wall times (minutes; each run's markers, every session):", "",
                  "| stage | first | second |", "|---|---|---|"]
        lines += [f"| {stage} | {_n(a_s / 60 if a_s is not None else None)} | {_n(b_s / 60 if b_s is not None else None)} |"
                  for stage, (a_s, b_s) in result["stage_wall_time_s"].items()]
        lines.append("")
    lines += ["## Verdicts", "", "| id | statement | first | second | same |", "|---|---|---|---|---|"]
    for v in result["claims"] + result["beyond_paper"]:
        lines.append(f"| {v['id']} | {v['statement']} | {v['first']} | {v['second'] or '-'} | "
                     f"{'yes' if v['replicates'] else '**no**'} |")
    lines += ["", "## Every quantity", "", "Estimates with their 95% intervals (kinds as in each report).", "",
              "| part | quantity | first | second | difference | allowed | consistent |",
              "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        ok = "-" if r["consistent"] is None else "yes" if r["consistent"] else "**no**"
        lines.append(f"| {r['section']} | {r['name']} | {_iv(r['first'], r['first_interval'])} | "
                     f"{_iv(r['second'], r['second_interval'])} | {_n(r['difference'])} | {_n(r['allowed'])} | {ok} |")
    return "\n".join(lines) + "\n"


def write(result: dict, output: str | Path) -> dict[str, Path]:
    """Writes `replication.md` and `replication.json` into `output`; returns their paths."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    files = {"markdown": output / "replication.md", "json": output / "replication.json"}
    files["markdown"].write_text(markdown(result))
    files["json"].write_text(json.dumps(result, indent=1) + "\n")
    return files
