"""Sweep report: is the history state what limits these models? (the paper's Fig. 3 and more)

    python -m l2m.sweep multirun/<date>/<time> [more run or multirun dirs] [--out DIR] [--state ssm|total]

Reads only the files train.py leaves in each run directory (config.yaml, summary.json,
positionwise.csv, checkpoints/, the job log), so it needs neither the logger nor Lightning and
works on runs copied off the training machines. Writes to --out:

* sweep.csv: one row per run (runs that differ only in their seeds: one row, averaged, with the
  spread); report.md: the table and the figures, with crashed or unfinished runs listed;
* sweep.png: (a) KL against L per series, with the exact best window-k predictors (the KL is
  the average over positions; for associative recall, over the answers, where the state is tested);
  (b) KL against I_BP(L/2; L) / dim(z) per architecture, where runs limited by their state
  collapse onto one curve, with the collapse metric (R² of log KL on log ratio, beside R² on
  log L and on both); (c) the KL after L/2 against its linear-state bound (on the diagonal:
  state-limited);
* positionwise_L<L>.png: position-wise KL of every run of that L with the exact references;
* learning_curves.png: held-out KL during training.

A series is one resolved model config: its architecture and every field that varies within the
sweep (d_state, d_model, n_layer, ...), labelled with those fields, not with the preset name.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter

from l2m.checks import UserError
from l2m.report.format import format_number, readable_log_ticks

COLUMNS = [
    "run_dir", "series", "model", "arch", "family", "params", "varying", "seq_len", "copies", "steps", "seeds", "dim_z",
    "dim_z_total", "i_bp_half", "ratio", "kl", "kl_spread", "avg_kl", "avg_kl_se", "avg_kl_spread", "avg_kl_per_copy",
    "answer_kl", "answer_accuracy", "answer_chance",
    "kl_first_quarter", "kl_last_quarter", "initial_avg_kl", "effective_context", "utilization", "receptive_field",
    "floor_reference", "kl_minus_floor", "kl_minus_floor_se", "tail_kl_half", "bound_half",
    "kl_minus_linear_state", "kl_minus_linear_state_se",
    "state_limited", "training_limited", "converged", "lr", "lr_grid", "grid_kl_max", "best_lr_at_edge", "best_of_grid",
]
NEEDED = ["model", "seq_len", "dim_z_half", "i_bp_half", "avg_kl"]
# The history-state part that --state ssm leaves out where a summary has no dim_z_half_bound (data
# without exact references, summaries before it existed), as SequenceModel.bound_state_size does.
CONV_PART = "dim_z_half_conv"
# Settings that tell apart runs of one configuration, not the configuration.
SEED_KEYS = ("seed", "data.seed")
# Settings of an lr grid under one configuration: the report keeps each grid's best run (lowest KL).
GRID_KEYS = ("optim.lr",)
NOT_CONFIG = ("run_dir", "ckpt_path")
# Subtrees that do not change what a run computes: where and under which name it is logged (a W&B
# run is named by its overrides, lr included).
NOT_CONFIG_TREES = ("logger.",)
WINDOWS = (0, 1, 4, 16)  # exact references drawn in the figures (0: no context)


@dataclass
class RunRecord:
    """One run directory: its summary where it finished, its resolved config, how far it got."""

    run_dir: Path
    summary: dict | None
    config: dict | None
    last_step: int | None = None
    last_log_line: str = ""
    history: list = field(default_factory=list)


def _flatten(node: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in node.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:  # e.g. a run killed while writing it
        raise UserError(f"{path}: not valid JSON ({error})") from error


def _last_step(run_dir: Path) -> int | None:
    """The highest step of a readable checkpoint of the run: last.ckpt (a signal's checkpoint is one)
    holds its step inside, the others in their names."""
    from l2m.models.checkpoint import UnreadableCheckpointError, read_checkpoint  # torch: only for unfinished runs

    checkpoints = run_dir / "checkpoints"
    steps = [int(p.stem[4:]) for p in checkpoints.glob("step*.ckpt") if p.stem[4:].isdigit()]
    for last in checkpoints.glob("last*.ckpt"):
        try:
            steps.append(int(read_checkpoint(last)["global_step"]))
        except UnreadableCheckpointError:
            continue
    return max(steps) if steps else None


def _last_log_line(run_dir: Path) -> str:
    for log in sorted(run_dir.glob("*.log")):
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
        if lines:
            return lines[-1]
    return ""


def find_runs(dirs: list[str | Path]) -> list[RunRecord]:
    """Every run directory under each directory (one with summary.json or config.yaml); each
    directory must hold at least one."""
    found: dict[Path, RunRecord] = {}
    for d in map(Path, dirs):
        marks = [p for name in ("summary.json", "config.yaml") for p in (d.rglob(name) if d.is_dir() else [])
                 if ".hydra" not in p.parts]
        if not marks:
            raise FileNotFoundError(
                f"no summary.json under {d}: point at a run or multirun directory written by train.py "
                "(e.g. multirun/<date>/<time>)"
            )
        for run_dir in sorted({p.parent for p in marks}):
            summary_path, config_path = run_dir / "summary.json", run_dir / "config.yaml"
            summary = _read_json(summary_path) if summary_path.exists() else None
            config = yaml.safe_load(config_path.read_text()) if config_path.exists() else None
            found[run_dir] = RunRecord(run_dir, summary, config, _last_step(run_dir), _last_log_line(run_dir),
                                       (summary or {}).get("heldout_history", []))
    return [found[k] for k in sorted(found)]


def state_dim(summary: dict, state: str) -> int | None:
    """dim(z_{L/2}) as the report uses it; None when the summary does not say."""
    if state == "total":
        return summary["dim_z_half"]
    if summary.get("dim_z_half_bound") is not None:
        return summary["dim_z_half_bound"]
    parts = [v for k, v in summary.items() if k.startswith("dim_z_half_") and k != CONV_PART and isinstance(v, int)]
    return sum(parts) if parts else None


def _model_config(record: RunRecord) -> dict:
    if record.config and isinstance(record.config.get("model"), dict):
        return {k: v for k, v in record.config["model"].items() if k != "name"}
    return {"model": record.summary["model"]}


def _data_config(record: RunRecord) -> dict:
    return dict(record.config.get("data") or {}) if record.config else {}


def sweep_rows(records: list[RunRecord], state: str = "ssm") -> tuple[list[dict], int]:
    """One row per finished Gaussian run, sorted by series and L, and the number of summaries
    skipped (text runs have no I_BP or KL; older summaries may lack the state parts)."""
    usable = []
    skipped = 0
    for record in records:
        s = record.summary
        if s is None:
            continue
        dim_z = state_dim(s, state) if all(s.get(k) is not None for k in NEEDED) else None
        if dim_z is None:
            skipped += 1
            continue
        usable.append((record, dim_z))
    configs = [_model_config(r) for r, _ in usable]
    rows = []
    for (record, dim_z), config in zip(usable, configs):
        s = record.summary
        fields = {k: config[k] for k in _varying(configs, config.get("arch")) if k in config}
        arch = config.get("arch", s["model"])
        copies = _data_config(record).get("copies")
        rows.append({
            "run_dir": str(record.run_dir),
            "series": " ".join([str(arch)] + [f"{k}={v}" for k, v in fields.items()]) if config.get("arch") else s["model"],
            "model": s["model"],
            "arch": arch,
            "family": s.get("family") or str(arch),  # summaries before the families: the arch
            "params": s.get("params"),
            "varying": " ".join(f"{k}={v}" for k, v in fields.items()),
            "seq_len": s["seq_len"],
            "copies": copies,
            "steps": s.get("step"),
            "seeds": 1,
            "dim_z": dim_z,
            "dim_z_total": s["dim_z_half"],
            "i_bp_half": s["i_bp_half"],
            "ratio": s["i_bp_half"] / dim_z if dim_z else None,  # no state: off figure (b) and the collapse
            # the KL the figures and the collapse compare: where the data has answer positions
            # (associative recall), the KL there, where the state is tested; else the average KL
            "kl": s["avg_kl"] if s.get("answer_kl") is None else s["answer_kl"],
            "kl_spread": None,
            "avg_kl": s["avg_kl"],
            "avg_kl_se": s.get("avg_kl_se"),
            "avg_kl_spread": None,
            "avg_kl_per_copy": s["avg_kl"] / copies if copies else None,
            "kl_first_quarter": s.get("kl_first_quarter"),
            "kl_last_quarter": s.get("kl_last_quarter"),
            "initial_avg_kl": s.get("initial_avg_kl"),
            "answer_kl": s.get("answer_kl"),
            "answer_accuracy": s.get("answer_accuracy"),
            "answer_chance": s.get("answer_chance"),
            "effective_context": s.get("effective_context"),
            "utilization": s.get("utilization"),
            "receptive_field": s.get("receptive_field"),
            "floor_reference": s.get("floor_reference"),
            "kl_minus_floor": s.get("kl_minus_floor"),
            "kl_minus_floor_se": s.get("kl_minus_floor_se"),
            "lr": _learning_rate(record),
            "tail_kl_half": s.get("tail_kl_half"),
            "bound_half": s.get("bound_half"),
            "kl_minus_linear_state": s.get("kl_minus_linear_state"),
            "kl_minus_linear_state_se": s.get("kl_minus_linear_state_se"),
            "state_limited": s.get("state_limited"),
            "training_limited": s.get("training_limited"),
            "converged": None if s.get("still_falling") is None else not s["still_falling"],
            "_split": s.get("history_split_label", "L/2"),
            "_references": (s.get("reference_family"), s["seq_len"], s.get("window_avg_kl")),
            "_group": _seedless(record),
            "_grid": _seedless(record, GRID_KEYS),
            "_history": record.history,
        })
        rows[-1].update(_more_numbers(s, rows[-1]))
    rows.sort(key=lambda r: (r["series"], r["seq_len"], r["run_dir"]))
    return best_of_grids(average_seeds(rows)), skipped


# Summary keys that are not columns: lists, curves, identifiers, and what other columns hold.
NOT_COLUMNS = {"task", "reference_family", "history_split_label", "heldout_history", "window_avg_kl", "dim_z_half",
               "step", "still_falling", "ckpt_path"}


def _more_numbers(summary: dict, row: dict) -> dict:
    """The summary's scalars that the columns do not already hold (the state's parts, a new metric...):
    columns of sweep.csv too, so a metric the evaluation adds reaches the report without an edit here."""
    return {k: v for k, v in summary.items()
            if k not in row and k not in NOT_COLUMNS and (v is None or isinstance(v, (bool, int, float)))}


def _varying(configs: list[dict], arch: str | None) -> list[str]:
    """The model fields that take more than one value among the sweep's runs of this architecture."""
    same_arch = [c for c in configs if c.get("arch") == arch]
    keys = {k for c in same_arch for k in c} - {"arch", "model"}
    return sorted(k for k in keys if len({json.dumps(c.get(k)) for c in same_arch}) > 1)


