"""``dinor1 compare``: the runs of one MLflow experiment side by side.

One row per training run: its recipe (SFT and GRQO epochs), the params that usually differ
between runs, its evaluation metrics, how many steps it logged and how long it took. A run that
``dinor1 eval`` made (tagged ``dinor1.run_kind=eval`` and ``dinor1.train_run_id=<id>``) is folded
into the row of the training run it scored; the latest such run wins over earlier ones and over
metrics the training run logged itself. The table is printed and written as CSV and markdown,
next to a PNG: evaluation metrics as grouped bars (left) and the training curves (right).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dinor1.errors import UserError

if TYPE_CHECKING:
    import pandas as pd
    from mlflow.entities import Run

KEY_PARAMS = ("model.init", "data.batch_size", "optimizer.lr", "scaling.num_workers",
              "deepspeed.zero_stage")
GRQO_PARAMS = ("grqo.form", "grqo.alpha", "grqo.beta")
RUN_KIND_TAG = "dinor1.run_kind"
TRAIN_RUN_TAG = "dinor1.train_run_id"


@dataclass
class Comparison:
    """The table (one row per run, raw values) and the files written from it."""

    table: pd.DataFrame
    png: Path
    csv: Path
    markdown: Path

    def as_text(self, line_width: int | None = None, columns: dict[str, str] | None = None
                ) -> str:
        """The table as a terminal reads it: metrics to 4 significant digits, gaps as '-';
        columns past ``line_width`` characters continue in a block below. ``columns``: only
        these ({column: heading}, in that order; absent ones left out)."""
        table = self.table
        if columns:
            kept = {k: v for k, v in columns.items() if k in table.columns}
            table = table[list(kept)].rename(columns=kept)
        return _display(table).to_string(index=False, line_width=line_width)


def add_compare_parser(sub) -> None:
    """Register ``compare`` on an argparse subparsers object."""
    cmp = sub.add_parser(
        "compare",
        help="compare the runs of an MLflow experiment: table, CSV, markdown and a PNG",
        description="One row per training run: recipe, key params, eval metrics (merged from "
        "the 'dinor1 eval' runs linked to it), steps and wall time. Writes compare.csv, "
        "compare.md and compare.png (eval metrics as bars, training curves) into --out.",
    )
    cmp.add_argument("--experiment", required=True, help="MLflow experiment name")
    add_sweep_arguments(cmp)
    cmp.add_argument("--metric", nargs="+", action="extend", metavar="M",
                     help="metric columns, e.g. eval/generic/AP50 train/samples_per_s "
                     "(default: every metric whose name starts with eval/)")
    cmp.add_argument("--runs", nargs="+", action="extend", metavar="R",
                     help="only these runs, by run name, run id or id prefix (the 8 characters "
                     "shown); default: every run of the experiment")
    cmp.add_argument("--tracking-uri", default=None, metavar="URI",
                     help="sqlite:///path/mlflow.db or http://host:port "
                     "(default: MLFLOW_TRACKING_URI)")
    cmp.add_argument("--out", default="compare_output", metavar="DIR",
                     help="folder for compare.csv, compare.md, compare.png "
                     "(default: compare_output)")
    cmp.add_argument("--curve-metric", default="loss/total", metavar="M",
                     help="metric plotted against step and counted for 'steps' "
                     "(default: loss/total)")


def cmd_compare(args) -> int:
    if args.sweep:
        table = compare_sweep(args.experiment, args.sweep, tracking_uri=args.tracking_uri,
                              metrics=args.metric, baseline=args.baseline, out_dir=args.out)
        print(table.as_text())
        print()
        for path in (table.csv, table.markdown, table.png):
            print(f"wrote {path}")
        return 0
    comparison = compare_runs(args.experiment, tracking_uri=args.tracking_uri,
                              metrics=args.metric, runs=args.runs, out_dir=args.out,
                              curve_metric=args.curve_metric)
    print(comparison.as_text(line_width=shutil.get_terminal_size((160, 24)).columns))
    print()
    for path in (comparison.csv, comparison.markdown, comparison.png):
        print(f"wrote {path}")
    return 0


def compare_runs(experiment: str, *, tracking_uri: str | None = None,
                 metrics: list[str] | None = None, runs: list[str] | None = None,
                 out_dir: str | Path = "compare_output",
                 curve_metric: str = "loss/total") -> Comparison:
    """Read the runs of ``experiment``, build the table, write CSV, markdown and PNG.

    ``metrics`` names the metric columns (default: every ``eval/...`` metric, sorted);
    ``runs`` keeps only the rows that a run name, run id or id prefix picks out.
    """
    import mlflow
    import pandas as pd

    from dinor1.registry import fluent_tracking_uri

    uri = _resolve_uri(tracking_uri)
    client = mlflow.MlflowClient(uri)
    if client.get_experiment_by_name(experiment) is None:
        names = sorted(e.name for e in client.search_experiments())
        raise UserError(f"MLflow experiment {experiment!r} not found at {uri} "
                        f"(experiments there: {', '.join(names) or 'none'})")
    with fluent_tracking_uri(uri):
        found: list[Run] = mlflow.search_runs(experiment_names=[experiment],
                                              output_format="list",
                                              order_by=["attributes.start_time ASC"])
    if not found:
        raise UserError(f"MLflow experiment {experiment!r} at {uri} has no runs")

    rows, owner = _merge_eval_runs(found)
    if runs:
        rows = _select(rows, owner, found, runs)
    metric_names = _metric_columns(rows, metrics, experiment)
    curves = {run.info.run_id: _history(client, run.info.run_id, curve_metric)
              for run, _ in rows}

    records = []
    uses_grqo = any(_grqo_used(run.data.params) for run, _ in rows)
    for run, values in rows:
        params = run.data.params
        record = {"run": run.info.run_name, "run_id": run.info.run_id[:8],
                  "status": run.info.status, "recipe": _recipe(params)}
        record.update({name: params.get(name, "?") for name in KEY_PARAMS})
        if uses_grqo:
            grqo = _grqo_used(params)
            record.update({name: params.get(name, "?") if grqo else "" for name in GRQO_PARAMS})
        record.update({name: values.get(name, math.nan) for name in metric_names})
        history = curves[run.info.run_id]
        record["steps"] = max(history[0]) if history[0] else None
        record["wall"] = _wall(run)
        records.append(record)
    table = pd.DataFrame.from_records(records)
    table["steps"] = table["steps"].astype("Int64")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    comparison = Comparison(table=table, png=out / "compare.png", csv=out / "compare.csv",
                            markdown=out / "compare.md")
    table.to_csv(comparison.csv, index=False)
    comparison.markdown.write_text(
        f"# {experiment}\n\nRuns from `{uri}`; curves of `{curve_metric}`.\n\n"
        f"{markdown_table(_display(table))}\n\n![comparison]({comparison.png.name})\n")
    _plot(table, metric_names, [curves[run.info.run_id] for run, _ in rows], curve_metric,
          comparison.png)
    return comparison


def _resolve_uri(tracking_uri: str | None) -> str:
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise UserError("no MLflow tracking URI: pass --tracking-uri (sqlite:///path/mlflow.db "
                        "or http://host:port) or set MLFLOW_TRACKING_URI")
    # MLflow would create an empty database for a mistyped path; say so instead
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise UserError(f"no MLflow database at {uri[len('sqlite:///'):]} (from {uri})")
    return uri


def _merge_eval_runs(found: list[Run]) -> tuple[list[tuple[Run, dict]], dict[str, str]]:
    """Rows as (run, metrics) with linked eval runs folded in, and run id -> id of its row.

    ``found`` is in start order, so a later eval run overwrites an earlier one's values.
    """
    by_id = {run.info.run_id: run for run in found}
    linked = {run.info.run_id: run.data.tags.get(TRAIN_RUN_TAG) for run in found
              if run.data.tags.get(RUN_KIND_TAG) == "eval"}
    owner = {run_id: (linked.get(run_id) if linked.get(run_id) in by_id else run_id)
             for run_id in by_id}
    values = {run_id: dict(by_id[run_id].data.metrics) for run_id in by_id
              if owner[run_id] == run_id}
    for run in found:
        target = owner[run.info.run_id]
        if target != run.info.run_id:
            values[target].update({k: v for k, v in run.data.metrics.items()
                                   if k.startswith("eval/")})
    rows = [(by_id[run_id], metrics) for run_id, metrics in values.items()]
    return rows, owner


def _select(rows: list[tuple[Run, dict]], owner: dict[str, str], found: list[Run],
            wanted: list[str]) -> list[tuple[Run, dict]]:
    """Rows picked by run name, run id or id prefix; an eval run picks its training run."""
    keep = set()
    for entry in wanted:
        hits = {owner[run.info.run_id] for run in found
                if entry in (run.info.run_name, run.info.run_id)
                or (len(entry) >= 6 and run.info.run_id.startswith(entry))}
        if not hits:
            raise UserError(f"no run named or with id {entry!r} in this experiment "
                            f"(runs: {', '.join(run.info.run_name for run, _ in rows)})")
        keep |= hits
    return [(run, values) for run, values in rows if run.info.run_id in keep]


DEFAULT_METRICS = ("AP", "AP50", "seen/AP", "seen/AP50", "novel/AP", "novel/AP50", "APr", "APc",
                   "APf", "odinw13/mAP", "odinw35/mAP")


def _metric_columns(rows: list[tuple[Run, dict]], metrics: list[str] | None,
                    experiment: str) -> list[str]:
    logged = set().union(*(values.keys() for _, values in rows))
    if not metrics:  # the headline AP numbers of every prompt mode, not the bookkeeping
        return sorted(name for name in logged if name.count("/") >= 2
                      and name.startswith("eval/") and name.split("/", 2)[2] in DEFAULT_METRICS)
    missing = [name for name in metrics if name not in logged]
    if missing:
        evals = sorted(name for name in logged if name.startswith("eval/"))
        raise UserError(f"metric {missing[0]!r} is logged by none of the compared runs of "
                        f"{experiment!r} (eval metrics there: {', '.join(evals) or 'none'})")
    return list(dict.fromkeys(metrics))


def _history(client, run_id: str, metric: str) -> tuple[list[int], list[float]]:
    points = sorted(client.get_metric_history(run_id, metric), key=lambda m: (m.step, m.timestamp))
    return [m.step for m in points], [m.value for m in points]


def _as_int(value: str | None) -> int | None:
    try:
        return int(float(value)) if value is not None else None
    except ValueError:
        return None


def _grqo_used(params: dict[str, str]) -> bool:
    return (_as_int(params.get("stages.grqo_epochs")) or 0) > 0


def _recipe(params: dict[str, str]) -> str:
    """'SFT 6' for supervised only, 'SFT 1 + GRQO 5' with GRQO; '?' where a param is absent."""
    sft, grqo = params.get("stages.sft_epochs"), params.get("stages.grqo_epochs")
    if sft is None and grqo is None:
        return "?"
    if _as_int(grqo) == 0:
        return f"SFT {sft or '?'}"
    return f"SFT {sft or '?'} + GRQO {grqo or '?'}"


def _wall(run: Run) -> str:
    if not run.info.end_time or not run.info.start_time:
        return "running"
    return f"{(run.info.end_time - run.info.start_time) / 60_000:.1f} min"


def _display(table: pd.DataFrame) -> pd.DataFrame:
    """Strings for printing: floats to 4 significant digits, missing values as '-'."""
    shown = table.astype(object).copy()
    for column in table.columns:
        shown[column] = [_cell(value) for value in table[column]]
    return shown


def _cell(value) -> str:
    import pandas as pd

    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table of string cells (no ``tabulate`` needed)."""
    def line(cells) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    body = [line(table.columns), line("---" for _ in table.columns)]
    body += [line(row) for row in table.itertuples(index=False)]
    return "\n".join(body)


