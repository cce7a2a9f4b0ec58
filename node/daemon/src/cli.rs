//! The `mycel` command line: parsing, dispatch, human and `--json` output, exit codes.
//!
//! Exit codes (also in `docs/cli.md`):
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | other failure |
//! | 2 | usage error (bad arguments) |
//! | 3 | not found: unknown CID or content missing from the store |
//! | 4 | invalid input: unreadable path, malformed CID, invalid topology file |
//! | 5 | verification failed: corrupt or missing chunks found |
//! | 6 | data directory or store unusable (not initialised, damaged, wrong version) |
//! | 7 | disk full |
//! | 8 | store in use by another process |
//! | 9 | the command needs a running daemon and none runs |
//! | 10 | `topology`: stale base (another version was staged on the same base first) |
//! | 11 | `topology`: unauthorised (no `publish`, or no `admin`, on the namespace) |
//! | 12 | `topology`: the document fails the name's JSON Schema |
//! | 13 | `topology`: unsigned proposal or bad signature |

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use mycel_chunker::{Cid, Config, topology};
use serde_json::json;

use crate::datadir::{self, DataDir, DataDirError, InitOptions};
use crate::ingest::{self, AddError, KindArg};
use crate::objects;
use crate::restore::{self, GetError, GetOptions};
use crate::store::{Store, StoreError};
use crate::{api, daemon, net};

mod topo;

/// A command's failure: an exit code and a one-line message.
#[derive(Debug)]
pub struct Failure {
    code: u8,
    message: String,
    /// The command already printed its JSON report; print no second object.
    reported: bool,
}

impl Failure {
    fn new(code: u8, message: impl Into<String>) -> Failure {
        Failure { code, message: message.into(), reported: false }
    }
}

/// Exit code: other failure.
pub const EXIT_FAILURE: u8 = 1;
/// Exit code: not found.
pub const EXIT_NOT_FOUND: u8 = 3;
/// Exit code: invalid input.
pub const EXIT_INVALID: u8 = 4;
/// Exit code: verification failed.
pub const EXIT_VERIFY: u8 = 5;
/// Exit code: data directory or store unusable.
pub const EXIT_STORE: u8 = 6;
/// Exit code: disk full.
pub const EXIT_DISK_FULL: u8 = 7;
/// Exit code: store locked.
pub const EXIT_LOCKED: u8 = 8;
/// Exit code: the command needs a running daemon and none runs.
pub const EXIT_NO_DAEMON: u8 = 9;

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Failure {
        let code = match &e {
            _ if e.is_disk_full() => EXIT_DISK_FULL,
            StoreError::Locked(_) => EXIT_LOCKED,
            StoreError::Corrupt { .. } => EXIT_VERIFY,
            StoreError::Metadata(_) | StoreError::Index(_) => EXIT_STORE,
            _ => EXIT_FAILURE,
        };
        Failure::new(code, e.to_string())
    }
}

impl From<DataDirError> for Failure {
    fn from(e: DataDirError) -> Failure {
        Failure::new(EXIT_STORE, e.to_string())
    }
}

impl From<AddError> for Failure {
    fn from(e: AddError) -> Failure {
        match e {
            AddError::Store(s) => s.into(),
            AddError::Input { ref source, .. }
                if source.kind() == std::io::ErrorKind::StorageFull =>
            {
                Failure::new(EXIT_DISK_FULL, e.to_string())
            }
            other => Failure::new(EXIT_INVALID, other.to_string()),
        }
    }
}

impl From<GetError> for Failure {
    fn from(e: GetError) -> Failure {
        let code = match &e {
            GetError::Missing(_) => EXIT_NOT_FOUND,
            GetError::Corrupt(_) => EXIT_VERIFY,
            GetError::Invalid(_) => EXIT_INVALID,
            GetError::Output { source, .. } if source.kind() == std::io::ErrorKind::StorageFull => {
                EXIT_DISK_FULL
            }
            GetError::Output { .. } => EXIT_FAILURE,
            GetError::Store(s) => {
                return Failure::from(StoreError::Index(s.to_string())).with_store(s);
            }
        };
        Failure::new(code, e.to_string())
    }
}

impl Failure {
    fn with_store(self, e: &StoreError) -> Failure {
        let code = match e {
            _ if e.is_disk_full() => EXIT_DISK_FULL,
            StoreError::Locked(_) => EXIT_LOCKED,
            StoreError::Corrupt { .. } => EXIT_VERIFY,
            StoreError::Io(_) => EXIT_FAILURE,
            _ => EXIT_STORE,
        };
        Failure::new(code, e.to_string())
    }
}

/// mycel: a peer-to-peer, content-addressed sync mesh.
#[derive(Debug, Parser)]
#[command(name = "mycel", version, about, max_term_width = 100)]
pub struct Cli {
    /// The node's data directory [default: $XDG_DATA_HOME/mycel or ~/.local/share/mycel].
    #[arg(long, global = true, env = "MYCEL_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Machine-readable output on stdout.
    #[arg(long, global = true)]
    json: bool,
    /// No progress bars.
    #[arg(long, short, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a node: data directory, identity key (0600) and a commented config.
    Init {
        /// QUIC multiaddr to listen on (repeatable) [default: /ip4/0.0.0.0/udp/0/quic-v1].
        #[arg(long)]
        listen: Vec<String>,
        /// Multiaddr of a peer to dial, ending in /p2p/PEER_ID (repeatable).
        #[arg(long)]
        bootstrap: Vec<String>,
        /// This node's zone.
        #[arg(long)]
        zone: Option<String>,
        /// PeerId allowed to connect (repeatable; edit [cluster] members later and send SIGHUP
        /// or run `mycel config reload`).
        #[arg(long)]
        member: Vec<String>,
        /// Join a cluster with a token from `mycel cluster token create` (`mycel run` then
        /// presents it to the managers).
        #[arg(long)]
        join: Option<String>,
    },
    /// Run the daemon: join the mesh, serve and fetch content, serve the admin API.
    Run {
        /// Test only: serve corrupt chunks (to test that peers detect them).
        #[arg(long, hide = true)]
        test_corrupt_serve: bool,
    },
    /// This node's PeerId, and its bound addresses when the daemon runs.
    Id,
    /// The daemon's status: peers, fetches, roots.
    Status,
    /// Connected peers.
    Peers,
    /// Add a file, directory, disk image, topology file, or stdin (`-`); prints the root CID.
    Add {
        /// What to add.
        path: PathBuf,
        /// What to treat it as.
        #[arg(long, value_enum, default_value = "auto")]
        kind: KindArg,
        /// Pin it too (through the running daemon), with the pin options below.
        #[arg(long)]
        pin: bool,
        #[command(flatten)]
        pin_args: PinArgs,
    },
    /// Pins: content the cluster keeps, with replicas, placement and pre-positioning.
    Pin {
        #[command(subcommand)]
        command: PinCommand,
    },
    /// Grants: who may read, publish or administer a namespace.
    Grant {
        #[command(subcommand)]
        command: GrantCommand,
    },
    /// Write an object to OUT (`-` for stdout): atomically, sparse for disk images.
    Get {
        /// The root CID.
        cid: String,
        /// Where to write it.
        out: PathBuf,
        /// Update an existing file or image, writing only what differs.
        #[arg(long)]
        in_place: bool,
        /// Topology files: render in this format (json, yaml, toml).
        #[arg(long)]
        format: Option<String>,
        /// Topology files: the source bytes as they were added, comments included.
        #[arg(long)]
        source: bool,
        /// Through a daemon: give up after this many seconds without progress.
        #[arg(long, default_value = "60")]
        timeout: u64,
    },
    /// List the objects in the store.
    Ls,
    /// Show an object's kind, chunker identity and tree shape.
    Inspect {
        /// The CID.
        cid: String,
    },
    /// Raw blocks.
    Block {
        #[command(subcommand)]
        command: BlockCommand,
    },
    /// Compare two objects: changed byte ranges, or changed paths for directories and
    /// topology files.
    Diff {
        /// The first object.
        a: String,
        /// The second object.
        b: String,
    },
    /// Check every block (or one object's blocks) against its CID.
    Verify {
        /// Only this object.
        cid: Option<String>,
    },
    /// Remove blocks no object reaches and compact mostly-empty packs.
    Gc,
    /// The management quorum: init, tokens, members, leadership.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Configuration files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Remove an object from the list of roots (its blocks go at the next gc).
    Rm {
        /// The root CID.
        cid: String,
    },
    /// Topology files for routers: propose, show, history, diff, activate, schema, canary,
    /// policy, status, watch.
    Topology {
        #[command(subcommand)]
        command: topo::TopologyCommand,
    },
}

