"""One DDPM step for a group of jobs in ONE batched forward, every row at its own step.

The arithmetic is the sampler's (models/sampler.py ``sample``), done per row: each job brings its
own noise condition ``r``, step coefficients, guidance scale and rescale, so jobs with different
step counts, shifts, guidance or progress share a forward. Only the network and the latent shape
must match (``JobState.group_key``).

Forward layout for N conditional rows of which G are guided (guidance != 1):
    x_in = [x (N rows), x of the guided rows (G rows)], conditions = [cond (N), uncond (G)]
so rows with guidance 1 pay for no unconditional half, and a group whose rows are all guided has
the layout [x, x] / [cond, uncond] that a one-request batch always had. ``pad_to`` repeats row 0 up
to a bucket size (CUDA graphs replay a recorded batch size); every operation of the networks and
of the guidance is per sample, so padding rows never change real rows, and their outputs are
dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from models.job_state import JobState
from models.sampler import guided_eps

Forward = Callable[..., Tensor]  # forward(x [B, C, H, W], r [B], **conditions [B, ...]) -> eps


def bucket_size(rows: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= rows (``buckets`` ascending); rows itself beyond the largest."""
    return next((b for b in buckets if b >= rows), rows)


def pad_rows(tensor: Tensor, rows: int) -> Tensor:
    """``tensor`` [B, ...] with row 0 repeated to ``rows`` rows (unchanged when B >= rows)."""
    extra = rows - tensor.shape[0]
    if extra <= 0:
        return tensor
    return torch.cat([tensor, tensor[:1].expand(extra, *tensor.shape[1:])])


def denoise_step(
    forward: Forward, states: Sequence[JobState], pad_to: Callable[[int], int] | None = None
) -> list[Tensor]:
    """Advance every state by one step of its current stage; return each state's x0 [n, C, H, W].

    All states must share ``group_key`` and have a step left. Each state's ``x``, ``x0`` and
    ``position.step`` are updated only after the whole step has succeeded; if anything raises
    (e.g. out of memory) the states and their generators are left exactly as they were, so the
    step can be retried with a smaller group.
    """
    sizes = [s.images for s in states]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    n = sum(sizes)
    x = torch.cat([s.x for s in states])
    r = torch.cat([s.position.r[s.position.step].expand(s.images) for s in states])
    names = list(states[0].conditioning.cond)
    inputs = {k: torch.cat([s.conditioning.cond[k] for s in states]) for k in names}
    guided = [i for i, s in enumerate(states) if s.conditioning.guided]
    if guided:
        rows = torch.tensor(
            [starts[i] + j for i in guided for j in range(sizes[i])], device=x.device
        )
        x_in, r_in = torch.cat([x, x[rows]]), torch.cat([r, r[rows]])
        inputs = {
            k: torch.cat([inputs[k], *(states[i].conditioning.uncond[k] for i in guided)])
            for k in names
        }
    else:
        x_in, r_in = x, r
    total = x_in.shape[0]
    if pad_to is not None:
        size = pad_to(total)
        x_in, r_in = pad_rows(x_in, size), pad_rows(r_in, size)
        inputs = {k: pad_rows(v, size) for k, v in inputs.items()}
    eps_in = forward(x_in, r_in, **inputs)[:total].float()
    eps = eps_in[:n]
    if guided:
        scale = _per_row(states, guided, lambda s: s.conditioning.scale, x.device)
        rho = _per_row(states, guided, lambda s: s.conditioning.rho, x.device)
        eps = eps.index_copy(0, rows, guided_eps(eps[rows], eps_in[n:], scale, rho))

    def coefficient(name: str) -> Tensor:
        """One step coefficient per row: [N, 1, 1, 1] float32."""
        values = [
            getattr(s.position.coefficients[s.position.step], name)
            for s in states
            for _ in range(s.images)
        ]
        return torch.tensor(values, dtype=torch.float32, device=x.device).view(-1, 1, 1, 1)

    x0 = (x - coefficient("b") * eps) / coefficient("a")
    saved = [g.get_state() for s in states for g in s.generators]
    try:
        # Every image draws its step noise, the last step's too (sampler.py: same order as ever).
        z = torch.stack(
            [torch.randn(tuple(x.shape[1:]), generator=g) for s in states for g in s.generators]
        ).to(x.device)
        x_next = coefficient("a_next") * x0 + coefficient("c") * eps + coefficient("sigma") * z
    except BaseException:
        for g, state in zip((g for s in states for g in s.generators), saved, strict=True):
            g.set_state(state)
        raise
    out = []
    for s, start, size in zip(states, starts, sizes, strict=True):
        s.x0 = x0[start : start + size]
        if not s.position.last:
            s.x = x_next[start : start + size]
        s.position.step += 1
        out.append(s.x0)
    return out


def _per_row(
    states: Sequence[JobState],
    which: Sequence[int],
    value: Callable[[JobState], float],
    device: torch.device,
) -> Tensor:
    """A per-job setting repeated for each image of the jobs ``which``: [G] float32."""
    return torch.tensor(
        [float(value(states[i])) for i in which for _ in range(states[i].images)], device=device
    )
