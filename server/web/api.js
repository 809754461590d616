// Shared by the chat and admin pages: the stored API key, JSON calls with OpenAI-shaped
// errors, the sign-in form, and small DOM helpers. No dependencies, no build step.

const KEY_STORAGE = "palmchat.apiKey";

export function getKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
}

export function setKey(key) {
  localStorage.setItem(KEY_STORAGE, key);
}

export function clearKey() {
  localStorage.removeItem(KEY_STORAGE);
}

export class ApiError extends Error {
  constructor(status, body) {
    const err = (body && body.error) || {};
    super(err.message || `HTTP ${status}`);
    this.status = status;
    this.type = err.type || "api_error";
    this.code = err.code || null;
  }
}

/** Call the API with the stored key; JSON in, JSON out (null for 204). Throws ApiError. */
export async function api(path, { method = "GET", body, key = getKey(), signal } = {}) {
  const headers = { Authorization: `Bearer ${key}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let res;
  try {
    res = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
    });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, { error: { message: `cannot reach the server (${e.message})` } });
  }
  if (res.status === 204) return null;
  let data = null;
  const text = await res.text();
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!res.ok) throw new ApiError(res.status, data);
  return data;
}

/** A page's answer to a failed call (`what` failed, if given): a key the server no longer
 * accepts signs the user out, any other error goes to the page's status line. */
export function apiErrorHandler({ signOut, setStatus }) {
  return (e, what) => {
    if (e.status === 401) signOut("Your API key is no longer valid.");
    else setStatus(what ? `${what}: ${e.message}` : e.message, "error");
  };
}

/** Whether the stored key is an admin key.
 *
 * The API has no "who am I" route, so this asks to activate a version that cannot exist:
 * the admin check runs first, so an admin key gets 404 (no such version, nothing changes)
 * and any other key 403. */
export async function isAdmin() {
  try {
    await api("/v1/policies/--admin-check--/activate", { method: "POST" });
    return true; // cannot happen (no such version), but an admin either way
  } catch (e) {
    if (e.status === 404) return true;
    if (e.status === 403) return false;
    throw e;
  }
}

/** Create an element: el("button", {class: "x", onclick: f, "aria-label": "…"}, "text", child) */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") {
      node.addEventListener(name.slice(2), value);
    } else if (name === "class") {
      node.className = value;
    } else if (name === "dataset") {
      Object.assign(node.dataset, value);
    } else if (value === true) {
      node.setAttribute(name, "");
    } else {
      node.setAttribute(name, String(value));
    }
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const SVG_NS = "http://www.w3.org/2000/svg";

export function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value !== undefined && value !== null) node.setAttribute(name, String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** The thumbs icon (up; the down one is the same path rotated by CSS). */
export function thumbIcon() {
  return svg(
    "svg",
    { viewBox: "0 0 24 24", width: 18, height: 18, "aria-hidden": "true", focusable: "false" },
    svg("path", {
      d:
        "M2 21h3V10H2v11zm20-10c0-1.1-.9-2-2-2h-6.3l1-4.6V4c0-.4-.2-.8-.4-1.1L13.2 2 " +
        "6.6 8.6c-.4.4-.6.9-.6 1.4v9c0 1.1.9 2 2 2h9c.8 0 1.5-.5 1.8-1.2l3-7.1c.1-.2.2-.5.2-.7v-2z",
      fill: "currentColor",
    }),
  );
}

/** Wire a sign-in form: validate the key with `check(key)` (throws ApiError), store it, then
 * call `onSignedIn()`. Returns a function that shows the form again (sign out). */
export function setupSignIn({ section, form, input, errorBox, app, check, onSignedIn }) {
  async function tryKey(key, { fromStorage = false } = {}) {
    errorBox.textContent = "";
    try {
      await check(key);
    } catch (e) {
      if (fromStorage && e.status === 0) {
        errorBox.textContent = e.message;
      } else {
        errorBox.textContent =
          e.status === 401 ? "That API key is not valid (unknown or revoked)." : e.message;
      }
      showForm();
      return false;
    }
    setKey(key);
    section.hidden = true;
    app.hidden = false;
    await onSignedIn();
    return true;
  }

  function showForm() {
    app.hidden = true;
    section.hidden = false;
    input.value = "";
    input.focus();
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = input.value.trim();
    if (!key) {
      errorBox.textContent = "Enter an API key.";
      return;
    }
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    try {
      await tryKey(key);
    } finally {
      button.disabled = false;
    }
  });

  const stored = getKey();
  if (stored) tryKey(stored, { fromStorage: true });
  else showForm();

  return () => {
    clearKey();
    showForm();
  };
}

export function formatRate(value) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  if (value >= 100) return value.toFixed(0);
  if (value >= 10) return value.toFixed(1);
  return value.toFixed(2);
}

export function formatPercent(value) {
  if (value === null || value === undefined) return "–";
  return `${Math.round(value * 100)}%`;
}
