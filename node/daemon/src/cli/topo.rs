//! `mycel topology ...`: topology files for routers, through the running daemon.
//!
//! Rejections by the quorum map to exit codes by their marker
//! (`mycel_consensus::topology::Refusal`): 10 stale base, 11 unauthorised, 12 schema
//! invalid, 13 unsigned or bad signature, 4 invalid (`docs/cli.md`).

use std::path::PathBuf;

use clap::Subcommand;
use serde_json::json;

use super::{
    Command, Ctx, EXIT_FAILURE, EXIT_INVALID, EXIT_NO_DAEMON, EXIT_NOT_FOUND, Failure, api_json,
    daemon_args, fetch_through, runtime, through_daemon,
};
use crate::api;

#[derive(Debug, Subcommand)]
pub(super) enum TopologyCommand {
    /// Stage FILE (JSON, YAML or TOML) as the next version of NAME: adds it, signs the
    /// proposal with this node's key and asks the quorum. Exit codes: 10 stale base, 11
    /// unauthorised, 12 schema invalid, 13 bad signature, 4 invalid.
    Propose {
        /// Topology name (NAME or NAMESPACE/NAME).
        name: String,
        /// The file.
        file: PathBuf,
        /// The version this one is based on [default: the latest this node knows].
        #[arg(long)]
        base: Option<u64>,
        /// Stage it as the next version even if the base is stale.
        #[arg(long)]
        force: bool,
    },
    /// Print a version (default: the active one, else the latest).
    Show {
        /// Topology name.
        name: String,
        /// Which version.
        #[arg(long)]
        version: Option<u64>,
        /// The source bytes as proposed, comments included (fetched through the mesh when
        /// this node lacks them; the proposer's node holds them).
        #[arg(long)]
        source: bool,
        /// Render in this format (json, yaml, toml) [default: canonical JSON].
        #[arg(long)]
        format: Option<String>,
    },
    /// Versions with CID, proposer, time, state, and routers holding and applying each.
    History {
        /// Topology name.
        name: String,
    },
    /// Added, removed and changed paths from version A to version B.
    Diff {
        /// Topology name.
        name: String,
        /// The first version.
        a: u64,
        /// The second version.
        b: u64,
    },
    /// Make a version active (an earlier one: roll back). Needs admin on the namespace.
    Activate {
        /// Topology name.
        name: String,
        /// The version.
        #[arg(long)]
        version: u64,
    },
    /// The JSON Schema that new versions must satisfy.
    Schema {
        #[command(subcommand)]
        command: SchemaCommand,
    },
    /// Canary routers: a new version goes to them first and is rolled back if more than
    /// --fail-pct-max percent of their hooks fail. No --subject: no canary.
    Canary {
        /// Topology name.
        name: String,
        /// tag:T, zone:Z or member:PEER (repeatable).
        #[arg(long)]
        subject: Vec<String>,
        /// Roll back above this percentage of failed canary hooks.
        #[arg(long, default_value = "0")]
        fail_pct_max: u32,
    },
    /// The activation share: a staged version becomes active once this share of the live
    /// subscribed routers hold it (1, 0.8, 75%). Without NAME: the cluster default.
    Policy {
        /// Topology name.
        name: Option<String>,
        /// The share.
        #[arg(long)]
        share: String,
    },
    /// Each subscribed router's applied version, hook result and drift (complete on a
    /// manager, which hears every router's reports).
    Status {
        /// Topology name.
        name: String,
    },
    /// Subscribe this node to NAME and write every activation to --out (then run --exec),
    /// until Ctrl-C, which removes the watch; with --detach the watch stays (it survives
    /// restarts) until `mycel topology unwatch NAME`.
    Watch {
        /// Topology name.
        name: String,
        /// The file to write.
        #[arg(long)]
        out: PathBuf,
        /// json, yaml or toml [default: from the extension of --out, else json].
        #[arg(long)]
        format: Option<String>,
        /// Hook run with `sh -c` after each write; a failure restores the previous file.
        #[arg(long)]
        exec: Option<String>,
        /// Hook timeout.
        #[arg(long, default_value = "30000")]
        hook_timeout_ms: u64,
        /// Register the watch and return.
        #[arg(long)]
        detach: bool,
    },
    /// Stop a watch added with `watch`.
    Unwatch {
        /// Topology name.
        name: String,
    },
    /// Every topology name, and this node's watches.
    Ls,
}

