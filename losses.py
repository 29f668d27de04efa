"""
SFT losses for the streaming format (SPEC section 2): CE, Streamo's focal loss and StreamPro's
CB-Stream loss. Pure functions of (logits, labels); sft.py and the tests call them directly.

Every loss is  L = (1/N) * sum_i w_i * (-log p_i)  over the N supervised positions (labels != -100),
with `logits` already aligned to `labels` (the next-token shift is the caller's). `decision_ids`
lists the decision tokens' ids in class order. `counts` (per decision class) replaces the counts of
this batch and `num_items` replaces N: sft.py passes both, gathered over the whole optimisation
batch (all micro-batches, all ranks), so summing the micro-batch losses gives exactly the loss of
the global batch, however it was split.
"""
import torch
import torch.nn.functional as F


def class_counts(labels, decision_ids):
    """How many supervised positions of each decision class `labels` holds."""
    return torch.stack([(labels == i).sum() for i in decision_ids]).to(torch.float64)


def cb_class_weights(counts, beta=0.9999):
    """Class-balanced weights (Cui et al. 2019) as CB-Stream normalises them:
    E_k = (1 - beta^n_k) / (1 - beta),  w_k = (1/E_k) / sum_j (1/E_j) * |present|.
    Classes with n_k = 0 get weight 0 and stay out of the normalisation."""
    n = torch.as_tensor(counts, dtype=torch.float64)
    present = n > 0
    if not present.any():
        return torch.zeros_like(n, dtype=torch.float32)
    eff = (1 - beta ** n) / (1 - beta) if beta < 1 else n  # beta -> 1: E_k -> n_k (inverse frequency)
    inv = torch.where(present, 1 / eff.clamp(min=1e-12), torch.zeros_like(n))
    return (inv / inv.sum() * present.sum()).float()


def focal_alpha(counts):
    """Streamo's per-batch balance: alpha_k = (1/|present|) * (sum_j n_j) / n_k, 0 for absent classes."""
    n = torch.as_tensor(counts, dtype=torch.float64)
    present = n > 0
    alpha = torch.where(present, n.sum() / n.clamp(min=1) / present.sum().clamp(min=1), torch.zeros_like(n))
    return alpha.float()


def _flat(logits, labels):
    logits, labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    keep = labels != -100
    return logits[keep], labels[keep]


def _weighted_mean(nll, w, num_items):
    n = nll.numel() if num_items is None else num_items
    return (w * nll).sum() / max(n, 1)


def _decision_class(labels, decision_ids):
    """Index of each position's decision class, or -1 for text tokens."""
    cls = torch.full_like(labels, -1)
    for k, i in enumerate(decision_ids):
        cls = torch.where(labels == i, k, cls)  # (a boolean-mask assignment is a host sync on a GPU)
    return cls


def ce_loss(logits, labels, num_items=None):
    logits, labels = _flat(logits, labels)
    nll = F.cross_entropy(logits.float(), labels, reduction="none")
    return _weighted_mean(nll, torch.ones_like(nll), num_items)


def cb_stream_loss(logits, labels, decision_ids, beta=0.9999, lambda_text=2.0, counts=None, num_items=None):
    """CB-Stream (StreamPro Eq. 3-4): decision tokens weighted by their class-balanced weight, every
    other supervised token (answer text, end of turn) by lambda_text."""
    logits, labels = _flat(logits, labels)
    counts = class_counts(labels, decision_ids) if counts is None else counts
    w_cls = cb_class_weights(counts, beta).to(logits.device)
    cls = _decision_class(labels, decision_ids)
    nll = F.cross_entropy(logits.float(), labels, reduction="none")
    w = torch.where(cls >= 0, w_cls[cls.clamp(min=0)], torch.full_like(nll, lambda_text))
    return _weighted_mean(nll, w, num_items)


def focal_loss(logits, labels, decision_ids, gamma=2.0, counts=None, num_items=None):
    """Streamo's focal loss: decision tokens weighted alpha_y * (1 - p)^gamma, text tokens 1.
    The modulating factor is part of the loss (gradients flow through it), as in Lin et al. 2017."""
    logits, labels = _flat(logits, labels)
    counts = class_counts(labels, decision_ids) if counts is None else counts
    alpha = focal_alpha(counts).to(logits.device)
    cls = _decision_class(labels, decision_ids)
    nll = F.cross_entropy(logits.float(), labels, reduction="none")
    focal = alpha[cls.clamp(min=0)] * (1 - torch.exp(-nll)) ** gamma
    w = torch.where(cls >= 0, focal, torch.ones_like(nll))
    return _weighted_mean(nll, w, num_items)


def bce_loss(scores, labels, num_items=None):
    """StreamBridge's activation model (activation.py): binary cross-entropy of its scores (logits, (N,) or (N, 1))
    against 0/1 labels, L = (1/N) sum_i -[y_i log s(x_i) + (1 - y_i) log(1 - s(x_i))], N = num_items when given
    (the global number of labelled <ACT> positions, as for the losses above). Unweighted, as the paper's: the
    operating point is a threshold, chosen afterwards (sft.eval_activation)."""
    x = scores.reshape(-1).float()
    nll = F.binary_cross_entropy_with_logits(x, labels.reshape(-1).to(x), reduction="none")
    return _weighted_mean(nll, torch.ones_like(nll), num_items)


def sft_loss(name, logits, labels, decision_ids, counts=None, num_items=None, beta=0.9999, lambda_text=2.0, gamma=2.0):
    """Dispatch by name (sft.py's --loss)."""
    if name == "ce":
        return ce_loss(logits, labels, num_items)
    if name == "cb":
        return cb_stream_loss(logits, labels, decision_ids, beta, lambda_text, counts, num_items)
    if name == "focal":
        return focal_loss(logits, labels, decision_ids, gamma, counts, num_items)
    raise ValueError(f"unknown loss {name!r}: ce, focal or cb")
