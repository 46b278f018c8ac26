"""REFILLED and baseline distillation losses as pure tensor functions.

Every function here is stateless and vectorized (no Python loop over samples, pairs,
triplets or tuples) and computes in float32, even when its inputs are half precision or
it is called under ``torch.autocast``. See ``docs`` in the README for the method:

* stage 1, :func:`relationship_loss`: semi-hard triplets (or tuples) are mined on the
  student embedding and the teacher's view of the same comparisons is matched with a KL
  divergence;
* stage 2, :func:`local_classifier_loss`: the teacher's similarities to the class centres
  of the classes present in the batch ("local classes") supervise the student's logits on
  the same classes.

Baselines in the same conventions: :func:`kd_loss` (Hinton et al. 2015) and
:func:`rkd_loss` (Park et al. 2019).

Why hand-written: no maintained library implements semi-hard mining with the teacher's
view of the same tuples, and the mining is the hot spot (see ``benchmarks/losses.py``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple, TypeVar

import torch
import torch.nn.functional as F

__all__ = [
    "DEFAULT_RELATIONSHIP_WEIGHTS",
    "RELATIONSHIP_VARIANTS",
    "batch_class_centers",
    "class_centers",
    "class_sums",
    "centers_from_sums",
    "kd_loss",
    "local_class_mask",
    "local_classifier_loss",
    "local_teacher_correct",
    "ncm_predict",
    "relationship_loss",
    "relationship_loss_with_stats",
    "rkd_loss",
    "semi_hard_triplets",
    "teacher_confidence_weights",
]

#: Stage-1 variants and their default weight ``C``. The authors' triplet code averages a
#: tensor concatenated along the wrong axis, which halves the loss: 500 with a correct
#: mean reproduces their effective weight.
DEFAULT_RELATIONSHIP_WEIGHTS: dict[str, float] = {"tuple": 1000.0, "triplet": 500.0}
RELATIONSHIP_VARIANTS: tuple[str, ...] = tuple(DEFAULT_RELATIONSHIP_WEIGHTS)

# A finite stand-in for -inf in masked softmax slots: exp() of it underflows to exactly 0
# in float32, while log-softmax stays finite, so 0 * log(0) never produces NaN gradients.
_MASKED_LOGIT = -1.0e9
# Squared distances are clamped here before the square root, whose gradient is
# infinite at 0 (duplicated images). The clamp passes no gradient below it.
_MIN_SQUARED_DISTANCE = 1.0e-12

F_ = TypeVar("F_", bound=Callable)


def _in_float32(fn: F_) -> F_:
    """Run ``fn`` with autocast disabled and every floating tensor argument in float32."""

    def cast(value):
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float32:
            return value.float()
        return value

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        args = tuple(cast(a) for a in args)
        kwargs = {k: cast(v) for k, v in kwargs.items()}
        device_types = {a.device.type for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)}
        with _autocast_disabled(device_types):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


class _autocast_disabled:
    """Disable autocast on each of the given device types for the duration of a block."""

    def __init__(self, device_types: set[str]):
        # "meta" tensors (shapes without data) have no autocast to disable
        self._contexts = [torch.autocast(device_type=t, enabled=False) for t in sorted(device_types - {"meta"})]

    def __enter__(self):
        for ctx in self._contexts:
            ctx.__enter__()

    def __exit__(self, *exc):
        for ctx in reversed(self._contexts):
            ctx.__exit__(*exc)
        return False


# --------------------------------------------------------------------------- checks


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"`{name}` must be > 0, got {value!r}.")


def _check_matrix(name: str, value: torch.Tensor) -> None:
    if not isinstance(value, torch.Tensor) or value.dim() != 2:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"`{name}` must be a 2-D tensor [batch, dim], got shape {shape}.")


def _check_labels(labels: torch.Tensor, batch: int, name: str = "labels") -> None:
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
        raise ValueError(f"`{name}` must be a 1-D integer tensor [batch].")
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"`{name}` must hold integer class ids, got dtype {labels.dtype}.")
    if labels.shape[0] != batch:
        raise ValueError(f"`{name}` has {labels.shape[0]} entries but the embeddings have {batch} rows.")


def _check_same_batch(**tensors: torch.Tensor) -> int:
    sizes = {name: t.shape[0] for name, t in tensors.items()}
    if len(set(sizes.values())) > 1:
        desc = ", ".join(f"`{n}`: {s}" for n, s in sizes.items())
        raise ValueError(f"Mismatched batch sizes ({desc}); every input must describe the same batch.")
    return next(iter(sizes.values()))


def _check_label_range(labels: torch.Tensor, num_classes: int, table: str) -> None:
    # Checked on the host only: on an accelerator, reading min/max back would stall every
    # training step; out-of-range labels there fail as a device-side assert at the
    # indexing, as in F.cross_entropy (the pipeline checks its labels when it loads them).
    if labels.device.type != "cpu":
        return
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"`labels` must lie in [0, {num_classes}) to index {table}, "
            f"got values in [{int(labels.min())}, {int(labels.max())}]."
        )


# --------------------------------------------------------------------------- mining


def _pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between the rows of ``x`` ([B, D] -> [B, B]), differentiable."""
    sq = (x * x).sum(dim=1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    return d2.clamp_min(_MIN_SQUARED_DISTANCE).sqrt()


def _sort_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x.sort(dim=1)`` for a matrix of non-negative floats.

    On the CPU, ``torch.sort`` is the bottleneck of mining (26 ms for 1024 x 1024 on two
    threads). NumPy's vectorized sort of (float bits << 32 | column) integer keys gives
    the same permutation: non-negative float32 bit patterns order like the floats, +inf
    included, so the keys sort exactly.
    """
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return x.sort(dim=1)
    cols = torch.arange(x.shape[1], dtype=torch.int64)
    keys = ((x.contiguous().view(torch.int32).to(torch.int64) << 32) | cols).numpy()
    keys.sort(axis=1)
    sorted_keys = torch.from_numpy(keys)
    return (sorted_keys >> 32).to(torch.int32).view(torch.float32), sorted_keys & 0xFFFFFFFF


class _Mined(NamedTuple):
    """Semi-hard structure of a batch.

    ``order[a]`` lists anchor ``a``'s negatives by increasing distance (then, as padding,
    its positives). Pair ``i`` is (``anchor[i]``, ``positive[i]``); its semi-hard
    negatives are ``order[anchor[i], lo[i]:hi[i]]``, at least one.
    """

    order: torch.Tensor  # [B, B]
    anchor: torch.Tensor  # [P]
    positive: torch.Tensor  # [P]
    lo: torch.Tensor  # [P]
    hi: torch.Tensor  # [P]


def _mine(distances: torch.Tensor, labels: torch.Tensor, margin: float) -> _Mined:
    """Find every (anchor, positive) pair with semi-hard negatives, and their window.

    Sort each anchor's negatives by distance once (positives pushed to the end). For a
    positive ``p`` the semi-hard negatives (``d(a,p) < d(a,n) < d(a,p) + margin``) are a
    contiguous run of that sorted row, located with two binary searches. Nothing of size
    ``B x B x B`` is ever built: the cost is one ``B x B`` sort.
    """
    batch = distances.shape[0]
    same = labels[:, None] == labels[None, :]
    sorted_neg, order = _sort_rows(distances.masked_fill(same, float("inf")))
    is_pos = same.fill_diagonal_(False)
    anchor, positive = is_pos.nonzero(as_tuple=True)
    if anchor.numel() == 0:
        return _Mined(order, anchor, anchor, anchor, anchor)
    # Lay each anchor's positive distances out as a row of a [B, M] matrix, so that one
    # batched torch.searchsorted per bound locates every window.
    rank = is_pos.to(torch.int32).cumsum(1)[anchor, positive].long() - 1
    lower = sorted_neg.new_full((batch, int(rank.max()) + 1), float("inf"))
    lower[anchor, rank] = distances[anchor, positive]
    lo = torch.searchsorted(sorted_neg, lower, right=True)[anchor, rank]
    hi = torch.searchsorted(sorted_neg, lower + margin, right=False)[anchor, rank]
    keep = hi > lo
    return _Mined(order, anchor[keep], positive[keep], lo[keep], hi[keep])


class _DenseMined(NamedTuple):
    """Semi-hard structure of a batch over every (anchor, positive) slot, in fixed shapes.

    ``order`` as in :class:`_Mined`. For every slot ``[a, p]`` of the ``[B, B]``
    matrices, ``keep`` says whether ``p`` is a positive of ``a`` with at least one
    semi-hard negative, and ``order[a, lo[a, p]:hi[a, p]]`` lists them.
    """

    order: torch.Tensor  # [B, B]
    lo: torch.Tensor  # [B, B]
    hi: torch.Tensor  # [B, B]
    keep: torch.Tensor  # [B, B] bool


def _mine_dense(distances: torch.Tensor, labels: torch.Tensor, margin: float) -> _DenseMined:
    """:func:`_mine`'s windows for all ``B x B`` slots at once, masked instead of listed.

    Every shape depends on the batch size alone, never on what is mined, so nothing is
    read back to the host (no ``nonzero``, no boolean indexing, no ``.max()`` sizing a
    buffer): on a GPU the step is never stalled waiting for the mining, and it can be
    queued ahead (or captured in a CUDA graph). The cost stays ``O(B^2 log B)``.
    """
    batch = distances.shape[0]
    same = labels[:, None] == labels[None, :]
    sorted_neg, order = _sort_rows(distances.masked_fill(same, float("inf")))
    is_pos = same & ~torch.eye(batch, dtype=torch.bool, device=distances.device)
    # Non-positive slots query +inf, whose window is empty (hi <= lo); masked by `keep` anyway.
    lower = distances.masked_fill(~is_pos, float("inf")).contiguous()
    lo = torch.searchsorted(sorted_neg, lower, right=True)
    hi = torch.searchsorted(sorted_neg, lower + margin, right=False)
    return _DenseMined(order, lo, hi, is_pos & (hi > lo))


def _window_positions(mined: _Mined, width: int) -> torch.Tensor:
    """Flat positions, in a ``[B, width]`` row-major layout of the sorted rows, of every
    mined negative: pair by pair, nearest first."""
    count = mined.hi - mined.lo
    total = int(count.sum())
    start = mined.anchor * width + mined.lo - (torch.cumsum(count, 0) - count)
    return torch.arange(total, device=count.device) + torch.repeat_interleave(start, count, output_size=total)


@torch.no_grad()
def semi_hard_triplets(
    embeddings: torch.Tensor, labels: torch.Tensor, margin: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every semi-hard triplet of a batch.

    Args:
        embeddings: ``[B, D]`` rows; distances are plain Euclidean distances between them
            (normalize beforehand if you want cosine geometry).
        labels: ``[B]`` integer class ids.
        margin: semi-hard window width, > 0.

    Returns:
        ``(anchor, positive, negative)`` long tensors of equal length listing every
        ``(a, p, n)`` with ``y_a == y_p``, ``a != p``, ``y_n != y_a`` and
        ``d(a,p) < d(a,n) < d(a,p) + margin``; grouped by anchor, then positive, with
        each pair's negatives by increasing ``d(a,n)``.
    """
    _check_matrix("embeddings", embeddings)
    _check_labels(labels, embeddings.shape[0])
    _check_positive("margin", margin)
    return _semi_hard_triplets_impl(embeddings, labels, margin)


