"""Super weights of the real model (Gemma 3 270M, its F32 base) on 4 chunks of Genesis: the one
the issue measured, blk.0.ffn_down[400, 1405], is found from activations and confirmed by its
effect, not by its size (it ranks ~189th by magnitude in its tensor); the residual stream's massive
channels are 400 after layer 0 and 163 from layer 3, at the BOS token."""

from __future__ import annotations

import numpy as np
import pytest

from quantcli.calibrate import imatrix as calib
from quantcli.formats import open_model
from tests.conftest import DATA


@pytest.fixture(scope="module")
def found(real_f32):
    result = calib.compute(real_f32, (DATA / "engine" / "genesis.txt").read_text(),
                           calib.ImatrixOptions(ctx=512, chunks=4, super_weights=True))
    return result.imatrix.outliers


def test_the_known_super_weight_is_found_and_confirmed(found, real_f32):
    top = found.confirmed[0]
    assert (top.tensor, top.row, top.col) == ("blk.0.ffn_down.weight", 400, 1405)
    assert top.effect > 0.05 and top.effect > 10 * abs(top.control)
    assert top.share > 0.95  # one product is the spike
    with open_model(real_f32) as r:
        w = r.load_f32("blk.0.ffn_down.weight")
    assert top.value == w[400, 1405]
    assert (np.abs(w) > abs(top.value)).sum() > 100  # magnitude would not find it
    # every confirmed one clears both thresholds; the rest were measured and did not
    for s in found.confirmed:
        assert abs(s.effect) >= 0.01 and abs(s.effect) >= 10 * abs(s.control)
    for s in found.candidates:
        assert abs(s.effect) < 0.01 or abs(s.effect) < 10 * abs(s.control)


def test_massive_activations_are_at_the_bos(found):
    first = {m.layer: m for m in found.massive if m.channel == 400}
    assert 0 in first and first[0].position == 0 and first[0].token == 2 and first[0].ratio > 1000
    later = [m for m in found.massive if m.channel == 163]
    assert later and min(m.layer for m in later) == 3 and max(abs(m.value) for m in later) > 5e4
