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


def write_report(out: Path, config, metrics: dict, history: dict) -> None:
    ks = sorted(config.evaluation.ks)
    plot_training(history, metrics, ks, out / "training.png")
    text = [
        f"# Run `{config.name}`",
        "",
        f"- data: {metrics['dataset']}, protocol `{metrics['protocol']}`, "
        f"{metrics['train_positives']} training positives",
        f"- objective: {config.objective.kind}, temperature {config.objective.temperature}, "
        f"logQ {'on' if config.objective.logq_correction else 'off'}",
        f"- training: {metrics['epochs_run']} epochs in {metrics['train_seconds']:.1f} s",
        f"- test: {metrics['model']['test_pairs']} pairs from "
        f"{metrics['model']['test_users']} users, catalog {metrics['model']['catalog_size']}",
        "",
        metrics_table({"two-tower": metrics["model"], "most popular": metrics["popularity"]},
                      ks),
        "",
        "HR@K: share of test pairs whose item is in the user's top K (train items "
        "excluded). Recall/NDCG: per user, averaged. Coverage: share of the catalog "
        "recommended to anyone. Popularity bias: mean popularity percentile of "
        "recommended items (1 = most popular).",
        "",
        "![training](training.png)",
        "",
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
    width = 0.38
    xs = range(len(ks))
    for off, (name, key) in zip((-width / 2, width / 2),
                                (("two-tower", "model"), ("most popular", "popularity"))):
        axes[1].bar([x + off for x in xs], [metrics[key][f"hr@{k}"] for k in ks], width,
                    label=name)
    axes[1].set_xticks(list(xs), [f"HR@{k}" for k in ks])
    axes[1].set_ylim(0, 1)
    axes[1].set_title("test hit rate")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
