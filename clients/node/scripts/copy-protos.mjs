// prepack: copy the repository's protos/ into the package, so a packed tarball works
// outside the repository (src/proto.js falls back to it). postpack (--remove) deletes
// the copy again, so nothing in the repository can read a stale contract.
import { cpSync, rmSync } from "node:fs";
import { fileURLToPath } from "node:url";

const source = fileURLToPath(new URL("../../../protos/", import.meta.url));
const target = fileURLToPath(new URL("../protos/", import.meta.url));
rmSync(target, { recursive: true, force: true });
if (!process.argv.includes("--remove")) {
  cpSync(source, target, { recursive: true, filter: (path) => !path.endsWith(".yaml") });
}
