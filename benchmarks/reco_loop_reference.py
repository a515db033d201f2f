"""A straightforward loop implementation of ReCo, for benchmarking only (not used by the package).

Written the way the DMTC/ReCo reference code is structured — Python loops over classes, a Python loop
over queries to draw each query's negative indices class by class, and a Q×M×D gather of negative
features per class — but with the same semantics as ``dmtc.losses.reco.reco_loss(shared_negatives=False)``:
ignored pixels (``valid`` False) are excluded, prototypes are the normalised means of the normalised
features, and the loss is Σ_c mean_q CE / (number of classes present). Its random draws differ from the
vectorised version's, so compare the two in distribution, not draw by draw.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def reco_loss_loop(
    features: Tensor,
    labels: Tensor,
    valid: Tensor,
    probs: Tensor,
    strong_threshold: float = 0.97,
    temperature: float = 0.5,
    num_queries: int = 256,
    num_negatives: int = 512,
) -> Tensor:
    """ReCo with per-class and per-query Python loops (exact per-query negatives)."""
    num_classes = probs.shape[1]
    rep = features.permute(0, 2, 3, 1)  # N×h×w×D
    class_feats, class_hard, class_protos = [], [], []
    for c in range(num_classes):
        mask = valid & (labels == c)
        if not mask.any():
            continue
        hard = mask & (probs[:, c] < strong_threshold)
        feats = rep[mask]
        with torch.no_grad():
            class_protos.append(F.normalize(F.normalize(feats, dim=1).mean(0), dim=0))
        class_feats.append(feats)
        class_hard.append(rep[hard])
    present = len(class_feats)
    if present < 2:
        return features.sum() * 0
    protos = torch.stack(class_protos)
    loss = features.new_zeros(())
    for i in range(present):
        if len(class_hard[i]) == 0:
            continue
        anchors = class_hard[i][torch.randint(len(class_hard[i]), (num_queries,))]  # Q×D, with grad
        with torch.no_grad():
            others = [j for j in range(present) if j != i]
            sim = F.cosine_similarity(protos[i].unsqueeze(0), protos[others], dim=1)
            dist = torch.distributions.Categorical(probs=torch.softmax(sim / temperature, dim=0))
            sampled_class = dist.sample((num_queries, num_negatives))
            pool = torch.cat([class_feats[j].detach() for j in others])
            sizes = [len(class_feats[j]) for j in others]
            starts = [sum(sizes[:k]) for k in range(len(sizes))]
            rows = []
            for q in range(num_queries):  # per query, per negative class: draw that many members
                per_class = torch.bincount(sampled_class[q], minlength=len(others)).tolist()
                for k, count in enumerate(per_class):
                    if count:
                        rows.append(torch.randint(starts[k], starts[k] + sizes[k], (count,)))
            negatives = pool[torch.cat(rows)].view(num_queries, num_negatives, -1)
            keys = torch.cat([protos[i].expand(num_queries, 1, -1), negatives], dim=1)  # Q×(1+M)×D
        logits = F.cosine_similarity(anchors.unsqueeze(1), keys, dim=2) / temperature
        loss = loss + F.cross_entropy(logits, torch.zeros(num_queries, dtype=torch.long))
    return loss / present
