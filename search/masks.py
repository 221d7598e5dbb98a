"""Auxiliary column masks alpha and the head run on masked, no-grad pooled embeddings.

Both searches score the control arm's embedding columns through an auxiliary mask alpha:
field i's pooled embedding e_i ([B, d_i]) is multiplied by alpha_i ([d_i]) before the
interaction head. Pooling is linear, so this equals masking the table's columns,
V_i diag(alpha_i) (SSEDS eq. 8; HAM section 3.2, "Hard Auxiliary Mask").

The pooled embeddings are always computed under torch.no_grad(): the arms' sparse tables are
updated by a FUSED optimizer inside backward, so any backward that reached them would modify
the control arm. Gradients are taken with torch.autograd.grad with respect to the masks only,
which leaves every parameter's .grad untouched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dimstream.models.ctr import ctr_model  # re-exported: the searches' way into an Arm


def ones_masks(dims: dict[str, int], requires_grad: bool = False, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """alpha = 1 over every column (SSEDS eq. 10 evaluates the gradient at alpha = 1)."""
    return {f: torch.ones(d, dtype=dtype, requires_grad=requires_grad) for f, d in dims.items() if d > 0}


def pooled_embeddings(model, kjt: KeyedJaggedTensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Pooled field embeddings e_i = V_i^T x_i (SSEDS eq. 2 / HAM section 3.2; list in the
    model's field order) and the first-order sum, computed under no_grad so that nothing can
    backpropagate into the (fused) tables."""
    m = ctr_model(model)
    with torch.no_grad():
        embs, wide = m.embedding(kjt)
    return [e.detach() for e in embs], (wide.detach() if wide is not None else None)


def masked_logits(
    model,
    kjt: KeyedJaggedTensor | None,
    masks: dict[str, torch.Tensor],
    pooled: tuple[list[torch.Tensor], torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Logits [B] of the head on e_i * alpha_i (SSEDS eq. 8 / HAM's masked model).

    `pooled` (from `pooled_embeddings`) skips the lookup when the same rows are scored twice.
    Fields absent from `masks` pass unmasked. Embeddings are cast to the masks' dtype, so a
    float64 head with float64 masks evaluates the loss in double precision."""
    m = ctr_model(model)
    embs, wide = pooled if pooled is not None else pooled_embeddings(m, kjt)
    dtype = next(iter(masks.values())).dtype if masks else embs[0].dtype
    out = [e.to(dtype) * masks[f] if f in masks else e.to(dtype) for e, f in zip(embs, m.feature_names)]
    return m.head(out, wide.to(dtype) if wide is not None else 0.0)


def masked_loss(
    model,
    kjt: KeyedJaggedTensor | None,
    labels: torch.Tensor,
    masks: dict[str, torch.Tensor],
    pooled: tuple[list[torch.Tensor], torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Mean log-loss of the masked model on one mini-batch (SSEDS eq. 7, averaged)."""
    logits = masked_logits(model, kjt, masks, pooled)
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


def mask_gradient(model, batches, masks: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], float, int]:
    """dL/dalpha of the mean loss over all rows of `batches` (SparseBatch list), accumulated
    mini-batch by mini-batch (each weighted by its share of the rows), plus that mean loss and
    the row count. Only the masks receive gradients; the model's .grad fields are untouched."""
    m = ctr_model(model)
    total = sum(len(b) for b in batches)
    leaves = [masks[f] for f in m.feature_names if f in masks]
    grads = [torch.zeros_like(a) for a in leaves]
    loss_sum = 0.0
    for b in batches:
        if len(b) == 0:
            continue
        loss = masked_loss(m, b.to_kjt(m.feature_names), b.labels_tensor(), masks) * (len(b) / total)
        for acc, g in zip(grads, torch.autograd.grad(loss, leaves)):
            acc += g
        loss_sum += float(loss.detach())
    names = [f for f in m.feature_names if f in masks]
    return dict(zip(names, grads)), loss_sum, total
