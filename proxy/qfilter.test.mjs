// Checks the reference reader against filters the Rust code wrote. Usage:
//   node proxy/qfilter.test.mjs FIXTURES.json
// where the fixtures are [{"filter": {...}, "members": [...], "non_members": [...]}, ...].
// Prints one summary line; exits non-zero on a false negative or too many false positives.
import { readFileSync } from "node:fs";
import { probe } from "./qfilter.js";

const fixtures = JSON.parse(readFileSync(process.argv[2], "utf8"));
let failed = 0, checked = 0, falsePositives = 0, nonMembers = 0;
for (const { filter, members, non_members } of fixtures) {
  for (const q of members) {
    checked += 1;
    if (!(await probe(filter, q))) {
      failed += 1;
      console.error(`false negative: ${JSON.stringify(q)} in ${filter.index_name} (count ${filter.count})`);
    }
  }
  for (const q of non_members) {
    nonMembers += 1;
    if (await probe(filter, q)) falsePositives += 1;
  }
}
const rate = nonMembers ? falsePositives / nonMembers : 0;
if (rate > 0.02) {
  failed += 1;
  console.error(`false positive rate ${rate} is over 2%`);
}
console.log(`qfilter.js: ${checked} members found, ${falsePositives} of ${nonMembers} non-members passed`);
process.exit(failed ? 1 : 0);
