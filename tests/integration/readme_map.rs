//! The map stays true: every source file of the function is on the README's room table, every
//! module the crate root declares is on its "Layout", and the stages name files that exist.

use std::path::{Path, PathBuf};

const README: &str = include_str!("../../README.md");
const LIB: &str = include_str!("../../src/lib.rs");

fn sources(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src/ is readable") {
        let path = entry.expect("an entry of src/").path();
        if path.is_dir() {
            sources(&path, found);
        } else if path.extension().is_some_and(|e| e == "rs") {
            found.push(path);
        }
    }
}

/// The table's rows: a file is named by its path, or by its path below a folder that its row
/// names (`segments/listed.rs` in the row of `src/operator/reconcile/`).
fn on_the_map(rows: &[&str], path: &str) -> bool {
    let named = |row: &str| {
        path.match_indices('/').any(|(at, _)| {
            let (folder, rest) = (&path[..at], &path[at + 1..]);
            row.contains(&format!("`{folder}/")) && (rest == "mod.rs" || row.contains(rest))
        })
    };
    rows.iter()
        .any(|row| row.contains(&format!("`{path}`")) || named(row))
}

#[test]
fn every_source_file_is_on_the_readme_s_map() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    sources(&root.join("src"), &mut files);
    let rows: Vec<&str> = (README.lines()).filter(|l| l.starts_with("| ")).collect();
    let missing: Vec<String> = files
        .iter()
        .map(|f| {
            f.strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/")
        })
        .filter(|path| !on_the_map(&rows, path))
        .collect();
    assert!(files.len() > 40, "the walk found the sources");
    assert!(
        missing.is_empty(),
        "add these to the README's room table: {missing:?}"
    );
}

#[test]
fn every_module_of_the_crate_root_is_on_its_layout() {
    let layout: String = (LIB.lines()).take_while(|l| l.starts_with("//!")).collect();
    let modules: Vec<&str> = (LIB.lines())
        .filter_map(|l| {
            (l.strip_prefix("pub mod ")
                .or_else(|| l.strip_prefix("pub(crate) mod ")))
            .or_else(|| l.strip_prefix("mod "))
        })
        .map(|l| l.trim_end_matches(';'))
        .collect();
    assert!(modules.len() >= 8, "the crate root declares its modules");
    let missing: Vec<&&str> = (modules.iter())
        .filter(|m| !layout.contains(&format!("[`{m}`]")))
        .collect();
    assert!(missing.is_empty(), "lib.rs's Layout lacks {missing:?}");
}

#[test]
fn the_readme_s_stages_name_the_files_that_hold_them() {
    let stages = README
        .split("### The stages a change goes through")
        .nth(1)
        .and_then(|rest| rest.split("\n### ").next())
        .expect("the README lists the stages");
    let named: Vec<&str> = (stages.split('`'))
        .skip(1)
        .step_by(2)
        .filter(|name| name.ends_with(".rs"))
        .collect();
    assert!(named.len() >= 5, "the stages name their files: {named:?}");
    let pipeline = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/pipeline");
    let missing: Vec<&&str> = (named.iter())
        .filter(|name| !pipeline.join(name).is_file())
        .collect();
    assert!(
        missing.is_empty(),
        "stages name files not in src/pipeline/: {missing:?}"
    );
    let numbered = (1..=7).all(|n| stages.contains(&format!("\n{n}. **")));
    assert!(numbered, "seven stages, in order");
}

/// Every type named in the README's "concepts to know first" is declared in `src/`, and there
/// are 25 of them at most: the list a reader starts from stays short and true.
#[test]
fn the_concepts_to_know_first_are_few_and_each_is_declared() {
    let entries: Vec<String> = {
        let mut entries: Vec<String> = Vec::new();
        let section = (README.lines())
            .skip_while(|l| *l != "### The concepts to know first")
            .skip(1)
            .take_while(|l| !l.starts_with('#'));
        for line in section {
            match line.strip_prefix("- ") {
                Some(entry) => entries.push(entry.to_owned()),
                None if line.starts_with("  ") => {
                    if let Some(last) = entries.last_mut() {
                        last.push_str(line);
                    }
                }
                None => {}
            }
        }
        entries
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    sources(&root.join("src"), &mut files);
    let code: String = (files.iter())
        .map(|f| std::fs::read_to_string(f).expect("a source file"))
        .collect();
    let declared = |name: &str| {
        ["struct", "enum", "trait", "type"].iter().any(|kind| {
            code.match_indices(&format!("{kind} {name}"))
                .any(|(at, found)| {
                    let next = code[at + found.len()..].chars().next();
                    next.is_some_and(|c| !c.is_alphanumeric() && c != '_')
                })
        })
    };
    let names: Vec<&str> = (entries.iter())
        .flat_map(|entry| entry.split('`').skip(1).step_by(2))
        .filter(|name| name.starts_with(|c: char| c.is_ascii_uppercase()))
        .collect();
    let entries_count = entries.len();
    assert!(
        (10..=25).contains(&entries_count),
        "{entries_count} concepts"
    );
    let missing: Vec<&&str> = names.iter().filter(|name| !declared(name)).collect();
    assert!(missing.is_empty(), "not declared in src/: {missing:?}");
}