#[derive(Debug, Subcommand)]
pub(super) enum SchemaCommand {
    /// Set the schema of NAME from FILE (an empty file removes it).
    Set {
        /// Topology name.
        name: String,
        /// The JSON Schema.
        file: PathBuf,
    },
    /// Print the schema of NAME.
    Show {
        /// Topology name.
        name: String,
    },
}

/// A quorum rejection (`rejected: REASON`) with its documented exit code.
fn refused(f: Failure) -> Failure {
    let reason = f.message.strip_prefix("rejected: ").unwrap_or(&f.message).to_owned();
    match mycel_consensus::topology::Refusal::of(&reason) {
        Some(r) if f.code == EXIT_FAILURE => {
            Failure::new(u8::try_from(r.exit_code()).unwrap_or(EXIT_FAILURE), reason)
        }
        _ => f,
    }
}

fn check_name(name: &str) -> Result<(), Failure> {
    mycel_consensus::topology::validate_name(name).map_err(|e| Failure::new(EXIT_INVALID, e))
}

/// Runs a store command inside the daemon and returns what it printed.
fn in_daemon(ctx: &Ctx, args: Vec<String>) -> Result<Vec<u8>, Failure> {
    let socket = ctx.dir.socket_path();
    runtime()?.block_on(async {
        let mut client = api::client::Client::connect(&socket).await.ok_or_else(|| {
            Failure::new(EXIT_NO_DAEMON, "no daemon is running (start one with `mycel run`)")
        })?;
        let (code, error, body) = super::cli_call(&mut client, args).await?;
        if code == 0 { Ok(body) } else { Err(Failure::new(code, error)) }
    })
}

/// Makes sure the daemon holds `cid`, fetching it through the mesh.
fn ensure_local(ctx: &Ctx, cid: &str) -> Result<(), Failure> {
    let socket = ctx.dir.socket_path();
    runtime()?.block_on(async {
        let mut client = api::client::Client::connect(&socket).await.ok_or_else(|| {
            Failure::new(EXIT_NO_DAEMON, "no daemon is running (start one with `mycel run`)")
        })?;
        fetch_through(ctx, &mut client, cid, 60, None).await.map(|_| ())
    })
}

fn view(ctx: &Ctx, name: &str) -> Result<serde_json::Value, Failure> {
    check_name(name)?;
    api_json(ctx, "GET", &format!("/v1/topology/view?name={name}"), None)
}

/// The entry of `version` in a view.
fn version_entry(
    v: &serde_json::Value,
    name: &str,
    version: u64,
) -> Result<serde_json::Value, Failure> {
    v["versions"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["version"].as_u64() == Some(version)))
        .cloned()
        .ok_or_else(|| {
            Failure::new(
                EXIT_NOT_FOUND,
                format!("{name} has no version {version} (latest {})", v["latest"]),
            )
        })
}

/// `YYYY-MM-DDTHH:MM:SSZ` of ms since the epoch.
fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

