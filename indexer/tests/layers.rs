//! The indexer's modules import only from their own layer or the layers below, so data
//! flows one way (source -> parse -> filter -> apply -> serve). A module added without a
//! layer, or an import that points up, fails here with the file and line.

#![allow(clippy::unwrap_used)]

use std::path::Path;

/// Layers from the pure core (0) up to the entry (5).
const LAYERS: &[(&str, &[&str])] = &[
    (
        "pure core",
        &[
            "types",
            "chain",
            "descriptors",
            "script_filter",
            "block_check",
            "sha256d",
            "buffers",
        ],
    ),
    (
        "edges",
        &[
            "store",
            "blkfile",
            "zmq_feed",
            "metrics",
            "config",
            "serve_priority",
        ],
    ),
    ("block path", &["pipeline", "wallets", "fetch"]),
    (
        "driving",
        &["follow", "rescan", "add_watch", "backfill", "mempool"],
    ),
    (
        "serving",
        &["grpc", "convert", "query", "event_feed", "kafka"],
    ),
    ("entry", &["app"]),
];

fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().position(|(_, mods)| mods.contains(&module))
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn no_module_imports_from_a_higher_layer() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut wrong = Vec::new();
    for file in &files {
        let rel = file.strip_prefix(&src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_str()
            .unwrap();
        let module = first.trim_end_matches(".rs");
        if module == "lib" || module == "bin" {
            continue; // the crate root and the binary sit above every layer
        }
        let Some(own) = layer(module) else {
            wrong.push(format!(
                "{}: module `{module}` has no layer in LAYERS",
                rel.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(file).unwrap();
        for (n, line) in text.lines().enumerate() {
            if line.trim_start().starts_with("//") {
                continue;
            }
            for (i, _) in line.match_indices("crate::") {
                let rest = &line[i + "crate::".len()..];
                let dep: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                    .collect();
                match layer(&dep) {
                    Some(l) if l > own => wrong.push(format!(
                        "{}:{}: `{module}` ({}) imports `{dep}` ({})",
                        rel.display(),
                        n + 1,
                        LAYERS[own].0,
                        LAYERS[l].0
                    )),
                    Some(_) => {}
                    None if dep.is_empty() => {}
                    None => wrong.push(format!(
                        "{}:{}: `{dep}` has no layer in LAYERS",
                        rel.display(),
                        n + 1
                    )),
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the layers:\n{}",
        wrong.join("\n")
    );
}
