//! Applying topology activations on a router: write the file, run the hook, restore on
//! failure, once per activation, and tell whether the file drifted.
//!
//! The consensus core decides what a router applies ([`mycel_consensus::topology::target`]);
//! this module performs it, synchronously with std (the daemon calls it from a blocking
//! task). It touches only the watched output path and `DATA_DIR/topology/`.
//!
//! # Order, and why a crash never runs a hook twice
//!
//! For activation `i` of `NAME` (`apply`):
//!
//! 1. If `NAME.state` already records activation `i`, stop: it was handled (or a crash
//!    interrupted its hook, which is then reported, not rerun).
//! 2. Keep the previous file: `NAME.prev` holds its bytes (or "there was none") tagged with
//!    `i`, written atomically, and never overwritten by a retry of the same `i` (so a retry
//!    after a crash still restores the file as it was before `i`, not the new one).
//! 3. Write the new file atomically: a temporary file in the same directory, fsync, rename
//!    over the path, fsync the directory.
//! 4. Record `i` as started in `NAME.state` (atomically, with a format-version byte).
//! 5. Run the hook (`sh -c CMD`) with a timeout and the `MYCEL_TOPOLOGY_*` environment.
//! 6. On failure restore the previous bytes (or remove the file) atomically; record the
//!    result.
//!
//! A crash before step 4 leaves `i` unrecorded: the retry rewrites the same bytes and runs the
//! hook, which has not run. A crash after step 4 (during or after the hook) leaves `i`
//! recorded as started: the retry reports [`Outcome::Handled`] with
//! [`Status::Started`] ("interrupted") and does not run the hook again. So the hook runs at
//! most once per activation, and exactly once when the node does not crash while it runs.
//! A new activation of the version already in place (a canary promoted) writes nothing
//! and runs no hook ([`Outcome::Unchanged`]).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mycel_chunker::topology::{self as canon, Format};

/// Format version of `NAME.state` and `NAME.prev`.
pub const RECORD_VERSION: u8 = 1;
/// Largest previous file kept for a restore.
pub const PREVIOUS_BYTES_MAX: u64 = 64 << 20;
/// Most bytes of hook output kept in a report (the tail of stdout and stderr together).
pub const HOOK_OUTPUT_BYTES_MAX: u64 = 8 << 10;
/// Default hook timeout.
pub const HOOK_TIMEOUT_MS_DEFAULT: u64 = 30_000;
/// Longest hook timeout accepted.
pub const HOOK_TIMEOUT_MS_MAX: u64 = 3_600_000;
/// How often a running hook is polled.
const HOOK_POLL: Duration = Duration::from_millis(10);

/// Why an activation could not be applied. The output file is as it was before the call
/// unless the error says otherwise.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApplyError {
    /// A bad name, timeout or document.
    #[error("{0}")]
    Invalid(String),
    /// The document cannot be written in the watch's format (TOML has no null).
    #[error("topology {name} version {version} cannot be written as {format}: {reason}")]
    Render {
        /// Topology name.
        name: String,
        /// Version.
        version: u64,
        /// The format.
        format: Format,
        /// Why.
        reason: String,
    },
    /// A damaged record in the data directory.
    #[error("{path}: {what}")]
    Corrupt {
        /// The file.
        path: String,
        /// What is wrong.
        what: String,
    },
    /// IO on the output path or the data directory.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: String,
        /// The error.
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ApplyError + '_ {
    move |source| ApplyError::Io { path: path.display().to_string(), source }
}

/// What a router watches: where and how to write one topology name, and what to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Watch {
    /// Topology name.
    pub name: String,
    /// The output file.
    pub path: PathBuf,
    /// The format it is written in.
    pub format: Format,
    /// Hook command, run with `sh -c`.
    pub hook: Option<String>,
    /// Hook timeout.
    pub hook_timeout_ms: u64,
}

impl Watch {
    /// Checks the name and the timeout.
    ///
    /// # Errors
    /// [`ApplyError::Invalid`] naming the problem.
    pub fn validate(&self) -> Result<(), ApplyError> {
        mycel_consensus::topology::validate_name(&self.name).map_err(ApplyError::Invalid)?;
        if self.hook_timeout_ms == 0 || self.hook_timeout_ms > HOOK_TIMEOUT_MS_MAX {
            return Err(ApplyError::Invalid(format!(
                "hook timeout {} ms: 1 to {HOOK_TIMEOUT_MS_MAX}",
                self.hook_timeout_ms
            )));
        }
        if self.path.file_name().is_none() {
            return Err(ApplyError::Invalid(format!(
                "output path {} names no file",
                self.path.display()
            )));
        }
        Ok(())
    }
}

/// A watch as written in a router's config file (one `[[topology.watch]]` table) or given to
/// `mycel topology watch NAME --out PATH [--format F] [--exec CMD]`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchConfig {
    /// Topology name.
    pub name: String,
    /// The output file.
    pub out: PathBuf,
    /// `json`, `yaml` or `toml`; by default from the extension of `out`, else `json`.
    #[serde(default)]
    pub format: Option<String>,
    /// Hook command, run with `sh -c`.
    #[serde(default)]
    pub exec: Option<String>,
    /// Hook timeout.
    #[serde(default = "default_hook_timeout_ms")]
    pub hook_timeout_ms: u64,
}

