"""Fusion controls: what the fuser reads in place of the real sharer cache, in evaluation and training.

A fuser can raise a receiver's score without using anything the sharer computed: any trained adapter
on the receiver's own cache may fix a format habit (always answering "A", say). The controls feed the
*same* fuser inputs that carry no information about the prompt, so a real gain shows up as C2C beating
them, not just the receiver alone:

    real        the sharer's own cache (no control)
    zeros       the sharer's K and V replaced by zeros
    noise       Gaussian noise with the cache's mean and variance per layer, row and KV head (over the
                row's real columns and the head dimension): the scale is kept, the content is not
    mismatched  each row reads the cache of another row of the batch (`donor_rows`, a derangement of the
                batch's rows); columns the donor has no token in read zeros

`substitute_sharer_cache` is the one place that builds these inputs, and `fuser_sharer_caches` the one
place that chooses them: evaluation's control methods (`FusionControl`, through `C2CModel.prompt_cache`)
and training with `fuser.sharer_input` (the trained control: the same recipe with the sharer withheld)
both call it. A fuser records the sharer input it was
trained on (`FuserConfig.sharer_input`) and receives the same input at inference unless a control says
otherwise.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from c2c_jax.models.kv_cache import KVCache

SHARER_INPUTS = ("real", "zeros", "noise", "mismatched")
#: Sharer inputs a fuser can be trained on (a mismatched cache needs a second prompt in every batch).
TRAINED_SHARER_INPUTS = ("real", "zeros", "noise")


def check_sharer_input(sharer_input: str, *, trained: bool = False) -> None:
    valid = TRAINED_SHARER_INPUTS if trained else SHARER_INPUTS
    if sharer_input not in valid:
        raise ValueError(f"unknown sharer input {sharer_input!r}; choose one of {', '.join(valid)}")


def zeros_like(x: jax.Array) -> jax.Array:
    """Zeros that XLA does not constant-fold: folding the fuser's per-layer gather of a zero cache took
    XLA's constant folder seconds per program (SmolLM2, CPU)."""
    return jax.lax.optimization_barrier(jnp.zeros_like(x))


def _moments(x: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """float32 mean and variance of x [L, B, S, H, D] per (layer, row, head), over valid columns and D."""
    x = x.astype(jnp.float32)
    weight = valid.astype(jnp.float32)[None, :, :, None, None]
    count = jnp.maximum(weight.sum(axis=2, keepdims=True) * x.shape[-1], 1.0)
    mean = (x * weight).sum(axis=(2, 4), keepdims=True) / count
    var = (jnp.square(x - mean) * weight).sum(axis=(2, 4), keepdims=True) / count
    return mean, var


def substitute_sharer_cache(cache: KVCache, sharer_input: str, *, key: jax.Array | None = None,
                            donor_rows: jax.Array | None = None) -> KVCache:
    """The sharer cache the fuser reads under `sharer_input` (see the module docstring). Pure.

    key: PRNG key, for "noise". donor_rows: int32 [B], for "mismatched": row b reads row donor_rows[b].
    `valid` describes the K/V returned (the donor's columns for "mismatched"); `end` is unchanged.
    """
    check_sharer_input(sharer_input)
    if sharer_input == "real":
        return cache
    if sharer_input == "zeros":
        return dataclasses.replace(cache, k=zeros_like(cache.k), v=zeros_like(cache.v))
    if sharer_input == "noise":
        if key is None:
            raise ValueError("sharer input 'noise' needs a PRNG key")
        keys = jax.random.split(key)

        def matched(x, k):
            mean, var = _moments(x, cache.valid)
            sample = mean + jnp.sqrt(var) * jax.random.normal(k, x.shape, jnp.float32)
            return jnp.where(cache.valid[None, :, :, None, None], sample, 0.0).astype(x.dtype)

        return dataclasses.replace(cache, k=matched(cache.k, keys[0]), v=matched(cache.v, keys[1]))
    # mismatched
    if donor_rows is None:
        raise ValueError("sharer input 'mismatched' needs donor_rows (which row each row reads)")
    valid = cache.valid[donor_rows]

    def donor(x):
        return jnp.where(valid[None, :, :, None, None], x[:, donor_rows], jnp.zeros((), x.dtype))

    return dataclasses.replace(cache, k=donor(cache.k), v=donor(cache.v), valid=valid)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FusionControl:
    """An evaluation control for one fused prefill: what every fuser reads instead of the real inputs.

    sharer_input: one of SHARER_INPUTS, applied to every sharer's cache (`substitute_sharer_cache`).
    receiver_input: False withholds the receiver's K/V from the projectors' input (they read zeros in
      its place) while the residual still goes onto the receiver's cache: the sharer-only projection.
    key / donor_rows: the randomness for "noise", the derangement for "mismatched".
    """

    sharer_input: str = dataclasses.field(default="real", metadata=dict(static=True))
    receiver_input: bool = dataclasses.field(default=True, metadata=dict(static=True))
    key: jax.Array | None = None
    donor_rows: jax.Array | None = None

    def __post_init__(self):
        check_sharer_input(self.sharer_input)

    def sharer_cache(self, cache: KVCache, index: int) -> KVCache:
        """`cache` (of sharer `index`) as this control feeds it to its fuser."""
        key = None if self.key is None else jax.random.fold_in(self.key, index)
        return substitute_sharer_cache(cache, self.sharer_input, key=key, donor_rows=self.donor_rows)


def fuser_sharer_caches(caches, trained_inputs, *, control: FusionControl | None = None,
                        key: jax.Array) -> list[KVCache]:
    """What each fuser reads as its sharer's cache, in inference and training alike: `control`'s
    input, or else the one the fuser was trained on (`trained_inputs[i]`, its
    `FuserConfig.sharer_input`). key: the randomness of a trained "noise" input."""
    if control is None:
        return [c if trained == "real" else FusionControl(trained, key=key).sharer_cache(c, i)
                for i, (c, trained) in enumerate(zip(caches, trained_inputs))]
    return [control.sharer_cache(c, i) for i, c in enumerate(caches)]


#: The evaluation methods that run the C2C route under a control, and the control each applies.
CONTROL_METHODS = {
    "c2c_mismatched": FusionControl("mismatched"),
    "c2c_zero": FusionControl("zeros"),
    "c2c_noise": FusionControl("noise"),
    "c2c_no_receiver_input": FusionControl("real", receiver_input=False),
}

#: The controls that withhold the sharer's content: C2C's gain is the sharer's only where it beats these.
#: `c2c_no_receiver_input` keeps the sharer's cache (it withholds the receiver's own from the
#: projectors), so it measures what the fuser takes from the receiver, not whether the sharer helps.
SHARER_CONTROLS = tuple(m for m, control in CONTROL_METHODS.items() if control.sharer_input != "real")
