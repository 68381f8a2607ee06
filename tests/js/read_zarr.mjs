// Read Zarr v3 arrays with zarrita.js (the JavaScript implementation) and print, per array, its
// dtype, shape and the SHA-256 of its bytes in C order: tests/test_portable.py compares them with
// what zarr-python and spherefmt read.  Usage: node read_zarr.mjs ROOT PATH...
import * as zarr from "zarrita";
import { FileSystemStore } from "@zarrita/storage";
import { createHash } from "node:crypto";

const [root, ...paths] = process.argv.slice(2);
const store = new FileSystemStore(root);
const out = {};
for (const p of paths) {
  const arr = await zarr.open(zarr.root(store).resolve(p), { kind: "array" });
  const { data, shape } = await zarr.get(arr);
  const bytes = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  out[p] = { dtype: arr.dtype, shape, sha256: createHash("sha256").update(bytes).digest("hex") };
}
console.log(JSON.stringify(out));
