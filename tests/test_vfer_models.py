"""VFER heads: the paper's parameter counts, zero pre-padding invariance, shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fer_jax.models import vfer


def test_parameter_counts_match_the_paper():
    counts = vfer.count_heads(6)
    for name in ("f", "g", "v"):
        assert counts[name]["trainable"] == vfer.PAPER_COUNTS[name], name
    # "just over 211k parameters, from which 208K are trainable" (BN moving statistics).
    assert counts["v"]["total"] == 211_526
    plain = vfer.count_heads(6, v_kwargs={"norm": "none"})
    assert plain["v"]["trainable"] == 163_968 + 8_256 + 33_024 + 390


@pytest.mark.parametrize("norm", ["batch", "none"])
@pytest.mark.slow  # > 20 s on 2 cores: CI's slow step
def test_pre_padding_equals_unpadded_sequence(norm):
    head = vfer.VFERHead(4, dense=(8, 6), lstm=5, norm=norm)
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 7, 12))
    variables = head.init(jax.random.PRNGKey(1), x, jnp.ones((3, 7), bool), train=False)
    # Non-zero biases (and BN statistics): padded zeros would then move an unmasked LSTM.
    variables = jax.tree.map(lambda v: v + 0.3, variables)
    lengths = [7, 4, 1]
    padded = np.zeros_like(np.asarray(x))
    mask = np.zeros((3, 7), bool)
    for i, n in enumerate(lengths):
        padded[i, 7 - n:] = x[i, :n]
        mask[i, 7 - n:] = True
    out = head.apply(variables, padded, mask, train=False)
    for i, n in enumerate(lengths):
        ref = head.apply(variables, x[i:i + 1, :n], jnp.ones((1, n), bool), train=False)
        np.testing.assert_allclose(out[i], ref[0], rtol=1e-5, atol=1e-6)
    # Without skipping, the padded zeros do change the state (Keras without Masking).
    keras_like = vfer.VFERHead(4, dense=(8, 6), lstm=5, norm=norm, skip_padding=False)
    out2 = keras_like.apply(variables, padded, mask, train=False)
    assert not np.allclose(out2[1], out[1])


def test_ifer_head_shapes_and_bad_input():
    g = vfer.IFERHead(6, hidden=(16,))
    v = g.init(jax.random.PRNGKey(0), jnp.zeros((2, 10)), train=False)
    assert g.apply(v, jnp.zeros((5, 10)), train=False).shape == (5, 6)
    with pytest.raises(ValueError, match="features must be"):
        g.apply(v, jnp.zeros((5, 2, 10)), train=False)
    with pytest.raises(ValueError, match="features must be"):
        vfer.VFERHead(3).init(jax.random.PRNGKey(0), jnp.zeros((2, 10)), jnp.ones((2,)),
                              train=False)
