"""`quantcli quantize IN OUT --type PRESET`: llama-quantize's flags, plus profiles and checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from quantcli.cli.app import app
from quantcli.cli.common import boundary, err, lora_specs, out, progress_bar, ray_option
from quantcli.errors import UsageError, VerificationError
from quantcli.pipelines import postcheck
from quantcli.pipelines import quantize as pipeline


def _tensor_type(spec: str) -> tuple[str, str]:
    pattern, sep, type_name = spec.rpartition("=")
    if not sep or not pattern or not type_name:
        raise UsageError(f"--tensor-type '{spec}' is not REGEX=TYPE", hint="e.g. --tensor-type attn_v=Q8_0")
    return pattern, type_name


def render_plan(result: pipeline.QuantizeResult) -> None:
    t = Table(title="plan", pad_edge=False)
    estimates = result.allocation is not None
    cols = [("tensor", "left"), ("from", "left"), ("type", "left"), ("MB", "right")]
    cols += [("est. dKLD", "right")] if estimates else []
    for col, just in cols + [("reason", "left")]:
        t.add_column(col, justify=just)
    for p in result.plan:
        est = [f"{p.estimate:.2e}" if p.estimate is not None else ""] if estimates else []
        t.add_row(p.info.name, p.info.dtype, p.type, f"{p.nbytes / 1e6:.2f}", *est, escape(p.reason))
    out.print(t)
    out.print(f"total: {len(result.plan)} tensors, {result.params:,} params, "
              f"{result.bytes / 1e6:.2f} MB, {result.bpw:.3f} bpw, file type {result.file_type}"
              + (f", {result.fallbacks} fallback(s)" if result.fallbacks else ""))
    if estimates:
        out.print(_mix_line(result))
    if result.protected is not None:
        out.print(escape(_protected_line(result)))
    out.print(escape(_size_line(result)))


def _size_line(result: pipeline.QuantizeResult) -> str:
    s = result.size
    line = f"{s['ratio_vs_f16']:.2f}x smaller than F16"
    if s["kept_by"]:
        line += f" ({s['default_type']} alone: {s['default_ratio_vs_f16']:.1f}x); kept by " + "; ".join(
            f"{k['tensor']} ({100 * k['weights_share']:.0f}% of the weights) at {k['type']}, "
            f"{100 * k['bytes_share']:.0f}% of the bytes" for k in s["kept_by"])
    return line


def _protected_line(result: pipeline.QuantizeResult) -> str:
    if not result.protected:
        return "super weights: none protected (none confirmed, or their tensors already have enough bits)"
    parts = [f"{p['tensor']} -> {p['type']} (" + ", ".join(f"[{s['row']}, {s['col']}]" for s in p["super_weights"]) + ")"
             for p in result.protected]
    return f"super weights: protected {len(parts)} tensor(s): " + "; ".join(parts)


def _mix_line(result: pipeline.QuantizeResult) -> str:
    a = result.allocation
    return (f"automatic mix ({a['target']}): estimated KLD {a['estimated_kld']:.4g}, file "
            f"{result.file_bytes:,} bytes, nearest preset {a['nearest_preset']}")


@app.command()
@boundary
def quantize(
    input: Path = typer.Argument(..., help="F32/F16/BF16 GGUF, safetensors file or Hugging Face directory."),
    output: Path = typer.Argument(..., help="Output GGUF file (a directory with --format compressed-tensors)."),
    preset: Optional[str] = typer.Option(None, "--type", "-t", help="llama.cpp preset (Q4_K_M, IQ4_XS, Q8_0, ...)."),
    profile: Optional[Path] = typer.Option(None, "--profile", help="YAML layer profile (see profiles/README.md)."),
    imatrix: Optional[Path] = typer.Option(None, "--imatrix", help="Importance matrix (llama.cpp GGUF or legacy .dat)."),
    include_weights: List[str] = typer.Option([], "--include-weights", help="Use the imatrix only for these tensors (repeatable)."),
    exclude_weights: List[str] = typer.Option([], "--exclude-weights", help="Do not use the imatrix for these tensors (repeatable)."),
    output_tensor_type: Optional[str] = typer.Option(None, "--output-tensor-type", help="Type for output.weight."),
    token_embedding_type: Optional[str] = typer.Option(None, "--token-embedding-type", help="Type for token_embd.weight."),
    tensor_type: List[str] = typer.Option([], "--tensor-type", help="REGEX=TYPE override (repeatable; first match wins)."),
    pure: bool = typer.Option(False, "--pure", help="Every quantizable tensor gets the preset's default type."),
    leave_output_tensor: bool = typer.Option(False, "--leave-output-tensor", help="Keep output.weight unquantized."),
    allow_requantize: bool = typer.Option(False, "--allow-requantize", help="Accept an already quantized input."),
    lora: List[Path] = typer.Option([], "--lora", help="Merge this LoRA adapter (a PEFT directory or a llama.cpp "
                                    "GGUF adapter) into the weights before quantizing (repeatable)."),
    lora_scale: List[float] = typer.Option([], "--lora-scale", help="Scale S of each --lora, in order "
                                           "(W + S * alpha/r * B A; default 1)."),
    override_kv: List[str] = typer.Option([], "--override-kv", help="KEY=TYPE:VALUE metadata override (repeatable)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (tensor, type, reason, bytes); write nothing."),
    checkpoint_dir: Optional[Path] = typer.Option(None, "--checkpoint-dir", help="Where layer checkpoints go (default: OUT.checkpoints)."),
    keep_checkpoints: bool = typer.Option(False, "--keep-checkpoints", help="Keep checkpoints after success."),
    target_size: Optional[str] = typer.Option(None, "--target-size", help="Automatic mix: the output file's size (bytes, 180MB, 172MiB, 4.5GB), never exceeded."),
    target_bpw: Optional[float] = typer.Option(None, "--target-bpw", help="Automatic mix: bits per weight over all tensors."),
    max_kld: Optional[float] = typer.Option(None, "--max-kld", help="Automatic mix: the smallest whose estimated mean KLD stays under this."),
    calib: Optional[Path] = typer.Option(None, "--calib", help="Calibration text for the automatic mix's analysis (and its imatrix, without --imatrix)."),
    candidates: Optional[str] = typer.Option(None, "--candidates", help="Types the automatic mix chooses from, comma-separated (default: IQ1_S ... Q8_0, F16)."),
    measurement: Optional[Path] = typer.Option(None, "--measurement", help="Sensitivity measurement (JSON): reused when it exists, written by the analysis when not."),
    save_profile: Optional[Path] = typer.Option(None, "--save-profile", help="Write the automatic mix as a YAML profile (--profile reproduces the file)."),
    calib_chunks: int = typer.Option(64, "--calib-chunks", help="Chunks of the imatrix computed from --calib."),
    sensitivity_chunks: int = typer.Option(2, "--sensitivity-chunks", help="Chunks of --calib whose KL divergence measures each tensor."),
    ctx: int = typer.Option(512, "--ctx", "-c", help="Tokens per calibration chunk of the automatic mix's analysis."),
    protect_super_weights: bool = typer.Option(False, "--protect-super-weights", help="Give the tensors that hold the "
                                               "--imatrix's confirmed super weights (imatrix --super-weights) at least "
                                               "--super-weight-type."),
    super_weight_type: Optional[str] = typer.Option(None, "--super-weight-type", help="Type of the protected tensors "
                                                    f"(default {pipeline.DEFAULT_SUPER_WEIGHT_TYPE}; never lowers one)."),
    no_check: bool = typer.Option(False, "--no-check", help="Skip the coherence check that follows ultra-low-bit "
                                  "presets (IQ1_*, IQ2_*, TQ*, Q2_K*) and plans under 3 bpw."),
    strict: bool = typer.Option(False, "--strict", help="Exit 6 when that check finds the model incoherent "
                                "(the file is kept)."),
    out_format: str = typer.Option("gguf", "--format", help="gguf, or compressed-tensors: a Hugging Face "
                                   "directory vLLM loads (with --scheme)."),
    scheme: Optional[str] = typer.Option(None, "--scheme", help="compressed-tensors scheme: W4A16 (int4 groups of "
                                         "64, the SYM4_B64 codec) or W8A8 (int8, dynamic per-token activations)."),
    ray: bool = typer.Option(False, "--ray", help="Encode on a Ray cluster: $RAY_ADDRESS's, else one started on "
                             "this machine. Every worker must see the input at the same path; same bytes as a local run."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="The cluster for --ray: auto (this "
                                              "machine's `ray start`), ray://HOST:PORT or HOST:PORT."),
    threads: int = typer.Option(0, "--threads", "-j", help="Worker threads (0: all cores); output is identical for any count."),
    force: bool = typer.Option(False, "--force", "-f", help="Overwrite OUT if it exists."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary (schema quantcli.quantize/1)."),
) -> None:
    """Quantize a model to GGUF with llama.cpp's presets, byte for byte, or a YAML layer profile."""
    if threads < 0:
        raise UsageError(f"--threads must be 0 or more, got {threads}")
    if calib_chunks < 1 or sensitivity_chunks < 1:
        raise UsageError("--calib-chunks and --sensitivity-chunks must be positive")
    opts = pipeline.QuantizeOptions(
        input=input, output=output, preset=preset, profile=profile, imatrix=imatrix,
        include_weights=tuple(include_weights), exclude_weights=tuple(exclude_weights),
        output_tensor_type=output_tensor_type, token_embedding_type=token_embedding_type,
        tensor_types=tuple(_tensor_type(s) for s in tensor_type), pure=pure,
        leave_output_tensor=leave_output_tensor, allow_requantize=allow_requantize,
        override_kv=tuple(override_kv), dry_run=dry_run, checkpoint_dir=checkpoint_dir,
        keep_checkpoints=keep_checkpoints, threads=threads, force=force,
        target_size=target_size, target_bpw=target_bpw, max_kld=max_kld, calib=calib,
        candidates=tuple(c for c in (candidates or "").split(",") if c.strip()), measurement=measurement,
        save_profile=save_profile, calib_chunks=calib_chunks, sensitivity_chunks=sensitivity_chunks, ctx=ctx,
        protect_super_weights=protect_super_weights, super_weight_type=super_weight_type,
        lora=lora_specs(lora, lora_scale), out_format=out_format.lower(), scheme=scheme,
        ray=ray_option(ray, ray_address),
    )

    def warn(msg: str) -> None:
        if not quiet and not as_json:
            err.print(f"[yellow]warning:[/] {escape(msg)}")

    if strict and no_check:
        raise UsageError("--strict fails on the coherence check that --no-check skips: give one of them")
    with progress_bar(quiet or as_json or dry_run, "quantize") as progress:
        result = pipeline.run(opts, progress, warn)
    if opts.out_format != "gguf":
        if as_json:
            typer.echo(json.dumps({**result.to_json(), "coherence": None}, indent=1))
        elif not quiet:
            s = result.size
            err.print(f"wrote {result.output}: compressed-tensors {s['scheme']}, {s['quantized_linears']} linears "
                      f"quantized, {result.bytes / 1e6:.1f} MB in {len(s['files'])} files, {result.seconds:.1f} s")
        return
    check = None
    if not dry_run and not quiet and not as_json:
        _render_written(result)
    if not dry_run and not no_check and postcheck.wanted(preset, result.bpw):
        def stage(msg: str) -> None:
            if not quiet and not as_json:
                err.print(escape(msg))

        with progress_bar(quiet or as_json, "coherence") as progress:
            check = postcheck.run(opts, result.plan, result.file_bytes or 0, progress, stage)
        if not quiet and not as_json:
            _render_check(check)
    if as_json:
        typer.echo(json.dumps({**result.to_json(), "coherence": check.to_json() if check else None}, indent=1))
    elif dry_run:
        render_plan(result)
    if strict and check is not None and check.report is None:
        raise VerificationError(f"{output}: the coherence check could not run (--strict; the file is kept): "
                                f"{check.note}")
    if strict and check is not None and not check.passed:
        raise VerificationError(f"{output}: coherent on {100 * check.report.coherent:.1f}% of "
                                f"{len(check.report.results)} prompts, below {100 * postcheck.PASS:.0f}% "
                                "(--strict; the file is kept)")


