"""Results of ``python -m experiments.sweep``: read from each run's eval report and metrics, never fixed.

Writes ``results.json``, ``results.md`` (tables), ``accuracy_vs_latents.png`` and
``geometry_vs_latents.png`` in the sweep directory; returns the markdown.
"""
from __future__ import annotations

import dataclasses
import json
import os

from experiments.jobs import done_record
from experiments.sweep_methods import chained
from pipeline.inference.report import pyplot

EVAL_SET = "test"           # the name of the evaluated set in each run's report

LABELS = {"coconut": "Coconut", "simcot": "Coconut + SIM-CoT", "codi-simcot": "CODI + SIM-CoT", "cot": "CoT",
          "nocot": "No-CoT", "coconut-jacobi": "Coconut, Jacobi", "simcot-jacobi": "Coconut + SIM-CoT, Jacobi",
          "codi-simcot-jacobi": "CODI + SIM-CoT, Jacobi"}
COLORS = {"coconut": "tab:blue", "simcot": "tab:orange", "codi-simcot": "tab:purple", "coconut-jacobi": "tab:green",
          "simcot-jacobi": "tab:red", "codi-simcot-jacobi": "tab:brown"}


def _metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def run_result(plan, name: str) -> dict:
    """One evaluated run: test accuracy, tokens, latent geometry, final train loss, seconds."""
    run_dir = plan.run_dir(name)
    with open(os.path.join(run_dir, "eval", "report.json"), encoding="utf-8") as handle:
        report = json.load(handle)
    test = report["sets"][EVAL_SET]
    train = [m for m in _metrics(run_dir) if "loss/answer_ce" in m]
    seconds = sum((done_record(plan.out, f"{kind}-{name}") or {}).get("seconds", 0.0) for kind in ("train", "eval"))
    return {"run": name, "n_latents": report["latent_config"]["n_latents"], "accuracy": test["accuracy_hash"],
            "accuracy_number": test["accuracy_number"], "n": test["n"], "mean_tokens": test["mean_tokens"],
            "geometry": test.get("latent_geometry"), "final_answer_ce": train[-1]["loss/answer_ce"],
            "steps": train[-1]["step"], "seconds": seconds}


def chain_curve(plan, method: str) -> list[dict]:
    """Last logged train answer loss of each curriculum stage of a chain (the collapse curve), and
    the last latent cosine (computed on the printed steps only)."""
    last: dict[int, dict] = {}
    cosine: dict[int, float] = {}
    for m in _metrics(plan.run_dir(f"{method}-chain")):
        if "loss/answer_ce" in m:
            last[m["stage"]] = m
        if "latent/latent_cosine" in m:
            cosine[m["stage"]] = m["latent/latent_cosine"]
    return [{"stage": s, "n_latents": s * plan.c_thought, "answer_ce": m["loss/answer_ce"],
             "latent_cosine": cosine.get(s)} for s, m in sorted(last.items())]


def collect(plan, finals: dict[str, tuple[str, int, int]]) -> dict:
    """``finals``: run name -> (method, point, final steps), as experiments.sweep.final_runs gives."""
    methods = list(dict.fromkeys(method for method, _, _ in finals.values()))
    points: dict[str, list] = {m: [] for m in methods}
    equal: dict[str, list] = {m: [] for m in methods}
    for name, (method, n, _) in finals.items():
        row = run_result(plan, name)
        row.update(max_latent_stage=n, total_steps=n * plan.stage_steps * chained(method) + row["steps"])
        (equal if name.endswith("-equal") else points)[method].append(row)
    if any(equal.values()):        # the largest point closes each equal-budget curve
        for method in methods:
            equal[method].append(points[method][-1])
    return {"references": {ref: run_result(plan, ref) for ref in ("cot", "nocot")}, "points": points,
            "equal_budget": equal if any(equal.values()) else None,
            "chains": {method: chain_curve(plan, method) for method in methods if chained(method)}}


