// The "Report" control of one answer: labels beyond a thumb (as Open-Assistant collects them)
// with an optional note, sent to POST /v1/labels.
import { api, el } from "./api.js";

export const LABELS = [
  ["harmful", "Harmful or unsafe"],
  ["untrue", "Untrue"],
  ["unhelpful", "Unhelpful"],
  ["spam", "Spam"],
  ["pii", "Shares personal data"],
  ["hate_speech", "Hate speech"],
  ["sexual_content", "Sexual content"],
  ["violence", "Violence"],
  ["refusal_was_wrong", "Refused a fine request"],
];

/**
 * A <details> with a checkbox per label, a note and a submit button. `target()` gives the
 * answer's {completion_id, choice_index} (null while it streams); `done(message, kind)`
 * reports the outcome; `fail(error)` handles an API error.
 */
export function reportControl(uid, target, { done, fail }) {
  const boxes = LABELS.map(([value, text]) => {
    const id = `label-${uid}-${value}`;
    return el(
      "label",
      { for: id, class: "report-label" },
      el("input", { id, type: "checkbox", name: "label", value }),
      ` ${text}`,
    );
  });
  const note = el("input", {
    type: "text",
    name: "note",
    maxlength: 2000,
    placeholder: "Anything to add? (optional)",
    "aria-label": "Report note",
    autocomplete: "off",
  });
  const status = el("span", { class: "muted small", role: "status" });
  const form = el(
    "form",
    {
      class: "report-form",
      onsubmit: async (event) => {
        event.preventDefault();
        const where = target();
        const labels = [...form.querySelectorAll("input[name=label]:checked")].map((b) => b.value);
        if (!where) return;
        if (!labels.length) {
          status.textContent = "Pick at least one label.";
          return;
        }
        const body = { ...where, labels };
        if (note.value.trim()) body.note = note.value.trim();
        try {
          const saved = await api("/v1/labels", { method: "POST", body });
          status.textContent = "Reported. Thank you.";
          done(`Reported: ${(saved.labels || labels).join(", ")}.`);
        } catch (e) {
          status.textContent = "";
          fail(e);
        }
      },
    },
    el("fieldset", {}, el("legend", {}, "What is wrong with this answer?"), ...boxes),
    note,
    el("button", { type: "submit", class: "small-button" }, "Send report"),
    status,
  );
  return el("details", { class: "report" }, el("summary", {}, "Report"), form);
}