fn default_hook_timeout_ms() -> u64 {
    HOOK_TIMEOUT_MS_DEFAULT
}

impl WatchConfig {
    /// The checked [`Watch`].
    ///
    /// # Errors
    /// [`ApplyError::Invalid`] for an unknown format, a bad name, an empty hook, or a timeout
    /// out of bounds.
    pub fn watch(&self) -> Result<Watch, ApplyError> {
        let format = match &self.format {
            Some(f) => f.parse::<Format>().map_err(|e| ApplyError::Invalid(e.to_string()))?,
            None => self
                .out
                .extension()
                .and_then(|e| e.to_str())
                .and_then(|e| e.parse::<Format>().ok())
                .unwrap_or(Format::Json),
        };
        if self.exec.as_deref().is_some_and(|c| c.trim().is_empty()) {
            return Err(ApplyError::Invalid(format!("watch of {}: empty hook command", self.name)));
        }
        let w = Watch {
            name: self.name.clone(),
            path: self.out.clone(),
            format,
            hook: self.exec.clone(),
            hook_timeout_ms: self.hook_timeout_ms,
        };
        w.validate()?;
        Ok(w)
    }
}

/// One activation to apply (from [`mycel_consensus::topology::Target`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Activation {
    /// Topology name.
    pub name: String,
    /// Version.
    pub version: u64,
    /// Canonical root CID (text), for the hook.
    pub cid: String,
    /// The version this router had applied before (none: first).
    pub previous_version: Option<u64>,
    /// The Raft index of the activation: the hook runs once per index.
    pub activation_index: u64,
}

/// How an activation ended, as recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// The hook was started and no result was recorded: a crash interrupted it.
    Started,
    /// Written, and the hook (if any) succeeded.
    Succeeded,
    /// The hook failed or timed out; the previous file was restored.
    Failed,
    /// The version was already in place; nothing was written or run.
    Unchanged,
}

impl Status {
    fn to_byte(self) -> u8 {
        match self {
            Status::Started => 1,
            Status::Succeeded => 2,
            Status::Failed => 3,
            Status::Unchanged => 4,
        }
    }

    fn from_byte(b: u8) -> Option<Status> {
        Some(match b {
            1 => Status::Started,
            2 => Status::Succeeded,
            3 => Status::Failed,
            4 => Status::Unchanged,
            _ => return None,
        })
    }
}

/// The last activation handled for a name (`DATA_DIR/topology/NAME.state`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    /// The activation's Raft index.
    pub activation_index: u64,
    /// Its version.
    pub version: u64,
    /// How it ended.
    pub status: Status,
    /// The version the file holds afterwards (0: none).
    pub applied_version: u64,
}

const RECORD_BYTES: usize = 1 + 8 + 8 + 1 + 8;

impl Record {
    fn encode(&self) -> [u8; RECORD_BYTES] {
        let mut b = [0u8; RECORD_BYTES];
        b[0] = RECORD_VERSION;
        b[1..9].copy_from_slice(&self.activation_index.to_be_bytes());
        b[9..17].copy_from_slice(&self.version.to_be_bytes());
        b[17] = self.status.to_byte();
        b[18..26].copy_from_slice(&self.applied_version.to_be_bytes());
        b
    }

    fn decode(b: &[u8]) -> Result<Record, String> {
        if b.len() != RECORD_BYTES {
            return Err(format!("{} bytes, expected {RECORD_BYTES}", b.len()));
        }
        if b[0] != RECORD_VERSION {
            return Err(format!("format version {}, this build reads {RECORD_VERSION}", b[0]));
        }
        let u64_at = |i: usize| u64::from_be_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        Ok(Record {
            activation_index: u64_at(1),
            version: u64_at(9),
            status: Status::from_byte(b[17]).ok_or_else(|| format!("status byte {}", b[17]))?,
            applied_version: u64_at(18),
        })
    }
}

/// What running the hook gave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookRun {
    /// Exit code (none: killed by a signal or the timeout).
    pub code: Option<i32>,
    /// Killed at the timeout.
    pub timed_out: bool,
    /// How long it ran.
    pub elapsed_ms: u64,
    /// The last [`HOOK_OUTPUT_BYTES_MAX`] bytes of its output (stdout and stderr).
    pub output: String,
}

impl HookRun {
    /// Whether the hook succeeded (exit code 0 within the timeout).
    pub fn ok(&self) -> bool {
        self.code == Some(0) && !self.timed_out
    }
}

/// The result of [`apply`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The file was written and the hook, if any, succeeded.
    Applied {
        /// The hook's run.
        hook: Option<HookRun>,
    },
    /// The version was already in place (a canary promoted): recorded, nothing run.
    Unchanged,
    /// The hook failed or timed out; the previous file is back (or removed, if there was
    /// none).
    HookFailed {
        /// The hook's run.
        hook: HookRun,
    },
    /// This activation was handled before; with [`Status::Started`] a crash interrupted its
    /// hook, which is not run again.
    Handled(Record),
}