pub(super) fn run(ctx: &Ctx, command: TopologyCommand) -> Result<(), Failure> {
    match command {
        TopologyCommand::Propose { name, file, base, force } => {
            propose(ctx, &name, &file, base, force)
        }
        TopologyCommand::Show { name, version, source, format } => {
            show(ctx, &name, version, source, format)
        }
        TopologyCommand::History { name } => history(ctx, &name),
        TopologyCommand::Diff { name, a, b } => diff(ctx, &name, a, b),
        TopologyCommand::Activate { name, version } => {
            check_name(&name)?;
            let v = api_json(
                ctx,
                "POST",
                "/v1/topology/activate",
                Some(json!({"name": name, "version": version})),
            )
            .map_err(refused)?;
            ctx.print(v.clone(), || {
                format!("{name} version {version} is active (index {})", v["index"])
            });
            Ok(())
        }
        TopologyCommand::Schema { command: SchemaCommand::Set { name, file } } => {
            check_name(&name)?;
            let text = std::fs::read_to_string(&file)
                .map_err(|e| Failure::new(EXIT_INVALID, format!("{}: {e}", file.display())))?;
            let v = api_json(
                ctx,
                "POST",
                "/v1/topology/schema",
                Some(json!({"name": name, "schema": text})),
            )
            .map_err(refused)?;
            ctx.print(v.clone(), || {
                if text.trim().is_empty() {
                    format!("{name}: schema removed")
                } else {
                    format!("{name}: schema set (index {})", v["index"])
                }
            });
            Ok(())
        }
        TopologyCommand::Schema { command: SchemaCommand::Show { name } } => {
            let v = view(ctx, &name)?;
            let schema = v["schema"].as_str().unwrap_or_default().to_owned();
            ctx.print(json!({"name": name, "schema": schema}), || {
                if schema.is_empty() { format!("{name} has no schema") } else { schema.clone() }
            });
            Ok(())
        }
        TopologyCommand::Canary { name, subject, fail_pct_max } => {
            check_name(&name)?;
            let v = api_json(
                ctx,
                "POST",
                "/v1/topology/canary",
                Some(json!({"name": name, "subjects": subject, "fail_pct_max": fail_pct_max})),
            )
            .map_err(refused)?;
            ctx.print(v, || {
                if subject.is_empty() {
                    format!("{name}: no canary")
                } else {
                    format!(
                        "{name}: canary {} (roll back above {fail_pct_max}% failed hooks)",
                        subject.join(", ")
                    )
                }
            });
            Ok(())
        }
        TopologyCommand::Policy { name, share } => {
            if let Some(n) = &name {
                check_name(n)?;
            }
            mycel_policy::topology::Share::parse(&share)
                .map_err(|e| Failure::new(EXIT_INVALID, e))?;
            let v = api_json(
                ctx,
                "POST",
                "/v1/topology/policy",
                Some(json!({"name": name, "share": share})),
            )
            .map_err(refused)?;
            ctx.print(v.clone(), || format!("{} = {share}", v["key"].as_str().unwrap_or_default()));
            Ok(())
        }
        TopologyCommand::Status { name } => status(ctx, &name),
        TopologyCommand::Watch { name, out, format, exec, hook_timeout_ms, detach } => {
            watch(ctx, &name, out, format, exec, hook_timeout_ms, detach)
        }
        TopologyCommand::Unwatch { name } => {
            check_name(&name)?;
            let v = api_json(ctx, "POST", "/v1/topology/unwatch", Some(json!({"name": name})))?;
            ctx.print(v, || format!("{name}: no longer watched"));
            Ok(())
        }
        TopologyCommand::Ls => {
            let v = api_json(ctx, "GET", "/v1/topology", None)?;
            ctx.print(v.clone(), || {
                let mut s = String::new();
                for t in v["topologies"].as_array().into_iter().flatten() {
                    s += &format!(
                        "{:<32} latest {:<4} active {}\n",
                        t["name"].as_str().unwrap_or_default(),
                        t["latest"].to_string(),
                        t["active"]
                    );
                }
                for w in v["watches"].as_array().into_iter().flatten() {
                    s += &format!(
                        "watching {} -> {} ({})\n",
                        w["name"].as_str().unwrap_or_default(),
                        w["out"].as_str().unwrap_or_default(),
                        w["format"].as_str().unwrap_or_default()
                    );
                }
                s.trim_end().to_owned()
            });
            Ok(())
        }
    }
}

fn propose(
    ctx: &Ctx,
    name: &str,
    file: &std::path::Path,
    base: Option<u64>,
    force: bool,
) -> Result<(), Failure> {
    check_name(name)?;
    let abs = std::path::absolute(file)
        .map_err(|e| Failure::new(EXIT_INVALID, format!("{}: {e}", file.display())))?;
    if !abs.is_file() {
        return Err(Failure::new(EXIT_INVALID, format!("{}: not a readable file", file.display())));
    }
    let path = abs.to_string_lossy().into_owned();
    let added = in_daemon(
        ctx,
        vec!["--json".into(), "add".into(), path, "--kind".into(), "topology".into()],
    )?;
    let added: serde_json::Value = serde_json::from_slice(&added)
        .map_err(|e| Failure::new(EXIT_FAILURE, format!("add printed no JSON: {e}")))?;
    let (Some(root), Some(source)) = (added["root"].as_str(), added["source_root"].as_str()) else {
        return Err(Failure::new(EXIT_FAILURE, "add reported no topology roots"));
    };
    let v = api_json(
        ctx,
        "POST",
        "/v1/topology/propose",
        Some(json!({"name": name, "root": root, "source": source, "base": base, "force": force})),
    )
    .map_err(refused)?;
    ctx.print(v.clone(), || {
        format!("{name} version {} staged on base {}: {root}", v["version"], v["base"])
    });
    Ok(())
}

