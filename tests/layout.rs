//! The one rule of the source tree: the data plane never imports the
//! control plane. The control plane builds routing snapshots and hands them
//! to the data plane; if a data-plane file reached back (for a type, a
//! helper, a doc link), the request path would depend on the admin API,
//! state and store, and the architecture in `src/lib.rs` would be a lie.

use std::fs;
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).expect("read_dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Lines of `src` that name the control plane in code or doc links
/// (plain `//` comments are free to talk about it).
fn offending_lines(src: &str) -> Vec<(usize, String)> {
    src.lines()
        .enumerate()
        .filter(|(_, l)| {
            let code = l.trim_start();
            !(code.starts_with("//") && !code.starts_with("///") && !code.starts_with("//!"))
        })
        .filter(|(_, l)| {
            l.contains("control_plane::")
                || l.contains("crate::control_plane")
                || l.contains("super::super::control_plane")
        })
        .map(|(i, l)| (i + 1, l.trim().to_string()))
        .collect()
}

#[test]
fn data_plane_never_imports_control_plane() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/data_plane");
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    assert!(files.len() > 5, "src/data_plane/ has its files");
    let mut found = Vec::new();
    for f in files {
        let text = fs::read_to_string(&f).expect("read");
        for (line, l) in offending_lines(&text) {
            found.push(format!("{}:{line}: {l}", f.display()));
        }
    }
    assert!(
        found.is_empty(),
        "the data plane must not import the control plane:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_check_sees_an_import() {
    assert_eq!(
        offending_lines("use crate::control_plane::state::Command;\n").len(),
        1
    );
    assert_eq!(
        offending_lines("/// See [`crate::control_plane::control`].\n").len(),
        1
    );
    assert!(offending_lines("// the control_plane:: side publishes this\n").is_empty());
}
