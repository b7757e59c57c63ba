"""RefDrop "consistent batch" (StoryDiffusion-style consistent self-attention), pure torch.

Inside one group of images (the cond rows of one batch chunk) every image's self-attention also attends to a seeded
random subset of the OTHER images' tokens, blended with the RFG coefficient c:

    out_i = (1 − c)·Attn(Q_i, K_i, V_i) + c·Attn(Q_i, [K_i; S_i(K_others)], [V_i; S_i(V_others)])

S_i picks round(r·(B − 1)·N) of the (B − 1)·N tokens of the other images, without replacement and the same tokens for K
and V; image i's own tokens appear once (as K_i). The subset is drawn from a generator seeded by the generation seed and
the layer/evaluation, so a run is reproducible. Tensors are batch-first with tokens in dim −2: (B, N, C) as a UNet's
attn1 gets them, or (B, heads, N, head_dim).

With several batches (batch count > 1) the first batch can serve as the reference of the later ones: it keeps a pooled
subset of its tokens per layer/evaluation (`pool_indices`, the same count a later image would take from the others),
and every image of a later batch attends to [K_i; K_pool] instead.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import torch

from lib_imgcond.common.errors import ArgumentError

SETS = ("each batch its own set", "first batch is the reference for later batches")


def derive_seed(seed: int, *parts) -> int:
    """A 63-bit seed from the generation seed and the site (pass, evaluation, layer, branch, …); stable across runs
    and processes (no Python `hash`)."""
    text = repr((int(seed), *(str(x) for x in parts))).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & ((1 << 63) - 1)


def check_batch(batch: int) -> None:
    if batch < 2:
        raise ArgumentError(
            "refdrop.mode",
            "Batch",
            f"a batch size of at least 2 (this batch has {batch} image): consistent batch shares self-attention "
            "tokens between the images of one batch; raise the batch size or use another mode",
        )


def check_rate(rate: float) -> float:
    if not 0.0 <= float(rate) <= 1.0:
        raise ArgumentError("refdrop.rate", rate, "a number in [0, 1]")
    return float(rate)


def shared_count(batch: int, tokens: int, rate: float) -> int:
    """How many tokens of the other images each image attends to: round(r·(B − 1)·N)."""
    check_batch(batch)
    return round(check_rate(rate) * (batch - 1) * tokens)


def _generator(seed: int, device) -> torch.Generator:
    device = torch.device(device if device is not None else "cpu")
    return torch.Generator(device=device).manual_seed(int(seed))


def sample_indices(batch: int, tokens: int, rate: float, seed: int, device=None) -> torch.Tensor:
    """(B, m) flat indices into the B·N tokens of a group (image-major): row i holds m distinct tokens of the other
    images, never image i's own. m = `shared_count`; (B, 0) when it rounds to 0."""
    m = shared_count(batch, tokens, rate)
    others = (batch - 1) * tokens
    if m == 0:
        return torch.zeros(batch, 0, dtype=torch.long, device=device)
    draw = torch.rand(batch, others, generator=_generator(seed, device), device=device)
    pick = draw.argsort(dim=1)[:, :m] if m < others else torch.arange(others, device=device).expand(batch, others)
    image = pick // tokens
    image = image + (image >= torch.arange(batch, device=device)[:, None]).long()  # skip row i's own image
    return image * tokens + pick % tokens


def pool_indices(batch: int, tokens: int, rate: float, seed: int, device=None) -> torch.Tensor:
    """(m,) distinct flat indices into the B·N tokens of a group: the pooled subset a first batch keeps for the later
    batches (m = `shared_count`, the count each image takes from the others)."""
    m = shared_count(batch, tokens, rate)
    if m == 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    draw = torch.rand(batch * tokens, generator=_generator(seed, device), device=device)
    return draw.argsort()[:m]


def gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """K or V (B, …, N, C), flat token indices `idx` (B, m) or (m,) into its B·N tokens → (B, …, m, C) or
    (1, …, m, C)."""
    x = t.movedim(0, -3)  # (…, B, N, C)
    flat = x.reshape(*x.shape[:-3], x.shape[-3] * x.shape[-2], x.shape[-1])
    picked = flat[..., idx, :]  # (…, B, m, C) or (…, m, C)
    if idx.dim() == 1:
        picked = picked.unsqueeze(-3)
    return picked.movedim(-3, 0)


def joint(k: torch.Tensor, v: torch.Tensor, shared: tuple[torch.Tensor, torch.Tensor]):
    """[K; K_shared], [V; V_shared] along the tokens; a shared pair with one row is given to every row."""
    ks, vs = shared
    b = k.shape[0]
    if ks.shape[0] != b:
        ks, vs = ks.expand(b, *ks.shape[1:]), vs.expand(b, *vs.shape[1:])
    return torch.cat([k, ks.to(k.dtype)], dim=-2), torch.cat([v, vs.to(v.dtype)], dim=-2)


def blend(base: torch.Tensor, shared_out: torch.Tensor, c: float) -> torch.Tensor:
    """(1 − c)·base + c·shared_out, in place on `base` (returned)."""
    return base.lerp_(shared_out.to(base.dtype), float(c))


def consistent_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    c: float,
    shared: tuple[torch.Tensor, torch.Tensor] | None,
    attn: Callable,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """The blended output for one group: `base` (Attn(Q, K, V), computed with `attn` when not given) where c = 0 or
    nothing is shared, else (1 − c)·base + c·Attn(Q, [K; K_s], [V; V_s]). `attn(q, k, v)` is the kernel."""
    if base is None:
        base = attn(q, k, v)
    if c == 0 or shared is None or shared[0].shape[-2] == 0:
        return base
    kj, vj = joint(k, v, shared)
    return blend(base, attn(q, kj, vj), c)


def others_shared(k: torch.Tensor, v: torch.Tensor, rate: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """S_i(K_others), S_i(V_others) for every row i of one group (B, …, N, C) → (B, …, m, C) each."""
    idx = sample_indices(k.shape[0], k.shape[-2], rate, seed, k.device)
    return gather(k, idx), gather(v, idx)


def pooled(k: torch.Tensor, v: torch.Tensor, rate: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first batch's kept tokens of one group: (1, …, m, C) each."""
    idx = pool_indices(k.shape[0], k.shape[-2], rate, seed, k.device)
    return gather(k, idx), gather(v, idx)


def pool_bytes(shapes: Sequence[tuple[int, int]], evaluations: int, batch: int, rate: float, branches: int, el: int):
    """Host bytes a first batch keeps: K+V of `shared_count` tokens per (tokens, channels) layer and evaluation."""
    per_eval = sum(shared_count(batch, int(n), rate) * int(ch) for n, ch in shapes)
    return 2 * per_eval * int(evaluations) * int(branches) * int(el)


def prompts_with_lines(prompts: Sequence[str], batch_size: int, text: str) -> list[str]:
    """Line j of `text` appended (after ", ") to the prompt of batch image j, in every batch; blank lines (and
    images past the last line) keep their prompt. More lines than images in a batch is refused."""
    lines = [x.strip() for x in (text or "").splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    if len(lines) > batch_size:
        raise ArgumentError(
            "refdrop.prompt_lines",
            f"{len(lines)} lines",
            f"at most one line per image of the batch (batch size {batch_size})",
        )
    out = []
    for index, prompt in enumerate(prompts):
        j = index % batch_size
        line = lines[j] if j < len(lines) else ""
        out.append(prompt if not line else (f"{prompt}, {line}" if prompt.strip() else line))
    return out
