"""Pictures of retrieval results: a PNG grid per query and a static HTML gallery that opens offline.

Grid row: query with hole | k neighbours (hole region outlined) | NN-filled | context-encoder fill | original.
Gallery: `index.html` (a thumbnail per query) linking to `q000.html`, ... (neighbours with distances and
source files). Everything is plain HTML + PNG files in one folder, linked by relative paths: no server,
no script, no network; the folder can be zipped and opened anywhere.
"""
from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from pretrain.dataset import denormalize, normalize
from pretrain.masks import apply_mask
from transfer.crops import EntryMetadata, load_crop, paste

HOLE_OUTLINE = (255, 64, 64)


@dataclass
class GalleryNeighbour:
    """One retrieved entry: its crop, distance to the query and where it came from."""

    image: Image.Image
    distance: float
    source: str  # the image file
    box: Sequence[float] = ()  # crop (left, top, right, bottom) in the file's pixels


@dataclass
class GalleryQuery:
    """One query and everything drawn for it; `scores` are shown as "name: value" (e.g. L1, PSNR)."""

    name: str
    holed: Image.Image
    original: Image.Image
    neighbours: list[GalleryNeighbour]
    nn_fill: Image.Image | None = None
    ce_fill: Image.Image | None = None
    source: str = ""
    scores: dict[str, str] = field(default_factory=dict)