def _plot(table: pd.DataFrame, metric_names: list[str],
          curves: list[tuple[list[int], list[float]]], curve_metric: str, path: Path) -> None:
    """Left: one group of bars per metric, one bar per run. Right: the curve of every run."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 5.5), layout="constrained")
    bars, lines = fig.subplots(1, 2)
    colors = [f"C{i % 10}" for i in range(len(table))]
    names = list(table["run"])
    width = 0.8 / max(len(names), 1)
    if metric_names:
        for i, (name, color) in enumerate(zip(names, colors)):
            values = table[metric_names].iloc[i].astype(float)
            xs = [m + (i - (len(names) - 1) / 2) * width for m in range(len(metric_names))]
            kept = [(x, v) for x, v in zip(xs, values) if not math.isnan(v)]
            if kept:
                bars.bar([x for x, _ in kept], [v for _, v in kept], width, color=color,
                         label=name)
        bars.set_xticks(range(len(metric_names)),
                        [m.removeprefix("eval/") for m in metric_names],
                        rotation=30 if len(metric_names) > 3 else 0, ha="right")
        bars.set_title("evaluation metrics")
        bars.legend(fontsize="small")
        bars.grid(axis="y", alpha=0.3)
    else:
        bars.text(0.5, 0.5, "no eval/ metrics logged by these runs\n(run `dinor1 eval`, "
                  "or name metrics with --metric)", ha="center", va="center",
                  transform=bars.transAxes)
        bars.set_axis_off()
    plotted = 0
    for name, color, (steps, values) in zip(names, colors, curves):
        if steps:
            lines.plot(steps, values, color=color, label=name)
            plotted += 1
    if plotted:
        lines.legend(fontsize="small")
        lines.grid(alpha=0.3)
    else:
        lines.text(0.5, 0.5, f"no run logged {curve_metric}", ha="center", va="center",
                   transform=lines.transAxes)
    lines.set_xlabel("step")
    lines.set_ylabel(curve_metric)
    lines.set_title(f"training curves: {curve_metric}")
    fig.savefig(path, dpi=100)


# ---------------------------------------------------------------------------------------------
# a sweep (dinor1 sweep): its trials, their means over seeds, paired differences to a baseline

SWEEP_METRICS = ("AP", "AP50", "novel/AP", "APr")  # per split, the default columns


@dataclass
class SweepComparison:
    """A sweep's tables: one row per trial; per group of trials that differ only in their seed,
    the mean and std of each metric and the paired difference to the baseline."""

    trials: pd.DataFrame
    means: pd.DataFrame
    paired: pd.DataFrame
    png: Path
    csv: Path
    markdown: Path

    def as_text(self) -> str:
        parts = [_display(self.trials).to_string(index=False), "",
                 "mean ± std over seeds", self.means.to_string(index=False)]
        if len(self.paired):
            parts += ["", "paired difference to the baseline (same seed): mean ± std (n); "
                      "* = more than 2 std from 0", self.paired.to_string(index=False)]
        return "\n".join(parts)


def add_sweep_arguments(cmp) -> None:
    cmp.add_argument("--sweep", default=None, metavar="NAME",
                     help="tabulate the sweep NAME of the experiment (dinor1 sweep): one row per "
                     "trial, mean and std over seeds, paired differences to --baseline")
    cmp.add_argument("--baseline", default=None, metavar="VARIANT",
                     help="--sweep: the variant paired differences are taken to (default: the "
                     "sweep file's baseline)")


def compare_sweep(experiment: str, sweep: str, *, tracking_uri: str | None = None,
                  metrics: list[str] | None = None, baseline: str | None = None,
                  out_dir: str | Path = "compare_output") -> SweepComparison:
    """Read the trials of sweep ``sweep`` from MLflow and write sweep.csv (a row per trial),
    sweep.md (all three tables) and sweep.png (means with std bars; paired differences with
    2-std bars)."""
    import mlflow
    import pandas as pd

    from dinor1.registry import fluent_tracking_uri
    from dinor1.sweep import PARAMS_TAG, ROLE_TAG, SEED_TAG, STOPPED_TAG, SWEEP_TAG, VARIANT_TAG

    uri = _resolve_uri(tracking_uri)
    with fluent_tracking_uri(uri):
        found: list[Run] = mlflow.search_runs(
            experiment_names=[experiment], output_format="list",
            filter_string=f"tags.`{SWEEP_TAG}` = '{sweep}'",
            order_by=["attributes.start_time ASC"])
    parent = [r for r in found if r.data.tags.get(ROLE_TAG) == "sweep"]
    runs = [r for r in found if r.data.tags.get(ROLE_TAG) == "trial"]
    if not runs:
        raise UserError(f"no trials of sweep {sweep!r} in MLflow experiment {experiment!r} at "
                        f"{uri}")
    if baseline is None and parent:
        baseline = parent[0].data.params.get("sweep.baseline")
        baseline = None if baseline in (None, "None") else baseline
    records = []
    for run in runs:
        tags = run.data.tags
        params = json.loads(tags.get(PARAMS_TAG, "{}"))
        status = ("stopped" if tags.get(STOPPED_TAG) else
                  "complete" if run.info.status == "FINISHED" else run.info.status.lower())
        records.append({"trial": run.info.run_name, "variant": tags.get(VARIANT_TAG, "?"),
                        "seed": int(tags.get(SEED_TAG, -1)),
                        "params": ", ".join(f"{k}={v}" for k, v in sorted(params.items())),
                        "status": status, **run.data.metrics})
    # rows in the sweep file's variant order (trials may start in any order), then by seed
    order = json.loads(parent[0].data.params.get("sweep.variants", "[]")) if parent else []
    rank = {name: i for i, name in enumerate(order)}
    records.sort(key=lambda r: (rank.get(r["variant"], len(rank)), r["variant"], r["params"],
                                r["seed"]))
    table = pd.DataFrame.from_records(records)
    names = _sweep_metric_columns(table, metrics, sweep)
    trials = table[["trial", "variant", "seed", "params", "status", *names]]
    if baseline is not None and baseline not in set(trials["variant"]):
        raise UserError(f"baseline {baseline!r} is no variant of sweep {sweep!r} (variants: "
                        f"{', '.join(sorted(set(trials['variant'])))})")
    means, paired, stats = _sweep_groups(trials, names, baseline)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = SweepComparison(trials=trials, means=means, paired=paired, png=out / "sweep.png",
                             csv=out / "sweep.csv", markdown=out / "sweep.md")
    trials.to_csv(result.csv, index=False)
    text = [f"# sweep {sweep}\n", f"Runs from `{uri}`, experiment `{experiment}`.\n",
            markdown_table(_display(trials)), "\nMean ± std over seeds:\n",
            markdown_table(means)]
    if len(paired):
        text += [f"\nPaired difference to `{baseline}` (same seed), mean ± std (n); * = more "
                 "than 2 std from 0:\n", markdown_table(paired)]
    result.markdown.write_text("\n".join(text) + f"\n\n![sweep]({result.png.name})\n")
    _plot_sweep(stats, names, baseline, result.png)
    return result


def _sweep_metric_columns(table: pd.DataFrame, metrics: list[str] | None,
                          sweep: str) -> list[str]:
    logged = [c for c in table.columns if c.count("/") >= 2]
    if metrics:
        missing = [m for m in metrics if m not in table.columns]
        if missing:
            raise UserError(f"metric {missing[0]!r} is logged by no trial of sweep {sweep!r} "
                            f"(there: {', '.join(sorted(logged)) or 'none'})")
        return list(dict.fromkeys(metrics))
    splits = sorted({c.split("/", 1)[0] for c in logged}, key=lambda s: (s != "eval", s))
    return [name for split in splits for name in sorted(
        (c for c in logged if c.startswith(f"{split}/") and c.split("/", 2)[2] in SWEEP_METRICS),
        key=lambda c: (SWEEP_METRICS.index(c.split("/", 2)[2]), c))]


def _short(name: str) -> str:
    """``eval/generic/novel/AP`` -> ``eval novel/AP`` (the prompt mode left out)."""
    split, _, rest = name.split("/", 2)
    return f"{split} {rest}"


def _spread(values: list[float]) -> float:
    import statistics

    return statistics.stdev(values) if len(values) > 1 else float("nan")


def _sweep_groups(trials: pd.DataFrame, names: list[str], baseline: str | None):
    """(means table, paired table, raw stats for the plot). A group is a variant with one set
    of swept values; the baseline trial of a seed is the baseline variant's with the same swept
    values, else its only trial of that seed."""
    import pandas as pd

    done = trials[trials["status"] == "complete"]
    groups = list(dict.fromkeys(zip(done["variant"], done["params"])))
    base = done[done["variant"] == baseline] if baseline else done.iloc[0:0]
    means, paired, stats = [], [], []
    for variant, params in groups:
        rows = done[(done["variant"] == variant) & (done["params"] == params)]
        label = variant + (f" ({params})" if params else "")
        entry = {"group": label, "n": len(rows)}
        stat = {"group": label, "mean": {}, "std": {}, "diff": {}, "diff_std": {}}
        for name in names:
            values = [v for v in rows[name].tolist() if not math.isnan(v)]
            mean = sum(values) / len(values) if values else math.nan
            stat["mean"][name], stat["std"][name] = mean, _spread(values)
            entry[_short(name)] = _pm(mean, stat["std"][name])
        means.append(entry)
        if baseline and variant != baseline:
            pair = {"group": label}
            for name in names:
                diffs = []
                for _, row in rows.iterrows():
                    match = base[(base["seed"] == row["seed"]) & (base["params"] == params)]
                    if match.empty:
                        match = base[base["seed"] == row["seed"]]
                    if len(match) == 1 and not (math.isnan(row[name])
                                                or math.isnan(match.iloc[0][name])):
                        diffs.append(row[name] - match.iloc[0][name])
                mean = sum(diffs) / len(diffs) if diffs else math.nan
                spread = _spread(diffs)
                stat["diff"][name], stat["diff_std"][name] = mean, spread
                flag = "*" if diffs and spread > 0 and abs(mean) > 2 * spread else ""
                pair[_short(name)] = f"{mean:+.3f} ± {spread:.3f} ({len(diffs)}){flag}" \
                    if diffs else "-"
            paired.append(pair)
        stats.append(stat)
    return pd.DataFrame(means), pd.DataFrame(paired), stats


def _pm(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.3f}" + ("" if math.isnan(std) else f" ± {std:.3f}")


def _plot_sweep(stats: list[dict], names: list[str], baseline: str | None, path: Path) -> None:
    """Left: each group's mean per metric with std bars. Right: each group's paired difference
    to the baseline with 2-std bars (a bar clear of 0 is the paper's bar)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 5.5), layout="constrained")
    left, right = fig.subplots(1, 2)
    width = 0.8 / max(len(stats), 1)
    for i, stat in enumerate(stats):
        xs = [m + (i - (len(stats) - 1) / 2) * width for m in range(len(names))]
        left.bar(xs, [stat["mean"][n] for n in names], width, color=f"C{i % 10}",
                 yerr=[0 if math.isnan(stat["std"][n]) else stat["std"][n] for n in names],
                 capsize=2, label=stat["group"])
    left.set_xticks(range(len(names)), [_short(n) for n in names], rotation=30, ha="right")
    left.set_title("mean over seeds (bars: 1 std)")
    left.legend(fontsize="small")
    left.grid(axis="y", alpha=0.3)
    compared = [s for s in stats if s["diff"]]
    if compared:
        width = 0.8 / len(compared)
        for i, stat in enumerate(compared):
            xs = [m + (i - (len(compared) - 1) / 2) * width for m in range(len(names))]
            right.bar(xs, [stat["diff"][n] for n in names], width,
                      color=f"C{stats.index(stat) % 10}",
                      yerr=[0 if math.isnan(stat["diff_std"][n]) else 2 * stat["diff_std"][n]
                            for n in names], capsize=2, label=stat["group"])
        right.axhline(0, color="black", linewidth=0.8)
        right.set_xticks(range(len(names)), [_short(n) for n in names], rotation=30, ha="right")
        right.set_title(f"paired difference to {baseline} (bars: 2 std)")
        right.legend(fontsize="small")
        right.grid(axis="y", alpha=0.3)
    else:
        right.text(0.5, 0.5, "no baseline to pair with", ha="center", va="center",
                   transform=right.transAxes)
        right.set_axis_off()
    fig.savefig(path, dpi=100)
