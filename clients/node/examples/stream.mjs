#!/usr/bin/env node
// Stream one completion to stdout, token by token.
//
//   CHATGATE_ADDR=localhost:50051 CHATGATE_TOKEN=cgt_… node examples/stream.mjs "Explain backpressure." [model]
//
// CHATGATE_TOKEN_FILE instead of CHATGATE_TOKEN reads the token from a file;
// CHATGATE_CA_FILE turns on TLS, trusting that CA; CHATGATE_CLIENT_CERT_FILE and
// CHATGATE_CLIENT_KEY_FILE add a client certificate (mTLS).
// The usage line goes to stderr, so stdout is exactly the model's text.
import { ChatgateClient, ChatgateError, system, user } from "@chatgate/client";

const address = process.env.CHATGATE_ADDR ?? "localhost:50051";
const prompt = process.argv[2] ?? "Say hello.";
const model = process.argv[3] ?? "gpt-4o-mini";

const client = new ChatgateClient(address, {
  token: process.env.CHATGATE_TOKEN || undefined,
  tokenFile: process.env.CHATGATE_TOKEN_FILE || undefined,
  caFile: process.env.CHATGATE_CA_FILE || undefined,
  certFile: process.env.CHATGATE_CLIENT_CERT_FILE || undefined,
  keyFile: process.env.CHATGATE_CLIENT_KEY_FILE || undefined,
  timeoutMs: 30_000,
});
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
