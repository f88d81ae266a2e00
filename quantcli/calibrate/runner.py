"""The resumable layer-by-layer calibration loop, and the observers that gather statistics on it.

Every calibration feature (importance matrices, SmoothQuant statistics, super weights,
sensitivity) runs the same loop: tokens -> chunks of `ctx` with BOS -> embeddings -> all chunks
through layer 0, then layer 1, ... with one layer's weights in memory and the hidden states
[n_chunks, ctx, n_embd] in RAM or a memory map. What differs is what is watched, and that is an
`Observer`:

    class AbsMax(Observer, name="absmax"):         # registered by name
        def on_input(self, name, x): ...           # every matmul input [T, n_in]
        def on_output(self, name, y): ...          # (wants_outputs) every matmul output [T, n_out]
        def on_residual(self, il, c, h): ...       # (wants_residual) the stream after layer il, chunk c
        def prepare_layer(self, il, w, probe): ... # may edit layer il's weights before it runs
        def layer_state(self, il) -> {key: array}  # checkpointed after each layer ...
        def load_layer_state(self, il, state)      # ... and given back on resume
        def carry_state(self) -> {key: array}      # state that moves on with the hidden states ...
        def load_carry_state(self, state)          # ... saved and given back with them
        def merge(self, other)                     # statistics of another shard / file
        def result(self)

    run = run_calibration(model, tokens, RunOptions(ctx=512, chunks=128, checkpoint_dir=d),
                          [make_observer("imatrix"), make_observer("absmax")])
    run.observers[0].result()

Checkpoints: after each layer, one unit `stats-{il}` holds every observer's state for that layer
and one of two alternating units (`hidden-0`, `hidden-1`) holds the hidden states after it, so one
of them is intact whenever the other is being replaced. A re-run with the same key (model
fingerprint, tokens, options, observers and their options, versions) continues after the last
layer whose statistics are all saved, and produces the same result as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np

import quantcli
from quantcli.checkpoint import CheckpointStore, key_json
from quantcli.engine.model import Hook, Model
from quantcli.engine.perplexity import chunk_tokens
from quantcli.errors import InputError, UsageError
from quantcli.progress import Progress, ProgressFn, progress_or_noop
from quantcli.registry import register

_OBSERVERS: dict[str, type["Observer"]] = {}



class Probe:
    """What `prepare_layer` gets for layer il: `probe(hook, on_output)` runs every chunk through
    the layer with its weights as they are now, without moving the hidden states on;
    `probe.input(c)` is chunk c's input to the layer [ctx, n_embd] (the residual stream after
    layer il - 1, or the embeddings), also on a resumed run."""

    def __init__(self, model: Model, il: int, weights: dict[str, np.ndarray], hidden: np.ndarray) -> None:
        self.model, self.il, self.weights, self._hidden = model, il, weights, hidden
        self.n_chunks = hidden.shape[0]

    def __call__(self, hook: Hook | None = None, out_hook: Callable[[str, np.ndarray], None] | None = None) -> None:
        for c in range(self.n_chunks):
            self.model.layer(self.il, self.weights, self.input(c), hook, out_hook)

    def input(self, c: int) -> np.ndarray:
        return np.asarray(self._hidden[c])



class Observer:
    """Base of the calibration observers; subclasses register with `name=` in the class statement.
    Options are keyword arguments to the constructor (frozen: they are part of the checkpoint key);
    state gathered during the run lives in attributes ending in `_`."""

    name: ClassVar[str]
    wants_outputs: ClassVar[bool] = False  # on_output is called for every matmul
    wants_residual: ClassVar[bool] = False  # on_residual is called after every layer and chunk

    def __init_subclass__(cls, name: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if name is None:
            return
        register(_OBSERVERS, name, cls, "observer")
        cls.name = name

    def __init__(self, **options: Any) -> None:
        self.options = dict(options)

    # -- events --------------------------------------------------------------------------------------
    def begin(self, model: Model, chunks: np.ndarray) -> None:
        """Before anything runs (also on resume): the model and the [n_chunks, ctx] token ids."""

    def prepare_layer(self, il: int, weights: dict[str, np.ndarray], probe: Probe) -> None:
        """Before layer il runs: edit `weights` (float32, by short name) in place to change what
        the layer computes. `probe(hook, on_output)` runs every chunk through the layer as it is
        now, without moving the hidden states on, for statistics the edit needs."""

    def on_input(self, name: str, x: np.ndarray) -> None:
        """A matmul's input [n_tokens, n_in] for weight `name` (blk.N.attn_q.weight, ...)."""

    def on_output(self, name: str, y: np.ndarray) -> None:
        """A matmul's output [n_tokens, n_out] (only when `wants_outputs`)."""

    def on_residual(self, il: int, chunk: int, h: np.ndarray) -> None:
        """The residual stream [ctx, n_embd] of one chunk after layer il (only when `wants_residual`)."""

    def end_layer(self, il: int) -> None:
        """All chunks have been through layer il."""

    def end(self, model: Model, hidden: np.ndarray) -> None:
        """After the last layer: the final hidden states [n_chunks, ctx, n_embd]."""

    # -- state ---------------------------------------------------------------------------------------
    def layer_state(self, il: int) -> dict[str, np.ndarray]:
        """What layer il added, as arrays (saved in the layer's checkpoint)."""
        return {}

    def load_layer_state(self, il: int, state: dict[str, np.ndarray]) -> None:
        """Take back what `layer_state(il)` returned (a resumed run)."""

    def carry_state(self) -> dict[str, np.ndarray]:
        """State that is replaced, not added to, layer by layer (hidden states of the observer's
        own, such as perturbed copies of the stream): saved with the runner's hidden states after
        each layer, and given back with them on resume."""
        return {}

    def load_carry_state(self, state: dict[str, np.ndarray]) -> None:
        """Take back what `carry_state()` returned after the layer the run resumes from."""

    def merge(self, other: "Observer") -> None:
        """Add another run's statistics (another shard of the chunks, or a file) to this one's."""
        raise NotImplementedError(f"observer '{self.name}' cannot merge statistics")

    def result(self) -> Any:
        return None

    def key(self) -> dict[str, Any]:
        """What the checkpoint key records of this observer."""
        return {"name": self.name, "options": key_json(self.options)}


