// The admin page: policy versions with status and feedback (table + inline SVG chart),
// activate / roll back, and live request and token rates from two scrapes of /metrics.

import {
  api,
  apiErrorHandler,
  el,
  formatPercent,
  formatRate,
  isAdmin,
  setupSignIn,
  svg,
} from "./api.js";
import { rates, snapshot } from "./metrics.js";

const $ = (id) => document.getElementById(id);
const SCRAPE_MS = 2000;
const POLICIES_MS = 10000;

let admin = false;
let policies = [];
let busy = false;
let lastScrape = null;
let timers = [];

function setStatus(text, kind = "") {
  $("admin-status").textContent = text;
  $("admin-status").className = `admin-status ${kind}`;
}

const handleApiError = apiErrorHandler({ signOut, setStatus });

// ----------------------------------------------------------------------------- policies

async function loadPolicies() {
  try {
    const res = await api("/v1/policies");
    policies = res.data;
    renderPolicies();
  } catch (e) {
    handleApiError(e, "Could not load the policy versions");
  }
}

function formatDate(value) {
  if (!value) return "–";
  const d = new Date(value);
  return Number.isNaN(d.getTime()) ? String(value) : d.toLocaleString();
}

/** A rate cell: the live share, with the held-out figure of its gate (if any) as a tooltip. */
function rateCell(cls, live, heldout, blocked) {
  const known = (x) => x !== null && x !== undefined;
  const text = known(live) ? formatPercent(live) : "–";
  const notes = [];
  if (known(heldout)) notes.push(`held-out at its gate: ${formatPercent(heldout)}`);
  if (known(blocked)) notes.push(`blocked by moderation: ${formatPercent(blocked)}`);
  return el("td", { class: `num ${cls}`, title: notes.join("; ") }, text);
}

function renderPolicies() {
  const body = $("policies").querySelector("tbody");
  body.replaceChildren();
  const active = policies.find((p) => p.status === "active");
  $("policy-badge").textContent = active ? `serving ${active.version}` : "";
  for (const p of policies) {
    const rate = p.thumbs_up_rate;
    const safety = p.safety || {};
    const bar = el("span", { class: "rate-bar", "aria-hidden": "true" }, el("span"));
    bar.firstChild.style.width = `${Math.round((rate ?? 0) * 100)}%`;
    const action =
      p.status === "active"
        ? el("span", { class: "muted small" }, "serving")
        : el(
            "button",
            {
              type: "button",
              class: "small-button activate",
              "aria-label": `Activate ${p.version}`,
              disabled: !admin || busy,
              onclick: () => activate(p.version),
            },
            "Activate",
          );
    body.append(
      el(
        "tr",
        { class: p.status === "active" ? "active-row" : "", dataset: { version: p.version } },
        el("th", { scope: "row" }, p.version),
        el("td", {}, el("span", { class: `status-pill ${p.status}` }, p.status)),
        el("td", { class: "hide-narrow" }, p.parent || "–"),
        el("td", { class: "hide-narrow" }, formatDate(p.created_at)),
        el("td", { class: "num feedback-count" }, String(p.feedback_count)),
        el(
          "td",
          { class: "num up-rate" },
          rate === null || rate === undefined ? "–" : formatPercent(rate),
          bar,
        ),
        rateCell("flagged-rate", safety.flagged_rate, null, safety.blocked_rate),
        rateCell("refusal-rate", safety.refusal_rate, safety.heldout_refusal_rate),
        rateCell("over-refusal", safety.over_refusal_rate, safety.heldout_over_refusal),
        el("td", {}, action),
      ),
    );
  }
  $("rollback").disabled = !admin || busy || !policies.some((p) => p.status === "retired");
  renderChart();
}