def _fmt(value, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def _point_rows(rows_by_method: dict[str, list]) -> list[str]:
    lines = []
    for method, rows in rows_by_method.items():
        for r in rows:
            g = r["geometry"] or {}
            lines.append(f"| {LABELS[method]} | {r['max_latent_stage']} | {r['n_latents']} | {r['total_steps']} | "
                         f"{100 * r['accuracy']:.1f}% | {r['mean_tokens']:.1f} | {_fmt(g.get('inter_latent_l2'))} | "
                         f"{_fmt(g.get('to_vocab_centre_l2'))} | {r['final_answer_ce']:.3f} | {r['seconds']:.0f} |")
    return lines


HEADER = ["| method | max stage | latents | latent train steps | test accuracy | tokens generated | pairwise latent L2 "
          "| latent L2 to vocab centre | final train answer loss | train + eval s |",
          "|---|---|---|---|---|---|---|---|---|---|"]


def markdown(plan, results: dict, seconds: float) -> str:
    ref = results["references"]
    lines = [f"# Latent scaling at toy scale ({len(plan.points)} points, c = {plan.c_thought}, seed {plan.seed})", "",
             f"CoT {100 * ref['cot']['accuracy']:.1f}% / No-CoT {100 * ref['nocot']['accuracy']:.1f}% on "
             f"{ref['cot']['n']} test problems ({plan.cot_steps} steps each). Latent runs: {plan.stage_steps} steps "
             f"per curriculum stage, then {plan.final_steps} steps of the final (all-latent) stage, "
             f"lr {plan.latent_lr}" + (f"; Jacobi runs: {plan.jacobi} parallel latent iterations." if plan.jacobi
                                       else "."),
             f"Whole sweep: {seconds / 60:.1f} min wall-clock (this call; resumed jobs not counted).", "",
             *HEADER, *_point_rows(results["points"])]
    for name in ("cot", "nocot"):
        r = ref[name]
        lines.append(f"| {LABELS[name]} | - | 0 | - | {100 * r['accuracy']:.1f}% | {r['mean_tokens']:.1f} | - | - | "
                     f"{r['final_answer_ce']:.3f} | {r['seconds']:.0f} |")
    if results["equal_budget"]:
        lines += ["", "Equal-budget control: every point trained as many latent steps as the largest one "
                  "(a longer final stage):", "", *HEADER, *_point_rows(results["equal_budget"])]
    embedding = next((r["geometry"]["embedding_to_centre_l2"] for rows in results["points"].values() for r in rows
                      if r["geometry"]), None)
    lines += ["", f"Embedding rows lie {_fmt(embedding)} from the vocabulary centre on average (the scale for the "
              "distances above).", *_chain_table(results["chains"]),
              "", "![accuracy vs latents](accuracy_vs_latents.png)", "", "![geometry](geometry_vs_latents.png)", ""]
    return "\n".join(lines)


def _chain_table(chains: dict[str, list]) -> list[str]:
    if not chains:
        return []
    lines = ["", "Curriculum chains, train answer loss at the end of each stage:", "",
             "| stage | latents | " + " | ".join(LABELS[m] for m in chains) + " |", "|---|---|" + "---|" * len(chains)]
    for i, row in enumerate(max(chains.values(), key=len)):
        values = [_fmt(curve[i]["answer_ce"], ".3f") if i < len(curve) else "n/a" for curve in chains.values()]
        lines.append(f"| {row['stage']} | {row['n_latents']} | " + " | ".join(values) + " |")
    return lines


def _curves(results: dict):
    """(label suffix, line style, rows by method) for each budget that was run."""
    yield "", "-", results["points"]
    if results["equal_budget"]:
        yield ", equal budget", "--", results["equal_budget"]


def _latent_counts(results: dict) -> list[int]:
    """The points' latent counts: the x ticks (integers, never fractions of a latent)."""
    return sorted({r["n_latents"] for _, _, by_method in _curves(results) for rows in by_method.values() for r in rows})


def plot(results: dict, out: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for suffix, style, rows_by_method in _curves(results):
        for method, rows in rows_by_method.items():
            ax.plot([r["n_latents"] for r in rows], [100 * r["accuracy"] for r in rows], marker="o", linestyle=style,
                    color=COLORS[method], label=LABELS[method] + suffix)
    for name, style in (("cot", "--"), ("nocot", ":")):
        ax.axhline(100 * results["references"][name]["accuracy"], linestyle=style, color="gray", label=LABELS[name])
    ax.set(xlabel="latents (c x max stage)", ylabel="test accuracy (%)", ylim=(0, 100),
           title="Accuracy vs number of latents (toy task)")
    ax.set_xticks(_latent_counts(results))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "accuracy_vs_latents.png"), dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    keys = (("inter_latent_l2", "mean pairwise L2 between latents"), ("to_vocab_centre_l2", "mean L2 to vocab centre"))
    for ax, (key, title) in zip(axes, keys):
        for suffix, style, rows_by_method in _curves(results):
            for method, rows in rows_by_method.items():
                pts = [(r["n_latents"], r["geometry"][key]) for r in rows
                       if r["geometry"] and r["geometry"][key] is not None]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linestyle=style, color=COLORS[method],
                        label=LABELS[method] + suffix)
        ax.set(xlabel="latents", title=title)
        ax.set_xticks(_latent_counts(results))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "geometry_vs_latents.png"), dpi=110)
    plt.close(fig)


def write_results(plan, finals: dict[str, tuple[str, int, int]], seconds: float) -> str:
    results = collect(plan, finals)
    with open(os.path.join(plan.out, "results.json"), "w", encoding="utf-8") as handle:
        json.dump({"plan": dataclasses.asdict(plan), "seconds": seconds, **results}, handle, indent=1)
    plot(results, plan.out)
    text = markdown(plan, results, seconds)
    with open(os.path.join(plan.out, "results.md"), "w", encoding="utf-8") as handle:
        handle.write(text)
    return text
