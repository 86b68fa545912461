"""Evaluation report files: ``report.json``, ``report.md`` and PNG plots."""
from __future__ import annotations

import json
import os

import torch


def pyplot():
    """matplotlib's pyplot on the file-only backend (no display on training or CI machines);
    imported when a plot is drawn, never at start-up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_report(report: dict, out_dir: str) -> None:
    """``report.json``, ``report.md``, the plots, and ``predictions.jsonl`` (one line per problem:
    its set, id, gold, generated ids and text, and each rule's verdict)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "predictions.jsonl"), "w", encoding="utf-8") as handle:
        for name, result in report["sets"].items():
            for row in result.pop("predictions", []):
                handle.write(json.dumps({"set": name, **row}) + "\n")
    plots = {"accuracy": plot_accuracy(report, os.path.join(out_dir, "accuracy.png"))}
    if report["latents"] and len(report["latents"][0]["latents"]) >= 2:     # one latent: no pairs to compare
        plots["latent_similarity"] = plot_latent_similarity(report["latents"], os.path.join(out_dir,
                                                                                             "latent_similarity.png"))
    report["plots"] = plots
    with open(os.path.join(out_dir, "report.json"), "w", encoding="utf-8") as handle:
        json.dump({**report, "latents": [{k: v for k, v in x.items() if k != "latents"} for x in report["latents"]]},
                  handle, indent=2)
    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as handle:
        handle.write(markdown(report))


def protocol_table(report: dict) -> list[str]:
    """A paper's protocol beside ours, where one was chosen (``--protocol``)."""
    chosen = {name: r["protocol"] for name, r in report["sets"].items() if r["protocol"]["accuracy"] is not None}
    if not chosen:
        return []
    first = next(iter(chosen.values()))
    lines = [f"## By the {first['name']} protocol", "",
             f"{first['rule']}; greedy, {first['max_new_tokens']} new tokens, batches of {first['batch_size']}", "",
             "| set | accuracy (protocol) | accuracy (after '#') | accuracy (last number) |", "|---|---|---|---|"]
    for name, p in chosen.items():
        r = report["sets"][name]
        lines.append(f"| {name} | {100 * p['accuracy']:.1f}% | {100 * r['accuracy_hash']:.1f}% | "
                     f"{100 * r['accuracy_number']:.1f}% |")
    return lines + [""]


def markdown(report: dict) -> str:
    lc = report["latent_config"]
    lines = [f"# Evaluation of `{report['model']}`", "",
             f"method **{lc['method']}**{' + SIM-CoT' if lc.get('simcot') else ''}, {lc['n_latents']} latents, "
             f"split `{report['split']}`, model sha256 `{report['model_fingerprint'][:16]}`", "",
             "| set | problems | accuracy (after '#') | accuracy (last number) | tokens generated | latency/problem "
             "| problems/s |",
             "|---|---|---|---|---|---|---|"]
    for name, r in report["sets"].items():
        lines.append(f"| {name} | {r['n']} | {100 * r['accuracy_hash']:.1f}% | {100 * r['accuracy_number']:.1f}% | "
                     f"{r['mean_tokens']:.1f} | {1000 * r['latency_s']:.1f} ms | {r['problems_per_s']:.1f} |")
    lines += ["", "![accuracy](accuracy.png)", ""] + protocol_table(report)
    geometry = {name: r["latent_geometry"] for name, r in report["sets"].items() if r.get("latent_geometry")}
    if geometry:
        source = report["latent_config"].get("source") or {}
        of = f" of checkpoint `{source['tag']}` (step {source.get('global_step')})" if source.get("tag") else ""
        lines += [f"## Latent geometry{of} (collapse diagnostics, SIM-CoT App. H)", "",
                  "| set | mean pairwise L2 between latents | mean L2 to vocabulary centre "
                  "| embedding rows to centre | mean pairwise cosine | latent / token norm |",
                  "|---|---|---|---|---|---|"]
        for name, g in geometry.items():
            inter, cosine = (("n/a (one latent)" if g.get(k) is None else f"{g[k]:.{digits}f}")
                             for k, digits in (("inter_latent_l2", 2), ("latent_cosine", 3)))
            lines.append(f"| {name} | {inter} | {g['to_vocab_centre_l2']:.2f} | {g['embedding_to_centre_l2']:.2f} "
                         f"| {cosine} | {g.get('latent_norm_ratio', float('nan')):.3g} |")
        lines.append("")
    if report["latents"]:
        picture = ("![latent similarity](latent_similarity.png)" if "latent_similarity" in report.get("plots", {})
                   else "(one latent per problem: no similarity between latents to plot)")
        lines += ["## Decoded latents", "", picture, ""]
        for item in report["latents"]:
            lines.append(f"**{item['id']}** {item['question']}  ")
            lines.append(f"gold steps: {' '.join(item['gold_steps']) or '(none)'}  ")
            for k, (step, lens) in enumerate(zip(item["decoded_steps"] or [], item["logit_lens_top5"])):
                lines.append(f"- latent {k}: decoder `{step!r}`, logit lens {lens}")
            lines.append("")
    return "\n".join(lines) + "\n"


def plot_accuracy(report: dict, path: str) -> str:
    plt = pyplot()
    names = list(report["sets"])
    lc = report["latent_config"]
    label = f"{lc['method']}{'+SIM-CoT' if lc.get('simcot') else ''}"
    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(names)), 3.2))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [100 * report["sets"][n]["accuracy_hash"] for n in names], 0.4,
           label=f"{label}: after '#'")
    ax.bar([x + 0.2 for x in xs], [100 * report["sets"][n]["accuracy_number"] for n in names], 0.4,
           label=f"{label}: last number")
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return os.path.basename(path)


def plot_latent_similarity(latents: list[dict], path: str) -> str:
    """Mean pairwise cosine similarity between latent positions over the decoded problems."""
    plt = pyplot()
    sims = []
    for item in latents:
        z = torch.nn.functional.normalize(torch.tensor(item["latents"]), dim=-1)
        sims.append(z @ z.T)
    mean = torch.stack(sims).mean(0).numpy()
    k = mean.shape[0]
    side = min(8.0, 2.4 + 0.35 * k)
    fig, ax = plt.subplots(figsize=(side + 0.8, side))
    image = ax.imshow(mean, vmin=-1, vmax=1, cmap="coolwarm")
    ticks = list(range(0, k, max(1, k // 8)))           # integer latent numbers, at most ~8 labels
    ax.set_xticks(ticks, [str(t + 1) for t in ticks])
    ax.set_yticks(ticks, [str(t + 1) for t in ticks])
    if k <= 8:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, f"{mean[i, j]:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xlabel("latent")
    ax.set_ylabel("latent")
    ax.set_title(f"mean cosine similarity ({len(latents)} problems)", fontsize=9)
    fig.colorbar(image)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return os.path.basename(path)
