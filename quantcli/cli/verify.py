"""`quantcli verify FILE`: exit 0 when every check passes, 6 when one fails."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from quantcli.cli.app import app
from quantcli.cli.common import boundary, out, progress_bar
from quantcli.errors import UsageError, VerificationError
from quantcli.pipelines import verify as pipeline


@app.command()
@boundary
def verify(
    file: Path = typer.Argument(..., help="GGUF (or safetensors) file to check."),
    preset: Optional[str] = typer.Option(None, "--type", "-t", help="Check every tensor's type against this preset."),
    profile: Optional[Path] = typer.Option(None, "--profile", help="Check against this YAML layer profile."),
    base: Optional[Path] = typer.Option(None, "--base", help="Quality gates against this model (the F32/F16 "
                                        "FILE was made from): perplexity, KL divergence, top-1, coherence."),
    eval_text: Optional[Path] = typer.Option(None, "--eval-text", help="Text the perplexity and KL gates are "
                                             "measured on (llama-perplexity's chunks)."),
    ctx: Optional[int] = typer.Option(None, "--ctx", "-c", help="Tokens per chunk (default 512, or the gate file's)."),
    chunks: Optional[int] = typer.Option(None, "--chunks", help="At most this many chunks (default: all the text gives)."),
    max_ppl_delta: Optional[float] = typer.Option(None, "--max-ppl-delta", help="Perplexity at most the base's + "
                                                  "this (default 0.5 without a gate file)."),
    max_ppl_ratio: Optional[float] = typer.Option(None, "--max-ppl-ratio", help="Perplexity at most the base's x this."),
    max_kld: Optional[float] = typer.Option(None, "--max-kld", help="Mean KL(base || FILE) at most this, nats."),
    max_kld_p99: Optional[float] = typer.Option(None, "--max-kld-p99", help="99th percentile of the KL at most this."),
    min_top1: Optional[float] = typer.Option(None, "--min-top1", help="Top-1 agreement with the base at least this (0-1)."),
    min_coherence: Optional[float] = typer.Option(None, "--min-coherence", help="Share of the coherence suite's "
                                                  "prompts coherent at least this (0-1)."),
    task: Optional[Path] = typer.Option(None, "--task", help="Multiple-choice task (JSON Lines: context, choices, "
                                        "answer), scored on FILE and the base like lm-evaluation-harness's acc_norm."),
    min_task_ratio: Optional[float] = typer.Option(None, "--min-task-ratio", help="--task accuracy at least this "
                                                   "share of the base's (default 0.95 with --task)."),
    gates: Optional[Path] = typer.Option(None, "--gates", help="YAML gate file: thresholds, ctx/chunks, per-preset "
                                         "overrides (flags win over it)."),
    base_cache: Optional[Path] = typer.Option(None, "--base-cache", help="Folder of the base's cached logits "
                                              "(default: the quantcli cache folder)."),
    contracts: bool = typer.Option(False, "--contracts", help="Also the seeds' falsification tests, each by its ID: "
                                   "FALSIFY-QO-001..005 (sizes, LoRA scaling, dropout, kernels) and "
                                   "FALSIFY-QUANT-001..005 (the SYM4_B64 codec)."),
    rebuild_from: Optional[Path] = typer.Option(None, "--rebuild-from", help="Remake FILE from this source with "
                                                "the recipe it records and check the bytes are identical."),
    imatrix: Optional[Path] = typer.Option(None, "--imatrix", help="--rebuild-from: the imatrix FILE was made with "
                                           "(default: the path it records)."),
    junit: Optional[Path] = typer.Option(None, "--junit", help="Also write the checks as JUnit XML here."),
    as_json: bool = typer.Option(False, "--json", help="Print the checks as JSON (schema quantcli.verify/1)."),
) -> None:
    """Integrity, plan conformance, finite weights, the size contract, and quality gates against a base; for CI."""
    flags = {"max_ppl_delta": max_ppl_delta, "max_ppl_ratio": max_ppl_ratio, "max_kld": max_kld,
             "max_kld_p99": max_kld_p99, "min_top1": min_top1, "min_coherence": min_coherence,
             "min_task_ratio": min_task_ratio}
    given = {k: v for k, v in flags.items() if v is not None}
    if task is not None and min_task_ratio is None:
        given["min_task_ratio"] = pipeline.DEFAULT_TASK_RATIO
    for k, v in given.items():
        if v < 0 or (k in pipeline.SHARES and v > 1):
            raise UsageError(f"--{k.replace('_', '-')} must be >= 0" + (" and <= 1" if k in pipeline.SHARES else "")
                             + f", got {v}")
    if imatrix is not None and rebuild_from is None:
        raise UsageError("--imatrix is the rebuild's: pass --rebuild-from SOURCE too")
    quality = None
    if base is None and (given or gates or eval_text or base_cache or task):
        raise UsageError("the quality gates compare FILE with its base: pass --base BASE")
    if base is not None:
        defaults = dict(pipeline.DEFAULT_GATES) if eval_text is not None else {}  # the default gate needs a text
        file_gates, per_preset, sizes = pipeline.load_gates(gates) if gates else (defaults, {}, {})
        if not file_gates and not given and not per_preset:
            raise UsageError("no quality gate: pass --eval-text TEXT (perplexity +0.5 at most by default), "
                             "a threshold, --task FILE or --gates FILE")
        quality = pipeline.QualityOptions(base=base, text=eval_text, ctx=ctx or sizes.get("ctx", 512),
                                          chunks=chunks or sizes.get("chunks"), gates=file_gates,
                                          presets=per_preset, flags=given, cache_dir=base_cache, task=task)
    if junit is not None:
        from quantcli.formats.atomic import check_output

        check_output(junit, [file], force=True)
    with progress_bar(as_json or quality is None, "verify") as progress:
        result = pipeline.run(pipeline.VerifyOptions(file, preset, profile, quality, contracts, rebuild_from, imatrix),
                              progress)
    if junit is not None:
        from quantcli.formats.atomic import atomic_write

        with atomic_write(junit) as fh:
            fh.write(pipeline.junit_xml(result))
    if as_json:
        typer.echo(json.dumps(result.to_json(), indent=1))
    else:
        width = max([14] + [len(c.name) for c in result.checks])
        for c in result.checks:
            mark = "[green]pass[/]" if c.ok else "[bold red]FAIL[/]"
            out.print(f"{mark}  {c.name:<{width}} {escape(c.detail)}")
        q = result.quality
        if q and "base_cached" in q:
            out.print(escape(f"base {q['base']}: {'cached' if q['base_cached'] else 'evaluated'} in "
                             f"{q['base_seconds']:.1f} s; {file.name} in {q['model_seconds']:.1f} s "
                             f"({q['chunks']} chunks of {q['ctx']}, {q['tokens']} tokens scored)"))
    if not result.ok:
        failed = [c.name for c in result.checks if not c.ok]
        if as_json:
            raise typer.Exit(VerificationError.exit_code)
        raise VerificationError(f"{file}: verification failed: {', '.join(failed)}")
