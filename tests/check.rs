//! `switchyard check --config FILE` (SPEC §1, §2): every problem of a broken
//! config as `FILE:line: message` with exit 1; a good config exits 0.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[rustfmt::skip] // the shared harness keeps its own layout
mod support;

use std::path::{Path, PathBuf};

use support::*;

const GOOD: &str = r#"[proxy]
listen = "127.0.0.1:0"
connect_timeout = "2s"

[admin]
listen = "127.0.0.1:0"

[state]
path = "STATE"

[[service]]
name = "web"
hosts = ["*"]
path_prefix = "/"

[service.blue]
backends = ["127.0.0.1:9001", "127.0.0.1:9002"]
[service.green]
backends = ["127.0.0.1:9101"]

[service.health]
path = "/healthz"
interval = "2s"
"#;

/// Writes `text` (with STATE pointing into `dir`) as a config file.
fn config_file(dir: &TempDir, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    let text = text.replace("STATE", &dir.join("state.json").display().to_string());
    std::fs::write(&path, text).unwrap();
    path
}

/// 1-based line of the first line of `text` containing `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{needle:?} not in config"))
        + 1
}

/// Runs check; asserts exit 1 and that stderr has `FILE:line: ...` lines
/// containing each of `expected` (line, words).
fn assert_check_fails(path: &Path, expected: &[(usize, &[&str])]) -> String {
    let (code, stdout, stderr) = run_binary(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 1, "stdout: {stdout}\nstderr: {stderr}");
    for (line, words) in expected {
        let prefix = format!("{}:{line}: ", path.display());
        let found = stderr
            .lines()
            .any(|l| l.starts_with(&prefix) && words.iter().all(|w| l.contains(w)));
        assert!(
            found,
            "no line `{prefix}...` mentioning {words:?} in:\n{stderr}"
        );
    }
    stderr
}

#[test]
fn a_good_config_passes() {
    let dir = TempDir::new("check-good");
    let path = config_file(&dir, "good.toml", GOOD);
    let (code, stdout, stderr) = run_binary(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("ok"), "{stdout}");
    // The example shipped in the repository passes too.
    let (code, stdout, stderr) = run_binary(&["check", "--config", "config/switchyard.toml"]);
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
    // So does docker/compose.yaml's: backends named by host (compose
    // service names) are resolved at connect time, not by `check`.
    let (code, stdout, stderr) = run_binary(&["check", "--config", "docker/switchyard.toml"]);
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
    // And docker/compose-fleet.yml's, in fleet mode (checking needs no etcd).
    let (code, stdout, stderr) = run_binary(&["check", "--config", "docker/switchyard-fleet.toml"]);
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
}

#[test]
fn fleet_settings_are_checked() {
    let dir = TempDir::new("check-fleet");
    let state = "path = \"STATE\"\n";
    assert!(GOOD.contains(state));
    for (extra, line_has, message) in [
        (
            "backend = \"etcd\"\n[state.etcd]\nendpoints = [\"https://10.0.0.1:2379\"]\n",
            "endpoints",
            "expected http://host:port",
        ),
        (
            "backend = \"consul\"\n",
            "backend",
            "unknown backend \"consul\"",
        ),
        (
            "[state.etcd]\nprefix = \"/s\"\n",
            "[state.etcd]",
            "[state.etcd] is set but state.backend is not \"etcd\"",
        ),
        (
            "backend = \"etcd\"\n[state.etcd]\nprefix = \"switchyard/\"\n",
            "prefix",
            "must start with `/`",
        ),
        (
            "backend = \"etcd\"\n[state.etcd]\nclusterr = \"a\"\n",
            "clusterr",
            "unknown key `clusterr` in [state.etcd] (did you mean `cluster`?)",
        ),
    ] {
        let text = GOOD.replacen(state, &format!("{state}{extra}"), 1);
        let path = config_file(&dir, "fleet.toml", &text);
        assert_check_fails(&path, &[(line_of(&text, line_has), &[message])]);
    }
}

#[test]
fn unknown_key() {
    let dir = TempDir::new("check-key");
    let text = GOOD.replace(
        "connect_timeout = \"2s\"",
        "connect_timeout = \"2s\"\nconect_timeout = \"3s\"",
    );
    let path = config_file(&dir, "c.toml", &text);
    assert_check_fails(
        &path,
        &[(
            line_of(&text, "conect_timeout"),
            &[
                "unknown key `conect_timeout`",
                "did you mean `connect_timeout`",
            ],
        )],
    );
    // Unknown keys inside a service's sub-table too.
    let text = GOOD.replace("interval = \"2s\"", "interval = \"2s\"\nretries = 3");
    let path = config_file(&dir, "c2.toml", &text);
    assert_check_fails(
        &path,
        &[(
            line_of(&text, "retries"),
            &["unknown key `retries`", "[service.health]"],
        )],
    );
}

