//! The house's rules hold. Size: no function over 80 lines and no module over 450 lines before
//! its tests, in the function, the CLI and the stand-ins alike. Imports: each room of the crate
//! imports only what the arrows in `lib.rs`'s Layout reach, and those arrows have no cycle.
//! Counted on the text with its comments, strings and character literals blanked, so a `{` or a
//! `crate::` inside them does not count.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const LIB: &str = include_str!("../../src/lib.rs");

const MAX_FUNCTION_LINES: usize = 80;
const MAX_MODULE_LINES: usize = 450;

fn sources(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("a source folder is readable") {
        let path = entry.expect("an entry of a source folder").path();
        if path.is_dir() {
            sources(&path, found);
        } else if path.extension().is_some_and(|e| e == "rs") {
            found.push(path);
        }
    }
}

/// The code with comments, strings and character literals turned to spaces (newlines kept).
fn blanked(code: &str) -> String {
    let chars: Vec<char> = code.chars().collect();
    let mut out = String::with_capacity(code.len());
    let mut i = 0;
    let blank = |out: &mut String, text: &[char]| {
        out.extend(text.iter().map(|c| if *c == '\n' { '\n' } else { ' ' }));
    };
    while i < chars.len() {
        let rest = &chars[i..];
        let end = match rest {
            ['/', '/', ..] => rest.iter().position(|c| *c == '\n').unwrap_or(rest.len()),
            ['/', '*', ..] => block_comment(rest),
            ['r', '#' | '"', ..] | ['b', 'r', '#' | '"', ..] => raw_string(rest),
            ['"', ..] | ['b', '"', ..] => quoted(rest, '"'),
            ['\'', '\\', ..] | ['b', '\'', '\\', ..] => quoted(rest, '\''),
            ['\'', _, '\'', ..] => 3,
            ['b', '\'', _, '\'', ..] => 4,
            _ => 0,
        };
        // An identifier ending in `r` or `b` is not a literal's prefix.
        let mid_word = i > 0 && (chars[i - 1].is_alphanumeric() || chars[i - 1] == '_');
        if end == 0 || (mid_word && matches!(rest[0], 'r' | 'b')) {
            out.push(chars[i]);
            i += 1;
        } else {
            blank(&mut out, &rest[..end]);
            i += end;
        }
    }
    out
}

fn block_comment(rest: &[char]) -> usize {
    let mut depth = 0;
    let mut i = 0;
    while i + 1 < rest.len() {
        match (rest[i], rest[i + 1]) {
            ('/', '*') => (depth, i) = (depth + 1, i + 2),
            ('*', '/') => (depth, i) = (depth - 1, i + 2),
            _ => i += 1,
        }
        if depth == 0 {
            return i;
        }
    }
    rest.len()
}

/// A literal from its opening `open` (after any `b` prefix) to its closing one, escapes skipped.
fn quoted(rest: &[char], open: char) -> usize {
    let start = rest
        .iter()
        .position(|c| *c == open)
        .expect("the literal opens")
        + 1;
    let mut i = start;
    while i < rest.len() {
        match rest[i] {
            '\\' => i += 2,
            c if c == open => return i + 1,
            _ => i += 1,
        }
    }
    rest.len()
}

/// `r#"..."#` (any number of `#`, or none) with an optional `b` prefix.
fn raw_string(rest: &[char]) -> usize {
    let r = rest.iter().position(|c| *c == 'r').expect("a raw string");
    let hashes = rest[r + 1..].iter().take_while(|c| **c == '#').count();
    if rest.get(r + 1 + hashes) != Some(&'"') {
        return 0; // `r#ident`, not a string
    }
    let close: Vec<char> = std::iter::once('"')
        .chain("#".repeat(hashes).chars())
        .collect();
    let body = r + hashes + 2;
    (body..rest.len())
        .find(|i| rest[*i..].starts_with(&close))
        .map_or(rest.len(), |i| i + close.len())
}

