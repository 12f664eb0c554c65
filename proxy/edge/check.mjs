// Runs worker.mjs in workerd (Miniflare, bundled by esbuild as wrangler would) over what the
// exporter wrote, read back through Cloudflare's KV API (list keys, read each value), and checks
// what the edge reads against what the caller expects. Usage:
//   node proxy/edge/check.mjs CHECK.json
// CHECK.json: {"cloudflare": {"base_url", "token", "account", "namespaces": {"KV": id, "KV_QCFG": id}},
//              "settings": {key: {field: value, ...}},   settings keys KV must hold, with the
//                                                        fields each must carry (others unchecked)
//              "exact": true,                             KV holds no other settings key
//              "overrides": [{"account", "index", "query", "config"}],  every override KV must hold
//              "searches": [{"shop", "q", "index_id", "override"}],
//              "non_members": N}                          queries that are no override, per filter
// Prints one JSON report on stdout (the integration test asserts on it).
import { readFileSync } from "node:fs";
import { isDeepStrictEqual } from "node:util";
import { fileURLToPath } from "node:url";
import { build } from "esbuild";
import { Miniflare } from "miniflare";

const check = JSON.parse(readFileSync(process.argv[2], "utf8"));
const { cloudflare } = check;

// Cloudflare's API, as any client reads it: keys listed a page at a time, each value by its key.
async function api(path) {
  const url = `${cloudflare.base_url}/accounts/${encodeURIComponent(cloudflare.account)}${path}`;
  const response = await fetch(url, { headers: { authorization: `Bearer ${cloudflare.token}` }, redirect: "error" });
  if (!response.ok) throw new Error(`GET ${path}: ${response.status} ${await response.text()}`);
  return response;
}
async function readNamespace(id) {
  const base = `/storage/kv/namespaces/${encodeURIComponent(id)}`;
  const values = {};
  let cursor = "";
  do {
    const page = await (await api(`${base}/keys?limit=1000${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""}`)).json();
    for (const { name } of page.result) values[name] = await (await api(`${base}/values/${encodeURIComponent(name)}`)).text();
    cursor = page.result_info?.cursor ?? "";
  } while (cursor);
  return values;
}

const bundle = await build({
  entryPoints: [fileURLToPath(new URL("./worker.mjs", import.meta.url))],
  bundle: true,
  format: "esm",
  platform: "neutral",
  write: false,
});
const mf = new Miniflare({
  modules: true,
  script: bundle.outputFiles[0].text,
  compatibilityDate: "2025-01-01",
  kvNamespaces: ["KV", "KV_QCFG"],
});

const report = {
  settings_read: 0, schema_errors: [], missing: [], unexpected: [], mismatches: [],
  overrides_read: 0, overrides_wrong: [], searches_wrong: [],
  filters: 0, non_members: 0, false_positives: 0,
};
try {
  const held = {};
  for (const [binding, id] of Object.entries(cloudflare.namespaces)) {
    held[binding] = await readNamespace(id);
    const kv = await mf.getKVNamespace(binding);
    for (const [key, value] of Object.entries(held[binding])) await kv.put(key, value);
  }
  const get = async (path, params) => {
    const response = await mf.dispatchFetch(`http://edge${path}?${new URLSearchParams(params)}`);
    return response.json();
  };

  // Every settings key: parsed with the proxy's schema, expected, and carrying the expected fields.
  for (const key of Object.keys(held.KV)) {
    const answer = await get("/settings", { key });
    report.settings_read += 1;
    if (answer.errors) { report.schema_errors.push({ key, errors: answer.errors }); continue; }
    const expected = check.settings[key];
    if (!expected) { if (check.exact) report.unexpected.push(key); continue; }
    for (const [field, value] of Object.entries(expected)) {
      if (!isDeepStrictEqual(answer.value[field], value)) {
        report.mismatches.push({ key, field, expected: value, got: answer.value[field] });
      }
    }
  }
  report.missing = Object.keys(check.settings).filter((key) => !(key in held.KV));

  // Every expected override found through the filter, with its config.
  for (const { account, index, query, config } of check.overrides) {
    const answer = await get("/override", { account, index, q: query });
    report.overrides_read += 1;
    if (!answer.read || !isDeepStrictEqual(answer.override, config)) {
      report.overrides_wrong.push({ account, index, query, expected: config, answer });
    }
  }
  // A search by shop: the shop's index, then its override for the query (or none).
  for (const { shop, q, index_id, override } of check.searches) {
    const answer = await get("/search", { shop, q });
    if (answer.index_id !== index_id || !isDeepStrictEqual(answer.override ?? null, override)) {
      report.searches_wrong.push({ shop, q, expected: { index_id, override }, answer });
    }
  }
  // Every filter: queries that are no override, and how many it would still send to KV_QCFG.
  for (const [key, text] of Object.entries(held.KV_QCFG)) {
    if (!key.startsWith("qfilter-")) continue;
    report.filters += 1;
    const { system_account_id: account, index_name: index } = JSON.parse(text);
    const misses = await get("/false-positives", { account, index, n: check.non_members });
    report.non_members += misses.probed;
    report.false_positives += misses.passed;
  }
} finally {
  await mf.dispose();
}
console.log(JSON.stringify(report));