@_in_float32
def _semi_hard_triplets_impl(embeddings, labels, margin):
    mined = _mine(_pairwise_distances(embeddings), labels, margin)
    count = mined.hi - mined.lo
    negative = mined.order.flatten()[_window_positions(mined, mined.order.shape[1])]
    return mined.anchor.repeat_interleave(count), mined.positive.repeat_interleave(count), negative


# --------------------------------------------------------------------------- stage 1


def relationship_loss(
    student_embeddings: torch.Tensor,
    teacher_embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    variant: str = "tuple",
    tau: float = 4.0,
    margin: float = 0.2,
    weight: float | None = None,
) -> torch.Tensor:
    """REFILLED stage 1: match the teacher's comparisons on student-mined semi-hard tuples.

    Both embeddings are L2-normalized; semi-hard triplets are mined on the detached
    student embedding (see :func:`semi_hard_triplets`). The teacher's side never gets a
    gradient.

    * ``variant="tuple"`` (default): each (anchor, positive) pair and all its semi-hard
      negatives ``n_1..n_K`` form a tuple with logits ``[-d(a,p), -d(a,n_1), ...,
      -d(a,n_K)] / tau`` in each space; the loss is ``weight * mean over tuples of
      KL(softmax(teacher) || softmax(student))``. Tuples of every size ``K`` count in
      full: the padding is implicit (window sums over prefix sums) and exactly masked,
      nothing is truncated.
    * ``variant="triplet"``: ``p = sigmoid((d(a,n) - d(a,p)) / tau)`` in each space and
      ``weight * mean over triplets of KL(Bernoulli(p_T) || Bernoulli(p_S))``.

    Args:
        student_embeddings: ``[B, D_S]`` raw (unnormalized) student embeddings.
        teacher_embeddings: ``[B, D_T]`` raw teacher embeddings of the same images;
            ``D_T`` may differ from ``D_S``.
        labels: ``[B]`` the student's class ids.
        variant: ``"tuple"`` or ``"triplet"``.
        tau: temperature ``tau1`` (> 0).
        margin: semi-hard margin (> 0).
        weight: loss weight ``C``; ``None`` picks 1000 for tuples and 500 for triplets.

    Returns:
        A float32 scalar. When nothing is mined it is a zero connected to
        ``student_embeddings`` (backward works and yields zero gradients).
    """
    loss, _ = relationship_loss_with_stats(
        student_embeddings, teacher_embeddings, labels, variant=variant, tau=tau, margin=margin, weight=weight
    )
    return loss