/// Applies `activation` of `watch.name` with the canonical JSON document `canonical` (read
/// from the store, already verified against its CID), in the order of the module docs.
/// Callers run at most one `apply` per name at a time.
///
/// # Errors
/// [`ApplyError`] when the name, document or format is unusable, or the output path or the
/// data directory fails; then no hook has run for this activation unless a record says so.
pub fn apply(
    data_dir: &Path,
    watch: &Watch,
    activation: &Activation,
    canonical: &[u8],
) -> Result<Outcome, ApplyError> {
    watch.validate()?;
    if activation.name != watch.name {
        return Err(ApplyError::Invalid(format!(
            "activation of {} given to the watch of {}",
            activation.name, watch.name
        )));
    }
    let dir = state_dir(data_dir)?;
    let record_path = dir.join(file_stem(&watch.name) + ".state");
    let last = read_record(&record_path)?;
    if let Some(r) = last
        && r.activation_index == activation.activation_index
    {
        return Ok(Outcome::Handled(r));
    }
    let bytes = render(watch, activation, canonical)?;
    let current = read_limited(&watch.path, PREVIOUS_BYTES_MAX)?;
    if let Some(r) = last
        && r.applied_version == activation.version
        && current.as_deref() == Some(bytes.as_slice())
    {
        let record = Record {
            activation_index: activation.activation_index,
            version: activation.version,
            status: Status::Unchanged,
            applied_version: activation.version,
        };
        write_atomic(&record_path, &record.encode(), 0o600)?;
        return Ok(Outcome::Unchanged);
    }
    // Step 2: the previous file, tagged with this activation, kept across retries.
    let prev_path = dir.join(file_stem(&watch.name) + ".prev");
    let previous = match read_previous(&prev_path)? {
        Some((index, previous)) if index == activation.activation_index => previous,
        _ => {
            write_atomic(
                &prev_path,
                &encode_previous(activation.activation_index, &current),
                0o600,
            )?;
            current
        }
    };
    // The hook's log is opened before anything changes, so failing to open it changes
    // nothing.
    let log_path = dir.join(file_stem(&watch.name) + ".hook.log");
    let log = match &watch.hook {
        Some(_) => Some(
            OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&log_path)
                .map_err(io_err(&log_path))?,
        ),
        None => None,
    };
    // Step 3: the new file.
    let mode = file_mode(&watch.path)?.unwrap_or(0o644);
    write_atomic(&watch.path, &bytes, mode)?;
    let (Some(hook), Some(log)) = (&watch.hook, log) else {
        let record = Record {
            activation_index: activation.activation_index,
            version: activation.version,
            status: Status::Succeeded,
            applied_version: activation.version,
        };
        write_atomic(&record_path, &record.encode(), 0o600)?;
        return Ok(Outcome::Applied { hook: None });
    };
    // Step 4: claim the hook run before starting it.
    let mut record = Record {
        activation_index: activation.activation_index,
        version: activation.version,
        status: Status::Started,
        applied_version: activation.version,
    };
    write_atomic(&record_path, &record.encode(), 0o600)?;
    // Step 5.
    let run = run_hook(hook, watch, activation, (&log_path, log));
    if run.ok() {
        record.status = Status::Succeeded;
        write_atomic(&record_path, &record.encode(), 0o600)?;
        return Ok(Outcome::Applied { hook: Some(run) });
    }
    // Step 6: put the previous file back.
    match &previous {
        Some(old) => write_atomic(&watch.path, old, mode)?,
        None => remove_synced(&watch.path)?,
    }
    record.status = Status::Failed;
    record.applied_version = last.map_or(0, |r| r.applied_version);
    write_atomic(&record_path, &record.encode(), 0o600)?;
    Ok(Outcome::HookFailed { hook: run })
}

/// The signed command proposing `canonical` (the canonical JSON `mycel add` stored, whose
/// source bytes have root `source`) as the next version of `name` on `base`, by the node
/// whose identity key is `key`. The root is computed here as every manager will recompute it.
///
/// # Errors
/// [`ApplyError::Invalid`] for a bad name, a document over
/// [`mycel_consensus::topology::CANONICAL_BYTES_MAX`], or a bad chunker identity.
#[allow(clippy::too_many_arguments)]
pub fn stage_command(
    key: &ed25519_dalek::SigningKey,
    name: &str,
    base: u64,
    force: bool,
    canonical: Vec<u8>,
    source: &mycel_chunker::Cid,
    config: &mycel_chunker::Config,
    now_ms: u64,
) -> Result<mycel_consensus::command::Command, ApplyError> {
    use mycel_consensus::topology as t;
    t::validate_name(name).map_err(ApplyError::Invalid)?;
    if canonical.len() > t::CANONICAL_BYTES_MAX {
        return Err(ApplyError::Invalid(format!(
            "the canonical form of this topology is {} bytes; proposals carry at most {}",
            canonical.len(),
            t::CANONICAL_BYTES_MAX
        )));
    }
    let root = canon::object_root(&canonical, config)
        .map_err(|e| ApplyError::Invalid(format!("chunker identity: {e}")))?;
    let mut stage = mycel_consensus::command::StageTopology {
        name: name.to_owned(),
        base,
        canonical,
        chunker: (*config).into(),
        root: root.to_bytes().to_vec(),
        source: source.to_bytes().to_vec(),
        proposer: t::peer_of_key(&key.verifying_key().to_bytes()),
        proposed_ms: now_ms,
        signature: Vec::new(),
        force,
    };
    t::sign(&mut stage, &key.to_bytes());
    Ok(mycel_consensus::command::Command::StageTopology(Box::new(stage)))
}

