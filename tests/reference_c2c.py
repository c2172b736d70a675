"""Independent NumPy implementation of the C2C formulas (docs/upstream_reference.md §1), on upstream state dicts."""

import numpy as np
from scipy.special import erf


def ref_linear(x, sd, name):
    y = x @ sd[f"{name}.weight"].T
    return y + sd[f"{name}.bias"] if f"{name}.bias" in sd else y


def ref_ffn(x, sd, name):
    normed = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-6) * sd[f"{name}.norm.weight"]
    hidden = normed @ sd[f"{name}.w1.weight"].T
    gelu = 0.5 * hidden * (1 + erf(hidden / np.sqrt(2)))
    return x + gelu @ sd[f"{name}.w2.weight"].T


def ref_branch(sd, b, sharer, receiver, level, heads, uniform=None, temperature=None):
    """One branch of one projector. sharer [B,S,Hs*Ds], receiver [B,S,Ht*Dt] -> [B,S,Ht*Dt]."""
    x = sharer if level == 3 else np.concatenate([sharer, receiver], -1)
    a = ref_ffn(ref_linear(x, sd, f"{b}_in"), sd, f"{b}_mlp1.blocks.0")
    p = a
    j = 0
    while f"{b}_proj_mlp2.blocks.{j}.w1.weight" in sd:
        p = ref_ffn(p, sd, f"{b}_proj_mlp2.blocks.{j}")
        j += 1
    proj = ref_linear(p, sd, f"{b}_proj_out").reshape(*p.shape[:2], heads, -1)
    if level in (0, 4):
        alpha = 1 / (1 + np.exp(-ref_linear(ref_ffn(a, sd, f"{b}_scalar_mlp2.blocks.0"), sd, f"{b}_scalar_head")))
        alpha = alpha[..., None]
    else:
        alpha = 1.0
    if level in (0, 1):
        logit = sd[f"{b}_gate_logit"]
        if uniform is None:
            gate = float(logit > 0)
        else:
            g = -np.log(-np.log(uniform + 1e-20) + 1e-20)
            gate = 1 / (1 + np.exp(-(logit + g) / temperature))
    else:
        gate = 1.0
    delta = (gate * alpha * proj).reshape(receiver.shape)
    return delta if level == 3 else receiver + delta


def reference_fuse(dicts, layer_map, sharer_k, sharer_v, receiver_k, receiver_v, fuse_mask, level=0,
                   uniform=None, temperature=None):
    """Caches in our layout [layers, B, S, heads, head_dim]; returns fused receiver K and V."""
    flat = lambda x: np.asarray(x).reshape(*x.shape[:2], -1)  # noqa: E731  [B,S,H,D] -> [B,S,H*D]
    heads = np.asarray(receiver_k).shape[3]
    outputs = []
    for b, (branch, src, dst) in enumerate((("key", sharer_k, receiver_k), ("value", sharer_v, receiver_v))):
        out = np.array(dst)
        for t, s in enumerate(layer_map):
            u = None if uniform is None else uniform[t, b]
            fused = ref_branch(dicts[t], branch, flat(src[s]), flat(dst[t]), level, heads, u, temperature)
            out[t] = np.where(fuse_mask[:, :, None, None], fused.reshape(out[t].shape), out[t])
        outputs.append(out)
    return outputs