/// Each function's name and how many lines it spans, from `fn` to its closing brace.
fn function_lengths(code: &str) -> Vec<(String, usize)> {
    let bytes = code.as_bytes();
    let line_of = |at: usize| code[..at].matches('\n').count();
    let mut found = Vec::new();
    for (at, _) in code.match_indices("fn ") {
        if at > 0 && (bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_') {
            continue;
        }
        let name: String = (code[at + 3..].chars())
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let Some(open) = code[at..].find(['{', ';']).map(|o| at + o) else {
            continue;
        };
        if name.is_empty() || bytes[open] == b';' {
            continue; // a pointer type or a declaration without a body
        }
        let mut depth = 0usize;
        let close = (open..bytes.len()).find(|i| {
            match bytes[*i] {
                b'{' => depth += 1,
                b'}' => depth -= 1,
                _ => {}
            }
            depth == 0
        });
        let close = close.unwrap_or(bytes.len() - 1);
        found.push((name, line_of(close) - line_of(at) + 1));
    }
    found
}

/// The lines before the module's tests.
/// A file's code before its tests: before `#[cfg(test)]`, or none of it when the whole file
/// is a test module (`#![cfg(test)]`).
fn before_tests(code: &str) -> &str {
    let at = ["#[cfg(test)]", "#![cfg(test)]"].map(|marker| code.find(marker));
    at.into_iter()
        .flatten()
        .min()
        .map_or(code, |at| &code[..at])
}

fn too_long(root: &Path) -> (Vec<String>, usize) {
    let mut files = Vec::new();
    for dir in ["src", "cli/src", "emulators/src"] {
        sources(&root.join(dir), &mut files);
    }
    let mut over = Vec::new();
    for file in &files {
        let code = std::fs::read_to_string(file).expect("a source file is text");
        let code = blanked(before_tests(&code));
        let path = file.strip_prefix(root).unwrap().display();
        let lines = code.lines().count();
        if lines > MAX_MODULE_LINES {
            over.push(format!("{path}: {lines} lines before its tests"));
        }
        for (name, lines) in function_lengths(&code) {
            if lines > MAX_FUNCTION_LINES {
                over.push(format!("{path}: fn {name} is {lines} lines"));
            }
        }
    }
    (over, files.len())
}

#[test]
fn no_function_over_80_lines_and_no_module_over_450_before_its_tests() {
    let (over, files) = too_long(Path::new(env!("CARGO_MANIFEST_DIR")));
    assert!(files > 60, "the walk found the sources ({files})");
    assert!(over.is_empty(), "split these: {over:#?}");
}

#[test]
fn the_counter_sees_through_literals_and_comments() {
    let code = r##"
fn short() {
    let brace = '{';
    let text = "}}} {";
    let raw = r#"{"#;
    let bytes = b"{";
    // }
    /* } /* { */ } */
    let life: &'static str = "x";
}
fn after() -> u8 { 1 }
type Pointer = fn(u8) -> u8;
"##;
    let lengths = function_lengths(&blanked(code));
    let expected = [("short".to_string(), 9), ("after".to_string(), 1)];
    assert_eq!(lengths, expected);
    let long = format!(
        "fn long() {{\n{}}}\n",
        "    step();\n".repeat(MAX_FUNCTION_LINES)
    );
    assert_eq!(function_lengths(&blanked(&long)), [("long".into(), 82)]);
}

