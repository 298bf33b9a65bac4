"""The HTML gallery opens offline: every page rendered in headless Chromium shows every one of its images."""
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from transfer.gallery import GalleryNeighbour, GalleryQuery, query_grid, write_gallery

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage"]
# Injected into a copy of each page (the gallery itself has no script): after `load`, every <img> has either
# decoded or failed, so counting the decoded ones says whether the page shows all its pictures.
CHECK_SCRIPT = ("<script>window.addEventListener('load', () => { const imgs = Array.from(document.images); "
                "document.body.setAttribute('data-total', imgs.length); document.body.setAttribute('data-loaded', "
                "imgs.filter(i => i.complete && i.naturalWidth > 0).length); });</script>")


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("headless Chromium is needed to check the HTML gallery renders, and none was found on PATH. "
                "Install Debian's package: apt-get install -y chromium (.ci/run does this).")


def rendered_image_counts(page: Path, profile: Path) -> tuple[int, int]:
    """(images loaded, images on the page) for `page` as headless Chromium renders it from disk."""
    probe = page.with_name(f"_check_{page.name}")  # same folder, so the page's relative links resolve the same
    probe.write_text(page.read_text().replace("</body>", CHECK_SCRIPT + "</body>"))
    try:
        run = subprocess.run([_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom",
                              probe.resolve().as_uri()], capture_output=True, text=True, timeout=90)
    finally:
        probe.unlink()
    match = re.search(r'data-total="(\d+)" data-loaded="(\d+)"', run.stdout)
    assert match, f"Chromium did not render {page} (rc {run.returncode}): {run.stderr[-2000:]}"
    return int(match.group(2)), int(match.group(1))


def _tile(seed: int, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8), mode="RGB")


@pytest.fixture(scope="module")
def gallery(tmp_path_factory) -> Path:
    queries = []
    for qi in range(3):
        neighbours = [GalleryNeighbour(_tile(10 * qi + n), 0.5 * n, f"/data/some dir/n0{qi}_{n}<&>.JPEG", (0, 0, 64, 64))
                      for n in range(4)]
        queries.append(GalleryQuery(f"query {qi}", _tile(100 + qi), _tile(200 + qi), neighbours, _tile(300 + qi),
                                    _tile(400 + qi) if qi == 0 else None, f"/data/q{qi}.jpg",
                                    {"NN L1": "12.00%", "NN PSNR": "inf dB"}))
    index = write_gallery(tmp_path_factory.mktemp("gallery") / "gallery", queries, "test gallery", "squared L2")
    return index.parent


def test_every_gallery_page_shows_all_its_images_in_headless_chromium(gallery, tmp_path):
    pages = [gallery / "index.html"] + sorted(gallery.glob("q*.html"))
    assert len(pages) == 4
    for page in pages:
        loaded, total = rendered_image_counts(page, tmp_path / "profile")
        expected = len(re.findall(r"<img ", page.read_text()))
        assert total == expected > 0, page
        assert loaded == total, f"{page.name}: only {loaded} of {total} images loaded"


def test_the_image_check_catches_a_missing_image(gallery, tmp_path):
    broken = gallery / "broken.html"
    broken.write_text('<!DOCTYPE html><html><body><img src="img/q000_query.png"><img src="img/missing.png"></body></html>')
    try:
        assert rendered_image_counts(broken, tmp_path / "profile") == (1, 2)
    finally:
        broken.unlink()


def test_links_are_relative_and_point_at_files_in_the_folder(gallery):
    for page in gallery.glob("*.html"):
        text = page.read_text()
        targets = re.findall(r'(?:src|href)="([^"]+)"', text)
        assert targets, page
        for target in targets:
            assert "://" not in target and not target.startswith("/"), f"{page.name}: non-relative link {target}"
            assert (gallery / target).is_file(), f"{page.name}: broken link {target}"
    q0 = (gallery / "q000.html").read_text()
    assert "n00_1&lt;&amp;&gt;.JPEG" in q0 and "<&>" not in q0  # file names are escaped
    assert "context-encoder fill" in q0 and "context-encoder fill" not in (gallery / "q001.html").read_text()


def test_grid_has_one_tile_per_column():
    q = GalleryQuery("q", _tile(1), _tile(2), [GalleryNeighbour(_tile(3 + i), 1.0, "x.jpg") for i in range(5)], _tile(9),
                     _tile(10))
    grid = query_grid(q, tile=50)
    assert grid.width == 9 * (50 + 4) + 4  # query + 5 neighbours + NN fill + CE fill + original


def test_a_retrieval_run_gallery_renders_completely(tiny_voc, tmp_path):
    from transfer.retrieve import RetrieveConfig, main

    main(RetrieveConfig(init="hog", data=str(tiny_voc), size=64, hog_cell=8, queries=0, k=2, gallery=2,
                        out=str(tmp_path / "run")))
    folder = tmp_path / "run" / "gallery"
    for page in (folder / "index.html", folder / "q000.html", folder / "q001.html"):
        loaded, total = rendered_image_counts(page, tmp_path / "profile")
        assert loaded == total > 0, f"{page.name}: only {loaded} of {total} images loaded"
