// Reference reader of the exporter's query-override filter, for the edge search proxy
// (docs/contract.md, "Query-override filter"). No dependencies: Web Crypto and BigInt only,
// as in Cloudflare Workers and Node 18+.
//
//   const filter = await env.KV_QCFG.get(`qfilter-${account}-${index}`, "json");
//   if (filter && !(await probe(filter, normalizedQuery))) { /* no override: skip KV_QCFG */ }

const MASK64 = (1n << 64n) - 1n;

// MurmurHash3's 64-bit finalizer.
function fmix64(k) {
  k ^= k >> 33n;
  k = (k * 0xff51afd7ed558ccdn) & MASK64;
  k ^= k >> 33n;
  k = (k * 0xc4ceb9fe1a85ec53n) & MASK64;
  k ^= k >> 33n;
  return k;
}

// The filter member of a normalized query: SHA-256's first 8 bytes, big-endian. The same 16
// hex digits start the hash in the query's `qcfg-` key.
export async function member(normalizedQuery) {
  const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(normalizedQuery));
  return new DataView(digest).getBigUint64(0, false);
}

function fingerprints(filter) {
  if (!filter._fingerprints) {
    const bytes = atob(filter.fingerprints);
    filter._fingerprints = Uint8Array.from(bytes, (c) => c.charCodeAt(0));
  }
  return filter._fingerprints;
}

// Probes a member (a BigInt from `member`): false means certainly not an override.
export function probeMember(filter, key) {
  if (!filter || filter.schema_version !== 1 || filter.filter !== "binary_fuse8") return true;
  if (filter.count === 0) return false;
  const fp = fingerprints(filter);
  const h = fmix64((key + BigInt(filter.seed)) & MASK64);
  const f = Number((h ^ (h >> 32n)) & 0xffn);
  const h0 = Number((h * BigInt(filter.segment_count_length)) >> 64n);
  const h1 = ((h0 + filter.segment_length) ^ (Number((h >> 18n) & 0xffffffffn) & filter.segment_length_mask)) >>> 0;
  const h2 = ((h0 + 2 * filter.segment_length) ^ (Number(h & 0xffffffffn) & filter.segment_length_mask)) >>> 0;
  return (f ^ fp[h0] ^ fp[h1] ^ fp[h2]) === 0;
}

// Whether the index may have an override for this normalized query (no false negatives;
// false positives about 0.4%). An unknown filter format answers true: read KV_QCFG.
export async function probe(filter, normalizedQuery) {
  if (!filter || filter.count === 0) return !filter;
  return probeMember(filter, await member(normalizedQuery));
}
