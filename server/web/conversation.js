// Conversation model of the chat page: turns shown on screen, built from the stored message
// tree (GET /v1/conversations/{id}), and the message history sent with the next request.
//
// A turn is {kind: "user" | "system", content} or {kind: "assistant", completionId,
// policyVersion, choices: [{index, text, finishReason, rating, incomplete}], picked, status}.
// Choices of one completion (compare mode asks for n = 2) form one turn shown side by side.

/** The path through the message tree that the page shows: at each step the branch the
 * conversation went on from (a message with replies), else the newest one (a regeneration). */
export function buildTurns(messages) {
  const children = new Map();
  const roots = [];
  for (const m of messages) {
    if (m.parent_id === null || m.parent_id === undefined) roots.push(m);
    else {
      if (!children.has(m.parent_id)) children.set(m.parent_id, []);
      children.get(m.parent_id).push(m);
    }
  }
  const hasKids = (m) => (children.get(m.id) || []).length > 0;
  const newest = (list) => list.reduce((a, b) => (b.id > a.id ? b : a));
  const turns = [];
  let level = roots;
  while (level.length) {
    const assistants = level.filter((m) => m.role === "assistant");
    let next;
    if (assistants.length) {
      const groups = new Map();
      for (const m of assistants) {
        const key = m.completion_id || `message-${m.id}`;
        if (!groups.has(key)) groups.set(key, []);
        groups.get(key).push(m);
      }
      const continued = assistants.filter(hasKids);
      next = continued.length ? newest(continued) : newest(assistants);
      const group = groups.get(next.completion_id || `message-${next.id}`);
      group.sort((a, b) => (a.choice_index ?? 0) - (b.choice_index ?? 0));
      turns.push({
        kind: "assistant",
        completionId: next.completion_id,
        policyVersion: next.policy_version,
        choices: group.map((m) => ({
          index: m.choice_index ?? 0,
          text: m.content || "",
          finishReason: m.finish_reason,
          rating: m.rating ?? null,
          incomplete: !!m.incomplete,
        })),
        picked: group.length > 1 && hasKids(next) ? (next.choice_index ?? 0) : null,
        status: next.incomplete ? "cancelled" : "done",
        alternatives: groups.size,
      });
    } else {
      const continued = level.filter(hasKids);
      next = continued.length ? newest(continued) : newest(level);
      turns.push({ kind: next.role, content: next.content || "" });
    }
    level = children.get(next.id) || [];
  }
  return turns;
}

/** The OpenAI-style messages of `turns`: an assistant turn contributes its picked choice
 * (compare mode), else its first. */
export function historyOf(turns) {
  const out = [];
  for (const turn of turns) {
    if (turn.kind === "assistant") {
      if (turn.status === "error") continue; // never stored: the server has no such message
      const choice =
        turn.choices.find((c) => c.index === turn.picked) || turn.choices[0] || { text: "" };
      out.push({ role: "assistant", content: choice.text });
    } else {
      out.push({ role: turn.kind, content: turn.content });
    }
  }
  return out;
}
