// One assistant turn on the chat page: its answers (one, or two side by side in compare mode),
// each with its thumbs, a reason box, "prefer" in compare mode and a report control; and what
// rating and picking send to the API.

import { api, el, thumbIcon } from "./api.js";
import { reportControl } from "./report.js";

/** The turn renderer, given what it calls back into on the page: ``regenerate(turn)``,
 * ``setStatus(text, kind)`` and ``handleApiError(error, message)``. */
export function answerView({ regenerate, setStatus, handleApiError }) {
  function renderTurn(turn) {
    if (turn.kind !== "assistant") {
      turn.el = el(
        "article",
        { class: `turn ${turn.kind}`, "aria-label": turn.kind === "user" ? "You" : "System" },
        el("div", { class: "who", "aria-hidden": "true" }, turn.kind === "user" ? "You" : "System"),
        el("div", { class: "text" }, turn.content),
      );
      return turn.el;
    }
    const compare = turn.choices.length > 1;
    turn.choicesEl = el("div", { class: compare ? "choices compare" : "choices" });
    turn.choices.forEach((choice) => turn.choicesEl.append(renderChoice(turn, choice)));
    turn.regenerate = el(
      "button",
      {
        type: "button",
        class: "link-button regenerate",
        onclick: () => regenerate(turn),
        "aria-label": "Regenerate this answer",
      },
      "↻ Regenerate",
    );
    turn.noteEl = el("p", { class: "turn-note", role: "note" });
    turn.el = el(
      "article",
      {
        class: "turn assistant",
        "aria-label": compare ? "Two answers to compare" : "Answer",
        "aria-busy": turn.status === "streaming" ? "true" : "false",
      },
      turn.choicesEl,
      el("div", { class: "turn-actions" }, turn.noteEl, turn.regenerate),
    );
    updateTurn(turn);
    return turn.el;
  }

  /** The thumbs up (rating 1) or down (-1) button of one answer. */
  function thumbButton(turn, choice, rating) {
    const name = rating === 1 ? "Good answer" : "Bad answer";
    return el(
      "button",
      {
        type: "button",
        class: `thumb ${rating === 1 ? "up" : "down"}`,
        "aria-label": turn.choices.length > 1 ? `${name} ${choice.index + 1}` : name,
        "aria-pressed": "false",
        title: name,
        onclick: () => rate(turn, choice, rating),
      },
      thumbIcon(),
    );
  }

  function renderChoice(turn, choice) {
    const compare = turn.choices.length > 1;
    const label = compare ? `Answer ${choice.index + 1}` : "Answer";
    choice.textEl = el("div", { class: "text" });
    choice.versionEl = el("span", { class: "badge version", title: "Policy version" });
    choice.stateEl = el("span", { class: "choice-state muted" });
    choice.up = thumbButton(turn, choice, 1);
    choice.down = thumbButton(turn, choice, -1);
    choice.pick = compare
      ? el(
          "button",
          {
            type: "button",
            class: "pick",
            "aria-pressed": "false",
            onclick: () => pick(turn, choice),
          },
          `Prefer answer ${choice.index + 1}`,
        )
      : null;
    const reasonId = `reason-${turn.uid}-${choice.index}`;
    choice.reasonInput = el("input", {
      id: reasonId,
      name: "reason",
      type: "text",
      maxlength: 2000,
      placeholder: "Why? (optional)",
      autocomplete: "off",
    });
    choice.reasonNote = el("span", { class: "muted small", role: "status" });
    choice.reasonForm = el(
      "form",
      {
        class: "reason",
        hidden: true,
        onsubmit: (event) => {
          event.preventDefault();
          rate(turn, choice, choice.rating, choice.reasonInput.value);
        },
      },
      el("label", { for: reasonId, class: "visually-hidden" }, `Reason for your rating of ${label}`),
      choice.reasonInput,
      el("button", { type: "submit", class: "small-button" }, "Save reason"),
      choice.reasonNote,
    );
    choice.el = el(
      "section",
      { class: "choice", "aria-label": label, dataset: { index: choice.index } },
      el(
        "header",
        { class: "choice-head" },
        el("span", { class: "who" }, compare ? `palmchat · ${choice.index + 1}` : "palmchat"),
        choice.versionEl,
        choice.stateEl,
      ),
      choice.textEl,
      el(
        "div",
        { class: "choice-actions" },
        el("div", { class: "thumbs", role: "group", "aria-label": `Rate ${label}` }, choice.up, choice.down),
        choice.pick,
      ),
      choice.reasonForm,
      reportControl(
        `${turn.uid}-${choice.index}`,
        () => (turn.completionId ? { completion_id: turn.completionId, choice_index: choice.index } : null),
        { done: (message) => setStatus(message), fail: (e) => handleApiError(e, "Could not send your report") },
      ),
    );
    renderChoiceText(turn, choice);
    return choice.el;
  }

  function renderChoiceText(turn, choice) {
    if (!choice.textEl) return;
    const streaming = turn.status === "streaming";
    if (!choice.text && !streaming) {
      choice.textEl.textContent = "(empty answer)";
      choice.textEl.classList.add("muted");
    } else {
      choice.textEl.textContent = choice.text;
      choice.textEl.classList.remove("muted");
    }
    choice.textEl.classList.toggle("streaming", streaming);
  }

  const FINISH_LABELS = {
    stop: "",
    length: "hit max tokens",
    cancelled: "stopped",
  };

  function updateTurn(turn) {
    if (!turn.el) return;
    const streaming = turn.status === "streaming";
    turn.el.setAttribute("aria-busy", streaming ? "true" : "false");
    turn.el.classList.toggle("failed", turn.status === "error");
    const canRate = !!turn.completionId && !streaming && turn.status !== "error";
    for (const choice of turn.choices) {
      renderChoiceText(turn, choice);
      choice.versionEl.textContent = turn.policyVersion || "";
      choice.versionEl.hidden = !turn.policyVersion;
      if (streaming) choice.stateEl.textContent = "writing…";
      else if (turn.status === "cancelled") choice.stateEl.textContent = "stopped";
      else choice.stateEl.textContent = FINISH_LABELS[choice.finishReason] ?? "";
      choice.up.disabled = choice.down.disabled = !canRate;
      choice.up.setAttribute("aria-pressed", String(choice.rating === 1));
      choice.down.setAttribute("aria-pressed", String(choice.rating === -1));
      if (choice.pick) {
        choice.pick.disabled = !canRate;
        const picked = turn.picked === choice.index;
        choice.pick.setAttribute("aria-pressed", String(picked));
        choice.pick.textContent = picked ? "✓ Preferred" : `Prefer answer ${choice.index + 1}`;
        choice.el.classList.toggle("picked", picked);
        choice.el.classList.toggle("not-picked", turn.picked !== null && !picked);
      }
    }
    turn.noteEl.textContent = turn.error || "";
    turn.noteEl.classList.toggle("error", !!turn.error);
  }

  async function rate(turn, choice, rating, reason) {
    if (!turn.completionId || !rating) return;
    const body = { completion_id: turn.completionId, choice_index: choice.index, rating };
    if (reason !== undefined) body.reason = reason;
    choice.reasonNote.textContent = reason !== undefined ? "Saving…" : "";
    for (let attempt = 0; ; attempt++) {
      try {
        await api("/v1/feedback", { method: "POST", body });
        break;
      } catch (e) {
        // A stopped answer is written in the background; give it a moment.
        if (e.status === 404 && attempt < 5) {
          await new Promise((r) => setTimeout(r, 300));
          continue;
        }
        choice.reasonNote.textContent = "";
        handleApiError(e, "Could not save your rating");
        return;
      }
    }
    choice.rating = rating;
    updateTurn(turn);
    if (reason === undefined) {
      choice.reasonForm.hidden = false;
      choice.reasonNote.textContent = rating === 1 ? "Thanks! Add a reason?" : "Sorry. What went wrong?";
      choice.reasonInput.focus();
      setStatus(rating === 1 ? "Marked as a good answer." : "Marked as a bad answer.");
    } else {
      choice.reasonNote.textContent = "Reason saved.";
      setStatus("Thanks, your reason was saved.");
    }
  }

  async function pick(turn, choice) {
    if (!turn.completionId) return;
    const ranking = [choice.index, ...turn.choices.map((c) => c.index).filter((i) => i !== choice.index)];
    try {
      await api("/v1/rankings", {
        method: "POST",
        body: { completion_id: turn.completionId, ranking },
      });
    } catch (e) {
      handleApiError(e, "Could not save your choice");
      return;
    }
    turn.picked = choice.index;
    updateTurn(turn);
    setStatus(`Answer ${choice.index + 1} preferred; the conversation goes on from it.`);
  }

  return { renderTurn, renderChoiceText, updateTurn };
}
