"""FlexDiffuse test helpers: random tensors, and a plain step-by-step rendering of the original's §4.2–4.3 (shifted
slots) as simple loops, for the unit tests of lib_imgcond.flexdiffuse to compare against.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch

T = 77


def _rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


# --------------------------------------------------------------------------------------------------
# A plain step-by-step rendering of §4.2–4.3 (original, shifted slots), written as simple loops.


def ref_map(img, txt, reuse, priority):
    """Table of (image index, score) per slot; slot k holds text token k + 1, the last slot stays (0, 0)."""
    a = img / img.norm(dim=-1, keepdim=True)
    b = txt / txt.norm(dim=-1, keepdim=True)
    n_txt = txt.shape[0]
    candidates = []
    for i in range(img.shape[0]):
        logits = 100.0 * (a[i : i + 1] @ b.t())
        probs = logits.softmax(dim=-1)[0]
        for tok in range(1, n_txt):
            candidates.append((i, tok - 1, float(probs[tok])))
    table = [(0, 0.0)] * n_txt
    if priority == "direct":
        for i, slot, s in candidates:
            if i == slot:
                table[slot] = (i, s)
        return table
    if priority == "text_order":
        candidates.sort(key=lambda c: (c[1], -c[2], c[0]))
    else:
        candidates.sort(key=lambda c: (-c[2], c[1], c[0]))
    used = set()
    for i, slot, s in candidates:
        if table[slot][1] > 0 or i in used:
            continue
        table[slot] = (i, s)
        if not reuse:
            used.add(i)
    return table


def ref_blend(a, b):
    if a.max() >= 0:
        return torch.maximum(a, b) if b.max() >= 0 else a + b
    return torch.minimum(a, b)


def ref_weights(scores, p):
    n = len(scores)
    avg = sum(scores) / n
    w = torch.linspace(p.linear_start, p.linear_end, n)
    if p.clustered != 0:
        peaks = [
            t for t in range(1, n - 1) if scores[t] >= avg and scores[t - 1] <= scores[t] and scores[t] >= scores[t + 1]
        ]
        if peaks:
            valleys = [0] + [p1 + math.ceil((p2 - p1) / 2) for p1, p2 in itertools.pairwise(peaks)] + [n - 1]
            # tent = linear interpolation through valley, peak, valley, peak, …, valley
            xs, ys = [valleys[0]], [0.0]
            for k, pk in enumerate(peaks):
                xs += [pk, valleys[k + 1]]
                ys += [1.0, 0.0]
            tent = torch.tensor(np.interp(np.arange(n), xs, ys), dtype=torch.float32)
            w = ref_blend(w, tent * p.clustered)
    if p.threshold_mult != 0:
        th = torch.tensor([p.threshold_mult if s >= p.threshold_floor else 0.0 for s in scores], dtype=torch.float32)
        w = ref_blend(w, th)
    if p.header_max < 1:
        h = float(w[0])
        w[0] = min(h, p.header_max) if h >= 0 else max(h, -p.header_max)
    return w


def ref_tween(txt, img, table, w, max_guidance):
    out = torch.zeros_like(txt)
    for t, (i, s) in enumerate(table):
        iw = min(float(w[t]), max_guidance)
        if iw == 0:
            out[t] = txt[t]
        elif abs(iw) >= 1.0 - s:
            out[t] = img[i]
        else:
            out[t] = txt[t] + (img[i] - txt[t]) * iw
    return out


def ref_concept(base, concept, img, out, threshold):
    concept_table = ref_map(img, concept, reuse=False, priority="text_order")
    base_table = ref_map(concept, base, reuse=True, priority="best_fit")
    out = out.clone()
    for tok, (c, s) in enumerate(base_table, 1):
        if c - 1 < 0:
            continue
        if s > threshold:
            out[tok] = img[concept_table[c - 1][0]]
    return out


def ref_guide(txt, img, p):
    table = ref_map(img, txt, p.reuse, p.priority)
    w = ref_weights([s for _, s in table], p)
    return ref_tween(txt, img, table, w, p.max_guidance), table, w