/// The last activation handled for `name`, if any.
///
/// # Errors
/// [`ApplyError`] for an unreadable or damaged record.
pub fn last_applied(data_dir: &Path, name: &str) -> Result<Option<Record>, ApplyError> {
    mycel_consensus::topology::validate_name(name).map_err(ApplyError::Invalid)?;
    read_record(&data_dir.join("topology").join(file_stem(name) + ".state"))
}

/// Whether the watched file still holds a version's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drift {
    /// The file holds exactly the version's bytes.
    InSync,
    /// The file differs (edited by hand, or another version).
    Changed,
    /// There is no file.
    Missing,
}

/// Compares the file at `watch.path` with `canonical` written in the watch's format.
///
/// # Errors
/// [`ApplyError`] when the document cannot be rendered or the file cannot be read.
pub fn drift(watch: &Watch, version: u64, canonical: &[u8]) -> Result<Drift, ApplyError> {
    let activation = Activation {
        name: watch.name.clone(),
        version,
        cid: String::new(),
        previous_version: None,
        activation_index: 0,
    };
    let want = render(watch, &activation, canonical)?;
    // One byte more than expected is enough to tell a longer file apart.
    Ok(match read_up_to(&watch.path, want.len() as u64 + 1)? {
        None => Drift::Missing,
        Some(have) if have == want => Drift::InSync,
        Some(_) => Drift::Changed,
    })
}

fn render(watch: &Watch, a: &Activation, canonical: &[u8]) -> Result<Vec<u8>, ApplyError> {
    let err = |reason: String| ApplyError::Render {
        name: watch.name.clone(),
        version: a.version,
        format: watch.format,
        reason,
    };
    let value = canon::parse(canonical, Format::Json).map_err(|e| err(e.to_string()))?;
    canon::render(&value, watch.format).map_err(|e| err(e.to_string()))
}

/// The file name stem for a topology name (`/` is not allowed in file names; `+` is not
/// allowed in topology names, so the mapping is one to one).
fn file_stem(name: &str) -> String {
    name.replace('/', "+")
}

fn state_dir(data_dir: &Path) -> Result<PathBuf, ApplyError> {
    let dir = data_dir.join("topology");
    if !dir.is_dir() {
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).map_err(io_err(&dir))?;
        sync_dir(data_dir)?;
    }
    Ok(dir)
}

fn read_record(path: &Path) -> Result<Option<Record>, ApplyError> {
    let Some(bytes) = read_limited(path, RECORD_BYTES as u64 + 1)? else { return Ok(None) };
    Record::decode(&bytes)
        .map(Some)
        .map_err(|what| ApplyError::Corrupt { path: path.display().to_string(), what })
}

/// `NAME.prev`: version byte, activation index, presence byte, the bytes.
fn encode_previous(index: u64, previous: &Option<Vec<u8>>) -> Vec<u8> {
    let mut b = vec![RECORD_VERSION];
    b.extend_from_slice(&index.to_be_bytes());
    match previous {
        Some(bytes) => {
            b.push(1);
            b.extend_from_slice(bytes);
        }
        None => b.push(0),
    }
    b
}

type Previous = (u64, Option<Vec<u8>>);

fn read_previous(path: &Path) -> Result<Option<Previous>, ApplyError> {
    let Some(b) = read_limited(path, PREVIOUS_BYTES_MAX + 10)? else { return Ok(None) };
    let corrupt =
        |what: &str| ApplyError::Corrupt { path: path.display().to_string(), what: what.into() };
    if b.len() < 10 || b[0] != RECORD_VERSION {
        return Err(corrupt("not a previous-file record of this version"));
    }
    let index = u64::from_be_bytes(b[1..9].try_into().expect("8 bytes"));
    match b[9] {
        0 if b.len() == 10 => Ok(Some((index, None))),
        1 => Ok(Some((index, Some(b[10..].to_vec())))),
        _ => Err(corrupt("bad presence byte")),
    }
}

/// The file's bytes, `None` if it does not exist.
///
/// # Errors
/// IO errors, and a file larger than `max` (not a file mycel wrote).
fn read_limited(path: &Path, max: u64) -> Result<Option<Vec<u8>>, ApplyError> {
    let bytes = read_up_to(path, max + 1)?;
    if bytes.as_ref().is_some_and(|b| b.len() as u64 > max) {
        return Err(ApplyError::Invalid(format!("{} is larger than {max} bytes", path.display())));
    }
    Ok(bytes)
}

