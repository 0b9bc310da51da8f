// What a caller sees of chatgate's limits: allowances on the started event, and
// refusals it can act on. The chatgate started by tests/integration/test_node_client.py
// holds a scripted admission policy (tests/integration/scripted_limits.py) that admits,
// refuses or blocks by the end user id; the ids and values below are its script.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { after, describe, it } from "node:test";
import grpc from "@grpc/grpc-js";
import { ChatgateClient, ChatgateError, LIMIT_REASONS, user } from "@chatgate/client";
import { ADDR, CA_FILE, CLIENT_CERT_FILE, CLIENT_KEY_FILE, TOKEN_FILE } from "../testing/env.mjs";

const client = new ChatgateClient(ADDR, {
  tokenFile: TOKEN_FILE,
  caFile: CA_FILE,
  certFile: CLIENT_CERT_FILE,
  keyFile: CLIENT_KEY_FILE,
  timeoutMs: 10_000,
});
after(() => client.close());

const request = (userId) => ({ model: "gpt-4o-mini", userId, messages: [user("hello")] });

const EXPECTED_ALLOWANCES = [
  {
    subject: "tenant:scripted",
    kind: "tokens_per_minute",
    limit: 30_000,
    remaining: 29_400,
    resetsAt: new Date("2030-01-01T00:00:30.250Z"),
  },
  {
    subject: "user:scripted/limits-admitted/model:gpt-4o-mini",
    kind: "requests_per_minute",
    limit: 60,
    remaining: 59,
    resetsAt: new Date("2030-01-01T00:00:01Z"),
  },
  // Beyond 2^32 micro-dollars: int64 arrives as an exact Number.
  {
    subject: "tenant:scripted",
    kind: "spend_per_month",
    limit: 5_000_000_000,
    remaining: 4_999_000_000,
    resetsAt: new Date("2030-02-01T00:00:00Z"),
  },
  { subject: "caller:scripted/billing", kind: "concurrent_streams", limit: 4, remaining: 3, resetsAt: null },
];

async function refusal(userId) {
  try {
    await client.collect(request(userId));
  } catch (error) {
    assert.ok(error instanceof ChatgateError, `expected a ChatgateError, got ${error}`);
    return error;
  }
  assert.fail("the call succeeded");
}

describe("allowances", () => {
  it("the started event carries each limit's headroom", async () => {
    let started = null;
    for await (const event of client.complete(request("limits-admitted"))) {
      if (event.type === "started") started = event;
    }
    assert.deepEqual(started.allowances, EXPECTED_ALLOWANCES);
    assert.ok(started.allowances[0].resetsAt instanceof Date);
  });

  it("collect() keeps them, and a call no limit applies to has none", async () => {
    assert.deepEqual((await client.collect(request("limits-admitted"))).allowances, EXPECTED_ALLOWANCES);
    assert.deepEqual((await client.collect(request("node-unlimited"))).allowances, []);
  });
});

describe("limit refusals", () => {
  it("a per-minute limit says which, whose, and when to come back", async () => {
    const error = await refusal("limits-per-minute");
    assert.equal(error.code, grpc.status.RESOURCE_EXHAUSTED);
    assert.equal(error.reason, "TOKENS_PER_MINUTE_EXCEEDED");
    assert.ok(error.limitExceeded && LIMIT_REASONS.includes(error.reason));
    assert.deepEqual(
      error.quotaViolations.map(({ subject, description }) => ({ subject, description })),
      [
        { subject: "user:scripted/limits-per-minute", description: "tokens_per_minute 10000 reached" },
        { subject: "tenant:scripted", description: "tokens_per_minute 30000 reached" },
      ],
    );
    assert.equal(error.retryDelayMs, 12_000);
    assert.ok(error.waitingHelps && error.retryable);
    assert.equal(error.eventsReceived, 0);
  });

  it("a spent monthly budget has no retry delay: waiting does not help", async () => {
    const error = await refusal("limits-monthly");
    assert.equal(error.code, grpc.status.RESOURCE_EXHAUSTED);
    assert.equal(error.reason, "SPEND_PER_MONTH_EXCEEDED");
    assert.deepEqual(
      error.quotaViolations.map((v) => v.subject),
      ["tenant:scripted"],
    );
    assert.equal(error.retryDelayMs, null);
    assert.ok(error.limitExceeded && !error.waitingHelps && !error.retryable);
  });

  it("a block is PERMISSION_DENIED with reason BLOCKED", async () => {
    const error = await refusal("limits-blocked");
    assert.equal(error.codeName, "PERMISSION_DENIED");
    assert.equal(error.reason, "BLOCKED");
    assert.match(error.details, /abuse review/);
    assert.ok(!error.limitExceeded && !error.waitingHelps && !error.retryable);
  });
});

// The README's collectWithinLimits, loaded as written (its ChatgateError is this package's).
async function readmeExample() {
  const readme = readFileSync(new URL("../README.md", import.meta.url), "utf8");
  const block = [...readme.matchAll(/^```js\n(.*?)^```/gms)].map((m) => m[1]).find((b) => b.includes("collectWithinLimits"));
  assert.ok(block, "README.md has the collectWithinLimits example");
  const source = `import { ChatgateError } from ${JSON.stringify(new URL("../src/index.js", import.meta.url).href)};
${block}
export { collectWithinLimits };`;
  return (await import(`data:text/javascript,${encodeURIComponent(source)}`)).collectWithinLimits;
}

describe("the README's limit handling", () => {
  it("waits when RetryInfo says the call will fit, and gives up when it will not", async () => {
    const collectWithinLimits = await readmeExample();
    // Refused once with RetryInfo 0.2 s, then admitted: the same request goes through.
    assert.equal((await collectWithinLimits(client, request("limits-once"))).finished, true);
    await assert.rejects(collectWithinLimits(client, request("limits-per-minute"), 5_000), {
      message: "TOKENS_PER_MINUTE_EXCEEDED for user:scripted/limits-per-minute, tenant:scripted: try again later",
    });
    await assert.rejects(collectWithinLimits(client, request("limits-monthly")), /SPEND_PER_MONTH_EXCEEDED/);
    await assert.rejects(collectWithinLimits(client, request("limits-blocked")), (e) => e.reason === "BLOCKED");
  });
});
