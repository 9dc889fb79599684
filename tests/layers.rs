//! The layer rule: every module of `src/` imports only modules before it in the order that
//! `src/lib.rs` declares them (its `mod` lines, also listed in its `# Layers` docs).
//!
//! A file belongs to its top-level module (`src/x.rs` and `src/x/**` are `x`). Comments and
//! string literals are ignored; `crate::x` paths (inline or in `use`, `use crate::{a, b::c}`
//! groups included) and `super::` paths that climb to the crate root are imports of `x`.
//! `crate::Name` for a name re-exported by `src/lib.rs` (`pub use x::Name`) counts as `x`.
//! `src/main.rs` (the binary, with the modules it declares, e.g. `src/cli.rs`) and `src/lib.rs`
//! (the root) are outside the order; `src/web/`
//! holds no Rust. Std only, so it runs with the other tests.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

/// The modules `src/main.rs` declares (`mod cli;`): the binary's, outside the library's order.
fn binary_modules(src: &Path) -> Vec<String> {
    let main = fs::read_to_string(src.join("main.rs")).unwrap_or_default();
    main.lines()
        .filter_map(|l| l.trim().strip_prefix("mod ")?.strip_suffix(';'))
        .map(|m| m.trim().to_string())
        .collect()
}

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `text` with comments, string literals and character literals blanked out (newlines kept,
/// so line numbers stay right).
fn strip(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = b.to_vec();
    let blank = |out: &mut Vec<u8>, from: usize, to: usize| {
        for c in &mut out[from..to] {
            if *c != b'\n' {
                *c = b' ';
            }
        }
    };
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut i = 0;
    while i < b.len() {
        let start = i;
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
                blank(&mut out, start, i);
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                // Block comments nest in Rust.
                let mut depth = 0;
                while i < b.len() {
                    if b[i..].starts_with(b"/*") {
                        depth += 1;
                        i += 2;
                    } else if b[i..].starts_with(b"*/") {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
                blank(&mut out, start, i);
            }
            b'r' | b'b' if i == 0 || !ident(b[i - 1]) => {
                // Raw strings: r"..", r#".."#, br#".."#.
                let mut j = i + 1;
                if b[i] == b'b' && b.get(j) == Some(&b'r') {
                    j += 1;
                } else if b[i] == b'b' {
                    i += 1; // b"..." and b'.' are handled as plain literals next turn
                    continue;
                }
                let hashes = b[j..].iter().take_while(|&&c| c == b'#').count();
                if b.get(j + hashes) != Some(&b'"') {
                    i += 1;
                    continue;
                }
                let mut close = vec![b'"'];
                close.extend(std::iter::repeat_n(b'#', hashes));
                i = j + hashes + 1;
                while i < b.len() && !b[i..].starts_with(&close) {
                    i += 1;
                }
                i = (i + close.len()).min(b.len());
                blank(&mut out, start, i);
            }
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i = (i + 1).min(b.len());
                blank(&mut out, start, i);
            }
            b'\'' => {
                // A character literal ('x', '\n', '\u{1F600}', '"') or a lifetime ('a).
                if b.get(i + 1) == Some(&b'\\') {
                    i += 3; // past the quote, the backslash and the escaped character
                    while i < b.len() && b[i] != b'\'' {
                        i += 1;
                    }
                    i = (i + 1).min(b.len());
                    blank(&mut out, start, i);
                } else {
                    let ch = text[i + 1..].chars().next().map_or(1, char::len_utf8);
                    if b.get(i + 1 + ch) == Some(&b'\'') {
                        i += ch + 2;
                        blank(&mut out, start, i);
                    } else {
                        i += 1;
                    }
                }
            }
            _ => i += 1,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Ident(String),
    /// `::`
    Path,
    Punct(u8),
}

/// Identifiers, `::` and single punctuation, each with its 1-based line.
fn tokens(code: &str) -> Vec<(Tok, usize)> {
    let b = code.as_bytes();
    let mut out = Vec::new();
    let mut line = 1;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'\n' {
            line += 1;
            i += 1;
        } else if c.is_ascii_whitespace() {
            i += 1;
        } else if c.is_ascii_alphabetic() || c == b'_' || !c.is_ascii() {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || !b[i].is_ascii())
            {
                i += 1;
            }
            out.push((Tok::Ident(code[start..i].to_string()), line));
        } else if c.is_ascii_digit() {
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
        } else if b[i..].starts_with(b"::") {
            out.push((Tok::Path, line));
            i += 2;
        } else {
            out.push((Tok::Punct(c), line));
            i += 1;
        }
    }
    out
}