def to_pil(image01: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> 8-bit RGB PIL image."""
    array = (image01.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)  # (H, W, 3)
    return Image.fromarray(array, mode="RGB")


def _tiles(q: GalleryQuery) -> list[tuple[Image.Image, str]]:
    tiles = [(q.holed, "query")]
    tiles += [(n.image, f"#{i + 1} d={n.distance:.3g}") for i, n in enumerate(q.neighbours)]
    if q.nn_fill is not None:
        tiles.append((q.nn_fill, "NN fill"))
    if q.ce_fill is not None:
        tiles.append((q.ce_fill, "CE fill"))
    tiles.append((q.original, "original"))
    return tiles


def query_grid(q: GalleryQuery, tile: int = 160) -> Image.Image:
    """One row of captioned tiles: query | neighbours | NN fill | CE fill (if any) | original."""
    tiles = _tiles(q)
    caption_h, pad = 14, 4
    grid = Image.new("RGB", (len(tiles) * (tile + pad) + pad, tile + caption_h + 2 * pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for i, (image, caption) in enumerate(tiles):
        x = pad + i * (tile + pad)
        grid.paste(image.resize((tile, tile), Image.BILINEAR), (x, pad))
        draw.text((x + 2, pad + tile + 1), caption, fill=(0, 0, 0), font=font)
    return grid


def _fmt_distance(d: float) -> str:
    return "inf" if math.isinf(d) else f"{d:.4g}"


_STYLE = """body{font-family:sans-serif;margin:1.5em;background:#fafafa;color:#222}
a{color:#05c}.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{background:#fff;border:1px solid #ddd;padding:6px;width:236px;font-size:12px}
.card img{width:110px;height:110px;image-rendering:auto}
figure{display:inline-block;margin:4px;background:#fff;border:1px solid #ddd;padding:4px;font-size:12px;
vertical-align:top;width:232px;overflow-wrap:anywhere}figure img{width:227px;height:227px}
.grid img{max-width:100%}nav{margin:0.6em 0}td,th{padding:2px 8px;text-align:left}"""


def _page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head>\n<body>\n{body}\n</body></html>\n")


def _figure(src: str, caption: str, tooltip: str = "") -> str:
    title = f' title="{html.escape(tooltip)}"' if tooltip else ""
    return (f'<figure><img src="{html.escape(src)}" alt="{html.escape(caption)}"{title}>'
            f"<figcaption>{caption}</figcaption></figure>")


def write_gallery(folder: str | Path, queries: Sequence[GalleryQuery], title: str = "Retrieval gallery",
                  distance_name: str = "distance", note: str = "") -> Path:
    """Write index.html, one page per query, their PNGs (img/) and grids (grids/) into `folder`.

    Returns the path of index.html. All links are relative, so the folder works from anywhere.
    """
    folder = Path(folder)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    (folder / "grids").mkdir(parents=True, exist_ok=True)
    cards = []
    for qi, q in enumerate(queries):
        stem = f"q{qi:03d}"
        page = f"{stem}.html"

        def save(image: Image.Image, part: str, stem: str = stem) -> str:
            rel = f"img/{stem}_{part}.png"
            image.save(folder / rel)
            return rel

        query_src, original_src = save(q.holed, "query"), save(q.original, "original")
        query_grid(q).save(folder / "grids" / f"{stem}.png")
        figures = [_figure(query_src, "query (hole)", q.source), _figure(original_src, "original", q.source)]
        nn_src = None
        if q.nn_fill is not None:
            nn_src = save(q.nn_fill, "nn")
            figures.append(_figure(nn_src, "NN fill (from #1)"))
        if q.ce_fill is not None:
            figures.append(_figure(save(q.ce_fill, "ce"), "context-encoder fill"))
        rows = []
        for ni, n in enumerate(q.neighbours):
            src = save(n.image, f"n{ni + 1}")
            name = html.escape(Path(n.source).name)
            box = ", ".join(f"{b:.0f}" for b in n.box)
            figures.append(_figure(src, f"#{ni + 1} {html.escape(distance_name)} {_fmt_distance(n.distance)}<br>{name}",
                                   n.source))
            rows.append(f"<tr><td>{ni + 1}</td><td>{_fmt_distance(n.distance)}</td><td title=\"{html.escape(n.source)}\">"
                        f"{name}</td><td>{box}</td></tr>")
        scores = " &middot; ".join(f"{html.escape(k)}: {html.escape(v)}" for k, v in q.scores.items())
        prev_link = f'<a href="q{qi - 1:03d}.html">&larr; previous</a> | ' if qi > 0 else ""
        next_link = f' | <a href="q{qi + 1:03d}.html">next &rarr;</a>' if qi + 1 < len(queries) else ""
        body = (f"<nav>{prev_link}<a href=\"index.html\">all queries</a>{next_link}</nav>\n"
                f"<h1>{html.escape(q.name)}</h1>\n<p>{html.escape(q.source)}</p>\n<p>{scores}</p>\n"
                f"<div class=\"grid\"><img src=\"grids/{stem}.png\" alt=\"grid {stem}\"></div>\n"
                f"<div>{''.join(figures)}</div>\n<h2>Neighbours</h2>\n<table><tr><th>rank</th>"
                f"<th>{html.escape(distance_name)}</th><th>source file</th><th>crop box (l, t, r, b)</th></tr>"
                f"{''.join(rows)}</table>")
        (folder / page).write_text(_page(f"{title}: {q.name}", body))
        thumbs = f'<img src="{query_src}" alt="query {qi}">' + (f'<img src="{nn_src}" alt="NN fill {qi}">' if nn_src else "")
        nearest = f"#1 {_fmt_distance(q.neighbours[0].distance)}" if q.neighbours else ""
        cards.append(f'<div class="card"><a href="{page}">{thumbs}</a><br><a href="{page}">{html.escape(q.name)}</a> '
                     f"{html.escape(Path(q.source).name)}<br>{scores}<br>{nearest}</div>")
    body = (f"<h1>{html.escape(title)}</h1>\n<p>{html.escape(note)}</p>\n"
            f"<p>{len(queries)} queries; each card: query with hole, and its NN fill. Distances: "
            f"{html.escape(distance_name)}.</p>\n<div class=\"cards\">{''.join(cards)}</div>")
    index = folder / "index.html"
    index.write_text(_page(title, body))
    return index


def _outline_hole(image: Image.Image, mask: torch.Tensor) -> Image.Image:
    """The neighbour crop with the region that fills the query's hole outlined."""
    rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
    out = image.copy()
    ImageDraw.Draw(out).rectangle((int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max())),
                                  outline=HOLE_OUTLINE, width=2)
    return out


@torch.no_grad()
def build_retrieval_gallery(folder: str | Path, result, metadata: EntryMetadata, size: int, mask: torch.Tensor, count: int,
                            model: nn.Module | None = None, device: torch.device | None = None,
                            distance_name: str = "squared L2 distance", title: str = "Context retrieval") -> Path:
    """Grids + HTML for the first `count` queries of a `transfer.retrieve.ContextRetrieval`."""
    queries = []
    for qi in range(min(count, len(result.query_ids))):
        qid = int(result.query_ids[qi])
        target = load_crop(metadata.path(qid), metadata.boxes[qid], size)  # (3, S, S)
        holed = target.masked_fill(mask.unsqueeze(0), 1.0)  # white hole, visible on any image
        nbr_images = [load_crop(metadata.path(int(i)), metadata.boxes[int(i)], size) for i in result.neighbour_ids[qi]]
        neighbours = [GalleryNeighbour(_outline_hole(to_pil(im), mask), float(d), metadata.path(int(i)),
                                       metadata.boxes[int(i)].tolist())
                      for im, d, i in zip(nbr_images, result.distances[qi], result.neighbour_ids[qi])]
        nn_fill = paste(nbr_images[0], target, mask)
        ce_fill = None
        if model is not None:
            dev = device or torch.device("cpu")
            x_in = apply_mask(normalize(target), mask)[None].to(dev)  # (1, 3, S, S)
            ce_fill = to_pil(paste(denormalize(model.to(dev)(x_in).float())[0].cpu(), target, mask))
        scores = {}
        for name, label in (("nn", "NN"), ("ce", "CE")):
            if name in result.per_query:
                l1, _, psnr = result.per_query[name][qi]
                scores[f"{label} L1"] = f"{100 * l1:.2f}%"
                scores[f"{label} PSNR"] = "inf dB" if math.isinf(psnr) else f"{psnr:.2f} dB"
        queries.append(GalleryQuery(f"query {qi} (image {qid})", to_pil(holed), to_pil(target), neighbours,
                                    to_pil(nn_fill), ce_fill, metadata.path(qid), scores))
    return write_gallery(folder, queries, title, distance_name,
                         note="Neighbours are matched on the features of the context only; the red box marks the "
                              "region pasted into the query's hole (from neighbour #1).")
