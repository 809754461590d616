// Prometheus text exposition → numbers, and per-second rates from two scrapes of /metrics.

/** Parse the text format into [{name, labels, value}] (comments and blank lines skipped). */
export function parseMetrics(text) {
  const samples = [];
  for (const raw of text.split("\n")) {
    const line = raw.trim();
    if (!line || line.startsWith("#")) continue;
    const match = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)/);
    if (!match) continue;
    const labels = {};
    if (match[3]) {
      for (const m of match[3].matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) {
        labels[m[1]] = m[2].replace(/\\"/g, '"').replace(/\\n/g, "\n").replace(/\\\\/g, "\\");
      }
    }
    const value = Number.parseFloat(match[4]);
    if (!Number.isNaN(value) || match[4] === "NaN") samples.push({ name: match[1], labels, value });
  }
  return samples;
}

/** Sum of every sample named `name` whose labels include `where`. */
export function sumOf(samples, name, where = {}) {
  let total = 0;
  let found = false;
  for (const s of samples) {
    if (s.name !== name) continue;
    if (Object.entries(where).some(([k, v]) => s.labels[k] !== v)) continue;
    total += s.value;
    found = true;
  }
  return found ? total : null;
}

/** What the admin page shows from one scrape. */
export function snapshot(text, at = Date.now()) {
  const s = parseMetrics(text);
  const policy = s.find((x) => x.name === "palmchat_policy_info");
  return {
    at,
    requests: sumOf(s, "palmchat_requests_total"),
    // every refused or failed request (4xx and 5xx), not only the server's own failures
    errors: (sumOf(s, "palmchat_requests_total") ?? 0) -
      (sumOf(s, "palmchat_requests_total", { status: "2xx" }) ?? 0),
    generationTokens: sumOf(s, "palmchat_generation_tokens_total"),
    promptTokens: sumOf(s, "palmchat_prompt_tokens_total"),
    running: sumOf(s, "palmchat_num_requests_running"),
    waiting: sumOf(s, "palmchat_num_requests_waiting"),
    kvCache: sumOf(s, "palmchat_kv_cache_usage_perc"),
    policy: policy ? policy.labels.version : null,
  };
}

/** Per-second rates between two snapshots (null before there are two). A counter that went
 * down means the server restarted: the rate is then counted from zero, like PromQL's rate(). */
export function rates(previous, current) {
  if (!previous || !current || current.at <= previous.at) return null;
  const dt = (current.at - previous.at) / 1000;
  const rate = (key) => {
    const a = previous[key];
    const b = current[key];
    if (a === null || b === null) return null;
    return (b >= a ? b - a : b) / dt;
  };
  return {
    requests: rate("requests"),
    errors: rate("errors"),
    generationTokens: rate("generationTokens"),
    promptTokens: rate("promptTokens"),
  };
}