/// The arrows of `lib.rs`'s Layout ("a -> b, c -> d; ..."): each room and the rooms it may
/// import directly.
fn documented_arrows() -> BTreeMap<String, BTreeSet<String>> {
    let layout: String = (LIB.lines())
        .filter_map(|l| l.strip_prefix("//!"))
        .skip_while(|l| !l.contains("Arrows:"))
        .take_while(|l| !l.trim_start().starts_with('('))
        .collect::<Vec<_>>()
        .join(" ");
    let mut arrows: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for chain in layout.replace("Arrows:", "").split(';') {
        let rooms: Vec<Vec<String>> = (chain.trim_end_matches('.').split("->"))
            .map(|group| group.split(',').map(|r| r.trim().to_string()).collect())
            .collect();
        for room in rooms.iter().flatten() {
            arrows.entry(room.clone()).or_default();
        }
        for pair in rooms.windows(2) {
            for from in &pair[0] {
                arrows
                    .get_mut(from)
                    .unwrap()
                    .extend(pair[1].iter().cloned());
            }
        }
    }
    arrows
}

/// Every room `from` reaches through the arrows; `None` when `from` reaches itself (a cycle).
fn reachable(arrows: &BTreeMap<String, BTreeSet<String>>, from: &str) -> Option<BTreeSet<String>> {
    let mut seen = BTreeSet::new();
    let mut next: Vec<&String> = arrows[from].iter().collect();
    while let Some(room) = next.pop() {
        if room == from {
            return None;
        }
        if seen.insert(room.clone()) {
            next.extend(arrows.get(room).into_iter().flatten());
        }
    }
    Some(seen)
}

/// Each room's file or folder under `src/` and the rooms its code (not its tests) names.
fn actual_imports(root: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    sources(&root.join("src"), &mut files);
    let mut imports: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let relative = file.strip_prefix(root.join("src")).unwrap();
        let first = relative
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let room = first.trim_end_matches(".rs").to_string();
        if room == "lib" || room == "main" {
            continue; // the crate root wires every room; the binary uses the crate
        }
        let code = std::fs::read_to_string(&file).expect("a source file is text");
        let code = blanked(before_tests(&code));
        let named = code.match_indices("crate::").map(|(at, _)| {
            let rest = &code[at + "crate::".len()..];
            rest.chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect::<String>()
        });
        let entry = imports.entry(room.clone()).or_default();
        entry.extend(named.filter(|other| !other.is_empty() && *other != room));
    }
    imports
}

#[test]
fn each_room_imports_only_what_the_layout_s_arrows_reach_and_they_have_no_cycle() {
    let arrows = documented_arrows();
    let modules: Vec<&str> = (LIB.lines())
        .filter_map(|l| {
            l.strip_prefix("pub mod ")
                .or_else(|| l.strip_prefix("pub(crate) mod "))
        })
        .map(|l| l.trim_end_matches(';'))
        .collect();
    assert!(modules.len() >= 8, "the crate root declares its modules");
    let unplaced: Vec<&&str> = modules
        .iter()
        .filter(|m| !arrows.contains_key(**m))
        .collect();
    assert!(unplaced.is_empty(), "the Layout's arrows lack {unplaced:?}");
    let mut broken = Vec::new();
    for (room, imported) in actual_imports(Path::new(env!("CARGO_MANIFEST_DIR"))) {
        let allowed = reachable(&arrows, &room)
            .unwrap_or_else(|| panic!("the Layout's arrows run in a cycle through {room}"));
        broken.extend(
            (imported.iter())
                .filter(|other| !allowed.contains(*other))
                .map(|other| format!("{room} imports {other}")),
        );
    }
    assert!(broken.is_empty(), "against lib.rs's arrows: {broken:?}");
}

#[test]
fn the_arrows_are_read_as_written() {
    let arrows = documented_arrows();
    let reach = |room: &str| reachable(&arrows, room).unwrap();
    assert!(arrows["domain"].is_empty());
    assert!(reach("entry").contains("domain"));
    assert!(reach("adapters").contains("domain"));
    assert!(!reach("adapters").contains("pipeline"));
    assert!(!reach("domain").contains("ports"));
    let cyclic = BTreeMap::from([
        ("a".to_string(), BTreeSet::from(["b".to_string()])),
        ("b".to_string(), BTreeSet::from(["a".to_string()])),
    ]);
    assert_eq!(reachable(&cyclic, "a"), None);
}
