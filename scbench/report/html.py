"""One self-contained HTML leaderboard: a sortable, filterable table (category, mode, stage) and the figures
inlined as base64 SVG. No network access at view time: the script and styles are in the page."""
from __future__ import annotations

import base64
import html
from collections import defaultdict

from scbench.report.export import EXPORT_SCHEMA_VERSION, failures, records
from scbench.report.costs import declared_costs
from scbench.report.figures import figures_for, render
from scbench.report import trust
from scbench.report.table import COST_COLUMNS, cost_header

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.2em;color:#222}h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.4em}
table{border-collapse:collapse;font-size:12px}th,td{border:1px solid #ccc;padding:3px 6px;text-align:right;white-space:nowrap}
th{background:#f0f0f0;cursor:pointer;user-select:none}td.t{text-align:left}th.sorted-asc:after{content:" \\25B2"}
th.sorted-desc:after{content:" \\25BC"}.filters{margin:.6em 0}.filters label{margin-right:1em}
.figs img{max-width:48%;margin:4px;border:1px solid #eee}.note{color:#666;font-size:12px}
"""

_SCRIPT = """
(function(){
  const table=document.getElementById('board'), body=table.tBodies[0];
  const heads=[...table.tHead.rows[0].cells];
  heads.forEach((th,i)=>th.addEventListener('click',()=>{
    const asc=!th.classList.contains('sorted-asc');
    heads.forEach(h=>h.classList.remove('sorted-asc','sorted-desc'));
    th.classList.add(asc?'sorted-asc':'sorted-desc');
    const rows=[...body.rows];
    rows.sort((a,b)=>{
      const x=a.cells[i].dataset.v, y=b.cells[i].dataset.v;
      const nx=parseFloat(x), ny=parseFloat(y);
      const c=(!isNaN(nx)&&!isNaN(ny))?nx-ny:String(x).localeCompare(String(y));
      return asc?c:-c;});
    rows.forEach(r=>body.appendChild(r));
  }));
  const sel=[...document.querySelectorAll('.filters select')], text=document.getElementById('q');
  function apply(){
    const q=text.value.toLowerCase();
    let shown=0;
    [...body.rows].forEach(r=>{
      let ok=sel.every(s=>!s.value||(' '+r.dataset[s.name]+' ').includes(' '+s.value+' '));
      ok=ok&&(!q||r.textContent.toLowerCase().includes(q));
      r.style.display=ok?'':'none'; shown+=ok;});
    document.getElementById('count').textContent=shown+' rows';
  }
  sel.forEach(s=>s.addEventListener('change',apply)); text.addEventListener('input',apply); apply();
})();
"""


def example_means(store, variant=None) -> dict[str, dict[str, float]]:
    """run_id -> example -> mean score (0-100) over the example's turns and metrics (for the intervals)."""
    acc = defaultdict(lambda: defaultdict(list))
    for t in store.turns(variant=variant):
        acc[t["run_id"]][t["example_id"]] += [100.0 * float(v) for v in t["scores"].values()]
    return {rid: {ex: sum(v) / len(v) for ex, v in exs.items() if v} for rid, exs in acc.items()}


def _rows(recs, per_example=None):
    """One table row per run (model x method x budget x setting x mode x task): T1..Tn scores with their 95 %
    intervals, mean and its interval, n, capped share, per-turn cost means (headers as in the markdown table)."""
    per_example = per_example or {}
    groups = defaultdict(list)
    for r in recs:
        groups[(r["model"], r["method"], r["budget"], r.get("setting", ""), r["mode"], r["category"], r["task"],
                r["run_id"])].append(r)
    turns = sorted({r["turn"] for r in recs})
    # method-specific costs with a leaderboard label, where some record measured them (not the default)
    extra = {col: cost_header(c.label, c.agg) for col, c in declared_costs().items()
             if c.label and any(r["costs"].get(col) not in (None, c.default) for r in recs)}
    universal = {"prefill_computed": "prefill_computed", "prefill_reused": "prefill_reused", "ttft_s": "ttft_s",
                 "decode_tok_s": "decode_tok_s", "kv_ratio": "kv_ratio", "attn_density": "attn_density"}
    paid = any(r.get("payback") for r in recs)
    rows = []
    for key, g in sorted(groups.items()):
        by_turn = {r["turn"]: r for r in g}
        scores = [r["score"] for r in by_turn.values() if r["score"] is not None]

        def mean(f, g=g):
            v = [r["costs"][f] for r in g if r["costs"].get(f) is not None]
            return sum(v) / len(v) if v else None

        def ci(pair):
            return "" if not pair or pair[0] is None else f"[{pair[0]:.1f}, {pair[1]:.1f}]"

        row = {"model": key[0], "method": key[1], "budget": key[2], "setting": key[3], "mode": key[4],
               "category": key[5], "task": key[6], "stages": " ".join(g[0]["stages"]) or "none"}
        for t in turns:
            row[f"T{t}"] = by_turn[t]["score"] if t in by_turn else None
            row[f"T{t} ci95"] = ci(by_turn[t].get("score_ci95")) if t in by_turn else ""
        row["avg"] = sum(scores) / len(scores) if scores else None
        row["avg ci95"] = ci(trust.bootstrap_ci(list(per_example.get(key[7], {}).values())))
        row["n"] = max(r["n_examples"] for r in g)
        row["status"] = ",".join(sorted({r["status"] for r in g}))
        row["turns"] = " ".join(sorted({f"{r['turns_done']}/{r['turns_expected'] or '?'}" for r in g}))
        row["capped %"] = 100.0 * sum(r.get("capped_share", 0.0) for r in g) / len(g)
        row["unfired %"] = 100.0 * sum(r.get("unfired_share", 0.0) for r in g) / len(g)
        row[cost_header(*COST_COLUMNS["kv_mib"])] = (mean("kv_bytes") or 0) / 2**20
        for col, field in universal.items():
            row[cost_header(*COST_COLUMNS[col])] = mean(field)
        row.update({label: mean(col) for col, label in extra.items()})
        if paid:  # one-time compression vs full attention (scbench/report/payback.py), per run
            pb = g[0].get("payback") or {}
            row["extra once s"], row["saving/query s"] = pb.get("extra_once_s"), pb.get("saving_per_query_s")
            row["queries to pay back"] = ("never" if pb and not pb["pays_back"] else pb.get("queries_to_pay_back"))
        row["_run"] = key[7]
        rows.append(row)
    if not any(r["setting"] for r in rows):
        for r in rows:
            del r["setting"]
    return rows


def _cell(v):
    if v is None:
        return '<td data-v="">-</td>'
    if isinstance(v, float):
        shown = f"{v:.3f}" if abs(v) < 1 and v else f"{v:.1f}"
        return f'<td data-v="{v}">{shown}</td>'
    if isinstance(v, int):
        return f'<td data-v="{v}">{v}</td>'
    return f'<td class="t" data-v="{html.escape(str(v))}">{html.escape(str(v))}</td>'


def _select(name, values):
    opts = "".join(f'<option value="{html.escape(v)}">{html.escape(v)}</option>' for v in sorted(values))
    return f'<label>{name} <select name="{name}"><option value="">all</option>{opts}</select></label>'


def build_html(store, title: str = "scbench leaderboard", variant: str | None = None,
               include_incomplete: bool = False) -> str:
    recs = records(store, variant, include_incomplete)
    per_example = example_means(store, variant)
    rows = _rows(recs, per_example)
    cols = [c for c in rows[0] if c != "_run"] if rows else ["model", "method", "budget", "mode", "category", "task", "stages", "avg"]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = []
    for r in rows:
        data = " ".join(f'data-{k}="{html.escape(str(r[k]))}"' for k in ("category", "mode", "stages"))
        body.append(f"<tr {data}>" + "".join(_cell(r[c]) for c in cols) + "</tr>")
    filters = (_select("category", {r["category"] for r in rows}) + _select("mode", {r["mode"] for r in rows})
               + _select("stages", {s for r in rows for s in r["stages"].split()})
               + '<label>search <input id="q" type="search"></label> <span id="count" class="note"></span>')
    figs = []
    if recs:
        for name, make in figures_for(recs).items():
            b64 = base64.b64encode(render(make(recs), "svg")).decode()
            figs.append(f'<img alt="{name}" src="data:image/svg+xml;base64,{b64}">')
    cat_rows = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["avg"] is not None:
            cat_rows[(r["model"], r["method"], r["budget"], r.get("setting", ""), r["mode"], r["stages"])][
                r["category"]].append(r)
    categories = sorted({r["category"] for r in rows})
    with_setting = any(r.get("setting") for r in rows)
    cat_head = "".join(f"<th>{html.escape(c)}</th>" for c in [
        "model", "method", "budget", *(["setting"] if with_setting else []), "mode", "stages",
        *[x for c in categories for x in (c, f"{c} ci95", f"{c} n")], "overall"])
    cats = ""
    for k, by_cat in sorted(cat_rows.items()):
        means = {c: sum(r["avg"] for r in v) / len(v) for c, v in by_cat.items()}
        overall = sum(means.values()) / len(means)
        cells = ""
        for c in categories:
            v = by_cat.get(c, [])
            lo, hi = trust.stratified_ci([list(per_example.get(r["_run"], {}).values()) for r in v])
            cells += _cell(means.get(c)) + _cell("" if lo is None else f"[{lo:.1f}, {hi:.1f}]")
            cells += _cell(max((r["n"] for r in v), default=None))
        labels = k if with_setting else k[:3] + k[4:]
        cats += "<tr>" + "".join(_cell(x) for x in labels) + cells + _cell(overall) + "</tr>"
    unfinished = [r for r in store.runs() if not r["complete"] and r["status"] != "failed"]
    unfinished_html = ("<h2>Unfinished runs</h2><p class=\"note\">" + ("In the board above." if include_incomplete else
                       "Left out of the board and its averages (export --include-incomplete adds them).")
                       + "</p><table><tr><th>run</th><th>model</th><th>method</th><th>task</th><th>mode</th><th>status</th>"
                       "<th>turns done/expected</th></tr>"
                       + "".join("<tr>" + "".join(_cell(r[k]) for k in ("run_id", "model", "method_label", "task", "mode",
                                                                         "status"))
                                 + _cell(f"{r['turns_done']}/{r['turns_expected'] or '?'}") + "</tr>" for r in unfinished)
                       + "</table>") if unfinished else ""
    fails = failures(store)
    fail_html = ("<h2>Failed runs</h2><table><tr><th>run</th><th>model</th><th>method</th><th>task</th><th>mode</th><th>error</th></tr>"
                 + "".join("<tr>" + "".join(_cell(f[k]) for k in ("run_id", "model", "method", "task", "mode", "error")) + "</tr>"
                           for f in fails) + "</table>") if fails else ""
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_STYLE}</style></head><body>
<h1>{html.escape(title)}</h1>
<p class="note">Scores 0-100 per turn (T1..Tn) averaged over examples, with seeded bootstrap 95 % intervals over the
examples (ci95) and n; one row per run (runs of the same model, method, task and mode differ in the setting shown);
capped %: turns that stopped at the generation cap while the reference needs more tokens; unfired %: turns where the
method did not do what it promises. Cost columns are per-turn values aggregated as their header says (mean/turn), the
same headers as the markdown and CSV tables. KV vs full: resident KV bytes over a full-attention cache of the same tokens. Stages: the method's lifecycle stages (generation, compression, retrieval,
loading). Export schema v{EXPORT_SCHEMA_VERSION}; click a header to sort.</p>
<div class="filters">{filters}</div>
<table id="board"><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>
<h2>Category averages</h2>
<p class="note">Mean of the task averages per SCBench category (string retrieval, semantic retrieval, global information,
multi-task); overall: mean of the categories.</p>
<table><tr>{cat_head}</tr>{cats}</table>
<h2>Figures</h2><div class="figs">{''.join(figs) or '<p class="note">(no results)</p>'}</div>
{unfinished_html}
{fail_html}
<script>{_SCRIPT}</script>
</body></html>
"""
