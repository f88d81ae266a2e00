"""Running past one machine: `quantize --ray` and `imatrix --ray` on a Ray cluster.

    cluster = connect("local" | "auto" | "ray://head:10001")   # ray.init; a one-line error without ray
    check_inputs(cluster, [Path("model.gguf")])                  # every node opens the same bytes
    for data in cluster.map_ordered(task, args, window=8): ...   # results in submission order

The coordinator (the process running quantcli) plans, keeps the checkpoint manifest and writes the
output; workers read the input from storage every worker sees (a shared filesystem path) and return
bytes or statistics. Ray retries a task whose worker dies (`max_retries`), so a lost worker costs
only its tasks; a coordinator that dies resumes from its checkpoints like a local run.

Ray is an optional dependency (`pip install 'quantcli[ray]'`); it is imported here only.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from quantcli.errors import InputError, QuantcliError, UsageError

TASK_RETRIES = 4  # a task whose worker dies is run again, up to this many times
PROBE_BYTES = 1 << 20  # the head of each input every node hashes: the same file, not only the same name


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UsageError("--ray needs Ray: pip install 'quantcli[ray]'") from None
    return ray


@dataclass
class Cluster:
    ray: Any
    address: str
    started: bool  # this process started a local cluster (and shuts it down)

    @property
    def workers(self) -> int:
        """CPUs the cluster offers: the tasks that can run at once."""
        return max(1, int(self.ray.cluster_resources().get("CPU", 1)))

    @property
    def node_cpus(self) -> int:
        """The CPUs of the largest node: the most one task can ask for and still be scheduled."""
        return max([int(n.get("Resources", {}).get("CPU", 1)) for n in self.ray.nodes() if n.get("Alive")] or [1])

    def remote(self, fn: Callable, **options: Any) -> Any:
        return self.ray.remote(max_retries=TASK_RETRIES, **options)(fn)

    def map_ordered(self, task: Any, calls: Iterable[tuple], window: int | None = None) -> Iterator[Any]:
        """task.remote(*args) for each args of `calls`, at most `window` in flight; the results in
        submission order. A task's QuantcliError comes back as itself."""
        window = window or 2 * self.workers
        pending: deque = deque()
        calls = iter(calls)
        done = False
        while pending or not done:
            while not done and len(pending) < window:
                try:
                    args = next(calls)
                except StopIteration:
                    done = True
                    break
                pending.append(task.remote(*args))
            if pending:
                yield self.get(pending.popleft())

    def get(self, ref: Any) -> Any:
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, QuantcliError):
                raise type(cause)(cause.message, cause.hint) from None
            raise
        except self.ray.exceptions.WorkerCrashedError:
            raise QuantcliError(f"a Ray worker died {TASK_RETRIES + 1} times running one task; "
                                "giving up (see the Ray logs)") from None

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


def connect(address: str, num_cpus: int | None = None) -> Cluster:
    """`default`: $RAY_ADDRESS's cluster, else one started on this machine (`num_cpus` workers,
    default all cores), as `ray.init()` chooses; `auto`: the cluster `ray start` made on this
    machine; `ray://host:port` (or host:port): that one. A process already connected stays so."""
    ray = _ray()
    if ray.is_initialized():
        return Cluster(ray, address, started=False)
    kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        if address == "default":
            ray.init(num_cpus=None if os.environ.get("RAY_ADDRESS") else num_cpus, **kwargs)
        else:
            if not (address == "auto" or address.startswith("ray://") or ":" in address):
                raise UsageError(f"--ray {address!r}: give local, auto, ray://HOST:PORT or HOST:PORT")
            ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise InputError(f"--ray {address}: cannot connect to the Ray cluster: {str(exc).splitlines()[0]}") from None
    return Cluster(ray, address, started=True)


def _head_digest(path: str) -> tuple[int, str] | str:
    """(size, sha256 of the first PROBE_BYTES) of a file or of a directory's files, or why not."""
    p = Path(path)
    try:
        files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
        h, size = hashlib.sha256(), 0
        for f in files:
            st = f.stat()
            size += st.st_size
            with open(f, "rb") as fh:
                h.update(f.name.encode() + b"\0" + fh.read(PROBE_BYTES))
        return size, h.hexdigest()
    except OSError as exc:
        return f"{exc.strerror or exc}"


def _probe(paths: list[str]) -> tuple[str, list[Any]]:
    import socket

    return socket.gethostname(), [_head_digest(p) for p in paths]


