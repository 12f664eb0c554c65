// Runs worker.mjs in workerd (Miniflare, bundled by esbuild as wrangler would) over a copy of
// what the exporter wrote, and reads every key back as the edge does. Usage:
//   node proxy/edge/check.mjs KV.json [NON_MEMBERS]
// KV.json: {"KV": {key: value text}, "KV_QCFG": {key: value text}}, the two namespaces of a run.
// Prints one JSON report on stdout (the integration test asserts on it).
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { build } from "esbuild";
import { Miniflare } from "miniflare";

const [dumpPath, nonMembersArg] = process.argv.slice(2);
const dump = JSON.parse(readFileSync(dumpPath, "utf8"));
const nonMembersPerFilter = Number(nonMembersArg ?? 1000);

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
  settings_read: 0, schema_errors: [], unresolved: [], searches: [],
  filters: 0, overrides_found: 0, false_negatives: [], non_members: 0, false_positives: 0,
};
try {
  for (const [binding, values] of Object.entries(dump)) {
    const kv = await mf.getKVNamespace(binding);
    for (const [key, value] of Object.entries(values)) await kv.put(key, value);
  }
  const get = async (path, params) => {
    const response = await mf.dispatchFetch(`http://edge${path}?${new URLSearchParams(params)}`);
    return response.json();
  };

  // Every settings key: parsed, and resolving to its index (own key) or naming its shop.
  const overridesOf = new Map();
  for (const [key, text] of Object.entries(dump.KV_QCFG ?? {})) {
    if (!key.startsWith("qcfg-")) continue;
    const value = JSON.parse(text);
    const index = `${value.system_account_id}-${value.index_name}`;
    if (!overridesOf.has(index)) overridesOf.set(index, []);
    overridesOf.get(index).push(value);
  }
  for (const key of Object.keys(dump.KV ?? {})) {
    const answer = await get("/settings", { key });
    report.settings_read += 1;
    if (answer.errors) { report.schema_errors.push({ key, errors: answer.errors }); continue; }
    const { index_id, shop_id, system_account_id, index_name } = answer.value;
    if (index_id !== `${system_account_id}-${index_name}` || (key !== index_id && key !== shop_id)) {
      report.unresolved.push({ key, index_id, shop_id });
      continue;
    }
    if (key === shop_id) {
      const first = overridesOf.get(index_id)?.[0];
      const q = first?.query ?? "a query without an override";
      const search = await get("/search", { shop: key, q });
      report.searches.push({ shop: key, q, ...search, expected: first?.config ?? null });
    }
  }

  // Every filter: each override found through it (no false negative), non-members counted.
  for (const [key, text] of Object.entries(dump.KV_QCFG ?? {})) {
    if (!key.startsWith("qfilter-")) continue;
    report.filters += 1;
    const { system_account_id: account, index_name: index } = JSON.parse(text);
    for (const value of overridesOf.get(`${account}-${index}`) ?? []) {
      const answer = await get("/override", { account, index, q: value.query });
      const same = JSON.stringify(answer.override) === JSON.stringify(value.config);
      if (answer.read && same) report.overrides_found += 1;
      else report.false_negatives.push({ account, index, query: value.query, answer });
    }
    const misses = await get("/false-positives", { account, index, n: nonMembersPerFilter });
    report.non_members += misses.probed;
    report.false_positives += misses.passed;
  }
} finally {
  await mf.dispose();
}
console.log(JSON.stringify(report));