/** Bars of the thumbs-up rate per version, labelled with the number of votes. */
function renderChart() {
  const width = 640;
  const height = 200;
  const pad = { top: 18, right: 12, bottom: 38, left: 38 };
  const plotW = width - pad.left - pad.right;
  const plotH = height - pad.top - pad.bottom;
  const n = Math.max(policies.length, 1);
  const slot = plotW / n;
  const barW = Math.min(48, slot * 0.6);
  const parts = [];
  for (const frac of [0, 0.5, 1]) {
    const y = pad.top + plotH * (1 - frac);
    parts.push(svg("line", { class: "axis", x1: pad.left, x2: width - pad.right, y1: y, y2: y }));
    parts.push(
      svg("text", { class: "label", x: pad.left - 6, y: y + 4, "text-anchor": "end" }, `${frac * 100}%`),
    );
  }
  const summary = [];
  policies.forEach((p, i) => {
    const x = pad.left + slot * i + (slot - barW) / 2;
    const rate = p.thumbs_up_rate;
    const h = rate === null || rate === undefined ? 0 : plotH * rate;
    parts.push(
      svg(
        "rect",
        {
          class: p.status === "active" ? "bar active" : "bar",
          x,
          y: pad.top + plotH - h,
          width: barW,
          height: Math.max(h, 0),
          rx: 3,
        },
        svg("title", {}, `${p.version}: ${formatPercent(rate)} thumbs up of ${p.feedback_count}`),
      ),
    );
    parts.push(
      svg(
        "text",
        { class: "value", x: x + barW / 2, y: pad.top + plotH - h - 4, "text-anchor": "middle" },
        rate === null || rate === undefined ? "no votes" : formatPercent(rate),
      ),
    );
    parts.push(
      svg(
        "text",
        { class: "label", x: x + barW / 2, y: height - pad.bottom + 16, "text-anchor": "middle" },
        p.version,
      ),
    );
    parts.push(
      svg(
        "text",
        { class: "label", x: x + barW / 2, y: height - pad.bottom + 30, "text-anchor": "middle" },
        `n=${p.feedback_count}`,
      ),
    );
    summary.push(`${p.version} ${formatPercent(rate)} of ${p.feedback_count}`);
  });
  $("chart").replaceChildren(
    svg(
      "svg",
      {
        class: "chart",
        viewBox: `0 0 ${width} ${height}`,
        role: "img",
        "aria-label": `Thumbs-up rate per version: ${summary.join(", ") || "no versions"}`,
      },
      parts,
    ),
  );
}

async function change(path, describe) {
  busy = true;
  renderPolicies();
  setStatus("Working…");
  try {
    const res = await api(path, { method: "POST" });
    setStatus(describe(res));
  } catch (e) {
    handleApiError(e);
  } finally {
    busy = false;
    await loadPolicies();
  }
}

function activate(version) {
  return change(
    `/v1/policies/${encodeURIComponent(version)}/activate`,
    (r) => `Activated ${r.active}${r.previous ? ` (was ${r.previous})` : ""}.`,
  );
}

function rollback() {
  return change("/v1/policies/rollback", (r) => `Rolled back from ${r.previous} to ${r.active}.`);
}

// ----------------------------------------------------------------------------- live rates

async function scrape() {
  let text;
  try {
    const res = await fetch("/metrics", { cache: "no-store" });
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    text = await res.text();
  } catch {
    return;
  }
  const now = snapshot(text);
  const r = rates(lastScrape, now);
  lastScrape = now;
  if (r) {
    $("rate-requests").textContent = formatRate(r.requests);
    $("rate-tokens").textContent = formatRate(r.generationTokens);
    $("rate-prompt").textContent = formatRate(r.promptTokens);
    $("rate-errors").textContent = formatRate(r.errors);
  }
  $("queue").textContent =
    now.running === null ? "–" : `${now.running} · ${now.waiting ?? 0}`;
  $("kv-cache").textContent = formatPercent(now.kvCache);
  if (now.policy) $("policy-badge").textContent = `serving ${now.policy}`;
}

// ----------------------------------------------------------------------------- plumbing

let signOutForm = () => {};

function signOut(message) {
  timers.forEach(clearInterval);
  timers = [];
  signOutForm();
  if (message) $("signin-error").textContent = message;
}

async function onSignedIn() {
  try {
    admin = await isAdmin();
  } catch {
    admin = false;
  }
  $("not-admin").hidden = admin;
  $("scrape-seconds").textContent = String(SCRAPE_MS / 1000);
  lastScrape = null;
  await Promise.all([loadPolicies(), scrape()]);
  timers.forEach(clearInterval);
  timers = [setInterval(scrape, SCRAPE_MS), setInterval(() => busy || loadPolicies(), POLICIES_MS)];
}

$("refresh").addEventListener("click", loadPolicies);
$("rollback").addEventListener("click", rollback);
$("signout").addEventListener("click", () => signOut(""));

signOutForm = setupSignIn({
  section: $("signin"),
  form: $("signin-form"),
  input: $("api-key"),
  errorBox: $("signin-error"),
  app: $("app"),
  check: (key) => api("/v1/policies", { key }),
  onSignedIn,
});