/// Options of a pin.
#[derive(Debug, Clone, clap::Args)]
struct PinArgs {
    /// Replicas as MIN..MAX, or N for exactly N.
    #[arg(long, default_value = "1..1")]
    replicas: String,
    /// Place replicas only in this zone (repeatable).
    #[arg(long)]
    zone: Vec<String>,
    /// Place replicas only on nodes with this tag (repeatable; all must match).
    #[arg(long)]
    tag: Vec<String>,
    /// Every live edge in this zone (or with `tag:T`) holds it (repeatable).
    #[arg(long)]
    preposition: Vec<String>,
    /// Pre-position deadline: RFC 3339 (2026-11-22T02:00:00Z), +DURATION (+90s, +30m,
    /// +2h, +1d) or HH:MM (the next such time, UTC).
    #[arg(long)]
    by: Option<String>,
    /// A name for people.
    #[arg(long)]
    name: Option<String>,
    /// The namespace whose grants govern it. With `add`, it governs reads from this node
    /// from the moment the add commits, before (and without) any pin.
    #[arg(long, default_value = "default")]
    namespace: String,
}

#[derive(Debug, Subcommand)]
enum PinCommand {
    /// Pin an object.
    Add {
        /// The root CID.
        cid: String,
        #[command(flatten)]
        args: PinArgs,
    },
    /// Unpin an object (its copies become evictable cache).
    Rm {
        /// The root CID.
        cid: String,
    },
    /// Every pin with its replicas and standing.
    Ls,
    /// One pin, per node: queued, fetching with percent, held.
    Status {
        /// The root CID.
        cid: String,
    },
}

#[derive(Debug, Subcommand)]
enum GrantCommand {
    /// Give SUBJECT (member:PEER, role:R, zone:Z, tag:T or *) PERMISSION (read, publish,
    /// admin) on NAMESPACE.
    Add {
        /// Who.
        subject: String,
        /// read, publish or admin.
        permission: String,
        /// The namespace.
        namespace: String,
    },
    /// Revoke a grant (transfers to nodes that lose `read` stop within seconds).
    Rm {
        /// Who.
        subject: String,
        /// read, publish or admin.
        permission: String,
        /// The namespace.
        namespace: String,
    },
    /// Every grant.
    Ls,
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Make this node (its daemon must run) the first manager of a new cluster.
    Init,
    /// Join tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Members: id, role, zone, addresses, Raft state, connection.
    Members,
    /// Remove a member (it is disconnected and refused; to come back it must `init` again).
    Remove {
        /// Its PeerId.
        peer: String,
    },
    /// Make a member a manager (it joins the quorum as learner, then voter).
    Promote {
        /// Its PeerId.
        peer: String,
    },
    /// Make a manager an edge (it leaves the quorum).
    Demote {
        /// Its PeerId.
        peer: String,
    },
    /// Leadership.
    Leader {
        #[command(subcommand)]
        command: LeaderCommand,
    },
    /// After losing a majority of managers for good: make this (stopped) manager the only
    /// voter of its cluster, keeping the state it knows committed. Remove the lost managers
    /// afterwards with `mycel cluster remove`.
    Recover {
        /// Required: this discards the lost managers' votes.
        #[arg(long)]
        force_new_cluster: bool,
    },
}