def _seedless(record: RunRecord, also: tuple[str, ...] = ()) -> str:
    """The run's configuration without its seeds (and the keys `also`): runs with equal keys differ only there."""
    if not record.config:
        return str(record.run_dir)
    flat = _flatten(record.config)
    ignored = SEED_KEYS + NOT_CONFIG + also
    here = str(flat.get("run_dir") or record.run_dir)  # paths inside the run's own directory (loggers, callbacks)
    return json.dumps({k: v for k, v in flat.items()
                       if k not in ignored and not k.startswith(NOT_CONFIG_TREES) and not str(v).startswith(here)},
                      sort_keys=True, default=str)


def _learning_rate(record: RunRecord) -> float | None:
    return ((record.config or {}).get("optim") or {}).get("lr")


def average_seeds(rows: list[dict]) -> list[dict]:
    """Rows of runs that differ only in their seeds merged into one: numbers averaged, the spread
    (SD over seeds) of avg_kl kept, verdicts kept where all seeds agree."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[row["_group"]].append(row)
    merged = []
    for group in groups.values():
        if len(group) == 1:
            merged.append(group[0])
            continue
        row = dict(group[0])
        for key in [k for k in row if not k.startswith("_")]:
            values = [r.get(key) for r in group]
            if all(v == values[0] and type(v) is type(values[0]) for v in values):  # L, params, ...: kept as they are
                continue
            if all(isinstance(v, bool) for v in values):
                row[key] = values[0] if len(set(values)) == 1 else None
            elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                row[key] = statistics.fmean(values)
        row["seeds"] = len(group)
        row["avg_kl_spread"] = statistics.stdev(r["avg_kl"] for r in group)
        row["kl_spread"] = statistics.stdev(r["kl"] for r in group)
        row["run_dir"] = ";".join(r["run_dir"] for r in group)
        merged.append(row)
    return sorted(merged, key=lambda r: (r["series"], r["seq_len"], r["run_dir"]))


def best_of_grids(rows: list[dict]) -> list[dict]:
    """Rows that differ only in their learning rate are one lr grid under one configuration: every row
    gets best_of_grid (the grid's lowest KL, the row the table and figures show), and where the grid
    has two lrs or more, lr_grid, grid_kl_max (the grid's worst KL: its spread with the best) and, on
    the best row, best_lr_at_edge (a wider grid may do better)."""
    grids: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        grids[row["_grid"]].append(row)
    for grid in grids.values():
        best = min(grid, key=lambda r: r["kl"])
        rates = sorted({r["lr"] for r in grid if r["lr"] is not None})
        for row in grid:
            row["best_of_grid"] = row is best
            if len(rates) > 1:
                row["lr_grid"] = " ".join(format_number(lr) for lr in rates)
                row["grid_kl_max"] = max(r["kl"] for r in grid)
                row["best_lr_at_edge"] = best["lr"] in (rates[0], rates[-1]) if row is best else None
    return rows


def best_rows(rows: list[dict]) -> list[dict]:
    """The best run of every lr grid (every row where the sweep has no grid)."""
    return [row for row in rows if row["best_of_grid"]]


def _r_squared(y: np.ndarray, *regressors: np.ndarray) -> float | None:
    design = np.stack([np.ones_like(y), *regressors], axis=1)
    if y.size <= design.shape[1] or np.ptp(y) == 0 or any(np.ptp(x) == 0 for x in regressors):
        return None
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    residual = y - design @ coef
    return float(1 - residual @ residual / np.sum((y - y.mean()) ** 2))


def collapse_metrics(rows: list[dict]) -> dict[str, dict]:
    """Per architecture: how well log KL (the row's "kl") is explained by log(I_BP / dim z) (the collapse of Fig. 3c),
    by log L, and by both. A family limited by its state collapses: R² on the ratio near 1. Only
    for families that span two lengths or more (at one L, any monotone trend in the state fits)."""
    out = {}
    for arch in sorted({r["arch"] for r in rows}):
        runs = [r for r in rows if r["arch"] == arch and r["kl"] > 0 and r["ratio"] is not None]
        y = np.log([r["kl"] for r in runs])
        ratio = np.log([r["ratio"] for r in runs])
        length = np.log([r["seq_len"] for r in runs])
        if len(runs) < 2 or np.ptp(length) == 0:
            out[arch] = {"runs": len(runs), "r2_ratio": None, "r2_length": None, "r2_joint": None,
                         "why_none": "runs with a history state and KL > 0 at one length L at most: needs two or more"}
            continue
        out[arch] = {
            "runs": len(runs),
            "r2_ratio": _r_squared(y, ratio),
            "r2_length": _r_squared(y, length),
            "r2_joint": _r_squared(y, ratio, length),
        }
        if out[arch]["r2_joint"] is None:
            out[arch]["why_none"] = (f"{len(runs)} runs with a state and KL > 0: R² on one variable needs 3 or "
                                     "more, on both 4")
    return out


def family_collapse(rows: list[dict], tolerance: float = 0.1) -> dict | None:
    """Across families (the recall frontier): one line, log KL = a + b log(I_BP / dim z), through every
    run with a state, whatever its architecture; its R², and per family the mean residual with its SE.
    A family above the shared curve (its mean residual over 2 SE and over log(1 + tolerance): a KL
    10% off, not noise of a few runs) does worse than its state's load predicts, one below it better.
    None with fewer than two families or three runs, or one ratio only."""
    runs = [r for r in rows if r["ratio"] is not None and r["kl"] > 0]
    families = sorted({r["family"] for r in runs})
    y, x = np.log([r["kl"] for r in runs]), np.log([r["ratio"] for r in runs])
    if len(families) < 2 or len(runs) < 3 or np.ptp(x) == 0:
        return None
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (intercept + slope * x)
    by_family = {}
    for family in families:
        mine = residual[[r["family"] == family for r in runs]]
        se = float(np.std(mine, ddof=1) / np.sqrt(mine.size)) if mine.size > 1 else None
        mean = float(mine.mean())
        off = se is not None and abs(mean) > max(2 * se, np.log1p(tolerance))
        side = None if se is None else ("above" if mean > 0 else "below") if off else "on"
        by_family[family] = {"runs": int(mine.size), "mean_residual": mean, "residual_se": se, "side": side}
    return {"runs": len(runs), "families": len(families), "r2": _r_squared(y, x), "slope": float(slope),
            "intercept": float(intercept), "by_family": by_family}


def _collapse_note(metrics: dict) -> str:
    return f" — {metrics['why_none']}" if metrics.get("why_none") else ""


def window_references(rows: list[dict]) -> dict[tuple, dict[int, float]]:
    """Average KL of the exact best window-k predictors for every (reference family, L) in the sweep, as
    the runs' evaluations wrote them (`window_avg_kl`; none where the data has no exact references)."""
    refs = {}
    for row in rows:
        family, length, averages = row["_references"]
        if averages:
            refs.setdefault((family, length), {int(k): v for k, v in averages.items() if int(k) in WINDOWS})
    return refs


def write_csv(rows: list[dict], path: Path) -> None:
    more = sorted({k for row in rows for k in row if k not in COLUMNS and not k.startswith("_")})
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*COLUMNS, *more], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _log_axes(*axes) -> None:
    # Short labels on the log axes: their ranges often span less than a decade, where matplotlib
    # labels minor ticks too and its a×10^b form crowds them.
    for ax in axes:
        for axis in (ax.xaxis, ax.yaxis):
            if axis.get_scale() == "log":
                axis.set_major_formatter(LogFormatter(labelOnlyBase=False))
                axis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))
        ax.grid(True, which="both", alpha=0.3)
        ax.margins(0.1)


