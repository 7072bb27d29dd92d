//! `docs/operations.md` documents every flag and variable of `cache-node` and
//! `cache-agent` (the metrics are checked against a running node in `metrics.rs`).

use clap::CommandFactory;

fn doc() -> String {
    std::fs::read_to_string(modelcache_testkit::workspace().join("docs/operations.md")).unwrap()
}

/// The long flags and variables of `command` and its subcommands, as `(flag, env)`.
fn flags(command: &clap::Command) -> Vec<(String, Option<String>)> {
    let mut out: Vec<(String, Option<String>)> = command
        .get_arguments()
        .filter_map(|a| {
            let long = a.get_long()?;
            let env = a.get_env().map(|e| e.to_string_lossy().into_owned());
            Some((long.to_owned(), env))
        })
        .filter(|(long, _)| long != "help" && long != "version")
        .collect();
    for sub in command.get_subcommands() {
        out.extend(flags(sub));
    }
    out
}

#[test]
fn every_node_key_and_variable_is_documented() {
    let doc = doc();
    let node = flags(&cache_node::Config::command());
    assert!(node.len() > 30, "{node:?}");
    for (key, env) in node {
        assert!(
            doc.contains(&format!("| `{key}` |")),
            "docs/operations.md: no row for `{key}`"
        );
        let env = env.unwrap_or_else(|| panic!("--{key} has no variable"));
        assert!(
            doc.contains(&format!("`{env}`")),
            "docs/operations.md: no `{env}`"
        );
    }
}

#[test]
fn every_agent_flag_and_variable_is_documented() {
    let doc = doc();
    for (flag, env) in flags(&cache_agent::cli::Cli::command()) {
        assert!(
            doc.contains(&format!("`--{flag}`")),
            "docs/operations.md: no `--{flag}`"
        );
        if let Some(env) = env {
            assert!(
                doc.contains(&format!("`{env}`")),
                "docs/operations.md: no `{env}`"
            );
        }
    }
}
