"""SparseGPT: one-shot pruning with OBS reconstruction, shared by ``sparsify-nm`` and ``prune-magnitude``.

Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot". Each layer ``y = W x`` is pruned on its own so that its output on the
calibration data moves as little as possible, ``min ||W X - W_p X||^2`` with ``W_p``
sparse. Rows ``R`` of the reduction-rows view (:mod:`._layers`) are independent given
the inputs, and share one Hessian:

1. ``H = 2 X X^T + lambda I`` over the layer's input channels, ``X X^T`` the channel Gram
   matrix gathered by the statistics runner (:mod:`compressor.quant.taps`, padding
   tokens excluded, accumulated batch by batch), ``lambda = damp * mean(diag(2 X X^T))``
   (``damp = 0.03`` by default, the paper's 0.01 fits MiniLM's 100 short calibration
   sentences (2.3k tokens for up to 1536 channels) less well: on 152 held-out sentences,
   2:4, mean cosine 0.826 / 0.847 / 0.854 / 0.852 / 0.847 at damp 0.001 / 0.01 / 0.03 /
   0.1 / 0.3; a channel never active in the data has ``H_jj = lambda``). When the
   Cholesky factorisation fails the damping grows tenfold (up to three times).
2. ``U`` is the upper Cholesky factor of ``H^-1`` (``H^-1 = U^T U``). Row ``j`` of ``U``,
   from column ``j`` on, divided by ``U_jj``, is the row of the inverse Hessian of the
   columns ``j..K-1`` once columns ``0..j-1`` are fixed, so columns are processed left to
   right and each reads its own OBS quantities off ``U``.
3. Processing column ``j``: the weights of it that the mask prunes are set to 0, the error
   ``e = (w_j - q_j) / U_jj`` (per row) is spread over the not yet processed columns,
   ``W[:, j:] -= e U[j, j:]`` (the Optimal Brain Surgeon update), so the kept weights
   absorb what the pruned ones did on the calibration inputs.
4. Masks use the OBS saliency ``w^2 / U_jj^2`` of the weights as they stand when their
   columns are reached (after earlier updates): for N:M, at the first column of each group
   of ``M`` consecutive input channels, the ``M - N`` of lowest saliency per row go (the
   ``N`` highest kept, ties to the earlier position, as :func:`._sparsity.nm_keep_mask`);
   unstructured at sparsity ``s``, at the start of each block the ``floor(s * rows * B)``
   weights of lowest saliency in the block go. A channel never active in the data
   (``[X X^T]_jj = 0``) costs nothing on it: its saliency is 0, so it goes first (within
   the budget; the reference code zeroes such weights outright, this does not).
5. Lazy batch updates: columns go in blocks of ``B = 128`` (a multiple of ``M``); step 3
   runs inside the block, and the block's accumulated errors ``E`` reach the later
   columns in one product, ``W[:, i2:] -= E U[i1:i2, i2:]``. The same holds one level
   down: step 3 runs column by column inside a group of ``M`` (8 columns when
   unstructured) and the group's errors reach the rest of the block in one product. The
   updates are linear, so the result equals the column-by-column one up to rounding.
6. Layouts. Gemm and MatMul: exact (``X`` is the tokens x input channels of the layer's
   input). A Conv with a kernel larger than 1x1 has one row of ``R`` per (output channel,
   kernel position); each row is given the channel Gram of the input (the Hessian blocks
   between kernel positions and border effects are ignored, a block-diagonal
   approximation), exact for 1x1 Conv. In a grouped Conv the rows of group ``g`` use the
   Gram's ``g``-th diagonal block.
7. A weight shared by several layers minimises the sum of their output errors: its Gram is
   the sum of theirs.

Where ``X X^T`` comes from is the caller's (:mod:`._layerwise`): by default the paper's
sequential variant, stage by stage on the model whose earlier layers are already pruned
and reconstructed (so each layer is reconstructed on the inputs it will really get);
with ``sequential: false`` the dense model's, one statistics run for all layers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from compressor.passes._layers import Layer
from compressor.passes._sparsity import nm_keep_mask

from compressor.errors import DataError

__all__ = ["BLOCK", "DAMP", "sparsegpt_rows", "sparsegpt_weight"]

logger = logging.getLogger(__name__)

BLOCK = 128
DAMP = 0.03


def _inverse_cholesky(gram: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor ``U`` of ``H^-1`` with ``H = 2 G + lambda I`` (cases 1 and 2).

    With ``J`` the order-reversing permutation, ``J H J = L L^T`` gives ``H = V V^T`` with
    ``V = J L J`` upper triangular, so ``H^-1 = V^-T V^-1`` and ``U = V^-1``: one Cholesky
    factorisation and one triangular inverse (torch's LAPACK bindings, float64), about a
    quarter of the work of going through a general inverse.
    """
    import torch

    h = 2.0 * torch.from_numpy(np.ascontiguousarray(np.asarray(gram, np.float64)[::-1, ::-1]))
    mean_diag = float(torch.diagonal(h).mean()) if h.numel() else 0.0
    base = mean_diag if mean_diag > 0 else 1.0
    eye = torch.eye(h.shape[0], dtype=torch.float64)
    for attempt in range(4):
        lam = damp * base * 10.0 ** attempt
        lower, info = torch.linalg.cholesky_ex(h + lam * eye)
        if int(info) == 0:
            upper = torch.flip(lower, (0, 1))
            return torch.linalg.solve_triangular(upper, eye, upper=True).numpy()
        logger.debug("SparseGPT: Hessian not positive definite at damping %g, raising it", lam / base)
    raise np.linalg.LinAlgError("SparseGPT: the Hessian is not positive definite even with damping "
                                f"{damp * 1000:g} x its mean diagonal")