def split_label(rows: list[dict]) -> str:
    """Where the runs' history states were measured, as their data names it ("L/2", "the end of the pairs")."""
    return " / ".join(sorted({r["_split"] for r in rows}))


def _receptive_floor(row: dict) -> float | None:
    """The KL of the best predictor the run's receptive field allows (a window floor, measured on the
    run's own held-out sequences), where it is bounded: what a state-limited run sits on."""
    if row.get("floor_reference") in (None, "exact") or row.get("kl_minus_floor") is None or row["answer_kl"] is not None:
        return None
    return row["avg_kl"] - row["kl_minus_floor"]


def reference_line(window: int) -> dict:
    """How the exact best window-k predictor (0: no context) is drawn and named in every figure: in the
    legend, not as a label at the edge (labels of close curves overlapped there, and were clipped)."""
    rank = WINDOWS.index(window) if window in WINDOWS else 0
    return {"color": "gray", "ls": (":", "-.", "--", (0, (6, 2, 1, 2, 1, 2)))[rank], "lw": 1.1, "alpha": 0.5 + 0.15 * rank,
            "label": "exact: no context" if window == 0 else f"exact: best window {window}"}


def series_styles(rows: list[dict]) -> dict[str, dict]:
    """One colour and marker per series, the same in every figure of a report."""
    markers = "osD^vP*Xh<>"
    return {series: {"color": f"C{i % 10}", "marker": markers[i % len(markers)]}
            for i, series in enumerate(sorted({r["series"] for r in rows}))}


