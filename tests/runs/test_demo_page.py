"""``qdistill demo`` writes index.html: every run's row, accuracy against size with and without KD, the
teacher's line, what KD changed, and a working link to each run's report.html."""

from __future__ import annotations

import html
import re


def test_index_links_every_run_and_shows_its_numbers(small_demo):
    out, rows = small_demo
    page = (out / "index.html").read_text()
    links = re.findall(r'<a href="([^"#]+)">([^<]+)</a>', page)
    assert [name for _, name in links] == [row["run"] for row in rows[1:]]
    assert all((out / href).is_file() and (out / href).name == "report.html" for href, _ in links)
    teacher = rows[0]["accuracy"]
    for row in rows[1:]:
        cells = re.search(rf'<tr( class="kept")?><td><a href="[^"]+">{row["run"]}</a></td>(.*?)</tr>', page)
        assert cells, row["run"]
        assert f"<td>{100 * row['accuracy']:.2f}%</td>" in cells.group(2)
        assert bool(cells.group(1)) == (row["accuracy"] >= teacher - 0.005)


def test_index_plots_kd_and_no_kd_against_the_teacher(small_demo):
    out, rows = small_demo
    page = (out / "index.html").read_text()
    plot = re.search(r'aria-label="test accuracy against size".*?</svg>', page, re.S).group(0)
    texts = {html.unescape(text) for text in re.findall(r"<text[^>]*>([^<]*)</text>", plot)}
    teacher_kib = rows[0]["size_bytes"] / 1024
    assert {"with KD", "without KD (QAT only)", f"teacher ({teacher_kib:.0f} KiB fp32)", "test accuracy (%)"} <= texts
    assert {row["run"] for row in rows[1:]} <= texts
    kd, plain = (next(row for row in rows if row["run"] == name) for name in ("w8a8_kd", "w8a8_qat"))
    change = 100 * (kd["accuracy"] - plain["accuracy"])
    assert re.search(rf"<td>W8A8</td>.*?<td><span[^>]*>{change:+.2f} pp</span></td>", page)