def relationship_loss_with_stats(
    student_embeddings: torch.Tensor,
    teacher_embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    variant: str = "tuple",
    tau: float = 4.0,
    margin: float = 0.2,
    weight: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`relationship_loss` plus what was mined: ``{"tuples": P, "triplets": T}``
    (P (anchor, positive) pairs with at least one semi-hard negative, T triplets: 0-d
    int64 tensors on the embeddings' device, so that counting never waits for the device).

    On an accelerator the tuple variant reads nothing back to the host (every shape it
    builds depends on the batch size alone), so a training step is never stalled by the
    mining; the triplet variant lists its triplets, which reads their number back.
    """
    if variant not in DEFAULT_RELATIONSHIP_WEIGHTS:
        raise ValueError(f"`variant` must be one of {list(RELATIONSHIP_VARIANTS)}, got {variant!r}.")
    _check_matrix("student_embeddings", student_embeddings)
    _check_matrix("teacher_embeddings", teacher_embeddings)
    batch = _check_same_batch(student_embeddings=student_embeddings, teacher_embeddings=teacher_embeddings)
    _check_labels(labels, batch)
    _check_positive("tau", tau)
    _check_positive("margin", margin)
    if weight is None:
        weight = DEFAULT_RELATIONSHIP_WEIGHTS[variant]
    _check_positive("weight", weight)
    stats: dict[str, torch.Tensor] = {}
    loss = _relationship_loss_impl(
        student_embeddings,
        teacher_embeddings,
        labels,
        variant=variant,
        tau=tau,
        margin=margin,
        weight=weight,
        stats=stats,
    )
    return loss, stats


@_in_float32
def _relationship_loss_impl(student, teacher, labels, *, variant, tau, margin, weight, stats):
    z_s = F.normalize(student, dim=1)
    z_t = F.normalize(teacher.detach(), dim=1)
    return _RelationshipMatching.apply(z_s, z_t, labels, variant, tau, margin, weight, stats)


def _unit_distances(z: torch.Tensor) -> torch.Tensor:
    """Distances between unit rows: ``sqrt(2 - 2 z z^T)``, clamped as in
    :func:`_pairwise_distances`."""
    return torch.addmm(z.new_full((), 2.0), z, z.T, alpha=-2.0).clamp_min_(_MIN_SQUARED_DISTANCE).sqrt_()


class _RelationshipMatching(torch.autograd.Function):
    """Stage-1 loss on unit embeddings, with a hand-derived backward.

    Why by hand: autograd through the mining layout records about a hundred small
    operations, and on the CPU their overhead dominated (1.6 ms per call at batch 128).
    Differentiating in closed form takes a handful of ``B x B`` operations; the tests
    check the gradient against autograd through an explicit per-tuple reference.

    Both variants get ``dL/dd_S`` (the gradient with respect to the student's distance
    matrix) during the forward pass; the backward chains it through
    ``d = sqrt(2 - 2 z z^T)``.
    """

    @staticmethod
    def forward(ctx, z_s, z_t, labels, variant, tau, margin, weight, stats):
        d_s, d_t = _unit_distances(z_s), _unit_distances(z_t)
        need_grad = ctx.needs_input_grad[0]
        if variant == "tuple" and _fixed_shapes(d_s.device):
            loss, g_d = _tuple_kl_fixed(d_s, d_t, labels, tau, margin, weight, need_grad, stats)
        else:
            loss, g_d = _listed_kl(d_s, d_t, labels, variant, tau, margin, weight, need_grad, stats)
        if need_grad:
            ctx.save_for_backward(z_s, d_s, g_d)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        z_s, d_s, g_d = ctx.saved_tensors
        # d = sqrt(2 - 2 G) with G = z z^T: dd/dG = -1/d, except where the clamp held.
        g_gram = torch.where(d_s > _MIN_SQUARED_DISTANCE**0.5, g_d / -d_s, 0.0)
        grad_z = (g_gram + g_gram.T) @ z_s
        return grad_z * grad_output, None, None, None, None, None, None, None


def _fixed_shapes(device: torch.device) -> bool:
    """Whether stage 1 runs in fixed shapes on ``device`` (:func:`_tuple_kl_fixed`).

    On an accelerator every host read-back of the mining stalls the queue of launched
    work, so the tuple loss runs over all ``B x B`` slots, masked. On the CPU a read-back
    costs nothing and listing the pairs (about ``B^2 / classes`` of them) is cheaper than
    the masked ``[B, B]`` float64 work: 1.0-1.8x at batch 64-256, 3-4x at 1024 on two
    threads (``benchmarks/results/losses.md``).
    """
    return device.type != "cpu"


def _listed_kl(d_s, d_t, labels, variant, tau, margin, weight, need_grad, stats):
    """Either variant over the mined pairs, listed (their number is read by the host)."""
    mined = _mine(d_s, labels, margin)
    count = mined.hi - mined.lo
    stats["tuples"] = count.new_tensor(count.numel())
    stats["triplets"] = count.sum()
    if count.numel() == 0:
        return d_s.new_zeros(()), torch.zeros_like(d_s) if need_grad else None
    # Both spaces in the student's sorted layout, cut after the last window.
    columns = mined.order[:, : int(mined.hi.max())]
    s_sorted, s_ap = d_s.gather(1, columns), d_s[mined.anchor, mined.positive]
    t_sorted, t_ap = d_t.gather(1, columns), d_t[mined.anchor, mined.positive]
    fn = _tuple_kl_listed if variant == "tuple" else _triplet_kl
    loss, g_sorted, g_ap = fn(s_sorted, s_ap, t_sorted, t_ap, mined, tau, weight, need_grad)
    if not need_grad:
        return loss, None
    g_d = torch.zeros_like(d_s).scatter_(1, columns, g_sorted)
    g_d.index_put_((mined.anchor, mined.positive), g_ap, accumulate=True)
    return loss, g_d


def _tuple_kl_fixed(d_s, d_t, labels, tau, margin, weight, need_grad, stats):
    """Tuple variant in fixed shapes: loss and ``dL/dd_S`` with no host read-back (see
    :func:`_mine_dense`). The same tuples, loss and gradient as :func:`_tuple_kl_listed`
    (whose docstring derives them), computed for every ``[a, p]`` slot of the batch and
    masked to the mined pairs, instead of for a list of them.
    """
    mined = _mine_dense(d_s, labels, margin)
    pairs = mined.keep.sum()
    stats["tuples"] = pairs  # device tensors: read when logged, not every step
    stats["triplets"] = torch.where(mined.keep, mined.hi - mined.lo, 0).sum()
    batch = d_s.shape[0]
    # both spaces in the student's sorted layout, every column
    terms = _sorted_terms(d_s.gather(1, mined.order), d_t.gather(1, mined.order), tau)
    prefix = terms.cumsum(2)
    last = prefix.gather(2, (mined.hi - 1).clamp_min(0).expand(3, -1, -1))
    before = prefix.gather(2, (mined.lo - 1).clamp_min(0).expand(3, -1, -1))
    window = last - torch.where(mined.lo > 0, before, 0.0)  # [3, B, B]: sums over each window
    exps_p, totals, kl = _window_kl(window, d_s, d_t, tau)  # every slot [a, p] as a positive
    divisor = pairs.clamp_min(1)  # nothing mined: a zero loss, zero gradients
    loss = (weight * torch.where(mined.keep, kl, 0.0).sum() / divisor).float()
    if not need_grad:
        return loss, None
    # dL/dd = -(1/tau) * scale * (pS - pT), with p = exp(l) / E per tuple.
    per_pair = torch.where(mined.keep, (weight / tau) / (divisor * totals), 0.0)  # [2, B, B]
    # Spread each tuple's scale over its window: a difference array, then one cumulative sum.
    diff = per_pair.new_zeros(2, batch, batch + 1)
    diff.scatter_add_(2, mined.lo.expand(2, -1, -1), per_pair)
    diff.scatter_add_(2, mined.hi.expand(2, -1, -1), -per_pair)
    g_sorted, g_ap = _tuple_gradients(terms, diff.cumsum(2)[..., :-1], exps_p, per_pair)
    return loss, torch.zeros_like(d_s).scatter_(1, mined.order, g_sorted).add_(g_ap)


def _sorted_terms(s_sorted: torch.Tensor, t_sorted: torch.Tensor, tau: float) -> torch.Tensor:
    """``[3, B, W]`` float64: ``exp(lS)``, ``exp(lT)`` and ``exp(lT) (lT - lS)`` for the
    logits ``l = -d / tau`` of the sorted distances in each space; the tuple loss sums
    them over each window."""
    batch, width = s_sorted.shape
    # float64 throughout: prefix-sum differences cancel. Buffers are filled with copy_()
    # rather than .to(), which on the CPU was several times slower for large matrices.
    terms = torch.empty(3, batch, width, dtype=torch.float64, device=s_sorted.device)
    logits = torch.empty(2, batch, width, dtype=torch.float64, device=s_sorted.device)
    logits[0].copy_(s_sorted)
    logits[1].copy_(t_sorted)
    logits.mul_(-1.0 / tau)  # student, teacher
    torch.exp(logits, out=terms[:2])
    torch.mul(terms[1], logits[1] - logits[0], out=terms[2])
    return terms


def _window_kl(window: torch.Tensor, s_ap: torch.Tensor, t_ap: torch.Tensor, tau: float):
    """Each tuple's KL from its window sums (``[3, ...]``, of :func:`_sorted_terms`) and
    its positive's distances in each space: ``(exp(l_p) [2, ...], E [2, ...], KL)``."""
    logits_p = torch.stack([s_ap, t_ap]).to(torch.float64).mul_(-1.0 / tau)
    exps_p = logits_p.exp()
    totals = exps_p + window[:2]  # E_S, E_T per tuple
    log_totals = totals.log()
    kl = (exps_p[1] * (logits_p[1] - logits_p[0]) + window[2]) / totals[1] - log_totals[1] + log_totals[0]
    return exps_p, totals, kl


def _tuple_gradients(terms, spread, exps_p, per_pair) -> tuple[torch.Tensor, torch.Tensor]:
    """``dL/dd_S`` in the sorted layout and at the positives, from each tuple's scale
    (``per_pair``) and its spread over the window's columns (``spread``)."""
    g_sorted = (terms[1] * spread[1] - terms[0] * spread[0]).float()
    g_ap = (exps_p[1] * per_pair[1] - exps_p[0] * per_pair[0]).float()
    return g_sorted, g_ap


def _window_sums(values: torch.Tensor, mined: _Mined) -> torch.Tensor:
    """Sum of ``values[c, a, lo_i:hi_i]`` for every pair ``i`` (anchor ``a``): ``[C, P]``.

    A difference of two prefix sums (pass float64 ``values``: the difference cancels).
    """
    channels, _, width = values.shape
    prefix = values.cumsum(2).view(channels, -1)
    rows = mined.anchor * width
    last = prefix.index_select(1, rows + mined.hi - 1)  # hi >= 1 since every window is non-empty
    before = prefix.index_select(1, rows + (mined.lo - 1).clamp_min(0)) * (mined.lo > 0)
    return last - before


def _range_add(values: torch.Tensor, mined: _Mined, width: int) -> torch.Tensor:
    """``out[c, a, k] = sum of values[c, i] over the pairs i of anchor a whose window holds
    column k``, via a difference array and one cumulative sum. ``values``: ``[C, P]``."""
    channels, batch = values.shape[0], mined.order.shape[0]
    diff = values.new_zeros(channels, batch * (width + 1))
    rows = mined.anchor * (width + 1)
    diff.index_add_(1, torch.cat([rows + mined.lo, rows + mined.hi]), torch.cat([values, -values], dim=1))
    return diff.view(channels, batch, width + 1).cumsum(2)[..., :-1]


def _tuple_kl_listed(s_sorted, s_ap, t_sorted, t_ap, mined: _Mined, tau, weight, need_grad):
    """Tuple variant: loss and ``dL/dd_S`` (sorted layout, and at the positives).

    With logits ``l = -d / tau`` over the positive and the window's negatives,
    ``KL = A / E_T - log E_T + log E_S`` where ``E = sum_j exp(l_j)`` in each space and
    ``A = sum_j exp(lT_j) (lT_j - lS_j)``. A sum over a window is a difference of prefix
    sums along the anchor's sorted row, so the cost is ``O(B^2)`` whatever the tuple
    sizes: tuples of every size are handled exactly, nothing is truncated, and no slot
    outside a tuple takes part in it (the padding is implicit and exactly masked). The
    gradient ``dKL/dlS_j = pS_j - pT_j`` is spread back over the windows with a
    difference array. Accurate for ``tau`` down to about 0.1 (float64 sums).
    """
    terms = _sorted_terms(s_sorted, t_sorted, tau)
    exps_p, totals, kl = _window_kl(_window_sums(terms, mined), s_ap, t_ap, tau)  # [2, P], [2, P], [P]
    num_pairs = kl.numel()
    loss = (weight * kl.mean()).float()
    if not need_grad:
        return loss, None, None
    # dL/dd = -(1/tau) * scale * (pS - pT), with p = exp(l) / E per tuple.
    per_pair = (weight / (tau * num_pairs)) / totals
    g_sorted, g_ap = _tuple_gradients(terms, _range_add(per_pair, mined, s_sorted.shape[1]), exps_p, per_pair)
    return loss, g_sorted, g_ap


def _triplet_kl(s_sorted, s_ap, t_sorted, t_ap, mined: _Mined, tau, weight, need_grad):
    """Triplet variant: loss and ``dL/dd_S`` (sorted layout, and at the positives).

    ``KL(Bern(p_T) || Bern(p_S)) = log p_T - log p_S + (1 - p_T)(x_S - x_T)`` (since
    ``log p - log(1 - p) = x``), with ``dKL/dx_S = p_S - p_T``. The work is one pass over
    the triplets, whose number grows with the cube of the batch size.
    """
    count = mined.hi - mined.lo
    flat = _window_positions(mined, s_sorted.shape[1])
    total = flat.numel()
    x_s = (s_sorted.flatten()[flat] - s_ap.repeat_interleave(count, output_size=total)) / tau
    x_t = (t_sorted.flatten()[flat] - t_ap.repeat_interleave(count, output_size=total)) / tau
    kl = F.logsigmoid(x_t) - F.logsigmoid(x_s) + torch.sigmoid(-x_t) * (x_s - x_t)
    loss = weight * kl.to(torch.float64).mean().float()
    if not need_grad:
        return loss, None, None
    g = (torch.sigmoid(x_s) - torch.sigmoid(x_t)) * (weight / (tau * total))
    g_sorted = torch.zeros_like(s_sorted).flatten().index_add_(0, flat, g).view_as(s_sorted)
    ends = F.pad(g.to(torch.float64).cumsum(0), (1, 0))
    stop = torch.cumsum(count, 0)
    g_ap = -(ends[stop] - ends[stop - count]).float()
    return loss, g_sorted, g_ap


# --------------------------------------------------------------------------- stage 2


def class_sums(embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-class sums of ``embeddings`` rows (``[num_classes, D]``, float32).

    The building block of :func:`class_centers`; sums (unlike centres) can be added up
    over batches and across processes before :func:`centers_from_sums`.
    """
    _check_matrix("embeddings", embeddings)
    _check_labels(labels, embeddings.shape[0])
    if num_classes < 1:
        raise ValueError(f"`num_classes` must be >= 1, got {num_classes}.")
    _check_label_range(labels, num_classes, f"a table of {num_classes} classes")
    emb = embeddings.detach().float()
    return emb.new_zeros(num_classes, emb.shape[1]).index_add_(0, labels.long(), emb)


def centers_from_sums(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """L2-normalize per-class sums into centres; a class with no sample is an error."""
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"Classes {empty} have no sample, so they have no centre; every class of the "
            "student's task must appear in the data the centres are computed on."
        )
    return F.normalize(sums.float(), dim=1)


def class_centers(embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class centres: L2-normalized per-class sums of ``embeddings`` (``[num_classes, D]``).

    Raises ``ValueError`` when a class has no sample (rather than returning a zero row).
    """
    sums = class_sums(embeddings, labels, num_classes)
    counts = torch.bincount(labels.long(), minlength=num_classes)
    return centers_from_sums(sums, counts)


def batch_class_centers(embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-batch centres (the CVPR-era variant): a ``[num_classes, D]`` table whose rows of
    classes present in the batch are their normalized sums; absent classes get zero rows,
    which :func:`local_classifier_loss` never reads since it only uses local classes."""
    return F.normalize(class_sums(embeddings, labels, num_classes), dim=1)


def ncm_predict(embeddings: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Nearest-class-mean scores: cosine similarity of each embedding to each centre ``[B, C]``."""
    _check_matrix("embeddings", embeddings)
    _check_matrix("centers", centers)
    if embeddings.shape[1] != centers.shape[1]:
        raise ValueError(f"`embeddings` have dimension {embeddings.shape[1]} but `centers` {centers.shape[1]}.")
    return F.normalize(embeddings.float(), dim=1) @ F.normalize(centers.float(), dim=1).T


def teacher_confidence_weights(teacher_logits: torch.Tensor) -> torch.Tensor:
    """Instance weights from the teacher's confidence (TPAMI version of REFILLED).

    ``h_i = -log max_k softmax(teacher_logits_i)``, min-max normalized over the batch to
    ``[0, 1]`` (all zeros when every ``h_i`` is equal), and ``w_i = 2 * sigmoid(-h_i)``:
    confident teachers weigh 1, the least confident about 0.54. Detached, float32.
    """
    _check_matrix("teacher_logits", teacher_logits)
    return _confidence_impl(teacher_logits)


@_in_float32
def _confidence_impl(teacher_logits):
    h = -F.log_softmax(teacher_logits.detach(), dim=1).max(dim=1).values
    span = h.max() - h.min()
    h = (h - h.min()) / span if span > 0 else torch.zeros_like(h)
    return 2.0 * torch.sigmoid(-h)


def local_teacher_correct(
    teacher_embeddings: torch.Tensor,
    class_centers: torch.Tensor,
    labels: torch.Tensor,
    local_classes: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[B]`` bool: where the teacher's local classifier of :func:`local_classifier_loss`
    (the largest ``teacher_embeddings[i] @ class_centers[k]`` over the local classes ``k``:
    ``local_classes``, by default those present in ``labels``) picks ``labels[i]``. Its
    mean is the teacher's running top-1 on the batch, within the batch's classes."""
    local = _local_classes(local_classes, labels, class_centers.shape[0])
    with torch.no_grad():
        scores = (teacher_embeddings.float() @ class_centers.float().T).masked_fill(~local, float("-inf"))
    return scores.argmax(dim=1) == labels


def local_class_mask(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[num_classes]`` bool: the classes present in ``labels``. A mask, not
    `torch.unique(labels)`: a set of data-dependent size would read the labels back to
    the host every step."""
    return torch.zeros(num_classes, dtype=torch.bool, device=labels.device).index_fill_(0, labels, True)


def _local_classes(given: torch.Tensor | None, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``given`` (checked: a ``[num_classes]`` bool mask), else the classes of ``labels``."""
    if given is None:
        return local_class_mask(labels, num_classes)
    if given.dtype != torch.bool or given.shape != (num_classes,):
        raise ValueError(
            f"`local_classes` must be a bool mask of {num_classes} classes (local_class_mask of the batch's "
            f"labels), got {given.dtype} of shape {tuple(given.shape)}."
        )
    return given


def local_classifier_loss(
    student_logits: torch.Tensor,
    teacher_embeddings: torch.Tensor,
    class_centers: torch.Tensor,
    labels: torch.Tensor,
    *,
    tau: float = 2.0,
    weight: float = 100.0,
    instance_weights: torch.Tensor | None = None,
    local_classes: torch.Tensor | None = None,
) -> torch.Tensor:
    """REFILLED stage 2's distillation term (the cross-entropy is added by the caller).

    The local classes ``C_B`` are the classes present in the batch: those of ``labels``,
    or ``local_classes`` where the batch is larger than these rows (the global batch of
    several processes, each passing its own rows; it must hold every class of ``labels``). Teacher
    logits are ``teacher_embeddings @ class_centers[C_B].T`` (raw teacher features),
    student logits ``student_logits[:, C_B]``; the loss is ``weight * mean_i w_i
    KL(softmax(t_i / tau) || softmax(s_i / tau))`` (no ``tau**2`` factor, as the authors).

    Args:
        student_logits: ``[B, C]`` the student's head over all its classes.
        teacher_embeddings: ``[B, D_T]`` raw teacher embeddings.
        class_centers: ``[C, D_T]`` teacher class centres of the student's classes.
        labels: ``[B]`` class ids in ``[0, C)`` (checked with a clear error for CPU tensors;
            on an accelerator, out-of-range ids fail as a device-side assert, since reading
            them back would stall every step).
        tau: temperature ``tau2`` (> 0).
        weight: ``lambda`` (> 0).
        instance_weights: optional ``[B]`` weights ``w_i`` (default 1), e.g. from
            :func:`teacher_confidence_weights`, or :func:`local_teacher_correct` as 0/1
            weights to distil only the images the teacher's local classifier gets right
            (the mean still runs over all ``B`` images).
        local_classes: optional ``[C]`` bool mask of the local classes
            (:func:`local_class_mask` of the whole batch's labels).
    """
    _check_matrix("student_logits", student_logits)
    _check_matrix("teacher_embeddings", teacher_embeddings)
    _check_matrix("class_centers", class_centers)
    batch = _check_same_batch(student_logits=student_logits, teacher_embeddings=teacher_embeddings)
    _check_labels(labels, batch)
    _check_positive("tau", tau)
    _check_positive("weight", weight)
    if class_centers.shape[0] != student_logits.shape[1]:
        raise ValueError(
            f"`class_centers` has {class_centers.shape[0]} rows but `student_logits` has "
            f"{student_logits.shape[1]} classes; pass one centre per student class."
        )
    if class_centers.shape[1] != teacher_embeddings.shape[1]:
        raise ValueError(
            f"`class_centers` have dimension {class_centers.shape[1]} but `teacher_embeddings` "
            f"{teacher_embeddings.shape[1]}; compute the centres from the same teacher."
        )
    _check_label_range(labels, class_centers.shape[0], "`class_centers`")
    if instance_weights is not None and (instance_weights.dim() != 1 or instance_weights.shape[0] != batch):
        raise ValueError(f"`instance_weights` must be a 1-D tensor of {batch} weights.")
    local = _local_classes(local_classes, labels, class_centers.shape[0])
    return _local_classifier_impl(
        student_logits, teacher_embeddings, class_centers, local, tau, weight, instance_weights
    )


@_in_float32
def _local_classifier_impl(student_logits, teacher_embeddings, centers, local, tau, weight, inst_weights):
    # Masked (non-local) classes get -inf logits, so each softmax runs over the local
    # classes alone, and the KL sums over them alone.
    with torch.no_grad():
        log_p_t = F.log_softmax((teacher_embeddings @ centers.T / tau).masked_fill(~local, float("-inf")), dim=1)
    log_p_s = F.log_softmax((student_logits / tau).masked_fill(~local, float("-inf")), dim=1)
    kl = torch.where(local, log_p_t.exp() * (log_p_t - log_p_s), 0.0).sum(dim=1)
    if inst_weights is not None:
        kl = kl * inst_weights.detach()
    return weight * kl.mean()


# --------------------------------------------------------------------------- baselines


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, tau: float = 4.0) -> torch.Tensor:
    """Hinton KD: ``tau**2 * mean_i KL(softmax(t_i / tau) || softmax(s_i / tau))``.

    Both logits must be over the same label space (same number of columns).
    """
    _check_matrix("student_logits", student_logits)
    _check_matrix("teacher_logits", teacher_logits)
    _check_same_batch(student_logits=student_logits, teacher_logits=teacher_logits)
    _check_positive("tau", tau)
    if student_logits.shape[1] != teacher_logits.shape[1]:
        raise ValueError(
            f"`student_logits` has {student_logits.shape[1]} classes but `teacher_logits` "
            f"{teacher_logits.shape[1]}: KD needs one label space; use REFILLED or RKD across tasks."
        )
    return _kd_impl(student_logits, teacher_logits, tau)


@_in_float32
def _kd_impl(student_logits, teacher_logits, tau):
    log_p_t = F.log_softmax(teacher_logits.detach() / tau, dim=1)
    log_p_s = F.log_softmax(student_logits / tau, dim=1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1).mean() * tau**2


def rkd_loss(
    student_embeddings: torch.Tensor,
    teacher_embeddings: torch.Tensor,
    *,
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
) -> torch.Tensor:
    """Relational KD (Park et al. 2019): distance-wise plus angle-wise terms.

    Distance term: pairwise Euclidean distances of the raw embeddings, each side divided
    by its mean over distinct pairs, compared with smooth-L1 (mean over the ``B x B``
    matrix, diagonal included, as in the authors' code). Angle term: for every triple
    ``(i, j, k)`` the cosine between the normalized difference vectors ``e_i - e_j`` and
    ``e_k - e_j``, smooth-L1 over the ``B x B x B`` tensor. The teacher is detached;
    ``D_S`` and ``D_T`` may differ.
    """
    _check_matrix("student_embeddings", student_embeddings)
    _check_matrix("teacher_embeddings", teacher_embeddings)
    batch = _check_same_batch(student_embeddings=student_embeddings, teacher_embeddings=teacher_embeddings)
    if batch < 2:
        raise ValueError("`student_embeddings` must hold at least 2 rows: RKD compares pairs.")
    if distance_weight < 0 or angle_weight < 0:
        raise ValueError("`distance_weight` and `angle_weight` must be >= 0.")
    return _rkd_impl(student_embeddings, teacher_embeddings, distance_weight, angle_weight)


def _normalized_distances(e: torch.Tensor) -> torch.Tensor:
    d = _pairwise_distances(e)
    off_diagonal = ~torch.eye(e.shape[0], dtype=torch.bool, device=e.device)
    d = d * off_diagonal  # exact zeros on the diagonal
    pairs = e.shape[0] * (e.shape[0] - 1)  # the mean over distinct pairs, without a host-syncing boolean index
    return d / (d.sum() / pairs).clamp_min(1e-12)


def _angles(e: torch.Tensor) -> torch.Tensor:
    diff = F.normalize(e[None, :, :] - e[:, None, :], dim=2)  # diff[j, i] = e_i - e_j
    return torch.bmm(diff, diff.transpose(1, 2)).flatten()


@_in_float32
def _rkd_impl(student, teacher, distance_weight, angle_weight):
    teacher = teacher.detach()
    loss = student.new_zeros(())
    if distance_weight:
        with torch.no_grad():
            t_d = _normalized_distances(teacher)
        loss = loss + distance_weight * F.smooth_l1_loss(_normalized_distances(student), t_d)
    if angle_weight:
        with torch.no_grad():
            t_a = _angles(teacher)
        loss = loss + angle_weight * F.smooth_l1_loss(_angles(student), t_a)
    return loss
