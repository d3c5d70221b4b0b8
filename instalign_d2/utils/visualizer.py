"""Pictures of an InstAlign answer that a person reads at a glance (the paper's Fig. 6).

Left: the merged mask over the image (or "NO TARGET"). Right: the top instances, each in its own
colour with its relevance score. Below: the expression, each word highlighted in the colour of
the instance whose query aligns with it most (the POA relevance R of Eq. 1, summed over the
word's sub-word tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Distinct, colour-blind-friendly colours (Okabe-Ito), one per instance.
INSTANCE_COLOURS: Tuple[Tuple[int, int, int], ...] = (
    (230, 159, 0),
    (86, 180, 233),
    (0, 158, 115),
    (240, 228, 66),
    (0, 114, 178),
    (213, 94, 0),
    (204, 121, 167),
)
MERGED_COLOUR = (255, 64, 64)


def instance_colour(k: int) -> Tuple[int, int, int]:
    """The colour of the ``k``-th instance (0-based) in every picture and on the demo page."""
    return INSTANCE_COLOURS[k % len(INSTANCE_COLOURS)]


@dataclass
class WordAlignment:
    word: str
    weights: np.ndarray  # (n_instances,) relevance of this word to each instance


@lru_cache(maxsize=4)
def _font(size: int) -> ImageFont.ImageFont:
    try:  # matplotlib (a detectron2 dependency) ships DejaVu Sans
        from matplotlib import font_manager  # noqa: PLC0415  (slow import, only to find a font)

        return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)
    except Exception:  # pragma: no cover - depends on the installed fonts
        return ImageFont.load_default()


def align_words(
    tokenizer, sentence: str, token_weights: np.ndarray, max_tokens: int
) -> List[WordAlignment]:
    """Per-word relevance to each instance: token weights summed over each word's tokens.

    Args:
        token_weights: (n_instances, L) — R of Eq. 1 for the kept instances, over the L tokens.
    """
    encoded = tokenizer(
        sentence, truncation=True, max_length=max_tokens, return_offsets_mapping=True
    )
    token_weights = (
        np.asarray(token_weights, dtype=np.float64).reshape(-1, token_weights.shape[-1])
        if len(token_weights)
        else np.zeros((0, max_tokens))
    )
    n = token_weights.shape[0]
    words: List[WordAlignment] = []
    current_word, current_span = None, None
    for position, (word_id, (start, end)) in enumerate(
        zip(encoded.word_ids(), encoded["offset_mapping"])
    ):
        if word_id is None or position >= token_weights.shape[1]:
            continue  # <s>, </s>
        weight = token_weights[:, position] if n else np.zeros(0)
        if word_id != current_word:
            current_word, current_span = word_id, [start, end]
            words.append(WordAlignment(sentence[start:end].strip(), weight.copy()))
        else:
            current_span[1] = end
            words[-1].word = sentence[current_span[0] : current_span[1]].strip()
            words[-1].weights = words[-1].weights + weight
    return words


def aligned_words(
    words: Sequence[WordAlignment], top_k: int = 2, min_share: float = 0.5
) -> List[List[int]]:
    """For each instance, the indices of its ``top_k`` most aligned words (best first) that carry
    at least ``min_share`` of its best word's weight."""
    if not words or len(words[0].weights) == 0:
        return []
    matrix = np.stack([w.weights for w in words], axis=1)  # (n_instances, n_words)
    chosen = []
    for row in matrix:
        order = [int(i) for i in np.argsort(-row, kind="stable")[:top_k]]
        chosen.append([i for i in order if row.max() > 0 and row[i] >= min_share * row.max()])
    return chosen


def highlighted_words(
    words: Sequence[WordAlignment], top_k: int = 2, min_share: float = 0.5
) -> List[Optional[int]]:
    """For each word, the instance it is highlighted for (or None); a word aligned with several
    instances goes to the one with the larger weight."""
    owner: List[Optional[int]] = [None] * len(words)
    for instance, indices in enumerate(aligned_words(words, top_k, min_share)):
        for index in indices:
            current = owner[index]
            if current is None or words[index].weights[instance] > words[index].weights[current]:
                owner[index] = instance
    return owner


def _boxes_overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _overlay(image: np.ndarray, mask: np.ndarray, colour, alpha: float) -> np.ndarray:
    out = image.astype(np.float32)
    out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(colour, np.float32)
    return out.astype(np.uint8)


