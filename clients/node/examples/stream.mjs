#!/usr/bin/env node
// Stream one completion to stdout, token by token.
//
//   CHATGATE_ADDR=localhost:50051 node examples/stream.mjs "Explain backpressure." [model]
//
// The usage line goes to stderr, so stdout is exactly the model's text.
import { ChatgateClient, ChatgateError, system, user } from "@chatgate/client";

const address = process.env.CHATGATE_ADDR ?? "localhost:50051";
const prompt = process.argv[2] ?? "Say hello.";
const model = process.argv[3] ?? "gpt-4o-mini";

const client = new ChatgateClient(address, { token: process.env.CHATGATE_TOKEN, timeoutMs: 30_000 });
const request = {
  model,
  userId: process.env.CHATGATE_USER ?? "example-user",
  tags: { feature: "node-example" },
  messages: [system("Be brief."), user(prompt)],
};

try {
  for await (const event of client.complete(request)) {
    if (event.type === "content") process.stdout.write(event.text);
    if (event.type === "finished") {
      process.stdout.write("\n");
      const { usage, outcome } = event;
      console.error(`[${outcome}: ${usage.inputTokens} in, ${usage.outputTokens} out (${usage.source})]`);
    }
  }
} catch (error) {
  if (!(error instanceof ChatgateError)) throw error;
  console.error(`chatgate: ${error.message}${error.retryDelayMs !== null ? ` (retry in ${error.retryDelayMs} ms)` : ""}`);
  process.exitCode = 1;
} finally {
  client.close();
}