fn show(
    ctx: &Ctx,
    name: &str,
    version: Option<u64>,
    source: bool,
    format: Option<String>,
) -> Result<(), Failure> {
    if source && format.is_some() {
        return Err(Failure::new(
            EXIT_INVALID,
            "--source prints the bytes as proposed: no --format",
        ));
    }
    let v = view(ctx, name)?;
    let number = version
        .or_else(|| v["active"].as_u64())
        .or_else(|| v["latest"].as_u64().filter(|l| *l > 0))
        .ok_or_else(|| Failure::new(EXIT_NOT_FOUND, format!("{name} has no versions")))?;
    let entry = version_entry(&v, name, number)?;
    // The source bytes are an object of their own (a file), named by the committed version:
    // fetched through the mesh from a node that holds them (the proposer's) when missing.
    let key = if source { "source_cid" } else { "cid" };
    let cid = entry[key].as_str().unwrap_or_default().to_owned();
    ensure_local(ctx, &cid)?;
    let mut args = vec!["get".to_owned(), cid.clone(), "-".to_owned()];
    if let Some(f) = &format {
        args.extend(["--format".to_owned(), f.clone()]);
    }
    let bytes = in_daemon(ctx, args)?;
    if ctx.json {
        let mut e = entry;
        e["name"] = json!(name);
        e["content"] = json!(String::from_utf8_lossy(&bytes));
        ctx.print(e, String::new);
    } else {
        use std::io::Write;
        let mut out = ctx.stdout();
        out.write_all(&bytes)
            .and_then(|()| out.flush())
            .map_err(|e| Failure::new(EXIT_FAILURE, format!("stdout: {e}")))?;
    }
    Ok(())
}

fn history(ctx: &Ctx, name: &str) -> Result<(), Failure> {
    let v = view(ctx, name)?;
    ctx.print(v.clone(), || {
        let mut s = format!(
            "{name}: active {}, {} subscribed router(s), activation share {}‰\n",
            v["active"], v["subscribed"], v["share_permille"]
        );
        s += &format!(
            "{:>4}  {:<10} {:<20} {:<10} {:>7} {:>7}  {}\n",
            "ver", "state", "proposed", "proposer", "holding", "applied", "cid"
        );
        for x in v["versions"].as_array().into_iter().flatten() {
            let proposer = x["proposer"].as_str().unwrap_or_default();
            let short = &proposer[proposer.len().saturating_sub(8)..];
            s += &format!(
                "{:>4}  {:<10} {:<20} {:<10} {:>7} {:>7}  {}\n",
                // JSON values ignore width and alignment: format them as strings.
                x["version"].to_string(),
                x["state"].as_str().unwrap_or_default(),
                rfc3339(x["proposed_ms"].as_u64().unwrap_or(0)),
                format!("…{short}"),
                x["holding"].to_string(),
                x["applied"].to_string(),
                x["cid"].as_str().unwrap_or_default()
            );
        }
        s.trim_end().to_owned()
    });
    Ok(())
}

fn diff(ctx: &Ctx, name: &str, a: u64, b: u64) -> Result<(), Failure> {
    let v = view(ctx, name)?;
    let ca = version_entry(&v, name, a)?["cid"].as_str().unwrap_or_default().to_owned();
    let cb = version_entry(&v, name, b)?["cid"].as_str().unwrap_or_default().to_owned();
    ensure_local(ctx, &ca)?;
    ensure_local(ctx, &cb)?;
    let command = Command::Diff { a: ca, b: cb };
    let args = daemon_args(&command, ctx.json)?
        .ok_or_else(|| Failure::new(EXIT_FAILURE, "diff is a store command"))?;
    match through_daemon(ctx, &command, args)? {
        Some((result, _)) => result,
        None => {
            Err(Failure::new(EXIT_NO_DAEMON, "no daemon is running (start one with `mycel run`)"))
        }
    }
}

fn status(ctx: &Ctx, name: &str) -> Result<(), Failure> {
    check_name(name)?;
    let v = api_json(ctx, "GET", &format!("/v1/topology/status?name={name}"), None)?;
    ctx.print(v.clone(), || {
        let mut s = format!("{name}: active {}", v["active"]);
        if let Some(c) = v["canary_phase"].as_u64() {
            s += &format!(", version {c} in its canary phase");
        }
        if v["manager"] != true {
            s += " (not a manager: only this node's own result is known here)";
        }
        s.push('\n');
        for r in v["routers"].as_array().into_iter().flatten() {
            let opt = |k: &str| match &r[k] {
                serde_json::Value::Null => "-".to_owned(),
                serde_json::Value::String(t) => t.clone(),
                other => other.to_string(),
            };
            s += &format!(
                "  {:<52} {:<8} {:<5} target {:<4} applied {:<4} {:<12} {}{}\n",
                opt("peer_id"),
                opt("zone"),
                if r["live"] == true { "live" } else { "lost" },
                opt("target_version"),
                opt("applied_version"),
                opt("status"),
                opt("drift"),
                r["error"].as_str().map(|e| format!("  ({e})")).unwrap_or_default()
            );
        }
        s.trim_end().to_owned()
    });
    Ok(())
}