def _render_check(check: postcheck.PostCheck) -> None:
    rep = check.report
    if rep is None:
        err.print(f"[yellow]warning:[/] {escape(check.note)}")
        return
    share = (f"coherence: {100 * rep.coherent:.1f}% of {len(rep.results)} prompts coherent against the input "
             f"({rep.seconds:.0f} s)")
    if check.passed:
        err.print(escape(share))
        return
    err.print(f"[yellow]warning:[/] {escape(share)}, below {100 * postcheck.PASS:.0f}%: "
              "this model may not produce sensible text")
    s = check.suggestion
    if s is not None:
        err.print(escape(f"a hybrid of about the same size ({s.file_bytes:,} bytes) is coherent on "
                         f"{100 * s.coherent:.1f}% (checked):"))
        out.print(escape(s.command), soft_wrap=True)
    else:
        err.print(escape(check.note))


def _render_written(result: pipeline.QuantizeResult) -> None:
    resumed = f", resumed {result.resumed_units} layer unit(s) from checkpoints" if result.resumed_units else ""
    err.print(f"wrote {result.output}: {result.bytes / 1e6:.1f} MB of tensors, {result.bpw:.3f} bpw, "
              f"{result.seconds:.1f} s{resumed}")
    if result.allocation is not None:
        err.print(_mix_line(result))
    if result.protected is not None:
        err.print(escape(_protected_line(result)))
    err.print(escape(_size_line(result)))
