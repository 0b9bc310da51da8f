// The Node client against a real chatgate (started by tests/integration/test_node_client.py).
import assert from "node:assert/strict";
import { after, describe, it } from "node:test";
import grpc from "@grpc/grpc-js";
import { ChatgateClient, ChatgateError, assistant, functionTool, toolResult, user } from "@chatgate/client";
import {
  ADDR,
  CA_FILE,
  CLIENT_CERT_FILE,
  CLIENT_KEY_FILE,
  TOKEN_FILE,
  endedRecord,
  simulatorText,
} from "../testing/env.mjs";

const client = new ChatgateClient(ADDR, {
  tokenFile: TOKEN_FILE,
  caFile: CA_FILE,
  certFile: CLIENT_CERT_FILE,
  keyFile: CLIENT_KEY_FILE,
  timeoutMs: 10_000,
});
after(() => client.close());

const request = (model, extra = {}) => ({ model, userId: "node-user", messages: [user("hello")], ...extra });

const WEATHER = functionTool("get_weather", "The weather in a city.", {
  type: "object",
  properties: { city: { type: "string" } },
  required: ["city"],
});
const CLOCK = functionTool("get_time", "The time in a zone.", {
  type: "object",
  properties: { zone: { type: "string", enum: ["UTC", "CET"] }, hours: { type: "integer" } },
});

async function failureOf(promise) {
  try {
    await promise;
  } catch (error) {
    assert.ok(error instanceof ChatgateError, `expected a ChatgateError, got ${error}`);
    return error;
  }
  assert.fail("the call succeeded");
}

describe("complete()", () => {
  it("yields started, content deltas, then finished, as typed events", async () => {
    const events = [];
    for await (const event of client.complete(request("gpt-4o-mini::chunks=5", { requestId: "node-req-1" }))) {
      events.push(event);
    }
    // The simulator sends the 5 chunks in one write; chatgate may relay what arrives
    // together as one delta, so the count of content events is 1 to 5.
    const types = events.map((e) => e.type);
    assert.equal(types[0], "started");
    assert.equal(types.at(-1), "finished");
    assert.ok(types.length >= 3 && types.slice(1, -1).every((t) => t === "content"), types.join(","));
    const [started, finished] = [events[0], events.at(-1)];
    assert.equal(started.requestId, "node-req-1");
    assert.equal(started.model, "gpt-4o-mini-2024-07-18");
    assert.equal(events.filter((e) => e.type === "content").map((e) => e.text).join(""), simulatorText(5));
    assert.equal(finished.finishReason, "stop");
    assert.equal(finished.outcome, "completed");
    assert.equal(finished.usage.outputTokens, 5);
    assert.equal(finished.usage.source, "reported");
    assert.equal(finished.usage.totalTokens, finished.usage.inputTokens + 5);
    assert.equal(typeof finished.cost.usdMicros, "number");
  });

  it("hands over events while the stream is open, and breaking out cancels the upstream", async () => {
    const spec = "stall_after=2,chunks=9";
    const seen = [];
    for await (const event of client.complete(request(`gpt-4o-mini::${spec}`))) {
      seen.push(event.type);
      if (seen.length === 3) break; // the upstream has stalled: nothing more would come
    }
    assert.deepEqual(seen, ["started", "content", "content"]);
    assert.equal((await endedRecord(spec)).closed_early, true);
  });

  it("cancels the call when its AbortSignal fires", async () => {
    const spec = "stall_after=1,chunks=8";
    const controller = new AbortController();
    const error = await failureOf(
      (async () => {
        for await (const event of client.complete(request(`gpt-4o-mini::${spec}`), { signal: controller.signal })) {
          if (event.type === "content") controller.abort();
        }
      })(),
    );
    assert.equal(error.code, grpc.status.CANCELLED);
    assert.equal((await endedRecord(spec)).closed_early, true);
  });
});

describe("collect()", () => {
  it("sends the newer model options and returns the answer's log-probabilities", async () => {
    const completion = await client.collect(
      request("gpt-4o-mini::chunks=4", {
        reasoningEffort: "REASONING_EFFORT_MINIMAL",
        verbosity: "VERBOSITY_LOW",
        serviceTier: "SERVICE_TIER_DEFAULT",
        promptCacheKey: "node-cache",
        logprobs: true,
        topLogprobs: 2,
      }),
    );
    assert.equal(completion.logprobs.map((t) => t.token).join(""), completion.text);
    assert.equal(completion.logprobs.length, 4);
    const [first] = completion.logprobs;
    assert.ok(first.logprob < 0);
    assert.equal(Buffer.from(first.tokenBytes).toString("utf8"), first.token);
    assert.deepEqual(
      first.topLogprobs.map((t) => t.token),
      [first.token, " alt1"],
    );
    const plain = await client.collect(request("gpt-4o-mini::chunks=2"));
    assert.deepEqual(plain.logprobs, []);
  });

  it("returns the text, usage and request id", async () => {
    const completion = await client.collect(request("gpt-4o-mini::chunks=4", { tags: { feature: "node-test" } }));
    assert.equal(completion.text, simulatorText(4));
    assert.equal(completion.finished, true);
    assert.equal(completion.usage.outputTokens, 4);
    assert.ok(completion.requestId.length > 0);
    assert.deepEqual(completion.toolCalls, []);
  });

  it("joins parallel tool calls and parses their arguments, which feed the next turn", async () => {
    const completion = await client.collect(
      request("gpt-4o-mini::parallel_tools", { tools: [WEATHER, CLOCK], parallelToolCalls: true }),
    );
    assert.equal(completion.finishReason, "tool_calls");
    const [weather, clock] = completion.toolCalls;
    assert.deepEqual([weather.name, weather.parsedArguments], ["get_weather", { city: "Paris" }]);
    assert.deepEqual([clock.name, clock.parsedArguments], ["get_time", { zone: "UTC", hours: 1 }]);
    assert.ok(weather.argumentsValid && weather.id.startsWith("call_"));

    const answer = await client.collect({
      model: "gpt-4o-mini::chunks=2",
      userId: "node-user",
      messages: [
        user("weather and time?"),
        assistant("", completion.toolCalls),
        toolResult(weather.id, "sunny"),
        toolResult(clock.id, "12:00"),
      ],
    });
    assert.equal(answer.text, simulatorText(2));
  });
});

