"""Slow, explicit reference implementations of the losses: loops over samples, pairs,
triplets and tuples, in float64, written straight from the method's definitions."""

from __future__ import annotations

import math

import torch


def dist(x: torch.Tensor, i: int, j: int) -> torch.Tensor:
    return torch.sqrt(((x[i] - x[j]) ** 2).sum())


def brute_force_triplets(emb: torch.Tensor, labels: list[int], margin: float, tol: float = 0.0):
    """Every semi-hard (a, p, n) by enumeration. With ``tol > 0`` also returns the
    triplets whose conditions hold or fail by less than ``tol`` (borderline)."""
    x = emb.double()
    n = len(labels)
    d = [[float(dist(x, i, j)) for j in range(n)] for i in range(n)]
    sure, border = set(), set()
    for a in range(n):
        for p in range(n):
            if p == a or labels[p] != labels[a]:
                continue
            for q in range(n):
                if labels[q] == labels[a]:
                    continue
                lo = d[a][q] - d[a][p]
                hi = d[a][p] + margin - d[a][q]
                if lo > tol and hi > tol:
                    sure.add((a, p, q))
                elif lo > -tol and hi > -tol:
                    border.add((a, p, q))
    return sure, border


def normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def relationship_reference(s, t, labels, variant: str, tau: float, margin: float, weight: float):
    """Stage-1 loss by explicit loops; differentiable w.r.t. ``s`` (float64)."""
    zs, zt = normalize(s.double()), normalize(t.double())
    n = len(labels)
    with torch.no_grad():
        ds = [[float(dist(zs, i, j)) for j in range(n)] for i in range(n)]
    terms = []
    for a in range(n):
        for p in range(n):
            if p == a or labels[p] != labels[a]:
                continue
            negs = [q for q in range(n) if labels[q] != labels[a] and ds[a][p] < ds[a][q] < ds[a][p] + margin]
            if not negs:
                continue
            if variant == "triplet":
                for q in negs:
                    ps = torch.sigmoid((dist(zs, a, q) - dist(zs, a, p)) / tau)
                    pt = torch.sigmoid((dist(zt, a, q) - dist(zt, a, p)) / tau)
                    terms.append(pt * torch.log(pt / ps) + (1 - pt) * torch.log((1 - pt) / (1 - ps)))
            else:
                ls = torch.stack([-dist(zs, a, p)] + [-dist(zs, a, q) for q in negs]) / tau
                lt = torch.stack([-dist(zt, a, p)] + [-dist(zt, a, q) for q in negs]) / tau
                ps, pt = torch.softmax(ls, 0), torch.softmax(lt, 0)
                terms.append((pt * (pt.log() - ps.log())).sum())
    if not terms:
        return s.sum() * 0.0
    return weight * torch.stack(terms).mean()


def local_classifier_reference(student_logits, teacher_emb, centers, labels, tau, weight, inst=None, correct=False,
                               local=None):  # fmt: skip
    local = sorted(set(int(y) for y in labels) if local is None else local)  # the batch's classes, or those given
    terms = []
    for i in range(len(labels)):
        t = torch.stack([teacher_emb[i].double() @ centers[k].double() for k in local]) / tau
        s = torch.stack([student_logits[i, k].double() for k in local]) / tau
        pt, ps = torch.softmax(t, 0), torch.softmax(s, 0)
        kl = (pt * (pt.log() - ps.log())).sum()
        if correct and local[int(t.argmax())] != int(labels[i]):  # the teacher's local classifier is wrong
            kl = kl * 0.0
        terms.append(kl * (1.0 if inst is None else float(inst[i])))
    return weight * torch.stack(terms).mean()


def class_centers_reference(emb, labels, num_classes):
    rows = []
    for k in range(num_classes):
        total = sum(emb[i].double() for i in range(len(labels)) if int(labels[i]) == k)
        rows.append(total / math.sqrt(float((total**2).sum())))
    return torch.stack(rows)


def kd_reference(s, t, tau):
    terms = []
    for i in range(s.shape[0]):
        pt = torch.softmax(t[i].double() / tau, 0)
        ps = torch.softmax(s[i].double() / tau, 0)
        terms.append((pt * (pt.log() - ps.log())).sum())
    return torch.stack(terms).mean() * tau**2


def smooth_l1(a, b):
    diff = abs(a - b)
    return 0.5 * diff**2 if diff < 1 else diff - 0.5


def rkd_reference(s, t, distance_weight, angle_weight):
    n = s.shape[0]
    s, t = s.double(), t.double()

    def norm_dists(e):
        d = [[dist(e, i, j) if i != j else torch.zeros((), dtype=e.dtype) for j in range(n)] for i in range(n)]
        mean = sum(d[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        return [[d[i][j] / mean for j in range(n)] for i in range(n)]

    def angle(e, i, j, k):
        u, v = e[i] - e[j], e[k] - e[j]
        nu, nv = u.norm(), v.norm()
        if nu == 0 or nv == 0:
            return torch.zeros((), dtype=e.dtype)
        return (u / nu) @ (v / nv)

    ds, dt = norm_dists(s), norm_dists(t)
    loss_d = sum(smooth_l1(ds[i][j], dt[i][j].detach()) for i in range(n) for j in range(n)) / n**2
    loss_a = (
        sum(
            smooth_l1(angle(s, i, j, k), angle(t, i, j, k).detach())
            for i in range(n)
            for j in range(n)
            for k in range(n)
        )
        / n**3
    )
    return distance_weight * loss_d + angle_weight * loss_a


def confidence_reference(logits):
    h = [-float(torch.log_softmax(logits[i].double(), 0).max()) for i in range(logits.shape[0])]
    lo, hi = min(h), max(h)
    hn = [(v - lo) / (hi - lo) if hi > lo else 0.0 for v in h]
    return torch.tensor([2.0 / (1.0 + math.exp(v)) for v in hn], dtype=torch.float64)
