"""Weighted sums of squared per-sample gradients, from layer inputs and output gradients (the Fisher's hooks).

For a batch of ``B`` samples and ``S`` class slots per sample, the Fisher needs, for every parameter entry ``j``::

    sum_s sum_b w[s, b] * G[s, b, j]^2,    G[s, b] = d (c_s[b] . logits(x_b)) / dw   (one sample's gradient)

with ``c_s[b]`` the slot's cotangent on the logits. One backward pass per slot over the whole batch gives the
gradient of every layer's output for every sample at once (samples are independent in eval mode), and each
layer's per-sample parameter gradient is a small function of its input and that output gradient, as in Opacus'
``GradSampleModule`` and BackPACK:

* Linear / convolution (``l`` runs over the positions: tokens, output pixels; ``x`` is the input, unfolded for
  a convolution): ``G[s, b] = sum_l g[s, b, l] x[b, l]^T``. With few positions the squares are summed without
  forming ``G``: ``sum_s w G[o, i]^2 = sum_{l, l'} x[l, i] x[l', i] * sum_s w g[s, l, o] g[s, l', o]``, one
  matrix product over ``(b, l <= l')`` pairs (its pair matrix by a compiled kernel with ``compile=True``:
  :mod:`hf_sp._compiled_pairs`); otherwise ``G`` is formed in blocks, squared and summed (a convolution's by
  chunks of samples whose input is unfolded, every slot's rows stacked into one product per sample and group).
* norms (BatchNorm in eval mode, LayerNorm, GroupNorm): ``G_weight = sum_l g[l] * x_hat[l]``,
  ``G_bias = sum_l g[l]`` with ``x_hat`` the normalized input.
* embeddings: ``G[v] = sum_{l: id_l = v} g[l]`` (rows summed per sample before squaring).

A rule gets each call's output gradients as one ``[S, B, ...]`` tensor (as the batched backward pass returns them).
A module called several times in one forward contributes the positions of every call to the same sum.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F

from . import _compiled_pairs as compiled_pairs

#: Floats per intermediate block: 16 MiB of fp32. Blocks this small are reused by the allocator; blocks of 64 MiB
#: were mapped and faulted in afresh each time, which made the largest layers several times slower.
BLOCK = 1 << 22

#: Up to this many slots the pair matrix is summed slot by slot and row by row (one op each); beyond, by one
#: batched matrix product per sample and channel (fewer ops, but a transposing copy of the gradients first).
ROW_SLOTS = 16

#: Materialize per-sample gradients instead of summing position pairs when pairs cost more than this many
#: positions per slot (the extra passes over the materialized gradients are counted as these positions).
_MATERIALIZE_PASSES = 8


_WORKSPACE = threading.local()


@contextmanager
def workspace(compiled: bool = False) -> Iterator[None]:
    """Scratch memory shared by the rules called inside: first touches of fresh allocations of megabytes are page
    faults, which cost as much as the products written into them. ``compiled``: position pairs are multiplied by
    the kernel of :mod:`hf_sp._compiled_pairs` (for up to ``ROW_SLOTS`` slots)."""
    _WORKSPACE.buffers, _WORKSPACE.compiled = {}, compiled
    try:
        yield
    finally:
        _WORKSPACE.buffers, _WORKSPACE.compiled = None, False


def _scratch(key: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """An uninitialized ``shape`` tensor (``like``'s dtype and device), from the :func:`workspace` if one is open."""
    buffers = getattr(_WORKSPACE, "buffers", None)
    if buffers is None:
        return like.new_empty(shape)
    numel = _numel(shape)
    slot = (key, like.dtype, like.device)
    if slot not in buffers or buffers[slot].numel() < numel:
        buffers[slot] = like.new_empty(numel)
    return buffers[slot][:numel].view(shape)


def _outer_sq(x: torch.Tensor, g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``sum_{s,b} w[s,b] * (sum_l g[s,b,l,:,:, None] * x[b,l,:,None,:])^2``: ``x [B, L, Gr, I]``,
    ``g [S, B, L, Gr, O]``, ``w [S, B]`` -> ``[Gr, O, I]`` (``Gr`` groups of a grouped convolution)."""
    num_slots, batch, length, groups, out_f = g.shape
    in_f = x.shape[-1]
    if length == 1:
        a = torch.einsum("sbgo,sb->bgo", g[:, :, 0].square(), w)
        return torch.einsum("bgo,bgi->goi", a, x[:, 0].square())
    if not _materialize(num_slots, length):
        return _outer_sq_pairs(x, g, w)
    # G[s, b] one slot at a time, in blocks of samples: [n, Gr, O, I], squared in place and summed with the weights.
    result = x.new_zeros(groups, out_f, in_f)
    step = max(1, BLOCK // max(1, groups * out_f * in_f))
    for s in range(num_slots):
        for b0 in range(0, batch, step):
            sl = slice(b0, b0 + step)
            per_sample = torch.einsum("blgo,blgi->bgoi", g[s, sl], x[sl])
            result += torch.einsum("b,bgoi->goi", w[s, sl], per_sample.square_())
    return result


def _outer_sq_pairs(x: torch.Tensor, g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """:func:`_outer_sq` by position pairs ``l <= l'``:
    ``sum_{b, l <= l'} M[b, (l, l'), o] * f * x[b, l, i] x[b, l', i]`` with ``M[b, (l, l')] = sum_s w[s, b] g[s, b, l] g[s, b, l']`` and ``f = 2`` off the diagonal.

    ``M`` and the input products (:func:`_pair_products`, or the compiled kernel of :mod:`hf_sp._compiled_pairs`
    inside ``workspace(compiled=True)``) enter one matrix product per group over the ``(b, pair)`` dimension.
    """
    num_slots, batch, length, groups, out_f = g.shape
    in_f = x.shape[-1]
    # row-major: row l holds pairs (l, l..L-1); each index its own tensor (a view of one [2, P] tensor would tie
    # its size 2 to the compiled kernel's sizes)
    li, lj = (t.clone() for t in torch.triu_indices(length, length, device=x.device))
    pairs = li.shape[0]
    result = x.new_zeros(groups, out_f, in_f)
    step = max(1, BLOCK // max(1, pairs * groups * max(out_f, in_f)))
    compiled = num_slots <= ROW_SLOTS and getattr(_WORKSPACE, "compiled", False)
    unweighted = bool((w == 1).all())  # the exact Fisher's slots: the gradients as they are
    for b0 in range(0, batch, step):
        sl = slice(b0, b0 + step)
        n = x[sl].shape[0]
        products = None
        if compiled:
            scaled = g[:, sl] if unweighted else g[:, sl] * w[:, sl].sqrt()[:, :, None, None, None]
            # in the inputs' dtype, as the eager products are (under autocast the gradients may be in another)
            products = compiled_pairs.run(
                scaled.to(x.dtype).reshape(num_slots, n, length, groups * out_f), x[sl].reshape(n, length, -1), li, lj
            )
        gram, xx = products if products is not None else _pair_products(x[sl], g[:, sl], w[:, sl], li, lj)
        result.baddbmm_(
            gram.view(n * pairs, groups, out_f).permute(1, 2, 0), xx.view(n * pairs, groups, in_f).transpose(0, 1)
        )
    return result


def _pair_products(
    x: torch.Tensor, g: torch.Tensor, w: torch.Tensor, li: torch.Tensor, lj: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``M [n, P, Gr, O]`` and ``f * x[l] x[l'] [n, P, Gr, I]`` of :func:`_outer_sq_pairs` for the pairs
    ``(li, lj)`` (row-major), eagerly: row by row (``l`` fixed, ``l' >= l``) with the channels innermost, as the
    backward passes lay them out, one op per slot and row (``M`` by batched ``[L, S] @ [S, L]`` products instead
    when there are more than ``ROW_SLOTS`` slots)."""
    num_slots, n, length, groups, out_f = g.shape
    pairs = li.shape[0]
    starts = [row * length - row * (row - 1) // 2 for row in range(length + 1)]
    scaled = g  # contiguous, channels innermost (a convolution's gradient comes channel-major)
    if not (bool((w == 1).all()) and scaled.is_contiguous()):
        roots = w.sqrt()[:, :, None, None, None]
        scaled = torch.mul(scaled, roots, out=_scratch("slots", (num_slots, n, length, groups, out_f), g))
    gram = _scratch("gram", (n, pairs, groups, out_f), x)
    xx = _scratch("inputs", (n, pairs, groups, x.shape[-1]), x)
    by_rows = num_slots <= ROW_SLOTS
    if not by_rows:  # one small product per (sample, channel): [L, S] @ [S, L]
        cols = scaled.permute(1, 3, 4, 2, 0).reshape(n * groups * out_f, length, num_slots)
        full = torch.bmm(cols, cols.transpose(1, 2)).view(n, groups, out_f, length * length)
        gram.copy_(full.index_select(3, li * length + lj).permute(0, 3, 1, 2))
    for row in range(length):
        if by_rows:
            block = gram[:, starts[row] : starts[row + 1]]
            torch.mul(scaled[0, :, row : row + 1], scaled[0, :, row:], out=block)
            for s in range(1, num_slots):
                block.addcmul_(scaled[s, :, row : row + 1], scaled[s, :, row:])
        torch.mul(x[:, row : row + 1], x[:, row:], out=xx[:, starts[row] : starts[row + 1]])
    xx.mul_(torch.where(li == lj, 1.0, 2.0).to(x.dtype)[:, None, None])
    return gram, xx


def _diag_sq(g: torch.Tensor, w: torch.Tensor, x: torch.Tensor | None = None, dim: int = -2) -> torch.Tensor:
    """``sum_{s,b} w[s,b] * (sum_l g[s,b,...,l,...] * x[b,...,l,...])^2`` (``x = 1`` if ``None``): ``g [S, B, L, C]``
    (positions along ``dim``, a negative index; ``[S, B, C, L]`` with ``dim=-1``) -> ``[C]``. Products with ``x`` are
    formed a few slots at a time (at most ``BLOCK`` floats)."""
    if x is None:
        return torch.einsum("sbc,sb->c", g.sum(dim).square_(), w)
    total = None
    step = max(1, BLOCK // max(1, g[0].numel()))
    for s0 in range(0, g.shape[0], step):
        part = torch.einsum("sbc,sb->c", (g[s0 : s0 + step] * x).sum(dim).square_(), w[s0 : s0 + step])
        total = part if total is None else total + part
    return total


# ----------------------------------------------------------------------------------------------------------
# Rules: (module, inputs of each call, output gradients of each call [S, B, ...], weights [S, B]) -> squares


def _cat_calls(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim)


def _linear(m: nn.Linear, inputs, grads, w):
    x = _cat_calls([i.reshape(i.shape[0], -1, 1, i.shape[-1]) for i in inputs], 1)
    g = _cat_calls([o.reshape(o.shape[0], o.shape[1], -1, 1, o.shape[-1]) for o in grads], 2)
    out = {"weight": _outer_sq(x, g, w)[0]}
    if m.bias is not None:
        out["bias"] = _diag_sq(g[..., 0, :], w)
    return out


def _conv_supported(m: nn.Module) -> bool:
    return m.padding_mode == "zeros"


def _conv_padding(m: nn.Conv1d | nn.Conv2d) -> list[tuple[int, int]]:
    """Zeros before and after each spatial dimension, as the convolution pads: ``padding="same"`` puts
    ``total // 2`` of ``total = dilation * (kernel - 1)`` before, the rest after; ``"valid"`` none."""
    if m.padding == "valid":
        return [(0, 0)] * len(m.kernel_size)
    if m.padding == "same":
        return [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for d, k in zip(m.dilation, m.kernel_size, strict=True)]
    return [(p, p) for p in m.padding]


def _conv(m: nn.Conv1d | nn.Conv2d, inputs, grads, w):
    two_d = isinstance(m, nn.Conv2d)

    def pair(v):
        return tuple(v) if two_d else (1, v[0])

    groups, c_out = m.groups, m.out_channels
    padding = _conv_padding(m)
    symmetric = all(before == after for before, after in padding)
    befores = [before for before, _ in padding] if symmetric else [0] * len(padding)
    pad = tuple(befores) if two_d else (0, befores[0])
    padded = []  # [B, C, H, W] (a Conv1d's with H = 1), padded here where the padding is uneven
    for i in inputs:
        if not symmetric:  # F.pad's order: the last dimension first
            i = F.pad(i, [n for before_after in reversed(padding) for n in before_after])
        padded.append(i if two_d else i.unsqueeze(2))
    flat = _cat_calls([o.reshape(o.shape[0], o.shape[1], c_out, -1) for o in grads], -1)  # [S, B, C, L]

    def unfold(i: torch.Tensor) -> torch.Tensor:  # [n, Gr * I, L]
        return F.unfold(i, pair(m.kernel_size), dilation=pair(m.dilation), padding=pad, stride=pair(m.stride))

    if _materialize(flat.shape[0], flat.shape[-1]):
        in_f = m.in_channels // groups * math.prod(m.kernel_size)
        weight = _conv_formed_sq(padded, flat, w, groups, in_f, unfold)
    else:
        xs = []
        for i in padded:
            cols = unfold(i)
            xs.append(cols.transpose(1, 2).reshape(i.shape[0], cols.shape[-1], groups, -1))  # [B, L, Gr, I]
        g = flat.view(*flat.shape[:2], groups, c_out // groups, -1).permute(0, 1, 4, 2, 3)  # [S, B, L, Gr, O]
        weight = _outer_sq(_cat_calls(xs, 1), g, w)
    out = {"weight": weight.reshape(m.weight.shape)}
    if m.bias is not None:
        out["bias"] = _diag_sq(flat, w, dim=-1)
    return out


def _conv_formed_sq(
    inputs: list[torch.Tensor], flat: torch.Tensor, w: torch.Tensor, groups: int, in_f: int, unfold: Callable
) -> torch.Tensor:
    """``sum_{s,b} w[s,b] * G[s,b]^2`` for a convolution, with ``G[s,b] = g[s,b] @ cols[b]^T`` formed per group
    (``inputs`` ``[B, C, H, W]``, one per call; ``flat`` ``[S, B, C_out, L]``, the calls' positions one after the
    other; ``unfold(i)`` ``[n, Gr * I, L_call]``, ``I = in_f``): a chunk of samples at a time, its input unfolded,
    by one batched matrix product with every slot's rows stacked, ``[n * Gr, S * O, L] @ [n * Gr, L, I]``, the rows
    scaled by ``sqrt(w[s,b])`` so that the squares need only be summed. The calls' positions add up in the product,
    as one sample's gradient does. -> ``[Gr, O, I]``.

    Stacking the slots makes the products as tall as ``S * O`` rows, where one product per slot has ``O`` (and
    the convolution's own weight-gradient kernel, one sample at a time, zero-fills its output and unfolds the
    sample again for each call): ``results/benchmark/HISTORY.md``.
    """
    num_slots, batch, c_out, length = flat.shape
    per_group = c_out // groups
    unweighted = bool((w == 1).all())
    roots = w.sqrt().to(flat.dtype).T[:, None, :, None, None]  # [B, 1, S, 1, 1]
    # the unfolded inputs, the stacked rows and the products of one chunk each fit in BLOCK
    step = max(1, BLOCK // max(1, groups * max(num_slots * per_group * max(length, in_f), length * in_f)))
    result = flat.new_zeros(groups, per_group, in_f)
    for b0 in range(0, batch, step):
        sl = slice(b0, b0 + step)
        cols = _cat_calls([unfold(i[sl]) for i in inputs], -1)
        n = cols.shape[0]
        g = flat[:, sl].view(num_slots, n, groups, per_group, length).permute(1, 2, 0, 3, 4)  # [n, Gr, S, O, L]
        rows = _scratch("rows", (n, groups, num_slots, per_group, length), flat)
        if unweighted:
            rows.copy_(g)
        else:
            torch.mul(g, roots[sl], out=rows)
        products = torch.bmm(
            rows.view(n * groups, num_slots * per_group, length), cols.view(n * groups, in_f, length).transpose(1, 2)
        )
        result += products.view(n, groups, num_slots, per_group, in_f).square_().sum((0, 2))
    return result


def pair_positions(rule: Rule | None, outputs: list[torch.Tensor]) -> int:
    """The positions of one sample over which ``rule`` forms its per-sample squares, for these outputs (one per
    call, batch first): the tokens of a Linear, the output pixels of a convolution; 0 for the other rules."""
    if rule is _linear:
        return sum(o[0].numel() // o.shape[-1] for o in outputs)
    if rule is _conv:
        return sum(o[0, 0].numel() for o in outputs)
    return 0


def sums_pairs(positions: int, num_slots: int) -> bool:
    """Whether a rule over ``positions`` (:func:`pair_positions`) sums position pairs (:func:`_outer_sq_pairs`) for
    ``num_slots`` slots: a cost that does not depend on the number of slots, so that splitting the slots into groups
    multiplies it (per-sample gradients, and the other rules, cost the same in total either way)."""
    return positions > 1 and not _materialize(num_slots, positions)


def _materialize(num_slots: int, length: int) -> bool:
    """Whether per-sample gradients over ``length`` positions are formed (else their squares are summed by
    position pairs): pairs cost ``length (length + 1) / 2`` products a sample, formed gradients ``num_slots`` x
    (``length`` + the passes over them, :data:`_MATERIALIZE_PASSES`)."""
    return length > 1 and length * (length + 1) // 2 > num_slots * (length + _MATERIALIZE_PASSES)


def _affine(m: nn.Module, x_hat: torch.Tensor, g: torch.Tensor, w: torch.Tensor, dim: int) -> dict[str, torch.Tensor]:
    """Squares of the per-sample gradients of ``weight * x_hat + bias`` (positions along ``dim`` of ``g``)."""
    out = {}
    if getattr(m, "weight", None) is not None:
        out["weight"] = _diag_sq(g, w, x_hat, dim)
    if getattr(m, "bias", None) is not None:
        out["bias"] = _diag_sq(g, w, dim=dim)
    return out


def _batch_norm_supported(m: nn.Module) -> bool:
    # The Fisher runs in eval mode: with running statistics every sample is normalized on its own (batch
    # statistics would mix the samples; HookedFisher.supported refuses such models).
    return m.running_mean is not None and m.running_var is not None


def _flat_positions(t: torch.Tensor, batch_dims: int) -> torch.Tensor:
    """``[*batch, C, *spatial]`` -> ``[*batch, C, L]`` (the native layout: positions innermost)."""
    return t.reshape(*t.shape[: batch_dims + 1], -1)


def _batch_norm(m: nn.modules.batchnorm._BatchNorm, inputs, grads, w):
    x_hat = _cat_calls(
        [
            _flat_positions((i - _bcast(m.running_mean, i)) * _bcast((m.running_var + m.eps).rsqrt(), i), 1)
            for i in inputs
        ],
        -1,
    )
    return _affine(m, x_hat, _cat_calls([_flat_positions(o, 2) for o in grads], -1), w, dim=-1)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(1, -1, *([1] * (like.dim() - 2))).to(like.dtype)


def _layer_norm(m: nn.LayerNorm, inputs, grads, w, channel_dim: int | None = None):
    """``channel_dim=1``: timm's LayerNorm2d (normalizes the channels of NCHW tensors)."""
    dims = tuple(range(-len(m.normalized_shape), 0))
    c = _numel(m.normalized_shape)
    xs, gs = [], []
    for i, o in zip(inputs, grads, strict=True):
        if channel_dim is not None:
            i, o = i.movedim(channel_dim, -1), o.movedim(channel_dim + 1, -1)
        mean = i.mean(dims, keepdim=True)
        var = i.var(dims, keepdim=True, correction=0)
        xs.append(((i - mean) * (var + m.eps).rsqrt()).reshape(i.shape[0], -1, c))
        gs.append(o.reshape(o.shape[0], o.shape[1], -1, c))
    out = _affine(m, _cat_calls(xs, 1), _cat_calls(gs, 2), w, dim=-2)
    return {k: v.reshape(getattr(m, k).shape) for k, v in out.items()}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _group_norm(m: nn.GroupNorm, inputs, grads, w):
    xs = []
    for i in inputs:
        grouped = i.reshape(i.shape[0], m.num_groups, -1)
        mean = grouped.mean(-1, keepdim=True)
        var = grouped.var(-1, keepdim=True, correction=0)
        xs.append(_flat_positions(((grouped - mean) * (var + m.eps).rsqrt()).reshape(i.shape), 1))
    g = _cat_calls([_flat_positions(o, 2) for o in grads], -1)
    return _affine(m, _cat_calls(xs, -1), g, w, dim=-1)


def _embedding_supported(m: nn.Embedding) -> bool:
    return m.max_norm is None and not m.scale_grad_by_freq


def _embedding(m: nn.Embedding, inputs, grads, w):
    ids = _cat_calls([i.reshape(i.shape[0], -1) for i in inputs], 1)  # [B, T]
    g = _cat_calls([o.reshape(o.shape[0], o.shape[1], -1, o.shape[-1]) for o in grads], 2)  # [S, B, T, D]
    batch, length = ids.shape
    sample = torch.arange(batch, device=ids.device).unsqueeze(1).expand(batch, length)
    keys, inverse = torch.unique(sample * m.num_embeddings + ids, return_inverse=True)
    rows, owner = keys % m.num_embeddings, keys // m.num_embeddings
    out = torch.zeros_like(m.weight, dtype=g.dtype)
    keep = rows != m.padding_idx if m.padding_idx is not None else torch.ones_like(rows, dtype=torch.bool)
    for s in range(g.shape[0]):
        per_row = g.new_zeros(keys.shape[0], g.shape[-1]).index_add_(
            0, inverse.reshape(-1), g[s].reshape(-1, g.shape[-1])
        )
        contrib = per_row.square_() * w[s, owner].unsqueeze(1)
        out.index_add_(0, rows[keep], contrib[keep])
    return {"weight": out}


Rule = Callable[..., dict[str, torch.Tensor]]


def _rules() -> dict[type, tuple[Rule, Callable[[nn.Module], bool]]]:
    always = lambda m: True  # noqa: E731
    rules: dict[type, tuple[Rule, Callable[[nn.Module], bool]]] = {
        nn.Linear: (_linear, always),
        nn.Conv1d: (_conv, _conv_supported),
        nn.Conv2d: (_conv, _conv_supported),
        nn.BatchNorm1d: (_batch_norm, _batch_norm_supported),
        nn.BatchNorm2d: (_batch_norm, _batch_norm_supported),
        nn.BatchNorm3d: (_batch_norm, _batch_norm_supported),
        nn.LayerNorm: (_layer_norm, always),
        nn.GroupNorm: (_group_norm, always),
        nn.Embedding: (_embedding, _embedding_supported),
    }
    try:  # timm's LayerNorm variants: the same formula (LayerNorm2d on the channels of NCHW tensors)
        from timm.layers import norm as timm_norm
    except ImportError:
        return rules
    rules[timm_norm.LayerNorm] = (_layer_norm, always)
    rules[timm_norm.LayerNorm2d] = (lambda m, i, g, w: _layer_norm(m, i, g, w, channel_dim=1), always)
    return rules


RULES = _rules()


def rule_for(module: nn.Module) -> Rule | None:
    """The rule for ``module`` (exact type: a subclass may compute something else in its own ``forward``)."""
    entry = RULES.get(type(module))
    if entry is None or not entry[1](module):
        return None
    return entry[0]
