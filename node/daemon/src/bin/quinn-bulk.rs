//! `quinn-bulk`: a plain quinn bulk transfer over loopback, the reference for mycel's exchange
//! (which runs over libp2p-quic, that is quinn inside libp2p). Run by `bench/exchange.sh`.
//!
//! In one process it starts a quinn server on `127.0.0.1:0` with a self-signed certificate and a
//! client on its own endpoint that trusts it. The client opens one bidirectional stream (libp2p
//! disables unidirectional ones) and writes the byte count; the server answers with that many
//! bytes, written from one reused 1 MiB buffer of random bytes, or with `--in FILE` read from
//! that file 1 MiB at a time (the same bytes the mycel node serves, which it reads from its
//! store), or with `--in FILE --preload` from the whole file read into memory before the
//! connection is accepted (the same bytes, no file read timed). The client reads them into one
//! reused buffer and discards them, or with `--out FILE` writes them to that file (the sink
//! `mycel get` has: the object lands in a file), hashing nothing. The clock runs from the
//! opening of the stream to the end of the stream on the client; the handshake is not timed.
//! With `--separate` the server runs in a child process of its own (this binary again, each
//! with its own runtime of two workers), as the two mycel nodes of the benchmark are two
//! processes.
//!
//! The transport and TLS settings are those libp2p-quic 0.14 builds (`QuinnConfig::from` in its
//! `config.rs` and `libp2p-tls`): 10 MB stream window, 15 MB connection window, keep-alive 5 s,
//! idle timeout 10 s, no spin bit, no datagrams, no unidirectional streams, 256 bidirectional
//! streams, MTU discovery on, TLS 1.3 with the cipher suites in libp2p-tls's order
//! (ChaCha20-Poly1305 first, so that is what two libp2p nodes negotiate). `--cipher aes128`
//! puts AES-128-GCM first to show what the cipher choice costs.
//!
//! Prints one JSON line: `{"bytes", "seconds", "mb_s", "stream_window", "conn_window", "cipher"}`
//! with `mb_s` in 10^6 bytes per second.

#![allow(clippy::disallowed_methods, clippy::disallowed_types)] // a driver: clock, RNG, sockets

use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::{Parser, ValueEnum};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::rustls;
use quinn::rustls::crypto::aws_lc_rs::cipher_suite;
use quinn::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use quinn::{Endpoint, TransportConfig, VarInt};
use rand::{RngCore, SeedableRng};

/// libp2p-quic 0.14 `Config::new`: `max_stream_data`.
const STREAM_WINDOW_BYTES: u32 = 10_000_000;
/// libp2p-quic 0.14 `Config::new`: `max_connection_data`.
const CONN_WINDOW_BYTES: u32 = 15_000_000;
/// libp2p-quic 0.14 `Config::new`: `keep_alive_interval`.
const KEEP_ALIVE: Duration = Duration::from_secs(5);
/// libp2p-quic 0.14 `Config::new`: `max_idle_timeout` (ms).
const IDLE_TIMEOUT_MS: u32 = 10_000;
/// libp2p-quic 0.14 `Config::new`: `max_concurrent_stream_limit`.
const STREAMS_BIDI_MAX: u32 = 256;
/// The send and receive buffers, reused for the whole transfer.
const BUFFER_BYTES: usize = 1 << 20;
const SERVER_NAME: &str = "localhost";

