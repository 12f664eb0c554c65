//! The answers `docs/operations.md` shows are real: each documented payload (`--data-file
//! events/NAME` followed by a ```json block) runs, in the order the page shows them, against a
//! table seeded as `make local` seeds it, and the answer must equal the page's (a string
//! ending in `…` stands for any string starting with what precedes it; `"…": "…"` in an object
//! for the fields the page leaves out).
//!
//! `DOCS_EXAMPLES_PRINT=1` prints the real answers, to paste when the function's answers change.

use crate::common::*;
use serde_json::Value;

const PAGE: &str = include_str!("../../docs/operations.md");

/// (payload file, the answer shown) in page order.
fn examples() -> Vec<(String, String)> {
    let lines: Vec<&str> = PAGE.lines().collect();
    let mut found = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(name) = line
            .split("--data-file events/")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
        else {
            continue;
        };
        // The answer is the next ```json block, unless another command comes first.
        let rest = &lines[i + 1..];
        let Some(open) = rest
            .iter()
            .position(|l| l.trim() == "```json" || l.contains("--data-file"))
            .filter(|&at| rest[at].trim() == "```json")
        else {
            continue;
        };
        let answer: String = rest[open + 1..]
            .iter()
            .take_while(|l| l.trim() != "```")
            .copied()
            .collect();
        found.push((name.to_owned(), answer));
    }
    found
}

/// Where the shown answer differs from the real one, if it does.
fn differs(shown: &Value, real: &Value, at: &str) -> Option<String> {
    match (shown, real) {
        (Value::String(s), Value::String(r)) if s.ends_with('…') => {
            let prefix = s.trim_end_matches('…');
            (!r.starts_with(prefix)).then(|| format!("{at}: `{r}` does not start with `{prefix}`"))
        }
        // `"…": "…"` in an object: the other fields are left out of the page.
        (Value::Object(s), Value::Object(r)) if s.contains_key("…") => s
            .iter()
            .filter(|(k, _)| *k != "…")
            .find_map(|(k, v)| match r.get(k) {
                Some(r) => differs(v, r, &format!("{at}.{k}")),
                None => Some(format!("{at}: no field {k}")),
            }),
        (Value::Object(s), Value::Object(r)) => {
            let (mut shown_keys, mut real_keys): (Vec<_>, Vec<_>) =
                (s.keys().collect(), r.keys().collect());
            shown_keys.sort();
            real_keys.sort();
            if shown_keys != real_keys {
                return Some(format!("{at}: fields {shown_keys:?}, really {real_keys:?}"));
            }
            s.iter()
                .find_map(|(k, v)| differs(v, &r[k], &format!("{at}.{k}")))
        }
        (Value::Array(s), Value::Array(r)) if s.len() == r.len() => s
            .iter()
            .zip(r)
            .enumerate()
            .find_map(|(i, (s, r))| differs(s, r, &format!("{at}[{i}]"))),
        (s, r) => (s != r).then(|| format!("{at}: shown {s}, really {r}")),
    }
}

fn event(name: &str) -> Value {
    let path = format!("{}/events/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&path).expect(&path)).expect(&path)
}

#[tokio::test]
async fn every_answer_the_runbook_shows_is_what_the_function_answers() {
    let examples = examples();
    assert!(examples.len() >= 5, "{examples:?}");
    // What `make local` seeds: the index of stream-insert.json and one override.
    let h = Harness::new().await;
    h.keys.set_key("acct-1", "local-marqo-key");
    for sample in ["stream-insert.json", "stream-query-config.json"] {
        h.put(event(sample)["Records"][0]["dynamodb"]["NewImage"].clone())
            .await;
    }
    let print = std::env::var_os("DOCS_EXAMPLES_PRINT").is_some();
    let mut wrong = Vec::new();
    for (name, shown) in examples {
        let real = h.invoke(event(&name)).await;
        if print {
            println!(
                "{name}:\n{}\n",
                serde_json::to_string_pretty(&real).unwrap()
            );
        }
        let shown: Value = match serde_json::from_str(&shown) {
            Ok(shown) => shown,
            Err(e) => {
                wrong.push(format!(
                    "{name}: the page's answer is not JSON ({e}): {shown}"
                ));
                continue;
            }
        };
        if let Some(difference) = differs(&shown, &real, &name) {
            wrong.push(difference);
        }
    }
    assert!(
        wrong.is_empty(),
        "docs/operations.md is out of date:\n{}",
        wrong.join("\n")
    );
}

/// Every `aws lambda invoke` the runbook shows invokes the `live` alias: the code the stream and
/// the schedule run, which a rollback moves back.
#[test]
fn every_invoke_the_runbook_shows_runs_the_live_alias() {
    let commands: Vec<&str> = (PAGE.split("aws lambda invoke").skip(1))
        .filter(|rest| rest.trim_start().starts_with(['-', '\\']))
        .map(|rest| rest.split("out.json").next().unwrap_or(rest))
        .collect();
    assert!(commands.len() >= 4, "{commands:?}");
    for command in commands {
        assert!(command.contains("--qualifier live"), "{command}");
    }
}

/// Every parameter of `template.yaml` has its row in the runbook's table, with the template's
/// default (`empty` for an empty one, nothing for a required one), and no row names another.
#[test]
fn the_parameter_table_is_the_templates() {
    let template = include_str!("../../template.yaml");
    let block =
        &template[template.find("\nParameters:\n").unwrap()..template.find("\nMappings:").unwrap()];
    let mut parameters = Vec::new();
    for line in block.lines().skip(2) {
        if let Some(name) = line.strip_prefix("  ").and_then(|l| l.strip_suffix(':')) {
            if !name.starts_with(' ') {
                parameters.push((name.to_owned(), None));
            }
        } else if let Some(default) = line.trim().strip_prefix("Default: ") {
            let default = default.trim_matches('"').to_owned();
            parameters.last_mut().unwrap().1 = Some(default);
        }
    }
    let rows: Vec<(String, String)> = (PAGE.lines())
        .filter(|l| l.starts_with("| `") && l.matches('|').count() >= 5)
        .skip_while(|l| !l.starts_with("| `Environment`"))
        .take_while(|l| l.starts_with("| `"))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            (
                cells[1].trim_matches('`').to_owned(),
                cells[3].trim_matches('`').to_owned(),
            )
        })
        .collect();
    assert_eq!(rows.len(), parameters.len(), "{rows:?}");
    for (name, default) in &parameters {
        let shown = match default.as_deref() {
            None => "",
            Some("") => "empty",
            Some(value) => value,
        };
        let row = rows.iter().find(|(n, _)| n == name);
        assert_eq!(row.map(|(_, d)| d.as_str()), Some(shown), "{name}");
    }
}
