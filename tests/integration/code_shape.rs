//! The house's size rule holds: no function over 80 lines and no module over 450 lines before
//! its tests, in the function, the CLI and the stand-ins alike. Counted on the text with its
//! comments, strings and character literals blanked, so a `{` inside them does not count.

use std::path::{Path, PathBuf};

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
fn before_tests(code: &str) -> &str {
    code.find("#[cfg(test)]").map_or(code, |at| &code[..at])
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
