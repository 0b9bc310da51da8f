// The TypeScript declarations compile, and a typical use type-checks against them.
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { createRequire } from "node:module";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { it } from "node:test";

const tsc = createRequire(import.meta.url).resolve("typescript/bin/tsc");
const project = fileURLToPath(new URL("./tsconfig.json", import.meta.url));

it("index.d.ts and a typed usage example pass tsc --strict", async () => {
  const result = await promisify(execFile)(process.execPath, [tsc, "-p", project]).catch((e) => e);
  assert.equal(result.code ?? 0, 0, `${result.stdout}${result.stderr}`);
});
