// The settings value as the search proxy relies on it (docs/contract.md, "KV values"), in Zod as
// the proxy parses it: every field the contract names, with its type; unknown fields allowed
// (forward compatibility), so a field the function adds never breaks the edge.
import { z } from "zod";

const document = z.record(z.string(), z.unknown()).nullable();

const readTarget = z.looseObject({
  index_id: z.string().min(1),
  weight: z.number(),
  internal: z.boolean(),
});

export const IndexAliases = z.looseObject({
  doc_reads: z.looseObject({ enabled: z.boolean(), targets: z.array(readTarget) }).nullable(),
  analytics: z
    .looseObject({ enabled: z.boolean(), index_id: z.string().nullable(), internal: z.boolean() })
    .nullable(),
});

export const Settings = z.looseObject({
  schema_version: z.literal(1),
  system_account_id: z.string().min(1),
  index_name: z.string().min(1),
  index_id: z.string().min(1),
  shop_id: z.string().nullable(),
  marqo_api_key: z.string().min(1),
  index_url: z.url(),
  search_config: document,
  collections_config: document,
  feature_flags: document,
  agentic_config: document,
  pixel_id: z.string().nullable(),
  index_aliases: IndexAliases,
  query_override_sharding: document,
});

export const QueryConfig = z.looseObject({
  schema_version: z.literal(1),
  system_account_id: z.string().min(1),
  index_name: z.string().min(1),
  query: z.string(),
  config: z.unknown(),
});