def family_styles(rows: list[dict]) -> dict[str, dict]:
    """One colour and marker per architecture family, from palettes the series' colours (C0-C9) do not
    use: a colour means one thing in every figure of a report."""
    from matplotlib import colormaps

    colours = [*colormaps["Dark2"].colors, *colormaps["Set1"].colors[3:]]
    markers = "osD^vP*Xh<>"
    return {family: {"color": colours[i % len(colours)], "marker": markers[i % len(markers)]}
            for i, family in enumerate(sorted({r["family"] for r in rows}))}


def plot_recall_frontier(rows: list[dict], path: Path, across: dict | None) -> Path | None:
    """The recall/state frontier (the Based paper's): answer accuracy and answer KL against the history
    state dim(z) per family, one line per number of pairs P through the family's sizes, with the chance
    level 1/P; and both against I_BP / dim(z), where families limited by their state fall on one curve
    (`across`, family_collapse). None where no run has answers."""
    answered = [r for r in rows if r.get("answer_accuracy") is not None and r["dim_z"]]
    if not answered:
        return None
    fig = Figure(figsize=(12, 9))
    (acc_state, acc_ratio), (kl_state, kl_ratio) = fig.subplots(2, 2)
    pairs = sorted({_pairs(r) for r in answered}, key=lambda p: p or 0)
    dashes = ("-", "--", "-.", ":")
    styles = family_styles(answered)
    for family, style in styles.items():
        runs = [r for r in answered if r["family"] == family]
        for p in pairs:
            line = sorted((r for r in runs if _pairs(r) == p), key=lambda r: r["dim_z"])
            ls = dashes[pairs.index(p) % len(dashes)]
            named = dict(label=family) if p == pairs[-1] else {}  # the family named once
            for ax, key in ((acc_state, "answer_accuracy"), (kl_state, "kl")):
                ax.plot([r["dim_z"] for r in line], [r[key] for r in line], ls=ls, lw=1, ms=5, **style, **named)
        for ax, key in ((acc_ratio, "answer_accuracy"), (kl_ratio, "kl")):
            with_ratio = [r for r in runs if r["ratio"] is not None]
            ax.plot([r["ratio"] for r in with_ratio], [r[key] for r in with_ratio], ls="none", ms=5, **style, label=family)
    for p in [p for p in pairs if p]:
        for ax in (acc_state, acc_ratio):
            ax.axhline(1 / p, color="gray", lw=0.8, ls=dashes[pairs.index(p) % len(dashes)], label=f"chance 1/P, P={p}")
    if across is not None:
        ratios = [r["ratio"] for r in answered if r["ratio"]]
        xs = np.geomspace(min(ratios), max(ratios), 50)
        kl_ratio.plot(xs, np.exp(across["intercept"]) * xs ** across["slope"], color="k", lw=1,
                      label=f"one curve for all families: R² {format_number(across['r2'])}")
    p_note = f"; line style: P = {', '.join(map(str, pairs))} pairs" if len(pairs) > 1 else ""  # None: not recall
    acc_state.set_title(f"recall/state frontier{p_note}", fontsize=9)
    kl_ratio.set_title(_frontier_title(across), fontsize=8)
    split = split_label(answered)
    for ax in (acc_state, kl_state):
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"history state dim($z$) at {split} (scalars)")
    for ax in (acc_ratio, kl_ratio):
        ax.set_xscale("log")
        ax.set_xlabel(f"$I_{{BP}}$ / dim($z$) at {split} (nats per scalar)")
    for ax in (acc_state, acc_ratio):
        ax.set_ylabel("answer accuracy (top-1)")
        ax.set_ylim(0, 1.02)
    for ax in (kl_state, kl_ratio):
        ax.set_ylabel("KL per answer token (nats)")
        if all(r["kl"] > 0 for r in answered):
            ax.set_yscale("log")
    for ax in (acc_state, acc_ratio, kl_state, kl_ratio):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"associative recall: {len(answered)} configurations in {len(styles)} families")
    fig.tight_layout()
    readable_log_ticks(fig)
    fig.savefig(path, dpi=110)
    return path