#[derive(Debug, Subcommand)]
enum LeaderCommand {
    /// Hand leadership to a voter (default: another voter). Run on the leader.
    Transfer {
        /// Raft id of the new leader.
        id: Option<u64>,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Commit a new token and print it (the secret is shown once; only its hash is kept).
    Create {
        /// Role it admits: manager, edge or router.
        #[arg(long, default_value = "edge")]
        role: String,
        /// Zone it assigns (default: this node's).
        #[arg(long, default_value = "")]
        zone: String,
        /// Seconds it stays valid.
        #[arg(long, default_value = "3600")]
        ttl: u64,
        /// How many nodes it admits.
        #[arg(long, default_value = "1")]
        uses: u32,
    },
    /// List tokens (ids, role, zone, expiry, uses left).
    Ls,
    /// Revoke a token by its id (from `ls`).
    Revoke {
        /// Token id (hex prefix of its hash).
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Check a config file (default: this node's) and print it with defaults filled in.
    Check {
        /// The file.
        file: Option<PathBuf>,
    },
    /// Make the running daemon re-read `[cluster] members` (as SIGHUP does).
    Reload,
}

#[derive(Debug, Subcommand)]
enum BlockCommand {
    /// Write the raw bytes of one block to stdout.
    Get {
        /// The block's CID.
        cid: String,
    },
}

/// Runs the CLI and returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.json;
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            if json && !f.reported {
                let body = json!({"error": f.message, "exit_code": f.code});
                println!("{body}");
            }
            eprintln!("mycel: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

fn parse_cid(s: &str) -> Result<Cid, Failure> {
    s.parse::<Cid>().map_err(|e| Failure::new(EXIT_INVALID, format!("{s:?}: {e}")))
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

struct Ctx {
    dir: DataDir,
    json: bool,
    quiet: bool,
    /// Inside the daemon: its store, and a buffer instead of stdout.
    shared: Option<(Arc<Store>, Arc<Mutex<Capture>>)>,
}

/// Stdout of a command run inside the daemon, bounded.
#[derive(Debug, Default)]
struct Capture(Vec<u8>);

/// Most bytes a command run inside the daemon may print (larger output: write to a file).
const CAPTURE_BYTES_MAX: usize = 64 << 20;

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > CAPTURE_BYTES_MAX {
            return Err(std::io::Error::other(
                "output over 64 MiB through the daemon: write it to a file instead of stdout",
            ));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct CaptureWriter(Arc<Mutex<Capture>>);

impl Write for CaptureWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("capture lock").write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Ctx {
    fn store(&self) -> Result<Arc<Store>, Failure> {
        if let Some((store, _)) = &self.shared {
            return Ok(store.clone());
        }
        self.dir.check()?;
        Ok(Arc::new(Store::open(&self.dir.store_path())?))
    }

    /// Where command output goes: stdout, or the daemon's capture buffer.
    fn stdout(&self) -> Box<dyn Write + '_> {
        match &self.shared {
            Some((_, cap)) => Box::new(CaptureWriter(cap.clone())),
            None => Box::new(std::io::stdout().lock()),
        }
    }

    fn print(&self, value: serde_json::Value, human: impl FnOnce() -> String) {
        let mut out = self.stdout();
        let text = if self.json { value.to_string() } else { human() };
        if !text.is_empty() {
            let _ = writeln!(out, "{text}");
        }
    }

    /// A byte progress bar on stderr, drawn only on a terminal, fed from `counter`.
    fn progress<T>(
        &self,
        total: Option<u64>,
        label: &str,
        counter: &AtomicU64,
        work: impl FnOnce() -> T + Send,
    ) -> T
    where
        T: Send,
    {
        if self.quiet || self.shared.is_some() || !std::io::stderr().is_terminal() {
            return work();
        }
        let bar = match total {
            Some(t) => ProgressBar::new(t),
            None => ProgressBar::no_length(),
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_message(label.to_string());
        let done = AtomicBool::new(false);
        let out = std::thread::scope(|s| {
            let ticker = s.spawn(|| {
                while !done.load(Ordering::Relaxed) {
                    bar.set_position(counter.load(Ordering::Relaxed));
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
            let out = work();
            done.store(true, Ordering::Relaxed);
            let _ = ticker.join();
            out
        });
        bar.finish_and_clear();
        out
    }
}

fn iec(n: u64) -> String {
    indicatif::BinaryBytes(n).to_string()
}

fn run(cli: Cli) -> Result<(), Failure> {
    let ctx = Ctx {
        dir: DataDir::new(cli.data_dir.unwrap_or_else(datadir::default_path)),
        json: cli.json,
        quiet: cli.quiet,
        shared: None,
    };
    // With a daemon running it holds the store: store commands go through its API.
    if let Some(args) = daemon_args(&cli.command, ctx.json)?
        && let Some((result, body)) = through_daemon(&ctx, &cli.command, args)?
    {
        if let (Ok(()), Command::Add { pin: true, pin_args, .. }) = (&result, &cli.command) {
            // The root is the first word of the human output, or "root" in JSON.
            let text = String::from_utf8_lossy(&body);
            let root = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v["root"].as_str().map(str::to_owned))
                .or_else(|| text.split_whitespace().next().map(str::to_owned))
                .ok_or_else(|| Failure::new(EXIT_FAILURE, "add printed no root"))?;
            let v = pin_add(&ctx, &root, pin_args)?;
            if !ctx.json && !ctx.quiet {
                eprintln!("pinned {root} (index {})", v["index"]);
            }
        }
        return result;
    }
    dispatch(&ctx, cli.command)
}

fn dispatch(ctx: &Ctx, command: Command) -> Result<(), Failure> {
    match command {
        Command::Init { listen, bootstrap, zone, member, join } => {
            init(ctx, InitOptions { listen, bootstrap, zone, members: member, join })
        }
        Command::Cluster { command } => cluster_cmd(ctx, command),
        Command::Run { test_corrupt_serve } => run_daemon(ctx, test_corrupt_serve),
        Command::Id => id(ctx),
        Command::Status => daemon_get(ctx, "/v1/status"),
        Command::Peers => daemon_get(ctx, "/v1/peers"),
        Command::Add { path, kind, pin, pin_args } => {
            if pin {
                return Err(Failure::new(
                    EXIT_NO_DAEMON,
                    "--pin needs a running daemon (start one with `mycel run`)",
                ));
            }
            add(ctx, path, kind, &pin_args.namespace)
        }
        Command::Pin { command } => pin_cmd(ctx, command),
        Command::Grant { command } => grant_cmd(ctx, command),
        Command::Get { cid, out, in_place, format, source, .. } => {
            get(ctx, &cid, out, in_place, format, source)
        }
        Command::Ls => ls(ctx),
        Command::Inspect { cid } => inspect(ctx, &cid),
        Command::Block { command: BlockCommand::Get { cid } } => block_get(ctx, &cid),
        Command::Diff { a, b } => diff(ctx, &a, &b),
        Command::Verify { cid } => verify(ctx, cid.as_deref()),
        Command::Gc => gc(ctx),
        Command::Rm { cid } => rm(ctx, &cid),
        Command::Topology { command } => topo::run(ctx, command),
        Command::Config { command: ConfigCommand::Check { file } } => config_check(ctx, file),
        Command::Config { command: ConfigCommand::Reload } => {
            daemon_call(ctx, "POST", "/v1/members/reload")
        }
    }
}

/// The arguments a store command is forwarded with (paths made absolute), or `None` for
/// commands that do not use the store.
fn daemon_args(command: &Command, json: bool) -> Result<Option<Vec<String>>, Failure> {
    let abs = |p: &PathBuf| -> Result<String, Failure> {
        if p.as_os_str() == "-" {
            return Ok("-".into());
        }
        std::path::absolute(p)
            .map(|a| a.to_string_lossy().into_owned())
            .map_err(|e| Failure::new(EXIT_INVALID, format!("{}: {e}", p.display())))
    };
    let mut args: Vec<String> = match command {
        Command::Add { path, kind, pin_args, .. } => {
            if path.as_os_str() == "-" {
                return Ok(None); // stdin stays with the CLI; handled below
            }
            let kind = clap::ValueEnum::to_possible_value(kind).expect("no skipped variants");
            let (kind, ns) = (kind.get_name().to_owned(), pin_args.namespace.clone());
            vec!["add".into(), abs(path)?, "--kind".into(), kind, "--namespace".into(), ns]
        }
        Command::Get { cid, out, in_place, format, source, .. } => {
            let mut a = vec!["get".into(), cid.clone(), abs(out)?];
            if *in_place {
                a.push("--in-place".into());
            }
            if let Some(f) = format {
                a.extend(["--format".into(), f.clone()]);
            }
            if *source {
                a.push("--source".into());
            }
            a
        }
        Command::Ls => vec!["ls".into()],
        Command::Inspect { cid } => vec!["inspect".into(), cid.clone()],
        Command::Block { command: BlockCommand::Get { cid } } => {
            vec!["block".into(), "get".into(), cid.clone()]
        }
        Command::Diff { a, b } => vec!["diff".into(), a.clone(), b.clone()],
        Command::Verify { cid } => {
            let mut a = vec!["verify".into()];
            a.extend(cid.clone());
            a
        }
        Command::Gc => vec!["gc".into()],
        Command::Rm { cid } => vec!["rm".into(), cid.clone()],
        _ => return Ok(None),
    };
    if json {
        args.insert(0, "--json".into());
    }
    Ok(Some(args))
}

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::new(EXIT_FAILURE, format!("starting the async runtime: {e}")))
}

/// Runs a store command through the daemon if one runs; `None` if none does.
/// Runs CLI `args` inside the daemon (`POST /v1/cli`): its exit code, error message and
/// standard output.
async fn cli_call(
    client: &mut api::client::Client,
    args: Vec<String>,
) -> Result<(u8, String, Vec<u8>), Failure> {
    let resp = client
        .call("POST", "/v1/cli", Some(json!({"args": args})))
        .await
        .map_err(|e| Failure::new(EXIT_FAILURE, e))?;
    let code: u8 = resp
        .headers()
        .get(api::EXIT_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(EXIT_FAILURE);
    let error = resp
        .headers()
        .get(api::ERROR_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .map_err(|e| Failure::new(EXIT_FAILURE, e.to_string()))?
        .to_bytes()
        .to_vec();
    Ok((code, error, body))
}

/// What a command forwarded to the daemon ended with, and what it printed.
type Forwarded = (Result<(), Failure>, Vec<u8>);

fn through_daemon(
    ctx: &Ctx,
    command: &Command,
    args: Vec<String>,
) -> Result<Option<Forwarded>, Failure> {
    let socket = ctx.dir.socket_path();
    if !socket.exists() {
        return Ok(None);
    }
    let rt = runtime()?;
    rt.block_on(async {
        let Some(mut client) = api::client::Client::connect(&socket).await else {
            return Ok(None);
        };
        let mut fetched: Option<daemon::FetchUpdate> = None;
        if let Command::Get { cid, timeout, out, in_place, format, source } = command {
            // A plain file output is written by the daemon while it fetches.
            let live = out.as_path() != std::path::Path::new("-")
                && !in_place
                && format.is_none()
                && !source;
            let live = match live.then(|| std::path::absolute(out)).transpose() {
                Ok(l) => l,
                Err(e) => {
                    return Err(Failure::new(EXIT_INVALID, format!("{}: {e}", out.display())));
                }
            };
            let update = fetch_through(ctx, &mut client, cid, *timeout, live.as_deref()).await?;
            if let Some(report) = &update.output {
                print_get(ctx, report, out, Some(&update));
                return Ok(Some((Ok(()), Vec::new())));
            }
            fetched = Some(update);
            // The progress stream used that connection up: take a fresh one.
            client = api::client::Client::connect(&socket)
                .await
                .ok_or_else(|| Failure::new(EXIT_FAILURE, "the daemon went away"))?;
        }
        let (code, error, mut body) = cli_call(&mut client, args).await?;
        // `get --json` through the mesh also reports who sent what.
        if let (Some(f), true, 0) = (&fetched, ctx.json, code)
            && let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&body)
        {
            add_fetch_report(&mut v, f);
            body = v.to_string().into_bytes();
            body.push(b'\n');
        }
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(&body);
        let _ = out.flush();
        if code == 0 {
            Ok(Some((Ok(()), body)))
        } else {
            let mut f = Failure::new(code, error);
            f.reported = true;
            if !ctx.json {
                f.reported = false;
            }
            Ok(Some((Err(f), body)))
        }
    })
}

/// `get --json` through the mesh also reports who sent what.
fn add_fetch_report(v: &mut serde_json::Value, f: &daemon::FetchUpdate) {
    if let Some(obj) = v.as_object_mut() {
        obj.insert("by_peer".into(), json!(f.by_peer));
        obj.insert("fetched_bytes".into(), json!(f.by_peer.values().sum::<u64>()));
        obj.insert("rerequested".into(), json!(f.rerequested));
    }
}

/// Prints what `get` wrote (and, from a fetch, who sent what).
fn print_get(
    ctx: &Ctx,
    report: &restore::GetReport,
    out: &std::path::Path,
    fetched: Option<&daemon::FetchUpdate>,
) {
    let mut value = serde_json::to_value(report).expect("report serialises");
    if let Some(f) = fetched {
        add_fetch_report(&mut value, f);
    }
    ctx.print(value, || {
        let mut s =
            format!("{} -> {}: {} written", report.root, out.display(), iec(report.bytes_written));
        if report.hole_bytes > 0 {
            s.push_str(&format!(", {} of holes", iec(report.hole_bytes)));
        }
        if report.bytes_punched > 0 {
            s.push_str(&format!(", {} punched", iec(report.bytes_punched)));
        }
        s
    });
}

/// Fetches an object through the daemon's mesh, drawing progress; with `out`, the daemon
/// writes a file or disk image there as it arrives (see [`crate::live`]).
async fn fetch_through(
    ctx: &Ctx,
    client: &mut api::client::Client,
    cid: &str,
    timeout_s: u64,
    out: Option<&std::path::Path>,
) -> Result<daemon::FetchUpdate, Failure> {
    parse_cid(cid)?;
    let mut request = json!({"root": cid});
    if let Some(out) = out {
        request["out"] = json!(out.to_string_lossy());
    }
    let resp = client
        .call("POST", "/v1/fetch", Some(request))
        .await
        .map_err(|e| Failure::new(EXIT_FAILURE, e))?;
    if !resp.status().is_success() {
        return Err(Failure::new(
            EXIT_INVALID,
            format!("daemon refused the fetch ({})", resp.status()),
        ));
    }
    let mut body = resp.into_body();
    let bar = (!ctx.quiet && std::io::stderr().is_terminal()).then(|| {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "fetching [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar
    });
    let mut buf = Vec::new();
    let mut last: Option<daemon::FetchUpdate> = None;
    let patience = std::time::Duration::from_secs(timeout_s.max(1));
    let mut progress_at = std::time::Instant::now();
    let mut best = 0u64;
    loop {
        let line = tokio::time::timeout(
            std::time::Duration::from_secs(1),
            api::client::next_line(&mut body, &mut buf),
        )
        .await;
        let line = match line {
            Err(_) => None,
            Ok(r) => match r.map_err(|e| Failure::new(EXIT_FAILURE, e))? {
                Some(l) => Some(l),
                None => break,
            },
        };
        if progress_at.elapsed() > patience {
            let why = if best == 0 {
                "no peer holds it, or none can be reached"
            } else {
                "the transfer stalled"
            };
            return Err(Failure::new(
                EXIT_NOT_FOUND,
                format!("fetching {cid}: {why} ({timeout_s} s without progress)"),
            ));
        }
        let Some(line) = line else { continue };
        let update: daemon::FetchUpdate = serde_json::from_slice(&line)
            .map_err(|e| Failure::new(EXIT_FAILURE, format!("bad progress line: {e}")))?;
        if update.done_bytes > best || update.state != "fetching" {
            best = update.done_bytes.max(best + u64::from(update.state != "fetching"));
            progress_at = std::time::Instant::now();
        }
        if let Some(bar) = &bar {
            bar.set_length(update.total_bytes);
            bar.set_position(update.done_bytes);
            bar.set_message(format!("{} peers", update.peers));
        }
        let done = update.state != "fetching";
        last = Some(update);
        if done {
            break;
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let last =
        last.ok_or_else(|| Failure::new(EXIT_FAILURE, "the daemon ended the fetch early"))?;
    match last.state.as_str() {
        "complete" => Ok(last),
        _ => Err(Failure::new(
            EXIT_NOT_FOUND,
            format!("fetching {cid}: {}", last.error.clone().unwrap_or_else(|| "failed".into())),
        )),
    }
}

/// Runs a store command inside the daemon (which holds the store): returns the exit code,
/// the captured stdout and the error message.
pub fn run_in_daemon(args: Vec<String>, dir: DataDir, store: Arc<Store>) -> (u8, Vec<u8>, String) {
    let argv = std::iter::once("mycel".to_string()).chain(args);
    let cli = match Cli::try_parse_from(argv) {
        Ok(c) => c,
        Err(e) => return (2, Vec::new(), e.to_string()),
    };
    if daemon_args(&cli.command, false).ok().flatten().is_none() {
        return (EXIT_INVALID, Vec::new(), "not a store command".into());
    }
    let capture = Arc::new(Mutex::new(Capture::default()));
    let ctx = Ctx { dir, json: cli.json, quiet: true, shared: Some((store, capture.clone())) };
    let result = dispatch(&ctx, cli.command);
    let out = std::mem::take(&mut capture.lock().expect("capture lock").0);
    match result {
        Ok(()) => (0, out, String::new()),
        Err(f) => (f.code, out, f.message),
    }
}

/// The allocator keeps block-sized buffers for reuse: a fetch allocates one per received
/// block (up to 1 MiB) on one thread and frees it on another. With glibc's defaults, blocks
/// over 128 KiB were mapped and unmapped one by one and arenas handed freed memory back to
/// the kernel as soon as a few hundred KiB were free, so the same memory was faulted in
/// again and again (9 % of a one-peer transfer's time on the benchmark VM).
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before the daemon's threads.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 32 << 20);
    }
}

fn run_daemon(ctx: &Ctx, test_corrupt_serve: bool) -> Result<(), Failure> {
    ctx.dir.check()?;
    tune_allocator();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,libp2p_gossipsub=warn"));
    let _ =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Failure::new(EXIT_FAILURE, format!("starting the runtime: {e}")))?;
    let opts = daemon::RunOptions { test_corrupt_serve };
    // The daemon loop runs as a task on the workers, beside the connections it serves: on
    // the thread that blocks on the runtime, every block arriving from a peer woke a thread of
    // its own (a tenth of the fetching daemon's context switches; 7 % of a one-peer transfer).
    let dir = ctx.dir.clone();
    match rt.block_on(async move { tokio::spawn(daemon::run(dir, opts)).await }) {
        Ok(result) => result.map_err(|e| Failure::new(EXIT_STORE, e.to_string())),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(Failure::new(EXIT_FAILURE, format!("the daemon stopped: {e}"))),
    }
}

fn daemon_call(ctx: &Ctx, method: &str, path: &str) -> Result<(), Failure> {
    let socket = ctx.dir.socket_path();
    let rt = runtime()?;
    let value = rt.block_on(async {
        let mut client = api::client::Client::connect(&socket).await.ok_or_else(|| {
            Failure::new(EXIT_NO_DAEMON, "no daemon is running (start one with `mycel run`)")
        })?;
        client.json(method, path, None).await.map_err(|e| Failure::new(EXIT_FAILURE, e))
    })?;
    ctx.print(value.clone(), || serde_json::to_string_pretty(&value).unwrap_or_default());
    Ok(())
}

fn daemon_get(ctx: &Ctx, path: &str) -> Result<(), Failure> {
    daemon_call(ctx, "GET", path)
}

fn id(ctx: &Ctx) -> Result<(), Failure> {
    let socket = ctx.dir.socket_path();
    let from_daemon = if socket.exists() {
        runtime()?.block_on(async {
            let mut client = api::client::Client::connect(&socket).await?;
            client.json("GET", "/v1/id", None).await.ok()
        })
    } else {
        None
    };
    let value = match from_daemon {
        Some(v) => v,
        None => {
            let key = ctx.dir.identity()?;
            let kp = libp2p::identity::Keypair::ed25519_from_bytes(key.to_bytes())
                .map_err(|e| Failure::new(EXIT_STORE, e.to_string()))?;
            json!({"peer_id": kp.public().to_peer_id().to_string(), "listen_addrs": []})
        }
    };
    ctx.print(value.clone(), || {
        let mut s = value["peer_id"].as_str().unwrap_or_default().to_string();
        for a in value["listen_addrs"].as_array().into_iter().flatten() {
            s.push_str(&format!("\n  {}", a.as_str().unwrap_or_default()));
        }
        s
    });
    Ok(())
}

fn init(ctx: &Ctx, opts: InitOptions) -> Result<(), Failure> {
    for m in &opts.members {
        net::parse_peer(m).map_err(|e| Failure::new(EXIT_INVALID, e))?;
    }
    for a in opts.listen.iter().chain(&opts.bootstrap) {
        a.parse::<libp2p::Multiaddr>()
            .map_err(|e| Failure::new(EXIT_INVALID, format!("bad multiaddr {a:?}: {e}")))?;
    }
    let mut seed = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut seed);
    let key = ctx.dir.init_with(seed, &opts)?;
    let kp = libp2p::identity::Keypair::ed25519_from_bytes(key.to_bytes())
        .map_err(|e| Failure::new(EXIT_STORE, e.to_string()))?;
    let peer_id = kp.public().to_peer_id().to_string();
    let path = ctx.dir.path.display().to_string();
    ctx.print(json!({"data_dir": path, "peer_id": peer_id}), || {
        format!("initialised mycel node in {path}\npeer id {peer_id}")
    });
    Ok(())
}

fn chunker_config(ctx: &Ctx) -> Result<Config, Failure> {
    Ok(ctx.dir.config()?.chunker.config())
}

/// `namespace`: the one `--namespace` named (`default` records nothing).
fn add(ctx: &Ctx, path: PathBuf, kind: KindArg, namespace: &str) -> Result<(), Failure> {
    mycel_policy::access::validate_namespace(namespace)
        .map_err(|e| Failure::new(EXIT_INVALID, e))?;
    let namespace = (namespace != mycel_policy::access::DEFAULT_NAMESPACE).then_some(namespace);
    let config = chunker_config(ctx)?;
    let store = ctx.store()?;
    let total = std::fs::metadata(&path).ok().filter(|m| m.is_file()).map(|m| m.len());
    let progress = ingest::Progress::default();
    let report = ctx.progress(total, "adding", &progress.bytes, || {
        ingest::add(&store, &path, kind, namespace, &config, now_ms(), &progress)
    })?;
    let value = serde_json::to_value(&report).expect("report serialises");
    ctx.print(value, || {
        let mut s = format!(
            "{}\n  {} {}, {} chunks, {} new",
            report.root,
            report.kind,
            iec(report.bytes),
            report.chunks,
            iec(report.stored_bytes)
        );
        if report.hole_bytes > 0 {
            s.push_str(&format!(", {} in holes", iec(report.hole_bytes)));
        }
        if report.files > 0 {
            s.push_str(&format!(", {} files", report.files));
        }
        if let (Some(f), Some(src)) = (&report.source_format, &report.source_root) {
            s.push_str(&format!("\n  read as {f}; source bytes kept as {src}"));
        }
        s
    });
    Ok(())
}

fn get(
    ctx: &Ctx,
    cid: &str,
    out: PathBuf,
    in_place: bool,
    format: Option<String>,
    source: bool,
) -> Result<(), Failure> {
    let cid = parse_cid(cid)?;
    let format = format
        .map(|f| {
            f.parse::<topology::Format>().map_err(|_| {
                Failure::new(EXIT_INVALID, format!("unknown format {f:?} (json, yaml, toml)"))
            })
        })
        .transpose()?;
    let store = ctx.store()?;
    let root = restore::root(&store, &cid)?;
    let opts = GetOptions { in_place, format, source };
    let progress = restore::Progress::default();
    let to_stdout = out == std::path::Path::new("-");
    let report = ctx.progress(Some(root.len), "getting", &progress.bytes, || {
        restore::get(&store, &cid, &out, &opts, &progress, &mut *ctx.stdout())
    })?;
    if to_stdout && !ctx.json {
        return Ok(());
    }
    print_get(ctx, &report, &out, None);
    Ok(())
}

fn ls(ctx: &Ctx) -> Result<(), Failure> {
    let store = ctx.store()?;
    let mut roots = store.roots()?;
    roots.sort_by_key(|(_, r)| r.added_ms);
    let items: Vec<_> = roots
        .iter()
        .map(|(cid, r)| {
            json!({"root": cid.to_string(), "kind": r.kind, "bytes": r.len, "chunks": r.chunks,
                   "hole_bytes": r.hole_bytes, "name": r.name, "added_ms": r.added_ms})
        })
        .collect();
    ctx.print(json!(items), || {
        roots
            .iter()
            .map(|(cid, r)| format!("{cid}  {:<8} {:>12}  {}", r.kind, iec(r.len), r.name))
            .collect::<Vec<_>>()
            .join("\n")
    });
    Ok(())
}

fn inspect(ctx: &Ctx, cid: &str) -> Result<(), Failure> {
    let cid = parse_cid(cid)?;
    let store = ctx.store()?;
    let i = objects::inspect(&store, &cid)?;
    let value = serde_json::to_value(&i).expect("serialises");
    ctx.print(value.clone(), || {
        let mut s = format!(
            "{}\n  kind      {}\n  bytes     {} ({})\n",
            i.cid,
            i.kind,
            i.bytes,
            iec(i.bytes)
        );
        if let Some(c) = &i.chunker {
            s.push_str(&format!(
                "  chunker   {} v{} {}/{}/{} norm {} zero-run {} fanout 2^{}\n",
                c["algorithm"].as_str().unwrap_or_default(),
                c["fastcdc_major"],
                c["min_bytes"],
                c["avg_bytes"],
                c["max_bytes"],
                c["normalization"],
                c["zero_run_bytes"],
                c["fanout_bits"]
            ));
        }
        s.push_str(&format!(
            "  tree      {} levels, {} nodes ({})\n  chunks    {} ({} distinct)",
            i.levels,
            i.nodes,
            iec(i.node_bytes),
            i.chunks,
            i.unique_chunks
        ));
        if i.holes > 0 {
            s.push_str(&format!("\n  holes     {} ({})", i.holes, iec(i.hole_bytes)));
        }
        if i.entries > 0 {
            s.push_str(&format!("\n  entries   {}", i.entries));
        }
        if let Some(src) = &i.source {
            s.push_str(&format!("\n  source    {src}"));
        }
        s
    });
    Ok(())
}

fn block_get(ctx: &Ctx, cid: &str) -> Result<(), Failure> {
    let cid = parse_cid(cid)?;
    let store = ctx.store()?;
    let bytes = store
        .get(&cid)?
        .ok_or_else(|| Failure::new(EXIT_NOT_FOUND, format!("block {cid} is not in the store")))?;
    let mut out = ctx.stdout();
    out.write_all(&bytes)
        .and_then(|()| out.flush())
        .map_err(|e| Failure::new(EXIT_FAILURE, format!("stdout: {e}")))
}

fn diff(ctx: &Ctx, a: &str, b: &str) -> Result<(), Failure> {
    let (a, b) = (parse_cid(a)?, parse_cid(b)?);
    let store = ctx.store()?;
    let d = objects::diff(&store, &a, &b)?;
    let value = serde_json::to_value(&d).expect("serialises");
    ctx.print(value, || {
        if d.identical {
            return "identical".into();
        }
        let mut lines = Vec::new();
        if d.mode == "bytes" {
            lines.push(format!(
                "{} changed in {} range(s) of B; {} range(s) of A gone",
                iec(d.changed_bytes),
                d.changed_in_b.len(),
                d.removed_from_a.len()
            ));
            for r in &d.changed_in_b {
                lines.push(format!("  B {}..{} ({})", r.start, r.end, iec(r.end - r.start)));
            }
            for r in &d.removed_from_a {
                lines.push(format!("  A {}..{} ({}) gone", r.start, r.end, iec(r.end - r.start)));
            }
        }
        for p in &d.paths {
            let sign = match p.change.as_str() {
                "added" => "+",
                "removed" => "-",
                _ => "~",
            };
            let show = |v: &Option<serde_json::Value>| {
                v.as_ref().map(|v| v.to_string()).unwrap_or_default()
            };
            match p.change.as_str() {
                "added" => lines.push(format!("{sign} {} = {}", p.path, show(&p.new))),
                "removed" => lines.push(format!("{sign} {} (was {})", p.path, show(&p.old))),
                _ => lines.push(format!("{sign} {}: {} -> {}", p.path, show(&p.old), show(&p.new))),
            }
        }
        lines.join("\n")
    });
    Ok(())
}

fn verify(ctx: &Ctx, cid: Option<&str>) -> Result<(), Failure> {
    let store = ctx.store()?;
    let (checked, bad): (u64, Vec<String>) = match cid {
        Some(c) => {
            let cid = parse_cid(c)?;
            let check = objects::verify_object(&store, &cid)?;
            let mut bad: Vec<String> =
                check.missing.iter().map(|m| format!("{m}: missing")).collect();
            bad.extend(check.corrupt.iter().cloned());
            (check.blocks, bad)
        }
        None => {
            let total = store.stats()?.block_bytes;
            let counter = AtomicU64::new(0);
            let (checked, bad) = ctx.progress(Some(total), "verifying", &counter, || {
                store.verify_all(&mut |n| {
                    counter.fetch_add(n, Ordering::Relaxed);
                })
            })?;
            (checked, bad.into_iter().map(|(c, why)| format!("{c}: {why}")).collect())
        }
    };
    ctx.print(json!({"checked": checked, "bad": bad, "ok": bad.is_empty()}), || {
        if bad.is_empty() {
            format!("{checked} blocks ok")
        } else {
            bad.iter().map(|b| format!("BAD {b}")).collect::<Vec<_>>().join("\n")
        }
    });
    if bad.is_empty() {
        Ok(())
    } else {
        let mut f = Failure::new(EXIT_VERIFY, format!("{} bad block(s) of {checked}", bad.len()));
        f.reported = true;
        Err(f)
    }
}

fn gc(ctx: &Ctx) -> Result<(), Failure> {
    let store = ctx.store()?;
    let report = store.gc()?;
    ctx.print(serde_json::to_value(&report).expect("serialises"), || {
        format!(
            "removed {} blocks ({}), rewrote {} pack(s), reclaimed {}; {} blocks live",
            report.removed_blocks,
            iec(report.removed_bytes),
            report.packs_rewritten,
            iec(report.reclaimed_bytes),
            report.live_blocks
        )
    });
    Ok(())
}

fn rm(ctx: &Ctx, cid: &str) -> Result<(), Failure> {
    let cid = parse_cid(cid)?;
    let store = ctx.store()?;
    if !store.remove_root(&cid)? {
        return Err(Failure::new(EXIT_NOT_FOUND, format!("{cid} is not a root in this store")));
    }
    ctx.print(json!({"removed": cid.to_string()}), || {
        format!("removed {cid}; run `mycel gc` to free its blocks")
    });
    Ok(())
}

fn config_check(ctx: &Ctx, file: Option<PathBuf>) -> Result<(), Failure> {
    let path = file.unwrap_or_else(|| ctx.dir.config_path());
    let config = datadir::load_config(&path)?;
    let text = toml::to_string(&config).map_err(|e| Failure::new(EXIT_FAILURE, e.to_string()))?;
    ctx.print(serde_json::to_value(&config).expect("serialises"), || {
        format!("{}: ok\n{text}", path.display())
    });
    Ok(())
}

fn api_json(
    ctx: &Ctx,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<serde_json::Value, Failure> {
    let socket = ctx.dir.socket_path();
    runtime()?.block_on(async {
        let mut client = api::client::Client::connect(&socket).await.ok_or_else(|| {
            Failure::new(EXIT_NO_DAEMON, "no daemon is running (start one with `mycel run`)")
        })?;
        client.json(method, path, body).await.map_err(|e| Failure::new(EXIT_FAILURE, e))
    })
}

fn cluster_cmd(ctx: &Ctx, command: ClusterCommand) -> Result<(), Failure> {
    let value = match command {
        ClusterCommand::Init => api_json(ctx, "POST", "/v1/cluster/init", None)?,
        ClusterCommand::Token { command: TokenCommand::Create { role, zone, ttl, uses } } => {
            if mycel_consensus::command::Role::parse(&role).is_none() {
                return Err(Failure::new(
                    EXIT_INVALID,
                    format!("unknown role {role:?} (manager, edge, router)"),
                ));
            }
            let v = api_json(
                ctx,
                "POST",
                "/v1/cluster/tokens",
                Some(json!({"role": role, "zone": zone, "ttl_s": ttl, "uses": uses})),
            )?;
            if !ctx.json {
                println!("{}", v["token"].as_str().unwrap_or_default());
                return Ok(());
            }
            v
        }
        ClusterCommand::Token { command: TokenCommand::Ls } => {
            let v = api_json(ctx, "GET", "/v1/cluster", None)?;
            v["tokens"].clone()
        }
        ClusterCommand::Token { command: TokenCommand::Revoke { id } } => {
            api_json(ctx, "POST", "/v1/cluster/tokens/revoke", Some(json!({"id": id})))?
        }
        ClusterCommand::Members => {
            let v = api_json(ctx, "GET", "/v1/cluster", None)?;
            if !ctx.json {
                for m in v["members"].as_array().into_iter().flatten() {
                    println!(
                        "{:>3} {:<8} {:<8} {:<10} {}  {}",
                        m["raft_id"].to_string(),
                        m["role"].as_str().unwrap_or_default(),
                        m["raft"].as_str().unwrap_or_default(),
                        m["zone"].as_str().unwrap_or_default(),
                        m["peer_id"].as_str().unwrap_or_default(),
                        if m["connected"].as_bool() == Some(true) { "connected" } else { "-" }
                    );
                }
                return Ok(());
            }
            v
        }
        ClusterCommand::Remove { peer } => {
            api_json(ctx, "POST", "/v1/cluster/members/remove", Some(json!({"peer": peer})))?
        }
        ClusterCommand::Promote { peer } => api_json(
            ctx,
            "POST",
            "/v1/cluster/members/role",
            Some(json!({"peer": peer, "role": "manager"})),
        )?,
        ClusterCommand::Demote { peer } => api_json(
            ctx,
            "POST",
            "/v1/cluster/members/role",
            Some(json!({"peer": peer, "role": "edge"})),
        )?,
        ClusterCommand::Recover { force_new_cluster } => recover(ctx, force_new_cluster)?,
        ClusterCommand::Leader { command: LeaderCommand::Transfer { id } } => api_json(
            ctx,
            "POST",
            "/v1/cluster/leader/transfer",
            Some(json!({"id": id.unwrap_or(0)})),
        )?,
    };
    ctx.print(value.clone(), || serde_json::to_string_pretty(&value).unwrap_or_default());
    Ok(())
}

/// Parses `MIN..MAX` or `N`.
fn parse_replicas(s: &str) -> Result<(u32, u32), Failure> {
    let bad = || Failure::new(EXIT_INVALID, format!("--replicas {s:?}: use MIN..MAX or N"));
    let (a, b) = s.split_once("..").unwrap_or((s, s));
    let (min, max): (u32, u32) =
        (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?);
    if min == 0 || min > max {
        return Err(Failure::new(EXIT_INVALID, format!("--replicas {s:?}: need 1 <= MIN <= MAX")));
    }
    Ok((min, max))
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A deadline in ms since the epoch from `--by`.
fn parse_deadline(s: &str, now_ms: u64) -> Result<u64, Failure> {
    let bad = || {
        Failure::new(
            EXIT_INVALID,
            format!("--by {s:?}: use 2026-11-22T02:00:00Z, +30m (s, m, h, d) or HH:MM (UTC)"),
        )
    };
    if let Some(rel) = s.strip_prefix('+') {
        let (n, unit) = rel.split_at(rel.len().saturating_sub(1));
        let n: u64 = n.parse().map_err(|_| bad())?;
        let ms = match unit {
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(bad()),
        };
        return Ok(now_ms + n.checked_mul(ms).ok_or_else(bad)?);
    }
    let num = |t: &str| t.parse::<u32>().map_err(|_| bad());
    if let Some((h, m)) = s.split_once(':')
        && !s.contains('T')
    {
        let (h, m) = (num(h)?, num(m)?);
        if h > 23 || m > 59 {
            return Err(bad());
        }
        let day = 86_400_000;
        let at = now_ms / day * day + u64::from(h * 3_600_000 + m * 60_000);
        return Ok(if at > now_ms { at } else { at + day });
    }
    // RFC 3339 in UTC: YYYY-MM-DDTHH:MM:SSZ.
    let b = s.as_bytes();
    if b.len() != 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[19] != b'Z' {
        return Err(bad());
    }
    let (y, mo, d) = (num(&s[0..4])?, num(&s[5..7])?, num(&s[8..10])?);
    let (h, mi, se) = (num(&s[11..13])?, num(&s[14..16])?, num(&s[17..19])?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return Err(bad());
    }
    let days = days_from_civil(i64::from(y), mo, d);
    let secs = days * 86_400 + i64::from(h * 3600 + mi * 60 + se);
    u64::try_from(secs).map(|s| s * 1000).map_err(|_| bad())
}

fn pin_add(ctx: &Ctx, cid: &str, a: &PinArgs) -> Result<serde_json::Value, Failure> {
    let root = parse_cid(cid)?;
    let (min, max) = parse_replicas(&a.replicas)?;
    mycel_policy::access::validate_namespace(&a.namespace)
        .map_err(|e| Failure::new(EXIT_INVALID, e))?;
    let deadline_ms = a.by.as_deref().map(|b| parse_deadline(b, now_ms())).transpose()?;
    if deadline_ms.is_some() && a.preposition.is_empty() {
        return Err(Failure::new(
            EXIT_INVALID,
            "--by needs --preposition (what must land by then)",
        ));
    }
    let body = json!([{
        "root": root.to_string(),
        "name": a.name.clone().unwrap_or_default(),
        "namespace": a.namespace,
        "replicas_min": min,
        "replicas_max": max,
        "zones": a.zone,
        "tags": a.tag,
        "preposition": a.preposition,
        "deadline_ms": deadline_ms.unwrap_or(0),
    }]);
    api_json(ctx, "POST", "/v1/pins:batch", Some(body))
}

fn pin_cmd(ctx: &Ctx, command: PinCommand) -> Result<(), Failure> {
    let value = match command {
        PinCommand::Add { cid, args } => pin_add(ctx, &cid, &args)?,
        PinCommand::Rm { cid } => {
            let root = parse_cid(&cid)?;
            api_json(ctx, "POST", "/v1/pins/rm", Some(json!({"root": root.to_string()})))?
        }
        PinCommand::Ls => {
            let v = api_json(ctx, "GET", "/v1/pins", None)?;
            if !ctx.json {
                for p in v["pins"].as_array().into_iter().flatten() {
                    let replicas = p["replicas"].as_u64().map_or("?".into(), |r| r.to_string());
                    let mut line = format!(
                        "{}  {}/{}..{}  {:<10} {}",
                        p["cid"].as_str().unwrap_or_default(),
                        replicas,
                        p["replicas_min"],
                        p["replicas_max"],
                        p["namespace"].as_str().unwrap_or_default(),
                        p["name"].as_str().unwrap_or_default(),
                    );
                    if let Some(d) = p["deadline"].as_str() {
                        line += &format!(
                            "  pre-position {}/{} {d}",
                            p["preposition_held"], p["preposition_targets"]
                        );
                    }
                    if let Some(why) = p["unplaceable"].as_str() {
                        line += &format!("  UNPLACEABLE: {why}");
                    }
                    println!("{line}");
                }
                return Ok(());
            }
            v["pins"].clone()
        }
        PinCommand::Status { cid } => {
            let root = parse_cid(&cid)?;
            let v = api_json(ctx, "GET", &format!("/v1/pins?root={root}"), None)?;
            if !ctx.json {
                println!(
                    "{}  replicas {}/{}..{}{}",
                    root,
                    v["replicas"].as_u64().map_or("?".into(), |r| r.to_string()),
                    v["replicas_min"],
                    v["replicas_max"],
                    v["unplaceable"]
                        .as_str()
                        .map(|w| format!("  UNPLACEABLE: {w}"))
                        .unwrap_or_default()
                );
                for n in v["nodes"].as_array().into_iter().flatten() {
                    let state = n["state"].as_str().unwrap_or_default();
                    let pct = n["percent"].as_f64().filter(|_| state == "fetching");
                    println!(
                        "  {:<52} {:<7} {:<10} {}{}{}",
                        n["peer_id"].as_str().unwrap_or_default(),
                        n["role"].as_str().unwrap_or_default(),
                        n["zone"].as_str().unwrap_or_default(),
                        state,
                        pct.map(|p| format!(" {p}%")).unwrap_or_default(),
                        if n["alive"].as_bool() == Some(false) { " (lost)" } else { "" },
                    );
                }
                return Ok(());
            }
            v
        }
    };
    ctx.print(value.clone(), || serde_json::to_string_pretty(&value).unwrap_or_default());
    Ok(())
}

fn grant_cmd(ctx: &Ctx, command: GrantCommand) -> Result<(), Failure> {
    let check = |s: &str, p: &str, n: &str| {
        mycel_policy::access::validate_grant(s, p, n).map_err(|e| Failure::new(EXIT_INVALID, e))
    };
    let value = match command {
        GrantCommand::Add { subject, permission, namespace } => {
            check(&subject, &permission, &namespace)?;
            api_json(
                ctx,
                "POST",
                "/v1/grants",
                Some(json!({"subject": subject, "permission": permission, "namespace": namespace})),
            )?
        }
        GrantCommand::Rm { subject, permission, namespace } => {
            check(&subject, &permission, &namespace)?;
            api_json(
                ctx,
                "POST",
                "/v1/grants/rm",
                Some(json!({"subject": subject, "permission": permission, "namespace": namespace})),
            )?
        }
        GrantCommand::Ls => {
            let v = api_json(ctx, "GET", "/v1/pins", None)?;
            if !ctx.json {
                for g in v["grants"].as_array().into_iter().flatten() {
                    println!(
                        "{:<10} {:<8} {}",
                        g["namespace"].as_str().unwrap_or_default(),
                        g["permission"].as_str().unwrap_or_default(),
                        g["subject"].as_str().unwrap_or_default()
                    );
                }
                return Ok(());
            }
            v["grants"].clone()
        }
    };
    ctx.print(value.clone(), || serde_json::to_string_pretty(&value).unwrap_or_default());
    Ok(())
}

fn recover(ctx: &Ctx, force: bool) -> Result<serde_json::Value, Failure> {
    if !force {
        return Err(Failure::new(
            EXIT_INVALID,
            "recovery discards the lost managers' votes: pass --force-new-cluster",
        ));
    }
    ctx.dir.check()?;
    let socket = ctx.dir.socket_path();
    if socket.exists() && runtime()?.block_on(api::client::Client::connect(&socket)).is_some() {
        return Err(Failure::new(
            EXIT_LOCKED,
            "stop the daemon first (`mycel cluster recover` works on a stopped node)",
        ));
    }
    let path = ctx.dir.path.join("raft.redb");
    if !path.exists() {
        return Err(Failure::new(EXIT_INVALID, "this node has no Raft log: it is not a manager"));
    }
    let mut log =
        crate::cluster::raftlog::RedbLog::open(&path).map_err(|e| Failure::new(EXIT_STORE, e))?;
    let raft_id = log
        .get_meta("raft_id")
        .map_err(|e| Failure::new(EXIT_STORE, e))?
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .ok_or_else(|| Failure::new(EXIT_INVALID, "this node is not a manager"))?;
    let store = ctx.store()?;
    let load = |cid: &Cid| restore::read_object(&store, cid).ok();
    let (state, blocks) = mycel_consensus::core::force_new_cluster(&mut log, raft_id, &load)
        .map_err(|e| Failure::new(EXIT_STORE, e))?;
    let root = blocks.last().map(|b| b.0);
    let mut w = store.writer()?;
    for (cid, bytes) in &blocks {
        w.put(*cid, bytes)?;
    }
    if let Some(root) = root {
        w.add_root(
            root,
            crate::store::RootRecord {
                kind: "file".into(),
                len: 0,
                chunks: 0,
                hole_bytes: 0,
                added_ms: now_ms(),
                name: "cluster-state".into(),
                source: None,
            },
        );
    }
    w.commit()?;
    let lost: Vec<String> = state
        .members
        .values()
        .filter(|m| m.role == mycel_consensus::command::Role::Manager && m.raft_id != raft_id)
        .filter_map(|m| libp2p::PeerId::from_bytes(&m.peer).ok().map(|p| p.to_string()))
        .collect();
    Ok(
        json!({"raft_id": raft_id, "applied_index": state.applied_index, "members": state.members.len(),
        "voters": [raft_id], "other_managers": lost,
        "next": "start the daemon, then `mycel cluster remove PEER` for each lost manager"}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_and_replicas_parse() {
        // 2026-11-22T00:00:00Z.
        let midnight = 1_795_305_600_000;
        assert_eq!(parse_deadline("2026-11-22T00:00:00Z", 0).unwrap(), midnight);
        assert_eq!(parse_deadline("2026-11-22T02:00:00Z", 0).unwrap(), midnight + 7_200_000);
        assert_eq!(parse_deadline("+30m", 1000).unwrap(), 1000 + 1_800_000);
        assert_eq!(parse_deadline("02:00", midnight + 1).unwrap(), midnight + 7_200_000);
        assert_eq!(parse_deadline("01:00", midnight + 7_200_000).unwrap(), midnight + 90_000_000);
        for bad in ["tomorrow", "+5y", "25:00", "2026-13-01T00:00:00Z", "+", ""] {
            assert!(parse_deadline(bad, 0).is_err(), "{bad}");
        }
        assert_eq!(parse_replicas("2..3").unwrap(), (2, 3));
        assert_eq!(parse_replicas("3").unwrap(), (3, 3));
        assert!(parse_replicas("3..2").is_err());
        assert!(parse_replicas("0").is_err());
        assert!(parse_replicas("x").is_err());
    }
}