/// The first path segments after `crate::` at `toks[at..]` (at points past the `::`): one
/// name, or each item's first name in a `{a, b::c, d::{e}}` group.
fn first_segments(toks: &[(Tok, usize)], at: usize) -> Vec<(String, usize)> {
    match toks.get(at) {
        Some((Tok::Ident(name), line)) => vec![(name.clone(), *line)],
        Some((Tok::Punct(b'{'), _)) => {
            let mut names = Vec::new();
            let mut depth = 0;
            let mut item_start = true;
            for (tok, line) in &toks[at..] {
                match tok {
                    Tok::Punct(b'{') => {
                        depth += 1;
                        item_start = depth == 1;
                    }
                    Tok::Punct(b'}') => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    Tok::Punct(b',') if depth == 1 => item_start = true,
                    Tok::Ident(name) if depth == 1 && item_start => {
                        names.push((name.clone(), *line));
                        item_start = false;
                    }
                    _ => {}
                }
            }
            names
        }
        _ => Vec::new(),
    }
}

/// Every crate-root name `code` refers to, with its line: `crate::x`, `use crate::{x, ..}`, and
/// `super::` chains that climb out of the file's module (`depth`: 1 for `src/x.rs` and
/// `src/x/mod.rs`, 2 for `src/x/y.rs`, ...), counting inline `mod m { .. }` blocks.
fn root_refs(code: &str, depth: usize) -> Vec<(String, usize)> {
    let toks = tokens(&strip(code));
    let mut refs = Vec::new();
    // One entry per open brace: whether it opened an inline module.
    let mut braces: Vec<bool> = Vec::new();
    let mut mod_brace_next = false;
    let mut i = 0;
    while i < toks.len() {
        let here = depth + braces.iter().filter(|&&m| m).count();
        let after_path = i > 0 && toks[i - 1].0 == Tok::Path;
        let macro_var = i > 0 && toks[i - 1].0 == Tok::Punct(b'$');
        match &toks[i].0 {
            Tok::Punct(b'{') => {
                braces.push(mod_brace_next);
                mod_brace_next = false;
            }
            Tok::Punct(b'}') => {
                braces.pop();
            }
            Tok::Punct(b';') => mod_brace_next = false,
            Tok::Ident(kw) if kw == "mod" => {
                mod_brace_next = matches!(toks.get(i + 2), Some((Tok::Punct(b'{'), _)));
            }
            Tok::Ident(kw)
                if kw == "crate"
                    && !after_path
                    && !macro_var
                    && toks.get(i + 1).map(|t| &t.0) == Some(&Tok::Path) =>
            {
                refs.extend(first_segments(&toks, i + 2));
            }
            Tok::Ident(kw) if kw == "super" && !after_path => {
                let mut j = i;
                let mut ups = 0;
                while toks.get(j).map(|t| &t.0) == Some(&Tok::Ident("super".into()))
                    && toks.get(j + 1).map(|t| &t.0) == Some(&Tok::Path)
                {
                    ups += 1;
                    j += 2;
                }
                if ups >= here {
                    refs.extend(first_segments(&toks, j));
                }
                i = j.max(i + 1);
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    refs
}

/// The `mod` declarations of the crate root, in order.
fn declared_order(lib: &str) -> Vec<String> {
    strip(lib)
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let rest = l
                .strip_prefix("pub mod ")
                .or_else(|| l.strip_prefix("pub(crate) mod "))
                .or_else(|| l.strip_prefix("mod "))?;
            Some(rest.strip_suffix(';')?.trim().to_string())
        })
        .collect()
}

/// The numbered list of the `# Layers` section of the crate docs: `//! 1. [`x`]: ...`.
fn documented_order(lib: &str) -> Vec<String> {
    lib.lines()
        .skip_while(|l| l.trim() != "//! # Layers")
        .take_while(|l| l.starts_with("//!"))
        .filter_map(|l| {
            let item = l.strip_prefix("//! ")?;
            let (num, rest) = item.split_once(". ")?;
            num.parse::<usize>().ok()?;
            let name = rest.trim_start_matches('[').strip_prefix('`')?;
            Some(name.split('`').next()?.to_string())
        })
        .collect()
}

/// Names the crate root re-exports (`pub use x::Name;`, `pub use x::{A, B};`) → their module.
fn root_reexports(lib: &str) -> HashMap<String, String> {
    let mut map = HashMap::new();
    let code = strip(lib);
    for stmt in code.split(';') {
        let Some(rest) = stmt.trim().strip_prefix("pub use ") else {
            continue;
        };
        let Some((module, names)) = rest.split_once("::") else {
            continue;
        };
        let names = names.trim().trim_start_matches('{').trim_end_matches('}');
        for name in names.split(',') {
            let name = name.rsplit("::").next().unwrap_or("").trim();
            let name = name.rsplit(" as ").next().unwrap_or(name).trim();
            if !name.is_empty() {
                map.insert(name.to_string(), module.trim().to_string());
            }
        }
    }
    map
}

/// Every `.rs` file under `dir`, sorted.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module of a path relative to `src/` and its module depth.
fn module_of(rel: &Path) -> (String, usize) {
    let parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let top = parts[0].trim_end_matches(".rs").to_string();
    let last = parts.last().map(String::as_str);
    let depth = if last == Some("mod.rs") {
        parts.len() - 1
    } else {
        parts.len()
    };
    (top, depth)
}

/// The violations in `src/` of a crate at `root`: one line per upward or unknown import.
fn check(root: &Path) -> Vec<String> {
    let src = root.join("src");
    let lib = fs::read_to_string(src.join("lib.rs")).expect("src/lib.rs");
    let order = declared_order(&lib);
    let rank: HashMap<&str, usize> = order
        .iter()
        .enumerate()
        .map(|(i, m)| (m.as_str(), i))
        .collect();
    let reexports = root_reexports(&lib);
    let binary_modules = binary_modules(&src);
    let mut problems = Vec::new();

    let mut tops: Vec<String> = fs::read_dir(&src)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter_map(|p| {
            let name = p.file_name()?.to_string_lossy().into_owned();
            if p.is_dir() {
                Some(name)
            } else {
                name.strip_suffix(".rs").map(str::to_string)
            }
        })
        .filter(|n| n != "lib" && n != "main" && !binary_modules.contains(n))
        .collect();
    tops.sort();
    tops.dedup();
    for top in &tops {
        if !rank.contains_key(top.as_str()) {
            problems.push(format!(
                "src/{top}: module {top} is not in the order: add its `mod` line to src/lib.rs \
                 (and its line to the `# Layers` list) where it belongs"
            ));
        }
    }

    let mut files = Vec::new();
    rust_files(&src, &mut files);
    for path in files {
        let rel = path.strip_prefix(&src).unwrap().to_path_buf();
        let shown = format!("src/{}", rel.to_string_lossy().replace('\\', "/"));
        if shown == "src/main.rs" || shown == "src/lib.rs" || shown.starts_with("src/web/") {
            continue;
        }
        let top = rel
            .components()
            .next()
            .map(|c| c.as_os_str().to_string_lossy());
        let top = top.map(|t| t.trim_end_matches(".rs").to_string());
        if top.is_some_and(|t| binary_modules.contains(&t)) {
            continue; // the binary's own modules see the library only as `switchboard::`
        }
        let (module, depth) = module_of(&rel);
        let Some(&mine) = rank.get(module.as_str()) else {
            continue; // reported above
        };
        let code = fs::read_to_string(&path).unwrap();
        for (name, line) in root_refs(&code, depth) {
            let target = if rank.contains_key(name.as_str()) {
                name.clone()
            } else if let Some(m) = reexports.get(&name) {
                m.clone()
            } else if name == "self" {
                continue;
            } else {
                problems.push(format!(
                    "{shown}:{line}: module {module} refers to crate::{name}, which is neither \
                     a module nor re-exported by src/lib.rs"
                ));
                continue;
            };
            let theirs = rank[target.as_str()];
            if theirs <= mine {
                continue;
            }
            problems.push(format!(
                "{shown}:{line}: module {module} imports {target}, which comes after it"
            ));
        }
    }
    problems
}

#[test]
fn every_import_points_down_the_order() {
    let problems = check(&crate_dir());
    assert!(
        problems.is_empty(),
        "{} layer violation(s) (the order is the `mod` lines of src/lib.rs, lowest first):\n{}",
        problems.len(),
        problems.join("\n")
    );
}

#[test]
fn the_documented_order_is_the_declared_order() {
    let lib = fs::read_to_string(crate_dir().join("src/lib.rs")).unwrap();
    let declared = declared_order(&lib);
    assert!(declared.len() > 10, "mod lines found: {declared:?}");
    assert_eq!(
        documented_order(&lib),
        declared,
        "the `# Layers` list in src/lib.rs's docs must name the `mod` lines, in their order"
    );
}

// The scanner itself.

fn refs(code: &str, depth: usize) -> Vec<String> {
    root_refs(code, depth).into_iter().map(|(n, _)| n).collect()
}

#[test]
fn scanner_sees_paths_and_multi_line_groups() {
    let code = "use crate::bus::Bus;\n\
                use crate::{\n    history::{Offset, Replay},\n    rooms,\n    UserId,\n};\n\
                fn f() { let _ = crate::backplane::wire::user_channel(\"p\", \"u\"); }\n";
    assert_eq!(
        refs(code, 1),
        ["bus", "history", "rooms", "UserId", "backplane"]
    );
    let lines: Vec<usize> = root_refs(code, 1).into_iter().map(|(_, l)| l).collect();
    assert_eq!(lines, [1, 3, 4, 5, 7]);
}

#[test]
fn scanner_ignores_comments_strings_and_macros() {
    let code = "// use crate::runtime::Shared;\n\
                //! see crate::runtime\n\
                /// [`crate::runtime::Server`]\n\
                /* use crate::{runtime, bus};\n /* nested */ crate::core_loop */\n\
                const S: &str = \"crate::runtime\";\n\
                const R: &str = r#\"use crate::{runtime}\"#;\n\
                const Q: char = '\"'; const E: &[u8] = b\"crate::runtime\";\n\
                fn f<'a>(x: &'a str) -> &'a str { x }\n\
                macro_rules! m { () => { $crate::runtime::Shared } }\n\
                pub(crate) fn g() {}\n";
    assert_eq!(refs(code, 1), Vec::<String>::new());
}

#[test]
fn scanner_resolves_super_by_depth() {
    // In src/x.rs: `super::` is the crate root; inside `mod tests { }` it is x again.
    let code = "use super::bus;\nmod tests {\n    use super::*;\n    use super::super::rooms;\n}\n";
    assert_eq!(refs(code, 1), ["bus", "rooms"]);
    // In src/backplane/subscriber.rs: `super::` is backplane.
    assert_eq!(
        refs(
            "use super::{Backoff, Job};\nuse super::super::bus::Bus;\n",
            2
        ),
        ["bus"]
    );
}

#[test]
fn an_upward_import_is_reported_and_a_commented_one_is_not() {
    let dir = std::env::temp_dir().join(format!("layers-test-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.join("src/low")).unwrap();
    let write = |p: &str, s: &str| fs::write(dir.join(p), s).unwrap();
    write(
        "src/lib.rs",
        "//! x\n//!\n//! # Layers\n//!\n//! 1. [`low`]: a\n//! 2. [`high`]: b\n\n\
         pub mod low;\npub mod high;\npub use high::Thing;\n",
    );
    write(
        "src/high.rs",
        "//! h\nuse crate::low::A;\npub struct Thing;\n",
    );
    write(
        "src/low/mod.rs",
        "//! l\n// use crate::high;\npub struct A;\n",
    );
    write(
        "src/low/deep.rs",
        "use crate::{\n    low::A,\n    high::Thing,\n};\nfn f() -> crate::Thing { todo!() }\n",
    );
    write("src/main.rs", "use crate::high;\n");
    assert_eq!(
        check(&dir),
        [
            "src/low/deep.rs:3: module low imports high, which comes after it",
            "src/low/deep.rs:5: module low imports high, which comes after it",
        ]
    );
    write("src/extra.rs", "//! e\n");
    assert!(check(&dir)[0].starts_with("src/extra: module extra is not in the order"));
    let _ = fs::remove_dir_all(&dir);
}