#[test]
fn bad_duration() {
    let dir = TempDir::new("check-duration");
    let text = GOOD.replace(
        "connect_timeout = \"2s\"",
        "connect_timeout = \"2 parsecs\"",
    );
    let path = config_file(&dir, "c.toml", &text);
    assert_check_fails(
        &path,
        &[(
            line_of(&text, "parsecs"),
            &["proxy.connect_timeout", "invalid duration", "2 parsecs"],
        )],
    );
    let text = GOOD.replace("interval = \"2s\"", "interval = 2");
    let path = config_file(&dir, "c2.toml", &text);
    assert_check_fails(
        &path,
        &[(
            line_of(&text, "interval = 2"),
            &["health.interval", "duration"],
        )],
    );
}

#[test]
fn duplicate_service_name() {
    let dir = TempDir::new("check-dup");
    let second = "\n[[service]]\nname = \"web\"\npath_prefix = \"/other\"\n[service.blue]\nbackends = [\"127.0.0.1:9003\"]\n[service.green]\nbackends = [\"127.0.0.1:9004\"]\n";
    let text = format!("{GOOD}{second}");
    let first_line = line_of(&text, "name = \"web\"");
    let dup_line = text
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains("name = \"web\""))
        .nth(1)
        .unwrap()
        .0
        + 1;
    let path = config_file(&dir, "c.toml", &text);
    assert_check_fails(
        &path,
        &[(
            dup_line,
            &[
                "duplicate service name \"web\"",
                &format!("line {}", first_line - 1),
            ],
        )],
    );
}

#[test]
fn empty_pool() {
    let dir = TempDir::new("check-empty");
    let text = GOOD.replace("backends = [\"127.0.0.1:9101\"]", "backends = []");
    let path = config_file(&dir, "c.toml", &text);
    assert_check_fails(
        &path,
        &[(
            line_of(&text, "backends = []"),
            &["green.backends", "must not be empty"],
        )],
    );
    // A pool left out entirely.
    let text = GOOD.replace("[service.green]\nbackends = [\"127.0.0.1:9101\"]\n", "");
    let path = config_file(&dir, "c2.toml", &text);
    assert_check_fails(
        &path,
        &[(line_of(&text, "[[service]]"), &["missing [service.green]"])],
    );
}

#[test]
fn bad_address() {
    let dir = TempDir::new("check-addr");
    let text = GOOD.replace(
        "backends = [\"127.0.0.1:9001\", \"127.0.0.1:9002\"]",
        "backends = [\"127.0.0.1:9001\", \"127.0.0.1\"]",
    );
    let path = config_file(&dir, "c.toml", &text);
    assert_check_fails(
        &path,
        &[(
            line_of(&text, "\"127.0.0.1\"]"),
            &["blue.backends[1]", "127.0.0.1", "port"],
        )],
    );
    let text = GOOD.replace("listen = \"127.0.0.1:0\"", "listen = \"everywhere:80\"");
    let path = config_file(&dir, "c2.toml", &text);
    assert_check_fails(
        &path,
        &[(
            line_of(&text, "everywhere"),
            &["proxy.listen", "invalid address", "everywhere:80"],
        )],
    );
}

#[test]
fn every_problem_is_listed_in_file_order() {
    let dir = TempDir::new("check-all");
    let text = GOOD
        .replace("connect_timeout = \"2s\"", "connect_timeout = \"soon\"")
        .replace(
            "path_prefix = \"/\"",
            "path_prefix = \"/\"\ncolour = \"blue\"",
        )
        .replace("\"127.0.0.1:9101\"", "\"127.0.0.1:99999\"");
    let path = config_file(&dir, "c.toml", &text);
    let stderr = assert_check_fails(
        &path,
        &[
            (line_of(&text, "soon"), &["connect_timeout"]),
            (line_of(&text, "colour"), &["unknown key `colour`"]),
            (
                line_of(&text, "99999"),
                &["green.backends[0]", "invalid port"],
            ),
        ],
    );
    let lines: Vec<usize> = stderr
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("{}:", path.display())))
        .map(|rest| rest.split(':').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{stderr}");
    assert!(lines.windows(2).all(|w| w[0] <= w[1]), "{stderr}");
}

#[test]
fn files_the_config_names_are_checked_too() {
    let dir = TempDir::new("check-files");
    let path = config_file(&dir, "c.toml", GOOD);
    // A corrupt state file.
    let state = dir.join("state.json");
    std::fs::write(&state, "not json").unwrap();
    let (code, _, stderr) = run_binary(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains(&state.display().to_string()), "{stderr}");
    std::fs::remove_file(&state).unwrap();
    // A token file that does not exist.
    let text = GOOD.replace(
        "[admin]\nlisten = \"127.0.0.1:0\"",
        "[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"NOFILE\"",
    );
    let missing = dir.join("missing.token");
    let path = config_file(
        &dir,
        "c2.toml",
        &text.replace("NOFILE", &missing.display().to_string()),
    );
    let (code, _, stderr) = run_binary(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains(&missing.display().to_string()), "{stderr}");
    // The config file itself missing.
    let nowhere = dir.join("nowhere.toml");
    let (code, _, stderr) = run_binary(&["check", "--config", nowhere.to_str().unwrap()]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains(&nowhere.display().to_string()), "{stderr}");
}
