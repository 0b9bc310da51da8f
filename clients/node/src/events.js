// CompleteResponse messages (as @grpc/proto-loader decodes them) → plain events with a
// `type` discriminator, and the fold of a whole stream into one completion.

// "FINISH_REASON_TOOL_CALLS" → "tool_calls": the same values as the Python client's enums.
const lower = (name, prefix) =>
  typeof name === "string" && name.startsWith(prefix) ? name.slice(prefix.length).toLowerCase() : "unspecified";

/**
 * The event in a decoded CompleteResponse, or null for an event kind this client does
 * not know (added to the contract later): the stream helper skips those.
 */
export function toEvent(message) {
  switch (message.event) {
    case "started": {
      const { requestId, model, upstreamResponseId, allowances } = message.started;
      return { type: "started", requestId, model, upstreamResponseId, allowances: (allowances ?? []).map(allowance) };
    }
    case "content":
      return { type: "content", text: message.content.text, logprobs: (message.content.logprobs ?? []).map(tokenLogprob) };
    case "refusal":
      return { type: "refusal", text: message.refusal.text };
    case "toolCall": {
      const { index, id, name, argumentsFragment } = message.toolCall;
      return { type: "toolCall", index, id, name, argumentsFragment };
    }
    case "finished":
      return finished(message.finished);
    default:
      return null;
  }
}

// What one limit still allows: OpenAI's x-ratelimit-* headers, as gRPC sends them.
// resetsAt is unset for concurrent streams; int64 seconds arrive as Numbers (LOADER_OPTIONS).
function allowance(a) {
  const resets = a.resetsAt;
  return {
    subject: a.subject,
    kind: lower(a.kind, "LIMIT_KIND_"),
    limit: a.limit,
    remaining: a.remaining,
    resetsAt: resets ? new Date(resets.seconds * 1000 + Math.floor(resets.nanos / 1e6)) : null,
  };
}

// One answer token and its log-probability (requests with logprobs: true). Token bytes
// arrive as a Buffer; empty when the upstream gave none.
function tokenLogprob(t) {
  return { ...topLogprob(t), topLogprobs: (t.topLogprobs ?? []).map(topLogprob) };
}

function topLogprob(t) {
  return { token: t.token, logprob: t.logprob, tokenBytes: t.tokenBytes ?? Buffer.alloc(0) };
}

function finished(f) {
  const usage = f.usage ?? {};
  return {
    type: "finished",
    finishReason: lower(f.finishReason, "FINISH_REASON_"),
    outcome: lower(f.outcome, "OUTCOME_"),
    usage: {
      inputTokens: usage.inputTokens ?? 0,
      outputTokens: usage.outputTokens ?? 0,
      cachedInputTokens: usage.cachedInputTokens ?? 0,
      reasoningTokens: usage.reasoningTokens ?? 0,
      totalTokens: usage.totalTokens ?? 0,
      source: lower(usage.source, "USAGE_SOURCE_"),
      estimateEncoding: usage.estimateEncoding ?? "",
    },
    cost: {
      // `optional int64`: protobufjs names the set member of its synthetic oneof.
      usdMicros: f.cost?._usdMicros === "usdMicros" ? f.cost.usdMicros : null,
      priceVersion: f.cost?.priceVersion ?? "",
    },
    deployment: f.deployment ?? "",
    fallbackModel: f.fallbackModel ?? "",
  };
}

/** Folds events into a completion: text, refusal, tool calls (arguments joined and parsed). */
export class Collector {
  events = 0;
  #started = null;
  #finished = null;
  #text = [];
  #logprobs = [];
  #refusal = [];
  #calls = new Map();

  add(event) {
    this.events += 1;
    if (event.type === "content") {
      this.#text.push(event.text);
      this.#logprobs.push(...event.logprobs);
    }
    else if (event.type === "refusal") this.#refusal.push(event.text);
    else if (event.type === "toolCall") {
      const call = this.#calls.get(event.index) ?? { id: "", name: "", fragments: [] };
      // id and name arrive on a call's first piece only.
      call.id ||= event.id;
      call.name ||= event.name;
      call.fragments.push(event.argumentsFragment);
      this.#calls.set(event.index, call);
    } else if (event.type === "started") this.#started = event;
    else if (event.type === "finished") this.#finished = event;
  }

  result() {
    const s = this.#started;
    const f = this.#finished;
    return {
      requestId: s?.requestId ?? "",
      model: s?.model ?? "",
      upstreamResponseId: s?.upstreamResponseId ?? "",
      allowances: s?.allowances ?? [],
      text: this.#text.join(""),
      logprobs: this.#logprobs,
      refusal: this.#refusal.join(""),
      toolCalls: [...this.#calls.entries()].sort(([a], [b]) => a - b).map(([index, c]) => toolCall(index, c)),
      finishReason: f?.finishReason ?? "unspecified",
      outcome: f?.outcome ?? "unspecified",
      usage: f?.usage ?? null,
      cost: f?.cost ?? null,
      finished: f !== null,
    };
  }
}

function toolCall(index, { id, name, fragments }) {
  const args = fragments.join("");
  try {
    return { index, id, name, arguments: args, parsedArguments: JSON.parse(args), argumentsValid: true };
  } catch {
    // Cut by the token limit or the deadline: the raw text is kept.
    return { index, id, name, arguments: args, parsedArguments: null, argumentsValid: false };
  }
}
