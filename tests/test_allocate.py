"""The automatic mix's pieces: sizes, the err -> dKLD model, and the exact knapsack against brute force."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from quantcli import allocate
from quantcli.allocate import Measurement, TensorMeasurement, parse_size, solve, solve_max_cost
from quantcli.errors import InputError, UsageError


@pytest.mark.parametrize("text,expected", [
    ("180MB", 180_000_000), ("172MiB", 172 * 2**20), ("4.5GB", 4_500_000_000), ("230552064", 230552064),
    ("1.5 GiB", int(1.5 * 2**30)), ("12kb", 12_000),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "MB", "12 parsecs", "-3MB", "0", "1e400GB"])
def test_parse_size_refuses(text):
    with pytest.raises(UsageError):
        parse_size(text)


def _brute(options, budget, unit=1):
    best = None
    for picks in itertools.product(*[range(len(o)) for o in options]):
        w = sum(-(-options[i][k][0] // unit) for i, k in enumerate(picks))
        if w > budget // unit:
            continue
        c = sum(options[i][k][1] for i, k in enumerate(picks))
        if best is None or c < best - 1e-12:
            best = c
    return best


@pytest.mark.parametrize("seed", range(40))
def test_solve_is_the_brute_force_optimum(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 6))
    options = []
    for _ in range(n):
        k = int(rng.integers(1, 5))
        sizes = sorted(int(x) for x in rng.integers(1, 60, k))
        costs = sorted((float(x) for x in rng.exponential(1.0, k)), reverse=True)  # bigger: better, mostly
        if rng.random() < 0.3:
            rng.shuffle(costs)
        options.append(list(zip(sizes, costs)))
    budget = int(rng.integers(1, sum(max(b for b, _ in o) for o in options) + 5))
    want = _brute(options, budget)
    got = solve(options, budget, unit=1)
    if want is None:
        assert got is None
        return
    assert got is not None
    assert got.bytes <= budget
    assert math.isclose(got.cost, want, rel_tol=1e-12, abs_tol=1e-12)
    assert got.bytes == sum(options[i][k][0] for i, k in enumerate(got.picks))


@pytest.mark.parametrize("seed", range(10))
def test_solve_with_coarse_units_never_exceeds_the_budget(seed):
    rng = np.random.default_rng(100 + seed)
    options = [[(int(b), float(c)) for b, c in zip(sorted(rng.integers(1000, 90000, 4)),
                                                     sorted(rng.exponential(1.0, 4), reverse=True))]
               for _ in range(5)]
    budget = int(sum(o[1][0] for o in options))
    for unit in (1, 7, 333):
        got = solve(options, budget, unit=unit)
        assert got is not None and got.bytes <= budget
        assert math.isclose(got.cost, _brute(options, budget, unit), rel_tol=1e-12)


@pytest.mark.parametrize("seed", range(20))
def test_solve_max_cost_is_the_smallest_mix_under_the_cost(seed):
    rng = np.random.default_rng(200 + seed)
    options = [[(int(b), float(c)) for b, c in zip(sorted(rng.integers(1, 40, 3)),
                                                     sorted(rng.exponential(1.0, 3), reverse=True))]
               for _ in range(int(rng.integers(1, 5)))]
    limit = float(sum(o[-1][1] for o in options) + rng.exponential(1.0))
    got = solve_max_cost(options, limit, unit=1)
    smallest = min(sum(options[i][k][0] for i, k in enumerate(p))
                   for p in itertools.product(*[range(len(o)) for o in options])
                   if sum(options[i][k][1] for i, k in enumerate(p)) <= limit)
    assert got is not None and got.cost <= limit and got.bytes == smallest
    assert solve_max_cost(options, min(o[-1][1] for o in options) * 0.0 - 1.0, unit=1) is None


def test_solve_infeasible_is_none():
    assert solve([[(10, 1.0), (20, 0.5)], [(10, 1.0)]], 19, unit=1) is None


def _tensor(kld, errors=None, act=None):
    errors = errors or {"Q2_K": 0.4, "Q4_0": 0.1, "Q8_0": 0.001}
    return TensorMeasurement("t", (4, 256), errors, act or {}, kld)


def test_estimate_passes_through_the_references_and_is_linear_below():
    t = _tensor({"Q4_0": 0.02, "Q2_K": 0.32})
    assert math.isclose(t.estimate("Q4_0"), 0.02)
    assert math.isclose(t.estimate("Q2_K"), 0.32)
    assert math.isclose(t.estimate("Q8_0"), 0.02 * 0.001 / 0.1)  # slope 1 below the lowest reference


def test_estimate_adds_the_activation_rounding():
    # the reference was measured with float activations; Q4_0 and Q8_0 both round inputs to Q8_0,
    # Q2_K to Q8_K, whose effect was measured on its own
    t = _tensor({"Q4_0": 0.02}, act={"Q8_0": 0.01, "Q8_K": 0.05})
    t.act_kld = {"Q8_K": 0.003}
    t.act_scale = {"Q8_0": 0.5}
    assert math.isclose(t.estimate("Q4_0"), 0.02 + 0.5 * 0.2 * 0.01)  # slope 0.02 / 0.1
    assert math.isclose(t.estimate("Q8_0"), 0.02 * 0.001 / 0.1 + 0.5 * 0.2 * 0.01)
    assert math.isclose(t.estimate("Q2_K"), 0.02 * 0.4 / 0.1 + 0.003)


def test_act_scale_is_what_the_all_rounded_stream_leaves_for_the_unmeasured_tensors():
    a = TensorMeasurement("a", (4, 256), {"Q4_0": 0.1}, {"Q8_0": 0.01}, {"Q4_0": 0.02})
    b = TensorMeasurement("b", (4, 256), {"Q4_0": 0.1}, {"Q8_0": 0.03}, {"Q4_0": 0.01}, {"Q8_0": 0.001})
    m = Measurement({}, None, {}, ["Q4_0"], ["Q4_0"], {"a": a, "b": b}, act_kld={"Q8_0": 0.005})
    assert math.isclose(m.act_scale()["Q8_0"], (0.005 - 0.001) / (0.2 * 0.01))
    assert math.isclose(m.estimate("a", "Q4_0"), 0.02 + (0.004 / 0.002) * 0.2 * 0.01)
    assert math.isclose(m.estimate("b", "Q4_0"), 0.01 + 0.001)


def test_estimate_above_the_references_uses_their_slope_clamped():
    t = _tensor({"Q4_0": 0.01, "Q8_0": 0.0001}, errors={"Q2_K": 1.0, "Q4_0": 0.1, "Q8_0": 0.01})
    assert math.isclose(t.estimate("Q8_0"), 0.0001) and math.isclose(t.estimate("Q4_0"), 0.01)
    # slope between the references is 2 (0.0001 -> 0.01 over 0.01 -> 0.1): Q2_K is one decade higher
    assert math.isclose(t.estimate("Q2_K"), 0.01 * 10 ** 2)


def _measurement(tmp_path, **changes):
    m = Measurement({"file": "m.gguf", "fingerprint": "abc"}, "imhash", {"chunks": 2, "ctx": 512},
                    ["Q4_0", "Q8_0"], ["Q4_0"],
                    {"t": TensorMeasurement("t", (4, 32), {"Q4_0": 0.1, "Q8_0": 0.001}, {"Q8_0": 1e-4},
                                            {"Q4_0": 0.01})})
    for k, v in changes.items():
        setattr(m, k, v)
    path = tmp_path / "m.json"
    path.write_bytes(m.dumps())
    return m, path


def test_measurement_round_trips_and_hashes_its_bytes(tmp_path):
    import hashlib

    m, path = _measurement(tmp_path)
    back = Measurement.load(path)
    assert back.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() == m.sha256
    assert back.tensors["t"] == m.tensors["t"]
    assert back.estimate("t", "Q8_0") == m.estimate("t", "Q8_0")


def test_measurement_of_another_model_or_imatrix_is_refused(tmp_path):
    m, path = _measurement(tmp_path)
    with pytest.raises(InputError, match="another model"):
        m.check(path, "other", "imhash")
    with pytest.raises(InputError, match="another importance matrix"):
        m.check(path, "abc", "otherhash")
    m.check(path, "abc", "imhash")


@pytest.mark.parametrize("mangle", [
    lambda d: d.update(schema="something/1"),
    lambda d: d["tensors"]["t"]["errors"].update(Q4_0="NaN"),
    lambda d: d["tensors"]["t"]["kld"].update(Q4_0=-1),
    lambda d: d.pop("tensors"),
])
def test_bad_measurement_files_are_one_line_errors(tmp_path, mangle):
    _, path = _measurement(tmp_path)
    doc = json.loads(path.read_text())
    mangle(doc)
    path.write_text(json.dumps(doc))
    with pytest.raises(InputError, match="not a valid measurement file"):
        Measurement.load(path)
    path.write_bytes(b"\x00\x01garbage")
    with pytest.raises(InputError, match="not a valid measurement file"):
        Measurement.load(path)


def test_infeasible_target_has_its_own_exit_code():
    assert allocate.InfeasibleTarget("x").exit_code == 7