def make_observer(name: str, **options: Any) -> Observer:
    """An observer by its registered name; unknown names list the known ones."""
    _load_observers()
    try:
        cls = _OBSERVERS[name]
    except KeyError:
        raise UsageError(f"unknown observer '{name}'; known: {', '.join(sorted(_OBSERVERS))}") from None
    return cls(**options)


def observer_names() -> list[str]:
    _load_observers()
    return sorted(_OBSERVERS)


def _load_observers() -> None:
    import quantcli.calibrate.absmax  # noqa: F401  (registers "absmax")
    import quantcli.calibrate.gptq  # noqa: F401  (registers "gptq")
    import quantcli.calibrate.imatrix  # noqa: F401  (registers "imatrix")
    import quantcli.calibrate.sensitivity  # noqa: F401  (registers "sensitivity")
    import quantcli.calibrate.smooth  # noqa: F401  (registers "smooth")
    import quantcli.calibrate.superweights  # noqa: F401  (registers "superweights")


@dataclass(frozen=True)
class RunOptions:
    ctx: int = 512  # tokens per chunk
    chunks: int | None = None  # at most this many chunks; None: all the tokens hold
    skip_chunks: int = 0  # drop this many chunks from the start of the tokens
    min_ctx: int = 4  # refuse a smaller context (imatrix: 16, llama-imatrix's minimum rows)
    checkpoint_dir: Path | None = None  # layer checkpoints here; resume from them when they match
    keep_checkpoints: bool = False  # leave the checkpoints after success (default: removed)
    hidden_path: Path | None = None  # scratch file to memory-map the hidden states (removed after)
    kind: str = "calibrate"  # recorded in the checkpoint key


@dataclass
class RunResult:
    observers: list[Observer]
    chunks: np.ndarray  # [n_chunks, ctx] token ids, BOS first
    seconds: float
    resumed_layers: int  # layers taken from checkpoints
    hidden: np.ndarray | None = field(default=None, repr=False)  # final hidden states, with keep_hidden

    @property
    def tokens(self) -> int:
        return int(self.chunks.size)


