"""Multiple-choice task accuracy, scored as lm-evaluation-harness scores `acc` and `acc_norm`.

A task file is JSON Lines, one item per line: `{"context": str, "choices": [str, ...], "answer": int}`
(blank lines and lines starting with `#` are skipped). Each choice is scored by the model's
log-likelihood of it as a continuation of the context: the context and context+choice are
tokenized, the continuation is what the second adds (the context's trailing spaces go with the
choice, as the harness moves them), and its tokens' log-probabilities are summed. `acc` takes
the highest sum, `acc_norm` the highest sum divided by the choice's length in characters. Ties
go to the first choice.

The context is decoded once per item (`engine.generate`), and each choice continues a copy of its
cache, so an item of four choices costs one context and four short continuations; the output head
then runs once over every choice's positions together.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from quantcli.errors import InputError
from quantcli.inputs import read_small_text
from quantcli.progress import Progress, ProgressFn, progress_or_noop

MAX_TASK_BYTES = 64 << 20
HEAD_BLOCK = 256  # rows through the output head at a time (Gemma 3 270M: 0.5 GB of float64 logits)
SHIPPED = Path(__file__).resolve().parents[1] / "data" / "tasks" / "quantcli-mc.jsonl"


@dataclass(frozen=True)
class Item:
    context: str
    choices: tuple[str, ...]
    answer: int
    line: int


@dataclass(frozen=True)
class TaskScore:
    acc: float
    acc_norm: float
    items: int
    seconds: float
    picks: tuple[int, ...]  # acc_norm's choice per item

    def to_json(self) -> dict[str, Any]:
        return {"acc": round(self.acc, 4), "acc_norm": round(self.acc_norm, 4), "items": self.items,
                "seconds": round(self.seconds, 2)}


def load(path: Path) -> list[Item]:
    """The items of a task file; a mistake names the file and line."""
    path = Path(path)
    text = read_small_text(path, "task", limit=MAX_TASK_BYTES)
    items = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: not JSON: {exc.msg}") from None
        if not isinstance(obj, dict):
            raise InputError(f"{where}: an item is an object with context, choices and answer")
        missing = [k for k in ("context", "choices", "answer") if k not in obj]
        if missing:
            raise InputError(f"{where}: missing {', '.join(missing)}")
        ctx, choices, answer = obj["context"], obj["choices"], obj["answer"]
        if not isinstance(ctx, str) or not ctx.strip():
            raise InputError(f"{where}: context must be a non-empty string")
        if (not isinstance(choices, list) or len(choices) < 2
                or not all(isinstance(c, str) and c.strip() for c in choices)):
            raise InputError(f"{where}: choices must be a list of two or more non-empty strings")
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise InputError(f"{where}: answer {answer!r} is not an index of its {len(choices)} choices "
                             f"(0..{len(choices) - 1})")
        items.append(Item(ctx, tuple(choices), answer, n))
    if not items:
        raise InputError(f"{path}: no items (one JSON object per line: context, choices, answer)")
    return items


def split(tok: Any, context: str, choice: str) -> tuple[list[int], list[int]]:
    """The context's tokens and the continuation's, as the harness splits them."""
    stripped = context.rstrip(" ")
    moved = context[len(stripped):]
    whole = tok.encode(stripped + moved + choice)
    head = tok.encode(stripped)
    if whole[:len(head)] != head:  # the join re-tokenized the boundary: score from where they part
        k = next(i for i, (a, b) in enumerate(zip(whole, head)) if a != b)
        head = whole[:k]
    cont = whole[len(head):]
    return head, cont


def score(reader: Any, items: list[Item], tokenizer: Any = None, progress: ProgressFn | None = None,
          n_ctx: int = 4096) -> TaskScore:
    """acc and acc_norm of a model (an open reader) on the items."""
    from quantcli.engine.generate import Generator
    from quantcli.engine.model import Model
    from quantcli.engine.tokenizer import Tokenizer

    report = progress_or_noop(progress)
    t0 = time.perf_counter()
    tok = tokenizer or Tokenizer.from_model(reader)
    gen = Generator(Model(reader), n_ctx)
    # every choice's rows (row j predicts its continuation's token j) through the layers first, then
    # the head over all of them at once: its output rows are read once per block, not once per choice
    splits = []
    for item in items:
        for choice in item.choices:
            head, cont = split(tok, item.context, choice)
            if not cont:
                raise InputError(f"item at line {item.line}: choice {choice!r} adds no token to the context")
            if len(head) + len(cont) > n_ctx:
                raise InputError(f"item at line {item.line}: {len(head) + len(cont)} tokens do not fit a context "
                                 f"of {n_ctx}")
            splits.append((tuple(head), cont))
    heads = sorted({h for h, _ in splits})
    report(Progress("task", 1, 3, f"{len(heads)} contexts"))
    caches = {h: gen.new_caches() for h in heads}
    x = gen.hidden_batch([caches[h] for h in heads], [list(h) for h in heads])
    last = dict(zip(heads, x[np.cumsum([len(h) for h in heads]) - 1]))
    longer = [(h, cont) for h, cont in splits if len(cont) > 1]
    report(Progress("task", 2, 3, f"{len(splits)} choices"))
    forks = [[c.copy() for c in caches[h]] for h, _ in longer]
    y = gen.hidden_batch(forks, [cont[:-1] for _, cont in longer]) if longer else None
    ends = np.cumsum([0] + [len(cont) - 1 for _, cont in longer])
    rest = {k: y[ends[j]:ends[j + 1]] for j, k in enumerate(i for i, (_, c) in enumerate(splits) if len(c) > 1)}
    rows, targets, owner = [], [], []  # owner: (item, choice) of each row
    k = 0
    for i, item in enumerate(items):
        for c in range(len(item.choices)):
            h, cont = splits[k]
            rows.append(last[h][None])
            if k in rest:
                rows.append(rest[k])
            targets += cont
            owner += [(i, c)] * len(cont)
            k += 1
    report(Progress("task", 3, 3, "head"))
    x = np.concatenate(rows)
    targets_a = np.asarray(targets)
    logp = np.empty(len(targets_a))
    for r0 in range(0, len(x), HEAD_BLOCK):
        z = gen.head(x[r0:r0 + HEAD_BLOCK]).astype(np.float64)
        m = z.max(axis=1)
        lse = np.log(np.exp(z - m[:, None]).sum(axis=1)) + m
        logp[r0:r0 + len(z)] = z[np.arange(len(z)), targets_a[r0:r0 + HEAD_BLOCK]] - lse
    ll = [np.zeros(len(item.choices)) for item in items]
    for (i, c), v in zip(owner, logp):
        ll[i][c] += v
    right = right_norm = 0
    picks = []
    for item, l in zip(items, ll):
        norm = l / np.array([len(ch) for ch in item.choices])
        right += int(np.argmax(l)) == item.answer
        right_norm += int(np.argmax(norm)) == item.answer
        picks.append(int(np.argmax(norm)))
    n = len(items)
    return TaskScore(right / n, right_norm / n, n, time.perf_counter() - t0, tuple(picks))