def _pairs(row: dict) -> int | None:
    """P, the pairs of an associative-recall run, from its chance level 1/P."""
    return round(1 / row["answer_chance"]) if row.get("answer_chance") else None


def _frontier_title(across: dict | None) -> str:
    if across is None:
        return "no curve across families (needs two families and three runs with a state)"
    sides = {side: [f for f, m in across["by_family"].items() if m["side"] == side] for side in ("above", "below")}
    said = "; ".join(f"{side}: {', '.join(names)}" for side, names in sides.items() if names)
    return (f"one curve through all families: R² {format_number(across['r2'])}, slope {format_number(across['slope'])}"
            + (f"\n{said}" if said else "\nevery family on it (within 2 SE)"))


def plot_sweep(rows: list[dict], path: Path, state: str = "ssm", collapse: dict | None = None,
               references: dict | None = None) -> None:
    """(a) KL vs L per series with window references, (b) KL vs I_BP / dim(z) per architecture with
    the collapse metric, (c) tail KL after L/2 vs its linear-state bound."""
    fig = Figure(figsize=(16, 4.8))  # not pyplot: leaves the caller's backend alone
    ax_len, ax_ratio, ax_bound = fig.subplots(1, 3)
    positive = all(r["kl"] > 0 for r in rows)
    for series, series_style in series_styles(rows).items():
        runs = [r for r in rows if r["series"] == series]
        style = dict(**series_style, label=series, ms=6)
        spread = [r["kl_spread"] or 0.0 for r in runs]
        ax_len.errorbar([r["seq_len"] for r in runs], [r["kl"] for r in runs], yerr=spread, lw=1, capsize=2, **style)
        floored = [r for r in runs if _receptive_floor(r) is not None]
        if floored:
            ax_len.plot([r["seq_len"] for r in floored], [_receptive_floor(r) for r in floored], ls="--", lw=1,
                        marker=style["marker"], ms=8, mfc="none", color=style["color"],
                        label=f"{series}: exact floor of its receptive field")
        # points only: what matters is the collapse across series, not an order in L
        stateful = [r for r in runs if r["ratio"] is not None]
        ax_ratio.errorbar([r["ratio"] for r in stateful], [r["kl"] for r in stateful],
                          yerr=[r["kl_spread"] or 0.0 for r in stateful], ls="none", **style)
        for r in stateful:
            ax_ratio.annotate(f"L={r['seq_len']}", (r["ratio"], r["kl"]), textcoords="offset points",
                              xytext=(4, 4), fontsize=7, color=style["color"])
        bounded = [r for r in runs if r.get("bound_half") is not None and r.get("tail_kl_half") is not None]
        ax_bound.plot([r["bound_half"] for r in bounded], [r["tail_kl_half"] for r in bounded], ls="none", **style)
    by_family: dict[str, list] = defaultdict(list)
    for (family, length), curve in sorted((references or {}).items(), key=lambda item: (str(item[0][0]), item[0][1])):
        by_family[str(family)].append((length, curve))
    for family, points in enumerate(by_family.values()):
        for k in WINDOWS:
            xs = [length for length, curve in points if k in curve]
            line = reference_line(k)
            if family:  # named once in the legend
                line.pop("label")
            ax_len.plot(xs, [curve[k] for length, curve in points if k in curve], marker="_", ms=12, **line)
    what = "SSM state / KV cache" if state == "ssm" else "whole history state"
    ax_len.set_xlabel("sequence length L")
    ax_len.set_xscale("log", base=2)
    with_state = any(r["ratio"] is not None for r in rows)
    if with_state:
        ax_ratio.set_xscale("log")
    else:
        ax_ratio.text(0.5, 0.5, "no run keeps a history state\n(I_BP / dim(z) is no number)", ha="center",
                      va="center", transform=ax_ratio.transAxes, fontsize=9, color="gray")
    split = split_label(rows)
    ax_ratio.set_xlabel(f"$I_{{BP}}$ / dim($z$) at {split}   [{what}]")
    metrics = "; ".join(
        f"{arch}: no fit (its runs span one L; the collapse needs two or more)" if m.get("why_none") else
        f"{arch}: R²(ratio) {format_number(m['r2_ratio'])}, R²(L) {format_number(m['r2_length'])}"
        for arch, m in (collapse or {}).items()
    )
    ax_ratio.set_title(f"collapse — {metrics}" if metrics else "", fontsize=8)
    answers = any(r["answer_kl"] is not None for r in rows)
    for ax in (ax_len, ax_ratio) if with_state else (ax_len,):
        if positive:
            ax.set_yscale("log")
        ax.set_ylabel("KL per answer token (nats)" if answers else "average KL per token (nats)")
    bounded = any(r.get("bound_half") is not None for r in rows)
    if bounded:
        top = max([r["tail_kl_half"] or 0 for r in rows] + [r["bound_half"] or 0 for r in rows] + [1e-9])
        ax_bound.plot([0, top], [0, top], "k--", lw=1, label="on the bound: state-limited")
    else:
        ax_bound.text(0.5, 0.5, "no linear-state bound for this data\n(the Gaussian task has one)",
                      ha="center", va="center", transform=ax_bound.transAxes, fontsize=9, color="gray")
    ax_bound.set_xlabel(f"linear-state bound after {split} (nats)")
    ax_bound.set_ylabel(f"model's KL after {split} (nats)")
    for ax in [ax_len] + [ax_ratio] * with_state + [ax_bound] * bounded:
        ax.legend(fontsize=7)
    _log_axes(ax_len, ax_ratio, ax_bound)
    lengths = sorted({r["seq_len"] for r in rows})
    ax_len.set_xticks(lengths, [str(n) for n in lengths])  # after _log_axes: its formatters would relabel them
    ax_len.minorticks_off()
    runs = sum(r.get("seeds") or 1 for r in rows)
    fig.suptitle(f"L²M sweep: {runs} run{'s' * (runs != 1)}"
                 + (f" in {len(rows)} configuration{'s' * (len(rows) != 1)} (seeds averaged)" if runs != len(rows) else ""))
    fig.tight_layout()
    readable_log_ticks(fig)
    fig.savefig(path, dpi=120)