def model_fingerprint(reader: Any) -> str:
    """sha256 over the file size, the tensor table and the first and last 64 KiB of each tensor:
    cheap even for a 40 GB model, and any re-quantization or other model changes it."""
    h = hashlib.sha256()
    path = Path(reader.path)
    h.update(str(path.stat().st_size if path.is_file() else 0).encode())
    for name in sorted(reader.tensors):
        info = reader.tensors[name]
        h.update(f"{name}|{info.dtype}|{info.shape}|{info.nbytes}\n".encode())
        raw = reader.raw(name)
        h.update(raw[:65536].tobytes())
        h.update(raw[-65536:].tobytes())
    return h.hexdigest()


def make_chunks(model: Model, tokens: np.ndarray | list[int], options: RunOptions) -> np.ndarray:
    """[n_chunks, ctx] token ids: `skip_chunks` dropped, each chunk's first token BOS. A 2-D array
    is taken as chunks already made (a cluster's block of them)."""
    if isinstance(tokens, np.ndarray) and tokens.ndim == 2:
        if tokens.shape[1] != options.ctx:
            raise UsageError(f"chunks of {tokens.shape[1]} tokens given for a context of {options.ctx}")
        return tokens.astype(np.int64)
    if options.ctx < options.min_ctx:
        raise UsageError(f"context {options.ctx} is below {options.min_ctx}: llama-imatrix collects nothing "
                         f"from matmuls with fewer than {options.min_ctx} rows")
    tokens = np.asarray(tokens, dtype=np.int64)
    if options.skip_chunks:
        if (options.skip_chunks + 2) * options.ctx >= len(tokens):
            raise InputError(f"no tokens left after removing {options.skip_chunks} chunks of {options.ctx}")
        tokens = tokens[options.skip_chunks * options.ctx:]
    cfg = model.config
    return chunk_tokens(tokens, options.ctx, options.chunks, cfg.bos_id, cfg.add_bos)


def run_calibration(model: Model, tokens: np.ndarray | list[int], options: RunOptions,
                    observers: list[Observer], progress: ProgressFn | None = None,
                    log: Callable[[str], None] | None = None, keep_hidden: bool = False,
                    extra_key: dict[str, Any] | None = None) -> RunResult:
    """All chunks through every layer in turn, each observer seeing what it asked for; resumable
    (see the module's docstring). `extra_key` adds run options of the caller to the checkpoint key.
    With keep_hidden the final hidden states are returned (else they are dropped)."""
    report = progress_or_noop(progress)
    log = log or (lambda _msg: None)
    t0 = time.perf_counter()
    names = [o.name for o in observers]
    if len(set(names)) != len(names):
        raise UsageError(f"observers must differ; got {', '.join(names)}")
    chunks = make_chunks(model, tokens, options)
    n_chunks, ctx = chunks.shape
    cfg = model.config
    store = _store(model, chunks, options, observers, extra_key, log)

    shape = (n_chunks, ctx, cfg.n_embd)
    if options.hidden_path is not None:
        hidden = np.lib.format.open_memmap(options.hidden_path, mode="w+", dtype=np.float32, shape=shape)
    else:
        hidden = np.empty(shape, np.float32)
    for o in observers:
        o.begin(model, chunks)
    start = _resume(store, hidden, observers, log) if store is not None else 0
    if start == 0:
        model.embed(chunks, out=hidden)

    on_input = _fan_out([o.on_input for o in observers if type(o).on_input is not Observer.on_input])
    on_output = _fan_out([o.on_output for o in observers if o.wants_outputs])
    residual = [o for o in observers if o.wants_residual]
    for il in range(start, cfg.n_layer):
        w = model.layer_weights(il)
        probe = Probe(model, il, w, hidden)
        for o in observers:
            o.prepare_layer(il, w, probe)
        for c in range(n_chunks):
            hidden[c] = model.layer(il, w, np.asarray(hidden[c]), on_input, on_output)
            for o in residual:
                o.on_residual(il, c, hidden[c])
            report(Progress("chunk", il * n_chunks + c + 1, cfg.n_layer * n_chunks, f"blk.{il}"))
        del w, probe  # before the next layer's weights load: memory is one layer's
        for o in observers:
            o.end_layer(il)
        if store is not None:
            _save_layer(store, il, hidden, observers)
        report(Progress("layer", il + 1, cfg.n_layer, f"blk.{il}"))

    for o in observers:
        o.end(model, hidden)
    kept = hidden if keep_hidden else None
    hidden = None  # the memory map (if any) is closed with its last reference
    if options.hidden_path is not None and not keep_hidden:
        os.unlink(options.hidden_path)
    if store is not None and not options.keep_checkpoints:
        store.remove()
    return RunResult(observers, chunks, time.perf_counter() - t0, start, kept)


