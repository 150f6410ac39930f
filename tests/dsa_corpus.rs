//! Must be true #2: every broken policy in tests/dsa-corpus gives its specific error at the
//! right line and column. Each file starts with `# expect: LINE:COL: message fragment`.

use std::path::PathBuf;

use pacs_broker::dsa;

fn corpus() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/dsa-corpus");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    v.sort();
    v
}

fn expectation(text: &str) -> (usize, usize, String) {
    let first = text.lines().next().unwrap();
    let rest = first
        .strip_prefix("# expect: ")
        .expect("first line is `# expect: L:C: fragment`");
    let mut parts = rest.splitn(3, ':');
    let line = parts.next().unwrap().trim().parse().unwrap();
    let col = parts.next().unwrap().trim().parse().unwrap();
    (line, col, parts.next().unwrap().trim().to_string())
}

#[test]
fn corpus_has_at_least_twenty_broken_policies() {
    assert!(corpus().len() >= 20, "only {} corpus files", corpus().len());
}

#[test]
fn every_broken_policy_gives_its_error_at_its_position() {
    let mut failures = Vec::new();
    for path in corpus() {
        let text = std::fs::read_to_string(&path).unwrap();
        let (line, col, fragment) = expectation(&text);
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let report = dsa::check(&name, &text, time::macros::date!(2026 - 06 - 01));
        assert!(report.agreement.is_none(), "{name}: parsed although broken");
        assert!(
            dsa::Agreement::parse(&name, &text).is_err(),
            "{name}: Agreement::parse accepted it"
        );
        let hit = report
            .errors
            .iter()
            .any(|e| e.line == line && e.col == col && e.message.contains(&fragment));
        if !hit {
            let got: Vec<String> = report
                .errors
                .iter()
                .map(|e| format!("{}:{}: {}", e.line, e.col, e.message))
                .collect();
            failures.push(format!(
                "{name}: expected {line}:{col}: {fragment}\n  got: {}",
                got.join("\n       ")
            ));
        }
        for e in &report.errors {
            assert!(e.snippet.contains('^'), "{name}: no caret snippet");
            assert_eq!(e.file, name);
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn the_snippet_shows_the_offending_line_with_a_caret_under_the_column() {
    let text = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/dsa-corpus/unknown-purpose.toml"),
    )
    .unwrap();
    let err = dsa::Agreement::parse("p.toml", &text).unwrap_err();
    let shown = err.to_string();
    assert!(
        shown.starts_with("p.toml:28:26: unknown purpose \"marketing\""),
        "{shown}"
    );
    let lines: Vec<&str> = shown.lines().collect();
    assert_eq!(lines[1], "  28 | purposes = [\"treatment\", \"marketing\"]");
    assert_eq!(lines[2].find('^'), Some("  28 | ".len() + 25));
}

#[test]
fn all_errors_are_reported_not_only_the_first() {
    let text = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/dsa-corpus/unknown-purpose.toml"),
    )
    .unwrap()
    .replace("modalities = [\"CT\"]", "modalities = [\"CTT\"]")
    .replace("status = \"active\"", "status = \"on\"");
    let report = dsa::check("p.toml", &text, time::macros::date!(2026 - 06 - 01));
    let lines: Vec<usize> = report.errors.iter().map(|e| e.line).collect();
    assert_eq!(lines, vec![7, 28, 31], "{:?}", report.errors);
}
