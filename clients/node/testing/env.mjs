// Shared by test/*.test.mjs: where chatgate and its simulator are (set by
// tests/integration/test_node_client.py, which starts both). It lives outside test/
// because node --test runs every .mjs file under a test/ directory as a test file.
import assert from "node:assert/strict";

export const ADDR = process.env.CHATGATE_ADDR;
export const SIMULATOR_URL = process.env.SIMULATOR_URL;
// chatgate runs with authentication and mTLS on: a caller's token, the CA to trust, and
// a client certificate (itself mapped to another caller).
export const TOKEN_FILE = process.env.CHATGATE_TOKEN_FILE;
export const CA_FILE = process.env.CHATGATE_CA_FILE;
export const CLIENT_CERT_FILE = process.env.CHATGATE_CLIENT_CERT_FILE;
export const CLIENT_KEY_FILE = process.env.CHATGATE_CLIENT_KEY_FILE;
assert.ok(ADDR, "CHATGATE_ADDR is not set: run through tests/integration/test_node_client.py");

/** The simulator's deterministic text of n tokens (chatgate_server/simulator/content.py). */
export const simulatorText = (n) =>
  ["The", " quick", " brown", " fox", " jumps", " over", " the", " lazy"].slice(0, n).join("");

/** The simulator's record of the request whose scenario spec is `spec`, once it has ended. */
export async function endedRecord(spec) {
  assert.ok(SIMULATOR_URL, "SIMULATOR_URL is not set");
  for (let i = 0; i < 100; i++) {
    const stats = await (await fetch(`${SIMULATOR_URL}/_simulator/stats`)).json();
    const record = stats.requests.find((r) => r.spec.text === spec);
    if (record?.ended_at != null) return record;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  assert.fail(`the simulator never saw request ${spec} end`);
}
