// The page: look a customer up, show recent purchases and the published list side by side.
// Plain DOM, no build step; every value is inserted as text (never as HTML).
"use strict";

const $ = (selector) => document.querySelector(selector);

function cell(row, value, className) {
  const td = row.insertCell();
  td.textContent = value === null || value === undefined ? "" : String(value);
  if (className) td.className = className;
  return td;
}

function fill(table, rows, columns) {
  const body = table.tBodies[0];
  body.replaceChildren();
  for (const item of rows) {
    const row = body.insertRow();
    for (const [key, className] of columns) cell(row, item[key], className);
  }
}

async function getJson(url) {
  const response = await fetch(url, { headers: { Accept: "application/json" } });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail || body);
    throw new Error(`${response.status}: ${detail}`);
  }
  return body;
}

async function showVersion() {
  try {
    const v = await getJson("/version");
    $("#version").textContent =
      `Serving version ${v.version} of ${v.table} · model ${v.model_version ?? "?"} · run ${v.run_id ?? "?"}` +
      ` · committed ${v.committed_at ?? "?"}`;
  } catch (error) {
    $("#version").textContent = `No version served yet (${error.message})`;
  }
}

async function showExamples() {
  try {
    const { customer_ids } = await getJson("/customers/examples?n=4");
    const box = $("#examples");
    box.replaceChildren();
    for (const id of customer_ids) {
      const link = document.createElement("a");
      link.href = `/?customer=${encodeURIComponent(id)}`;
      link.className = "example";
      link.textContent = id.slice(0, 12) + "…";
      link.title = id;
      link.addEventListener("click", (event) => {
        event.preventDefault();
        $("#customer-id").value = id;
        show(id);
      });
      box.append(link, " ");
    }
  } catch (error) {
    $("#examples").textContent = "none (nothing served yet)";
  }
}

const PRODUCT = [["article_id", "id"], ["prod_name"], ["product_type_name"], ["colour_group_name"], ["index_group_name"]];

async function show(customerId) {
  const id = customerId.trim();
  $("#message").textContent = "";
  if (!id) return;
  history.replaceState(null, "", `/?customer=${encodeURIComponent(id)}`);
  let list;
  try {
    list = await getJson(`/recommendations/${encodeURIComponent(id)}`);
  } catch (error) {
    $("#customer").hidden = true;
    $("#message").textContent = error.message;
    $("#message").className = "error";
    return;
  }
  $("#message").className = "";
  $("#customer").hidden = false;
  $("#customer-shown").textContent = id;
  $("#list-meta").textContent = list.known === false
    ? `Not a published customer: the best sellers instead (version ${list.version}).`
    : `Version ${list.version} · model ${list.model_version} · run ${list.run_id} · generated ${list.generated_at}`;
  fill($("#recommendations"), list.items, [["rank", "num"], ...PRODUCT, ["source", "source"]]);
  $("#purchases-note").textContent = "loading…";
  fill($("#purchases"), [], []);
  try {
    const { purchases, months } = await getJson(`/customers/${encodeURIComponent(id)}/purchases`);
    fill($("#purchases"), purchases, [["t_dat"], ...PRODUCT]);
    $("#purchases-note").textContent = purchases.length
      ? `The newest ${purchases.length} purchases of the last ${months} months of data.`
      : `No purchases in the last ${months} months of data.`;
  } catch (error) {
    $("#purchases-note").textContent = `Purchases unavailable: ${error.message}`;
  }
}

$("#find").addEventListener("submit", (event) => {
  event.preventDefault();
  show($("#customer-id").value);
});

showVersion();
showExamples();
const asked = new URLSearchParams(location.search).get("customer");
if (asked) {
  $("#customer-id").value = asked;
  show(asked);
}