def _read_positionwise(run_dir: Path) -> dict[str, np.ndarray]:
    with open(run_dir / "positionwise.csv") as f:
        rows = list(csv.DictReader(f))
    return {k: np.array([float(r[k]) if r[k] else np.nan for r in rows]) for k in rows[0]}


def plot_overlays(rows: list[dict], out: Path) -> list[Path]:
    """One figure per L: every run's position-wise KL and the exact references of its data."""
    paths, styles = [], series_styles(rows)
    for length in sorted({r["seq_len"] for r in rows}):
        fig = Figure(figsize=(6.5, 4.5))
        ax = fig.subplots()
        drawn_refs = False
        for row in (r for r in rows if r["seq_len"] == length):
            run_dir = Path(row["run_dir"].split(";")[0])
            if not (run_dir / "positionwise.csv").exists():
                continue
            curves = _read_positionwise(run_dir)
            ax.plot(curves["position"], curves["kl"], color=styles[row["series"]]["color"], lw=1.2, label=row["series"])
            if not drawn_refs:
                for name in [k for k in curves if k.startswith("kl_window") or k == "kl_nocontext"]:
                    ref = np.where(curves[name] > 0, curves[name], np.nan)
                    window = 0 if name == "kl_nocontext" else int(name.removeprefix("kl_window"))
                    ax.plot(curves["position"], ref, **reference_line(window))
                drawn_refs = True
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("position i")
        ax.set_ylabel("KL$_i$ (nats/token)")
        ax.set_title(f"L = {length}: every run, and the exact window-k predictors (dotted)", fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        path = out / f"positionwise_L{length}.png"
        readable_log_ticks(fig)
        fig.savefig(path, dpi=110)
        paths.append(path)
    return paths


def plot_learning_curves(rows: list[dict], path: Path) -> Path | None:
    """Held-out KL against the step (on the answers for recall), one line per run."""
    with_history = [r for r in rows if len(r["_history"]) > 1]
    if not with_history:
        return None
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.subplots()
    styles, lengths = series_styles(rows), sorted({r["seq_len"] for r in with_history})
    for row in with_history:  # the series' colour; its lengths told apart by the line
        steps, values = zip(*row["_history"])
        ax.plot(steps, values, color=styles[row["series"]]["color"], ls=("-", "--", "-.", ":")[lengths.index(row["seq_len"]) % 4],
                lw=1, label=f"{row['series']} L={row['seq_len']}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    answers = any(r["answer_kl"] is not None for r in with_history)
    ax.set_ylabel("held-out KL per answer token (nats)" if answers else "held-out average KL (nats/token)")
    ax.legend(fontsize=6)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    readable_log_ticks(fig)
    fig.savefig(path, dpi=110)
    return path


TABLE = [("series", "series"), ("model", "preset"), ("params", "params"), ("seq_len", "L"), ("copies", "copies"), ("steps", "steps"),
         ("seeds", "seeds"), ("dim_z", "dim(z)"), ("dim_z_total", "dim(z) total"), ("i_bp_half", "I_BP"),
         ("ratio", "I_BP/dim(z)"), ("avg_kl", "avg KL"), ("avg_kl_se", "± SE"), ("avg_kl_spread", "seed SD"),
         ("avg_kl_per_copy", "KL/copy"), ("answer_kl", "answer KL"), ("answer_accuracy", "answer acc."),
         ("answer_chance", "chance (1/P)"),
         ("kl_first_quarter", "KL 1st q"), ("kl_last_quarter", "KL last q"),
         ("effective_context", "eff. context"), ("utilization", "utilization"), ("receptive_field", "receptive field"),
         ("floor_reference", "floor"), ("kl_minus_floor", "KL − floor"), ("kl_minus_floor_se", "± paired SE"),
         ("tail_kl_half", "KL after split"), ("bound_half", "bound"),
         ("kl_minus_linear_state", "KL after split − linear state"), ("kl_minus_linear_state_se", "± paired SE"),
         ("state_limited", "state-limited"), ("training_limited", "training-limited"), ("converged", "converged"),
         ("lr", "lr"), ("lr_grid", "lr grid"), ("grid_kl_max", "grid's worst KL"), ("best_lr_at_edge", "best lr at edge")]


def markdown_table(rows: list[dict]) -> str:
    """The TABLE columns that some row fills (a sweep without an lr grid or windows has no such columns)."""
    table = [(key, header) for key, header in TABLE if any(row.get(key) is not None for row in rows)]
    lines = ["| " + " | ".join(header for _, header in table) + " |", "|" + "---|" * len(table)]
    for row in rows:
        lines.append("| " + " | ".join(format_number(row.get(key)) for key, _ in table) + " |")
    return "\n".join(lines)


def unfinished_lines(records: list[RunRecord]) -> list[str]:
    return [
        f"- `{r.run_dir}`: crashed or unfinished, last checkpoint step {format_number(r.last_step)}; "
        f"last log line: {r.last_log_line or '-'}"
        for r in records if r.summary is None
    ]


def across_lines(across: dict | None) -> list[str]:
    """The collapse across families as a markdown table, each family's place against the shared curve."""
    if across is None:
        return ["No curve across families: it needs two families and three runs with a state."]
    lines = [f"log KL = {format_number(across['intercept'])} + {format_number(across['slope'])} log(I_BP/dim z) through "
             f"{across['runs']} runs of {across['families']} families: R² {format_number(across['r2'])}.", "",
             "| family | runs | mean residual (log KL) | ± SE | against the curve |", "|---|---|---|---|---|"]
    lines += [f"| {family} | {m['runs']} | {format_number(m['mean_residual'])} | {format_number(m['residual_se'])} | "
              f"{m['side'] or '- (one run)'} |" for family, m in across["by_family"].items()]
    return lines


def write_report(rows: list[dict], records: list[RunRecord], collapse: dict, figures: dict[str, Path],
                 path: Path, state: str, across: dict | None = None) -> None:
    lines = ["# L²M sweep report", "",
             f"{len(records)} run directories; {len(rows)} rows (runs differing only in seed averaged); "
             f"dim(z) = {'SSM state / KV cache' if state == 'ssm' else 'whole history state'}, and I_BP, at "
             f"{split_label(rows)}. KL in nats per token (summed over copies), bound and KL after the split "
             "summed over positions.", ""]
    lines += [f"![{name}]({p.name})" for name, p in figures.items()]
    lines += ["", "## Runs", "", markdown_table(rows), "", "## Collapse (log KL against log I_BP/dim(z))", "",
              "| architecture | runs | R² on log ratio | R² on log L | R² on both |", "|---|---|---|---|---|"]
    lines += [f"| {arch} | {m['runs']} | {format_number(m['r2_ratio'])} | {format_number(m['r2_length'])} | "
              f"{format_number(m['r2_joint'])}{_collapse_note(m)} |" for arch, m in collapse.items()]
    lines += ["", "## One curve across families (log KL against log I_BP/dim(z))", "", *across_lines(across)]
    unfinished = unfinished_lines(records)
    if unfinished:
        lines += ["", "## Crashed or unfinished runs", "", *unfinished]
    path.write_text("\n".join(lines) + "\n")


def print_table(rows: list[dict], skipped: int, records: list[RunRecord], collapse: dict, paths: dict[str, Path],
                across: dict | None = None) -> None:
    """The report's table in plain text (markdown): every column, never truncated."""
    print("L²M sweep (nats; KL per token)")
    print(markdown_table(rows))
    for arch, m in collapse.items():
        print(f"collapse {arch}: R² on log ratio {format_number(m['r2_ratio'])}, on log L "
              f"{format_number(m['r2_length'])}, on both {format_number(m['r2_joint'])} ({m['runs']} runs)"
              f"{_collapse_note(m)}")
    if across is not None:
        places = ", ".join(f"{family} {m['side'] or '-'}" for family, m in across["by_family"].items())
        print(f"across families: R² on log ratio {format_number(across['r2'])} ({across['runs']} runs); {places}")
    if skipped:
        print(f"skipped {skipped} summaries without I_BP, KL or history-state parts (e.g. text runs)")
    for line in unfinished_lines(records):
        print(line)
    for name, path in paths.items():
        print(f"{name:>8}: {path}")