def _fan_out(calls: list[Callable[[str, np.ndarray], None]]) -> Callable[[str, np.ndarray], None] | None:
    if not calls:
        return None
    if len(calls) == 1:
        return calls[0]

    def each(name: str, x: np.ndarray) -> None:
        for call in calls:
            call(name, x)

    return each


def versions() -> dict[str, str]:
    """What a checkpoint key records of the software: a resumed run must compute as the first did."""
    from importlib.metadata import version

    return {"quantcli": quantcli.__version__, "numpy": np.__version__, "gguf": version("gguf")}


def _store(model: Model, chunks: np.ndarray, options: RunOptions, observers: list[Observer],
           extra_key: dict[str, Any] | None, log: Callable[[str], None]) -> CheckpointStore | None:
    if options.checkpoint_dir is None:
        return None
    run_options = {k: v for k, v in asdict(options).items() if k in ("ctx", "chunks", "skip_chunks")}
    key = {"kind": options.kind, "model": model_fingerprint(model.reader),
           "tokens": hashlib.sha256(chunks.astype("<i8").tobytes()).hexdigest(),
           "options": {**run_options, "kv_f16": model.kv_f16, "act_quant": model.act_quant,
                       "simulate": _simulation_key(model), **key_json(extra_key or {})},
           "observers": [o.key() for o in observers], **versions()}
    return CheckpointStore(options.checkpoint_dir, key, log)


def _simulation_key(model: Model) -> dict[str, Any] | None:
    """How the model's linears are simulated (engine/w8a8.py), with a digest of static maxima."""
    sim = getattr(model, "simulate", None)
    if sim is None:
        return None
    maxima = sorted((sim.act_max or {}).items())
    return {"mode": sim.mode, "act_max": hashlib.sha256(repr(maxima).encode()).hexdigest(), "keep": sorted(sim.keep)}


def _resume(store: CheckpointStore, hidden: np.ndarray, observers: list[Observer],
            log: Callable[[str], None]) -> int:
    """Load the later hidden-state unit whose layers all have their statistics; the first layer to run."""
    saved = [(int(d["layer"]), d) for u in ("hidden-0", "hidden-1")
             if (p := store.get(u)) is not None for d in [read_npz(p)]]
    for layer_done, data in sorted(saved, key=lambda t: -t[0]):
        stats = [store.get(f"stats-{il}") for il in range(layer_done + 1)]
        if data["hidden"].shape == hidden.shape and all(p is not None for p in stats):
            hidden[...] = data["hidden"]
            for o in observers:
                prefix = f"carry/{o.name}/"
                carried = {k[len(prefix):]: v for k, v in data.items() if k.startswith(prefix)}
                if carried:
                    o.load_carry_state(carried)
            for il, p in enumerate(stats):
                state = read_npz(p)
                for o in observers:
                    prefix = o.name + "/"
                    o.load_layer_state(il, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
            log(f"resuming after layer {layer_done} from {store.dir}")
            return layer_done + 1
    return 0


def _save_layer(store: CheckpointStore, il: int, hidden: np.ndarray, observers: list[Observer]) -> None:
    state = {f"{o.name}/{k}": v for o in observers for k, v in o.layer_state(il).items()}
    with store.put(f"stats-{il}") as fh:
        fh.write(npz_bytes(**state))
    carry = {f"carry/{o.name}/{k}": v for o in observers for k, v in o.carry_state().items()}
    with store.put(f"hidden-{il % 2}") as fh:
        fh.write(npz_bytes(layer=np.array(il), hidden=np.asarray(hidden), **carry))


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def read_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