def _outline(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def draw_answer(
    image_rgb: np.ndarray,
    sentence: str,
    output: dict,
    tokenizer=None,
    max_tokens: int = 20,
    max_instances: int = 3,
    nt_threshold: float = 0.5,
    mask_threshold: float = 0.5,
    max_panel_side: Optional[int] = None,
) -> Image.Image:
    """Render one model answer (docs/interfaces.md §3) for ``sentence`` on ``image_rgb`` (H, W, 3).

    ``max_panel_side`` shrinks large images so that the picture fits a page (None: full size).
    """
    height, width = image_rgb.shape[:2]
    scale = max(1.0, 320 / max(height, width))  # small images are enlarged so the text fits
    if max_panel_side:
        scale = min(scale, max_panel_side / max(height, width))
    panel_w, panel_h = int(round(width * scale)), int(round(height * scale))
    font, small = _font(max(14, panel_h // 20)), _font(max(12, panel_h // 26))

    nt_prob = float(output["nt_prob"])
    no_target = nt_prob > nt_threshold
    merged = (
        np.asarray(
            output["ref_seg"].cpu() if hasattr(output["ref_seg"], "cpu") else output["ref_seg"]
        )
        > mask_threshold
    )
    left = image_rgb.copy()
    if not no_target:
        left = _overlay(left, merged, MERGED_COLOUR, 0.5)
        left[_outline(merged)] = MERGED_COLOUR

    instances = output.get("instances")
    kept = min(max_instances, len(instances)) if instances is not None else 0
    right = (image_rgb.astype(np.float32) * 0.6).astype(np.uint8)
    labels = []
    for k in range(kept):
        mask = instances.pred_masks[k].cpu().numpy().astype(bool)
        colour = instance_colour(k)
        right = _overlay(right, mask, colour, 0.6)
        right[_outline(mask)] = colour
        ys, xs = np.nonzero(mask)
        anchor = (float(xs.mean()), float(ys.min())) if len(xs) else (0.0, 0.0)
        labels.append((anchor, f"#{k + 1} {float(instances.scores[k]):.2f}", colour))

    # Enlarged: nearest keeps the outlines crisp; shrunk: bilinear averages, so they do not vanish.
    resample = Image.NEAREST if scale >= 1 else Image.BILINEAR
    panels = [Image.fromarray(p).resize((panel_w, panel_h), resample) for p in (left, right)]
    words: List[WordAlignment] = []
    if tokenizer is not None and kept and instances.has("token_weights"):
        words = align_words(
            tokenizer, sentence, instances.token_weights[:kept].cpu().numpy(), max_tokens
        )
    owners = highlighted_words(words) if words else []

    margin, line_h = 8, int(font.size * 1.5)
    title_h = small.size + margin  # panel titles above the images
    text_lines = _layout_words(sentence, words, owners, font, 2 * panel_w + margin - 2 * margin)
    canvas_h = title_h + panel_h + margin * 3 + line_h * (len(text_lines) + 1) + small.size * 2
    canvas = Image.new("RGB", (2 * panel_w + 3 * margin, canvas_h), (255, 255, 255))
    top = margin + title_h
    canvas.paste(panels[0], (margin, top))
    canvas.paste(panels[1], (2 * margin + panel_w, top))
    draw = ImageDraw.Draw(canvas)
    draw.text((margin, margin), "merged mask (answer)", fill=(80, 80, 80), font=small, anchor="lt")
    draw.text(
        (2 * margin + panel_w, margin),
        f"top instances ({kept} shown, relevance score)",
        fill=(80, 80, 80),
        font=small,
        anchor="lt",
    )

    placed: List[Tuple[float, float, float, float]] = []
    for (x, y), text, colour in labels:
        px, py = 2 * margin + panel_w + x * scale, max(top, top + y * scale - small.size - 2)
        box = draw.textbbox((px, py), text, font=small, anchor="lt")
        width, height = box[2] - box[0], box[3] - box[1]
        px = min(px, 2 * margin + 2 * panel_w - width)  # keep the label inside the panel
        # Instances often overlap (several queries on one object): move a label down until it
        # hides no earlier one, so every score stays readable.
        while any(_boxes_overlap((px, py, px + width, py + height), other) for other in placed):
            py += height + 2
        box = draw.textbbox((px, py), text, font=small, anchor="lt")
        placed.append(box)
        draw.rectangle(box, fill=colour)
        draw.text((px, py), text, fill=(0, 0, 0), font=small, anchor="lt")
    if no_target:
        banner = f"NO TARGET  (p = {nt_prob:.2f})"
        cx, cy = margin + panel_w / 2, top + panel_h / 2
        box = draw.textbbox((cx, cy), banner, font=font, anchor="mm")
        draw.rectangle((box[0] - 6, box[1] - 4, box[2] + 6, box[3] + 4), fill=(0, 0, 0))
        draw.text((cx, cy), banner, fill=(255, 255, 255), font=font, anchor="mm")

    y = top + panel_h + margin
    for line in text_lines:
        x = margin
        for text, colour in line:
            box = draw.textbbox((x, y), text, font=font, anchor="lt")
            if colour is not None:
                draw.rectangle((box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2), fill=colour)
            draw.text((x, y), text, fill=(0, 0, 0), font=font, anchor="lt")
            x = box[2] + font.size // 2
        y += line_h
    caption = f"p(no target) = {nt_prob:.2f}    merged mask: {'empty (no target)' if no_target else f'{int(merged.sum())} px'}"
    if kept:
        caption += f"    instances shown: {kept}"
    draw.text((margin, y + margin // 2), caption, fill=(80, 80, 80), font=small, anchor="lt")
    return canvas


def _layout_words(sentence, words, owners, font, max_width):
    """Wrap the expression into lines of (word, highlight colour or None)."""
    items = [(w.word, instance_colour(o) if o is not None else None) for w, o in zip(words, owners)]
    if not items:
        items = [(word, None) for word in sentence.split()] or [("(empty expression)", None)]
    lines, line, width = [], [], 0
    space = font.size // 2
    for text, colour in items:
        w = font.getlength(text) + space
        if line and width + w > max_width:
            lines.append(line)
            line, width = [], 0
        line.append((text, colour))
        width += w
    lines.append(line)
    return lines