/// At most the first `n` bytes of the file, `None` if it does not exist.
fn read_up_to(path: &Path, n: u64) -> Result<Option<Vec<u8>>, ApplyError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path)(e)),
    };
    let mut bytes = Vec::new();
    file.take(n).read_to_end(&mut bytes).map_err(io_err(path))?;
    Ok(Some(bytes))
}

fn file_mode(path: &Path) -> Result<Option<u32>, ApplyError> {
    match fs::metadata(path) {
        Ok(m) => Ok(Some(m.permissions().mode() & 0o7777)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, fsync,
/// rename over `path`, fsync the directory.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), ApplyError> {
    let dir = parent(path);
    let name = path.file_name().expect("validated: the path names a file").to_string_lossy();
    let tmp = dir.join(format!(".{name}.mycel-tmp.{}", std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        f.set_permissions(fs::Permissions::from_mode(mode)).map_err(io_err(&tmp))?;
        f.write_all(bytes).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        fs::rename(&tmp, path).map_err(io_err(path))?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn remove_synced(path: &Path) -> Result<(), ApplyError> {
    match fs::remove_file(path) {
        Ok(()) => sync_dir(parent(path)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(path)(e)),
    }
}

fn sync_dir(dir: &Path) -> Result<(), ApplyError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))
}

/// Runs `sh -c hook` in its own process group with the `MYCEL_TOPOLOGY_*` environment, its
/// output to `log` (a file, so a hook leaving children behind cannot block us on a pipe),
/// killing the whole group at the timeout. A hook that cannot be started or waited for counts
/// as failed, with the reason as its output.
fn run_hook(hook: &str, watch: &Watch, a: &Activation, log: (&Path, File)) -> HookRun {
    let (log_path, out) = log;
    let previous = a.previous_version.map(|v| v.to_string()).unwrap_or_default();
    let started = Instant::now();
    let failed = |why: String| HookRun {
        code: None,
        timed_out: false,
        elapsed_ms: started.elapsed().as_millis() as u64,
        output: why,
    };
    let err = match out.try_clone() {
        Ok(e) => e,
        Err(e) => return failed(format!("cannot open the hook log: {e}")),
    };
    let spawned = Command::new("sh")
        .arg("-c")
        .arg(hook)
        .env("MYCEL_TOPOLOGY_NAME", &a.name)
        .env("MYCEL_TOPOLOGY_VERSION", a.version.to_string())
        .env("MYCEL_TOPOLOGY_CID", &a.cid)
        .env("MYCEL_TOPOLOGY_PATH", &watch.path)
        .env("MYCEL_TOPOLOGY_PREVIOUS_VERSION", previous)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => return failed(format!("cannot start sh: {e}")),
    };
    let kill_group = |pid: u32| {
        // SAFETY: kill(2) on the process group the child leads (its pid, not yet reaped, so
        // not reused); no memory is touched.
        unsafe {
            libc::kill(-(pid as libc::pid_t), libc::SIGKILL);
        }
    };
    let deadline = started + Duration::from_millis(watch.hook_timeout_ms);
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(HOOK_POLL),
            Ok(None) => {
                timed_out = true;
                kill_group(child.id());
                break child.wait();
            }
            Err(e) => {
                kill_group(child.id());
                let _ = child.wait();
                break Err(e);
            }
        }
    };
    let status = match status {
        Ok(s) => s,
        Err(e) => return failed(format!("cannot wait for the hook: {e}")),
    };
    let output = log_tail(log_path).unwrap_or_else(|e| format!("(hook log unreadable: {e})"));
    HookRun {
        code: status.code(),
        timed_out,
        elapsed_ms: started.elapsed().as_millis() as u64,
        output,
    }
}

