"""The one-token decode step (titans.ops.step) against the reference loop, token by token."""

from __future__ import annotations

import pytest
import torch

from titans.ops import memory_rule, memory_step, owned_state

from .test_memory_rule import make_inputs, rel


@pytest.mark.parametrize("depth,residual", [(1, False), (2, False), (2, True), (3, False)])
@pytest.mark.parametrize("activation", ["silu", "gelu", "tanh"])
@pytest.mark.parametrize("normalize_step", [False, True])
def test_step_equals_the_reference_loop_token_by_token(depth, residual, activation, normalize_step):
    (q, k, v, theta, eta, alpha), weights = make_inputs(T=21, depth=depth, theta_max=0.5 if normalize_step else 0.1)
    kw = dict(chunk_size=4, activation=activation, residual=residual, normalize_step=normalize_step)
    start = 6   # a prefill that ends inside a chunk: the step must resume at its chunk-start weights
    _, ref_state = memory_rule(*(x[:, :start] for x in (q, k, v, theta, eta, alpha)), weights, impl="ref", **kw)
    state = owned_state(ref_state, weights, q.shape[0])
    for t in range(start, q.shape[1]):
        y_ref, ref_state = memory_rule(*(x[:, t:t + 1] for x in (q, k, v, theta, eta, alpha)), weights,
                                       impl="ref", state=ref_state, **kw)
        y, state = memory_step(q[:, t], k[:, t], v[:, t], theta[:, t], eta[:, t], alpha[:, t], state, **kw)
        assert rel(y, y_ref[:, 0]) < 1e-10, t
        assert state.position == ref_state.position
        for field in ("weights", "momentum", "chunk_start"):
            for a, b in zip(getattr(state, field), getattr(ref_state, field)):
                assert rel(a, b) < 1e-10, (t, field)


def test_owned_state_never_writes_into_its_source():
    (q, k, v, theta, eta, alpha), weights = make_inputs(T=1, depth=2)
    before = [w.clone() for w in weights]
    state = owned_state(None, weights, q.shape[0])   # W_0: a broadcast view of the weights
    memory_step(q[:, 0], k[:, 0], v[:, 0], theta[:, 0], eta[:, 0], alpha[:, 0], state, chunk_size=4)
    assert all(torch.equal(a, b) for a, b in zip(weights, before))
    assert not torch.equal(state.weights[0][0], before[0])   # and the step did write
