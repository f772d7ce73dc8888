"""Console and markdown tables of export and benchmark results.

The console side is pure: `summary_renderables` and `benchmark_renderables` return rich
renderables (the table, then its note lines) and print nothing; the command line prints them
(`kd_keras.cli.app.show`); a Python caller may pass them to a `rich.console.Console` too.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

from kd_keras.deploy.onnx import INPUT_DESCRIPTION
from kd_keras.deploy.quantize import int8_speed_note
from kd_keras.deploy.timing import FORMAT_NAMES
from kd_keras.host import describe_host, host_line
from kd_keras.models.flops import FLOPS_METHOD
from kd_keras.text import fmt, md_row


def summary_table(result: dict[str, Any]):
    """A rich table: one row per exported file, its parity check and test metrics."""
    from rich.table import Table

    run = Path(result["run"]).name
    table = Table(title=f"Export of run {run} ({result['n_images']} test images)")
    columns = ("file", "max |Δ logit|", "argmax agree", "check", "MB", "threshold", "bal. acc",
               "AUC")  # fmt: skip
    for col in columns:
        table.add_column(col, justify="left" if col == "file" else "right")
    for entry in result["artefacts"].values():
        metrics = entry["metrics"]
        if "parity" in entry:
            check = entry["parity"]
            status = "[green]PASS[/]" if check["passed"] else "[red]FAIL[/]"
        else:
            check = entry["vs_keras"]
            status = f"int8 {entry['quantization']['method']}"
        table.add_row(
            entry["file"], f"{check['max_abs_diff']:.1e}", f"{check['argmax_agreement']:.1%}",
            status, f"{entry['size_mb']:.1f}", fmt(entry.get("threshold"), 4),
            fmt(metrics["balanced_accuracy"]),
            fmt(metrics["roc_auc"]),
        )  # fmt: skip
    return table


def summary_notes(result: dict[str, Any]) -> list[str]:
    """Lines printed under the table: tolerance, outputs, skipped models, where files went."""
    lines = [f"check: FP32 logits vs Keras, PASS when max |Δ| ≤ {result['tolerance']:g}; "
             "int8 rows show their difference and metrics (no pass/fail) with their own "
             "validation-chosen threshold"]  # fmt: skip
    first = next((e for e in result["artefacts"].values() if "parity" in e), None)
    if first:
        outputs = ", ".join(f"{o['name']} {o['shape']}" for o in first["parity"]["outputs"])
        lines.append(
            f"input: images [batch, H, W, 3] float32 {INPUT_DESCRIPTION}; outputs: {outputs}"
        )
    lines += [f"skipped {name}: {reason}" for name, reason in result.get("skipped", {}).items()]
    recipes = {e["quantization"]["recipe"] for e in result["artefacts"].values()
               if "recipe" in e.get("quantization", {})}  # fmt: skip
    lines += [f"ONNX INT8 recipe: {r}" for r in sorted(recipes)]
    if result.get("int8_speed_note"):
        lines.append(result["int8_speed_note"])
    if result.get("peak_rss_mb") is not None:
        lines.append(f"peak resident memory of this export: {result['peak_rss_mb']:.0f} MB")
    lines.append(f"written to {result.get('export_dir', '')}")
    return lines


def summary_renderables(result: dict[str, Any]) -> list:
    """The export summary for a console: its table, then its note lines (plain text, no rich
    markup or highlighting), to print in that order."""
    return [summary_table(result), *_plain(summary_notes(result))]


def _plain(lines: list[str]) -> list:
    from rich.text import Text

    return [Text(line) for line in lines]


def _ratio_label(r: dict[str, Any]) -> str:
    return f"student {FORMAT_NAMES[r['student']]} / teacher {FORMAT_NAMES[r['teacher']]}"


def ratio_lines(result: dict[str, Any]) -> list[str]:
    if not result["ratios"]:
        return []
    lines = ["student / teacher (size and latency: below 1 is better; throughput: above 1)"]
    for r in result["ratios"]:
        size = "—" if r["size"] is None else f"{r['size']:.2f}×"
        lines.append(
            f"  {_ratio_label(r)}: size {size}, p50 latency {r['p50_latency']:.2f}×, "
            f"throughput {r['throughput']:.2f}×"
        )
    return lines


def _cells(row: dict[str, Any]) -> list[str]:
    mean = (
        "—" if row["mean_ms"] is None else f"{row['mean_ms']:.2f} ± {row['std_ms']:.2f}"
    )  # fmt: skip
    return [
        row["model"], row["arch"], row["format"], row["runtime"] or "—",
        fmt(row["threads"], "d"),
        fmt(None if row["params"] is None else row["params"] / 1e6, ".2f"),
        fmt(row["size_mb"], ".1f"), fmt(None if not row["flops"] else row["flops"] / 1e9, ".2f"),
        fmt(row["p50_ms"], ".2f"), fmt(row["p90_ms"], ".2f"), fmt(row["p99_ms"], ".2f"),
        mean, fmt(row["calls"], "d"), fmt(row["x_compute_bound"], ".2f"),
        fmt(row["throughput_ips"], ".1f"), fmt(row["balanced_accuracy"], ".3f"),
    ]  # fmt: skip


def _headers(result: dict[str, Any]) -> list[str]:
    return [
        "model", "arch", "format", "runtime", "threads", "params M", "size MB", "GFLOPs",
        "p50 ms", "p90 ms", "p99 ms", "mean ± std ms", "calls", "× bound",
        f"img/s @{result['batch']}", "bal. acc",
    ]  # fmt: skip


LEFT_COLUMNS = 4  # model, arch, format, runtime


def _notes(result: dict[str, Any]) -> list[str]:
    return [f"{r['model']} {r['format']}: {r['note']}" for r in result["rows"] if r["note"]]


def _settings(result: dict[str, Any]) -> str:
    peak = result.get("peak")
    bound = (
        f"× bound = FP32 p50 / (GFLOPs / {peak['gflops']} GFLOP/s, the float32 peak measured "
        f"in this run: {peak['method']}); "
        if peak else ""
    )  # fmt: skip
    return (
        f"{result['image_size']} px, latency at batch 1 ({result['warmup']} warm-up calls, then "
        f"at least {result['iters']} timed calls and {result['min_time']:g} s per row), "
        f"throughput at batch {result['batch']}; ONNX Runtime {result['onnxruntime']} "
        f"(provider {result['provider']}), threads {result['threads']}; {bound}"
        f"GFLOPs: {FLOPS_METHOD}; {result['machine']}"
    )


def benchmark_table(result: dict[str, Any]):
    from rich.table import Table

    table = Table(title=result["title"], caption=_settings(result))
    for i, header in enumerate(_headers(result)):
        table.add_column(header, justify="left" if i < LEFT_COLUMNS else "right")
    for row in result["rows"]:
        table.add_row(*_cells(row))
    return table


def int8_note(result: dict[str, Any], formats) -> None:
    """When INT8 was measured on a CPU without VNNI, say plainly that it cannot be expected
    to beat FP32 here (the host itself is in the result header)."""
    note = int8_speed_note() if {"int8", "tflite_int8"} & set(formats) else None
    if note:
        result["int8_speed_note"] = note


def _speed_lines(result: dict[str, Any]) -> list[str]:
    return [result["int8_speed_note"]] if result.get("int8_speed_note") else []


def _memory_lines(result: dict[str, Any]) -> list[str]:
    if result.get("peak_rss_mb") is None:
        return []
    return [f"peak resident memory of this command: {result['peak_rss_mb']:.0f} MB (VmHWM)"]


def benchmark_notes(result: dict[str, Any]) -> list[str]:
    """Lines printed under the benchmark table: ratios, row notes, INT8 speed, memory, files."""
    lines = ratio_lines(result) + _notes(result) + _speed_lines(result) + _memory_lines(result)
    if result.get("json"):
        lines.append(f"written to {result['json']} and {result['md']}")
    return lines


def benchmark_renderables(result: dict[str, Any]) -> list:
    """The benchmark result for a console: its table, then its note lines (plain text)."""
    return [benchmark_table(result), *_plain(benchmark_notes(result))]


def benchmark_markdown(result: dict[str, Any]) -> str:
    headers = _headers(result)
    lines = [
        f"# {result['title']}",
        "",
        _settings(result),
        "",
        md_row(headers),
        "|" + "|".join("---" if i < LEFT_COLUMNS else "---:" for i in range(len(headers))) + "|",
    ]
    lines += [md_row(_cells(row)) for row in result["rows"]]
    extra = ratio_lines(result) + _notes(result) + _speed_lines(result) + _memory_lines(result)
    if extra:
        lines += [""] + [f"- {line}" for line in extra]
    return "\n".join(lines) + "\n"


def machine_summary(peak: dict[str, Any] | None = None) -> str:
    """One line naming the host (CPU, ISA level, threads, oneDNN, `peak`) and Python."""
    return (
        f"{host_line(describe_host(peak))}; {platform.system()}, Python {platform.python_version()}"
    )
