"""Human-readable run summary: report.md and training.png (loss, HR@K)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def metrics_table(rows: dict[str, dict], ks) -> str:
    """Markdown table: one row per named result, HR/Recall/NDCG at each K."""
    cols = [f"{m}@{k}" for m in ("hr", "recall", "ndcg") for k in ks]
    cols += [f"coverage@{ks[-1]}", f"popularity_bias@{ks[-1]}"]
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, m in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{m.get(c, float('nan')):.3f}"
                                                   for c in cols) + " |")
    return "\n".join(lines)


def reference_rows(metrics: dict) -> dict[str, dict]:
    """Named test-split results of a run: the towers, EASE (when fitted), most popular."""
    rows = {"two-tower": metrics["model"]}
    ease = metrics.get("ease", {})
    if "l2" in ease:
        rows[f"EASE (L2={ease['l2']:g})"] = ease
    rows["most popular"] = metrics["popularity"]
    return rows


def _split_notes(metrics: dict) -> list[str]:
    """Where each number of the report comes from."""
    notes = ["Every row of the table is scored on the **test** split, once, after "
             "training."]
    ease = metrics.get("ease", {})
    if "l2" in ease:
        tried = ", ".join(f"{l2}: {hr:.3f}" for l2, hr in ease["validation"].items())
        notes.append(f"EASE's L2 was chosen on the **validation** split "
                     f"({ease['selection_metric']} per L2: {tried}); {ease['seconds']:.1f} s.")
    elif "skipped" in ease:
        notes.append(ease["skipped"] + ".")
    val = metrics.get("validation") or {}
    if val:
        notes.append("Last epoch on the **validation** split (early stopping and tuning "
                     "choose on it): " + ", ".join(f"{k} {v:.3f}" for k, v in val.items()) + ".")
    return notes


def _logq(objective) -> str:
    if not objective.logq_correction:
        return "off"
    return "on" if objective.logq_weight == 1.0 else f"on, weight {objective.logq_weight:g}"


def write_report(out: Path, config, metrics: dict, history: dict, plot: bool = True) -> None:
    """report.md, and training.png beside it unless ``plot`` is False."""
    ks = sorted(config.evaluation.ks)
    if plot:
        plot_training(history, metrics, ks, out / "training.png")
    text = [
        f"# Run `{config.name}`",
        "",
        f"- data: {metrics['dataset']}, protocol `{metrics['protocol']}`, "
        f"{metrics['train_positives']} training positives",
        f"- objective: {config.objective.kind}, temperature {config.objective.temperature}, "
        f"logQ {_logq(config.objective)}",
        f"- training: {metrics['epochs_run']} epochs in {metrics['train_seconds']:.1f} s",
        f"- test: {metrics['model']['test_pairs']} pairs from "
        f"{metrics['model']['test_users']} users, catalog {metrics['model']['catalog_size']}",
        "",
        metrics_table(reference_rows(metrics), ks),
        "",
        *_split_notes(metrics),
        "",
        "HR@K: share of test pairs whose item is in the user's top K (train items "
        "excluded). Recall/NDCG: per user, averaged. Coverage: share of the catalog "
        "recommended to anyone. Popularity bias: mean popularity percentile of "
        "recommended items (1 = most popular).",
        "",
        *(["![training](training.png)", ""] if plot else []),
    ]
    (out / "report.md").write_text("\n".join(text), encoding="utf-8")


def plot_training(history: dict, metrics: dict, ks, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    loss = history.get("loss", [])
    axes[0].plot(range(1, len(loss) + 1), loss, marker="o", label="train loss")
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("loss")
    val = {k: v for k, v in history.items() if k.startswith("val_hr@")}
    if val:
        twin = axes[0].twinx()
        for k, v in val.items():
            twin.plot(range(1, len(v) + 1), v, linestyle="--", label=k)
        twin.set_ylabel("validation HR")
        twin.legend(loc="center right")
    axes[0].set_title("training")
    axes[0].legend(loc="upper right")
    rows = reference_rows(metrics)
    width = 0.8 / len(rows)
    xs = range(len(ks))
    for n, (name, result) in enumerate(rows.items()):
        off = (n - (len(rows) - 1) / 2) * width
        axes[1].bar([x + off for x in xs], [result[f"hr@{k}"] for k in ks], width,
                    label=name)
    axes[1].set_xticks(list(xs), [f"HR@{k}" for k in ks])
    axes[1].set_ylim(0, 1)
    axes[1].set_title("test hit rate")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