fn watch(
    ctx: &Ctx,
    name: &str,
    out: PathBuf,
    format: Option<String>,
    exec: Option<String>,
    hook_timeout_ms: u64,
    detach: bool,
) -> Result<(), Failure> {
    check_name(name)?;
    let out = std::path::absolute(&out)
        .map_err(|e| Failure::new(EXIT_INVALID, format!("{}: {e}", out.display())))?;
    let config =
        crate::topology::WatchConfig { name: name.to_owned(), out, format, exec, hook_timeout_ms };
    config.watch().map_err(|e| Failure::new(EXIT_INVALID, e.to_string()))?;
    let body =
        serde_json::to_value(&config).map_err(|e| Failure::new(EXIT_FAILURE, e.to_string()))?;
    let v = api_json(ctx, "POST", "/v1/topology/watch", Some(body)).map_err(|f| {
        Failure::new(if f.code == EXIT_FAILURE { EXIT_INVALID } else { f.code }, f.message)
    })?;
    if detach {
        ctx.print(v, || format!("watching {name} (until `mycel topology unwatch {name}`)"));
        return Ok(());
    }
    if !ctx.json {
        eprintln!("watching {name}; Ctrl-C stops");
    }
    let me =
        api_json(ctx, "GET", "/v1/id", None)?["peer_id"].as_str().unwrap_or_default().to_owned();
    let socket = ctx.dir.socket_path();
    let printed = runtime()?.block_on(async {
        let mut last: Option<(serde_json::Value, serde_json::Value)> = None;
        loop {
            let tick = tokio::time::sleep(std::time::Duration::from_secs(1));
            tokio::select! {
                _ = tokio::signal::ctrl_c() => return Ok::<(), Failure>(()),
                () = tick => {}
            }
            let Some(mut client) = api::client::Client::connect(&socket).await else {
                return Err(Failure::new(EXIT_NO_DAEMON, "the daemon stopped"));
            };
            let Ok(s) = client.json("GET", &format!("/v1/topology/status?name={name}"), None).await
            else {
                continue;
            };
            let mine = s["routers"]
                .as_array()
                .and_then(|a| a.iter().find(|r| r["peer_id"] == me.as_str()))
                .cloned();
            let Some(r) = mine else { continue };
            let key = (r["activation_index"].clone(), r["status"].clone());
            if last.as_ref() != Some(&key) && r["activation_index"].as_u64().is_some_and(|i| i > 0)
            {
                last = Some(key);
                ctx.print(r.clone(), || {
                    format!(
                        "{name}: version {} {} (activation {}){}",
                        r["applied_version"],
                        r["status"].as_str().unwrap_or_default(),
                        r["activation_index"],
                        r["error"].as_str().map(|e| format!(": {e}")).unwrap_or_default()
                    )
                });
            }
        }
    });
    // Stopped: the watch goes (whatever ended the loop).
    let _ = api_json(ctx, "POST", "/v1/topology/unwatch", Some(json!({"name": name})));
    printed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejections_map_to_their_exit_codes() {
        // A quorum rejection becomes the code of its marker; transport failures and other
        // codes are left alone.
        let f = |code: u8, m: &str| refused(Failure::new(code, m)).code;
        assert_eq!(f(EXIT_FAILURE, "rejected: stale base: lab is at version 2, not 1"), 10);
        assert_eq!(f(EXIT_FAILURE, "rejected: unauthorised: x lacks publish"), 11);
        assert_eq!(f(EXIT_FAILURE, "rejected: schema invalid: at /a: bad"), 12);
        assert_eq!(f(EXIT_FAILURE, "rejected: bad signature: no"), 13);
        assert_eq!(f(EXIT_FAILURE, "rejected: unsigned: no"), 13);
        assert_eq!(f(EXIT_FAILURE, "invalid: bad CID"), 4);
        assert_eq!(f(EXIT_FAILURE, "no quorum answered within 30 s"), EXIT_FAILURE);
        assert_eq!(f(EXIT_NO_DAEMON, "rejected: stale base: x"), EXIT_NO_DAEMON);
        let r = refused(Failure::new(EXIT_FAILURE, "rejected: stale base: lab is at 2"));
        assert_eq!(r.message, "stale base: lab is at 2", "the marker leads the message");
    }

    #[test]
    fn times_print_as_rfc3339() {
        // The epoch, a leap day and a time of day.
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_314_645_123), "2026-11-22T02:30:45Z");
    }
}
