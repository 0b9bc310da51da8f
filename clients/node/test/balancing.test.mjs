// The default service config: round_robin over every address of the target, and the
// retry of UNAVAILABLE (and CANCELLED) before any event. Against real grpc-js servers on
// loopback ports that stand in for replicas (one refuses, one answers), so the balancing and the
// retries are gRPC's own, over real connections.
import assert from "node:assert/strict";
import { after, describe, it } from "node:test";
import grpc from "@grpc/grpc-js";
import { ChatgateClient, ChatgateError, DEFAULT_SERVICE_CONFIG, mergedChannelOptions, user } from "@chatgate/client";
import { chatServiceClient } from "../src/proto.js";

const request = { model: "gpt-4o-mini", userId: "node-user", messages: [user("hello")] };

/** A ChatService whose Complete answers with `reply(n)` for its n-th call (from 1). */
async function replica(reply) {
  const server = new grpc.Server();
  const state = { calls: 0 };
  server.addService(chatServiceClient().service, {
    Complete(call) {
      state.calls += 1;
      const answer = reply(state.calls);
      if (answer.hang) return; // no event, ever: the caller gives up
      if (answer.fail) {
        const metadata = new grpc.Metadata();
        if (answer.pushback !== undefined) metadata.set("grpc-retry-pushback-ms", answer.pushback);
        const code = answer.code ?? grpc.status.UNAVAILABLE;
        call.emit("error", { code, details: answer.fail, metadata });
        return;
      }
      call.write({ started: { requestId: `r${state.calls}`, model: "gpt-4o-mini" } });
      call.write({ finished: { finishReason: "FINISH_REASON_STOP", outcome: "OUTCOME_COMPLETED" } });
      call.end();
    },
  });
  const port = await new Promise((resolve, reject) =>
    server.bindAsync("127.0.0.1:0", grpc.ServerCredentials.createInsecure(), (error, bound) =>
      error ? reject(error) : resolve(bound),
    ),
  );
  return { server, state, address: `127.0.0.1:${port}` };
}

const answers = () => ({});

describe("default service config", () => {
  const servers = [];
  after(() => servers.forEach((s) => s.server.forceShutdown()));

  it("spreads calls over every address of the target", async () => {
    const [a, b] = await Promise.all([replica(answers), replica(answers)]);
    servers.push(a, b);
    const client = new ChatgateClient(`ipv4:${a.address},${b.address}`, { timeoutMs: 5_000 });
    try {
      for (let i = 0; i < 6; i += 1) await client.collect(request);
    } finally {
      client.close();
    }
    assert.ok(a.state.calls >= 2 && b.state.calls >= 2, `calls: ${a.state.calls} and ${b.state.calls}`);
  });

  it("retries UNAVAILABLE before any event, and not when the server says no", async () => {
    const flaky = await replica((n) => (n === 1 ? { fail: "draining" } : {}));
    const firm = await replica(() => ({ fail: "our upstream key was refused", pushback: "-1" }));
    servers.push(flaky, firm);
    const client = new ChatgateClient(flaky.address, { timeoutMs: 5_000 });
    const other = new ChatgateClient(firm.address, { timeoutMs: 5_000 });
    try {
      const completion = await client.collect(request);
      assert.equal(completion.outcome, "completed");
      assert.equal(flaky.state.calls, 2);
      await assert.rejects(other.collect(request), (error) => error instanceof ChatgateError);
      assert.equal(firm.state.calls, 1);
    } finally {
      client.close();
      other.close();
    }
  });

  it("retries CANCELLED before any event (a call gRPC's server core dropped on shutdown)", async () => {
    const stopping = await replica((n) => (n === 1 ? { fail: "server shutdown", code: grpc.status.CANCELLED } : {}));
    servers.push(stopping);
    const client = new ChatgateClient(stopping.address, { timeoutMs: 5_000 });
    try {
      assert.equal((await client.collect(request)).outcome, "completed");
      assert.equal(stopping.state.calls, 2);
    } finally {
      client.close();
    }
  });

  it("does not retry a call its caller cancelled", async () => {
    const silent = await replica(() => ({ hang: true }));
    servers.push(silent);
    const client = new ChatgateClient(silent.address, { timeoutMs: 5_000 });
    const controller = new AbortController();
    try {
      const stream = client.complete(request, { signal: controller.signal });
      const reading = stream.next();
      while (silent.state.calls === 0) await new Promise((resolve) => setTimeout(resolve, 10));
      controller.abort();
      await assert.rejects(reading);
      await new Promise((resolve) => setTimeout(resolve, 500)); // a retry would be here by now
      assert.equal(silent.state.calls, 1);
    } finally {
      client.close();
    }
  });

  it("can be replaced or dropped", () => {
    assert.deepEqual(DEFAULT_SERVICE_CONFIG.loadBalancingConfig, [{ round_robin: {} }]);
    assert.equal(JSON.parse(mergedChannelOptions()["grpc.service_config"]).methodConfig.length, 1);
    assert.ok(!("grpc.service_config" in mergedChannelOptions({ "grpc.service_config": "" })));
    const mine = JSON.stringify({ loadBalancingConfig: [{ pick_first: {} }] });
    assert.equal(mergedChannelOptions({ "grpc.service_config": mine })["grpc.service_config"], mine);
  });
});
