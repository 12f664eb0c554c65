// A search proxy's reads, as a Worker: what the exporter wrote, read through the KV bindings
// (`KV`, `KV_QCFG`) the way the edge reads it. Run by check.mjs in workerd (Miniflare).
//   GET /settings?key=K            the value at K, parsed with the proxy's schema
//   GET /search?shop=S&q=Q         settings by shop, then the override filter before KV_QCFG
//   GET /override?account=A&index=I&q=Q   the filter probe, then the override when it may exist
//   GET /false-positives?account=A&index=I&n=N   of N queries that are no override, how many the
//                                                filter would still send to KV_QCFG
import { probe } from "../qfilter.js";
import { QueryConfig, Settings } from "./settings.mjs";

const json = (body, status = 200) =>
  new Response(JSON.stringify(body), { status, headers: { "content-type": "application/json" } });

async function settings(env, key) {
  const text = await env.KV.get(key);
  if (text === null) return { found: false };
  const parsed = Settings.safeParse(JSON.parse(text));
  if (!parsed.success) return { found: true, errors: parsed.error.issues };
  return { found: true, value: parsed.data };
}

// The proxy probes the filter first; only a query the filter may hold costs a KV_QCFG read.
async function override(env, account, index, query) {
  const filter = await env.KV_QCFG.get(`qfilter-${account}-${index}`, "json");
  if (filter && !(await probe(filter, query))) return { read: false, override: null };
  const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(query));
  const hex = [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
  const text = await env.KV_QCFG.get(`qcfg-${account}-${index}-${hex}`);
  if (text === null) return { read: true, override: null };
  const parsed = QueryConfig.safeParse(JSON.parse(text));
  if (!parsed.success) return { read: true, errors: parsed.error.issues };
  return { read: true, override: parsed.data.config };
}

export default {
  async fetch(request, env) {
    const url = new URL(request.url);
    const arg = (name) => url.searchParams.get(name);
    if (url.pathname === "/settings") return json(await settings(env, arg("key")));
    if (url.pathname === "/override") {
      return json(await override(env, arg("account"), arg("index"), arg("q")));
    }
    if (url.pathname === "/false-positives") {
      const [account, index, n] = [arg("account"), arg("index"), Number(arg("n"))];
      const filter = await env.KV_QCFG.get(`qfilter-${account}-${index}`, "json");
      let passed = 0;
      for (let i = 0; i < n; i++) if (await probe(filter, `no override ${i} of ${account}-${index}`)) passed += 1;
      return json({ probed: n, passed });
    }
    if (url.pathname === "/search") {
      const found = await settings(env, arg("shop"));
      if (!found.value) return json(found, 404);
      const { system_account_id: account, index_name: index, index_id, index_url } = found.value;
      return json({ index_id, index_url, ...(await override(env, account, index, arg("q"))) });
    }
    return json({ error: "not found" }, 404);
  },
};