def sparsegpt_rows(rows: np.ndarray, gram: np.ndarray, *, n: int | None = None, m: int | None = None,
                   sparsity: float | None = None, block: int = BLOCK, damp: float = DAMP) -> np.ndarray:
    """Prune ``rows`` (``R x K``, rows independent) with OBS reconstruction (cases 1-5).

    Args:
        rows: The reduction-rows view of a weight.
        gram: ``X X^T`` of the ``K`` input channels (``K x K``).
        n: Kept per group of ``m`` (N:M), with ``m``; or
        sparsity: The fraction pruned in each block (unstructured).
        block: Columns per lazy-update block (rounded down to a multiple of ``m``).
        damp: Damping relative to the mean diagonal of the Hessian.

    Returns:
        The pruned and reconstructed rows (float64); pruned weights are exactly 0.
    """
    if (m is None) == (sparsity is None):
        raise ValueError("SparseGPT: give either n and m or sparsity")
    w = np.array(rows, np.float64)
    r, k = w.shape
    if gram.shape != (k, k):
        raise ValueError(f"SparseGPT: Gram matrix {gram.shape} does not match {k} input channels")
    if m is not None and (k % m or not 1 <= (n or 0) < m):
        raise ValueError(f"SparseGPT: {k} input channels and {n}:{m} do not make N:M groups")
    u = _inverse_cholesky(gram, damp)
    alive = (np.diag(gram) > 0).astype(np.float64)  # case 4: unused channels have saliency 0
    step = block if m is None else max(m, block // m * m)
    for i1 in range(0, k, step):
        i2 = min(i1 + step, k)
        w1, u1 = w[:, i1:i2].copy(), u[i1:i2, i1:i2]
        d = np.diag(u1)
        weight = alive[i1:i2] / np.square(d)
        errors = np.zeros_like(w1)
        prune = np.zeros(w1.shape, bool)
        if m is None:  # case 4, unstructured: lowest saliency in the block
            saliency = np.square(w1) * weight
            count = int(np.floor(sparsity * saliency.size))
            prune.reshape(-1)[np.argsort(saliency, axis=None, kind="stable")[:count]] = True
        lazy = m or 8
        for g0 in range(0, i2 - i1, lazy):
            g1 = min(g0 + lazy, i2 - i1)
            if m is not None:  # case 4, N:M: choose the group's mask now
                saliency = np.square(w1[:, g0:g1]) * weight[g0:g1]
                prune[:, g0:g1] = ~nm_keep_mask(saliency, n, m)
            for i in range(g0, g1):
                err = np.where(prune[:, i], w1[:, i], 0.0) / d[i]
                w1[:, i:g1] -= np.outer(err, u1[i, i:g1])  # case 3, inside the group
                w1[prune[:, i], i] = 0.0  # exactly: the update leaves rounding residue
                errors[:, i] = err
            w1[:, g1:] -= errors[:, g0:g1] @ u1[g0:g1, g1:]  # case 5, the rest of the block
        w[:, i1:i2] = w1
        w[:, i2:] -= errors @ u[i1:i2, i2:]  # case 5
    return w


def sparsegpt_weight(layer: Layer, weight: np.ndarray, grams: Sequence[np.ndarray], **how) -> np.ndarray:
    """``weight`` of ``layer`` pruned by :func:`sparsegpt_rows` (cases 6 and 7), in its own layout and dtype.

    Args:
        layer: The layer (its op and attributes give the layout).
        weight: Its dense weight.
        grams: ``X X^T`` of the activation channels of each layer reading the weight (summed).
        **how: ``n`` and ``m``, or ``sparsity``; optionally ``block`` and ``damp``.

    Raises:
        DataError: The calibration data made the layer's ``X X^T`` non-finite.
    """
    gram = np.sum([np.asarray(g, np.float64) for g in grams], axis=0)
    if not np.isfinite(gram).all():
        raise DataError(f"`{layer.name}`: SparseGPT: the calibration data gives this layer non-finite or "
                        "overflowing inputs (X X^T is not finite); check the calibration samples")
    rows = layer.to_rows(weight).astype(np.float64)
    g = layer.group
    if g == 1:
        new = sparsegpt_rows(rows, gram, **how)
    else:  # case 6, grouped Conv: row r belongs to group (r // kernel size) // (M / g)
        cg, per_group = weight.shape[1], rows.shape[0] // g
        new = np.empty_like(rows)
        for i in range(g):
            part = slice(i * per_group, (i + 1) * per_group)
            block = slice(i * cg, (i + 1) * cg)
            new[part] = sparsegpt_rows(rows[part], gram[block, block], **how)
    return layer.from_rows(new, weight.shape).astype(weight.dtype)