/// A plain quinn bulk transfer over loopback with libp2p-quic's settings.
#[derive(Debug, Parser)]
#[command(name = "quinn-bulk")]
struct Args {
    /// Bytes the server sends.
    #[arg(long)]
    bytes: u64,
    /// Per-stream receive window in bytes (libp2p-quic `max_stream_data`).
    #[arg(long, default_value_t = STREAM_WINDOW_BYTES)]
    stream_window: u32,
    /// Per-connection receive window in bytes (libp2p-quic `max_connection_data`).
    #[arg(long, default_value_t = CONN_WINDOW_BYTES)]
    conn_window: u32,
    /// Preferred TLS 1.3 cipher suite; `chacha20` is what two libp2p nodes negotiate.
    #[arg(long, value_enum, default_value_t = Cipher::Chacha20)]
    cipher: Cipher,
    /// Write the received bytes to this file (created or truncated), as `mycel get` writes
    /// the object it fetched; without it they are discarded.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
    /// Send the first `--bytes` bytes of this file (plain blocking reads, as the sink's
    /// writes are) instead of one buffer of random bytes over and over.
    #[arg(long = "in")]
    input: Option<std::path::PathBuf>,
    /// With `--in`: read the first `--bytes` bytes of the file into memory before the
    /// transfer, and send from there.
    #[arg(long, requires = "input")]
    preload: bool,
    /// Run the server in a process of its own (as two mycel nodes are two processes, each
    /// with its own runtime) rather than beside the client in this one.
    #[arg(long)]
    separate: bool,
    /// Internal: be the server process of `--separate` (prints its address and certificate
    /// on one line, serves one transfer, exits).
    #[arg(long, hide = true)]
    serve_child: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Cipher {
    /// ChaCha20-Poly1305 first (libp2p-tls's order).
    Chacha20,
    /// AES-128-GCM first (rustls's default order).
    Aes128,
}

impl Cipher {
    fn name(self) -> &'static str {
        match self {
            Cipher::Chacha20 => "TLS13_CHACHA20_POLY1305_SHA256",
            Cipher::Aes128 => "TLS13_AES_128_GCM_SHA256",
        }
    }
}

