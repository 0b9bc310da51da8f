// The example script streams a completion to stdout (run as a user would run it).
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { it } from "node:test";
import { ADDR, simulatorText } from "../testing/env.mjs";

const run = promisify(execFile);
const EXAMPLE = fileURLToPath(new URL("../examples/stream.mjs", import.meta.url));
const env = { ...process.env, CHATGATE_ADDR: ADDR };

it("streams the model's text to stdout and usage to stderr", async () => {
  const { stdout, stderr } = await run(process.execPath, [EXAMPLE, "Hello!", "gpt-4o-mini::chunks=6"], { env });
  assert.equal(stdout, `${simulatorText(6)}\n`);
  assert.match(stderr, /completed: \d+ in, 6 out \(reported\)/);
});

it("reports a failure with its reason and exits 1", async () => {
  const failed = await run(process.execPath, [EXAMPLE, "Hello!", "gpt-4o-mini::status=400"], { env }).catch((e) => e);
  assert.equal(failed.code, 1);
  assert.match(failed.stderr, /INVALID_ARGUMENT: .*\[UPSTREAM_REJECTED_REQUEST\]/);
});