fn log_tail(log: &Path) -> io::Result<String> {
    let mut f = File::open(log)?;
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(HOOK_OUTPUT_BYTES_MAX)))?;
    let mut tail = Vec::new();
    f.take(HOOK_OUTPUT_BYTES_MAX).read_to_end(&mut tail)?;
    Ok(String::from_utf8_lossy(&tail).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1: &[u8] = br#"{"links":[{"a":"r1","b":"r2"}],"nodes":["r1","r2"]}"#;
    const V2: &[u8] = br#"{"links":[],"nodes":["r1","r2","r3"]}"#;

    struct Bench {
        _tmp: tempfile::TempDir,
        data: PathBuf,
        out: PathBuf,
    }

    fn bench() -> Bench {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let etc = tmp.path().join("etc");
        fs::create_dir_all(&data).unwrap();
        fs::create_dir_all(&etc).unwrap();
        let out = etc.join("lab.yaml");
        Bench { _tmp: tmp, data, out }
    }

    fn watch(b: &Bench, hook: Option<&str>) -> Watch {
        Watch {
            name: "lab".into(),
            path: b.out.clone(),
            format: Format::Yaml,
            hook: hook.map(str::to_owned),
            hook_timeout_ms: 5_000,
        }
    }

    fn activation(version: u64, index: u64, previous: Option<u64>) -> Activation {
        Activation {
            name: "lab".into(),
            version,
            cid: format!("bafy-v{version}"),
            previous_version: previous,
            activation_index: index,
        }
    }

    fn yaml(canonical: &[u8]) -> Vec<u8> {
        canon::render(&canon::parse(canonical, Format::Json).unwrap(), Format::Yaml).unwrap()
    }

    #[test]
    fn applies_atomically_with_the_hook_environment() {
        // The file holds the version rendered as YAML (what `mycel get --format yaml` gives),
        // no temporary file is left, and the hook sees every MYCEL_TOPOLOGY_* variable and the
        // new file at its path. A second version reports the first as previous.
        let b = bench();
        let env = b.data.join("env.txt");
        let hook = format!(
            "echo \"$MYCEL_TOPOLOGY_NAME $MYCEL_TOPOLOGY_VERSION $MYCEL_TOPOLOGY_CID \
             $MYCEL_TOPOLOGY_PATH [$MYCEL_TOPOLOGY_PREVIOUS_VERSION]\" >> {0}; \
             cat \"$MYCEL_TOPOLOGY_PATH\" > {0}.file",
            env.display()
        );
        let w = watch(&b, Some(&hook));
        let o = apply(&b.data, &w, &activation(1, 10, None), V1).unwrap();
        assert!(matches!(&o, Outcome::Applied { hook: Some(h) } if h.ok()), "{o:?}");
        assert_eq!(fs::read(&b.out).unwrap(), yaml(V1));
        assert_eq!(fs::read(b.data.join("env.txt.file")).unwrap(), yaml(V1), "hook saw the file");
        apply(&b.data, &w, &activation(2, 12, Some(1)), V2).unwrap();
        let lines = fs::read_to_string(&env).unwrap();
        let out = b.out.display();
        assert_eq!(lines, format!("lab 1 bafy-v1 {out} []\nlab 2 bafy-v2 {out} [1]\n"));
        let leftovers: Vec<_> = fs::read_dir(b.out.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(leftovers, vec!["lab.yaml".to_string()]);
        let r = last_applied(&b.data, "lab").unwrap().unwrap();
        assert_eq!((r.activation_index, r.status, r.applied_version), (12, Status::Succeeded, 2));
    }

    #[test]
    fn a_failing_hook_restores_the_previous_bytes_or_removes_the_file() {
        // Version 1 applies with a good hook. Version 2's hook exits 3: the file is version
        // 1's bytes again, byte for byte, with its hand-set mode, and the output is reported.
        // A first activation whose hook fails leaves no file at all.
        let b = bench();
        apply(&b.data, &watch(&b, Some("true")), &activation(1, 5, None), V1).unwrap();
        fs::set_permissions(&b.out, fs::Permissions::from_mode(0o640)).unwrap();
        let before = fs::read(&b.out).unwrap();
        let w = watch(&b, Some("echo reload failed >&2; exit 3"));
        let o = apply(&b.data, &w, &activation(2, 7, Some(1)), V2).unwrap();
        let Outcome::HookFailed { hook } = o else { panic!("{o:?}") };
        assert_eq!((hook.code, hook.timed_out), (Some(3), false));
        assert_eq!(hook.output, "reload failed\n");
        assert_eq!(fs::read(&b.out).unwrap(), before);
        assert_eq!(fs::metadata(&b.out).unwrap().permissions().mode() & 0o777, 0o640);
        let r = last_applied(&b.data, "lab").unwrap().unwrap();
        assert_eq!((r.status, r.applied_version), (Status::Failed, 1));
        let fresh = bench();
        let o = apply(&fresh.data, &watch(&fresh, Some("exit 1")), &activation(1, 3, None), V1);
        assert!(matches!(o.unwrap(), Outcome::HookFailed { .. }));
        assert!(!fresh.out.exists(), "no file before, none after");
    }

    #[test]
    fn a_hook_past_its_timeout_is_killed_with_its_children() {
        // A hook that sleeps (in a child process) past a 200 ms timeout is killed within
        // a few seconds, reported as timed out, and the previous file is restored.
        let b = bench();
        apply(&b.data, &watch(&b, None), &activation(1, 1, None), V1).unwrap();
        let mut w = watch(&b, Some("sleep 30 & wait"));
        w.hook_timeout_ms = 200;
        let o = apply(&b.data, &w, &activation(2, 2, Some(1)), V2).unwrap();
        let Outcome::HookFailed { hook } = o else { panic!("{o:?}") };
        assert!(hook.timed_out);
        assert!(hook.elapsed_ms >= 200 && hook.elapsed_ms < 5_000, "{}", hook.elapsed_ms);
        assert_eq!(fs::read(&b.out).unwrap(), yaml(V1));
    }

    #[test]
    fn each_activation_runs_its_hook_once_across_restarts() {
        // Applying the same activation again (a restart replaying its targets) runs nothing.
        // A crash after the hook was claimed (record left as started) is reported, not rerun.
        // A crash before the claim (file written, no record) reruns it once and still restores
        // the bytes from before the activation. A canary promotion (same version, new index)
        // runs nothing; a rollback to version 1 (new index) runs it again.
        let b = bench();
        let count = b.data.join("count");
        let hook = format!("echo x >> {}", count.display());
        let runs = || fs::read_to_string(&count).map(|s| s.lines().count()).unwrap_or(0);
        let w = watch(&b, Some(&hook));
        apply(&b.data, &w, &activation(1, 4, None), V1).unwrap();
        let again = apply(&b.data, &w, &activation(1, 4, None), V1).unwrap();
        assert!(matches!(again, Outcome::Handled(Record { status: Status::Succeeded, .. })));
        assert_eq!(runs(), 1);
        // Simulated crash during activation 6's hook: the claim is on disk, no result.
        let claim =
            Record { activation_index: 6, version: 2, status: Status::Started, applied_version: 2 };
        write_atomic(&b.data.join("topology/lab.state"), &claim.encode(), 0o600).unwrap();
        let o = apply(&b.data, &w, &activation(2, 6, Some(1)), V2).unwrap();
        assert_eq!(o, Outcome::Handled(claim), "interrupted, not rerun");
        assert_eq!(runs(), 1);
        // Simulated crash before the claim of activation 8: the previous file was kept and
        // the new file written, then the process died.
        let b2 = bench();
        let w2 = watch(&b2, Some("exit 1"));
        apply(&b2.data, &watch(&b2, None), &activation(1, 1, None), V1).unwrap();
        let prev = encode_previous(8, &Some(yaml(V1)));
        write_atomic(&b2.data.join("topology/lab.prev"), &prev, 0o600).unwrap();
        write_atomic(&b2.out, &yaml(V2), 0o644).unwrap();
        let o = apply(&b2.data, &w2, &activation(2, 8, Some(1)), V2).unwrap();
        assert!(matches!(o, Outcome::HookFailed { .. }));
        assert_eq!(fs::read(&b2.out).unwrap(), yaml(V1), "restored to before activation 8");
        // Canary promotion of version 2 after it applied as a canary at index 9.
        apply(&b.data, &w, &activation(2, 9, Some(1)), V2).unwrap();
        assert_eq!(runs(), 2);
        assert_eq!(
            apply(&b.data, &w, &activation(2, 11, Some(1)), V2).unwrap(),
            Outcome::Unchanged
        );
        assert_eq!(runs(), 2);
        apply(&b.data, &w, &activation(1, 13, Some(2)), V1).unwrap();
        assert_eq!(runs(), 3, "a rollback is a new activation");
        assert_eq!(fs::read(&b.out).unwrap(), yaml(V1));
    }

    #[test]
    fn drift_is_detected() {
        // In sync after applying; a hand edit, another version or a removed file is drift.
        let b = bench();
        let w = watch(&b, None);
        assert_eq!(drift(&w, 1, V1).unwrap(), Drift::Missing);
        apply(&b.data, &w, &activation(1, 1, None), V1).unwrap();
        assert_eq!(drift(&w, 1, V1).unwrap(), Drift::InSync);
        assert_eq!(drift(&w, 2, V2).unwrap(), Drift::Changed);
        let mut edited = fs::read(&b.out).unwrap();
        edited.extend_from_slice(b"# local edit\n");
        fs::write(&b.out, &edited).unwrap();
        assert_eq!(drift(&w, 1, V1).unwrap(), Drift::Changed);
        fs::remove_file(&b.out).unwrap();
        assert_eq!(drift(&w, 1, V1).unwrap(), Drift::Missing);
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        // A document TOML cannot express, a bad name, a zero timeout, a damaged record and
        // a record of a future format are errors, and nothing is written.
        let b = bench();
        let mut w = watch(&b, Some("true"));
        w.format = Format::Toml;
        let e = apply(&b.data, &w, &activation(1, 1, None), br#"{"a":null}"#).unwrap_err();
        assert!(matches!(e, ApplyError::Render { .. }), "{e}");
        assert!(!b.out.exists());
        let e = apply(&b.data, &w, &activation(1, 1, None), b"{not json").unwrap_err();
        assert!(matches!(e, ApplyError::Render { .. }), "{e}");
        let bad_name = Watch { name: "../x".into(), ..watch(&b, None) };
        assert!(matches!(bad_name.validate(), Err(ApplyError::Invalid(_))));
        let zero = Watch { hook_timeout_ms: 0, ..watch(&b, None) };
        assert!(matches!(zero.validate(), Err(ApplyError::Invalid(_))));
        fs::create_dir_all(b.data.join("topology")).unwrap();
        fs::write(b.data.join("topology/lab.state"), b"\x01short").unwrap();
        let e = apply(&b.data, &watch(&b, None), &activation(1, 1, None), V1).unwrap_err();
        assert!(matches!(e, ApplyError::Corrupt { .. }), "{e}");
        let mut future = Record {
            activation_index: 1,
            version: 1,
            status: Status::Succeeded,
            applied_version: 1,
        }
        .encode();
        future[0] = RECORD_VERSION + 1;
        fs::write(b.data.join("topology/lab.state"), future).unwrap();
        let e = last_applied(&b.data, "lab").unwrap_err();
        assert!(e.to_string().contains("format version"), "{e}");
        assert!(!b.out.exists());
    }

    #[test]
    fn replicas_compute_the_root_the_store_gives() {
        // The root a replica recomputes from the canonical bytes (what StageTopology is
        // checked against) equals the root `mycel add` stores for the file, with the default
        // identity and with a tiny one that cuts a multi-level tree.
        use crate::ingest::{self, KindArg, Progress};
        use mycel_chunker::Config;
        let b = bench();
        let store = crate::store::Store::open(&b.data.join("store")).unwrap();
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/topologies/lab.yaml");
        let canonical =
            canon::canonical_json(&canon::parse(&fs::read(&file).unwrap(), Format::Yaml).unwrap());
        let tiny = Config {
            chunk_bytes_min: 64,
            chunk_bytes_avg: 256,
            chunk_bytes_max: 1024,
            fanout_bits: 1,
            ..Config::default()
        };
        for config in [Config::default(), tiny] {
            let report = ingest::add(
                &store,
                &file,
                KindArg::Topology,
                None,
                &config,
                0,
                &Progress::default(),
            )
            .unwrap();
            let root = canon::object_root(&canonical, &config).unwrap();
            assert_eq!(report.root, root.to_string(), "{config:?}");
        }
    }

    #[test]
    fn watch_configs_parse_and_are_checked() {
        // A config table gives a watch with the format from the extension and the default
        // timeout; an explicit format wins; unknown keys, formats, empty hooks and bad names
        // are refused with the reason.
        let parse = |t: &str| toml::from_str::<WatchConfig>(t).map_err(|e| e.to_string());
        let w =
            parse("name = \"lab\"\nout = \"/etc/lab/topo.yml\"\nexec = \"systemctl reload frr\"\n")
                .unwrap()
                .watch()
                .unwrap();
        assert_eq!(w.format, Format::Yaml);
        assert_eq!(w.hook_timeout_ms, HOOK_TIMEOUT_MS_DEFAULT);
        assert_eq!(w.hook.as_deref(), Some("systemctl reload frr"));
        let w = parse("name = \"core/backbone\"\nout = \"/etc/b.conf\"\nformat = \"TOML\"\nhook_timeout_ms = 500\n")
            .unwrap()
            .watch()
            .unwrap();
        assert_eq!((w.format, w.hook_timeout_ms, w.hook), (Format::Toml, 500, None));
        let plain = parse("name = \"lab\"\nout = \"/etc/lab/topology\"\n").unwrap();
        assert_eq!(plain.watch().unwrap().format, Format::Json);
        assert!(
            parse("name = \"lab\"\nout = \"x\"\nexex = \"true\"\n").unwrap_err().contains("exex")
        );
        let bad = |t: &str| parse(t).unwrap().watch().unwrap_err().to_string();
        assert!(bad("name = \"lab\"\nout = \"x\"\nformat = \"xml\"\n").contains("xml"));
        assert!(bad("name = \"lab\"\nout = \"x\"\nexec = \" \"\n").contains("empty hook"));
        assert!(bad("name = \"Lab\"\nout = \"x\"\n").contains("bad topology name"));
        assert!(bad("name = \"lab\"\nout = \"x\"\nhook_timeout_ms = 0\n").contains("timeout"));
    }

    #[test]
    fn stage_commands_are_signed_by_the_nodes_peer_id() {
        // The proposer bytes of a stage command are the node's libp2p PeerId (the layout the
        // managers read the key from), the root is the object root of the canonical bytes,
        // and an oversized document or bad name is refused before anything is sent.
        use mycel_chunker::{Cid, Config};
        use mycel_consensus::command::Command as C;
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let keypair = libp2p::identity::Keypair::ed25519_from_bytes(key.to_bytes()).unwrap();
        let source = Cid::raw(b"nodes: []\n");
        let config = Config::default();
        let c = stage_command(&key, "lab", 3, false, V1.to_vec(), &source, &config, 42).unwrap();
        let C::StageTopology(s) = c else { panic!("{c:?}") };
        assert_eq!(s.proposer, keypair.public().to_peer_id().to_bytes());
        assert_eq!(s.root, canon::object_root(V1, &config).unwrap().to_bytes().to_vec());
        assert_eq!((s.base, s.force, s.proposed_ms), (3, false, 42));
        let vk = mycel_consensus::topology::key_of_peer(&s.proposer).unwrap();
        let sig = ed25519_dalek::Signature::from_slice(&s.signature).unwrap();
        vk.verify_strict(&mycel_consensus::topology::signed_message(&s), &sig).unwrap();
        let big = vec![b' '; mycel_consensus::topology::CANONICAL_BYTES_MAX + 1];
        assert!(stage_command(&key, "lab", 0, false, big, &source, &config, 0).is_err());
        assert!(stage_command(&key, "L", 0, false, V1.to_vec(), &source, &config, 0).is_err());
    }
}