def check_inputs(cluster: Cluster, paths: list[Path]) -> None:
    """Every alive node opens `paths` and finds the bytes the coordinator finds; otherwise a
    one-line InputError naming the node and the file."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    names = [str(Path(p).resolve()) for p in paths]
    want = [_head_digest(p) for p in names]
    probe = cluster.ray.remote(num_cpus=0)(_probe)
    refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(names)
            for n in cluster.ray.nodes() if n.get("Alive")]
    for host, got in cluster.ray.get(refs):
        for name, mine, theirs in zip(names, want, got):
            if theirs != mine:
                why = theirs if isinstance(theirs, str) else "it holds other bytes"
                raise InputError(f"{name}: the Ray worker on {host} cannot read it as this machine does ({why})",
                                 hint="--ray needs the input (and adapters, imatrix) on storage every worker "
                                      "sees, at the same path")


_READERS: dict[Any, Any] = {}  # per worker process: inputs opened by earlier tasks, by (path, adapters)


def worker_reader(source: str, lora: tuple) -> Any:
    """The GGUF-shaped model a worker reads (`open_source`, adapters merged), opened once per process."""
    key = (source, lora)
    if key not in _READERS:
        from quantcli.pipelines.common import merge_adapters, open_source

        reader = open_source(Path(source), lambda _m: None)
        _READERS[key], _ = merge_adapters(reader, lora, True, lambda _m: None)
    return _READERS[key]


# -- quantize ------------------------------------------------------------------------------------


def encode_task(source: str, lora: tuple, s: Any) -> Any:
    """One slice of `quantize` on a worker: its rows read from the shared input and encoded."""
    from quantcli.pipelines.slices import encode_slice, read_slice

    reader = worker_reader(source, lora)
    return encode_slice(s, read_slice(reader, s))


# -- imatrix -------------------------------------------------------------------------------------


def blas_threads() -> int:
    """The BLAS threads of this process's matmuls (OpenBLAS reads these variables, else uses every
    core): workers run theirs with the same count, so that their sums are the bytes a local run gets."""
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(var, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return os.cpu_count() or 1


def imatrix_block_task(source: str, chunks: Any, ctx: int, process_output: bool, kv_f16: bool,
                       act_quant: bool) -> dict:
    """One block of chunks through the whole model on a worker: its imatrix sums and counts."""
    from quantcli.calibrate.imatrix import MIN_ROWS, ImatrixObserver
    from quantcli.calibrate.runner import RunOptions, run_calibration
    from quantcli.engine.model import Model

    model = Model(worker_reader(source, ()), kv_f16=kv_f16, act_quant=act_quant)
    observer = ImatrixObserver(process_output=process_output)
    run_calibration(model, chunks, RunOptions(ctx=ctx, min_ctx=MIN_ROWS, kind="imatrix"), [observer])
    return observer.result().arrays()


def imatrix(source: Path, text: str, options: Any, address: str, progress: Any = None,
            log: Callable[[str], None] | None = None) -> Any:
    """`calibrate.imatrix.compute` on a Ray cluster: the chunks in blocks of REDUCTION_BLOCK, one
    task each (the layer-sequential pass over its chunks), the blocks' sums added in block order
    on this process, exactly as a local run adds them. Finished blocks are checkpointed here."""
    import time

    from quantcli.calibrate import imatrix as calib
    from quantcli.calibrate import imatrix_file as imf
    from quantcli.calibrate.runner import RunOptions, make_chunks, model_fingerprint, npz_bytes, read_npz, versions
    from quantcli.checkpoint import CheckpointStore
    from quantcli.engine.model import Model
    from quantcli.engine.tokenizer import Tokenizer
    from quantcli.formats import open_model
    from quantcli.progress import Progress, progress_or_noop

    if options.compute_ppl or options.super_weights:
        raise UsageError("--ray gathers the importance sums only: run --super-weights (and perplexity) locally")
    report, log = progress_or_noop(progress), log or (lambda _m: None)
    t0 = time.perf_counter()
    loaded = [imf.load(p) for p in options.in_files]
    with open_model(source) as reader:
        model = Model(reader, kv_f16=options.kv_f16, act_quant=options.act_quant)
        tokens = Tokenizer.from_model(reader).encode(text, add_special=True, parse_special=options.parse_special)
        chunks = make_chunks(model, tokens, RunOptions(ctx=options.ctx, chunks=options.chunks,
                                                       skip_chunks=options.skip_chunks, min_ctx=calib.MIN_ROWS))
        threads = blas_threads()
        key = {"kind": "imatrix-ray", "model": model_fingerprint(reader),
               "tokens": hashlib.sha256(chunks.astype("<i8").tobytes()).hexdigest(),
               "options": {"ctx": options.ctx, "process_output": options.process_output, "kv_f16": options.kv_f16,
                           "act_quant": options.act_quant, "block": calib.REDUCTION_BLOCK, "blas_threads": threads},
               **versions()}
    store = CheckpointStore(options.checkpoint_dir, key, log) if options.checkpoint_dir is not None else None
    blocks = [chunks[i:i + calib.REDUCTION_BLOCK] for i in range(0, len(chunks), calib.REDUCTION_BLOCK)]
    saved = {b for b in range(len(blocks)) if store is not None and store.get(f"block-{b}") is not None}
    if saved:
        log(f"resuming {len(saved)} of {len(blocks)} blocks from {store.dir}")  # type: ignore[union-attr]
    cluster = connect(address)
    try:
        check_inputs(cluster, [Path(source)])
        env = {"OPENBLAS_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
        task = cluster.remote(imatrix_block_task, num_cpus=min(threads, cluster.node_cpus),
                              runtime_env={"env_vars": env})
        name = str(Path(source).resolve())
        todo = [b for b in range(len(blocks)) if b not in saved]
        results = cluster.map_ordered(task, ((name, blocks[b], options.ctx, options.process_output, options.kv_f16,
                                              options.act_quant) for b in todo))
        total = calib.Collector()
        for b in range(len(blocks)):
            if b in saved:
                arrays = read_npz(store.get(f"block-{b}"))  # type: ignore[union-attr,arg-type]
            else:
                arrays = next(results)
                if store is not None:
                    with store.put(f"block-{b}") as fh:
                        fh.write(npz_bytes(**arrays))
            total.add_arrays(arrays)
            report(Progress("block", b + 1, len(blocks), f"chunks {b * calib.REDUCTION_BLOCK}-"
                                                         f"{b * calib.REDUCTION_BLOCK + len(blocks[b]) - 1}"))
    finally:
        cluster.close()
    result = calib.to_imatrix(total, options.ctx, options.dataset)
    if loaded:
        result = calib.merge(result, loaded, options.ctx)
    if store is not None and not options.keep_checkpoints:
        store.remove()
    return calib.ImatrixResult(result, len(chunks), int(chunks.size), time.perf_counter() - t0, 0)