describe("errors", () => {
  it("INVALID_ARGUMENT names the bad fields", async () => {
    const error = await failureOf(client.collect({ model: "gpt-4o-mini", messages: [user("hi")] }));
    assert.equal(error.code, grpc.status.INVALID_ARGUMENT);
    assert.equal(error.codeName, "INVALID_ARGUMENT");
    assert.equal(error.reason, "INVALID_REQUEST");
    assert.deepEqual(
      error.fieldViolations.map((v) => v.field),
      ["user_id"],
    );
    assert.equal(error.retryable, false);
  });

  it("a request the upstream rejects is INVALID_ARGUMENT, not retryable", async () => {
    const error = await failureOf(client.collect(request("gpt-4o-mini::status=400")));
    assert.equal(error.reason, "UPSTREAM_REJECTED_REQUEST");
    assert.equal(error.retryable, false);
  });

  it("an upstream rate limit carries RetryInfo", async () => {
    const error = await failureOf(client.collect(request("gpt-4o-mini::rate_limit,retry_after_ms=250")));
    assert.equal(error.code, grpc.status.UNAVAILABLE);
    assert.equal(error.reason, "UPSTREAM_RATE_LIMITED");
    assert.equal(error.retryDelayMs, 250);
    assert.equal(error.retryable, true);
    assert.equal(error.partial, null);
  });

  it("the deadline ends a hung call with DEADLINE_EXCEEDED", async () => {
    const error = await failureOf(client.collect(request("gpt-4o-mini::hang"), { timeoutMs: 300 }));
    assert.equal(error.code, grpc.status.DEADLINE_EXCEEDED);
    assert.equal(error.retryable, false);
  });

  it("a failure after the first token keeps what arrived", async () => {
    const error = await failureOf(client.collect(request("gpt-4o-mini::disconnect_after=3")));
    assert.equal(error.code, grpc.status.UNAVAILABLE);
    assert.equal(error.partial.text, simulatorText(3));
    assert.equal(error.partial.outcome, "upstream_error");
    assert.equal(error.retryable, false); // tokens were delivered and billed
  });

  it("RESOURCE_EXHAUSTED is retryable only with RetryInfo", () => {
    // chatgate's own limits always send RetryInfo; gRPC's message size limit sends none.
    const limit = new ChatgateError(grpc.status.RESOURCE_EXHAUSTED, "busy", {
      reason: "CONCURRENCY_LIMIT",
      retryDelayMs: 1000,
    });
    assert.equal(limit.retryable, true);
    const bare = new ChatgateError(grpc.status.RESOURCE_EXHAUSTED, "Received message larger than max");
    assert.equal(bare.retryable, false);
  });

  it("calls as the certificate's caller without a token (mTLS)", async () => {
    const byCertificate = new ChatgateClient(ADDR, {
      caFile: CA_FILE,
      certFile: CLIENT_CERT_FILE,
      keyFile: CLIENT_KEY_FILE,
      timeoutMs: 10_000,
    });
    try {
      const completion = await byCertificate.collect(request("gpt-4o-mini::chunks=2"));
      assert.equal(completion.text, simulatorText(2));
    } finally {
      byCertificate.close();
    }
    assert.throws(() => new ChatgateClient(ADDR, { caFile: CA_FILE, certFile: CLIENT_CERT_FILE }), TypeError);
  });

  it("refuses an unknown token: UNAUTHENTICATED, CREDENTIAL_INVALID, not retryable", async () => {
    const unknown = new ChatgateClient(ADDR, {
      token: "cgt_unknown",
      caFile: CA_FILE,
      certFile: CLIENT_CERT_FILE,
      keyFile: CLIENT_KEY_FILE,
      timeoutMs: 10_000,
    });
    try {
      const error = await failureOf(unknown.collect(request("gpt-4o-mini")));
      assert.equal(error.codeName, "UNAUTHENTICATED");
      assert.equal(error.reason, "CREDENTIAL_INVALID");
      assert.equal(error.retryable, false);
    } finally {
      unknown.close();
    }
  });

  it("rejects a non-positive timeout before calling", () => {
    assert.throws(() => new ChatgateClient(ADDR, { timeoutMs: 0 }), RangeError);
  });
});
