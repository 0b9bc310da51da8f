// Compiled (never run) by types.test.mjs: what a TypeScript caller writes must type-check.
import {
  ChatgateClient,
  ChatgateError,
  functionTool,
  user,
  type ChatEvent,
  type Completion,
  type ErrorReason,
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
    }
    const done: Completion = await client.collect({ model: "m", userId: "u", messages: [user("hi")] }, { timeoutMs: 1 });
    text += done.toolCalls.map((c) => c.arguments).join("");
  } catch (error) {
    if (error instanceof ChatgateError && error.retryable) text += String(error.retryDelayMs ?? 0) + error.reason;
    // Every reason has a name the compiler checks (a typo in a key fails tsc).
    const advice: Partial<Record<ErrorReason, string>> = { SHUTTING_DOWN: "another replica", USAGE_LEDGER_FULL: "later" };
    if (error instanceof ChatgateError) text += advice[error.reason as ErrorReason] ?? "";
  } finally {
    client.close();
  }
  return text;
}
