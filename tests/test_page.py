"""The page for people, in a real browser (headless Chromium from Debian, driven by Playwright): look a customer
up, see purchases and the 12 recommendations side by side, follow the links; errors are shown, not swallowed.

Chromium missing is a failure (CI installs it in .ci/run); set RECSYS_SKIP_BROWSER=1 to skip it locally.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

import published_lake
import scoring_data as data
from browser import CHROMIUM, chromium, serving, show_customer
from recsys import lookup, serve

K = 12


@pytest.fixture(scope="module")
def site(spark, tmp_path_factory):
    if not Path(CHROMIUM).exists():
        if os.environ.get("RECSYS_SKIP_BROWSER") == "1":
            pytest.skip("RECSYS_SKIP_BROWSER=1: the browser test is skipped")
        pytest.fail(f"no Chromium at {CHROMIUM}: `apt-get install chromium` (.ci/run does), "
                    "or RECSYS_SKIP_BROWSER=1 to skip the browser test locally")
    lake_dir = published_lake.build(spark, tmp_path_factory)
    config = published_lake.config_for(lake_dir, "serving.refresh_seconds=3600")
    with serving(serve.create_app(config)) as base_url:
        yield base_url, config


@pytest.fixture()
def page(tmp_path):
    with chromium(tmp_path / "profile") as browser:
        yield browser.new_page()


def table(page, selector: str) -> list[list[str]]:
    return [row.split("\t") for row in page.locator(f"{selector} tbody tr").all_inner_texts()]


def test_a_person_looks_a_customer_up(site, page, tmp_path):
    base_url, config = site
    customer = data.WITH_HISTORY[4]
    show_customer(page, base_url, customer)
    (expected,) = lookup.lookup(config, [customer])
    shown = table(page, "#recommendations")
    assert len(shown) == K
    assert [(int(r[0]), r[1], r[2], r[3], r[4], r[5], r[6]) for r in shown] == [
        (i["rank"], i["article_id"], i["prod_name"], i["product_type_name"], i["colour_group_name"],
         i["index_group_name"], i["source"]) for i in expected.items]
    assert page.locator("#customer-shown").inner_text() == customer
    assert f"Version {expected.version}" in page.locator("#list-meta").inner_text()
    bought = sorted(((d.isoformat(), a) for d, c, a, _, _ in data.transactions_rows() if c == customer), reverse=True)
    purchases = table(page, "#purchases")
    assert [(r[0], r[1]) for r in purchases] == bought and all(r[2].startswith("Article") for r in purchases)
    assert "Serving version 1" in page.locator("#version").inner_text()
    assert page.url.endswith(f"?customer={customer}")  # the view can be linked to
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    if os.environ.get("RECSYS_PAGE_SCREENSHOT"):
        page.screenshot(path=os.environ["RECSYS_PAGE_SCREENSHOT"], full_page=True)


def test_examples_links_and_errors(site, page):
    base_url, _ = site
    page.goto(base_url + "/")
    example = page.locator("#examples a").first
    example.wait_for()
    example.click()
    page.locator("#recommendations tbody tr").nth(K - 1).wait_for()
    assert page.locator("#customer-id").input_value() in data.CUSTOMER_IDS

    page.locator("#customer-id").fill("e" * 64)
    page.locator("#show").click()
    page.wait_for_function("document.querySelector('#message').textContent.startsWith('404')")
    assert page.locator("#customer").is_hidden()
    page.locator("#customer-id").fill("not-an-id")
    page.locator("#show").click()
    page.wait_for_function("document.querySelector('#message').textContent.startsWith('422')")

    assert page.locator("#report-link").get_attribute("href") == "/report"
    page.locator("#history-link").click()
    page.locator("#history tbody tr").first.wait_for()
    assert len(table(page, "#history")) == 2 and page.locator("#history tr.served").count() == 1