/// The JSON line printed at the end (fields in this order).
#[derive(Debug, serde::Serialize)]
struct Report {
    bytes: u64,
    seconds: f64,
    mb_s: f64,
    stream_window: u32,
    conn_window: u32,
    cipher: &'static str,
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(args.stream_window > 0 && args.conn_window > 0, "windows must be positive");
    if let Some(path) = &args.input {
        let len = std::fs::metadata(path).with_context(|| format!("{}", path.display()))?.len();
        ensure!(len >= args.bytes, "{} has {len} bytes, fewer than --bytes", path.display());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    if args.serve_child {
        return runtime.block_on(serve_child(&args));
    }
    let seconds = runtime.block_on(transfer(&args))?;
    let report = Report {
        bytes: args.bytes,
        seconds,
        mb_s: args.bytes as f64 / 1e6 / seconds,
        stream_window: args.stream_window,
        conn_window: args.conn_window,
        cipher: args.cipher.name(),
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// Runs the server (here or, with `--separate`, in a child process) and the client; returns
/// the client's seconds from stream open to end.
async fn transfer(args: &Args) -> Result<f64> {
    let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let (server_addr, cert, server) = if args.separate {
        let (addr, cert, child) = spawn_server(args)?;
        (addr, cert, Server::Child(child))
    } else {
        let (server_config, cert) = server_config(args)?;
        let server = Endpoint::server(server_config, loopback)?;
        let addr = server.local_addr()?;
        let serving = tokio::spawn(serve(server.clone(), Source::open(args)?));
        (addr, cert, Server::Task(server, serving))
    };

    let mut client = Endpoint::client(loopback)?;
    client.set_default_client_config(client_config(args, cert)?);
    let conn = client.connect(server_addr, SERVER_NAME)?.await.context("handshake")?;

    let start = Instant::now();
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(&args.bytes.to_le_bytes()).await?;
    send.finish()?;
    let mut sink = vec![0u8; BUFFER_BYTES];
    let mut out = match &args.out {
        // Plain blocking writes (to tmpfs in the benchmark): the cheapest honest sink.
        Some(path) => {
            Some(std::fs::File::create(path).with_context(|| format!("{}", path.display()))?)
        }
        None => None,
    };
    let mut received = 0u64;
    while let Some(n) = recv.read(&mut sink).await? {
        if let Some(out) = out.as_mut() {
            out.write_all(&sink[..n])?;
        }
        received += n as u64;
    }
    if let Some(out) = out.as_mut() {
        out.flush()?;
    }
    let seconds = start.elapsed().as_secs_f64();
    ensure!(received == args.bytes, "received {received} of {} bytes", args.bytes);

    conn.close(VarInt::from_u32(0), b"done");
    match server {
        Server::Task(server, serving) => {
            serving.await.context("server task")??;
            client.wait_idle().await;
            server.wait_idle().await;
        }
        Server::Child(mut child) => {
            client.wait_idle().await;
            let status = child.0.wait().context("waiting for the server process")?;
            ensure!(status.success(), "the server process failed: {status}");
        }
    }
    Ok(seconds)
}

/// Where the server runs.
enum Server {
    Task(Endpoint, tokio::task::JoinHandle<Result<()>>),
    Child(ServerProcess),
}

/// The server process of `--separate`, killed if the client gives up before it is waited for
/// (it would wait for a connection forever).
struct ServerProcess(std::process::Child);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Starts this binary as the server process; returns its address and certificate (from the
/// one line it prints first) and the process.
fn spawn_server(args: &Args) -> Result<(SocketAddr, CertificateDer<'static>, ServerProcess)> {
    use std::io::BufRead as _;
    let child = std::process::Command::new(std::env::current_exe()?)
        .args(["--serve-child", "--bytes", &args.bytes.to_string()])
        .args(args.input.iter().flat_map(|p| [std::ffi::OsStr::new("--in"), p.as_os_str()]))
        .args(args.preload.then_some("--preload"))
        .args(["--stream-window", &args.stream_window.to_string()])
        .args(["--conn-window", &args.conn_window.to_string()])
        .args([
            "--cipher",
            args.cipher.to_possible_value().expect("no skipped variants").get_name(),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting the server process")?;
    let mut child = ServerProcess(child);
    let mut line = String::new();
    let stdout = child.0.stdout.take().context("the server process's stdout")?;
    std::io::BufReader::new(stdout).read_line(&mut line)?;
    let (addr, hex) =
        line.trim().split_once(' ').context("the server process printed no address")?;
    ensure!(hex.len() % 2 == 0, "the server process printed an odd-length certificate");
    let cert = hex
        .as_bytes()
        .chunks(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair)?, 16).map_err(Into::into))
        .collect::<Result<Vec<u8>>>()
        .context("the server process's certificate")?;
    Ok((addr.parse()?, CertificateDer::from(cert), child))
}

/// The server process of `--separate`: prints `ADDRESS CERT_HEX`, serves one transfer.
async fn serve_child(args: &Args) -> Result<()> {
    let source = Source::open(args)?;
    let (server_config, cert) = server_config(args)?;
    let server = Endpoint::server(server_config, SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
    let hex: String = cert.iter().map(|b| format!("{b:02x}")).collect();
    println!("{} {hex}", server.local_addr()?);
    std::io::stdout().flush()?;
    serve(server.clone(), source).await?;
    server.wait_idle().await;
    Ok(())
}

/// Where the server's bytes come from.
enum Source {
    /// One buffer of random bytes, sent over and over.
    Buffer(Vec<u8>),
    /// A file, read a buffer at a time as the bytes are sent.
    File(std::fs::File, Vec<u8>),
    /// A file's first `--bytes` bytes, read before the transfer.
    Memory(Vec<u8>),
}

impl Source {
    fn open(args: &Args) -> Result<Source> {
        use std::io::Read as _;
        let Some(path) = &args.input else {
            let mut buffer = vec![0u8; BUFFER_BYTES];
            rand_chacha::ChaCha8Rng::seed_from_u64(u64::from_le_bytes(*b"quinnblk"))
                .fill_bytes(&mut buffer);
            return Ok(Source::Buffer(buffer));
        };
        let mut file = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
        if !args.preload {
            return Ok(Source::File(file, vec![0u8; BUFFER_BYTES]));
        }
        let len = usize::try_from(args.bytes).context("--bytes does not fit in memory")?;
        let mut all = vec![0u8; len];
        file.read_exact(&mut all).context("the input is shorter than --bytes")?;
        Ok(Source::Memory(all))
    }

    /// The next `n` bytes to send (`at` bytes were sent before).
    fn next(&mut self, at: u64, n: usize) -> Result<&[u8]> {
        use std::io::Read as _;
        Ok(match self {
            Source::Buffer(buffer) => &buffer[..n],
            Source::File(file, buffer) => {
                file.read_exact(&mut buffer[..n]).context("the input is shorter than --bytes")?;
                &buffer[..n]
            }
            Source::Memory(all) => {
                let at = usize::try_from(at)?;
                all.get(at..at + n).context("the client asked for more than --bytes")?
            }
        })
    }
}

/// Accepts one connection and one stream, reads the byte count and sends that many bytes
/// from `source`.
async fn serve(endpoint: Endpoint, mut source: Source) -> Result<()> {
    let incoming = endpoint.accept().await.context("server endpoint closed")?;
    let conn = incoming.await?;
    let (mut send, mut recv) = conn.accept_bi().await?;
    let mut request = [0u8; 8];
    recv.read_exact(&mut request).await?;
    let total = u64::from_le_bytes(request);
    let mut sent = 0u64;
    while sent < total {
        let n = usize::try_from(total - sent).map_or(BUFFER_BYTES, |r| r.min(BUFFER_BYTES));
        send.write_all(source.next(sent, n)?).await?;
        sent += n as u64;
    }
    send.finish()?;
    // The client closes the connection once it has read everything.
    let reason = conn.closed().await;
    match reason {
        quinn::ConnectionError::ApplicationClosed(_) => Ok(()),
        other => bail!("server connection ended: {other}"),
    }
}

/// libp2p-tls's crypto provider, with the cipher suites in the order `--cipher` asks for.
fn provider(args: &Args) -> Arc<rustls::crypto::CryptoProvider> {
    // libp2p-tls: aws-lc-rs with its three TLS 1.3 suites; the client's order decides (the
    // rustls server follows the client's preference unless told otherwise).
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.cipher_suites = match args.cipher {
        Cipher::Chacha20 => vec![
            cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
            cipher_suite::TLS13_AES_256_GCM_SHA384,
            cipher_suite::TLS13_AES_128_GCM_SHA256,
        ],
        Cipher::Aes128 => vec![
            cipher_suite::TLS13_AES_128_GCM_SHA256,
            cipher_suite::TLS13_AES_256_GCM_SHA384,
            cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ],
    };
    Arc::new(provider)
}

/// The server's configuration with a fresh self-signed certificate, and that certificate.
fn server_config(args: &Args) -> Result<(quinn::ServerConfig, CertificateDer<'static>)> {
    let certified = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_owned()])?;
    let cert: CertificateDer<'static> = certified.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der()));
    let server_tls = rustls::ServerConfig::builder_with_provider(provider(args))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)?;
    let mut server =
        quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(server_tls)?));
    server.transport = transport(args);
    server.migration(false);
    Ok((server, cert))
}

/// The client's configuration, trusting `cert`.
fn client_config(args: &Args, cert: CertificateDer<'static>) -> Result<quinn::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert)?;
    let client_tls = rustls::ClientConfig::builder_with_provider(provider(args))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut client = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(client_tls)?));
    client.transport_config(transport(args));
    Ok(client)
}

/// libp2p-quic's transport settings, with `--stream-window` and `--conn-window`.
fn transport(args: &Args) -> Arc<TransportConfig> {
    // libp2p-quic `QuinnConfig::from`, line for line; send_window keeps quinn's default there.
    let mut transport = TransportConfig::default();
    transport.max_concurrent_uni_streams(0u32.into());
    transport.max_concurrent_bidi_streams(STREAMS_BIDI_MAX.into());
    transport.datagram_receive_buffer_size(None);
    transport.keep_alive_interval(Some(KEEP_ALIVE));
    transport.max_idle_timeout(Some(VarInt::from_u32(IDLE_TIMEOUT_MS).into()));
    transport.allow_spin(false);
    transport.stream_receive_window(args.stream_window.into());
    transport.receive_window(args.conn_window.into());
    transport.mtu_discovery_config(Some(quinn::MtuDiscoveryConfig::default()));
    Arc::new(transport)
}
