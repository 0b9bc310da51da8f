// Compiled (never run) by types.test.mjs: what a TypeScript caller writes must type-check.
import {
  ChatgateClient,
  ChatgateError,
  functionTool,
  user,
  LIMIT_REASONS,
  type Allowance,
  type ChatEvent,
  type Completion,
  type ErrorReason,
  type LimitKind,
  type LimitReason,
  type TokenLogprob,
} from "@chatgate/client";

export async function example(): Promise<string> {
  const client = new ChatgateClient("localhost:50051", { token: "t", timeoutMs: 5_000 });
  const tool = functionTool("f", "d", { type: "object" });
  let text = "";
  try {
    for await (const event of client.complete({ model: "m", userId: "u", messages: [user("hi")], tools: [tool] })) {
      const e: ChatEvent = event;
      if (e.type === "content") text += e.text;
      if (e.type === "finished") text += String(e.usage.totalTokens) + e.finishReason;
      if (e.type === "started") {
        const tokens: Allowance | undefined = e.allowances.find((a) => a.kind === "tokens_per_minute");
        const kind: LimitKind | undefined = tokens?.kind;
        text += `${kind} ${tokens?.remaining}/${tokens?.limit} until ${tokens?.resetsAt?.toISOString() ?? "-"}`;
      }
    }
    const done: Completion = await client.collect({ model: "m", userId: "u", messages: [user("hi")] }, { timeoutMs: 1 });
    text += done.toolCalls.map((c) => c.arguments).join("");
    text += done.allowances.map((a) => a.subject).join("");
    const reasoned = await client.collect({
      model: "gpt-5",
      userId: "u",
      messages: [user("hi")],
      reasoningEffort: "REASONING_EFFORT_LOW",
      verbosity: "VERBOSITY_HIGH",
      serviceTier: "SERVICE_TIER_FLEX",
      promptCacheKey: "k",
      logprobs: true,
      topLogprobs: 3,
    });
    const tokens: TokenLogprob[] = reasoned.logprobs;
    text += tokens.map((t) => `${t.token}${t.logprob}${t.tokenBytes.length}${t.topLogprobs[0]?.token}`).join("");
  } catch (error) {
    if (error instanceof ChatgateError && error.retryable) text += String(error.retryDelayMs ?? 0) + error.reason;
    // Every reason has a name the compiler checks (a typo in a key fails tsc).
    const advice: Partial<Record<ErrorReason, string>> = { SHUTTING_DOWN: "another replica", USAGE_LEDGER_FULL: "later" };
    if (error instanceof ChatgateError) text += advice[error.reason as ErrorReason] ?? "";
    if (error instanceof ChatgateError && error.limitExceeded) {
      const reason: LimitReason = error.reason as LimitReason;
      const whose = error.quotaViolations.map((v) => `${v.subject}: ${v.description}`).join("; ");
      text += error.waitingHelps ? `${reason} wait ${error.retryDelayMs} ms (${whose})` : `${reason}: not soon`;
    }
    text += LIMIT_REASONS.length;
  } finally {
    client.close();
  }
  return text;
}
